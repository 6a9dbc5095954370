//! Out of memory at every internal allocation ([`memory::fault`]): area records, frames,
//! 2 MiB blocks and page-table pages of vmalloc, vmap and ioremap; slabs and large objects
//! of the slab allocator. For every k, every k-th allocation fails while a workload runs:
//! each call that fails returns a typed error and leaves the state exactly as it was.
//!
//! The injection is global, so the tests of this file take one lock and never overlap.

use std::alloc::{alloc_zeroed, Layout};
use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use hal::addr::{PhysAddr, PhysRange, VirtAddr};
use hal::linear::LinearMap;
use hal::{VirtRange, PAGE_SIZE};
use memory::buddy::BuddyAllocator;
use memory::fault;
use memory::slab::{SlabAllocator, SlabError};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{
    AreaInfo, DeviceAttr, FreeSpace, LockedVmalloc, MapError, Prot, VmBackend, VmFlags, Vmalloc, VmallocConfig,
    VmallocError, BLOCK_SIZE,
};

static SERIAL: Mutex<()> = Mutex::new(());

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;
/// A 64 MiB window: room for everything, so no call purges to find space.
const WINDOW_PAGES: u64 = 16384;

/// Everything a failed call must leave unchanged. Spare records are a cache topped up
/// ahead of calls, so the records *in use* are compared, not the spares.
#[derive(Debug, PartialEq, Eq)]
struct State {
    holes: Vec<(u64, u64)>,
    records_in_use: usize,
    live: usize,
    mapped: usize,
    owned: usize,
    parked: (usize, usize),
    huge_blocks: usize,
    sim: (usize, usize, usize, u64),
    ptes: Ptes,
    /// What vmallocinfo prints, as data: every live area and every parked range. (Not
    /// the text: formatting it at every step was a third of this file's time under Miri.)
    areas: Vec<AreaInfo>,
    parked_ranges: Vec<(VirtAddr, VirtAddr)>,
}

/// The simulator's PTE words, copied whole (a `memcpy`; compared with one `memcmp`); shown
/// as the valid entries' `(va, word)` pairs.
#[derive(PartialEq, Eq)]
struct Ptes(Vec<u64>);

impl core::fmt::Debug for Ptes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let valid = self.0.iter().enumerate().filter(|(_, &e)| e != 0);
        f.debug_list().entries(valid.map(|(i, &e)| (BASE + i as u64 * PAGE, e))).finish()
    }
}

fn state(vm: &Vmalloc<SimBackend>) -> State {
    let (s, c) = (vm.stats(), vm.backend().counters);
    let mut holes = Vec::new();
    vm.free_space().for_each_hole(|a, b| holes.push((a, b)));
    let mut areas = Vec::new();
    vm.for_each_area(|a| areas.push(*a));
    let mut parked_ranges = Vec::new();
    vm.for_each_parked(|a, b| parked_ranges.push((a, b)));
    State {
        holes,
        records_in_use: s.records - s.spare_records,
        live: s.live_areas,
        mapped: s.mapped_pages,
        owned: s.owned_frames,
        parked: (s.parked_areas, s.parked_pages),
        huge_blocks: s.huge_blocks,
        sim: (c.frames_in_use, c.blocks_in_use, c.mapped, c.violations),
        ptes: Ptes(vm.backend().pte_words().to_vec()),
        areas,
        parked_ranges,
    }
}

fn range() -> VirtRange {
    VirtRange::new(VirtAddr::new(BASE), WINDOW_PAGES * PAGE).unwrap()
}

fn sim() -> SimBackend {
    SimBackend::new(range(), 4096).with_blocks(4)
}

/// The errors an allocation failure may be reported as.
fn is_oom(e: VmallocError) -> bool {
    matches!(e, VmallocError::NoRecords | VmallocError::NoFrames | VmallocError::MapFailed(MapError::NoMemory))
}

/// One step of the workload: every allocating call vmalloc has, and frees in between.
#[derive(Clone, Copy, Debug)]
enum Op {
    Vmalloc(usize, usize, VmFlags),
    Vmap(usize),
    Ioremap,
    Grow(usize),
    Shrink(usize),
    Free(usize),
    Purge,
}

