//! The kernel's `vm_map_ram` / `vm_unmap_ram`: per-CPU blocks
//! ([`crate::vmalloc::vmap_block`]) in a region of the vmalloc window set aside at start-up,
//! mapped in the kernel's TTBR1 tables; mappings above
//! [`VMAP_MAX_ALLOC`](crate::vmalloc::vmap_block::VMAP_MAX_ALLOC) pages, and calls that find no block, go through the vmalloc tree
//! as `vmap` without a guard page (as Linux's).

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, Ordering};

use hal::dtb::MAX_CPUS;
use hal::mmu::table::ENTRIES;
use hal::mmu::{Attributes, HardwareTlb, LeafFlush, LeafTable, Tlb};
use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use spin::Once;

use super::{map_err, mappable_ram, KernelBackend};
use crate::buddy::GlobalTableAlloc;
use crate::vmalloc::vmap_block::{RamMapper, VmapBlockStats, VmapBlocks, VMAP_BLOCK_PAGES};
use crate::vmalloc::{LockedVmalloc, MapError, Prot, VmFlags, VmallocError};

/// Blocks set aside by default: 8 per possible CPU (32 MiB of address space each, 256 MiB
/// in all; Linux's 6.12 keeps as many as its CPUs fill, in the same 4 MiB blocks).
pub const DEFAULT_BLOCKS: usize = 8 * MAX_CPUS;
/// The most blocks `vmalloc.vmap_blocks` may ask for (64 GiB of address space).
pub const MAX_BLOCKS: usize = 16 * 1024;

/// The kernel's tables as `vm_map_ram`'s blocks reach them: each 2 MiB of the region has
/// its last-level table found (or made) once, under the kernel-table lock, and kept as a
/// [`LeafTable`] handle; a map or unmap is then PTE stores through the handle, with no lock
/// and no walk. A handle goes only with its table, which goes only at a purge and only for
/// clean blocks (`free_tables`), which no CPU maps into meanwhile.
struct KernelTables {
    region: VirtRange,
    /// Per 2 MiB of the region: its table's entries once made (null: none yet).
    leaves: Box<[AtomicPtr<u64>]>,
}

/// What one last-level table translates.
const LEAF_SPAN: u64 = 2 << 20;

/// The stretches of `pages` pages from `va` that one last-level table each holds: the
/// stretch's first address, its first entry in that table, and its pages' indices.
fn pieces(va: VirtAddr, pages: usize) -> impl Iterator<Item = (u64, usize, core::ops::Range<usize>)> {
    let mut done = 0;
    core::iter::from_fn(move || {
        (done < pages).then(|| {
            let at = va.as_u64() + (done * PAGE_SIZE) as u64;
            let first = ((at % LEAF_SPAN) / PAGE_SIZE as u64) as usize;
            let n = (ENTRIES - first).min(pages - done);
            done += n;
            (at, first, done - n..done)
        })
    })
}

impl KernelTables {
    fn new(region: VirtRange) -> Result<Self, VmallocError> {
        let n = usize::try_from(region.size() / LEAF_SPAN).map_err(|_| VmallocError::BadRange)?;
        let mut leaves = Vec::new();
        leaves.try_reserve_exact(n).map_err(|_| VmallocError::NoRecords)?;
        leaves.extend((0..n).map(|_| AtomicPtr::new(ptr::null_mut())));
        Ok(Self { region, leaves: leaves.into_boxed_slice() })
    }

    /// The kept handle of the table of the 2 MiB holding `va` (in the region), if any.
    #[inline]
    fn cached(&self, va: u64) -> Option<LeafTable> {
        let i = ((va - self.region.start().as_u64()) / LEAF_SPAN) as usize;
        let p = NonNull::new(self.leaves[i].load(Ordering::Acquire))?;
        // SAFETY: stored by `leaf` from a handle of the table of this 2 MiB, which stays in
        // the tree until `free_tables` resets the slot.
        Some(unsafe { LeafTable::from_raw(p, VirtAddr::new(va & !(LEAF_SPAN - 1))) })
    }

    /// The table of the 2 MiB holding `va` (in the region), made if missing. Inline: under
    /// TCG the return of a call is an indirect-branch lookup, and every map asks.
    #[inline(always)]
    fn leaf(&self, va: u64) -> Result<LeafTable, MapError> {
        match self.cached(va) {
            Some(l) => Ok(l),
            None => self.make_leaf(va),
        }
    }

    /// [`Self::leaf`] when the 2 MiB has no kept handle yet: found or made under the
    /// kernel-table lock.
    #[cold]
    #[inline(never)]
    fn make_leaf(&self, va: u64) -> Result<LeafTable, MapError> {
        let i = ((va - self.region.start().as_u64()) / LEAF_SPAN) as usize;
        let base = VirtAddr::new(va & !(LEAF_SPAN - 1));
        let space = hal::kmap::kernel_space().ok_or(MapError::OutOfRange)?;
        // SAFETY: only the table of a 2 MiB of the region (vmalloc's, set aside for the
        // blocks) is made; no translation changes.
        let leaf = unsafe { space.lock().upper_mut().leaf_table(base, &mut GlobalTableAlloc) }.map_err(map_err)?;
        self.leaves[i].store(leaf.as_ptr().as_ptr(), Ordering::Release);
        Ok(leaf)
    }

