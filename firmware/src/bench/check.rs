//! What the bench checks around each case: a snapshot of everything that must come back to
//! its baseline ([`Baseline`]), and a model of vmalloc's documented lazy-purge policy
//! ([`Model`]) that says which counters the workload implies.

use core::fmt;

use hal::println;
use memory::kernel;
use memory::slab::MAX_CACHES;
use memory::vmalloc::VmallocStats;

/// Gives back what the allocators keep for speed, so that two snapshots compare: parked
/// ranges (purge), spare area records beyond the configured floor (then tops the spares up
/// to exactly that floor, so the record count does not depend on history), and the empty
/// slab each cache keeps.
///
/// The caller accounts the purge in its [`Model`] first (see `Ctx::purge`).
pub fn settle() {
    memory::snapshot::settle();
}

/// FNV-1a over everything written, and the number of lines: compares vmallocinfo without
/// keeping a copy (no heap use between two snapshots).
struct Digest {
    hash: u64,
    lines: usize,
}

impl fmt::Write for Digest {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            if b == b'\n' {
                self.lines += 1;
            }
        }
        Ok(())
    }
}

/// Everything that must be back where it was after a case (taken after [`settle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Baseline {
    buddy_free: usize,
    tables: usize,
    slab_pages: usize,
    large_pages: usize,
    /// Objects in use per slab cache (slot order).
    objects: [usize; MAX_CACHES],
    info_hash: u64,
    info_lines: usize,
    live_areas: usize,
    mapped_pages: usize,
    owned_frames: usize,
    parked_areas: usize,
    free_holes: usize,
    largest_hole: u64,
    records: usize,
}

impl Baseline {
    /// The current state of buddy, slab, kept page tables and vmalloc.
    pub fn take() -> Self {
        let buddy_free = memory::buddy::stats().map_or(0, |s| s.free_pages);
        let (slab_pages, large_pages) = memory::slab::stats().map_or((0, 0), |s| (s.slab_pages, s.large_pages));
        let mut objects = [0; MAX_CACHES];
        if let Some(slab) = memory::slab::global() {
            for (slot, c) in objects.iter_mut().zip(slab.cache_stats()) {
                *slot = c.active_objs;
            }
        }
        let mut d = Digest { hash: 0xcbf2_9ce4_8422_2325, lines: 0 };
        let _ = kernel::write_vmallocinfo(&mut d);
        let v = kernel::vmalloc_stats().unwrap_or_default();
        Self {
            buddy_free,
            tables: kernel::vmalloc_table_pages(),
            slab_pages,
            large_pages,
            objects,
            info_hash: d.hash,
            info_lines: d.lines,
            live_areas: v.live_areas,
            mapped_pages: v.mapped_pages,
            owned_frames: v.owned_frames,
            parked_areas: v.parked_areas,
            free_holes: v.free_holes,
            largest_hole: v.largest_hole,
            records: v.records,
        }
    }

    /// Page-table pages created since `before` and not given back (a purge gives back those
    /// it left empty, so after a case this is 0: [`Self::matches`] checks it).
    pub fn tables_grown(&self, before: &Self) -> isize {
        self.tables as isize - before.tables as isize
    }

    /// Slab pages now less slab pages `before`. Not a leak by itself: the objects in use are
    /// compared exactly (see [`Self::matches`]), but which slabs vmalloc's spare records
    /// (kept by design, `VmallocConfig::spare_high`) and surviving tree records occupy
    /// depends on history, so the page count may differ by a few in either direction.
    pub fn slab_pages_moved(&self, before: &Self) -> isize {
        self.slab_pages as isize - before.slab_pages as isize
    }

    /// Prints every difference from `before` that is a leak; returns whether there is none:
    /// frames conserved (free + tables + slab), page-table pages back at their count (the
    /// case's tables given back by its purges), every slab cache's objects in use, the
    /// vmallocinfo text, and vmalloc's live, mapped, parked, hole and record counts.
    pub fn matches(&self, before: &Self, name: &str) -> bool {
        self.matches_with(before, name, true)
    }

