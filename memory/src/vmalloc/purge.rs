//! The lazy purge: one batched TLB flush for every parked range, the page tables the
//! flushed ranges left empty given back in the same batch (or kept a cycle: `kept.rs`),
//! the quarantine drained, and the ranges returned to their pools or the free tree.

use super::kept::Age;
use super::*;

/// Why a purge runs: what it keeps of the page tables and of the pools.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Purge {
    /// The parked pages passed `lazy_max_pages`: keeps the tables where the next
    /// allocations go, and pools what it flushed.
    Lazy,
    /// An allocation found no hole: keeps those tables and what the last purge kept (as
    /// slots allow: it purges for address space, not memory), gives every pooled range back.
    NoHole,
    /// [`Vmalloc::purge`]: keeps no table and no pooled range.
    Explicit,
}

impl<B: VmBackend> Vmalloc<B> {
    /// Flush `pages` from `va` now (failure paths, shrink, strict mode).
    pub(super) fn flush_now(&mut self, va: u64, pages: usize) {
        let range = [(VirtAddr::new(va), pages)];
        let flush = self.count_flush(&range);
        self.flush_reclaim_spans(flush, &[]);
    }

    /// [`Self::flush_now`] for `pages` from `va`, and in the same batch give back the page
    /// tables of the window that map nothing and meet `[lo, hi)` (see
    /// [`VmBackend::flush_and_free_tables`]): failure paths, strict mode, a shrink.
    pub(super) fn flush_reclaim(&mut self, va: u64, pages: usize, lo: u64, hi: u64) {
        let range = [(VirtAddr::new(va), pages)];
        let flush = self.count_flush(&range);
        let span = VirtRange::from_bounds(VirtAddr::new(lo), VirtAddr::new(hi)).ok();
        self.flush_reclaim_spans(flush, span.as_slice());
    }

