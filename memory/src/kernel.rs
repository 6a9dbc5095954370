//! The kernel's memory system: the global buddy, slab and vmalloc instances, wired to
//! `hal`'s translation tables, TLB and device tree. This is the API drivers call.
//!
//! ```no_run
//! // after memory::kernel::init(info) at boot:
//! let buf = memory::kernel::vzalloc(64 * 1024)?;            // 16 pages + a guard page
//! // SAFETY: 64 KiB were just mapped at `buf`, zeroed, and belong to us.
//! unsafe { buf.as_mut_ptr::<u8>().write(1) };
//! memory::kernel::vfree(buf)?;                             // unmapped now, TLB flush batched
//! # Ok::<(), memory::vmalloc::VmallocError>(())
//! ```
//!
//! ## Locks and exception context
//! Lock order: vmalloc → kernel page tables → buddy. The buddy never calls up, and the slab
//! never calls vmalloc, so no cycle exists. From exception context call only
//! [`explain_fault`] (a try-lock); every other function here may spin on a lock the
//! interrupted code holds.

use core::fmt;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use hal::boot::BootInfo;
use hal::dtb::RangeList;
use hal::kmap::{VMALLOC_END, VMALLOC_START};
use hal::linear::LinearMap;
use hal::mmu::{Attributes, BlockPolicy, HardwareTlb, LeafFlush, LeafTable, MemoryType, Permissions, Tlb};
use hal::{PhysAddr, PhysRange, VirtAddr, VirtRange, PAGE_SIZE};
use spin::Once;

use crate::buddy::{self, BuddyError, GlobalTableAlloc};
use crate::gfp::{Gfp, __GFP_HIGH, __GFP_ZERO, GFP_KERNEL, ZONE_NORMAL};
use crate::slab::{self, SlabError};
use crate::vmalloc::{
    AreaInfo, DeviceAttr, FaultClass, LockedVmalloc, MapError, Prot, TlbFlush, VmBackend, VmFlags, Vmalloc,
    VmallocConfig, VmallocError, VmallocStats, BLOCK_ORDER, BLOCK_PAGES, BLOCK_SIZE,
};

/// [`VmBackend`] of the kernel: frames from the global buddy allocator, pages mapped in the
/// TTBR1 tree of [`hal::kmap`], TLB maintenance by the CPU.
pub struct KernelBackend {
    linear: LinearMap,
    ram: RangeList,
    /// The gfp flags frames are taken with ([`GFP_KERNEL`]; [`__vmalloc`] sets others for
    /// one call, under the vmalloc lock).
    gfp: AtomicU32,
    /// The last two last-level tables page maps and unmaps used, the newest first: a map
    /// or unmap inside their 2 MiB is PTE stores through them, without the kernel-table
    /// lock or a walk; another finds (or makes) its tables under the lock, then writes
    /// outside it (see [`Self::leaves_for`]). Dropped before any call that may free a
    /// table of this instance's window; no other instance frees or edits a table of it.
    hot: [Option<LeafTable>; 2],
}

fn map_err(e: hal::mmu::MmuError) -> MapError {
    match e {
        hal::mmu::MmuError::OutOfMemory => MapError::NoMemory,
        hal::mmu::MmuError::AlreadyMapped(_) => MapError::AlreadyMapped,
        _ => MapError::OutOfRange,
    }
}

impl KernelBackend {
    /// A backend over the kernel's tables, for a private [`Vmalloc`] instance in the scratch
    /// window (`hal::kmap::SCRATCH_START..SCRATCH_END`), as tests and benches use.
    ///
    /// # Errors
    /// [`InitError::NoKernelSpace`] before boot turned the MMU on.
    ///
    /// # Safety
    /// The instance built on it owns its window alone: the window lies in the scratch range,
    /// overlaps no other live instance's, and the instance purges before it is dropped (or
    /// the window is never used again), so no stale TLB entry of one owner is reused by
    /// another.
    pub unsafe fn new(info: &BootInfo) -> Result<Self, InitError> {
        let linear = hal::kmap::linear_map().ok_or(InitError::NoKernelSpace)?;
        Ok(Self { linear, ram: info.platform.ram, gfp: AtomicU32::new(GFP_KERNEL.bits()), hot: [None; 2] })
    }

    fn frame_ptr(&self, pa: PhysAddr) -> *mut u8 {
        self.linear.ptr(pa)
    }

    /// The hot table whose 2 MiB holds `va`.
    fn hot_for(&self, va: u64) -> Option<LeafTable> {
        self.hot.iter().flatten().find(|l| va.wrapping_sub(l.base().as_u64()) < LEAF_SPAN).copied()
    }

    /// The hot table that holds all `pages` pages from `va`, and `va`'s entry in it.
    #[inline]
    fn hot_holding(&self, va: VirtAddr, pages: usize) -> Option<(LeafTable, usize)> {
        let at = ((va.as_u64() % LEAF_SPAN) / PAGE_SIZE as u64) as usize;
        if pages == 0 || at + pages > hal::mmu::table::ENTRIES {
            return None;
        }
        self.hot_for(va.as_u64()).map(|l| (l, at))
    }

    /// Makes `leaf` the newest hot table.
    fn remember(&mut self, leaf: LeafTable) {
        if self.hot[0].map(|h| h.base()) != Some(leaf.base()) {
            self.hot = [Some(leaf), self.hot[0]];
        }
    }

    /// Drops the hot tables (before anything that may free a table).
    fn forget_hot(&mut self) {
        self.hot = [None; 2];
    }

    /// The last-level tables of `pages` pages from `va`, as two pieces `(table, first
    /// entry, pages)` (the second empty when one table holds them all): from the hot
    /// ones, else looked up (with `make`, made) under the kernel-table lock, which is
    /// released before the caller writes. `None` when the range spans more than two
    /// tables, or (without `make`) a table is missing or a block maps there.
    ///
    /// # Errors
    /// A [`MapError`] when a table cannot be made: no PTE was written (a table made for
    /// the first piece may stay, empty, until a purge gives it back).
    fn leaves_for(&mut self, va: VirtAddr, pages: usize, make: bool) -> Result<Option<[LeafPart; 2]>, MapError> {
        let ents = hal::mmu::table::ENTRIES;
        let at = ((va.as_u64() % LEAF_SPAN) / PAGE_SIZE as u64) as usize;
        let first = pages.min(ents - at);
        let rest = pages - first;
        if rest > ents || pages == 0 {
            return Ok(None);
        }
        let second = va.as_u64() + (first * PAGE_SIZE) as u64;
        let mut a = self.hot_for(va.as_u64());
        let mut b = if rest > 0 { self.hot_for(second) } else { a };
        if a.is_none() || b.is_none() {
            let space = hal::kmap::kernel_space().ok_or(MapError::OutOfRange)?;
            let mut space = space.lock();
            // SAFETY: only the tables of vmalloc's own window are looked up or made; no
            // translation changes.
            let tables = unsafe { space.upper_mut() };
            let mut get = |x: u64| -> Result<Option<LeafTable>, MapError> {
                if make {
                    tables.leaf_table(VirtAddr::new(x), &mut GlobalTableAlloc).map(Some).map_err(map_err)
                } else {
                    Ok(tables.find_leaf_table(VirtAddr::new(x)))
                }
            };
            if a.is_none() {
                a = get(va.as_u64())?;
            }
            if b.is_none() {
                b = if rest > 0 { get(second)? } else { a };
            }
        }
        let (Some(a), Some(b)) = (a, b) else { return Ok(None) };
        if rest > 0 {
            self.remember(b);
        }
        self.remember(a);
        Ok(Some([(a, at, first), (b, 0, rest)]))
    }
}

/// A piece of a range in one last-level table: the table, its first entry, its pages.
type LeafPart = (LeafTable, usize, usize);

/// What one last-level table translates (2 MiB).
const LEAF_SPAN: u64 = 1 << 21;

/// Zeroes the page at `p` ([`hal::cpu::zero_page`]: pairs of stores of the zero register,
/// the fastest way under QEMU TCG; `test_vmalloc.profile=1` measures the alternatives).
///
/// # Safety
/// `p` is page aligned and the whole page is writable memory the caller owns.
#[inline]
pub unsafe fn zero_page(p: *mut u8) {
    // SAFETY: forwarded from the caller.
    unsafe { hal::cpu::zero_page(p) }
}

/// Whether caller-owned `frames` may be mapped as normal memory ([`mappable::check`]).
fn mappable_ram(frames: &[PhysAddr]) -> Result<(), VmallocError> {
    mappable::check(frames)
}

impl VmBackend for KernelBackend {
    fn check_vmap_frames(&self, frames: &[PhysAddr]) -> Result<(), VmallocError> {
        mappable_ram(frames)
    }

    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize {
        buddy::alloc_pages_bulk_gfp(out, Gfp::from_bits(self.gfp.load(Ordering::Relaxed)))
    }

