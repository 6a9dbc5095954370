//! Memory attributes: what a mapping *is* (memory type, permissions), never raw descriptor bits.
//!
//! Callers pick an intention — [`Attributes::CODE`], [`Attributes::RODATA`], [`Attributes::DATA`],
//! [`Attributes::DEVICE`] — or build one with [`Attributes::new`], which refuses the combinations
//! the kernel never wants: there is no way to express writable-and-executable (W^X), and device
//! memory is never executable.
//!
//! Every mapping is EL1-only (this is a unikernel: nothing runs at EL0), global, inner
//! shareable, with the access flag set. [`MemoryType`] selects one of four `MAIR_EL1` slots,
//! whose encodings are [`mair_el1`].

use core::fmt;

use aarch64_cpu::registers::MAIR_EL1;

use super::MmuError;

/// The memory type of a mapping: which `MAIR_EL1` attribute slot its descriptors select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryType {
    /// Device-nGnRnE: no gathering, no reordering, no early write acknowledgement
    /// (the strictest; for registers whose write must complete at the device).
    DeviceNGnRnE,
    /// Device-nGnRE: as above but with early write acknowledgement; the usual choice
    /// for MMIO (`ioremap`).
    DeviceNGnRE,
    /// Normal memory, inner and outer non-cacheable (frame buffers, DMA buffers without
    /// coherency).
    NormalNonCacheable,
    /// Normal memory, inner and outer write-back, read- and write-allocate: RAM.
    NormalCacheable,
}

impl MemoryType {
    /// Every memory type, in `MAIR_EL1` slot order.
    pub const ALL: [MemoryType; 4] = [
        MemoryType::DeviceNGnRnE,
        MemoryType::DeviceNGnRE,
        MemoryType::NormalNonCacheable,
        MemoryType::NormalCacheable,
    ];

    /// The `MAIR_EL1` slot (`AttrIndx` in a descriptor) this type uses.
    pub const fn mair_index(self) -> u64 {
        match self {
            MemoryType::DeviceNGnRnE => 0,
            MemoryType::DeviceNGnRE => 1,
            MemoryType::NormalNonCacheable => 2,
            MemoryType::NormalCacheable => 3,
        }
    }

    /// The memory type using `MAIR_EL1` slot `index`, or `None` for a slot we do not program.
    pub const fn from_mair_index(index: u64) -> Option<Self> {
        match index {
            0 => Some(MemoryType::DeviceNGnRnE),
            1 => Some(MemoryType::DeviceNGnRE),
            2 => Some(MemoryType::NormalNonCacheable),
            3 => Some(MemoryType::NormalCacheable),
            _ => None,
        }
    }

    /// Whether this is one of the Device types.
    pub const fn is_device(self) -> bool {
        matches!(self, MemoryType::DeviceNGnRnE | MemoryType::DeviceNGnRE)
    }
}

/// The value to program into `MAIR_EL1` so that [`MemoryType::mair_index`] means what it says.
///
/// Slot 0 Device-nGnRnE (`0x00`), slot 1 Device-nGnRE (`0x04`), slot 2 Normal non-cacheable
/// (`0x44`), slot 3 Normal write-back read/write-allocate (`0xff`); the other slots are zero
/// and never selected.
pub fn mair_el1() -> u64 {
    (MAIR_EL1::Attr0_Device::nonGathering_nonReordering_noEarlyWriteAck
        + MAIR_EL1::Attr1_Device::nonGathering_nonReordering_EarlyWriteAck
        + MAIR_EL1::Attr2_Normal_Outer::NonCacheable
        + MAIR_EL1::Attr2_Normal_Inner::NonCacheable
        + MAIR_EL1::Attr3_Normal_Outer::WriteBack_NonTransient_ReadWriteAlloc
        + MAIR_EL1::Attr3_Normal_Inner::WriteBack_NonTransient_ReadWriteAlloc)
        .value
}

