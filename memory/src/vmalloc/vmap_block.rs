//! `vm_map_ram`'s per-CPU blocks, after Linux's `vmap_block`: small mappings carved from
//! the calling CPU's block without the vmalloc lock or its trees.
//!
//! A region of the vmalloc window is set aside once ([`super::Vmalloc::reserve`]) and cut
//! into blocks of [`VMAP_BLOCK_PAGES`] pages (4 MiB, Linux's `VMAP_BBMAP_BITS`). Each CPU
//! owns at most one block at a time and carves mappings of up to [`VMAP_MAX_ALLOC`] pages
//! from it with a bump cursor, in pieces rounded up to a power of two, as Linux's
//! `vb_alloc`. A block's life:
//!
//! ```text
//!   clean ──(a CPU takes it)──▶ current ──(full, or the CPU needs room)──▶ retired
//!     ▲                                                                      │
//!     └──(one TLB flush for every dirty block)── dirty ◀──(its last piece unmapped)
//! ```
//!
//! `vm_unmap_ram` from any CPU clears its piece's PTEs at once, without TLB maintenance,
//! and adds the piece's pages to the block's `freed` count (the owning CPU counts its own
//! frees in its cursor instead, without an atomic, and adds them when it retires the
//! block); the tail a CPU leaves unused when it retires a block is added the same way. The count reaches [`VMAP_BLOCK_PAGES`]
//! exactly once per cycle, after the retirement, and whoever brings it there puts the block
//! on the dirty list. A freed piece is never handed out again before that: its block
//! is reused only once it is clean, and it becomes clean only through a flush of the TLB
//! ([`VmapBlocks::purge`], or a CPU that finds no clean block), so no stale translation of
//! a piece can reach its next owner.
//!
//! The calling CPU's cursor is a [`hal::smp::PerCpu`] slot: an interrupt handler that
//! finds it in use, a request above [`VMAP_MAX_ALLOC`] pages or a region with no clean
//! block left gets `Ok(None)`, and the caller maps through the vmalloc tree instead (as
//! Linux does above `VMAP_MAX_ALLOC`). The lock of the clean and dirty lists
//! (`VMAP_BLOCKS`) is taken once per block, not per call; it is IRQ-safe, since
//! [`VmapBlocks::retire_local`] may run in an interrupt handler (a purge asks every CPU
//! to retire its block with an `on_each_cpu` call).
//!
//! Deviation from Linux: the region is reserved at start-up and sized once
//! ([`crate::kernel::MemoryConfig`]'s `vmap_blocks`), where Linux allocates each block's
//! address range from the vmalloc tree on demand and frees it lazily; with 128 TiB of
//! window, a fixed region costs nothing and makes finding a piece's block an index.

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use hal::smp::PerCpu;
use hal::sync::IrqSpinLock;
use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};

use super::{MapError, Prot, VmallocError};

/// Pages in one block (Linux's `VMAP_BBMAP_BITS` at its cap).
pub const VMAP_BLOCK_PAGES: usize = 1024;
/// Bytes in one block (4 MiB); blocks are aligned to it.
pub const VMAP_BLOCK_SIZE: usize = VMAP_BLOCK_PAGES * PAGE_SIZE;
/// The largest mapping carved from a block, in pages (Linux's `VMAP_MAX_ALLOC`); larger
/// ones go through the vmalloc tree.
pub const VMAP_MAX_ALLOC: usize = 64;

const NO_BLOCK: u32 = u32::MAX;

/// The page tables `vm_map_ram`'s blocks map into, reached from any CPU at once (the
/// implementation takes its own table lock).
pub trait RamMapper: Sync {
    /// Maps `frames` at consecutive pages from `va` as normal memory with `prot`.
    ///
    /// # Errors
    /// A [`MapError`]; then none of the pages of this call stay mapped.
    ///
    /// # Safety
    /// The pages are inside the region, unmapped, and their TLB entries invalidated since
    /// they were last unmapped; the caller owns `frames` for as long as they stay mapped.
    unsafe fn map(&self, va: VirtAddr, frames: &[PhysAddr], prot: Prot) -> Result<(), MapError>;