    fn free_frames(&mut self, frames: &[PhysAddr]) {
        // SAFETY: vmalloc hands back only frames it took from `alloc_frames` and has
        // unmapped; nothing refers to them any more.
        if let Err(e) = unsafe { buddy::free_pages_bulk(frames) } {
            log::error!("vmalloc: freeing {} frames: {e}", frames.len());
        }
    }

    fn zero_frames(&mut self, frames: &[PhysAddr]) {
        for &pa in frames {
            // SAFETY: a frame just taken from the buddy allocator (page aligned), reached
            // through the linear map, owned by the caller and not yet mapped anywhere else.
            unsafe { zero_page(self.frame_ptr(pa)) };
        }
    }

    fn map_pages(&mut self, va: VirtAddr, frames: &[PhysAddr], prot: Prot) -> Result<(), MapError> {
        let attrs = match prot {
            Prot::ReadWrite => Attributes::DATA,
            Prot::ReadOnly => Attributes::RODATA,
        };
        if let Some((l, at)) = self.hot_holding(va, frames.len()) {
            // The common case: one hot table holds the whole range.
            // SAFETY: as below; `map_pages` checks the frames and the entries itself.
            return unsafe { l.map_pages(at, frames, attrs) }.map_err(map_err);
        }
        if frames.iter().any(|f| !f.is_page_aligned() || f.as_u64() >= 1 << 48) {
            return Err(MapError::OutOfRange);
        }
        if let Some(parts) = self.leaves_for(va, frames.len(), true)? {
            // The tables are in the tree: every call of this backend that may free a table
            // drops the hot ones first, and no one else frees or edits tables of this
            // instance's window. vmalloc maps only pages of its own window that are
            // unmapped and flushed (the VmBackend contract), under its lock, which `&mut
            // self` stands for. Every entry is checked before any is written, so a refused
            // call writes nothing; the frames were checked above.
            let taken = parts.iter().any(|&(l, at, n)| {
                // SAFETY: as above: a live table of this window, entries inside it.
                unsafe { l.any_page(at, n) }
            });
            if taken {
                return Err(MapError::AlreadyMapped);
            }
            let mut done = 0;
            // The second piece is empty when one table holds the range (no barrier for it).
            for (l, at, n) in parts.into_iter().filter(|p| p.2 > 0) {
                // SAFETY: as above.
                unsafe { l.map_pages(at, &frames[done..done + n], attrs) }.map_err(map_err)?;
                done += n;
            }
            return Ok(());
        }
        let space = hal::kmap::kernel_space().ok_or(MapError::OutOfRange)?;
        // SAFETY: vmalloc maps only pages of its own window that are unmapped and flushed
        // (the VmBackend contract).
        unsafe { space.lock().upper_mut().map_frames(va, frames, attrs, &mut GlobalTableAlloc) }.map_err(map_err)
    }

    fn map_device(&mut self, va: VirtAddr, pa: PhysAddr, pages: usize, attr: DeviceAttr) -> Result<(), MapError> {
        // May free a table (a hot one among them).
        self.forget_hot();
        let memory = match attr {
            DeviceAttr::DeviceNGnRnE => MemoryType::DeviceNGnRnE,
            DeviceAttr::DeviceNGnRE => MemoryType::DeviceNGnRE,
            DeviceAttr::NormalNonCacheable => MemoryType::NormalNonCacheable,
        };
        let attrs = Attributes::new(memory, Permissions::ReadWrite).map_err(map_err)?;
        let range = VirtRange::new(va, (pages * PAGE_SIZE) as u64).map_err(|_| MapError::OutOfRange)?;
        // Above the CPU's physical address range every access would take an address size fault.
        if pa.as_u64().saturating_add(range.size()) > 1u64 << hal::cpu::phys_addr_bits() {
            return Err(MapError::OutOfRange);
        }
        let space = hal::kmap::kernel_space().ok_or(MapError::OutOfRange)?;
        let mut space = space.lock();
        // SAFETY: as in `map_pages`: a fresh range of vmalloc's own window.
        let tables = unsafe { space.upper_mut() };
        if range.size() >= BLOCK_SIZE as u64 {
            // An empty table left inside the range would keep a block from its entry: give
            // those back first (walk caches invalidated before each is freed).
            // SAFETY: only empty tables wholly inside the fresh range go; they came from
            // `GlobalTableAlloc`, and `HardwareTlb` broadcasts.
            unsafe { tables.free_empty_tables(range, range, &HardwareTlb, &mut GlobalTableAlloc) }.map_err(map_err)?;
        }
        // 1 GiB and 2 MiB blocks wherever both addresses are aligned to one the range
        // covers (vmalloc aligns the area so): iounmap unmaps the whole range, never part of
        // a block.
        tables.map(range, pa, attrs, BlockPolicy::AllowBlocks, &mut GlobalTableAlloc).map_err(map_err)
    }

    fn alloc_block(&mut self) -> Option<PhysAddr> {
        buddy::alloc_pages(BLOCK_ORDER).ok()
    }

    fn free_block(&mut self, pa: PhysAddr) {
        // SAFETY: vmalloc hands back only blocks it took from `alloc_block` and has unmapped.
        if let Err(e) = unsafe { buddy::free_pages(pa, BLOCK_ORDER) } {
            log::error!("vmalloc: freeing the 2 MiB block at {pa:#x}: {e}");
        }
    }

    fn zero_block(&mut self, pa: PhysAddr) {
        for i in 0..BLOCK_PAGES {
            // SAFETY: a block just taken from the buddy allocator (aligned to its size), reached
            // page by page through the linear map, owned by the caller and not yet mapped.
            unsafe { zero_page(self.frame_ptr(pa.add((i * PAGE_SIZE) as u64))) };
        }
    }

    fn map_block(&mut self, va: VirtAddr, pa: PhysAddr) -> Result<(), MapError> {
        // May free a table (a hot one among them).
        self.forget_hot();
        let range = VirtRange::new(va, BLOCK_SIZE as u64).map_err(|_| MapError::OutOfRange)?;
        if !va.as_u64().is_multiple_of(BLOCK_SIZE as u64) || !pa.as_u64().is_multiple_of(BLOCK_SIZE as u64) {
            return Err(MapError::OutOfRange);
        }
        let space = hal::kmap::kernel_space().ok_or(MapError::OutOfRange)?;
        let mut space = space.lock();
        // A live leaf in the range is refused, not torn down: its frames belong to an area
        // (and unmapping it here would leak them and leave that area's pointer dangling).
        if space.upper().first_mapped(range).is_some() {
            return Err(MapError::AlreadyMapped);
        }
        // SAFETY: nothing is mapped in `range` (checked just above, under the tables' lock).
        // Reclaiming first releases an empty page table that earlier small areas left at
        // this level-2 entry, after a walk-cache invalidation, as Linux's `pmd_free_pte_page`
        // does: then the block entry can take its place. No leaf is cleared.
        let tables = unsafe { space.upper_mut() };
        // SAFETY: as above.
        unsafe { tables.unmap_and_reclaim(range, &HardwareTlb, &mut GlobalTableAlloc) }.map_err(map_err)?;
        tables.map(range, pa, Attributes::DATA, BlockPolicy::AllowBlocks, &mut GlobalTableAlloc).map_err(map_err)?;
        if tables.translate(va).is_some_and(|t| t.level == 2) {
            return Ok(());
        }
        // The walker chose pages after all: undo them (and their TLB entries, which a
        // speculative walk may have cached) so the caller maps the range its own way.
        // SAFETY: the pages were mapped just above and handed to nobody.
        let undone = unsafe { tables.unmap_with(range, |_, _, _| {}) };
        HardwareTlb.invalidate_last_level(&mut core::iter::once(range));
        undone.map_err(map_err)?;
        Err(MapError::AlreadyMapped)
    }

