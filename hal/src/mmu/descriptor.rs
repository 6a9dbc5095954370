//! Stage 1 VMSAv8-64 translation table descriptors, 4 KiB granule, 48-bit output addresses.
//!
//! ```text
//!  63   62:61    60     59    58:55  54   53   52  51:48  47 ........... 12  11  10  9:8  7:6  5  4:2   1   0
//! NSTbl APTbl UXNTbl PXNTbl  SW    UXN  PXN  Cont  res0   output address   nG  AF  SH   AP  NS AttrIdx T  V
//! `------ table only -----'        `------ leaf (block / page) only --'                 `- leaf only --'
//! ```
//!
//! `T` (bit 1) is 1 for a table (levels 0-2) or a page (level 3), 0 for a block (levels 1-2).
//! This module only encodes and decodes; where descriptors live and when they may change is
//! the walker's business ([`super::table`]).

use core::fmt;

use tock_registers::{register_bitfields, LocalRegisterCopy};

use super::attr::{Attributes, MemoryType, Permissions};
use super::table::level_size;
use crate::addr::PhysAddr;

register_bitfields! [u64,
    STAGE1 [
        VALID OFFSET(0) NUMBITS(1) [],
        TYPE OFFSET(1) NUMBITS(1) [
            Block = 0,
            TableOrPage = 1
        ],
        ATTR_INDX OFFSET(2) NUMBITS(3) [],
        NS OFFSET(5) NUMBITS(1) [],
        AP OFFSET(6) NUMBITS(2) [
            RW_EL1 = 0b00,
            RW_EL1_EL0 = 0b01,
            RO_EL1 = 0b10,
            RO_EL1_EL0 = 0b11
        ],
        SH OFFSET(8) NUMBITS(2) [
            NonShareable = 0b00,
            OuterShareable = 0b10,
            InnerShareable = 0b11
        ],
        AF OFFSET(10) NUMBITS(1) [],
        NG OFFSET(11) NUMBITS(1) [],
        OUTPUT_ADDR OFFSET(12) NUMBITS(36) [],
        CONTIGUOUS OFFSET(52) NUMBITS(1) [],
        PXN OFFSET(53) NUMBITS(1) [],
        UXN OFFSET(54) NUMBITS(1) [],
        SOFTWARE OFFSET(55) NUMBITS(4) [],
        PXN_TABLE OFFSET(59) NUMBITS(1) [],
        UXN_TABLE OFFSET(60) NUMBITS(1) [],
        AP_TABLE OFFSET(61) NUMBITS(2) [],
        NS_TABLE OFFSET(63) NUMBITS(1) []
    ]
];

type Raw = LocalRegisterCopy<u64, STAGE1::Register>;

/// Bits 47:12: the output address of a page or the next-level table.
pub const OUTPUT_ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;
/// One past the highest output address a descriptor can hold (48-bit PA).
pub const PA_LIMIT: u64 = 1 << 48;

/// One 64-bit translation table entry.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Descriptor(u64);

/// A descriptor decoded in the context of its level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Translation fault: nothing mapped (includes encodings reserved at this level).
    Invalid,
    /// A pointer to the next-level table at this physical address.
    Table(PhysAddr),
    /// A block (levels 1-2) or page (level 3) mapping.
    Leaf {
        /// Output address of the block or page.
        phys: PhysAddr,
        /// Its attributes, or `None` when the bits are not ones this module writes
        /// (another MAIR slot, EL0 access, writable and executable, ...).
        attributes: Option<Attributes>,
    },
}

impl Descriptor {
    /// The all-zero, invalid descriptor.
    pub const INVALID: Self = Self(0);

    /// A descriptor from its raw bits.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw bits.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Whether the valid bit is set.
    pub const fn is_valid(self) -> bool {
        self.0 & 1 != 0
    }

    /// A table descriptor pointing at the next-level table `next` (4 KiB aligned, below
    /// 2^48; the walker checks both before calling). No hierarchical restrictions.
    pub fn new_table(next: PhysAddr) -> Self {
        debug_assert!(next.is_page_aligned() && next.as_u64() < PA_LIMIT);
        Self((STAGE1::VALID::SET + STAGE1::TYPE::TableOrPage + STAGE1::OUTPUT_ADDR.val(next.as_u64() >> 12)).value)
    }

