//! What vmalloc needs from the rest of the system: frames, page tables, TLB, a clock.
//!
//! The integrator implements [`VmBackend`] with the buddy allocator and `hal`'s translation
//! tables; host tests use [`super::sim::SimBackend`], a simulated MMU that records every TLB
//! operation. The trait is generic (not `dyn`) so that every call inlines into the
//! allocator's fast path.

use core::fmt;

use hal::{PhysAddr, VirtAddr, VirtRange};

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

impl core::error::Error for MapError {}

/// The TLB invalidation of [`VmBackend::flush_and_free_tables`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbFlush<'a> {
    /// Nothing to invalidate but the walk caches of the tables freed.
    None,
    /// Every page of these ranges (`(start, pages)`), last level (as
    /// [`VmBackend::tlb_flush_pages`]).
    Pages(&'a [(VirtAddr, usize)]),
    /// Everything (as [`VmBackend::tlb_flush_all`]).
    All,
}

/// log2 of the pages in one huge-mapping block ([`VmBackend::alloc_block`]): 2 MiB, the
/// level-2 block of the 4 KiB granule (Linux's `PMD_SHIFT - PAGE_SHIFT`).
pub const BLOCK_ORDER: usize = 9;
/// Pages in one huge-mapping block.
pub const BLOCK_PAGES: usize = 1 << BLOCK_ORDER;
/// Bytes in one huge-mapping block (2 MiB).
pub const BLOCK_SIZE: usize = BLOCK_PAGES * hal::PAGE_SIZE;

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

    /// Whether caller-owned `frames` may be mapped as normal memory by `vmap` (checked by
    /// the allocator itself before every `vmap`, so no path skips it): RAM that is not
    /// the kernel image, not reserved and not the device tree. A device's registers mapped
    /// as normal memory allow speculative reads; a writable alias of the image would undo
    /// W^X. The default (a backend whose "frames" are not real memory, such as the
    /// simulated MMU's) accepts every frame; a backend that maps live memory must refuse
    /// what is not RAM.
    ///
    /// # Errors
    /// [`super::VmallocError::NotRam`] for the first frame that may not be mapped.
    fn check_vmap_frames(&self, frames: &[PhysAddr]) -> Result<(), super::VmallocError> {
        let _ = frames;
        Ok(())
    }

    /// Map the physically contiguous `pages` from `pa` at `va` with a device memory type.
    ///
    /// # Errors
    /// A [`MapError`]; then none of the pages of this call stay mapped.
    fn map_device(&mut self, va: VirtAddr, pa: PhysAddr, pages: usize, attr: DeviceAttr) -> Result<(), MapError>;

    /// One physically contiguous block of [`BLOCK_PAGES`] frames, aligned to its size, for a
    /// huge mapping ([`super::VmFlags::HUGE`]); `None` when there is none. The default has
    /// none, and vmalloc then maps huge areas with pages. A backend that hands out blocks
    /// implements all of `alloc_block`, `free_block`, `zero_block`, `map_block` and
    /// `unmap_block`.
    fn alloc_block(&mut self) -> Option<PhysAddr> {
        None
    }

    /// Give back a block from [`Self::alloc_block`].
    fn free_block(&mut self, pa: PhysAddr) {
        let _ = pa;
    }

    /// Zero a block from [`Self::alloc_block`] before it is mapped.
    fn zero_block(&mut self, pa: PhysAddr) {
        let mut frames = [PhysAddr::new(0); 64];
        for chunk in 0..BLOCK_PAGES / frames.len() {
            for (i, f) in frames.iter_mut().enumerate() {
                *f = PhysAddr::new(pa.as_u64() + ((chunk * 64 + i) * hal::PAGE_SIZE) as u64);
            }
            self.zero_frames(&frames);
        }
    }

    /// Map the block at `pa` (from [`Self::alloc_block`]) as **one** block entry at `va`
    /// (aligned to [`BLOCK_SIZE`]; unmapped and flushed, as for [`Self::map_pages`]) as
    /// read-write normal memory, execute never. An empty page table that earlier page
    /// mappings left at that entry is released first, after a TLB invalidation that covers
    /// walk caches (Linux's `pmd_free_pte_page`). The default maps nothing.
    ///
    /// # Errors
    /// A [`MapError`]; then nothing of this call stays mapped, and the caller may map the
    /// range with pages instead. A range in which any page or block is still mapped is
    /// refused with [`MapError::AlreadyMapped`] and left as it is (never torn down: its
    /// frames belong to someone).
    fn map_block(&mut self, va: VirtAddr, pa: PhysAddr) -> Result<(), MapError> {
        let _ = (va, pa);
        Err(MapError::OutOfRange)
    }

    /// If one block entry maps `va` (aligned to [`BLOCK_SIZE`]), clear it with **no** TLB
    /// maintenance and return the block's physical address; otherwise change nothing and
    /// return `None`.
    fn unmap_block(&mut self, va: VirtAddr) -> Option<PhysAddr> {
        let _ = va;
        None
    }

    /// Clear the PTEs of `pages` pages from `va` with **no** TLB maintenance, calling
    /// `on_frame` with the frame each mapped page pointed at.
    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, on_frame: F);

    /// Invalidate the TLB entries of every page of `ranges` (`(start, pages)`): one TLBI per
    /// page, then one barrier pair (DSB ISH; ISB) for the whole batch.
    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]);

    /// Invalidate every kernel TLB entry (TLBI VMALLE1IS), with one barrier pair.
    fn tlb_flush_all(&mut self);

    /// Give back every page-table page, at every level, that maps nothing, whose span meets
    /// one of `spans` and lies wholly inside `window` (the instance's); returns how many.
    ///
    /// vmalloc calls this once the TLB entries of `spans` have been invalidated (a purge,
    /// a failed allocation, strict mode, a shrink). The backend decides emptiness under its
    /// table lock and, for each table, clears the descriptor that points at it, invalidates
    /// the walk caches for its span (`tlbi vaae1is`, not the last-level `vaale1is`: a walk
    /// cache may hold the cleared descriptor), waits for completion (`dsb ish`), and only
    /// then frees the page — all under that lock. The default frees nothing.
    fn free_empty_tables(&mut self, spans: &[VirtRange], window: VirtRange) -> usize {
        let _ = (spans, window);
        0
    }

    /// Invalidate `flush` and give back the empty tables of `spans` (as
    /// [`Self::free_empty_tables`]) in one batch: descriptors cleared, then the leaves' and
    /// the tables' invalidations between one pair of barriers (a full flush covers the
    /// tables' walk caches by itself), then the frees. vmalloc's purge calls this. The
    /// default flushes ([`Self::tlb_flush_pages`] / [`Self::tlb_flush_all`]), then calls
    /// [`Self::free_empty_tables`].
    fn flush_and_free_tables(&mut self, flush: TlbFlush<'_>, spans: &[VirtRange], window: VirtRange) -> usize {
        match flush {
            TlbFlush::None => {}
            TlbFlush::Pages(ranges) => self.tlb_flush_pages(ranges),
            TlbFlush::All => self.tlb_flush_all(),
        }
        self.free_empty_tables(spans, window)
    }

    /// Page-table pages the backend's tables hold now (the kernel's: the whole upper half,
    /// root included; the simulation's: those of its window). The default counts none.
    fn table_pages(&self) -> usize {
        0
    }

    /// The physical address `va` translates to through the tables, if mapped.
    fn translate(&self, va: VirtAddr) -> Option<PhysAddr>;

    /// Whether any page of `[pa, pa + pages * PAGE_SIZE)` is RAM (ioremap refuses RAM).
    fn phys_is_ram(&self, pa: PhysAddr, pages: usize) -> bool;

    /// Copy `bytes` from `src` to `dst`, both mapped ranges of live areas (vrealloc).
    fn copy_mapped(&mut self, dst: VirtAddr, src: VirtAddr, bytes: usize);

    /// Zero `bytes` at `va`, a mapped range of a live area (vrealloc of a zeroed area).
    fn zero_mapped(&mut self, va: VirtAddr, bytes: usize);

    /// Quarantine ([`super::VmallocConfig::quarantine`]): fill `frames` (taken from
    /// [`Self::alloc_frames`], unmapped, not yet freed) with `byte`. The default does
    /// nothing (then the purge finds nothing to report).
    fn poison_frames(&mut self, frames: &[PhysAddr], byte: u8) {
        let _ = (frames, byte);
    }

    /// Quarantine: the offset and value of the first byte of the frame at `pa` that is not
    /// `byte`, or `None` when every byte is (the default: nothing to report).
    fn find_unpoisoned(&self, pa: PhysAddr, byte: u8) -> Option<(usize, u8)> {
        let _ = (pa, byte);
        None
    }

    /// Quarantine's index: write `words` into the frame at `pa` (from [`Self::alloc_frames`],
    /// held by vmalloc) from 64-bit word `at` on (`at + words.len() <= 512`). Returns `false`
    /// when the backend cannot (the default): the frames are then freed at `vfree` as usual.
    fn write_words(&mut self, pa: PhysAddr, at: usize, words: &[u64]) -> bool {
        let _ = (pa, at, words);
        false
    }

    /// Quarantine's index: read `out.len()` words from the frame at `pa` from word `at`
    /// (written by [`Self::write_words`]).
    fn read_words(&self, pa: PhysAddr, at: usize, out: &mut [u64]) {
        let _ = (pa, at);
        out.fill(0);
    }

    /// A monotonic clock in nanoseconds, for purge timings (0 if there is none).
    fn now_ns(&self) -> u64 {
        0
    }
}