    fn unmap_block(&mut self, va: VirtAddr) -> Option<PhysAddr> {
        // May free a table (a hot one among them).
        self.forget_hot();
        let range = VirtRange::new(va, BLOCK_SIZE as u64).ok()?;
        let space = hal::kmap::kernel_space()?;
        let mut space = space.lock();
        // SAFETY: vmalloc unmaps only blocks of an area it is freeing (or rolling back).
        let tables = unsafe { space.upper_mut() };
        if !tables.translate(va).is_some_and(|t| t.level == 2 && t.phys.as_u64().is_multiple_of(BLOCK_SIZE as u64)) {
            return None;
        }
        let mut block = None;
        // SAFETY: as above: nothing the program still uses lives in the area.
        let r = unsafe { tables.unmap_with(range, |_, pa, _| block = Some(pa)) };
        r.ok().and(block)
    }

    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, mut on_frame: F) {
        if let Some((l, at)) = self.hot_holding(va, pages) {
            // SAFETY: as below.
            unsafe { l.take_pages(at, pages, on_frame) };
            return;
        }
        if let Ok(Some(parts)) = self.leaves_for(va, pages, false) {
            for (l, at, n) in parts.into_iter().filter(|p| p.2 > 0) {
                // SAFETY: as in `map_pages` for the tables; vmalloc unmaps only the pages
                // of an area it is freeing (or rolling back), which nothing uses any more.
                unsafe { l.take_pages(at, n, &mut on_frame) };
            }
            return;
        }
        // Blocks, missing tables, or more than two tables: the walker.
        let Ok(range) = VirtRange::new(va, (pages * PAGE_SIZE) as u64) else { return };
        let Some(space) = hal::kmap::kernel_space() else { return };
        // SAFETY: vmalloc unmaps only the pages of an area it is freeing (or rolling back);
        // nothing the program still uses lives there.
        let r = unsafe {
            space.lock().upper_mut().unmap_with(range, |_va, pa, size| {
                for i in 0..size / PAGE_SIZE as u64 {
                    on_frame(pa.add(i * PAGE_SIZE as u64));
                }
            })
        };
        if let Err(e) = r {
            log::error!("vmalloc: unmap {va:#x} ({pages} pages): {e}");
        }
    }

    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]) {
        // Last level only (`tlbi vaale1is`): vmalloc keeps its table pages, so no walk-cache
        // entry went stale — as Linux's flush_tlb_kernel_range.
        let mut iter = ranges.iter().filter_map(|&(va, n)| VirtRange::new(va, (n * PAGE_SIZE) as u64).ok());
        HardwareTlb.invalidate_last_level(&mut iter);
    }

    fn tlb_flush_all(&mut self) {
        HardwareTlb.invalidate_all();
    }

    fn free_empty_tables(&mut self, spans: &[VirtRange], window: VirtRange) -> usize {
        // May free a table (a hot one among them).
        self.forget_hot();
        self.flush_and_free_tables(TlbFlush::None, spans, window)
    }

    fn flush_and_free_tables(&mut self, flush: TlbFlush<'_>, spans: &[VirtRange], window: VirtRange) -> usize {
        // May free a table (a hot one among them).
        self.forget_hot();
        let Some(space) = hal::kmap::kernel_space() else { return 0 };
        let mut space = space.lock();
        // SAFETY: only tables inside vmalloc's own window go, and only empty ones: no
        // translation changes. The tables came from `GlobalTableAlloc` (every table of the
        // upper half past the root does: boot puts none there), and `HardwareTlb` broadcasts
        // to every core. Emptiness is read under this lock, with the release.
        let tables = unsafe { space.upper_mut() };
        let (mut iter, leaves) = match flush {
            TlbFlush::None => (None, LeafFlush::None),
            TlbFlush::All => (None, LeafFlush::All),
            TlbFlush::Pages(r) => (Some(pages(r)), LeafFlush::None),
        };
        let leaves = match iter.as_mut() {
            Some(i) => LeafFlush::Pages(i),
            None => leaves,
        };
        // SAFETY: as above; the leaves are vmalloc's unmapped pages.
        match unsafe { tables.flush_and_free_empty_tables(leaves, spans, window, &HardwareTlb, &mut GlobalTableAlloc) }
        {
            Ok(n) => n,
            Err(e) => {
                // A range refused before anything was written or invalidated: flush alone.
                log::error!("vmalloc: freeing empty tables: {e}");
                match flush {
                    TlbFlush::None => {}
                    TlbFlush::All => HardwareTlb.invalidate_all(),
                    TlbFlush::Pages(r) => HardwareTlb.invalidate_last_level(&mut pages(r)),
                }
                0
            }
        }
    }

    fn table_pages(&self) -> usize {
        vmalloc_table_pages()
    }

    fn translate(&self, va: VirtAddr) -> Option<PhysAddr> {
        hal::kmap::kernel_space()?.lock().upper().translate(va).map(|t| t.phys)
    }

    fn phys_is_ram(&self, pa: PhysAddr, pages: usize) -> bool {
        let Some(r) = (pages as u64).checked_mul(PAGE_SIZE as u64).and_then(|b| PhysRange::new(pa, b).ok()) else {
            return true;
        };
        if !self.ram.overlaps(&r) {
            return false;
        }
        // RAM as Linux's `pfn_is_map_memory` counts it: `no-map` reservations are RAM the
        // kernel never maps (firmware or device memory), which a driver may ioremap.
        let Some(info) = hal::boot::boot_info() else { return true };
        let mut holes = [r; hal::dtb::MAX_RESERVED];
        let mut n = 0;
        for hole in info.platform.reserved.no_map().filter_map(|h| PhysRange::covering_pages(h.start(), h.size()).ok())
        {
            holes[n] = hole;
            n += 1;
        }
        self.ram.iter().any(|ram| {
            hal::kmap::for_each_piece(ram, &holes[..n], |piece| if piece.overlaps(&r) { Err(()) } else { Ok(()) })
                .is_err()
        })
    }

    fn copy_mapped(&mut self, dst: VirtAddr, src: VirtAddr, bytes: usize) {
        // SAFETY: vmalloc calls this only on mapped bytes of two distinct live areas.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr::<u8>(), dst.as_mut_ptr::<u8>(), bytes) };
    }

    fn zero_mapped(&mut self, va: VirtAddr, bytes: usize) {
        // SAFETY: vmalloc calls this only on mapped bytes of a live area it owns.
        unsafe { core::ptr::write_bytes(va.as_mut_ptr::<u8>(), 0, bytes) };
    }

    fn poison_frames(&mut self, frames: &[PhysAddr], byte: u8) {
        for &pa in frames {
            // SAFETY: a frame vmalloc took from the buddy allocator and holds in quarantine
            // (unmapped from its area, not freed), reached through the linear map.
            unsafe { core::ptr::write_bytes(self.frame_ptr(pa), byte, PAGE_SIZE) };
        }
    }

    fn find_unpoisoned(&self, pa: PhysAddr, byte: u8) -> Option<(usize, u8)> {
        let p = self.frame_ptr(pa).cast::<u64>();
        let pattern = u64::from_ne_bytes([byte; 8]);
        for w in 0..PAGE_SIZE / 8 {
            // SAFETY: a quarantined frame (as in `poison_frames`), page aligned, read word by
            // word inside it. Volatile: a stale TLB entry may have written it behind our back.
            let v = unsafe { p.add(w).read_volatile() };
            if v != pattern {
                let bytes = v.to_ne_bytes();
                let i = bytes.iter().position(|&b| b != byte).unwrap_or(0);
                return Some((w * 8 + i, bytes[i]));
            }
        }
        None
    }

    fn write_words(&mut self, pa: PhysAddr, at: usize, words: &[u64]) -> bool {
        if at + words.len() > PAGE_SIZE / 8 {
            return false;
        }
        let p = self.frame_ptr(pa).cast::<u64>();
        // SAFETY: an index frame vmalloc took from the buddy allocator and owns (mapped
        // nowhere else), page aligned; the words lie inside it (checked above).
        unsafe { core::ptr::copy_nonoverlapping(words.as_ptr(), p.add(at), words.len()) };
        true
    }

    fn read_words(&self, pa: PhysAddr, at: usize, out: &mut [u64]) {
        if at + out.len() > PAGE_SIZE / 8 {
            out.fill(0);
            return;
        }
        let p = self.frame_ptr(pa).cast::<u64>();
        // SAFETY: as in `write_words`: inside an index frame vmalloc owns.
        unsafe { core::ptr::copy_nonoverlapping(p.add(at), out.as_mut_ptr(), out.len()) };
    }

    fn now_ns(&self) -> u64 {
        hal::cpu::uptime_ns()
    }
}

static VMALLOC: Once<LockedVmalloc<KernelBackend>> = Once::new();

/// vmalloc's `(start, pages)` flush ranges as [`VirtRange`]s.
fn pages(r: &[(VirtAddr, usize)]) -> impl Iterator<Item = VirtRange> + '_ {
    r.iter().filter_map(|&(va, n)| VirtRange::new(va, (n * PAGE_SIZE) as u64).ok())
}

/// Where [`init`] ends the `DMA` zone: the device tree's `dma-ranges` limit
/// ([`hal::dtb::Platform::dma_limit`], the lowest reach of any bus master) when it lies
/// below 4 GiB; `None` otherwise (QEMU virt has no `dma-ranges`: no `DMA` zone, `DMA32`
/// gives 32-bit reach). A limit at or above 4 GiB makes no zone: Linux would call all of
/// RAM below 4 GiB `DMA` then, which we call `DMA32` (see the docs' naming deviation).
///
/// # Example
/// ```no_run
/// let info = hal::boot::boot_info().unwrap();
/// if let Some(limit) = memory::kernel::dma_zone_limit(&info.platform) {
///     log::info!("DMA zone below {limit:#x}");
/// }
/// ```
pub fn dma_zone_limit(platform: &hal::dtb::Platform) -> Option<PhysAddr> {
    platform.dma_limit.filter(|l| l.as_u64() < 1 << 32)
}