    /// The flush of one range: by page up to `flush_page_threshold` pages, else all;
    /// counted.
    fn count_flush<'a>(&mut self, range: &'a [(VirtAddr, usize); 1]) -> TlbFlush<'a> {
        let pages = range[0].1;
        if pages == 0 {
            TlbFlush::None
        } else if pages <= self.config.flush_page_threshold {
            self.c.tlb_page_ops += pages as u64;
            self.c.tlb_page_batches += 1;
            TlbFlush::Pages(range)
        } else {
            self.c.tlb_full += 1;
            TlbFlush::All
        }
    }

    /// Issue `flush` and give back the empty tables meeting `spans` in one backend call
    /// (`spans` ignored with [`VmallocConfig::keep_tables`]).
    pub(super) fn flush_reclaim_spans(&mut self, flush: TlbFlush<'_>, spans: &[VirtRange]) {
        let window = VirtRange::new(VirtAddr::new(self.start), self.end - self.start);
        match window {
            Ok(window) if !spans.is_empty() && !self.config.keep_tables => {
                self.c.tables_freed += self.backend.flush_and_free_tables(flush, spans, window) as u64;
            }
            _ => match flush {
                TlbFlush::None => {}
                TlbFlush::Pages(r) => self.backend.tlb_flush_pages(r),
                TlbFlush::All => self.backend.tlb_flush_all(),
            },
        }
    }

    /// The ranges of the parked list from `head` (sorted by descending start), rounded out
    /// to 2 MiB (a last-level table's span) and joined where they meet, into `spans`; past
    /// its capacity the last one grows to cover the rest. Returns how many.
    pub(super) fn table_spans(&self, head: NodePtr, spans: &mut [VirtRange]) -> usize {
        if self.config.keep_tables {
            return 0;
        }
        let block = BLOCK_SIZE as u64;
        let mut n = 0usize;
        let mut hull: Option<(u64, u64)> = None;
        let mut cur = Some(head);
        while let Some(p) = cur {
            let nd = p.get();
            cur = nd.next.get();
            let lo = (nd.start.get() & !(block - 1)).max(self.start);
            let hi = nd.end.get().div_ceil(block).saturating_mul(block).min(self.end);
            hull = match hull {
                Some((l, h)) if hi >= l => Some((lo.min(l), h.max(hi))),
                Some((l, h)) if n + 1 < spans.len() => {
                    if let Ok(r) = VirtRange::from_bounds(VirtAddr::new(l), VirtAddr::new(h)) {
                        spans[n] = r;
                        n += 1;
                    }
                    Some((lo, hi))
                }
                // Out of slots: the last span covers everything below, unless that would
                // take in a reserved area (another instance's window, vm_map_ram's
                // region), whose tables are not ours to free: then this range's tables
                // wait for a later purge.
                Some((l, h)) if !self.crosses_reserved(lo.min(l), h.max(hi)) => Some((lo.min(l), h.max(hi))),
                Some((l, h)) => Some((l, h)),
                None => Some((lo, hi)),
            };
        }
        if let Some((l, h)) = hull {
            if let Ok(r) = VirtRange::from_bounds(VirtAddr::new(l), VirtAddr::new(h)) {
                spans[n] = r;
                n += 1;
            }
        }
        n
    }

    /// Whether `[lo, hi)` meets an area set aside with [`Self::reserve`].
    pub(super) fn crosses_reserved(&self, lo: u64, hi: u64) -> bool {
        self.reserved.iter().flatten().any(|&(s, e)| s < hi && lo < e)
    }

    /// Flush the TLB for every parked range (once) and return the ranges to free space.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(4096)?;
    /// vm.vfree(p)?;
    /// vm.purge();                                          // one TLB flush; the range is reusable
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn purge(&mut self) {
        self.purge_with(Purge::Explicit);
    }

    /// [`Self::purge`], but as an automatic purge treats the page tables: the empty ones
    /// the parked ranges met stay, as far as [`Self::kept_tables`]'s slots allow (what does
    /// not fit is given back), for the next automatic purge to age. Every parked range is
    /// flushed and back in free space, and no range is pooled, as with [`Self::purge`].
    ///
    /// For whoever must see the window settled without making a steady workload build its
    /// tables anew (the bench between the repeats of a case: Linux's test never purges
    /// there, and a lazy cycle would have kept them); [`Self::purge`] gives them back.
    ///
    /// # Example
    /// ```
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(4096)?;
    /// vm.vfree(p)?;
    /// vm.purge_keeping_tables();                           // flushed; its table stays
    /// assert_eq!(vm.stats().parked_areas, 0);
    /// assert_eq!(vm.kept_tables().len(), 1);
    /// vm.purge();                                          // and now the table goes too
    /// assert!(vm.kept_tables().is_empty());
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn purge_keeping_tables(&mut self) {
        self.purge_with(Purge::NoHole);
    }

    /// The spans whose empty page tables the last automatic purge kept: those the ranges it
    /// flushed met, which a steady workload maps again in the next lazy cycle (giving them
    /// back only for the next allocations to make them anew costs every cycle). The next
    /// automatic purge gives back those it then finds empty and does not meet again;
    /// [`Self::purge`] keeps none (`kept.rs`).
    pub fn kept_tables(&self) -> &[VirtRange] {
        self.kept.spans()
    }

    /// [`Self::purge`]; an automatic one (the lazy threshold, or an allocation that found
    /// no hole) keeps the empty tables its ranges met ([`Self::kept_tables`]). Each gives
    /// the pooled ranges no one took back first; one at the lazy threshold then pools what
    /// it flushed.
    pub(super) fn purge_with(&mut self, why: Purge) {
        let full = why == Purge::Explicit;
        self.unpool_all();
        let Some(head) = self.parked_head.take() else {
            // Nothing parked: a full purge still gives back what an automatic one kept.
            if full && !self.kept.spans().is_empty() {
                let mut spans = [NO_SPAN; OUT_SPANS];
                let n = self.kept.age(&[], Age::All, &mut spans);
                self.flush_reclaim_spans(TlbFlush::None, &spans[..n]);
            }
            // The pools given back may have left records spare.
            self.trim_spares();
            return;
        };
        let t0 = self.backend.now_ns();
        // Sorted first (highest first: see below), so that the ranges whose page tables may
        // now be empty come out joined: one backend call flushes the parked pages and gives
        // those tables back in the same batch.
        let Some(head) = sort_desc(head) else { return };
        let mut met = [NO_SPAN; RECLAIM_SPANS];
        let nmet = self.table_spans(head, &mut met);
        let mut spans = [NO_SPAN; OUT_SPANS];
        let how = match why {
            Purge::Lazy => Age::Cycle,
            Purge::NoHole => Age::Hold,
            Purge::Explicit => Age::All,
        };
        let nspans = self.kept.age(&met[..nmet], how, &mut spans);
        let mapped = self.c.parked_mapped;
        if mapped > 0 && mapped <= self.config.flush_page_threshold {
            let mut ranges = [(VirtAddr::new(0), 0usize); MAX_FLUSH_PAGE_THRESHOLD];
            let mut n = 0;
            let mut cur = Some(head);
            while let Some(p) = cur {
                let pn = p.get();
                if pn.pages.get() > 0 {
                    if let Some(slot) = ranges.get_mut(n) {
                        *slot = (VirtAddr::new(pn.start.get()), pn.pages.get());
                        n += 1;
                    }
                }
                cur = pn.next.get();
            }
            self.flush_reclaim_spans(TlbFlush::Pages(&ranges[..n]), &spans[..nspans]);
            self.c.tlb_page_ops += mapped as u64;
            self.c.tlb_page_batches += 1;
        } else if mapped > 0 {
            self.flush_reclaim_spans(TlbFlush::All, &spans[..nspans]);
            self.c.tlb_full += 1;
        } else {
            self.flush_reclaim_spans(TlbFlush::None, &spans[..nspans]);
        }
        // The flush killed every stale TLB entry of the parked ranges: the quarantined
        // frames can be checked and freed.
        if self.q.head != 0 {
            self.drain_quarantine(Some(head));
        }
        // Ranges of pooled sizes go to their pools (only at the lazy threshold: an
        // allocation that found no hole needs them in the free tree, and an explicit purge
        // leaves the window as the free tree alone describes it); the others return highest
        // first, joining neighbours before touching the free tree. In that order a range
        // below the lowest hole goes in without a descent (see `FreeSpace::give_back`): the
        // common case after allocations walked up the holes.
        let pool = self.config.pools && why == Purge::Lazy;
        let mut acc: Option<NodePtr> = None;
        let mut cur = Some(head);
        while let Some(n) = cur {
            let nd = n.get();
            cur = nd.next.get();
            nd.next.set(None);
            if pool && self.pools.push(n) {
                continue;
            }
            match acc {
                None => acc = Some(n),
                Some(a) => {
                    let an = a.get();
                    if nd.end.get() == an.start.get() {
                        an.start.set(nd.start.get());
                        self.free.pool.push(n);
                    } else if nd.start.get() == an.end.get() {
                        an.end.set(nd.end.get());
                        self.free.pool.push(n);
                    } else {
                        self.free.give_back(a);
                        acc = Some(n);
                    }
                }
            }
        }
        if let Some(a) = acc {
            self.free.give_back(a);
        }
        // The records the purge released, kept for the next cycle, which parks as many again:
        // at most `lazy_max_pages` (every parked area holds a page at least), so the
        // steady state holds no more than one cycle already held (with two workers, 8,192
        // records a cycle, past a fixed cap of 4,096 half went back to slab each purge).
        self.spare_keep = self.config.spare_high.max(self.c.parked_areas.min(self.config.lazy_max_pages));
        self.c.parked_areas = 0;
        self.c.parked_pages = 0;
        self.c.parked_mapped = 0;
        self.c.purges += 1;
        let dt = self.backend.now_ns().saturating_sub(t0);
        self.purge_hist.record(dt);
        self.trim_spares();
    }

    // ----- vrealloc -----
}

