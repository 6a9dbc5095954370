//! Translation tables: descriptors, memory attributes, the 4-level walker, TLB maintenance,
//! turning the MMU on.
//!
//! Stage 1, EL1&0, 4 KiB granule, 48-bit virtual addresses in each half, 48-bit physical.
//!
//! ## Code organisation
//! - [`attr`]: what a mapping is ([`Attributes::CODE`], [`Attributes::DATA`],
//!   [`Attributes::DEVICE`], ...), the `MAIR_EL1` slots behind [`MemoryType`]. W^X by
//!   construction: no value means writable-and-executable.
//! - [`descriptor`]: the 64-bit entry format (tock-registers bitfields), encode and decode only.
//! - [`table`]: [`PageTable`], the walker. Map, unmap, protect and translate over table pages
//!   from a [`TableAlloc`], reached through the [`LinearMap`](crate::linear::LinearMap); every
//!   mutation is all-or-nothing. A block that `unmap`/`protect` cut through is split by
//!   break-before-make; `unmap_and_reclaim` frees emptied tables after a walk-cache
//!   invalidation; `map_frames`/`unmap_with` are vmalloc's TLB-free fast paths.
//! - [`tlb`]: the [`Tlb`] interface (one instruction at a time, batches with their barriers
//!   built on it), the hardware version, a recording one that logs every operation in
//!   order, [`TlbBatch`] and [`flush`], which batch.
//! - [`arch`]: the instructions (barriers, `tlbi`, `msr`), conditional on the target so the
//!   rest runs in host tests; [`arch::enable`] turns the MMU on.
//!
//! ## Who does what
//! ```text
//!   memory::vmalloc ──map_frames/unmap_with──▶ PageTable ──alloc_table──▶ TableAlloc (buddy)
//!          │                                   │ descriptors via LinearMap
//!          └──────────── flush ──────────────▶ Tlb (HardwareTlb | RecordingTlb)
//!   kernel code ──unmap/protect/unmap_and_reclaim(.., tlb, alloc)──▶ PageTable ──▶ Tlb
//!                 (splits blocks by break-before-make, invalidates before returning)
//!   firmware boot ──map(.., AllowBlocks)──▶ PageTable ──▶ arch::enable(lower, upper)
//! ```
//!
//! ## Example
//! ```no_run
//! use hal::mmu::{Attributes, BlockPolicy, PageTable, TableAlloc, VaRange};
//! use hal::{linear::LinearMap, PhysAddr, PhysRange, VirtAddr, VirtRange};
//!
//! fn map_uart(linear: LinearMap, alloc: &mut impl TableAlloc) -> Result<PageTable, hal::mmu::MmuError> {
//!     let mut table = PageTable::new(linear, VaRange::Lower, alloc)?;
//!     let regs = VirtRange::new(VirtAddr::new(0x0900_0000), 0x1000)?;
//!     table.map(regs, PhysAddr::new(0x0900_0000), Attributes::DEVICE, BlockPolicy::PagesOnly, alloc)?;
//!     Ok(table)
//! }
//! ```

use core::fmt;

use crate::addr::{AddrError, PhysAddr, VirtAddr};

pub mod arch;
pub mod attr;
pub mod descriptor;
pub mod table;
pub mod tlb;

#[cfg(test)]
mod tests;

pub use attr::{mair_el1, Attributes, MemoryType, Permissions};
pub use table::{BlockPolicy, LeafFlush, LeafTable, PageTable, TableAlloc, Translation, VaRange};
pub use tlb::{
    flush, EntryWrite, FlushKind, HardwareTlb, Levels, RecordingTlb, Tlb, TlbBatch, TlbCounts, TlbEvent, TlbLog, TlbOp,
};

/// Why a translation-table operation was refused. Every refusal leaves the tables as they
/// were and holds on to no memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuError {
    /// An address or size was not page aligned, a range empty, or arithmetic overflowed.
    Addr(AddrError),
    /// The virtual range is not (wholly) inside the tree's half of the address space.
    OutsideVaRange(VirtAddr),
    /// The physical range reaches beyond 2^48, more than a descriptor holds.
    PhysTooHigh(PhysAddr),
    /// A page of the range is mapped already (changing a live mapping in place would
    /// violate break-before-make; unmap and invalidate first).
    AlreadyMapped(VirtAddr),
    /// `protect` met an unmapped page.
    NotMapped(VirtAddr),
    /// The range cuts through a block mapping, which would have to be split: only from
    /// [`PageTable::unmap_with`], the TLB-free path (the other edits split blocks).
    WouldSplitBlock(VirtAddr),
    /// Splitting the block at this address would unmap, for the break-before-make window,
    /// the table page the walker writes to end that window (it lies inside the block in the
    /// linear map, and this tree translates the linear map): the walker would fault on its
    /// own write. Split through another mapping, or map that region with pages first.
    SplitWouldUnmapTable(VirtAddr),
    /// A mapped leaf carries bits this module never writes, so it will not rewrite it.
    ForeignDescriptor(VirtAddr),
    /// Device memory cannot be made executable.
    ExecutableDevice,
    /// The table allocator had no page left.
    OutOfMemory,
    /// The table allocator returned a page that is misaligned or outside the linear map.
    BadTablePage(PhysAddr),
    /// A tree was offered to the wrong translation base register.
    WrongVaRange,
    /// The CPU does not implement the 4 KiB translation granule.
    GranuleUnsupported,
}

impl From<AddrError> for MmuError {
    fn from(e: AddrError) -> Self {
        MmuError::Addr(e)
    }
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Addr(e) => write!(f, "{e}"),
            MmuError::OutsideVaRange(va) => {
                write!(f, "virtual range at {va} leaves the table's half of the address space")
            }
            MmuError::PhysTooHigh(pa) => write!(f, "physical range at {pa} passes 48 bits"),
            MmuError::AlreadyMapped(va) => write!(f, "{va} is already mapped"),
            MmuError::NotMapped(va) => write!(f, "{va} is not mapped"),
            MmuError::WouldSplitBlock(va) => write!(f, "range cuts through the block at {va}"),
            MmuError::SplitWouldUnmapTable(va) => {
                write!(f, "splitting the block at {va} would unmap the table that holds its entry")
            }
            MmuError::ForeignDescriptor(va) => {
                write!(f, "descriptor for {va} has bits this walker does not write")
            }
            MmuError::ExecutableDevice => f.write_str("device memory cannot be executable"),
            MmuError::OutOfMemory => f.write_str("no page left for a translation table"),
            MmuError::BadTablePage(pa) => {
                write!(f, "table page {pa} is misaligned or outside the linear map")
            }
            MmuError::WrongVaRange => f.write_str("table tree is for the other half of the address space"),
            MmuError::GranuleUnsupported => f.write_str("CPU lacks the 4 KiB translation granule"),
        }
    }
}

impl core::error::Error for MmuError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            MmuError::Addr(e) => Some(e),
            _ => None,
        }
    }
}