/// Why [`init`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The MMU is not on (hal's kernel address space is missing).
    NoKernelSpace,
    /// The buddy allocator refused the memory map.
    Buddy(BuddyError),
    /// The slab allocator could not start.
    Slab(SlabError),
    /// vmalloc could not start.
    Vmalloc(VmallocError),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::NoKernelSpace => f.write_str("no kernel address space (MMU off)"),
            InitError::Buddy(e) => write!(f, "buddy: {e}"),
            InitError::Slab(e) => write!(f, "slab: {e}"),
            InitError::Vmalloc(e) => write!(f, "vmalloc: {e}"),
        }
    }
}

impl core::error::Error for InitError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            InitError::NoKernelSpace => None,
            InitError::Buddy(e) => Some(e),
            InitError::Slab(e) => Some(e),
            InitError::Vmalloc(e) => Some(e),
        }
    }
}

/// Tunables, from the command line (`buddy.strict=1 slab.strict=1 vmalloc.strict=1
/// vmalloc.lazy_max_pages=N vmalloc.flush_page_threshold=N vmalloc.quarantine=1
/// vmalloc.keep_tables=1 vmalloc.vmap_blocks=N`).
#[derive(Clone, Copy, Debug)]
pub struct MemoryConfig {
    /// Poison freed pages and check the poison on allocation.
    pub buddy_strict: bool,
    /// Red zones and poisoning for small objects.
    pub slab_strict: bool,
    /// vmalloc's tunables.
    pub vmalloc: VmallocConfig,
    /// Blocks of 4 MiB set aside for [`vm_map_ram`]'s per-CPU blocks
    /// (`vmalloc.vmap_blocks=N`; 0 maps every `vm_map_ram` through the vmalloc tree).
    pub vmap_blocks: usize,
    /// A vmalloc node (an instance of its own) for each secondary CPU
    /// (`vmalloc.nodes=0` turns them off: every CPU then shares the global instance).
    pub vmalloc_nodes: bool,
    /// Each instance's purge threshold in pages (`vmalloc.lazy_max_pages=N`); `None`, the
    /// default, is Linux's [`crate::vmalloc::lazy_max_pages`] for the device tree's CPUs
    /// (it overrides `vmalloc.lazy_max_pages` of [`Self::vmalloc`]).
    pub lazy_max_pages: Option<usize>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            buddy_strict: false,
            slab_strict: false,
            vmalloc: VmallocConfig::default(),
            vmap_blocks: vm_map_ram::DEFAULT_BLOCKS,
            vmalloc_nodes: true,
            lazy_max_pages: None,
        }
    }
}

impl MemoryConfig {
    /// Reads the tunables from the boot command line; bad values are logged and ignored.
    pub fn from_cmdline(cmdline: &hal::cmdline::CommandLine<'_>) -> Self {
        let mut c = Self::default();
        let flag = |key: &str| match cmdline.get_bool(key) {
            Ok(v) => v.unwrap_or(false),
            Err(_) => {
                log::warn!("ignoring {key}={:?}: not a boolean", cmdline.get(key).unwrap_or(""));
                false
            }
        };
        let number = |key: &str| match cmdline.get_u64(key) {
            Ok(v) => v,
            Err(_) => {
                log::warn!("ignoring {key}={:?}: not a number", cmdline.get(key).unwrap_or(""));
                None
            }
        };
        c.buddy_strict = flag("buddy.strict");
        c.slab_strict = flag("slab.strict");
        c.vmalloc.strict = flag("vmalloc.strict");
        c.vmalloc.quarantine = flag("vmalloc.quarantine");
        c.vmalloc.keep_tables = flag("vmalloc.keep_tables");
        if let Some(n) = number("vmalloc.lazy_max_pages") {
            c.lazy_max_pages = Some(n as usize);
        }
        if let Some(n) = number("vmalloc.flush_page_threshold") {
            c.vmalloc.flush_page_threshold = n as usize;
        }
        if let Ok(Some(false)) = cmdline.get_bool("vmalloc.nodes") {
            c.vmalloc_nodes = false;
        }
        if let Some(n) = number("vmalloc.vmap_blocks") {
            c.vmap_blocks = (n as usize).min(vm_map_ram::MAX_BLOCKS);
        }
        c
    }
}

/// The boot parameters this crate reads (for the firmware's unknown-parameter check).
pub const BOOT_PARAMS: &[&str] = &[
    "buddy.strict",
    "slab.strict",
    "vmalloc.strict",
    "vmalloc.lazy_max_pages",
    "vmalloc.flush_page_threshold",
    "vmalloc.quarantine",
    "vmalloc.keep_tables",
    "vmalloc.vmap_blocks",
    "vmalloc.nodes",
];

/// Starts the memory system: the buddy allocator over the RAM the device tree names (less
/// `/memreserve/`, `/reserved-memory`, the DTB and the whole image — boot tables and stacks
/// included), the slab allocator, vmalloc over `[VMALLOC_START, VMALLOC_END)`, and the
/// fault-report hook.
///
/// # Errors
/// An [`InitError`]; calling it twice fails with the buddy's `AlreadyInitialized`.
///
/// # Safety
/// Called once, after `hal` turned the MMU on, with the `BootInfo` boot produced: the RAM it
/// names outside the reserved ranges must be unused by anything else for the rest of the
/// program (the allocators hand it out).
pub unsafe fn init(info: &BootInfo, config: MemoryConfig) -> Result<(), InitError> {
    let linear = hal::kmap::linear_map().ok_or(InitError::NoKernelSpace)?;
    let p = &info.platform;
    let mut regions = [info.image.whole; hal::dtb::MAX_RAM_RANGES];
    let mut nr = 0;
    for r in p.ram.iter() {
        regions[nr] = r;
        nr += 1;
    }
    // Reserved for good: the tree's reservations (`no-map` ones included), the DTB, and the
    // image less the boot-table pages boot did not need (those are handed out).
    let mut reserved = [info.image.whole; hal::dtb::MAX_RESERVED + 3];
    let mut nres = 0;
    let image = match hal::kmap::boot_tables_unused() {
        Some(unused) => [
            PhysRange::from_bounds(info.image.whole.start(), unused.start()).ok(),
            PhysRange::from_bounds(unused.end(), info.image.whole.end()).ok(),
        ],
        None => [Some(info.image.whole), None],
    };
    for r in p.reserved.ranges().chain([p.dtb]).chain(image.into_iter().flatten()) {
        reserved[nres] = r;
        nres += 1;
    }
    mappable::init(&regions[..nr], &reserved[..nres]);
    let t0 = hal::cpu::uptime_ns();
    // SAFETY: forwarded to our caller: RAM outside the reserved ranges is ours to hand out,
    // and `linear` is hal's identity map of RAM, valid for the program's life.
    unsafe { buddy::init_zoned(&regions[..nr], &reserved[..nres], linear, config.buddy_strict, dma_zone_limit(p)) }
        .map_err(InitError::Buddy)?;
    let t1 = hal::cpu::uptime_ns();
    slab::init(config.slab_strict).map_err(InitError::Slab)?;
    let t2 = hal::cpu::uptime_ns();
    let t_slab = t2;
    let range = VirtRange::from_bounds(VirtAddr::new(VMALLOC_START), VirtAddr::new(VMALLOC_END))
        .map_err(|_| InitError::Vmalloc(VmallocError::BadRange))?;
    let backend = KernelBackend { linear, ram: p.ram, gfp: AtomicU32::new(GFP_KERNEL.bits()), hot: [None; 2] };
    let mut vconfig = config.vmalloc;
    vconfig.lazy_max_pages = config.lazy_max_pages.unwrap_or(crate::vmalloc::lazy_max_pages(p.cpus.len()));
    let vm = Vmalloc::new(backend, range, vconfig).map_err(InitError::Vmalloc)?;
    let vm = VMALLOC.call_once(|| LockedVmalloc::new(vm));
    vm_map_ram::init(vm, config.vmap_blocks).map_err(InitError::Vmalloc)?;
    // A node for each secondary CPU, in the global window (none at one CPU).
    let cpus = if config.vmalloc_nodes { p.cpus.len() } else { 1 };
    nodes::init(vm, cpus, vconfig, || KernelBackend {
        linear,
        ram: p.ram,
        gfp: AtomicU32::new(GFP_KERNEL.bits()),
        hot: [None; 2],
    })
    .map_err(InitError::Vmalloc)?;
    hal::exception::set_fault_explainer(explain_fault);
    // A CPU going off hands back its per-CPU page lists, object caches and vm_map_ram
    // block, then (from the CPU that switched it off) its deferred frees and its node's
    // pooled and parked ranges; the lists' limits follow the CPUs online.
    let _ =
        hal::smp::register_hotplug(hal::smp::HotplugHooks { down: cpu_going_down, dead: cpu_dead, up: cpu_came_up });
    // What reclaim may take back, and what the out-of-memory report adds.
    // The per-CPU lists last: what the others free lands on them.
    for s in [&slab::cpu::SLAB_SHRINKER, &VMALLOC_SHRINKER, &buddy::pcp::PCP_SHRINKER] {
        let _ = crate::reclaim::register(s);
    }
    crate::reclaim::set_report_section(oom_section);
    let t3 = hal::cpu::uptime_ns();
    log::info!(
        "memory system up in {} us (buddy {} us, slab {} us, vmalloc {} us); {} MiB in {} zone(s), none of its free frames written",
        (t3 - t0) / 1000,
        (t1 - t0) / 1000,
        (t_slab - t1) / 1000,
        (t3 - t_slab) / 1000,
        buddy::stats().map_or(0, |s| s.total_pages >> 8),
        buddy::stats().map_or(0, |s| s.zones.iter().filter(|z| z.present != 0).count()),
    );
    Ok(())
}