    /// Runs `f` on each stretch of `pages` pages from `va` that one table holds, with the
    /// index of its first entry.
    fn each_leaf(
        &self,
        va: VirtAddr,
        pages: usize,
        mut f: impl FnMut(LeafTable, usize, core::ops::Range<usize>) -> Result<(), MapError>,
    ) -> Result<(), MapError> {
        for (at, first, part) in pieces(va, pages) {
            f(self.leaf(at)?, first, part)?;
        }
        Ok(())
    }
}

impl RamMapper for KernelTables {
    #[inline]
    unsafe fn map(&self, va: VirtAddr, frames: &[PhysAddr], prot: Prot) -> Result<(), MapError> {
        let attrs = match prot {
            Prot::ReadWrite => Attributes::DATA,
            Prot::ReadOnly => Attributes::RODATA,
        };
        let mut written = 0;
        let r = self.each_leaf(va, frames.len(), |leaf, first, part| {
            // SAFETY: forwarded from the caller: the piece's pages are unmapped and flushed
            // and ours alone; the table stays until a purge frees clean blocks' tables.
            unsafe { leaf.map_pages(first, &frames[part.clone()], attrs) }.map_err(map_err)?;
            written = part.end;
            Ok(())
        });
        if r.is_err() && written > 0 {
            // The parts mapped before a later one failed are cleared again (the piece goes
            // back dirty, flushed before reuse).
            // SAFETY: only the pages this call wrote.
            unsafe { self.clear(va, written) };
        }
        r
    }

    #[inline]
    unsafe fn unmap(&self, va: VirtAddr, pages: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { self.clear(va, pages) };
    }

    fn flush_all(&self) {
        HardwareTlb.invalidate_all();
    }

    unsafe fn free_tables(&self, spans: &[VirtRange]) -> usize {
        let Some(space) = hal::kmap::kernel_space() else { return 0 };
        let mut space = space.lock();
        for s in spans {
            let first = ((s.start().as_u64() - self.region.start().as_u64()) / LEAF_SPAN) as usize;
            for slot in &self.leaves[first..first + (s.size() / LEAF_SPAN) as usize] {
                slot.store(ptr::null_mut(), Ordering::Relaxed);
            }
        }
        // SAFETY: the spans' pages are unmapped and flushed and no one maps there meanwhile
        // (the caller's promise), so only empty tables go, with their walk-cache
        // invalidation, under the lock every other edit of the tree takes; the tables came
        // from `GlobalTableAlloc`, and `HardwareTlb` broadcasts to every core.
        match unsafe {
            space.upper_mut().flush_and_free_empty_tables(
                LeafFlush::None,
                spans,
                self.region,
                &HardwareTlb,
                &mut GlobalTableAlloc,
            )
        } {
            Ok(n) => n,
            Err(e) => {
                log::error!("vm_map_ram: freeing empty tables: {e}");
                0
            }
        }
    }

    #[inline]
    fn check_frames(&self, frames: &[PhysAddr]) -> Result<(), VmallocError> {
        mappable_ram(frames)
    }
}

impl KernelTables {
    /// Clears `pages` PTEs from `va` through the tables' handles (a 2 MiB without a table
    /// has nothing to clear).
    ///
    /// # Safety
    /// The pages are a piece's (or part of one) that the caller mapped and no one uses.
    #[inline]
    unsafe fn clear(&self, va: VirtAddr, pages: usize) {
        for (at, first, part) in pieces(va, pages) {
            if let Some(l) = self.cached(at) {
                // SAFETY: a kept handle (see `cached`); the entries are the caller's.
                unsafe { l.clear_pages(first, part.len()) };
            }
        }
    }
}

static BLOCKS: Once<VmapBlocks<KernelTables>> = Once::new();

/// Sets `blocks` blocks of the window aside (none for 0), from `kernel::init`.
pub(super) fn init(vm: &LockedVmalloc<KernelBackend>, blocks: usize) -> Result<(), VmallocError> {
    if blocks == 0 {
        return Ok(());
    }
    let pages = blocks * VMAP_BLOCK_PAGES;
    let start = vm.with_ready(|v| v.reserve(pages, VMAP_BLOCK_PAGES * PAGE_SIZE))??;
    let region = VirtRange::new(start, (pages * PAGE_SIZE) as u64).map_err(|_| VmallocError::BadRange)?;
    let b = VmapBlocks::new(KernelTables::new(region)?, region)?;
    BLOCKS.call_once(|| b);
    Ok(())
}