const OPS: &[Op] = &[
    Op::Vmalloc(PAGE_SIZE, PAGE_SIZE, VmFlags::NONE),
    Op::Vmalloc(5 * PAGE_SIZE + 1, PAGE_SIZE, VmFlags::ZERO),
    Op::Vmalloc(200 * PAGE_SIZE, PAGE_SIZE, VmFlags::NONE),
    Op::Vmalloc(100, 8, VmFlags::END_ALIGNED),
    Op::Vmalloc(3 * PAGE_SIZE, 64 << 10, VmFlags::NONE),
    Op::Vmalloc(BLOCK_SIZE + 3 * PAGE_SIZE, PAGE_SIZE, VmFlags::HUGE),
    Op::Vmap(3),
    Op::Ioremap,
    Op::Free(1),
    Op::Grow(0),
    Op::Vmalloc(PAGE_SIZE, PAGE_SIZE, VmFlags::NO_GUARD),
    Op::Grow(2),
    Op::Shrink(2),
    Op::Free(3),
    Op::Purge,
    Op::Vmalloc(7 * PAGE_SIZE, PAGE_SIZE, VmFlags::ZERO),
];

/// Runs the workload on `vm`, calling `call` for each step; returns the errors seen.
fn workload(
    vm: &mut Vmalloc<SimBackend>,
    frames: &[PhysAddr],
    k: usize,
    errors: &mut BTreeSet<String>,
) -> Result<(), String> {
    let mut live: Vec<VirtAddr> = Vec::new();
    for (i, &op) in OPS.iter().enumerate() {
        let before = state(vm);
        let r: Result<Option<VirtAddr>, VmallocError> = match op {
            Op::Vmalloc(size, align, flags) => vm.vmalloc_with(size, align, flags).map(Some),
            // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
            Op::Vmap(n) => unsafe { vm.vmap(&frames[..n], Prot::ReadWrite) }.map(|_| None),
            Op::Ioremap => vm.ioremap(PhysAddr::new(0x0900_0004), 0x2000, DeviceAttr::DeviceNGnRE).map(|_| None),
            Op::Grow(j) | Op::Shrink(j) => match live.get(j).copied() {
                Some(p) => {
                    let size = if matches!(op, Op::Grow(_)) { 300 * PAGE_SIZE } else { PAGE_SIZE };
                    vm.vrealloc(p, size).map(|q| {
                        live[j] = q;
                        None
                    })
                }
                None => Ok(None),
            },
            Op::Free(j) => {
                if j < live.len() {
                    let p = live.remove(j);
                    vm.vfree(p).map_err(|e| format!("k={k} op {i} {op:?}: vfree {e:?}"))?;
                }
                Ok(None)
            }
            Op::Purge => {
                vm.purge();
                Ok(None)
            }
        };
        match r {
            Ok(Some(p)) => live.push(p),
            Ok(None) => {}
            Err(e) => {
                if !is_oom(e) {
                    return Err(format!("k={k} op {i} {op:?}: untyped failure {e:?}"));
                }
                errors.insert(format!("{e:?}"));
                let after = state(vm);
                if after != before {
                    return Err(format!(
                        "k={k} op {i} {op:?} failed with {e:?} but changed the state:\n{before:?}\n{after:?}"
                    ));
                }
            }
        }
        vm.check().map_err(|e| format!("k={k} op {i} {op:?}: {e}"))?;
    }
    Ok(())
}

