//! Which empty page tables an automatic purge keeps: those its own parked ranges met.
//!
//! A purge is where vmalloc gives page-table pages back (Linux keeps its kernel tables for
//! ever). But a steady workload maps the same stretches in every lazy cycle: giving their
//! last-level tables back at each purge only for the next cycle's allocations to take,
//! zero and link them again cost `random_size_align_alloc_test` about a tenth of its time
//! (its areas, aligned up to 2 MiB, meet some 230 stretches a cycle). So the tables age by
//! one cycle, as a second chance:
//!
//! ```text
//!  purge n   (automatic)  free: kept(n-1) - met(n)      keep: met(n)
//!  purge n+1 (automatic)  free: met(n) - met(n+1)       keep: met(n+1)
//!  no hole for an alloc   free: what does not fit       keep: met, then kept - met
//!  explicit purge, shrink free: kept ∪ met              keep: nothing
//! ```
//!
//! `met(n)` are the spans of the ranges purge `n` flushes, rounded out to 2 MiB (see
//! `Vmalloc::table_spans`). A table is freed only if it is empty when its turn comes, so a
//! table reused in the meantime stays; one left empty is given back by the next automatic
//! purge at the latest, or at once by an explicit one. What is kept is bounded by what one
//! lazy cycle maps, and the vmalloc shrinker frees all of it under pressure.

use hal::{VirtAddr, VirtRange};

use super::{NO_SPAN, RECLAIM_SPANS};

/// Spans one purge hands to the backend: this purge's and the last one's kept stretches.
pub(super) const OUT_SPANS: usize = 2 * RECLAIM_SPANS + 1;

/// How a purge ages the kept tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Age {
    /// The lazy threshold: frees what was kept and is not met again; keeps what it met.
    Cycle,
    /// An allocation found no hole: it purges for address space, not for memory, so it
    /// frees only what does not fit in the kept slots (met first, then the last kept).
    Hold,
    /// An explicit purge or a shrink: frees what was kept and what it met; keeps nothing.
    All,
}

/// The spans whose empty tables the last automatic purge kept, disjoint, at most
/// [`RECLAIM_SPANS`].
#[derive(Clone, Copy)]
pub(super) struct KeptTables {
    spans: [VirtRange; RECLAIM_SPANS],
    n: usize,
}

impl KeptTables {
    /// Nothing kept.
    pub(super) const fn new() -> Self {
        Self { spans: [NO_SPAN; RECLAIM_SPANS], n: 0 }
    }

    /// The kept spans.
    pub(super) fn spans(&self) -> &[VirtRange] {
        &self.spans[..self.n]
    }

    /// A purge's turn: `met` are the spans its flushed ranges met (disjoint). Returns, in
    /// `out`, the spans whose empty tables go now, and how many (see [`Age`]).
    pub(super) fn age(&mut self, met: &[VirtRange], how: Age, out: &mut [VirtRange; OUT_SPANS]) -> usize {
        let prev = *self;
        let mut n = 0;
        if how == Age::All {
            for &s in met.iter().chain(prev.spans()) {
                out[n] = s;
                n += 1;
            }
            self.n = 0;
            return n;
        }
        let mut gone = [NO_SPAN; OUT_SPANS];
        let mut ngone = 0;
        for &p in prev.spans() {
            ngone = subtract(p, met, &mut gone, ngone);
        }
        let keep = met.len().min(RECLAIM_SPANS);
        self.spans[..keep].copy_from_slice(&met[..keep]);
        self.n = keep;
        for &g in &gone[..ngone] {
            // A purge for space keeps what it can of the last kept ones too.
            if how == Age::Hold && self.n < RECLAIM_SPANS {
                self.spans[self.n] = g;
                self.n += 1;
            } else {
                out[n] = g;
                n += 1;
            }
        }
        // More spans than slots (never from `table_spans`, which joins the rest into its
        // last): the rest is not kept.
        for &s in &met[keep..] {
            if n < OUT_SPANS {
                out[n] = s;
                n += 1;
            }
        }
        n
    }
}