    /// Clears the PTEs of `pages` pages from `va`, with no TLB maintenance.
    ///
    /// # Safety
    /// The pages were mapped by [`Self::map`] for one piece, and nothing the program still
    /// uses lives in them.
    unsafe fn unmap(&self, va: VirtAddr, pages: usize);

    /// Invalidates every kernel TLB entry (one broadcast, one barrier pair).
    fn flush_all(&self);

    /// Gives back the page tables inside `spans` that map nothing (with the walk-cache
    /// invalidation freeing a table needs); returns how many. The default frees none.
    ///
    /// # Safety
    /// No page of `spans` is mapped, every page's TLB entries were invalidated since it was
    /// last unmapped, and no call of [`Self::map`] or [`Self::unmap`] into `spans` runs
    /// until this returns (their blocks are clean, and the caller holds the lock one needs
    /// to take a clean block).
    unsafe fn free_tables(&self, spans: &[VirtRange]) -> usize {
        let _ = spans;
        0
    }

    /// Whether caller-owned `frames` may be mapped as normal memory (as
    /// [`super::VmBackend::check_vmap_frames`]). The default accepts every frame.
    ///
    /// # Errors
    /// [`VmallocError::NotRam`] for the first frame that may not be mapped.
    fn check_frames(&self, frames: &[PhysAddr]) -> Result<(), VmallocError> {
        let _ = frames;
        Ok(())
    }
}

/// One block's shared state: what any CPU may touch.
struct Block {
    /// Pages given back this cycle by other CPUs than the owner, and at retirement the
    /// owner's own count and the tail it left (rounded piece sizes throughout).
    /// [`VMAP_BLOCK_PAGES`] means dirty: nothing of it is in use.
    freed: AtomicU32,
    /// Pages mapped by the piece that starts at page `i`; 0 where none starts. Set by the
    /// owner when it maps the piece, taken back to 0 by the one `unmap` that wins it.
    pages: [AtomicU8; VMAP_BLOCK_PAGES],
}

impl Block {
    const fn new() -> Self {
        Self { freed: AtomicU32::new(0), pages: [const { AtomicU8::new(0) }; VMAP_BLOCK_PAGES] }
    }
}

/// A CPU's current block, its bump cursor, and what it unmapped of the block itself
/// (counted here, without an atomic, until it retires the block).
struct Cursor {
    block: u32,
    next: u32,
    own_freed: u32,
    maps: u64,
    /// This CPU unmapped a piece (of any block) since it last reported to
    /// [`VmapBlocks::unflushed`] in [`VmapBlocks::retire_local`].
    unmapped: bool,
}

struct Lists {
    /// Blocks ready to be taken, the lowest last (taken first).
    clean: Vec<u32>,
    /// Blocks with every page given back, waiting for a flush.
    dirty: Vec<u32>,
}

/// Counters of [`VmapBlocks`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmapBlockStats {
    /// Blocks in the region.
    pub blocks: usize,
    /// Blocks ready to be taken.
    pub clean: usize,
    /// Blocks waiting for a flush.
    pub dirty: usize,
    /// Pieces mapped now.
    pub mapped: usize,
    /// Mappings carved from blocks since start, by the calling CPU.
    pub maps_here: u64,
    /// Calls that went to the vmalloc tree instead (busy slot, too large, no block).
    pub fallbacks: u64,
    /// TLB flushes that made dirty blocks clean.
    pub flushes: u64,
}