/// The global vmalloc instance, once [`init`] has run.
pub fn vmalloc_instance() -> Option<&'static LockedVmalloc<KernelBackend>> {
    VMALLOC.get()
}

/// The global instance for a thread-context call, after this CPU's deferred frees (see
/// [`vfree_atomic`]); every vmalloc-family call goes through here, so none of them takes
/// the vmalloc lock in interrupt context.
///
/// # Errors
/// [`VmallocError::InInterrupt`] in an interrupt handler, [`VmallocError::NotInitialized`]
/// before [`init`].
#[inline]
fn vm() -> Result<&'static LockedVmalloc<KernelBackend>, VmallocError> {
    if hal::irq::in_interrupt() {
        return Err(VmallocError::InInterrupt);
    }
    let v = VMALLOC.get().ok_or(VmallocError::NotInitialized)?;
    if deferred::pending_here() {
        complete_deferred(hal::smp::this_cpu(), v);
    }
    Ok(v)
}

/// Frees what handlers on `cpu` queued (thread context), each in the instance that holds it.
#[inline(never)]
fn complete_deferred(cpu: usize, v: &LockedVmalloc<KernelBackend>) -> usize {
    deferred::drain(cpu, |a| nodes::of_addr(a).unwrap_or(v).vfree(a))
}

/// The instance an allocation on this CPU goes to (its node, or the global instance for
/// the boot CPU), and whether that is a node (which may send the call on to the global
/// one); as [`vm`] otherwise.
///
/// # Errors
/// As [`vm`].
#[inline]
fn vm_here() -> Result<(&'static LockedVmalloc<KernelBackend>, bool), VmallocError> {
    let g = vm()?;
    Ok(match nodes::of_cpu(hal::smp::this_cpu()) {
        Some(n) => (n, true),
        None => (g, false),
    })
}

/// The instance whose window holds `addr` (a node's, or the global one); as [`vm`]
/// otherwise.
///
/// # Errors
/// As [`vm`].
#[inline]
fn vm_at(addr: VirtAddr) -> Result<&'static LockedVmalloc<KernelBackend>, VmallocError> {
    let g = vm()?;
    Ok(nodes::of_addr(addr).unwrap_or(g))
}

/// Whether an allocation a node refused may fit the global instance (larger than a
/// node's window, or aligned beyond it, or the node full).
fn global_may_fit(e: VmallocError) -> bool {
    matches!(e, VmallocError::NoVirtualSpace | VmallocError::TooLarge)
}

/// vmalloc as a shrinker: a purge gives back the quarantined frames (parked ranges hold no
/// frames: `vfree` freed them already), the empty page tables the last automatic purge kept
/// and the spare records above their mark.
static VMALLOC_SHRINKER: crate::reclaim::Shrinker =
    crate::reclaim::Shrinker::new("vmalloc (quarantine, kept tables, spares)", vmalloc_count, vmalloc_scan);

fn vmalloc_count() -> usize {
    vmalloc_instances()
        .filter_map(|v| {
            v.lock_if_free(|g| {
                let s = g.stats();
                // Kept tables: at most one page per 2 MiB stretch kept (only the empty
                // ones go). Spare records above their mark free slab objects (maybe a
                // slab): count 1.
                let kept: u64 = g.kept_tables().iter().map(|k| k.size() >> 21).sum();
                s.quarantined_frames + kept as usize + usize::from(s.spare_records > g.config().spare_high)
            })
        })
        .sum()
}

fn vmalloc_scan(_nr: usize) -> usize {
    vmalloc_instances().filter_map(LockedVmalloc::try_purge).sum()
}

/// The out-of-memory report's vmalloc lines.
fn oom_section() -> [(&'static str, usize); 4] {
    let mut s = VmallocStats::default();
    for v in vmalloc_instances() {
        if let Some(t) = v.lock_if_free(|g| g.stats()) {
            s.merge(&t);
        }
    }
    [
        ("vmalloc pages mapped", s.mapped_pages),
        ("vmalloc live areas", s.live_areas),
        ("page-table pages (vmalloc window)", vmalloc_table_pages()),
        ("quarantined frames", s.quarantined_frames),
    ]
}

/// The hotplug "down" hook: runs on the CPU going off, before it switches itself off.
fn cpu_going_down(_cpu: usize) {
    vm_map_ram::retire_local();
    slab::drain_local();
    buddy::drain_local();
    // Its share of the page lists' `high` goes to the CPUs that stay (the CPU still counts
    // as online here: `up` of a later hook, or the next watermark change, settles it).
    buddy::pcp_update_cpus();
}

/// The hotplug "dead" hook: runs on the CPU that switched `cpu` off, in thread context, so
/// the vmalloc locks are taken as everywhere else (never with interrupts masked). What `cpu`
/// left in vmalloc goes back: the frees its interrupt handlers queued, then its node's
/// pooled and parked ranges (one purge: its broadcast flush covers every CPU). Its busy
/// areas stay where they are, freed by whoever owns them.
fn cpu_dead(cpu: usize) {
    if hal::irq::in_interrupt() || !hal::irq::irqs_enabled() {
        return; // left to the next purge (`kernel::purge` empties every CPU's ring)
    }
    let Ok(v) = vm() else { return };
    complete_deferred(cpu, v);
    if let Some(n) = nodes::of_cpu(cpu) {
        n.purge();
    }
}

/// The hotplug "up" hook: runs on the CPU coming back.
fn cpu_came_up(_cpu: usize) {
    buddy::pcp_update_cpus();
}

/// The fault-report hook `init` registers with `hal`: explains addresses of the vmalloc
/// window (guard page hit, use after vfree) with a try-lock. Safe in exception context.
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(4096)?;
/// let mut why = alloc::string::String::new();
/// memory::kernel::explain_fault(p.as_u64() + 4096, &mut why);   // "vmalloc: guard page hit at ..."
/// # extern crate alloc;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn explain_fault(addr: u64, out: &mut dyn fmt::Write) -> bool {
    if let Some(n) = nodes::of_addr(VirtAddr::new(addr)) {
        return !matches!(n.try_explain_fault(VirtAddr::new(addr), out), None | Some(FaultClass::NotVmalloc));
    }
    match VMALLOC.get() {
        Some(v) => !matches!(v.try_explain_fault(VirtAddr::new(addr), out), None | Some(FaultClass::NotVmalloc)),
        None => false,
    }
}

/// Allocates `size` bytes of virtually contiguous memory (whole pages, plus an unmapped
/// guard page after them). Not zeroed.
///
/// # Errors
/// [`VmallocError::ZeroSize`], [`VmallocError::TooLarge`], [`VmallocError::NoVirtualSpace`],
/// [`VmallocError::NoFrames`] (everything taken is given back first), or
/// [`VmallocError::NotInitialized`].
/// # Example
/// ```no_run
/// // A 1 MiB table a driver fills once: no need for physically contiguous memory.
/// let table = memory::kernel::vmalloc(1 << 20)?;
/// // SAFETY: the area is mapped, 1 MiB long and ours until vfree.
/// unsafe { core::ptr::write_bytes(table.as_mut_ptr::<u8>(), 0xff, 1 << 20) };
/// memory::kernel::vfree(table)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vmalloc(size: usize) -> Result<VirtAddr, VmallocError> {
    vmalloc_with(size, PAGE_SIZE, VmFlags::NONE)
}