    /// [`Self::matches`] but for the count of page-table pages, after
    /// [`memory::snapshot::settle_keeping_tables`]: kept tables hold frames the buddy no longer counts free,
    /// so the frames still add up exactly (free + tables + slab), but how many tables the
    /// purge kept is its policy's, checked by the exact [`Self::matches`] after the last
    /// repeat.
    pub fn matches_keeping_tables(&self, before: &Self, name: &str) -> bool {
        self.matches_with(before, name, false)
    }

    fn matches_with(&self, before: &Self, name: &str, tables_exact: bool) -> bool {
        let ok = core::cell::Cell::new(true);
        let bad = |what: &str, was: i128, now: i128| {
            println!("  {name}: CHECK FAILED: {what}: {was} before, {now} after");
            ok.set(false);
        };
        // Frames: none leaked anywhere. Free frames plus the page tables plus the slab's
        // frames are constant (all three come from the buddy allocator).
        let held = |b: &Self| (b.buddy_free + b.tables + b.slab_pages + b.large_pages) as i128;
        if held(self) != held(before) {
            bad("buddy free + table + slab + large kmalloc pages", held(before), held(self));
        }
        // Tables: every one the case made was left empty by its frees, and its purges gave
        // them back.
        if tables_exact && self.tables != before.tables {
            bad("page-table pages", before.tables as i128, self.tables as i128);
        }
        if self.large_pages != before.large_pages {
            bad("kmalloc large pages", before.large_pages as i128, self.large_pages as i128);
        }
        for (i, (a, b)) in before.objects.iter().zip(self.objects.iter()).enumerate() {
            if a != b {
                println!("  {name}: CHECK FAILED: slab cache #{i}: {a} objects in use before, {b} after");
                ok.set(false);
            }
        }
        if (self.info_hash, self.info_lines) != (before.info_hash, before.info_lines) {
            bad("vmallocinfo lines (content differs)", before.info_lines as i128, self.info_lines as i128);
        }
        let pairs = [
            ("live areas", before.live_areas, self.live_areas),
            ("mapped pages", before.mapped_pages, self.mapped_pages),
            ("owned frames", before.owned_frames, self.owned_frames),
            ("parked areas", before.parked_areas, self.parked_areas),
            ("free holes", before.free_holes, self.free_holes),
            ("area records", before.records, self.records),
        ];
        for (what, a, b) in pairs {
            if a != b {
                bad(what, a as i128, b as i128);
            }
        }
        if self.largest_hole != before.largest_hole {
            bad("largest hole", before.largest_hole as i128, self.largest_hole as i128);
        }
        ok.get()
    }
}

/// The counters a workload implies, from vmalloc's documented policy (`memory::vmalloc`
/// module docs): a free parks `pages + guard` pages without a TLB operation; once more
/// than `lazy_max_pages` are parked the purge flushes once — one TLBI per mapped page when
/// at most `flush_page_threshold` parked pages were mapped, else one full flush; strict mode
/// flushes at each free instead; vrealloc's shrink flushes the freed tail at once; an
/// allocation that finds no hole purges and retries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Model {
    lazy_max: usize,
    threshold: usize,
    strict: bool,
    parked_areas: usize,
    parked_pages: usize,
    parked_mapped: usize,
    /// Frames vmalloc takes.
    pub frames_taken: u64,
    /// Frames it gives back.
    pub frames_returned: u64,
    /// Page-table entries written (vmalloc'd pages and vmap'd frames).
    pub ptes: u64,
    /// Purges.
    pub purges: u64,
    /// Per-page TLB invalidations.
    pub page_ops: u64,
    /// Batches of per-page invalidations.
    pub batches: u64,
    /// Full TLB flushes.
    pub full: u64,
    /// Calls that fail.
    pub failures: u64,
}

impl Model {
    /// A model with the running allocator's tunables and nothing parked.
    pub fn new() -> Self {
        let mut m = Self::default();
        if let Some(v) = kernel::vmalloc_instance() {
            let g = v.lock();
            let c = g.config();
            m.lazy_max = c.lazy_max_pages;
            m.threshold = c.flush_page_threshold;
            m.strict = c.strict;
        }
        m
    }

