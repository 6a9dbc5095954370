//! Host tests of `vm_map_ram`'s blocks over a simulated MMU that fails the test when a page
//! is mapped again before a flush invalidated its old translation.

extern crate std;

use std::boxed::Box;
use std::sync::{Arc, Mutex};
use std::vec::Vec;

use super::*;

/// A page's translation as the simulated MMU holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pte {
    Mapped(u64),
    /// Unmapped, its TLB entry possibly still live until the next flush.
    Stale,
}

/// The simulated PTEs of the region, one slot per page from [`BASE`] (an array, not a hash
/// map: the tests cycle thousands of pieces, and under Miri each hash is hundreds of steps;
/// a boxed slice, indexed in place, where a `Vec` reborrows its whole buffer at each index).
#[derive(Default)]
struct Ptes(Box<[Option<Pte>]>);

impl Ptes {
    fn slot(va: u64) -> usize {
        ((va - BASE) / PAGE_SIZE as u64) as usize
    }

    fn get(&self, va: &u64) -> Option<&Pte> {
        self.0.get(Self::slot(*va)).and_then(Option::as_ref)
    }

    fn insert(&mut self, va: u64, pte: Pte) -> Option<Pte> {
        let i = Self::slot(va);
        if i >= self.0.len() {
            let mut grown = core::mem::take(&mut self.0).into_vec();
            grown.resize((i + 1).next_power_of_two(), None);
            self.0 = grown.into_boxed_slice();
        }
        self.0[i].replace(pte)
    }

    /// Drops the stale entries (a flush).
    fn flush(&mut self) {
        for p in &mut self.0 {
            if *p == Some(Pte::Stale) {
                *p = None;
            }
        }
    }