/// [`vmalloc`] with allocation flags (Linux's `__vmalloc(size, gfp_mask)`; see
/// [`crate::gfp`]): the area's frames are taken with `gfp`'s zone (`GFP_DMA32`: every
/// frame below 4 GiB, Linux's `vmalloc_32`), `__GFP_ZERO` zeroes the area. The page-table
/// pages and records are taken as for any vmalloc. Access to the reserves (`__GFP_HIGH`,
/// hence `GFP_ATOMIC`) is not given to vmalloc: its frames are taken as `GFP_KERNEL`'s
/// (vmalloc is not for atomic context in Linux either). The area's caller in
/// `vmallocinfo` is this function.
///
/// # Errors
/// As [`vmalloc`].
/// # Example
/// ```no_run
/// use memory::gfp::{GFP_DMA32, __GFP_ZERO};
/// let buf = memory::kernel::__vmalloc(256 * 1024, GFP_DMA32 | __GFP_ZERO)?; // frames below 4 GiB
/// memory::kernel::vfree(buf)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn __vmalloc(size: usize, gfp: Gfp) -> Result<VirtAddr, VmallocError> {
    let flags = if gfp.contains(__GFP_ZERO) { VmFlags::ZERO } else { VmFlags::NONE };
    let frames_gfp = Gfp::from_bits(gfp.bits() & !(__GFP_HIGH.bits() | __GFP_ZERO.bits())) | GFP_KERNEL;
    if frames_gfp == GFP_KERNEL {
        return vmalloc_with(size, PAGE_SIZE, flags);
    }
    // Other frame flags: the global instance, whose backend takes them for this one call.
    vm()?.with_ready(|v| {
        v.backend().gfp.store(frames_gfp.bits(), Ordering::Relaxed);
        let r = v.vmalloc_with(size, PAGE_SIZE, flags);
        v.backend().gfp.store(GFP_KERNEL.bits(), Ordering::Relaxed);
        r
    })?
}

/// [`vmalloc`], zeroed.
///
/// # Errors
/// As [`vmalloc`].
/// # Example
/// ```no_run
/// let ring = memory::kernel::vzalloc(64 * 1024)?;   // 16 zeroed pages + a guard page
/// memory::kernel::vfree(ring)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vzalloc(size: usize) -> Result<VirtAddr, VmallocError> {
    vmalloc_with(size, PAGE_SIZE, VmFlags::ZERO)
}

/// [`vmalloc`] mapped with 2 MiB blocks where it can ([`VmFlags::HUGE`], Linux's
/// `vmalloc_huge`): each whole 2 MiB of the area is one buddy block of order 9 and one
/// level-2 descriptor; the rest, and any 2 MiB for which the buddy allocator has no free
/// block, is mapped with pages. For large, long-lived buffers: fewer TLB misses and a
/// cheaper map and free.
///
/// # Errors
/// As [`vmalloc`].
/// # Example
/// ```no_run
/// let big = memory::kernel::vmalloc_huge(8 << 20)?;     // four 2 MiB blocks + a guard page
/// assert_eq!(big.as_u64() % (2 << 20), 0);
/// memory::kernel::vfree(big)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vmalloc_huge(size: usize) -> Result<VirtAddr, VmallocError> {
    vmalloc_with(size, PAGE_SIZE, VmFlags::HUGE)
}

/// [`vmalloc`] with the start aligned to `align` (a power of two, at least a page).
///
/// # Errors
/// As [`vmalloc`], and [`VmallocError::BadAlignment`].
/// # Example
/// ```no_run
/// let buf = memory::kernel::vmalloc_aligned(5 * 4096, 64 * 1024)?;
/// assert_eq!(buf.as_u64() % (64 * 1024), 0);
/// memory::kernel::vfree(buf)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vmalloc_aligned(size: usize, align: usize) -> Result<VirtAddr, VmallocError> {
    vmalloc_with(size, align, VmFlags::NONE)
}

/// [`vmalloc`] with flags: [`VmFlags::ZERO`], [`VmFlags::NO_GUARD`] (no guard page),
/// [`VmFlags::END_ALIGNED`] (the object ends at its last page's end, so one byte past any
/// size traps).
///
/// # Errors
/// As [`vmalloc_aligned`].
/// # Example
/// ```no_run
/// use memory::vmalloc::VmFlags;
/// // A 100-byte object whose last byte is the last byte of its page: one byte past traps.
/// let obj = memory::kernel::vmalloc_with(100, 8, VmFlags::END_ALIGNED | VmFlags::ZERO)?;
/// memory::kernel::vfree(obj)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vmalloc_with(size: usize, align: usize, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
    match vm_here()? {
        (n, true) => match n.vmalloc_with(size, align, flags) {
            Err(e) if global_may_fit(e) => vm()?.vmalloc_with(size, align, flags),
            r => r,
        },
        (g, false) => g.vmalloc_with(size, align, flags),
    }
}

/// Frees an area from [`vmalloc`]: unmapped and its frames freed now; its virtual range is
/// reused after the next batched TLB flush. `vfree(VirtAddr::new(0))` (C's `vfree(NULL)`)
/// does nothing, as in Linux.
///
/// # Errors
/// [`VmallocError::NotAnArea`] for an address that is not the start of a live area (interior
/// pointers are refused), [`VmallocError::DoubleFree`]; nothing changes then.
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(4096)?;
/// memory::kernel::vfree(p)?;
/// assert_eq!(memory::kernel::vfree(p), Err(memory::vmalloc::VmallocError::DoubleFree));
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vfree(addr: VirtAddr) -> Result<(), VmallocError> {
    if addr.as_u64() == 0 {
        return Ok(());
    }
    if hal::irq::in_interrupt() {
        return vfree_atomic(addr);
    }
    vm_at(addr)?.vfree(addr)
}

/// Frees an area allocated with [`VmFlags::OWNED`] (a handle's area), which plain
/// [`vfree`] refuses.
///
/// # Errors
/// As [`vfree`].
///
/// # Safety
/// The caller owns the area and no reference into it outlives the call.
#[track_caller]
pub unsafe fn vfree_owned(addr: VirtAddr) -> Result<(), VmallocError> {
    // SAFETY: forwarded to our caller.
    unsafe { vm_at(addr)?.vfree_owned(addr) }
}

/// Resizes an area, keeping its contents (in place when possible).
///
/// # Errors
/// As [`vmalloc`] and [`vfree`]; on error the old area is untouched.
/// # Example
/// ```no_run
/// let p = memory::kernel::vzalloc(4096)?;
/// let p = memory::kernel::vrealloc(p, 4 * 4096)?;   // grows, first page kept
/// memory::kernel::vfree(p)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn vrealloc(addr: VirtAddr, new_size: usize) -> Result<VirtAddr, VmallocError> {
    // In the instance that holds the area (a move stays inside it).
    vm_at(addr)?.vrealloc(addr, new_size)
}

/// Maps frames the caller owns contiguously (no frames are taken or freed by us).
///
/// # Errors
/// [`VmallocError::NotRam`] for a frame that is not RAM, or is the kernel image, reserved
/// memory or the device tree (checked by vmalloc itself for every path, this one and
/// `vmalloc_instance().vmap_with(..)` alike), or as [`vmalloc`].
///
/// # Safety
/// The frames must be the caller's (allocated to it, e.g. [`Frames`](crate::buddy::Frames),
/// not free in the buddy allocator nor another owner's) and stay so until the area is
/// unmapped: the area is a second way to reach them, and anyone else's use of them through
/// it, or theirs of the frames after they are freed, is a data race or a use after free.
/// The allocator checks what it can (RAM, not the image, reserved memory or the device
/// tree: [`VmallocError::NotRam`]), not who owns a frame.
///
/// Safe code cannot alias memory it does not own through vmap:
///
/// ```compile_fail,E0133
/// use memory::vmalloc::{Prot, VmFlags};
/// let dtb = hal::boot::boot_info().unwrap().platform.dtb.start();
/// let va = memory::kernel::vmap(&[dtb], Prot::ReadWrite, VmFlags::NONE)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
///
/// ```compile_fail,E0133
/// use memory::vmalloc::{Prot, VmFlags};
/// let vm = memory::kernel::vmalloc_instance().unwrap();
/// let va = vm.vmap_with(&[hal::PhysAddr::new(0x0800_0000)], Prot::ReadWrite, VmFlags::NONE)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
///
/// # Example
/// ```no_run
/// use memory::buddy::Frames;
/// use memory::vmalloc::{Prot, VmFlags};
/// // Two frames the driver owns, seen as one contiguous 8 KiB window.
/// let (a, b) = (Frames::alloc_zeroed(0).unwrap(), Frames::alloc_zeroed(0).unwrap());
/// // SAFETY: `a` and `b` are ours and outlive the mapping.
/// let va = unsafe { memory::kernel::vmap(&[a.phys(), b.phys()], Prot::ReadWrite, VmFlags::NONE) }?;
/// memory::kernel::vunmap(va)?;   // the frames stay ours: freed when `a` and `b` drop
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub unsafe fn vmap(frames: &[PhysAddr], prot: Prot, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
    // The RAM / image / reserved / DTB check is the backend's (`check_vmap_frames`), made
    // by vmalloc itself, so `vmalloc_instance().vmap_with(..)` cannot skip it either.
    // SAFETY: forwarded to our caller.
    unsafe { vm()?.vmap_with(frames, prot, flags) }
}