    /// An allocation (or vmap) that wrote `pages` PTEs, `frames` of them with new frames.
    #[inline(always)]
    pub fn mapped(&mut self, pages: usize, frames: usize) {
        self.ptes += pages as u64;
        self.frames_taken += frames as u64;
    }

    /// Flush `pages` pages now (strict free, vrealloc shrink).
    #[inline]
    pub fn flush_now(&mut self, pages: usize) {
        if pages == 0 {
            return;
        }
        if pages <= self.threshold {
            self.page_ops += pages as u64;
            self.batches += 1;
        } else {
            self.full += 1;
        }
    }

    /// A free (vfree or vunmap) of an area whose range is `range` pages (guard included),
    /// `mapped` of them mapped, `frames` of them frames vmalloc owned.
    #[inline(always)]
    pub fn freed(&mut self, range: usize, mapped: usize, frames: usize) {
        self.frames_returned += frames as u64;
        if self.strict {
            self.flush_now(mapped);
            return;
        }
        self.parked_areas += 1;
        self.parked_pages += range;
        self.parked_mapped += mapped;
        if self.parked_pages > self.lazy_max {
            self.purge();
        }
    }

    /// Strict mode switched (`Vmalloc::set_strict`); turning it on purges first.
    pub fn set_strict(&mut self, strict: bool) {
        if strict {
            self.purge();
        }
        self.strict = strict;
    }

    /// An allocation that found no hole (after purging, if anything was parked).
    pub fn no_space(&mut self) {
        self.failures += 1;
        self.purge();
    }

    /// A purge (threshold, no hole, or explicit).
    pub fn purge(&mut self) {
        if self.parked_areas == 0 {
            return;
        }
        let m = self.parked_mapped;
        if m > 0 && m <= self.threshold {
            self.page_ops += m as u64;
            self.batches += 1;
        } else if m > 0 {
            self.full += 1;
        }
        self.parked_areas = 0;
        self.parked_pages = 0;
        self.parked_mapped = 0;
        self.purges += 1;
    }

    /// Adds another repeat's counts.
    pub fn add(&mut self, o: &Self) {
        self.frames_taken += o.frames_taken;
        self.frames_returned += o.frames_returned;
        self.ptes += o.ptes;
        self.purges += o.purges;
        self.page_ops += o.page_ops;
        self.batches += o.batches;
        self.full += o.full;
        self.failures += o.failures;
    }
}

/// Counter deltas measured from `vmalloc_stats()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// Frames taken.
    pub frames_taken: u64,
    /// Frames returned.
    pub frames_returned: u64,
    /// Purges.
    pub purges: u64,
    /// Per-page TLB invalidations.
    pub page_ops: u64,
    /// Batches of them.
    pub batches: u64,
    /// Full flushes.
    pub full: u64,
    /// Failed calls.
    pub failures: u64,
}

impl Measured {
    /// `after - before`.
    pub fn delta(before: &VmallocStats, after: &VmallocStats) -> Self {
        Self {
            frames_taken: after.frames_taken - before.frames_taken,
            frames_returned: after.frames_returned - before.frames_returned,
            purges: after.purges - before.purges,
            page_ops: after.tlb_page_ops - before.tlb_page_ops,
            batches: after.tlb_page_batches - before.tlb_page_batches,
            full: after.tlb_full_flushes - before.tlb_full_flushes,
            failures: after.failures - before.failures,
        }
    }

    /// Adds another repeat's counts.
    pub fn add(&mut self, o: &Self) {
        self.frames_taken += o.frames_taken;
        self.frames_returned += o.frames_returned;
        self.purges += o.purges;
        self.page_ops += o.page_ops;
        self.batches += o.batches;
        self.full += o.full;
        self.failures += o.failures;
    }

    /// Whether every counter is what `m` predicts.
    pub fn agrees(&self, m: &Model) -> bool {
        *self
            == Self {
                frames_taken: m.frames_taken,
                frames_returned: m.frames_returned,
                purges: m.purges,
                page_ops: m.page_ops,
                batches: m.batches,
                full: m.full,
                failures: m.failures,
            }
    }
}
