//! What vmalloc needs from the rest of the system: frames, page tables, TLB, a clock.
//!
//! The integrator implements [`VmBackend`] with the buddy allocator and `hal`'s translation
//! tables; host tests use [`super::sim::SimBackend`], a simulated MMU that records every TLB
//! operation. The trait is generic (not `dyn`) so that every call inlines into the
//! allocator's fast path.

use core::fmt;

use hal::{PhysAddr, VirtAddr};

/// Access rights for RAM mapped by [`super::Vmalloc::vmap`] (vmalloc areas are always
/// [`Prot::ReadWrite`]). Normal cacheable memory, never executable (W^X).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    /// Read and write, execute never.
    ReadWrite,
    /// Read only, execute never.
    ReadOnly,
}

/// Memory type for [`super::Vmalloc::ioremap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAttr {
    /// Device-nGnRnE: strongly ordered, no early write acknowledgement.
    DeviceNGnRnE,
    /// Device-nGnRE: the usual choice for MMIO registers.
    DeviceNGnRE,
    /// Normal non-cacheable (write-combining: framebuffers).
    NormalNonCacheable,
}

/// Why the backend could not map a range. On such an error nothing of the call stays mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No memory for a page-table page.
    NoMemory,
    /// A page of the range was already mapped (a break-before-make violation).
    AlreadyMapped,
    /// The address is outside what the backend's tables cover.
    OutOfRange,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapError::NoMemory => "no memory for a page table",
            MapError::AlreadyMapped => "page already mapped",
            MapError::OutOfRange => "address outside the translated range",
        })
    }
}

/// Frames, page tables, TLB and clock for one vmalloc window.
///
/// Contract the allocator relies on, and keeps on its side:
/// - it maps only pages of its window that are unmapped, and whose TLB entries have been
///   invalidated since they were last unmapped (never remaps a page before its flush);
/// - it unmaps only pages it mapped, and passes `tlb_flush_*` every page it unmapped before
///   reusing its address;
/// - `copy_mapped` / `zero_mapped` are called only on bytes of live areas it mapped.
pub trait VmBackend {
    /// Fill `out` with order-0 frames (page aligned); returns how many were obtained, from
    /// the front of `out`. Fewer than `out.len()` means the frames ran out.
    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize;

    /// Give back frames obtained from [`Self::alloc_frames`].
    fn free_frames(&mut self, frames: &[PhysAddr]);

    /// Zero frames before they are mapped (through the linear map on target).
    fn zero_frames(&mut self, frames: &[PhysAddr]);

    /// Map `frames` at consecutive pages from `va` as normal memory with `prot`.
    ///
    /// # Errors
    /// A [`MapError`]; then none of the pages of this call stay mapped.
    fn map_pages(&mut self, va: VirtAddr, frames: &[PhysAddr], prot: Prot) -> Result<(), MapError>;

    /// Map the physically contiguous `pages` from `pa` at `va` with a device memory type.
    ///
    /// # Errors
    /// A [`MapError`]; then none of the pages of this call stay mapped.
    fn map_device(&mut self, va: VirtAddr, pa: PhysAddr, pages: usize, attr: DeviceAttr) -> Result<(), MapError>;

    /// Clear the PTEs of `pages` pages from `va` with **no** TLB maintenance, calling
    /// `on_frame` with the frame each mapped page pointed at.
    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, on_frame: F);

    /// Invalidate the TLB entries of every page of `ranges` (`(start, pages)`): one TLBI per
    /// page, then one barrier pair (DSB ISH; ISB) for the whole batch.
    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]);

    /// Invalidate every kernel TLB entry (TLBI VMALLE1IS), with one barrier pair.
    fn tlb_flush_all(&mut self);

    /// The physical address `va` translates to through the tables, if mapped.
    fn translate(&self, va: VirtAddr) -> Option<PhysAddr>;

    /// Whether any page of `[pa, pa + pages * PAGE_SIZE)` is RAM (ioremap refuses RAM).
    fn phys_is_ram(&self, pa: PhysAddr, pages: usize) -> bool;

    /// Copy `bytes` from `src` to `dst`, both mapped ranges of live areas (vrealloc).
    fn copy_mapped(&mut self, dst: VirtAddr, src: VirtAddr, bytes: usize);

    /// Zero `bytes` at `va`, a mapped range of a live area (vrealloc of a zeroed area).
    fn zero_mapped(&mut self, va: VirtAddr, bytes: usize);

    /// A monotonic clock in nanoseconds, for purge timings (0 if there is none).
    fn now_ns(&self) -> u64 {
        0
    }
}