/// Unmaps a [`vmap`] area (the frames stay the caller's).
///
/// # Errors
/// As [`vfree`].
/// # Example
/// See [`vmap`].
#[track_caller]
pub fn vunmap(addr: VirtAddr) -> Result<(), VmallocError> {
    vm()?.vunmap(addr)
}

/// Maps a device's physical MMIO range with device attributes, allocating no frames. The
/// sub-page offset of `phys` is kept in the returned address.
///
/// # Errors
/// [`VmallocError::RamRange`] when any page of the range is RAM, [`VmallocError::ZeroSize`],
/// [`VmallocError::Overflow`], or as [`vmalloc`].
/// # Example
/// ```no_run
/// use memory::vmalloc::DeviceAttr;
/// // The PL011's flag register, 0x18 into its page: the offset is kept.
/// let fr = memory::kernel::ioremap_attr(hal::PhysAddr::new(0x0900_0018), 4, DeviceAttr::DeviceNGnRE)?;
/// // SAFETY: a mapped device register, read as the device expects (32-bit, volatile).
/// let flags = unsafe { fr.as_ptr::<u32>().read_volatile() };
/// memory::kernel::iounmap(fr)?;
/// # let _ = flags;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
/// Drivers usually prefer [`crate::ioremap::IoMem`], which unmaps on drop and hands out
/// typed register blocks.
#[track_caller]
pub fn ioremap_attr(phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, VmallocError> {
    vm()?.ioremap(phys, size, attr)
}

/// Undoes an ioremap.
///
/// # Errors
/// As [`vfree`].
/// # Example
/// See [`ioremap_attr`].
#[track_caller]
pub fn iounmap(addr: VirtAddr) -> Result<(), VmallocError> {
    vm()?.iounmap(addr)
}

pub use crate::snapshot::{MemDiff, MemSnapshot};

mod deferred;
mod mappable;
mod nodes;
mod vm_map_ram;
pub use vm_map_ram::{vm_map_ram, vm_map_ram_region, vm_unmap_ram, vmap_block_stats};

/// A snapshot of the whole memory system (free frames, slab objects, vmalloc areas, parked
/// areas, quarantined frames, page-table pages, spare records): [`MemSnapshot::take`]. For a
/// leak check take [`MemSnapshot::settled`] before and call [`MemSnapshot::check_no_leak`]
/// after.
/// # Example
/// ```no_run
/// let s = memory::kernel::snapshot();
/// log::info!("{} vmalloc areas, {} quarantined frames", s.vmalloc_areas, s.quarantined_frames);
/// ```
pub fn snapshot() -> MemSnapshot {
    MemSnapshot::take()
}

/// Flushes the TLB for every parked range and returns them to free space now.
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(4096)?;
/// memory::kernel::vfree(p)?;          // parked: no TLB flush yet
/// memory::kernel::purge();            // one flush, the range is free again
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn purge() {
    purge_with(LockedVmalloc::purge);
}

/// [`purge`], but keeping the empty page tables the parked ranges met, as an automatic
/// purge does ([`Vmalloc::purge_keeping_tables`]); vm_map_ram's blocks and their tables go
/// as with [`purge`].
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(4096)?;
/// memory::kernel::vfree(p)?;
/// memory::kernel::purge_keeping_tables();  // the range is free again; its table stays
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn purge_keeping_tables() {
    purge_with(LockedVmalloc::purge_keeping_tables);
}

/// Deferred frees, then `how` on the kernel instance and every node, then vm_map_ram's.
fn purge_with(how: fn(&LockedVmalloc<KernelBackend>)) {
    if let Ok(v) = vm() {
        // What handlers queued on any CPU (one that went off, one that made no call since).
        for cpu in 0..hal::dtb::MAX_CPUS {
            complete_deferred(cpu, v);
        }
        how(v);
        for n in nodes::all() {
            how(n);
        }
    }
    vm_map_ram::purge();
}

/// Frees `addr` later, from thread context (Linux's `vfree_atomic`): queued on this CPU's
/// ring and freed by its next vmalloc-family call, by the next [`purge`] on any CPU, or, if
/// this CPU is switched off first, by the CPU that switched it off. [`vfree`] called from an
/// interrupt handler does this. A bad address is found only then (logged, and counted in
/// [`deferred_vfree_stats`]).
///
/// # Errors
/// [`VmallocError::NotAnArea`] for an address outside the vmalloc window;
/// [`VmallocError::InInterrupt`] when this CPU's ring (256 addresses) is full. Nothing is
/// queued then.
/// # Example
/// ```no_run
/// fn on_interrupt(buf: hal::VirtAddr) {
///     // No vmalloc lock in a handler: queued, freed by this CPU's next vmalloc call.
///     memory::kernel::vfree(buf).unwrap();
/// }
/// ```
pub fn vfree_atomic(addr: VirtAddr) -> Result<(), VmallocError> {
    if addr.as_u64() == 0 {
        return Ok(());
    }
    if !is_vmalloc_addr(addr) {
        return Err(VmallocError::NotAnArea);
    }
    deferred::push(addr)
}

/// Deferred frees ([`vfree_atomic`]): how many wait on the CPUs' rings, how many were
/// completed, how many were refused when completed.
/// # Example
/// ```no_run
/// let (waiting, done, refused) = memory::kernel::deferred_vfree_stats();
/// log::info!("{waiting} deferred frees waiting, {done} done, {refused} refused");
/// ```
pub fn deferred_vfree_stats() -> (usize, u64, u64) {
    deferred::deferred_stats()
}

/// The live area holding `addr`, if any.
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(3 * 4096)?;
/// let area = memory::kernel::find_area(p.add(5000)).unwrap();
/// assert_eq!((area.addr, area.pages), (p, 3));
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn find_area(addr: VirtAddr) -> Option<AreaInfo> {
    vm_at(addr).ok()?.find_area(addr)
}

/// The physical address behind a vmalloc address (walks the tables).
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(4096)?;
/// let pa = memory::kernel::vmalloc_to_phys(p).expect("mapped");
/// # let _ = pa;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn vmalloc_to_phys(addr: VirtAddr) -> Option<PhysAddr> {
    vm_at(addr).ok()?.vmalloc_to_phys(addr)
}

/// Whether `addr` is inside the vmalloc/ioremap window.
/// # Example
/// ```no_run
/// let p = memory::kernel::vmalloc(4096)?;
/// assert!(memory::kernel::is_vmalloc_addr(p));
/// assert!(!memory::kernel::is_vmalloc_addr(hal::VirtAddr::new(0x4000_0000)));
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn is_vmalloc_addr(addr: VirtAddr) -> bool {
    (VMALLOC_START..VMALLOC_END).contains(&addr.as_u64())
}

/// Translation-table pages of the upper half (vmalloc, ioremap and scratch windows), the
/// root included. A purge gives back those its ranges left empty, at every level (a failed
/// allocation gives back its own at once), so after a purge the buddy's free count plus
/// this number is back at its baseline, and this number too once no area is live that was
/// not before.
/// # Example
/// ```no_run
/// let before = memory::buddy::stats().unwrap().free_pages + memory::kernel::vmalloc_table_pages();
/// memory::kernel::vfree(memory::kernel::vmalloc(1 << 20)?)?;
/// memory::kernel::purge();
/// assert_eq!(memory::buddy::stats().unwrap().free_pages + memory::kernel::vmalloc_table_pages(), before);
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn vmalloc_table_pages() -> usize {
    hal::kmap::kernel_space().map_or(0, |k| k.lock().upper().table_pages())
}

/// vmalloc's counters.
/// # Example
/// ```no_run
/// let s = memory::kernel::vmalloc_stats().unwrap();
/// log::info!("{} areas, {} parked pages, {} purges", s.live_areas, s.parked_pages, s.purges);
/// ```
pub fn vmalloc_stats() -> Option<VmallocStats> {
    let mut s = vm().ok()?.stats();
    for n in nodes::all() {
        s.merge(&n.stats());
    }
    Some(s)
}

/// The global vmalloc instance and every CPU's node (see `kernel/nodes.rs`), the global one
/// first: for whoever settles or inspects all of them (a snapshot's settle, the bench).
/// # Example
/// ```no_run
/// for v in memory::kernel::vmalloc_instances() {
///     log::info!("{:?}: {} areas", v.range(), v.stats().live_areas);
/// }
/// ```
pub fn vmalloc_instances() -> impl Iterator<Item = &'static LockedVmalloc<KernelBackend>> {
    VMALLOC.get().into_iter().chain(nodes::all())
}