    /// A leaf descriptor at `level` (1 or 2: block, 3: page) mapping `phys`, which must be
    /// aligned to the level's span and below 2^48 (the walker checks both before calling).
    ///
    /// Every leaf is EL1-only (`AP[1] = 0`, `UXN = 1`), global, inner shareable and has the
    /// access flag set; `PXN` is clear only for executable attributes.
    #[inline]
    pub fn new_leaf(level: usize, phys: PhysAddr, attributes: Attributes) -> Self {
        debug_assert!((1..=3).contains(&level));
        debug_assert!(phys.as_u64() < PA_LIMIT);
        let kind = if level == 3 { STAGE1::TYPE::TableOrPage } else { STAGE1::TYPE::Block };
        let bits = STAGE1::VALID::SET
            + kind
            + STAGE1::ATTR_INDX.val(attributes.memory_type().mair_index())
            + STAGE1::SH::InnerShareable
            + STAGE1::AF::SET
            + STAGE1::UXN::SET
            + STAGE1::OUTPUT_ADDR.val(phys.as_u64() >> 12);
        Self(bits.value).with_permissions(attributes.permissions())
    }

    /// This descriptor with its output address (bits 47:12) replaced by `phys`, which must be
    /// aligned for the descriptor's level and below 2^48: stamping pages out of one template.
    pub fn with_output_address(self, phys: PhysAddr) -> Self {
        debug_assert!(phys.is_page_aligned() && phys.as_u64() < PA_LIMIT);
        Self((self.0 & !OUTPUT_ADDR_MASK) | phys.as_u64())
    }

    /// The output address of a leaf (block or page) at `level`, `None` for anything else:
    /// the part of [`Descriptor::decode`] that unmapping needs.
    pub fn leaf_address(self, level: usize) -> Option<PhysAddr> {
        let raw = Raw::new(self.0);
        if !raw.is_set(STAGE1::VALID) {
            return None;
        }
        let table_or_page = raw.matches_all(STAGE1::TYPE::TableOrPage);
        match (level, table_or_page) {
            // Below the level's span the address bits are RES0: the MMU ignores them.
            (1 | 2, false) | (3, true) => Some(PhysAddr::new(self.0 & OUTPUT_ADDR_MASK & !(level_size(level) - 1))),
            _ => None,
        }
    }

    /// This leaf with its access permission and execute-never bits replaced; every other
    /// bit (output address, memory type, shareability) is kept.
    pub fn with_permissions(self, permissions: Permissions) -> Self {
        let mut raw = Raw::new(self.0);
        raw.modify(match permissions {
            Permissions::ReadOnly => STAGE1::AP::RO_EL1 + STAGE1::PXN::SET,
            Permissions::ReadWrite => STAGE1::AP::RW_EL1 + STAGE1::PXN::SET,
            Permissions::ReadExecute => STAGE1::AP::RO_EL1 + STAGE1::PXN::CLEAR,
        });
        Self(raw.get())
    }

    /// The output address bits (47:12), whatever the descriptor's kind.
    pub const fn output_address(self) -> PhysAddr {
        PhysAddr::new(self.0 & OUTPUT_ADDR_MASK)
    }

    /// The next-level table a table descriptor at `level` points at, `None` for anything
    /// else: with [`Descriptor::leaf_address`], decoding without the cost of the attributes.
    pub fn table_address(self, level: usize) -> Option<PhysAddr> {
        let raw = Raw::new(self.0);
        (level <= 2 && raw.is_set(STAGE1::VALID) && raw.matches_all(STAGE1::TYPE::TableOrPage))
            .then(|| self.output_address())
    }

    /// Decode as a descriptor found at `level` (0-3).
    pub fn decode(self, level: usize) -> Entry {
        if let Some(phys) = self.leaf_address(level) {
            Entry::Leaf { phys, attributes: self.leaf_attributes() }
        } else if let Some(next) = self.table_address(level) {
            Entry::Table(next)
        } else {
            // Invalid; or a block at level 0 or a block encoding at level 3: reserved, faults.
            Entry::Invalid
        }
    }

    fn leaf_attributes(self) -> Option<Attributes> {
        let raw = Raw::new(self.0);
        let memory = MemoryType::from_mair_index(raw.read(STAGE1::ATTR_INDX))?;
        let executable = !raw.is_set(STAGE1::PXN);
        let permissions = match (raw.read_as_enum(STAGE1::AP)?, executable) {
            (STAGE1::AP::Value::RO_EL1, false) => Permissions::ReadOnly,
            (STAGE1::AP::Value::RW_EL1, false) => Permissions::ReadWrite,
            (STAGE1::AP::Value::RO_EL1, true) => Permissions::ReadExecute,
            _ => return None,
        };
        // Anything else we never set: EL0-executable, not accessed, non-global, not inner
        // shareable, the contiguous hint (a split would have to rewrite 15 neighbours too).
        if !raw.is_set(STAGE1::UXN)
            || raw.is_set(STAGE1::CONTIGUOUS)
            || !raw.is_set(STAGE1::AF)
            || raw.is_set(STAGE1::NG)
            || !raw.matches_all(STAGE1::SH::InnerShareable)
        {
            return None;
        }
        Attributes::new(memory, permissions).ok()
    }
}