/// Maps `frames` at consecutive pages, without a guard page, as read-write normal memory;
/// returns the address (Linux's `vm_map_ram`). Up to [`VMAP_MAX_ALLOC`](crate::vmalloc::vmap_block::VMAP_MAX_ALLOC) pages come from
/// this CPU's block, without the vmalloc lock; larger mappings go through the vmalloc tree.
/// Unmap with [`vm_unmap_ram`] and the same count.
///
/// # Errors
/// [`VmallocError::InInterrupt`] from an interrupt handler (the page tables' lock is never
/// taken there), [`VmallocError::ZeroSize`], [`VmallocError::Misaligned`],
/// [`VmallocError::NotRam`] for a frame that is not free-standing RAM, and as
/// [`super::vmap`]; nothing stays mapped then.
///
/// # Safety
/// The caller owns `frames` for as long as they stay mapped, and unmaps them before
/// giving them to anyone else (as for [`super::vmap`]).
///
/// # Example
/// ```no_run
/// use memory::buddy::Frames;
/// let frame = Frames::alloc_zeroed(0).unwrap();
/// // SAFETY: the frame is ours and outlives the mapping.
/// let va = unsafe { memory::kernel::vm_map_ram(&[frame.phys()]) }?;
/// // SAFETY: one page was just mapped at `va`, and it is ours.
/// unsafe { va.as_mut_ptr::<u8>().write(1) };
/// memory::kernel::vm_unmap_ram(va, 1)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
#[track_caller]
pub unsafe fn vm_map_ram(frames: &[PhysAddr]) -> Result<VirtAddr, VmallocError> {
    if hal::irq::in_interrupt() {
        return Err(VmallocError::InInterrupt);
    }
    if let Some(b) = BLOCKS.get() {
        // SAFETY: forwarded to our caller.
        if let Some(va) = unsafe { b.map(frames, Prot::ReadWrite) }? {
            return Ok(va);
        }
    }
    // SAFETY: forwarded to our caller.
    unsafe { super::vmap(frames, Prot::ReadWrite, VmFlags::NO_GUARD) }
}

/// Unmaps the `count` pages [`vm_map_ram`] mapped at `addr` (Linux's `vm_unmap_ram`): the
/// PTEs go now, the TLB entries with the next batched flush, before the address is used
/// again.
///
/// # Errors
/// [`VmallocError::InInterrupt`] from an interrupt handler; [`VmallocError::NotAnArea`]
/// when no `vm_map_ram` mapping of `count` pages starts at `addr`, and as
/// [`super::vunmap`]; nothing changes then.
/// # Example
/// See [`vm_map_ram`].
#[track_caller]
pub fn vm_unmap_ram(addr: VirtAddr, count: usize) -> Result<(), VmallocError> {
    if hal::irq::in_interrupt() {
        return Err(VmallocError::InInterrupt);
    }
    if let Some(b) = BLOCKS.get().filter(|b| b.contains(addr)) {
        return b.unmap(addr, count);
    }
    if count == 0 {
        return Err(VmallocError::ZeroSize);
    }
    match super::find_area(addr) {
        Some(a) if a.addr == addr && a.pages == count && a.kind == crate::vmalloc::AreaKind::Vmap => {
            super::vunmap(addr)
        }
        _ => Err(VmallocError::NotAnArea),
    }
}

/// The blocks' counters (`None` with `vmalloc.vmap_blocks=0` or before `kernel::init`).
/// # Example
/// ```no_run
/// let s = memory::kernel::vmap_block_stats().unwrap();
/// log::info!("{} of {} vm_map_ram blocks clean, {} flushes", s.clean, s.blocks, s.flushes);
/// ```
pub fn vmap_block_stats() -> Option<VmapBlockStats> {
    BLOCKS.get().map(VmapBlocks::stats)
}

/// The region of the window set aside for the blocks (`None` with `vmalloc.vmap_blocks=0`
/// or before `kernel::init`): a [`vm_map_ram`] address inside it came from a block.
/// # Example
/// ```no_run
/// let frame = memory::buddy::Frames::alloc_zeroed(0).unwrap();
/// // SAFETY: the frame is ours and outlives the mapping.
/// let va = unsafe { memory::kernel::vm_map_ram(&[frame.phys()]) }?;
/// assert!(memory::kernel::vm_map_ram_region().is_some_and(|r| r.contains(va)));
/// memory::kernel::vm_unmap_ram(va, 1)?;
/// # Ok::<(), memory::vmalloc::VmallocError>(())
/// ```
pub fn vm_map_ram_region() -> Option<VirtRange> {
    BLOCKS.get().map(VmapBlocks::region)
}

/// Gives this CPU's block up (a CPU going off).
pub(super) fn retire_local() {
    if let Some(b) = BLOCKS.get() {
        b.retire_local();
    }
}

/// Every CPU gives its block up, then one flush makes every dirty block clean and the
/// region's empty page tables go back (`kernel::purge`).
pub(super) fn purge() {
    let Some(b) = BLOCKS.get() else { return };
    // The other CPUs retire their own (nothing to do where no interrupt controller runs
    // yet: then no other CPU maps).
    if hal::irq::in_interrupt() || hal::smp::on_each_cpu(&|| b.retire_local()).is_err() {
        // The others did not report what they unmapped: flush whatever is found.
        b.flush_at_next_purge();
    }
    b.purge();
}