/// Writes `/proc/vmallocinfo`. The vmalloc lock is held while `out` is written to: `out`
/// may allocate from the slab (a `String`), but must not call vmalloc.
///
/// # Errors
/// A formatter error from `out`.
/// # Example
/// ```no_run
/// memory::kernel::write_vmallocinfo(&mut hal::console::Console)?;
/// # Ok::<(), core::fmt::Error>(())
/// ```
pub fn write_vmallocinfo(out: &mut dyn fmt::Write) -> fmt::Result {
    let Ok(v) = vm() else { return Ok(()) };
    let Some((lo, hi)) = nodes::span() else {
        return write!(out, "{}", v.lock().info());
    };
    // Live areas in address order: the global instance's below the nodes, each node's,
    // the global instance's above; then every instance's parked ranges.
    v.lock().write_busy(out, 0, lo, true)?;
    for n in nodes::all() {
        n.lock().write_busy(out, 0, u64::MAX, false)?;
    }
    v.lock().write_busy(out, hi, u64::MAX, true)?;
    v.lock().write_parked(out)?;
    for n in nodes::all() {
        n.lock().write_parked(out)?;
    }
    Ok(())
}

/// Draws the used part of the vmalloc window, one character per chunk of `cols` equal
/// chunks: `#` mapped vmalloc/vmap pages, `i` ioremap, `g` guard page, `p` parked (freed,
/// awaiting the purge), `.` free. The picture spans from `VMALLOC_START` to the end of the
/// highest area.
///
/// # Errors
/// A formatter error from `out`.
/// # Example
/// ```no_run
/// memory::kernel::write_vmalloc_map(&mut hal::console::Console, 64)?;
/// # Ok::<(), core::fmt::Error>(())
/// ```
pub fn write_vmalloc_map(out: &mut dyn fmt::Write, cols: usize) -> fmt::Result {
    const MAX_COLS: usize = 128;
    let Ok(v) = vm() else { return Ok(()) };
    let cols = cols.clamp(8, MAX_COLS);
    let vm = v.lock();
    let mut top = VMALLOC_START;
    vm.for_each_area(|a| top = top.max(a.end.as_u64()));
    vm.for_each_parked(|_, e| top = top.max(e.as_u64()));
    let span = (top - VMALLOC_START).max(PAGE_SIZE as u64);
    let chunk = span.div_ceil(cols as u64).next_multiple_of(PAGE_SIZE as u64);
    // Rank per column: the most telling thing in it wins.
    let mut rank = [0u8; MAX_COLS];
    let mut paint = |s: u64, e: u64, r: u8| {
        if e <= s {
            return;
        }
        let first = ((s - VMALLOC_START) / chunk) as usize;
        let last = ((e - 1 - VMALLOC_START) / chunk) as usize;
        for c in rank.iter_mut().take(last.min(cols - 1) + 1).skip(first) {
            *c = (*c).max(r);
        }
    };
    vm.for_each_parked(|s, e| paint(s.as_u64(), e.as_u64(), 2));
    vm.for_each_area(|a| {
        let mapped_end = a.start.as_u64() + (a.pages * PAGE_SIZE) as u64;
        paint(mapped_end, a.end.as_u64(), 1);
        let r = if a.kind == crate::vmalloc::AreaKind::Ioremap { 4 } else { 3 };
        paint(a.start.as_u64(), mapped_end, r);
    });
    drop(vm);
    writeln!(
        out,
        "  {:#x} .. {:#x}, {} KiB per character:",
        VMALLOC_START,
        VMALLOC_START + chunk * cols as u64,
        chunk >> 10
    )?;
    out.write_str("  [")?;
    for &r in &rank[..cols] {
        out.write_char(match r {
            0 => '.',
            1 => 'g',
            2 => 'p',
            3 => '#',
            _ => 'i',
        })?;
    }
    writeln!(out, "]")?;
    writeln!(out, "  # vmalloc/vmap pages  i ioremap  g guard page  p parked (awaiting purge)  . free")
}

/// Largest size [`kvmalloc`] serves from the slab; larger requests go to vmalloc.
pub const KVMALLOC_SLAB_MAX: usize = slab::KMALLOC_MAX_CACHE_SIZE;

/// Allocates `size` bytes: from the slab when small (physically contiguous), else from
/// vmalloc. Free with [`kvfree`], which sends the pointer to the right allocator.
///
/// # Errors
/// [`VmallocError::ZeroSize`], or the error of the allocator that served it.
/// # Example
/// ```no_run
/// let small = memory::kernel::kvmalloc(256)?;        // slab
/// let large = memory::kernel::kvmalloc(1 << 20)?;    // vmalloc
/// // SAFETY: both came from kvmalloc and are not used after.
/// unsafe {
///     memory::kernel::kvfree(small)?;
///     memory::kernel::kvfree(large)?;
/// }
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn kvmalloc(size: usize) -> Result<NonNull<u8>, VmallocError> {
    kvmalloc_gfp(size, GFP_KERNEL)
}

/// [`kvmalloc`] with allocation flags: the slab with `gfp` first (when it carries no zone
/// modifier: slab memory comes from any zone), else [`__vmalloc`] with `gfp`.
/// `__GFP_ZERO` zeroes either.
///
/// # Errors
/// As [`kvmalloc`].
/// # Example
/// ```no_run
/// let p = memory::kernel::kvmalloc_gfp(1 << 20, memory::gfp::GFP_KERNEL | memory::gfp::__GFP_ZERO)?;
/// // SAFETY: from kvmalloc_gfp, not used after.
/// unsafe { memory::kernel::kvfree(p) }?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub fn kvmalloc_gfp(size: usize, gfp: Gfp) -> Result<NonNull<u8>, VmallocError> {
    if size == 0 {
        return Err(VmallocError::ZeroSize);
    }
    if size <= KVMALLOC_SLAB_MAX && gfp.zone() == ZONE_NORMAL {
        if let Ok(p) = slab::kmalloc_gfp(size, 8, gfp) {
            return Ok(p);
        }
    }
    let va = __vmalloc(size, gfp)?;
    NonNull::new(va.as_mut_ptr()).ok_or(VmallocError::NotAnArea)
}

/// Frees memory from [`kvmalloc`]. `None` (C's `kvfree(NULL)`) does nothing, as in Linux.
///
/// # Errors
/// [`VmallocError::DoubleFree`] for memory already freed (by either allocator),
/// [`VmallocError::NotAnArea`] when the pointer belongs to neither allocator.
///
/// # Safety
/// `ptr` came from [`kvmalloc`] and is not used afterwards.
/// # Example
/// See [`kvmalloc`].
#[track_caller]
pub unsafe fn kvfree(ptr: impl Into<Option<NonNull<u8>>>) -> Result<(), VmallocError> {
    let Some(ptr) = ptr.into() else { return Ok(()) };
    let va = VirtAddr::from_ptr(ptr.as_ptr());
    if is_vmalloc_addr(va) {
        return vfree(va);
    }
    // SAFETY: forwarded: the pointer came from kvmalloc's slab branch.
    unsafe { slab::kfree(ptr) }.map_err(|e| match e {
        SlabError::DoubleFree => VmallocError::DoubleFree,
        _ => VmallocError::NotAnArea,
    })
}

/// An owned vmalloc area: `Deref` to its bytes, `vfree` on drop.
///
/// Not `Sync` (one core at a time; share it behind a lock):
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<memory::kernel::VBox>();
/// ```
pub struct VBox {
    ptr: NonNull<u8>,
    len: usize,
}

impl VBox {
    /// A zeroed area of `len` bytes.
    ///
    /// # Errors
    /// As [`vzalloc`].
    #[track_caller]
    pub fn zeroed(len: usize) -> Result<Self, VmallocError> {
        // OWNED: a plain `vfree` of this address is refused while the box lives.
        let va = vm()?.vmalloc_with(len, PAGE_SIZE, VmFlags::ZERO | VmFlags::OWNED)?;
        let ptr = NonNull::new(va.as_mut_ptr()).ok_or(VmallocError::NotAnArea)?;
        Ok(Self { ptr, len })
    }

    /// The area's address.
    pub fn addr(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.ptr.as_ptr())
    }
}

impl Deref for VBox {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes are mapped, zero-initialised and owned by this box.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for VBox {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for VBox {
    fn drop(&mut self) {
        // SAFETY: the box owns the area (allocated OWNED) and `&mut self` in drop means no
        // borrow of its bytes is alive.
        let r = vm().and_then(|v| unsafe { v.vfree_owned(self.addr()) });
        if let Err(e) = r {
            log::error!("VBox drop: vfree({:#x}): {e}", self.addr());
        }
    }
}

// SAFETY: the box owns its area exclusively (marked OWNED: no plain `vfree` can pull it),
// mapped in the kernel's TTBR1 tables, which every core uses, so the pointer is valid on
// any core; its bytes are reached only through `&self`/`&mut self`, and the `vfree` on
// drop goes through vmalloc's lock. Not `Sync` (the raw pointer): one core at a time.
unsafe impl Send for VBox {}