/// Append to `out[n..]` the parts of `p` that no span of `cut` (disjoint) covers; returns
/// the new count. A part that finds no slot is dropped: its tables wait for a later purge.
fn subtract(p: VirtRange, cut: &[VirtRange], out: &mut [VirtRange], mut n: usize) -> usize {
    let (mut lo, hi) = (p.start().as_u64(), p.end().as_u64());
    // The parts of `p` left of each cut, in address order.
    let mut cuts = [(0u64, 0u64); RECLAIM_SPANS + 1];
    let mut m = 0;
    for c in cut {
        let (a, b) = (c.start().as_u64(), c.end().as_u64());
        if a < hi && lo < b && m < cuts.len() {
            cuts[m] = (a, b);
            m += 1;
        }
    }
    cuts[..m].sort_unstable();
    let mut push = |a: u64, b: u64, n: &mut usize| {
        if let (Ok(r), Some(slot)) = (VirtRange::from_bounds(VirtAddr::new(a), VirtAddr::new(b)), out.get_mut(*n)) {
            *slot = r;
            *n += 1;
        }
    };
    for &(a, b) in &cuts[..m] {
        if a > lo {
            push(lo, a, &mut n);
        }
        lo = lo.max(b);
        if lo >= hi {
            return n;
        }
    }
    push(lo, hi, &mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = 2 << 20;
    const BASE: u64 = 0xffff_8000_0000_0000;

    fn span(a: u64, b: u64) -> VirtRange {
        VirtRange::from_bounds(VirtAddr::new(BASE + a * M2), VirtAddr::new(BASE + b * M2)).unwrap()
    }

    fn turn(k: &mut KeptTables, met: &[VirtRange], full: bool) -> Vec<VirtRange> {
        turn_as(k, met, if full { Age::All } else { Age::Cycle })
    }

    fn turn_as(k: &mut KeptTables, met: &[VirtRange], how: Age) -> Vec<VirtRange> {
        let mut out = [NO_SPAN; OUT_SPANS];
        let n = k.age(met, how, &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn a_table_met_again_stays_and_one_left_goes_a_purge_later() {
        let mut k = KeptTables::new();
        // First purge: nothing kept yet, so nothing goes; what it met is kept.
        assert_eq!(turn(&mut k, &[span(4, 8), span(0, 2)], false), vec![]);
        assert_eq!(k.spans(), &[span(4, 8), span(0, 2)]);
        // Second: 0..2 met again stays; 4..8 partly met: 5..6 stays, the rest goes.
        let free = turn(&mut k, &[span(5, 6), span(0, 2)], false);
        assert_eq!(free, vec![span(4, 5), span(6, 8)]);
        assert_eq!(k.spans(), &[span(5, 6), span(0, 2)]);
        // A full purge gives back both what it met and what was kept.
        let free = turn(&mut k, &[span(9, 10)], true);
        assert_eq!(free, vec![span(9, 10), span(5, 6), span(0, 2)]);
        assert!(k.spans().is_empty());
    }

    #[test]
    fn a_purge_for_space_frees_only_what_does_not_fit() {
        let mut k = KeptTables::new();
        assert_eq!(turn(&mut k, &[span(4, 8), span(0, 2)], false), vec![]);
        // Met (5, 6) and (20, 21): the rest of (4, 8) and all of (0, 2) stay too.
        assert_eq!(turn_as(&mut k, &[span(20, 21), span(5, 6)], Age::Hold), vec![]);
        assert_eq!(k.spans(), &[span(20, 21), span(5, 6), span(4, 5), span(6, 8), span(0, 2)]);
        // Full slots: what was kept beyond them goes.
        let met: Vec<_> = (0..RECLAIM_SPANS as u64 - 1).map(|i| span(100 + 2 * i, 101 + 2 * i)).collect();
        let free = turn_as(&mut k, &met, Age::Hold);
        assert_eq!(k.spans().len(), RECLAIM_SPANS);
        assert_eq!(&k.spans()[..met.len()], &met[..]);
        assert_eq!(k.spans()[met.len()], span(20, 21));
        assert_eq!(free, vec![span(5, 6), span(4, 5), span(6, 8), span(0, 2)]);
        // The next lazy cycle frees what it does not meet again.
        let free = turn(&mut k, &[span(20, 21)], false);
        assert_eq!(free, met);
        assert_eq!(k.spans(), &[span(20, 21)]);
    }

    #[test]
    fn subtracting_covers_every_overlap() {
        let mut out = [NO_SPAN; OUT_SPANS];
        // Cuts inside, across both ends, and covering it whole.
        let n = subtract(span(0, 10), &[span(8, 12), span(2, 3), span(5, 6)], &mut out, 0);
        assert_eq!(&out[..n], &[span(0, 2), span(3, 5), span(6, 8)]);
        let n = subtract(span(3, 5), &[span(0, 10)], &mut out, 0);
        assert_eq!(n, 0);
        let n = subtract(span(3, 5), &[span(7, 9)], &mut out, 0);
        assert_eq!(&out[..n], &[span(3, 5)]);
    }

    #[test]
    fn a_full_output_drops_parts_and_never_overflows() {
        let mut out = [NO_SPAN; OUT_SPANS];
        let cuts: Vec<VirtRange> = (0..RECLAIM_SPANS as u64).map(|i| span(2 * i + 1, 2 * i + 2)).collect();
        let n = subtract(span(0, 64), &cuts, &mut out, OUT_SPANS - 3);
        assert_eq!(n, OUT_SPANS);
    }
}