/// Two lists linked through `next`, each sorted by descending `start`, merged into one.
fn merge_desc(mut a: Link, mut b: Link) -> Link {
    let mut head: Link = None;
    let mut tail: Link = None;
    loop {
        let take = match (a, b) {
            (Some(x), Some(y)) => {
                if x.get().start.get() >= y.get().start.get() {
                    a = x.get().next.get();
                    x
                } else {
                    b = y.get().next.get();
                    y
                }
            }
            (rest, None) | (None, rest) => {
                match tail {
                    Some(t) => t.get().next.set(rest),
                    None => head = rest,
                }
                return head;
            }
        };
        match tail {
            Some(t) => t.get().next.set(Some(take)),
            None => head = Some(take),
        }
        tail = Some(take);
    }
}

/// Sort a list linked through `next` by descending `start`, without allocating: O(n) when
/// it already is (frees in ascending address order park that way), else a bottom-up merge
/// sort, O(n log n).
fn sort_desc(head: NodePtr) -> Link {
    let mut sorted = true;
    let mut cur = head;
    while let Some(n) = cur.get().next.get() {
        if n.get().start.get() > cur.get().start.get() {
            sorted = false;
            break;
        }
        cur = n;
    }
    if sorted {
        return Some(head);
    }
    // bins[i] holds a sorted run of 2^i records (or nothing).
    let mut bins: [Link; 64] = [None; 64];
    let mut cur = Some(head);
    while let Some(n) = cur {
        cur = n.get().next.get();
        n.get().next.set(None);
        let mut carry = Some(n);
        for bin in bins.iter_mut() {
            match bin.take() {
                Some(b) => carry = merge_desc(Some(b), carry),
                None => {
                    *bin = carry;
                    break;
                }
            }
        }
    }
    bins.iter().fold(None, |acc, &b| merge_desc(b, acc))
}
