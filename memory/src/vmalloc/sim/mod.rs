//! A simulated MMU and frame allocator implementing [`VmBackend`], for host tests and
//! benches (it is plain `alloc` code, harmless on target).
//!
//! - PTEs of the window in a flat table; frames from a pool of `frames` page frames
//!   starting at [`SimBackend::FRAME_BASE`] (which is "RAM" for `phys_is_ram`).
//! - Every TLB operation is counted, and the TLB is modelled, one per simulated CPU
//!   ([`SimBackend::with_cpus`], [`SimBackend::set_cpu`]): a page unmapped is *stale* in
//!   every CPU's TLB until a flush reaches that CPU (the allocator's are broadcasts;
//!   [`SimBackend::break_broadcast`] makes them local, the bug the oracle must catch);
//!   mapping a page stale anywhere (reuse before flush), mapping over a
//!   valid PTE, unmapping a page that is not mapped, or freeing a frame not taken is a
//!   **violation**, counted in [`SimCounters::violations`] (the allocator must keep it 0).
//! - Optional 2 MiB blocks ([`SimBackend::with_blocks`]) from a pool of their own at
//!   [`SimBackend::BLOCK_BASE`]: a block mapping is kept as 512 page entries marked as one
//!   block; unmapping part of one (a split vmalloc never asks for) is a violation.
//! - Fault injection: fail a frame allocation or a map call after a given count; and every
//!   frame, block and map call (which stands for its page-table pages) counts as one internal
//!   allocation of [`crate::fault`]'s every-k-th injection.
//! - Translation tables are modelled too: a last-level table per 2 MiB, a level-2 table per
//!   1 GiB and a level-1 table per 512 GiB that holds a mapping, each counting its valid
//!   entries, taken when a mapping first needs it (from a pool of their own at
//!   [`SimBackend::TABLE_BASE`], apart from the frames) and kept until
//!   [`VmBackend::free_empty_tables`] gives it back ([`SimBackend::table_pages`]). A table
//!   is *walk-stale* once its descriptor is cleared, until a walk-cache invalidation covers
//!   it (an all-levels TLBI by VA, or a full flush); freeing a walk-stale table, or one that
//!   still holds an entry, is a violation. [`SimBackend::break_walk_invalidation`] makes the
//!   reclaim issue last-level TLBIs only, as a backend with that bug would: the oracle must
//!   catch it.
//! - Page contents are kept sparsely (only pages written through [`SimBackend::write`] or
//!   copied), so tests can check zeroing and `vrealloc` copies.

mod memory;
mod tlb;

use super::alloc::boxed::Box;
use super::alloc::collections::{BTreeMap, BTreeSet};
use super::alloc::vec;
use super::alloc::vec::Vec;
use core::cell::Cell;

use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};

use self::memory::SimMemory;
use self::tlb::SimTlbs;
use super::backend::{DeviceAttr, MapError, Prot, TlbFlush, VmBackend, BLOCK_PAGES, BLOCK_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
const VALID: u64 = 1;
const DEVICE: u64 = 2;
const READ_ONLY: u64 = 4;
const BLOCK: u64 = 8;

/// What the simulation counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Frames currently taken.
    pub frames_in_use: usize,
    /// Valid PTEs.
    pub mapped: usize,
    /// Per-page TLB invalidations.
    pub page_tlbis: u64,
    /// Full TLB flushes.
    pub full_flushes: u64,
    /// Barrier pairs (one per flush call of either kind).
    pub barrier_pairs: u64,
    /// PTEs written.
    pub ptes_written: u64,
    /// PTEs cleared.
    pub ptes_cleared: u64,
    /// Contract violations (see the module docs).
    pub violations: u64,
    /// 2 MiB blocks currently taken.
    pub blocks_in_use: usize,
    /// Table pages the window's tables hold now (see [`SimBackend::table_pages`]).
    pub table_pages: usize,
    /// Table pages given back ([`VmBackend::free_empty_tables`]).
    pub tables_freed: u64,
    /// All-levels TLB invalidations by VA (`tlbi vaae1is`), one per table given back.
    pub walk_tlbis: u64,
}

/// Bytes one table of the simulated tree spans, by the level of its entries (1-3).
const fn table_span(level: u8) -> u64 {
    1 << (12 + 9 * (4 - level as u32))
}

/// One simulated table page: its frame and how many of its entries are valid.
#[derive(Clone, Copy, Debug)]
struct SimTable {
    pa: u64,
    entries: u32,
}