impl fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Descriptor({:#018x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERMS: [Permissions; 3] = [Permissions::ReadOnly, Permissions::ReadWrite, Permissions::ReadExecute];

    #[test]
    fn kernel_data_page_matches_a_hand_encoding() {
        // V | page | AttrIndx 3 | SH inner | AF | PXN | UXN, OA 0x4000_0000.
        let d = Descriptor::new_leaf(3, PhysAddr::new(0x4000_0000), Attributes::DATA);
        assert_eq!(d.raw(), 0x0060_0000_4000_070f);
        // Text: read-only, PXN clear.
        let d = Descriptor::new_leaf(3, PhysAddr::new(0x4008_0000), Attributes::CODE);
        assert_eq!(d.raw(), 0x0040_0000_4008_078f);
        // A 2 MiB device block: type bit clear, AttrIndx 1.
        let d = Descriptor::new_leaf(2, PhysAddr::new(0x0800_0000), Attributes::DEVICE);
        assert_eq!(d.raw(), 0x0060_0000_0800_0705);
        let d = Descriptor::new_table(PhysAddr::new(0x4123_4000));
        assert_eq!(d.raw(), 0x4123_4003);
        // Stamping from a template equals encoding afresh.
        let template = Descriptor::new_leaf(3, PhysAddr::new(0), Attributes::CODE);
        let fresh = Descriptor::new_leaf(3, PhysAddr::new(0xfff_ffff_f000), Attributes::CODE);
        assert_eq!(template.with_output_address(PhysAddr::new(0xfff_ffff_f000)), fresh);
    }

    #[test]
    fn every_attribute_round_trips_at_every_leaf_level() {
        for level in 1..=3 {
            for m in MemoryType::ALL {
                for p in PERMS {
                    let Ok(a) = Attributes::new(m, p) else {
                        continue;
                    };
                    let pa = PhysAddr::new(0x0000_fff0_0000_0000);
                    let d = Descriptor::new_leaf(level, pa, a);
                    assert_eq!(d.decode(level), Entry::Leaf { phys: pa, attributes: Some(a) }, "{level} {a}");
                    for q in PERMS {
                        if let Ok(b) = a.with_permissions(q) {
                            let e = d.with_permissions(q).decode(level);
                            assert_eq!(e, Entry::Leaf { phys: pa, attributes: Some(b) });
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn reserved_and_foreign_encodings_decode_safely() {
        let block = Descriptor::new_leaf(2, PhysAddr::new(0x20_0000), Attributes::DATA);
        // A block encoding is reserved at level 0 and at level 3.
        assert_eq!(block.decode(0), Entry::Invalid);
        assert_eq!(block.decode(3), Entry::Invalid);
        // At levels 0-2 the page/table encoding is a table.
        let page = Descriptor::new_leaf(3, PhysAddr::new(0x1000), Attributes::DATA);
        assert_eq!(page.decode(1), Entry::Table(PhysAddr::new(0x1000)));
        assert_eq!(Descriptor::INVALID.decode(3), Entry::Invalid);
        assert_eq!(Descriptor::from_raw(0x4000_0702).decode(3), Entry::Invalid);
        // Writable and executable: mapped, but not attributes we could have written.
        let wx = Descriptor::from_raw(page.raw() & !(1 << 53));
        assert_eq!(wx.decode(3), Entry::Leaf { phys: PhysAddr::new(0x1000), attributes: None });
        // Address bits below a block's span are RES0 and do not take part in translation.
        let sloppy = Descriptor::from_raw(block.raw() | 0x1f_f000);
        assert!(matches!(sloppy.decode(2), Entry::Leaf { phys, .. } if phys == PhysAddr::new(0x20_0000)));
        // An unprogrammed MAIR slot.
        let slot7 = Descriptor::from_raw(page.raw() | (7 << 2));
        assert!(matches!(slot7.decode(3), Entry::Leaf { attributes: None, .. }));
        let contiguous = Descriptor::from_raw(block.raw() | (1 << 52));
        assert!(matches!(contiguous.decode(2), Entry::Leaf { attributes: None, .. }));
    }
}