/// `vm_map_ram`'s blocks over one reserved region (see the [module docs](self)).
pub struct VmapBlocks<M: RamMapper> {
    mapper: M,
    region: VirtRange,
    blocks: Box<[Block]>,
    cpus: PerCpu<Cursor>,
    lists: IrqSpinLock<Lists>,
    /// Some piece was unmapped, and reported (by [`Self::retire_local`], or by an `unmap`
    /// that found its CPU's state busy), since the last purge's flush: that purge must
    /// flush even if no block is dirty, for the stale entries of the pieces freed in
    /// blocks still in use. With nothing unmapped a purge issues no flush (as Linux's
    /// `vm_unmap_aliases`, which flushes only what it found dirty): an empty `tlbi
    /// vmalle1is` at every `kernel::purge` would cost every core its TLB.
    unflushed: AtomicBool,
    fallbacks: AtomicU64,
    flushes: AtomicU64,
}

impl<M: RamMapper> VmapBlocks<M> {
    /// Blocks over `region` (aligned to [`VMAP_BLOCK_SIZE`], a whole number of blocks),
    /// mapped through `mapper`. `region` must be address space no one else maps (a
    /// [`super::Vmalloc::reserve`] area).
    ///
    /// # Errors
    /// [`VmallocError::BadRange`] for a region that is not whole aligned blocks,
    /// [`VmallocError::NoRecords`] when the heap cannot hold the blocks' state.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{vmap_block::{RamMapper, VmapBlocks, VMAP_BLOCK_SIZE}, MapError, Prot};
    /// # struct Tables;
    /// # impl RamMapper for Tables {
    /// #     unsafe fn map(&self, _: hal::VirtAddr, _: &[hal::PhysAddr], _: Prot) -> Result<(), MapError> { Ok(()) }
    /// #     unsafe fn unmap(&self, _: hal::VirtAddr, _: usize) {}
    /// #     fn flush_all(&self) {}
    /// # }
    /// let region = hal::VirtRange::new(hal::VirtAddr::new(0xffff_0000_0000_0000), 4 * VMAP_BLOCK_SIZE as u64).unwrap();
    /// let blocks = VmapBlocks::new(Tables, region)?;
    /// let frame = [hal::PhysAddr::new(0x4800_0000)];
    /// // SAFETY: the frame is the example's own and outlives the mapping.
    /// let va = unsafe { blocks.map(&frame, Prot::ReadWrite) }?.expect("a block was free");
    /// blocks.unmap(va, 1)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn new(mapper: M, region: VirtRange) -> Result<Self, VmallocError> {
        let size = VMAP_BLOCK_SIZE as u64;
        if !region.start().as_u64().is_multiple_of(size) || !region.size().is_multiple_of(size) {
            return Err(VmallocError::BadRange);
        }
        let n = usize::try_from(region.size() / size).map_err(|_| VmallocError::BadRange)?;
        if n == 0 || n >= NO_BLOCK as usize {
            return Err(VmallocError::BadRange);
        }
        let mut blocks = Vec::new();
        let mut clean = Vec::new();
        let mut dirty = Vec::new();
        if blocks.try_reserve_exact(n).is_err()
            || clean.try_reserve_exact(n).is_err()
            || dirty.try_reserve_exact(n).is_err()
        {
            return Err(VmallocError::NoRecords);
        }
        blocks.extend((0..n).map(|_| Block::new()));
        clean.extend((0..n as u32).rev());
        Ok(Self {
            mapper,
            region,
            blocks: blocks.into_boxed_slice(),
            cpus: PerCpu::new(|_| Cursor { block: NO_BLOCK, next: 0, own_freed: 0, maps: 0, unmapped: false }),
            lists: IrqSpinLock::new(&hal::sync::classes::VMAP_BLOCKS, Lists { clean, dirty }),
            unflushed: AtomicBool::new(false),
            fallbacks: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    /// The region the blocks cover.
    pub fn region(&self) -> VirtRange {
        self.region
    }

    /// Whether `va` lies in the blocks' region.
    pub fn contains(&self, va: VirtAddr) -> bool {
        self.region.contains(va)
    }

    /// Maps `frames` at consecutive pages of a piece of this CPU's block; `Ok(None)` when
    /// the caller must map them elsewhere: more than [`VMAP_MAX_ALLOC`] pages, this CPU's
    /// cursor in use further up the stack (an interrupt handler), or no clean or dirty
    /// block left.
    ///
    /// # Errors
    /// [`VmallocError::ZeroSize`], [`VmallocError::Misaligned`], the mapper's frame check
    /// ([`VmallocError::NotRam`]) and [`VmallocError::MapFailed`]; nothing stays mapped
    /// then (a piece whose mapping failed is given back dirty, to be flushed as any other).
    ///
    /// # Safety
    /// The caller owns `frames` while they stay mapped, and unmaps them with
    /// [`Self::unmap`] before giving them to anyone else.
    #[inline]
    pub unsafe fn map(&self, frames: &[PhysAddr], prot: Prot) -> Result<Option<VirtAddr>, VmallocError> {
        let n = frames.len();
        if n == 0 {
            return Err(VmallocError::ZeroSize);
        }
        if n > VMAP_MAX_ALLOC {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        if frames.iter().any(|f| !f.is_page_aligned()) {
            return Err(VmallocError::Misaligned);
        }
        self.mapper.check_frames(frames)?;
        let size = n.next_power_of_two();
        let Some(Some((block, off))) = self.cpus.try_with(|c| self.carve(c, size)) else {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let va = self.piece_addr(block, off);
        // SAFETY: the piece was carved for this call alone; its pages were never mapped
        // since its block was last made clean, which took a TLB flush after every unmap
        // of the cycle before (module docs). The caller owns `frames`.
        if let Err(e) = unsafe { self.mapper.map(va, frames, prot) } {
            self.give_back(block, size);
            return Err(VmallocError::MapFailed(e));
        }
        // Release: the piece is published only once mapped (a CPU that unmaps it sees the
        // mapping's PTE stores before its own clears).
        self.blocks[block].pages[off].store(n as u8, Ordering::Release);
        Ok(Some(va))
    }

    /// Unmaps the `count` pages [`Self::map`] mapped at `va`, from any CPU. The PTEs are
    /// cleared now; the TLB entries go with the next flush of the block, before the piece
    /// can be handed out again.
    ///
    /// # Errors
    /// [`VmallocError::NotAnArea`] when no mapping of `count` pages starts at `va` in the
    /// region (never mapped, unmapped already, an interior address or another count);
    /// [`VmallocError::ZeroSize`] for a count of 0. Nothing changes then.
    #[inline]
    pub fn unmap(&self, va: VirtAddr, count: usize) -> Result<(), VmallocError> {
        if count == 0 {
            return Err(VmallocError::ZeroSize);
        }
        if !self.contains(va) || !va.is_page_aligned() || count > VMAP_MAX_ALLOC {
            return Err(VmallocError::NotAnArea);
        }
        let page = ((va.as_u64() - self.region.start().as_u64()) / PAGE_SIZE as u64) as usize;
        let (block, off) = (page / VMAP_BLOCK_PAGES, page % VMAP_BLOCK_PAGES);
        // One compare-exchange both checks the piece (it starts here and has `count`
        // pages) and wins it, so a racing second unmap finds 0. Acquire: pairs with
        // `map`'s release.
        if self.blocks[block].pages[off].compare_exchange(count as u8, 0, Ordering::Acquire, Ordering::Relaxed).is_err()
        {
            return Err(VmallocError::NotAnArea);
        }
        // SAFETY: this call alone took the piece's mark: the pages were mapped by `map` for
        // this piece with `count` pages. Unmapping is safe as `vunmap` is: a caller that
        // unmaps a piece someone still uses makes that use fault; no frame is freed here
        // (the frames stay the mapper's caller's).
        unsafe { self.mapper.unmap(va, count) };
        let size = count.next_power_of_two() as u32;
        // The owner counts its own block's frees without an atomic, until it retires it.
        let own = self.cpus.try_with(|c| {
            c.unmapped = true;
            let mine = c.block as usize == block;
            if mine {
                c.own_freed += size;
            }
            mine
        });
        if own.is_none() {
            // No per-CPU state to note it in: reported at once. Release: the PTE clears
            // above happen before the purge that reads it (Acquire) flushes.
            self.unflushed.store(true, Ordering::Release);
        }
        if own != Some(true) {
            self.give_back(block, size as usize);
        }
        Ok(())
    }

    /// Gives this CPU's current block up (its unused tail counts as given back), so that
    /// once its pieces are unmapped a flush makes it clean: before a CPU goes off, and by
    /// [`Self::purge`].
    pub fn retire_local(&self) {
        let done = self.cpus.try_with(|c| {
            self.retire(c);
            core::mem::take(&mut c.unmapped)
        });
        // Unmapped here since the last report, or state busy (cannot tell): the next
        // purge flushes. Release: this CPU's PTE clears happen before that flush.
        if done != Some(false) {
            self.unflushed.store(true, Ordering::Release);
        }
    }

    /// Makes the next [`Self::purge`] flush whatever it finds: for a caller that could not
    /// have every CPU [`Self::retire_local`] first (an interrupt handler), so it cannot
    /// know what the others unmapped.
    pub fn flush_at_next_purge(&self) {
        self.unflushed.store(true, Ordering::Release);
    }

    /// Retires this CPU's block, flushes the TLB once for every dirty block and makes them
    /// clean, and gives back the page tables of the clean blocks (Linux's
    /// `vm_unmap_aliases`, plus the tables). Returns the table pages freed. Other CPUs'
    /// current blocks stay theirs (call [`Self::retire_local`] on each first, or
    /// [`Self::flush_at_next_purge`]). The flush is skipped when nothing was unmapped
    /// since the last one: no block dirty, no unmap reported.
    pub fn purge(&self) -> usize {
        self.retire_local();
        // Room to hold the clean blocks while their tables go (allocated before any lock).
        let mut held: Vec<u32> = Vec::new();
        let room = held.try_reserve_exact(self.blocks.len()).is_ok();
        {
            let mut l = self.lists.lock();
            // Acquire: pairs with the reports' Release (PTE clears before the flush).
            if self.unflushed.swap(false, Ordering::Acquire) || !l.dirty.is_empty() {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                self.mapper.flush_all();
                Self::make_clean(&self.blocks, &mut l);
            }
            if !room {
                // Out of memory: flushed, the tables stay.
                return 0;
            }
            // The clean blocks leave the list, so no CPU takes one while its tables go;
            // the list lock is released before the tables' lock is taken (a CPU holding
            // the tables' lock may take an interrupt that retires a block under this one).
            core::mem::swap(&mut held, &mut l.clean);
        }
        // The clean blocks' runs of addresses, in batches of `SPANS`.
        const SPANS: usize = 16;
        let (mut spans, mut n, mut freed) = ([self.region; SPANS], 0, 0);
        let mut run: Option<(u32, u32)> = None;
        for &b in held.iter().rev().chain([NO_BLOCK].iter()) {
            match run {
                Some((first, last)) if b != NO_BLOCK && b == last + 1 => run = Some((first, b)),
                _ => {
                    if let Some(span) = run.and_then(|(first, last)| self.blocks_span(first, last)) {
                        spans[n] = span;
                        n += 1;
                        if n == SPANS {
                            // SAFETY: clean blocks: nothing mapped, all flushed just now, and
                            // none can be taken: they are off the list until below.
                            freed += unsafe { self.mapper.free_tables(&spans) };
                            n = 0;
                        }
                    }
                    run = (b != NO_BLOCK).then_some((b, b));
                }
            }
        }
        if n > 0 {
            // SAFETY: as above.
            freed += unsafe { self.mapper.free_tables(&spans[..n]) };
        }
        {
            let mut l = self.lists.lock();
            // `l.clean` holds what became clean meanwhile; together they fit its capacity
            // (every block is on at most one list).
            let mut back = core::mem::take(&mut l.clean);
            core::mem::swap(&mut l.clean, &mut held);
            l.clean.append(&mut back);
            l.clean.sort_unstable_by(|a, b| b.cmp(a));
            held = back;
        }
        // Freed after the lock (an empty vector, or the spare one).
        drop(held);
        freed
    }

    /// The addresses of blocks `first..=last` (`None` cannot happen for blocks of the
    /// region; never the whole region in its place, which holds blocks in use).
    fn blocks_span(&self, first: u32, last: u32) -> Option<VirtRange> {
        let start = self.piece_addr(first as usize, 0);
        let size = u64::from(last - first + 1) * VMAP_BLOCK_SIZE as u64;
        VirtRange::new(start, size).ok()
    }

    /// The blocks' counters.
    pub fn stats(&self) -> VmapBlockStats {
        let (clean, dirty) = {
            let l = self.lists.lock();
            (l.clean.len(), l.dirty.len())
        };
        let mapped = self.blocks.iter().flat_map(|b| b.pages.iter()).filter(|p| p.load(Ordering::Relaxed) != 0).count();
        let maps_here = self.cpus.try_with(|c| c.maps).unwrap_or(0);
        VmapBlockStats {
            blocks: self.blocks.len(),
            clean,
            dirty,
            mapped,
            maps_here,
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }

    /// Counts a call the caller mapped elsewhere for its own reasons (an interrupt).
    pub fn count_fallback(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    fn piece_addr(&self, block: usize, off: usize) -> VirtAddr {
        VirtAddr::new(self.region.start().as_u64() + ((block * VMAP_BLOCK_PAGES + off) * PAGE_SIZE) as u64)
    }

    /// A piece of `size` pages (a power of two) from this CPU's block, taking a clean
    /// block when the current one has no room; `None` when there is none.
    #[inline]
    fn carve(&self, c: &mut Cursor, size: usize) -> Option<(usize, usize)> {
        if c.block == NO_BLOCK || c.next as usize + size > VMAP_BLOCK_PAGES {
            self.retire(c);
            c.block = self.take_clean()?;
            c.next = 0;
        }
        let (block, off) = (c.block as usize, c.next as usize);
        c.next += size as u32;
        c.maps += 1;
        if c.next as usize == VMAP_BLOCK_PAGES {
            // Full: retired now, so that `freed` can only reach a whole block after this.
            self.retire(c);
        }
        Some((block, off))
    }

    fn retire(&self, c: &mut Cursor) {
        if c.block == NO_BLOCK {
            return;
        }
        let (block, tail) = (c.block as usize, VMAP_BLOCK_PAGES - c.next as usize);
        let own = c.own_freed as usize;
        c.block = NO_BLOCK;
        c.next = 0;
        c.own_freed = 0;
        self.give_back(block, tail + own);
    }

    /// Adds `pages` to the block's given-back count; the call that completes it puts the
    /// block on the dirty list.
    fn give_back(&self, block: usize, pages: usize) {
        // AcqRel: the PTE clears before every earlier give-back happen before the flush
        // that the last one leads to.
        let was = self.blocks[block].freed.fetch_add(pages as u32, Ordering::AcqRel) as usize;
        if was + pages == VMAP_BLOCK_PAGES {
            self.lists.lock().dirty.push(block as u32);
        }
    }

    /// A clean block, flushing the dirty ones first when there is none.
    fn take_clean(&self) -> Option<u32> {
        let mut l = self.lists.lock();
        if l.clean.is_empty() && !l.dirty.is_empty() {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.mapper.flush_all();
            Self::make_clean(&self.blocks, &mut l);
        }
        l.clean.pop()
    }

    /// After a flush: every dirty block is clean (lowest taken first).
    fn make_clean(blocks: &[Block], l: &mut Lists) {
        if l.dirty.is_empty() {
            return;
        }
        while let Some(b) = l.dirty.pop() {
            // Relaxed: the list lock orders this before the block's next taker.
            blocks[b as usize].freed.store(0, Ordering::Relaxed);
            l.clean.push(b);
        }
        l.clean.sort_unstable_by(|a, b| b.cmp(a));
    }
}

#[cfg(test)]
mod tests;