/// The simulated backend.
pub struct SimBackend {
    base: u64,
    ptes: Box<[u64]>,
    /// The simulated CPUs' TLBs (1 unless [`SimBackend::with_cpus`]).
    tlbs: SimTlbs,
    /// The CPU the allocator's calls run on now ([`SimBackend::set_cpu`]).
    cpu: usize,
    /// Flushes reach the calling CPU's TLB only ([`SimBackend::break_broadcast`]).
    broken_broadcast: bool,
    /// Frames freed and not taken again, the next one last; below them come the frames
    /// never taken, from `fresh` up (no list of every frame made at the start: under Miri
    /// that list cost seconds in every test).
    free: Vec<u64>,
    /// Frames from index `fresh` on were never handed out.
    fresh: usize,
    taken: Box<[bool]>,
    frames: usize,
    frame_budget: Option<usize>,
    map_budget: Option<usize>,
    /// Free blocks (popped from the back) and which are taken.
    free_blocks: Vec<u64>,
    blocks_taken: Box<[bool]>,
    block_budget: Option<usize>,
    memory: SimMemory,
    clock: Cell<u64>,
    /// Tables by (level of their entries 1-3, first address of their span).
    tables: BTreeMap<(u8, u64), SimTable>,
    /// Table frames: free (popped from the back), next never used, taken.
    table_free: Vec<u64>,
    table_next: u64,
    tables_taken: BTreeSet<u64>,
    /// Table frames whose descriptor was cleared and no walk invalidation has covered yet.
    walk_stale: BTreeSet<u64>,
    broken_walk_invalidation: bool,
    /// What happened.
    pub counters: SimCounters,
}

impl SimBackend {
    /// Physical address of the first simulated frame.
    pub const FRAME_BASE: u64 = 0x4000_0000;

    /// A simulated MMU for `window` with `frames` page frames.
    pub fn new(window: VirtRange, frames: usize) -> Self {
        let pages = (window.size() / PAGE) as usize;
        Self {
            base: window.start().as_u64(),
            ptes: vec![0; pages].into_boxed_slice(),
            tlbs: SimTlbs::new(pages, 1),
            cpu: 0,
            broken_broadcast: false,
            // Freed frames go first (the last freed first), then the lowest never taken.
            free: Vec::new(),
            fresh: 0,
            taken: vec![false; frames].into_boxed_slice(),
            frames,
            frame_budget: None,
            map_budget: None,
            free_blocks: Vec::new(),
            blocks_taken: Box::default(),
            block_budget: None,
            memory: SimMemory::new(Self::FRAME_BASE, frames, Self::BLOCK_BASE, 0),
            clock: Cell::new(0),
            tables: BTreeMap::new(),
            table_free: Vec::new(),
            table_next: Self::TABLE_BASE,
            tables_taken: BTreeSet::new(),
            walk_stale: BTreeSet::new(),
            broken_walk_invalidation: false,
            counters: SimCounters::default(),
        }
    }

    /// Physical address of the first simulated table page (apart from frames and blocks).
    pub const TABLE_BASE: u64 = 0x200_0000_0000;

    /// Table pages the window's tables hold now (each 2 MiB with a page mapped, each
    /// 1 GiB and each 512 GiB with anything mapped, plus those kept empty until a
    /// [`VmBackend::free_empty_tables`]).
    pub fn table_pages(&self) -> usize {
        self.tables.len()
    }

    /// Whether a table of entry level `level` (1: spans 512 GiB, 2: 1 GiB, 3: 2 MiB) exists
    /// for `va`.
    pub fn has_table(&self, level: u8, va: VirtAddr) -> bool {
        (1..=3).contains(&level) && self.tables.contains_key(&(level, va.as_u64() & !(table_span(level) - 1)))
    }

    /// From now on [`VmBackend::free_empty_tables`] invalidates the last level only
    /// (`tlbi vaale1is`), not the walk caches: the bug the oracle must catch (each table
    /// then freed counts as a violation).
    pub fn break_walk_invalidation(&mut self) {
        self.broken_walk_invalidation = true;
    }

    /// Count `count` new leaves at `va` (all in one table of entry level `level`: 3 for
    /// pages, 2 for 2 MiB blocks), creating the tables on the way.
    fn add_leaves(&mut self, va: u64, count: u32, level: u8) {
        for l in 1..=level {
            let key = (l, va & !(table_span(l) - 1));
            if !self.tables.contains_key(&key) {
                let pa = self.table_free.pop().unwrap_or_else(|| {
                    self.table_next += PAGE;
                    self.table_next - PAGE
                });
                self.tables_taken.insert(pa);
                self.tables.insert(key, SimTable { pa, entries: 0 });
                self.counters.table_pages += 1;
                if l > 1 {
                    self.table_entry(l - 1, va, 1);
                }
            }
        }
        self.table_entry(level, va, count as i64);
    }