    /// Whether any page of `span` has an entry (mapped, or stale in the TLB).
    fn any_in(&self, span: &VirtRange) -> bool {
        let (s, e) = (span.start().as_u64(), span.start().as_u64() + span.size());
        let s = Self::slot(s.max(BASE)).min(self.0.len());
        let e = Self::slot(e.max(BASE)).min(self.0.len());
        self.0[s..e].iter().any(Option::is_some)
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

#[derive(Default)]
struct Mmu {
    pages: Ptes,
    flushes: usize,
    /// Maps over a page whose old translation was not flushed yet (must stay 0).
    stale_reuse: usize,
    /// What `free_tables` was asked to free.
    freed_spans: Vec<VirtRange>,
}

#[derive(Clone, Default)]
struct SimTables(Arc<Mutex<Mmu>>);

impl RamMapper for SimTables {
    unsafe fn map(&self, va: VirtAddr, frames: &[PhysAddr], _prot: Prot) -> Result<(), MapError> {
        let mut m = self.0.lock().unwrap();
        for (i, f) in frames.iter().enumerate() {
            let page = va.as_u64() + (i * PAGE_SIZE) as u64;
            match m.pages.get(&page) {
                Some(Pte::Mapped(_)) => return Err(MapError::AlreadyMapped),
                Some(Pte::Stale) => m.stale_reuse += 1,
                None => {}
            }
            m.pages.insert(page, Pte::Mapped(f.as_u64()));
        }
        Ok(())
    }

    unsafe fn unmap(&self, va: VirtAddr, pages: usize) {
        let mut m = self.0.lock().unwrap();
        for i in 0..pages {
            let page = va.as_u64() + (i * PAGE_SIZE) as u64;
            let was = m.pages.insert(page, Pte::Stale);
            assert!(matches!(was, Some(Pte::Mapped(_))), "unmap of {page:#x}, which was {was:?}");
        }
    }

    fn flush_all(&self) {
        let mut m = self.0.lock().unwrap();
        m.pages.flush();
        m.flushes += 1;
    }

    unsafe fn free_tables(&self, spans: &[VirtRange]) -> usize {
        let mut m = self.0.lock().unwrap();
        for s in spans {
            assert!(!m.pages.any_in(s), "tables of {s:?} freed while in use");
            m.freed_spans.push(*s);
        }
        0
    }
}

const BASE: u64 = 0xffff_0000_4000_0000;

fn blocks(n: usize) -> (VmapBlocks<SimTables>, SimTables) {
    let sim = SimTables::default();
    let region = VirtRange::new(VirtAddr::new(BASE), (n * VMAP_BLOCK_SIZE) as u64).unwrap();
    (VmapBlocks::new(sim.clone(), region).unwrap(), sim)
}

fn frames(n: usize, seed: u64) -> Vec<PhysAddr> {
    (0..n as u64).map(|i| PhysAddr::new(0x4000_0000 + (seed * 64 + i) * PAGE_SIZE as u64)).collect()
}

fn map(b: &VmapBlocks<SimTables>, f: &[PhysAddr]) -> VirtAddr {
    // SAFETY: simulated frames: nothing is written through the mapping.
    unsafe { b.map(f, Prot::ReadWrite) }.unwrap().expect("a block")
}

/// Pages the block-filling loops map at a time: one natively; under Miri 32 (each call is
/// interpreted, and a block holds 1,024 pages). Pieces are carved in order all the same.
const PIECE: usize = if cfg!(miri) { 32 } else { 1 };

/// Maps and unmaps `pages` pages from page `at` of the calling CPU's blocks on: single
/// pages up to a multiple of [`PIECE`], then pieces of that many.
fn cycle(b: &VmapBlocks<SimTables>, mut at: usize, pages: usize) {
    let end = at + pages;
    while at < end {
        let n = if at.is_multiple_of(PIECE) && at + PIECE <= end { PIECE } else { 1 };
        let va = map(b, &frames(n, at as u64));
        b.unmap(va, n).unwrap();
        at += n;
    }
}

#[test]
fn pieces_are_carved_in_order_rounded_to_powers_of_two() {
    let (b, sim) = blocks(2);
    let a = map(&b, &frames(1, 0));
    let c = map(&b, &frames(3, 1)); // rounded to 4
    let d = map(&b, &frames(1, 2));
    assert_eq!(a.as_u64(), BASE);
    assert_eq!(c.as_u64(), BASE + PAGE_SIZE as u64);
    assert_eq!(d.as_u64(), BASE + 5 * PAGE_SIZE as u64);
    assert_eq!(
        sim.0.lock().unwrap().pages.get(&(c.as_u64() + 2 * PAGE_SIZE as u64)),
        Some(&Pte::Mapped(0x4000_0000 + 66 * 4096))
    );
    assert_eq!(b.stats().mapped, 3);
    for (va, n) in [(a, 1), (c, 3), (d, 1)] {
        b.unmap(va, n).unwrap();
    }
    assert_eq!(b.stats().mapped, 0);
    // Nothing was flushed yet: the block is still this CPU's, its pieces dirty.
    assert_eq!(sim.0.lock().unwrap().flushes, 0);
    b.purge();
    let s = b.stats();
    assert_eq!((s.clean, s.dirty, s.mapped), (2, 0, 0));
    assert!(sim.0.lock().unwrap().pages.is_empty());
}

#[test]
fn the_purge_frees_the_tables_of_clean_blocks_only() {
    let (b, sim) = blocks(6);
    // Blocks 0 and 1: used up and freed; block 2 keeps a live piece; blocks 3..6 untouched.
    cycle(&b, 0, 2 * VMAP_BLOCK_PAGES);
    let live = map(&b, &frames(1, 7));
    assert_eq!(live.as_u64(), BASE + 2 * VMAP_BLOCK_SIZE as u64);
    b.purge();
    let block = |i: u64| BASE + i * VMAP_BLOCK_SIZE as u64;
    let spans: Vec<(u64, u64)> =
        sim.0.lock().unwrap().freed_spans.iter().map(|s| (s.start().as_u64(), s.size())).collect();
    assert_eq!(spans, [(block(0), 2 * VMAP_BLOCK_SIZE as u64), (block(3), 3 * VMAP_BLOCK_SIZE as u64)]);
    b.unmap(live, 1).unwrap();
    b.purge();
    let m = sim.0.lock().unwrap();
    assert_eq!(
        m.freed_spans.last().map(|s| (s.start().as_u64(), s.size())),
        Some((block(0), 6 * VMAP_BLOCK_SIZE as u64))
    );
}

/// A purge flushes the TLB only when something was unmapped since the last flush: before,
/// every purge issued a `tlbi vmalle1is` (and every `kernel::purge` cost each core its
/// whole TLB) with no block dirty and nothing unmapped. An unmapped piece of a block still
/// in use is flushed all the same (Linux's `vm_unmap_aliases` flushes such dirty ranges).
#[test]
fn a_purge_flushes_only_what_was_unmapped_since_the_last_flush() {
    let (b, sim) = blocks(2);
    let flushes = || sim.0.lock().unwrap().flushes;
    b.purge();
    assert_eq!(flushes(), 0, "nothing ever mapped");
    let live = map(&b, &frames(1, 0));
    let gone = map(&b, &frames(1, 1));
    b.purge();
    assert_eq!(flushes(), 0, "mapped, nothing unmapped");
    b.unmap(gone, 1).unwrap();
    b.purge();
    assert_eq!(flushes(), 1, "a piece unmapped in a block still in use");
    assert!(sim.0.lock().unwrap().pages.get(&gone.as_u64()).is_none(), "its stale entry flushed");
    b.purge();
    assert_eq!(flushes(), 1, "nothing unmapped since");
    // A caller that could not have every CPU report first gets its flush.
    b.flush_at_next_purge();
    b.purge();
    assert_eq!(flushes(), 2);
    b.unmap(live, 1).unwrap();
    b.purge();
    assert_eq!(flushes(), 3, "the last piece: the block dirty");
    assert_eq!(b.stats().flushes, 3);
    assert!(sim.0.lock().unwrap().pages.is_empty());
}

#[test]
fn bad_calls_are_refused_and_change_nothing() {
    let (b, _sim) = blocks(1);
    // SAFETY: simulated frames.
    unsafe {
        assert_eq!(b.map(&[], Prot::ReadWrite), Err(VmallocError::ZeroSize));
        assert_eq!(b.map(&[PhysAddr::new(0x4000_0010)], Prot::ReadWrite), Err(VmallocError::Misaligned));
        // Above VMAP_MAX_ALLOC: the caller's other path.
        assert_eq!(b.map(&frames(VMAP_MAX_ALLOC + 1, 0), Prot::ReadWrite), Ok(None));
    }
    let va = map(&b, &frames(2, 0));
    assert_eq!(b.unmap(va, 0), Err(VmallocError::ZeroSize));
    assert_eq!(b.unmap(va, 1), Err(VmallocError::NotAnArea), "another count");
    assert_eq!(b.unmap(va, 4), Err(VmallocError::NotAnArea), "the rounded count");
    assert_eq!(b.unmap(va.add(PAGE_SIZE as u64), 1), Err(VmallocError::NotAnArea), "interior page");
    assert_eq!(b.unmap(va.add(8), 2), Err(VmallocError::NotAnArea), "unaligned");
    assert_eq!(b.unmap(VirtAddr::new(BASE - PAGE_SIZE as u64), 2), Err(VmallocError::NotAnArea), "outside");
    assert_eq!(b.stats().mapped, 1);
    b.unmap(va, 2).unwrap();
    assert_eq!(b.unmap(va, 2), Err(VmallocError::NotAnArea), "unmapped twice");
}

#[test]
fn a_freed_piece_is_never_mapped_again_before_a_flush() {
    let (b, sim) = blocks(2);
    // Two blocks' worth of 1-page cycles and then some: every block goes dirty, is
    // flushed, and comes back.
    cycle(&b, 0, 5 * VMAP_BLOCK_PAGES);
    let m = sim.0.lock().unwrap();
    assert_eq!(m.stale_reuse, 0);
    // One flush per two blocks' worth of pieces (both dirty when the CPU needs a third).
    assert_eq!(m.flushes, 2);
    assert_eq!(b.stats().flushes, 2);
}

#[test]
fn a_block_held_by_a_live_piece_is_not_reused_and_the_region_can_run_out() {
    let (b, _sim) = blocks(2);
    // One long-lived piece in each block, the rest of each block cycled through.
    let keep0 = map(&b, &frames(1, 0));
    cycle(&b, 1, VMAP_BLOCK_PAGES - 1);
    let keep1 = map(&b, &frames(1, 9));
    assert_eq!(keep1.as_u64(), BASE + VMAP_BLOCK_SIZE as u64);
    cycle(&b, 1, VMAP_BLOCK_PAGES - 1);
    // Both blocks retired with a live piece each: nothing to take.
    // SAFETY: simulated frames.
    assert_eq!(unsafe { b.map(&frames(1, 3), Prot::ReadWrite) }, Ok(None));
    assert_eq!(b.stats().fallbacks, 1);
    b.unmap(keep0, 1).unwrap();
    // Block 0 is dirty now: the next map flushes and takes it.
    assert_eq!(map(&b, &frames(1, 4)).as_u64(), BASE);
    b.unmap(keep1, 1).unwrap();
}

#[test]
fn a_nested_call_on_a_busy_cpu_falls_back() {
    let (b, _sim) = blocks(1);
    // The cursor is taken (as by an interrupted map on this CPU): the call goes elsewhere.
    let nested = b.cpus.try_with(|_| {
        // SAFETY: simulated frames.
        unsafe { b.map(&frames(1, 0), Prot::ReadWrite) }
    });
    assert_eq!(nested, Some(Ok(None)));
}

#[test]
fn cpus_map_and_unmap_each_others_pieces_and_nothing_is_lost() {
    let (b, sim) = blocks(8);
    let b = Arc::new(b);
    let handoff: Arc<Mutex<Vec<(VirtAddr, usize)>>> = Arc::default();
    // Size knob: 60 rounds a thread under Miri, 20,000 natively.
    let rounds = if cfg!(miri) { 60 } else { 20_000 };
    let threads: Vec<_> = (1..=4)
        .map(|cpu| {
            let (b, handoff) = (b.clone(), handoff.clone());
            std::thread::spawn(move || {
                hal::smp::host_play_cpu(cpu);
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ cpu as u64;
                let mut mine: Vec<(VirtAddr, usize)> = Vec::new();
                for i in 0..rounds {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let n = 1 + (rng % 8) as usize;
                    // SAFETY: simulated frames.
                    if let Some(va) = unsafe { b.map(&frames(n, i as u64 % 1000), Prot::ReadWrite) }.unwrap() {
                        mine.push((va, n));
                    }
                    if mine.len() > 16 {
                        let (va, n) = mine.swap_remove((rng >> 20) as usize % mine.len());
                        if rng.is_multiple_of(3) {
                            // A third freed on another CPU.
                            handoff.lock().unwrap().push((va, n));
                        } else {
                            b.unmap(va, n).unwrap();
                        }
                    }
                    let theirs = handoff.lock().unwrap().pop();
                    if let Some((va, n)) = theirs {
                        b.unmap(va, n).unwrap();
                    }
                }
                for (va, n) in mine {
                    b.unmap(va, n).unwrap();
                }
                b.retire_local();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (va, n) in handoff.lock().unwrap().drain(..) {
        b.unmap(va, n).unwrap();
    }
    b.purge();
    let s = b.stats();
    assert_eq!((s.clean, s.dirty, s.mapped), (8, 0, 0), "{s:?}");
    let m = sim.0.lock().unwrap();
    assert_eq!(m.stale_reuse, 0);
    assert!(m.pages.is_empty());
}