#[test]
fn vmalloc_every_kth_internal_allocation_fails_cleanly() {
    let _serial = SERIAL.lock().unwrap();
    let mut errors = BTreeSet::new();
    let injected = fault::injected();
    // Size knob: under Miri every k up to 4, where all three errors asserted below are met
    // (each step copies and compares the whole state).
    for k in 1..=if cfg!(miri) { 4 } else { 60 } {
        // No spare records to start with: the workload's first calls must allocate some.
        let cfg = VmallocConfig { spare_high: 0, ..VmallocConfig::default() };
        let mut vm = Vmalloc::new(sim(), range(), cfg).unwrap();
        drop(vm.release_spares());
        let mut frames = [PhysAddr::new(0); 3];
        assert_eq!(vm.sim_mut().alloc_frames(&mut frames), 3);
        fault::fail_every(k);
        let r = workload(&mut vm, &frames, k, &mut errors);
        fault::stop();
        r.unwrap();
        assert_eq!(vm.backend().counters.violations, 0, "k={k}");
    }
    assert!(fault::injected() > injected, "no failure was injected");
    for e in ["NoRecords", "NoFrames", "MapFailed(NoMemory)"] {
        assert!(errors.contains(e), "{e} never seen: {errors:?}");
    }
    // Without injection the same workload succeeds throughout.
    let mut vm = Vmalloc::new(sim(), range(), VmallocConfig::default()).unwrap();
    let mut frames = [PhysAddr::new(0); 3];
    vm.sim_mut().alloc_frames(&mut frames);
    let mut none = BTreeSet::new();
    workload(&mut vm, &frames, 0, &mut none).unwrap();
    assert!(none.is_empty(), "{none:?}");
}

#[test]
fn locked_vmalloc_refill_failure_is_no_records_not_a_panic() {
    let _serial = SERIAL.lock().unwrap();
    let vm = Vmalloc::new(sim(), range(), VmallocConfig::default()).unwrap();
    let lv = LockedVmalloc::new(vm);
    // Use up the spares the instance started with, so the next call must refill.
    let mut held = Vec::new();
    while lv.lock().spares_wanted() == 0 {
        held.push(lv.vmalloc(PAGE_SIZE).unwrap());
    }
    let before = state(&lv.lock());
    fault::fail_every(1);
    let r = lv.vmalloc(PAGE_SIZE);
    let v = lv.vzalloc(PAGE_SIZE);
    let io = lv.ioremap(PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE);
    fault::stop();
    assert_eq!(
        (r, v, io.map(|_| ())),
        (Err(VmallocError::NoRecords), Err(VmallocError::NoRecords), Err(VmallocError::NoRecords))
    );
    assert_eq!(state(&lv.lock()), before);
    assert!(lv.stats().failures >= 3);
    // Every k: the wrapper's calls fail typed and change nothing, or succeed.
    for k in 1..=8 {
        fault::fail_every(k);
        // Size knob: 4 calls per k under Miri (each takes and compares two whole
        // states), 20 natively.
        for _ in 0..if cfg!(miri) { 4 } else { 20 } {
            let before = state(&lv.lock());
            match lv.vmalloc(3 * PAGE_SIZE) {
                Ok(p) => held.push(p),
                Err(e) => {
                    assert!(is_oom(e), "k={k}: {e:?}");
                    assert_eq!(state(&lv.lock()), before, "k={k}");
                }
            }
        }
        fault::stop();
    }
    for p in held {
        lv.vfree(p).unwrap();
    }
    lv.purge();
    lv.lock().check().unwrap();
}

#[test]
fn free_space_and_spares_fail_cleanly() {
    let _serial = SERIAL.lock().unwrap();
    fault::fail_every(1);
    assert!(FreeSpace::new(0, 1 << 20).is_none());
    assert_eq!(memory::vmalloc::Spares::new(4).unwrap_err(), VmallocError::NoRecords);
    assert_eq!(Vmalloc::new(sim(), range(), VmallocConfig::default()).unwrap_err(), VmallocError::NoRecords);
    fault::stop();
    let mut fs = FreeSpace::new(0, 1 << 20).unwrap();
    let a = fs.alloc(PAGE, PAGE).unwrap();
    let b = fs.alloc(PAGE, PAGE).unwrap();
    let _c = fs.alloc(PAGE, PAGE).unwrap();
    let holes = |fs: &FreeSpace| {
        let mut v = Vec::new();
        fs.for_each_hole(|s, e| v.push((s, e)));
        v
    };
    // Freeing `a` needs a record of its own (no neighbour hole to merge with).
    let mut tries = 0;
    for k in 1..=4 {
        let before = holes(&fs);
        fault::fail_every(k);
        let ok = fs.free(a, PAGE);
        fault::stop();
        tries += 1;
        if ok {
            assert_ne!(holes(&fs), before);
            break;
        }
        assert_eq!(holes(&fs), before, "k={k}");
    }
    assert!(tries >= 1);
    assert!(fs.free(b, PAGE));
    fs.check().unwrap();
}