    /// Add `delta` to the valid entries of the table of entry level `level` holding `va`; a
    /// missing table or a count below zero is a violation.
    fn table_entry(&mut self, level: u8, va: u64, delta: i64) {
        match self.tables.get_mut(&(level, va & !(table_span(level) - 1))) {
            Some(t) if i64::from(t.entries) + delta >= 0 => t.entries = (i64::from(t.entries) + delta) as u32,
            _ => self.counters.violations += 1,
        }
    }

    /// Count pages added from `va` on (`count` pages, possibly across last-level tables).
    fn add_pages(&mut self, va: u64, count: usize) {
        let mut at = va;
        let end = va + count as u64 * PAGE;
        while at < end {
            let next = ((at | (table_span(3) - 1)) + 1).min(end);
            self.add_leaves(at, ((next - at) / PAGE) as u32, 3);
            at = next;
        }
    }

    /// Whether a table of entry level `level` at `base` spans only addresses of `window` and
    /// of the simulated window.
    fn table_inside(&self, level: u8, base: u64, window: VirtRange) -> bool {
        let last = base + (table_span(level) - 1);
        let sim_last = self.base + (self.ptes.len() as u64 * PAGE - 1);
        base >= window.start().as_u64() && last < window.end().as_u64() && base >= self.base && last <= sim_last
    }

    /// Detach the empty tables of entry level `level` meeting `spans` (the oracle re-checks
    /// a last-level table's entries), pushing their frames to `out`.
    fn detach_empty(&mut self, level: u8, spans: &[VirtRange], window: VirtRange, out: &mut Vec<u64>) {
        let size = table_span(level);
        for span in spans {
            let lo = span.start().as_u64() & !(size - 1);
            let hi = (span.end().as_u64() - 1) & !(size - 1);
            let empty: Vec<u64> = self
                .tables
                .range((level, lo)..=(level, hi))
                .filter(|(_, t)| t.entries == 0)
                .map(|(&(_, base), _)| base)
                .filter(|&base| self.table_inside(level, base, window))
                .collect();
            for base in empty {
                if level == 3 {
                    let first = ((base - self.base) / PAGE) as usize;
                    if self.ptes[first..first + 512].iter().any(|e| e & VALID != 0) {
                        self.counters.violations += 1;
                        continue;
                    }
                }
                let Some(t) = self.tables.remove(&(level, base)) else { continue };
                self.counters.table_pages -= 1;
                if level > 1 {
                    self.table_entry(level - 1, base, -1);
                }
                // Cleared: a walk cache may still hold the descriptor.
                self.walk_stale.insert(t.pa);
                out.push(t.pa);
            }
        }
    }

    /// Release detached tables: walk invalidation (unless broken), then free.
    fn release_tables(&mut self, detached: &[u64]) {
        if detached.is_empty() {
            return;
        }
        self.walk_invalidate(detached);
        self.counters.barrier_pairs += 1;
        self.free_detached(detached);
    }

    /// One all-levels TLBI per detached table (last-level ones when broken).
    fn walk_invalidate(&mut self, detached: &[u64]) {
        for pa in detached {
            if self.broken_walk_invalidation {
                self.counters.page_tlbis += 1;
            } else {
                self.walk_stale.remove(pa);
                self.counters.walk_tlbis += 1;
            }
        }
    }

    /// Free detached tables (after their invalidation: a walk-stale one is a violation).
    fn free_detached(&mut self, detached: &[u64]) {
        for &pa in detached {
            if self.walk_stale.remove(&pa) || !self.tables_taken.remove(&pa) {
                // Freed while a walk cache may still point at it (or not taken).
                self.counters.violations += 1;
            }
            self.table_free.push(pa);
            self.counters.tables_freed += 1;
        }
    }

    /// This backend with `cpus` simulated CPUs (1 to [`Self::MAX_CPUS`]), each with a TLB
    /// of its own: an unmapped page is stale in every CPU's TLB (any CPU may have cached
    /// the translation, speculatively too) until a flush reaches that CPU. The allocator's
    /// flushes are broadcasts (`tlbi ...is`), so they reach every CPU; see
    /// [`Self::break_broadcast`] for the bug the oracle must catch.
    pub fn with_cpus(mut self, cpus: usize) -> Self {
        self.tlbs = SimTlbs::new(self.ptes.len(), cpus);
        self.cpu = 0;
        self
    }

