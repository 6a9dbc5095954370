//! A simulated MMU and frame allocator implementing [`VmBackend`], for host tests and
//! benches (it is plain `alloc` code, harmless on target).
//!
//! - PTEs of the window in a flat table; frames from a pool of `frames` page frames
//!   starting at [`SimBackend::FRAME_BASE`] (which is "RAM" for `phys_is_ram`).
//! - Every TLB operation is counted, and the TLB is modelled: a page unmapped and not yet
//!   invalidated is *stale*; mapping a stale page (reuse before flush), mapping over a
//!   valid PTE, unmapping a page that is not mapped, or freeing a frame not taken is a
//!   **violation**, counted in [`SimCounters::violations`] (the allocator must keep it 0).
//! - Optional 2 MiB blocks ([`SimBackend::with_blocks`]) from a pool of their own at
//!   [`SimBackend::BLOCK_BASE`]: a block mapping is kept as 512 page entries marked as one
//!   block; unmapping part of one (a split vmalloc never asks for) is a violation.
//! - Fault injection: fail a frame allocation or a map call after a given count; and every
//!   frame, block and map call (which stands for its page-table pages) counts as one internal
//!   allocation of [`crate::fault`]'s every-k-th injection.
//! - Page contents are kept sparsely (only pages written through [`SimBackend::write`] or
//!   copied), so tests can check zeroing and `vrealloc` copies.

use super::alloc::boxed::Box;
use super::alloc::collections::BTreeMap;
use super::alloc::vec;
use super::alloc::vec::Vec;
use core::cell::Cell;

use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};

use super::backend::{DeviceAttr, MapError, Prot, VmBackend, BLOCK_PAGES, BLOCK_SIZE};

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
}

