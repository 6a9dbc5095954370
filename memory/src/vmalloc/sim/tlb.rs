//! The simulator's TLBs, one per simulated CPU: which unmapped pages each may still hold.
//!
//! A page unmapped is stale in every CPU's TLB (any CPU may have cached it, speculatively
//! too) until a page TLBI or a full flush reaches that CPU. Each operation is O(1) in the
//! pages (a full flush too: it moves the CPU's flush mark, it visits no page); checking a
//! page looks at each CPU once. The simulator asks at every page it maps.

use super::super::alloc::boxed::Box;
use super::super::alloc::vec;
use core::ops::Range;

/// The TLBs of up to 8 simulated CPUs over a window's pages.
pub(super) struct SimTlbs {
    /// Per page: the sequence number of its last unmap (0: never unmapped).
    unmapped_at: Box<[u64]>,
    /// Per page: the CPUs (bit `c`) no page TLBI has reached since that unmap.
    held: Box<[u8]>,
    /// Per CPU: the sequence number at the last full flush that reached it.
    flushed: Box<[u64]>,
    /// The last unmap's sequence number.
    seq: u64,
}

impl SimTlbs {
    /// The most CPUs (one bit each in a page's `held`).
    pub(super) const MAX_CPUS: usize = 8;

    /// TLBs of `cpus` CPUs (1 to [`Self::MAX_CPUS`]) over `pages` pages, none stale.
    pub(super) fn new(pages: usize, cpus: usize) -> Self {
        let cpus = cpus.clamp(1, Self::MAX_CPUS);
        Self {
            unmapped_at: vec![0; pages].into_boxed_slice(),
            held: vec![0; pages].into_boxed_slice(),
            flushed: vec![0; cpus].into_boxed_slice(),
            seq: 0,
        }
    }

    /// Simulated CPUs.
    pub(super) fn cpus(&self) -> usize {
        self.flushed.len()
    }

    /// Page `i` was unmapped: stale in every CPU's TLB.
    pub(super) fn unmapped(&mut self, i: usize) {
        self.seq += 1;
        self.unmapped_at[i] = self.seq;
        self.held[i] = u8::MAX >> (Self::MAX_CPUS - self.cpus());
    }

    /// Whether page `i` is stale in any CPU's TLB.
    pub(super) fn stale_anywhere(&self, i: usize) -> bool {
        let (at, held) = (self.unmapped_at[i], self.held[i]);
        held != 0 && self.flushed.iter().enumerate().any(|(c, &flushed)| held & 1 << c != 0 && at > flushed)
    }

    /// Page `i` is mapped again: its old marks go (the caller counted a violation if it
    /// was stale).
    pub(super) fn mapped(&mut self, i: usize) {
        self.held[i] = 0;
    }

    /// A TLBI of page `i` reaching the CPUs `reach`.
    pub(super) fn invalidate_page(&mut self, i: usize, reach: Range<usize>) {
        for c in reach {
            self.held[i] &= !(1 << c);
        }
    }

    /// A full flush reaching the CPUs `reach`: nothing unmapped so far is stale there.
    pub(super) fn invalidate_all(&mut self, reach: Range<usize>) {
        for c in reach {
            self.flushed[c] = self.seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SimTlbs;

    #[test]
    fn a_page_is_stale_until_a_flush_reaches_every_cpu() {
        let mut t = SimTlbs::new(4, 3);
        assert!(!t.stale_anywhere(0));
        t.unmapped(0);
        t.unmapped(1);
        assert!(t.stale_anywhere(0) && t.stale_anywhere(1));
        // A page TLBI on CPU 1 only: still stale on 0 and 2.
        t.invalidate_page(0, 1..2);
        assert!(t.stale_anywhere(0));
        t.invalidate_page(0, 0..3);
        assert!(!t.stale_anywhere(0) && t.stale_anywhere(1));
        // A full flush on CPUs 0 and 1: page 1 still stale on CPU 2; unmapped after it,
        // page 2 is stale everywhere.
        t.invalidate_all(0..2);
        t.unmapped(2);
        assert!(t.stale_anywhere(1) && t.stale_anywhere(2));
        t.invalidate_all(2..3);
        assert!(!t.stale_anywhere(1) && t.stale_anywhere(2));
        t.invalidate_all(0..3);
        assert!(!t.stale_anywhere(2));
        // Mapped again: the marks go.
        t.unmapped(3);
        t.mapped(3);
        assert!(!t.stale_anywhere(3));
    }
}