    /// The most simulated CPUs.
    pub const MAX_CPUS: usize = SimTlbs::MAX_CPUS;

    /// Runs the allocator's next calls on simulated CPU `cpu` (modulo the CPUs).
    pub fn set_cpu(&mut self, cpu: usize) {
        self.cpu = cpu % self.cpus();
    }

    /// Makes every TLB flush reach the calling CPU's TLB only (`tlbi vaale1` instead of
    /// `vaale1is`), as a backend with that bug would: a range purged on one CPU then
    /// stays stale on the others, and the oracle must catch its reuse.
    pub fn break_broadcast(&mut self) {
        self.broken_broadcast = true;
    }

    /// Simulated CPUs.
    fn cpus(&self) -> usize {
        self.tlbs.cpus()
    }

    /// The CPUs a flush issued now reaches.
    fn flush_reach(&self) -> core::ops::Range<usize> {
        if self.broken_broadcast {
            self.cpu..self.cpu + 1
        } else {
            0..self.cpus()
        }
    }

    /// A TLBI of page `i` (reaching the CPUs of [`Self::flush_reach`]).
    fn invalidate_page(&mut self, i: usize) {
        let reach = self.flush_reach();
        self.tlbs.invalidate_page(i, reach);
    }

    /// A full flush (reaching the CPUs of [`Self::flush_reach`]).
    fn invalidate_all(&mut self) {
        let reach = self.flush_reach();
        self.tlbs.invalidate_all(reach);
    }

    /// Per-page last-level TLBIs for `ranges` (no barrier counted).
    fn leaf_invalidate(&mut self, ranges: &[(VirtAddr, usize)]) {
        for &(va, pages) in ranges {
            for p in 0..pages {
                if let Some(i) = self.index(va.as_u64() + p as u64 * PAGE) {
                    self.invalidate_page(i);
                }
                self.counters.page_tlbis += 1;
            }
        }
    }

    /// Physical address of the first simulated 2 MiB block (far above the frames).
    pub const BLOCK_BASE: u64 = 0x100_0000_0000;

    /// This backend with `blocks` 2 MiB blocks for huge mappings (none by default).
    pub fn with_blocks(mut self, blocks: usize) -> Self {
        self.free_blocks = (0..blocks as u64).rev().map(|i| Self::BLOCK_BASE + i * BLOCK_SIZE as u64).collect();
        self.blocks_taken = vec![false; blocks].into_boxed_slice();
        self.memory.set_block_pages(blocks * BLOCK_PAGES);
        self
    }

    /// Let the next `n` block allocations succeed and later ones fail, until
    /// [`Self::clear_faults`].
    pub fn fail_blocks_after(&mut self, n: usize) {
        self.block_budget = Some(n);
    }

    /// Blocks not taken.
    pub fn free_blocks_count(&self) -> usize {
        self.free_blocks.len()
    }

    /// Whether `va` is mapped by a block entry.
    pub fn is_block(&self, va: VirtAddr) -> bool {
        self.index(va.as_u64()).is_some_and(|i| self.ptes[i] & (VALID | BLOCK) == VALID | BLOCK)
    }

    fn block_index(pa: u64) -> Option<usize> {
        pa.checked_sub(Self::BLOCK_BASE)
            .filter(|o| o % BLOCK_SIZE as u64 == 0)
            .map(|o| (o / BLOCK_SIZE as u64) as usize)
    }

    /// Let the next `n` frames succeed and every later one fail, until [`Self::clear_faults`].
    pub fn fail_frames_after(&mut self, n: usize) {
        self.frame_budget = Some(n);
    }

    /// Let the next `n` map calls succeed and later ones fail with [`MapError::NoMemory`].
    pub fn fail_maps_after(&mut self, n: usize) {
        self.map_budget = Some(n);
    }

    /// Stop injecting faults.
    pub fn clear_faults(&mut self) {
        self.frame_budget = None;
        self.map_budget = None;
        self.block_budget = None;
    }

    /// Frames not taken.
    pub fn free_frames_count(&self) -> usize {
        self.free.len() + (self.frames - self.fresh)
    }

    /// The lowest frame never handed out, if any is left.
    fn fresh_frame(&self) -> Option<u64> {
        (self.fresh < self.frames).then(|| Self::FRAME_BASE + self.fresh as u64 * PAGE)
    }