/// What EL1 may do with a mapping. Writable-and-executable cannot be expressed (W^X).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permissions {
    /// Read only, never executable.
    ReadOnly,
    /// Read and write, never executable.
    ReadWrite,
    /// Read and execute, never writable.
    ReadExecute,
}

impl Permissions {
    /// Whether stores are allowed.
    pub const fn writable(self) -> bool {
        matches!(self, Permissions::ReadWrite)
    }

    /// Whether instruction fetches are allowed.
    pub const fn executable(self) -> bool {
        matches!(self, Permissions::ReadExecute)
    }
}

/// The attributes of a mapping: memory type and permissions, checked for coherence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attributes {
    memory: MemoryType,
    permissions: Permissions,
}

impl Attributes {
    /// Kernel text: cacheable RAM, read + execute.
    pub const CODE: Self = Self { memory: MemoryType::NormalCacheable, permissions: Permissions::ReadExecute };
    /// Read-only data: cacheable RAM, read only, never executable.
    pub const RODATA: Self = Self { memory: MemoryType::NormalCacheable, permissions: Permissions::ReadOnly };
    /// Data, bss, heap, stacks, vmalloc: cacheable RAM, read + write, never executable.
    pub const DATA: Self = Self { memory: MemoryType::NormalCacheable, permissions: Permissions::ReadWrite };
    /// MMIO registers: Device-nGnRE, read + write, never executable.
    pub const DEVICE: Self = Self { memory: MemoryType::DeviceNGnRE, permissions: Permissions::ReadWrite };

    /// Attributes of the given memory type and permissions.
    ///
    /// # Errors
    /// [`MmuError::ExecutableDevice`] for a Device type with [`Permissions::ReadExecute`]:
    /// instruction fetches from device memory may be speculative and touch registers.
    pub const fn new(memory: MemoryType, permissions: Permissions) -> Result<Self, MmuError> {
        if memory.is_device() && permissions.executable() {
            return Err(MmuError::ExecutableDevice);
        }
        Ok(Self { memory, permissions })
    }

    /// The memory type.
    pub const fn memory_type(self) -> MemoryType {
        self.memory
    }

    /// The permissions.
    pub const fn permissions(self) -> Permissions {
        self.permissions
    }

    /// The same memory type with other permissions.
    ///
    /// # Errors
    /// As [`Attributes::new`].
    pub const fn with_permissions(self, permissions: Permissions) -> Result<Self, MmuError> {
        Self::new(self.memory, permissions)
    }
}

impl fmt::Display for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mem = match self.memory {
            MemoryType::DeviceNGnRnE => "dev-nGnRnE",
            MemoryType::DeviceNGnRE => "dev-nGnRE",
            MemoryType::NormalNonCacheable => "normal-nc",
            MemoryType::NormalCacheable => "normal",
        };
        let perm = match self.permissions {
            Permissions::ReadOnly => "r--",
            Permissions::ReadWrite => "rw-",
            Permissions::ReadExecute => "r-x",
        };
        write!(f, "{perm} {mem}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mair_slots_match_the_arm_arm_encodings() {
        assert_eq!(mair_el1(), 0x0000_0000_ff44_0400);
        for m in MemoryType::ALL {
            assert_eq!(MemoryType::from_mair_index(m.mair_index()), Some(m));
            let slot = (mair_el1() >> (8 * m.mair_index())) & 0xff;
            // Device encodings have a zero high nibble; normal ones never do.
            assert_eq!(slot >> 4 == 0, m.is_device(), "{m:?}");
        }
        assert_eq!(MemoryType::from_mair_index(4), None);
    }

    #[test]
    fn device_memory_is_never_executable() {
        for m in MemoryType::ALL {
            let r = Attributes::new(m, Permissions::ReadExecute);
            assert_eq!(r.is_err(), m.is_device(), "{m:?}");
        }
        assert_eq!(Attributes::DEVICE.with_permissions(Permissions::ReadExecute), Err(MmuError::ExecutableDevice));
        assert_eq!(Attributes::DATA.with_permissions(Permissions::ReadOnly), Ok(Attributes::RODATA));
    }
}