const RAM: usize = 16 << 20;

#[test]
fn slab_every_kth_internal_allocation_fails_cleanly() {
    let _serial = SERIAL.lock().unwrap();
    let layout = Layout::from_size_align(RAM, 4 << 20).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null());
    let phys = PhysRange::new(PhysAddr::new(0x4000_0000), RAM as u64).unwrap();
    // SAFETY: the buffer is leaked and reached only through this map.
    let linear = unsafe { LinearMap::from_ptr(phys, p) };
    // SAFETY: the RAM is ours alone for the rest of the process.
    let buddy = unsafe { BuddyAllocator::new(&[phys], &[], linear, false) }.unwrap();
    // Kept in a static for the rest of the process (the slab allocator borrows it for
    // `'static`): so Miri's leak check sees the allocator and its RAM still reachable.
    static BUDDY: OnceLock<hal::sync::IrqSpinLock<BuddyAllocator>> = OnceLock::new();
    let lock = hal::sync::IrqSpinLock::new(&hal::sync::classes::BUDDY, buddy);
    assert!(BUDDY.set(lock).is_ok(), "this test runs once per process");
    let buddy = BUDDY.get().unwrap();
    let mut seen_oom = false;
    for strict in [false, true] {
        let slab = SlabAllocator::new(buddy, strict).unwrap();
        let cache = slab.create_cache("oom_test", 200, 8).unwrap();
        let sizes = [8usize, 64, 200, 1000, 2048, 5000, 64 << 10];
        // Size knob: every k up to 4 under Miri, 12 natively.
        for k in 1..=if cfg!(miri) { 4 } else { 12 } {
            let mut held: Vec<NonNull<u8>> = Vec::new();
            fault::fail_every(k);
            // Size knob: under Miri 12 rounds (every size and the cache met), 40 natively.
            for round in 0..if cfg!(miri) { 12 } else { 40 } {
                let free_before = buddy.lock().stats().free_pages;
                let s0 = slab.stats();
                let c0: Vec<_> = slab.cache_stats().collect();
                let r =
                    if round % 5 == 4 { slab.cache_alloc(&cache) } else { slab.kmalloc(sizes[round % sizes.len()], 8) };
                match r {
                    Ok(p) => held.push(p),
                    Err(e) => {
                        assert_eq!(e, SlabError::OutOfMemory, "k={k} round {round}");
                        seen_oom = true;
                        let s1 = slab.stats();
                        assert_eq!(buddy.lock().stats().free_pages, free_before, "k={k} round {round}");
                        assert_eq!(
                            (s1.slab_pages, s1.large_allocs, s1.large_pages),
                            (s0.slab_pages, s0.large_allocs, s0.large_pages)
                        );
                        assert_eq!(slab.cache_stats().collect::<Vec<_>>(), c0, "k={k} round {round}");
                    }
                }
            }
            fault::stop();
            for p in held {
                // SAFETY: each object came from this allocator and is freed once.
                unsafe { slab.kfree(p) }.unwrap();
            }
        }
        slab.shrink();
        slab.destroy_cache(cache).unwrap();
        assert_eq!(slab.stats().slab_pages, 0);
    }
    assert!(seen_oom);
    // A strict allocator refuses an object size near usize::MAX as a bad layout: no
    // division by zero, no overflow.
    let slab = SlabAllocator::new(buddy, true).unwrap();
    assert_eq!(slab.create_cache("huge", usize::MAX - 7, 8), Err(SlabError::BadLayout));
    let slab = SlabAllocator::new(buddy, false).unwrap();
    assert_eq!(slab.create_cache("huge", usize::MAX - 7, 8), Err(SlabError::BadLayout));
}