    /// Takes the frame [`Self::next_free_frame`] names, if any is free.
    fn take_free_frame(&mut self) -> Option<u64> {
        self.free.pop().or_else(|| {
            let pa = self.fresh_frame()?;
            self.fresh += 1;
            Some(pa)
        })
    }

    /// Total frames.
    pub fn total_frames(&self) -> usize {
        self.frames
    }

    fn index(&self, va: u64) -> Option<usize> {
        let off = va.checked_sub(self.base)?;
        let i = (off / PAGE) as usize;
        (i < self.ptes.len()).then_some(i)
    }

    /// One map call's share of the fault injection ([`Self::fail_maps_after`]).
    fn take_map_budget(&mut self) -> Result<(), MapError> {
        if crate::fault::should_fail() {
            return Err(MapError::NoMemory);
        }
        match self.map_budget.as_mut() {
            Some(0) => Err(MapError::NoMemory),
            Some(b) => {
                *b -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn frame_index(pa: u64) -> Option<usize> {
        pa.checked_sub(Self::FRAME_BASE).map(|o| (o / PAGE) as usize)
    }

    /// The raw PTE of the page holding `va`: `(pa, device, read_only)`.
    pub fn pte(&self, va: VirtAddr) -> Option<(PhysAddr, bool, bool)> {
        let e = *self.ptes.get(self.index(va.as_u64())?)?;
        (e & VALID != 0).then(|| (PhysAddr::new(e & !(PAGE - 1)), e & DEVICE != 0, e & READ_ONLY != 0))
    }

    /// The simulated PTE words, one per page of the window from its base (a valid one holds
    /// the frame's address and flag bits). For tests that compare whole states before and
    /// after a call: copying and comparing the words are one `memcpy` and one `memcmp`,
    /// where [`Self::for_each_pte`] visits every page (minutes under Miri, called per step).
    pub fn pte_words(&self) -> &[u64] {
        &self.ptes
    }

    /// Call `f(va, pa)` for every valid PTE in address order.
    pub fn for_each_pte(&self, mut f: impl FnMut(VirtAddr, PhysAddr)) {
        // Runs of empty entries are skipped a chunk at a time (one `memcmp`): under Miri a
        // visit per page was a fifth of the random-operations test.
        const EMPTY: [u64; 64] = [0; 64];
        for (k, chunk) in self.ptes.chunks(EMPTY.len()).enumerate() {
            if chunk == &EMPTY[..chunk.len()] {
                continue;
            }
            for (j, &e) in chunk.iter().enumerate() {
                if e & VALID != 0 {
                    let i = k * EMPTY.len() + j;
                    f(VirtAddr::new(self.base + i as u64 * PAGE), PhysAddr::new(e & !(PAGE - 1)));
                }
            }
        }
    }

    /// Whether the page of `va` is unmapped but may still be cached in the TLB.
    pub fn is_stale(&self, va: VirtAddr) -> bool {
        self.index(va.as_u64()).is_some_and(|i| self.tlbs.stale_anywhere(i))
    }

    /// Write `data` at `va` through the tables. Returns false (writing nothing further) at
    /// the first unmapped, read-only or device page: where the real thing would fault.
    pub fn write(&mut self, va: VirtAddr, data: &[u8]) -> bool {
        let mut done = 0usize;
        while done < data.len() {
            let at = va.as_u64() + done as u64;
            let Some((pa, dev, ro)) = self.pte(VirtAddr::new(at)) else { return false };
            if dev || ro {
                return false;
            }
            let off = (at % PAGE) as usize;
            let n = (PAGE_SIZE - off).min(data.len() - done);
            let page = self.memory.page_mut(pa.as_u64());
            page[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        true
    }

    /// Read `out.len()` bytes at `va` through the tables; false at the first unmapped page.
    pub fn read(&self, va: VirtAddr, out: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < out.len() {
            let at = va.as_u64() + done as u64;
            let Some((pa, _, _)) = self.pte(VirtAddr::new(at)) else { return false };
            let off = (at % PAGE) as usize;
            let n = (PAGE_SIZE - off).min(out.len() - done);
            match self.memory.get(pa.as_u64()) {
                Some(p) => out[done..done + n].copy_from_slice(&p[off..off + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
        true
    }

    /// The frame the next single-frame allocation will return.
    pub fn next_free_frame(&self) -> Option<PhysAddr> {
        self.free.last().copied().or_else(|| self.fresh_frame()).map(PhysAddr::new)
    }

    /// Write one byte into the frame at `pa` by its physical address: what a write through
    /// a stale TLB entry does to the frame a freed page was mapped to.
    pub fn poke_frame(&mut self, pa: PhysAddr, offset: usize, byte: u8) {
        if let Some(b) = self.memory.page_mut(pa.as_u64()).get_mut(offset) {
            *b = byte;
        }
    }

    /// Whether the frame at `pa` is taken (not on the free list).
    pub fn frame_taken(&self, pa: PhysAddr) -> bool {
        Self::frame_index(pa.as_u64()).and_then(|i| self.taken.get(i)).is_some_and(|&t| t)
    }

    /// Dirty a frame's contents (so a test can see whether zeroing happened).
    pub fn scribble_frame(&mut self, pa: PhysAddr, byte: u8) {
        self.memory.fill(pa.as_u64(), byte);
    }
}

impl VmBackend for SimBackend {
    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize {
        let mut n = out.len().min(self.free_frames_count());
        if let Some(b) = self.frame_budget.as_mut() {
            n = n.min(*b);
            *b -= n;
        }
        if let Some(k) = (0..n).find(|_| crate::fault::should_fail()) {
            n = k;
        }
        for slot in &mut out[..n] {
            let Some(pa) = self.take_free_frame() else { break };
            if let Some(t) = Self::frame_index(pa).and_then(|i| self.taken.get_mut(i)) {
                *t = true;
            }
            *slot = PhysAddr::new(pa);
        }
        self.counters.frames_in_use += n;
        n
    }

    fn free_frames(&mut self, frames: &[PhysAddr]) {
        for f in frames {
            match Self::frame_index(f.as_u64()).and_then(|i| self.taken.get_mut(i)) {
                Some(t) if *t => {
                    *t = false;
                    // Freed contents are gone (keeps the sparse memory bounded).
                    self.memory.forget(f.as_u64());
                    self.free.push(f.as_u64());
                    self.counters.frames_in_use -= 1;
                }
                _ => self.counters.violations += 1,
            }
        }
    }

    fn zero_frames(&mut self, frames: &[PhysAddr]) {
        for f in frames {
            self.memory.forget(f.as_u64());
        }
    }

    fn map_pages(&mut self, va: VirtAddr, frames: &[PhysAddr], prot: Prot) -> Result<(), MapError> {
        self.take_map_budget()?;
        let first = self.index(va.as_u64()).ok_or(MapError::OutOfRange)?;
        if first + frames.len() > self.ptes.len() {
            return Err(MapError::OutOfRange);
        }
        let ro = if prot == Prot::ReadOnly { READ_ONLY } else { 0 };
        for (i, f) in frames.iter().enumerate() {
            if self.ptes[first + i] & VALID != 0 {
                self.counters.violations += 1;
                // Undo this call's pages: nothing stays mapped on error.
                for j in 0..i {
                    self.ptes[first + j] = 0;
                }
                return Err(MapError::AlreadyMapped);
            }
            if self.tlbs.stale_anywhere(first + i) {
                self.counters.violations += 1;
            }
            self.tlbs.mapped(first + i);
            self.ptes[first + i] = f.as_u64() | VALID | ro;
        }
        self.add_pages(va.as_u64(), frames.len());
        self.counters.mapped += frames.len();
        self.counters.ptes_written += frames.len() as u64;
        Ok(())
    }

    fn map_device(&mut self, va: VirtAddr, pa: PhysAddr, pages: usize, _attr: DeviceAttr) -> Result<(), MapError> {
        self.take_map_budget()?;
        let first = self.index(va.as_u64()).ok_or(MapError::OutOfRange)?;
        if first + pages > self.ptes.len() {
            return Err(MapError::OutOfRange);
        }
        for i in 0..pages {
            if self.ptes[first + i] & VALID != 0 {
                self.counters.violations += 1;
                for j in 0..i {
                    self.ptes[first + j] = 0;
                    self.counters.mapped -= 1;
                }
                return Err(MapError::AlreadyMapped);
            }
            if self.tlbs.stale_anywhere(first + i) {
                self.counters.violations += 1;
            }
            self.tlbs.mapped(first + i);
            self.ptes[first + i] = (pa.as_u64() + i as u64 * PAGE) | VALID | DEVICE;
            self.counters.mapped += 1;
        }
        self.add_pages(va.as_u64(), pages);
        self.counters.ptes_written += pages as u64;
        Ok(())
    }

    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, mut on_frame: F) {
        let Some(first) = self.index(va.as_u64()) else {
            self.counters.violations += 1;
            return;
        };
        // Leaves removed from the current last-level table, counted once per table.
        let mut run: Option<(u64, i64)> = None;
        for i in first..(first + pages).min(self.ptes.len()) {
            let e = self.ptes[i];
            if e & VALID == 0 || e & BLOCK != 0 {
                // Not mapped, or part of a block (the real tables would refuse to split it).
                self.counters.violations += 1;
                continue;
            }
            self.ptes[i] = 0;
            self.tlbs.unmapped(i);
            self.counters.mapped -= 1;
            self.counters.ptes_cleared += 1;
            let table = (self.base + i as u64 * PAGE) & !(table_span(3) - 1);
            match &mut run {
                Some((t, n)) if *t == table => *n += 1,
                _ => {
                    if let Some((t, n)) = run.replace((table, 1)) {
                        self.table_entry(3, t, -n);
                    }
                }
            }
            on_frame(PhysAddr::new(e & !(PAGE - 1)));
        }
        if let Some((t, n)) = run {
            self.table_entry(3, t, -n);
        }
    }

    fn alloc_block(&mut self) -> Option<PhysAddr> {
        if crate::fault::should_fail() {
            return None;
        }
        if let Some(b) = self.block_budget.as_mut() {
            if *b == 0 {
                return None;
            }
            *b -= 1;
        }
        let pa = self.free_blocks.pop()?;
        if let Some(t) = Self::block_index(pa).and_then(|i| self.blocks_taken.get_mut(i)) {
            *t = true;
        }
        self.counters.blocks_in_use += 1;
        Some(PhysAddr::new(pa))
    }

    fn free_block(&mut self, pa: PhysAddr) {
        match Self::block_index(pa.as_u64()).and_then(|i| self.blocks_taken.get_mut(i)) {
            Some(t) if *t => {
                // Unlike frames, a freed block keeps its contents (there are few blocks), so
                // tests can tell whether a reused block was zeroed.
                *t = false;
                self.free_blocks.push(pa.as_u64());
                self.counters.blocks_in_use -= 1;
            }
            _ => self.counters.violations += 1,
        }
    }

    fn zero_block(&mut self, pa: PhysAddr) {
        for p in 0..BLOCK_PAGES as u64 {
            self.memory.forget(pa.as_u64() + p * PAGE);
        }
    }

    fn map_block(&mut self, va: VirtAddr, pa: PhysAddr) -> Result<(), MapError> {
        self.take_map_budget()?;
        let first = self.index(va.as_u64()).ok_or(MapError::OutOfRange)?;
        if !va.as_u64().is_multiple_of(BLOCK_SIZE as u64) || Self::block_index(pa.as_u64()).is_none() {
            self.counters.violations += 1;
            return Err(MapError::OutOfRange);
        }
        if first + BLOCK_PAGES > self.ptes.len() {
            return Err(MapError::OutOfRange);
        }
        let span = first..first + BLOCK_PAGES;
        if self.ptes[span.clone()].iter().any(|e| e & VALID != 0) {
            self.counters.violations += 1;
            return Err(MapError::AlreadyMapped);
        }
        if span.clone().any(|i| self.tlbs.stale_anywhere(i)) {
            self.counters.violations += 1;
        }
        // An empty last-level table left there goes first, as `pmd_free_pte_page` (the
        // real backend's walk-cache invalidation included).
        if self.tables.get(&(3, va.as_u64())).is_some_and(|t| t.entries == 0) {
            let mut detached = Vec::new();
            let block = VirtRange::new(va, BLOCK_SIZE as u64).map_err(|_| MapError::OutOfRange)?;
            self.detach_empty(3, &[block], block, &mut detached);
            self.release_tables(&detached);
        }
        for (k, i) in span.enumerate() {
            self.tlbs.mapped(i);
            self.ptes[i] = (pa.as_u64() + k as u64 * PAGE) | VALID | BLOCK;
        }
        self.add_leaves(va.as_u64(), 1, 2);
        self.counters.mapped += BLOCK_PAGES;
        // One descriptor.
        self.counters.ptes_written += 1;
        Ok(())
    }

    fn unmap_block(&mut self, va: VirtAddr) -> Option<PhysAddr> {
        if !self.is_block(va) || !va.as_u64().is_multiple_of(BLOCK_SIZE as u64) {
            return None;
        }
        let first = self.index(va.as_u64())?;
        let pa = PhysAddr::new(self.ptes[first] & !(PAGE - 1));
        for i in first..first + BLOCK_PAGES {
            self.ptes[i] = 0;
            self.tlbs.unmapped(i);
        }
        self.counters.mapped -= BLOCK_PAGES;
        self.counters.ptes_cleared += 1;
        self.table_entry(2, va.as_u64(), -1);
        Some(pa)
    }

    fn flush_and_free_tables(&mut self, flush: TlbFlush<'_>, spans: &[VirtRange], window: VirtRange) -> usize {
        let mut detached = Vec::new();
        for level in [3, 2, 1] {
            self.detach_empty(level, spans, window, &mut detached);
        }
        // One batch: the leaves, then the tables' walk caches (a full flush covers them).
        match flush {
            TlbFlush::All => {
                self.walk_stale.clear();
                self.invalidate_all();
                self.counters.full_flushes += 1;
            }
            TlbFlush::Pages(ranges) => {
                self.leaf_invalidate(ranges);
                self.walk_invalidate(&detached);
            }
            TlbFlush::None => self.walk_invalidate(&detached),
        }
        if flush != TlbFlush::None || !detached.is_empty() {
            self.counters.barrier_pairs += 1;
        }
        self.free_detached(&detached);
        detached.len()
    }

    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]) {
        self.leaf_invalidate(ranges);
        self.counters.barrier_pairs += 1;
    }

    fn tlb_flush_all(&mut self) {
        // Marks from the old epoch no longer match: every page is clean; walk caches too.
        self.walk_stale.clear();
        self.invalidate_all();
        self.counters.full_flushes += 1;
        self.counters.barrier_pairs += 1;
    }

    fn translate(&self, va: VirtAddr) -> Option<PhysAddr> {
        let (pa, _, _) = self.pte(va)?;
        Some(PhysAddr::new(pa.as_u64() + va.page_offset()))
    }

    fn free_empty_tables(&mut self, spans: &[VirtRange], window: VirtRange) -> usize {
        let mut detached = Vec::new();
        // Bottom up: a table emptied by detaching its last subtable goes in the same call.
        for level in [3, 2, 1] {
            self.detach_empty(level, spans, window, &mut detached);
        }
        self.release_tables(&detached);
        detached.len()
    }

    fn table_pages(&self) -> usize {
        self.tables.len()
    }

    fn phys_is_ram(&self, pa: PhysAddr, pages: usize) -> bool {
        let start = pa.as_u64();
        let end = start.saturating_add(pages as u64 * PAGE);
        let ram_end = Self::FRAME_BASE + self.frames as u64 * PAGE;
        let blocks_end = Self::BLOCK_BASE + (self.blocks_taken.len() * BLOCK_SIZE) as u64;
        (start < ram_end && Self::FRAME_BASE < end) || (start < blocks_end && Self::BLOCK_BASE < end)
    }

    fn copy_mapped(&mut self, dst: VirtAddr, src: VirtAddr, bytes: usize) {
        let mut tmp = vec![0u8; bytes];
        if !self.read(src, &mut tmp) || !self.write(dst, &tmp) {
            self.counters.violations += 1;
        }
    }

    fn zero_mapped(&mut self, va: VirtAddr, bytes: usize) {
        if !self.write(va, &vec![0u8; bytes]) {
            self.counters.violations += 1;
        }
    }

    fn poison_frames(&mut self, frames: &[PhysAddr], byte: u8) {
        for f in frames {
            self.memory.fill(f.as_u64(), byte);
        }
    }

    fn find_unpoisoned(&self, pa: PhysAddr, byte: u8) -> Option<(usize, u8)> {
        match self.memory.get(pa.as_u64()) {
            // Chunk compares (memcmp), not a byte loop: the quarantine scans every held page.
            Some(p) => crate::poison::first_not(p, byte).map(|i| (i, p[i])),
            None => (byte != 0).then_some((0, 0)),
        }
    }

    fn write_words(&mut self, pa: PhysAddr, at: usize, words: &[u64]) -> bool {
        if at + words.len() > PAGE_SIZE / 8 {
            self.counters.violations += 1;
            return false;
        }
        let page = self.memory.page_mut(pa.as_u64());
        for (i, w) in words.iter().enumerate() {
            page[(at + i) * 8..(at + i + 1) * 8].copy_from_slice(&w.to_le_bytes());
        }
        true
    }

    fn read_words(&self, pa: PhysAddr, at: usize, out: &mut [u64]) {
        let page = self.memory.get(pa.as_u64());
        for (i, w) in out.iter_mut().enumerate() {
            let k = (at + i) * 8;
            *w = page.and_then(|p| p.get(k..k + 8)).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
        }
    }

    fn now_ns(&self) -> u64 {
        let t = self.clock.get() + 100;
        self.clock.set(t);
        t
    }
}

impl core::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimBackend").field("counters", &self.counters).finish()
    }
}