/// The simulated backend.
pub struct SimBackend {
    base: u64,
    ptes: Vec<u64>,
    /// Per page: the TLB epoch + 1 in which it was unmapped and not flushed since, else 0.
    stale: Vec<u32>,
    epoch: u32,
    free: Vec<u64>,
    taken: Vec<bool>,
    frames: usize,
    frame_budget: Option<usize>,
    map_budget: Option<usize>,
    /// Free blocks (popped from the back) and which are taken.
    free_blocks: Vec<u64>,
    blocks_taken: Vec<bool>,
    block_budget: Option<usize>,
    memory: BTreeMap<u64, Box<[u8]>>,
    clock: Cell<u64>,
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
            ptes: vec![0; pages],
            stale: vec![0; pages],
            epoch: 0,
            // Popped from the back: the lowest frames go first.
            free: (0..frames as u64).rev().map(|i| Self::FRAME_BASE + i * PAGE).collect(),
            taken: vec![false; frames],
            frames,
            frame_budget: None,
            map_budget: None,
            free_blocks: Vec::new(),
            blocks_taken: Vec::new(),
            block_budget: None,
            memory: BTreeMap::new(),
            clock: Cell::new(0),
            counters: SimCounters::default(),
        }
    }

    /// Physical address of the first simulated 2 MiB block (far above the frames).
    pub const BLOCK_BASE: u64 = 0x100_0000_0000;

    /// This backend with `blocks` 2 MiB blocks for huge mappings (none by default).
    pub fn with_blocks(mut self, blocks: usize) -> Self {
        self.free_blocks = (0..blocks as u64).rev().map(|i| Self::BLOCK_BASE + i * BLOCK_SIZE as u64).collect();
        self.blocks_taken = vec![false; blocks];
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
        self.free.len()
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

    /// Call `f(va, pa)` for every valid PTE in address order.
    pub fn for_each_pte(&self, mut f: impl FnMut(VirtAddr, PhysAddr)) {
        for (i, &e) in self.ptes.iter().enumerate() {
            if e & VALID != 0 {
                f(VirtAddr::new(self.base + i as u64 * PAGE), PhysAddr::new(e & !(PAGE - 1)));
            }
        }
    }

    /// Whether the page of `va` is unmapped but may still be cached in the TLB.
    pub fn is_stale(&self, va: VirtAddr) -> bool {
        self.index(va.as_u64()).and_then(|i| self.stale.get(i)).is_some_and(|&s| s == self.epoch + 1)
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
            let page = self.memory.entry(pa.as_u64()).or_insert_with(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
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
            match self.memory.get(&pa.as_u64()) {
                Some(p) => out[done..done + n].copy_from_slice(&p[off..off + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
        true
    }

    /// The frame the next single-frame allocation will return.
    pub fn next_free_frame(&self) -> Option<PhysAddr> {
        self.free.last().map(|&pa| PhysAddr::new(pa))
    }

    /// Write one byte into the frame at `pa` by its physical address: what a write through
    /// a stale TLB entry does to the frame a freed page was mapped to.
    pub fn poke_frame(&mut self, pa: PhysAddr, offset: usize, byte: u8) {
        let page = self.memory.entry(pa.as_u64()).or_insert_with(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
        if let Some(b) = page.get_mut(offset) {
            *b = byte;
        }
    }

    /// Whether the frame at `pa` is taken (not on the free list).
    pub fn frame_taken(&self, pa: PhysAddr) -> bool {
        Self::frame_index(pa.as_u64()).and_then(|i| self.taken.get(i)).is_some_and(|&t| t)
    }

    /// Dirty a frame's contents (so a test can see whether zeroing happened).
    pub fn scribble_frame(&mut self, pa: PhysAddr, byte: u8) {
        self.memory.insert(pa.as_u64(), vec![byte; PAGE_SIZE].into_boxed_slice());
    }
}

impl VmBackend for SimBackend {
    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize {
        let mut n = out.len().min(self.free.len());
        if let Some(b) = self.frame_budget.as_mut() {
            n = n.min(*b);
            *b -= n;
        }
        if let Some(k) = (0..n).find(|_| crate::fault::should_fail()) {
            n = k;
        }
        for slot in &mut out[..n] {
            let Some(pa) = self.free.pop() else { break };
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
                    self.memory.remove(&f.as_u64());
                    self.free.push(f.as_u64());
                    self.counters.frames_in_use -= 1;
                }
                _ => self.counters.violations += 1,
            }
        }
    }

    fn zero_frames(&mut self, frames: &[PhysAddr]) {
        for f in frames {
            self.memory.remove(&f.as_u64());
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
            if self.stale[first + i] == self.epoch + 1 {
                self.counters.violations += 1;
            }
            self.stale[first + i] = 0;
            self.ptes[first + i] = f.as_u64() | VALID | ro;
        }
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
            if self.stale[first + i] == self.epoch + 1 {
                self.counters.violations += 1;
            }
            self.stale[first + i] = 0;
            self.ptes[first + i] = (pa.as_u64() + i as u64 * PAGE) | VALID | DEVICE;
            self.counters.mapped += 1;
        }
        self.counters.ptes_written += pages as u64;
        Ok(())
    }

    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, mut on_frame: F) {
        let Some(first) = self.index(va.as_u64()) else {
            self.counters.violations += 1;
            return;
        };
        for i in first..(first + pages).min(self.ptes.len()) {
            let e = self.ptes[i];
            if e & VALID == 0 || e & BLOCK != 0 {
                // Not mapped, or part of a block (the real tables would refuse to split it).
                self.counters.violations += 1;
                continue;
            }
            self.ptes[i] = 0;
            self.stale[i] = self.epoch + 1;
            self.counters.mapped -= 1;
            self.counters.ptes_cleared += 1;
            on_frame(PhysAddr::new(e & !(PAGE - 1)));
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
            self.memory.remove(&(pa.as_u64() + p * PAGE));
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
        if self.stale[span.clone()].iter().any(|&s| s == self.epoch + 1) {
            self.counters.violations += 1;
        }
        for (k, i) in span.enumerate() {
            self.stale[i] = 0;
            self.ptes[i] = (pa.as_u64() + k as u64 * PAGE) | VALID | BLOCK;
        }
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
            self.stale[i] = self.epoch + 1;
        }
        self.counters.mapped -= BLOCK_PAGES;
        self.counters.ptes_cleared += 1;
        Some(pa)
    }

    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]) {
        for &(va, pages) in ranges {
            for p in 0..pages {
                if let Some(i) = self.index(va.as_u64() + p as u64 * PAGE) {
                    self.stale[i] = 0;
                }
                self.counters.page_tlbis += 1;
            }
        }
        self.counters.barrier_pairs += 1;
    }

    fn tlb_flush_all(&mut self) {
        // Marks from the old epoch no longer match: every page is clean.
        self.epoch += 1;
        self.counters.full_flushes += 1;
        self.counters.barrier_pairs += 1;
    }

    fn translate(&self, va: VirtAddr) -> Option<PhysAddr> {
        let (pa, _, _) = self.pte(va)?;
        Some(PhysAddr::new(pa.as_u64() + va.page_offset()))
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
            self.memory.insert(f.as_u64(), vec![byte; PAGE_SIZE].into_boxed_slice());
        }
    }

    fn find_unpoisoned(&self, pa: PhysAddr, byte: u8) -> Option<(usize, u8)> {
        match self.memory.get(&pa.as_u64()) {
            Some(p) => p.iter().position(|&b| b != byte).map(|i| (i, p[i])),
            None => (byte != 0).then_some((0, 0)),
        }
    }

    fn write_words(&mut self, pa: PhysAddr, at: usize, words: &[u64]) -> bool {
        if at + words.len() > PAGE_SIZE / 8 {
            self.counters.violations += 1;
            return false;
        }
        let page = self.memory.entry(pa.as_u64()).or_insert_with(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
        for (i, w) in words.iter().enumerate() {
            page[(at + i) * 8..(at + i + 1) * 8].copy_from_slice(&w.to_le_bytes());
        }
        true
    }

    fn read_words(&self, pa: PhysAddr, at: usize, out: &mut [u64]) {
        let page = self.memory.get(&pa.as_u64());
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
