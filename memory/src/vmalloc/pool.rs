//! Ready-made areas, after the pools of Linux 6.9's `vmap_node`: aligned ranges a purge
//! has just flushed are kept by size instead of going back into the free tree, and the next
//! aligned allocation of that size takes one without a search, a clip or a merge.
//!
//! ```text
//!   vfree ──▶ parked ──purge (flush)──▶ pool[size] ──vmalloc(size, align)──▶ live
//!                                          │
//!                                          └──next purge: what no one took──▶ free tree
//! ```
//!
//! - Only ranges of up to [`POOL_MAX_PAGES`] pages (guard included, Linux's
//!   `MAX_VA_SIZE_PAGES`) whose areas were aligned beyond a page and at most
//!   [`POOL_MAX_ALIGN`] (64 KiB) are pooled, and only such requests look in the pools. Those are what the free tree serves
//!   worst: each aligned clip leaves a hole below the area that no later request of that
//!   alignment fits, so the tree fills with holes to step over and merge back (measured in
//!   one boot, pools on against off, 12 pairs: `fix_align_alloc_test` 0.70×). Page-aligned
//!   requests find their hole at the bottom of the tree at once, and pooling their ranges
//!   scattered the next allocations over the window (more page-table misses:
//!   `random_size_alloc_test` 1.19× with every size pooled), so they stay with the tree.
//!   An area aligned beyond 64 KiB spans that much of the window by itself; pooling those
//!   too held stretches the next cycle would have reused (`random_size_align_alloc_test`
//!   1.11–1.12× with them, 1.01–1.03× without, two boots each).
//!   Each size has its own list. A purge adds its ranges highest first, so each list
//!   starts with its lowest range.
//! - A pooled range is flushed: it entered the pool only after the purge's TLB flush, so
//!   handing it out again is as safe as handing out a hole.
//! - An allocation takes the first range of its exact size when that range's start has
//!   the alignment asked for; otherwise it searches the free tree as before (Linux's
//!   `node_pool_del_va`).
//! - Every purge first gives back to the free tree whatever the lazy cycle before it did
//!   not take from the pools, so the pools hold at most one purge's ranges. (Linux's
//!   `decay_va_pool_node` gives back a quarter per purge; keeping more than one cycle's
//!   ranges out of the tree made `random_size_align_alloc_test` 1.3× slower here.) A purge
//!   for an allocation that found no hole, and an explicit [`super::Vmalloc::purge`], pool
//!   nothing.
//!
//! What this changes against a pure lowest-fit allocator: an allocation served from a pool
//! may sit above a lower hole. Strict mode ([`super::VmallocConfig::strict`]) parks
//! nothing, so it never pools and stays lowest fit; [`super::VmallocConfig::pools`] turns
//! the pools off.

use super::node::{Link, NodePtr, State};

/// The largest range pooled, in pages, guard page included (Linux's `MAX_VA_SIZE_PAGES`).
pub const POOL_MAX_PAGES: usize = 256;

const PAGE: u64 = hal::PAGE_SIZE as u64;

/// The largest alignment whose areas are pooled (64 KiB: twice arm64's `THREAD_ALIGN`, what
/// `fix_align_alloc_test` asks for). An area aligned further spans that much of the window
/// by itself; pooling such ranges kept stretches out of the tree that the next cycle's
/// other allocations would have reused.
pub const POOL_MAX_ALIGN: u64 = 64 << 10;

/// Pools of flushed ranges, one list per size in pages.
pub(crate) struct ReadyPools {
    heads: [Link; POOL_MAX_PAGES],
    /// Ranges in all pools.
    ranges: usize,
    /// Pages in all pools.
    pages: usize,
}

impl ReadyPools {
    pub(crate) const fn new() -> Self {
        Self { heads: [None; POOL_MAX_PAGES], ranges: 0, pages: 0 }
    }

    /// The pool of ranges of `bytes` bytes, if pooled.
    #[inline(always)]
    fn class(bytes: u64) -> Option<usize> {
        let pages = bytes / PAGE;
        (pages >= 1 && pages <= POOL_MAX_PAGES as u64).then(|| pages as usize - 1)
    }

    /// Ranges pooled.
    pub(crate) fn ranges(&self) -> usize {
        self.ranges
    }

    /// Pages pooled (guard pages included).
    pub(crate) fn pages(&self) -> usize {
        self.pages
    }

    /// Pools `node` (a flushed range off every tree and list); false, leaving it to the
    /// caller, when its size is not pooled or its area's alignment is not.
    pub(crate) fn push(&mut self, node: NodePtr) -> bool {
        let nd = node.get();
        let shift = u32::from(nd.align_shift.get());
        if shift <= PAGE.trailing_zeros() || shift > POOL_MAX_ALIGN.trailing_zeros() {
            return false;
        }
        let Some(c) = Self::class(nd.size()) else { return false };
        nd.state.set(State::Pooled);
        nd.next.set(self.heads[c]);
        self.heads[c] = Some(node);
        self.ranges += 1;
        self.pages += c + 1;
        true
    }

    /// The first pooled range of exactly `bytes` bytes, if its start is `align`-aligned;
    /// taken off its pool (its state is the caller's to set).
    #[inline]
    pub(crate) fn take(&mut self, bytes: u64, align: u64) -> Option<NodePtr> {
        if align <= PAGE || align > POOL_MAX_ALIGN {
            return None;
        }
        let c = Self::class(bytes)?;
        let node = self.heads[c]?;
        let nd = node.get();
        if nd.start.get() & (align - 1) != 0 {
            return None;
        }
        self.heads[c] = nd.next.get();
        nd.next.set(None);
        self.ranges -= 1;
        self.pages -= c + 1;
        Some(node)
    }

    /// Empties every pool, handing each range to `give_back` (a purge, or pools turned
    /// off).
    pub(crate) fn drain(&mut self, mut give_back: impl FnMut(NodePtr)) {
        if self.ranges == 0 {
            return;
        }
        for c in 0..POOL_MAX_PAGES {
            while let Some(node) = self.heads[c] {
                self.heads[c] = node.get().next.get();
                node.get().next.set(None);
                give_back(node);
            }
        }
        self.ranges = 0;
        self.pages = 0;
    }

    /// Every pooled range, for checks and teardown (the lists stay as they are).
    pub(crate) fn iter(&self) -> impl Iterator<Item = NodePtr> + '_ {
        self.heads.iter().flat_map(|&h| {
            let mut cur = h;
            core::iter::from_fn(move || {
                let n = cur?;
                cur = n.get().next.get();
                Some(n)
            })
        })
    }

    /// Empties every pool without touching the records (teardown: the caller frees them
    /// after reading them with [`Self::iter`]).
    pub(crate) fn forget(&mut self) {
        *self = Self::new();
    }
}
