//! vmalloc API behaviour on the simulated MMU: placement, guard pages, errors, lazy purge and
//! TLB accounting, fault injection, vrealloc, vmap, ioremap, vmallocinfo, fault reports.

use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{
    AreaKind, DeviceAttr, FaultClass, LockedVmalloc, MapError, Prot, VmFlags, Vmalloc, VmallocConfig, VmallocError,
};

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;

fn window(pages: u64) -> VirtRange {
    VirtRange::new(VirtAddr::new(BASE), pages * PAGE).unwrap()
}

fn new_vm(pages: u64, frames: usize) -> Vmalloc<SimBackend> {
    new_vm_with(pages, frames, VmallocConfig::default())
}

fn new_vm_with(pages: u64, frames: usize, cfg: VmallocConfig) -> Vmalloc<SimBackend> {
    Vmalloc::new(SimBackend::new(window(pages), frames), window(pages), cfg).unwrap()
}

fn holes(vm: &Vmalloc<SimBackend>) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    vm.free_space().for_each_hole(|s, e| v.push((s, e)));
    v
}

/// Everything a failed call must leave unchanged.
fn snapshot(vm: &Vmalloc<SimBackend>) -> (Vec<(u64, u64)>, usize, usize, usize, String, u64) {
    let s = vm.stats();
    (
        holes(vm),
        s.records,
        vm.backend().counters.frames_in_use,
        vm.backend().counters.mapped,
        vm.info().to_string(),
        vm.backend().counters.violations,
    )
}

#[test]
fn vmalloc_maps_pages_and_leaves_guard_unmapped() {
    let mut vm = new_vm(1024, 4096);
    let (p, line) = (vm.vmalloc(3 * PAGE_SIZE).unwrap(), line!());
    assert_eq!(p.as_u64(), BASE);
    let a = vm.find_area(p).unwrap();
    assert_eq!((a.start, a.end.as_u64(), a.size, a.pages), (p, BASE + 4 * PAGE, 4 * PAGE, 3));
    assert_eq!(a.kind, AreaKind::Vmalloc);
    assert!(a.guard);
    assert_eq!((a.caller.file(), a.caller.line()), (file!(), line));
    for i in 0..3 {
        assert!(vm.vmalloc_to_phys(VirtAddr::new(BASE + i * PAGE + 5)).is_some());
    }
    assert!(vm.backend().pte(VirtAddr::new(BASE + 3 * PAGE)).is_none(), "guard page mapped");
    assert_eq!(vm.vmalloc_to_phys(VirtAddr::new(BASE + 3 * PAGE)), None);
    assert!(vm.find_area(VirtAddr::new(BASE + 3 * PAGE + 8)).is_some(), "guard belongs to the area");
    let q = vm.vmalloc(1).unwrap();
    assert_eq!(q.as_u64(), BASE + 4 * PAGE, "lowest fit after the first area's guard");
    assert!(vm.sim_mut().write(p, &[0xAB; 3 * PAGE_SIZE]));
    assert!(!vm.sim_mut().write(VirtAddr::new(BASE + 3 * PAGE), &[1]), "guard must fault");
    let s = vm.stats();
    assert_eq!((s.live_areas, s.mapped_pages, s.owned_frames), (2, 4, 4));
    vm.vfree(p).unwrap();
    vm.vfree(q).unwrap();
    vm.purge();
    vm.check().unwrap();
    let s = vm.stats();
    assert_eq!((s.live_areas, s.mapped_pages, s.owned_frames, s.parked_areas), (0, 0, 0, 0));
    assert_eq!(vm.backend().counters.frames_in_use, 0);
    assert_eq!(holes(&vm), vec![(BASE, BASE + 1024 * PAGE)]);
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn alignment_and_flags() {
    let mut vm = new_vm(1 << 16, 1 << 14);
    let _a = vm.vmalloc(PAGE_SIZE).unwrap();
    for shift in 12..=24 {
        let align = 1usize << shift;
        let p = vm.vmalloc_aligned(5 * PAGE_SIZE, align).unwrap();
        assert!(p.is_aligned(align as u64), "{p:?} not aligned to {align:#x}");
    }
    // Sub-page alignments mean a page.
    let p = vm.vmalloc_aligned(10, 16).unwrap();
    assert!(p.is_page_aligned());
    // No guard: the next area starts right after.
    let p = vm.vmalloc_with(PAGE_SIZE, PAGE_SIZE, VmFlags::NO_GUARD).unwrap();
    let a = vm.find_area(p).unwrap();
    assert_eq!((a.size, a.guard), (PAGE, false));
    // End-aligned: the object ends at its page end, so one byte past traps.
    let p = vm.vmalloc_with(100, 1, VmFlags::END_ALIGNED).unwrap();
    assert_eq!(p.page_offset(), PAGE - 100);
    assert!(vm.sim_mut().write(p, &[7; 100]));
    assert!(!vm.sim_mut().write(p.add(100), &[7]));
    let p8 = vm.vmalloc_with(100, 8, VmFlags::END_ALIGNED).unwrap();
    assert_eq!(p8.page_offset(), (PAGE - 100) & !7);
    vm.vfree(p8).unwrap();
    vm.vfree(p).unwrap();
    vm.check().unwrap();
    assert_eq!(vm.vmalloc_with(100, 2 * PAGE_SIZE, VmFlags::END_ALIGNED), Err(VmallocError::BadAlignment));
    // align_shift_alloc_test: alignments past the window fail cleanly.
    for shift in 25..64 {
        let r = vm.vmalloc_aligned(PAGE_SIZE, 1usize << shift);
        if shift > 40 {
            assert_eq!(r, Err(VmallocError::NoVirtualSpace), "shift {shift}");
        }
        if let Ok(p) = r {
            vm.vfree(p).unwrap();
        }
    }
    vm.check().unwrap();
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let mut vm = new_vm(256, 1024);
    let p = vm.vmalloc(2 * PAGE_SIZE).unwrap();
    let frames = [PhysAddr::new(0x8000_0000), PhysAddr::new(0x8000_1000)];
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    let m = unsafe { vm.vmap(&frames, Prot::ReadWrite) }.unwrap();
    let before = snapshot(&vm);
    let failures = vm.stats().failures;
    assert_eq!(vm.vmalloc(0), Err(VmallocError::ZeroSize));
    assert_eq!(vm.vmalloc(256 * PAGE_SIZE), Err(VmallocError::TooLarge));
    assert_eq!(vm.vmalloc(usize::MAX), Err(VmallocError::TooLarge));
    assert_eq!(vm.vmalloc_aligned(PAGE_SIZE, 3 * PAGE_SIZE), Err(VmallocError::BadAlignment));
    assert_eq!(vm.vmalloc_aligned(PAGE_SIZE, 0), Err(VmallocError::BadAlignment));
    assert_eq!(vm.vfree(p.add(8)), Err(VmallocError::NotAnArea), "interior pointer");
    assert_eq!(vm.vfree(p.add(2 * PAGE)), Err(VmallocError::NotAnArea), "guard page");
    assert_eq!(vm.vfree(VirtAddr::new(BASE + 200 * PAGE)), Err(VmallocError::NotAnArea));
    assert_eq!(vm.vfree(VirtAddr::new(0x1234)), Err(VmallocError::NotAnArea));
    assert_eq!(vm.vfree(m), Err(VmallocError::WrongKind));
    assert_eq!(vm.vunmap(p), Err(VmallocError::WrongKind));
    assert_eq!(vm.iounmap(p), Err(VmallocError::WrongKind));
    assert_eq!(vm.vrealloc(m, 10), Err(VmallocError::WrongKind));
    assert_eq!(vm.vrealloc(p, 0), Err(VmallocError::ZeroSize));
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    assert_eq!(unsafe { vm.vmap(&[], Prot::ReadWrite) }, Err(VmallocError::ZeroSize));
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    assert_eq!(unsafe { vm.vmap(&[PhysAddr::new(0x8000_0010)], Prot::ReadWrite) }, Err(VmallocError::Misaligned));
    assert_eq!(vm.ioremap(PhysAddr::new(0x0900_0000), 0, DeviceAttr::DeviceNGnRE), Err(VmallocError::ZeroSize));
    assert_eq!(
        vm.ioremap(PhysAddr::new(SimBackend::FRAME_BASE + 8), 4, DeviceAttr::DeviceNGnRE),
        Err(VmallocError::RamRange)
    );
    assert_eq!(
        vm.ioremap(PhysAddr::new(SimBackend::FRAME_BASE - PAGE), 2 * PAGE_SIZE, DeviceAttr::DeviceNGnRE),
        Err(VmallocError::RamRange),
        "a range touching RAM on its last page"
    );
    assert_eq!(vm.ioremap(PhysAddr::new(u64::MAX - 8), 100, DeviceAttr::DeviceNGnRE), Err(VmallocError::Overflow));
    assert_eq!(snapshot(&vm), before);
    assert_eq!(vm.stats().failures, failures + 20);
    vm.check().unwrap();

    // Double free: while parked, then after the purge (from the history).
    vm.vfree(p).unwrap();
    let before = snapshot(&vm);
    assert_eq!(vm.vfree(p), Err(VmallocError::DoubleFree));
    assert_eq!(vm.vrealloc(p, 10), Err(VmallocError::DoubleFree));
    assert_eq!(snapshot(&vm), before);
    vm.purge();
    let before = snapshot(&vm);
    assert_eq!(vm.vfree(p), Err(VmallocError::DoubleFree));
    assert_eq!(snapshot(&vm), before);
    vm.vunmap(m).unwrap();
    assert_eq!(vm.vunmap(m), Err(VmallocError::DoubleFree));
    // Every error displays.
    for e in [VmallocError::NoFrames, VmallocError::MapFailed(MapError::NoMemory), VmallocError::DoubleFree] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn vfrees_below_threshold_cost_no_tlb_op_then_one_flush() {
    // Size knob: 300 areas under Miri, 1,000 natively (both far above the full-flush
    // threshold, in more than one 2 MiB stretch).
    let n = if cfg!(miri) { 300 } else { 1000 };
    let mut vm = new_vm(1 << 16, 4096);
    let ptrs: Vec<_> = (0..n).map(|_| vm.vmalloc(PAGE_SIZE).unwrap()).collect();
    let c0 = vm.backend().counters;
    for p in &ptrs {
        vm.vfree(*p).unwrap();
    }
    let c1 = vm.backend().counters;
    assert_eq!((c1.page_tlbis, c1.full_flushes, c1.barrier_pairs), (c0.page_tlbis, c0.full_flushes, c0.barrier_pairs));
    assert_eq!(c1.mapped, 0, "vfree unmaps at once");
    assert_eq!(c1.frames_in_use, 0, "vfree frees frames at once");
    let s = vm.stats();
    assert_eq!((s.parked_areas, s.parked_pages, s.parked_mapped_pages, s.purges), (n, 2 * n, n, 0));
    assert!(vm.backend().is_stale(ptrs[0]));
    // Parked ranges are not reused before their flush: a new area goes above them.
    let next = vm.vmalloc(PAGE_SIZE).unwrap();
    assert_eq!(next.as_u64(), BASE + 2 * n as u64 * PAGE);
    vm.vfree(next).unwrap();
    let info = vm.info().to_string();
    assert_eq!(info.lines().filter(|l| l.ends_with(" unpurged vm_area")).count(), n + 1);
    vm.purge();
    let c2 = vm.backend().counters;
    // The emptied tables (window of 256 MiB: the last-level tables the 2n + 2 pages of
    // areas and guards spanned, four for 1,000 areas) go in the same batch, the full flush
    // covering their walk caches: no TLBI of their own, still one barrier pair.
    assert_eq!(c2.tables_freed - c1.tables_freed, (2 * n as u64 + 2).div_ceil(512));
    assert_eq!(c2.walk_tlbis - c1.walk_tlbis, 0);
    assert_eq!(c2.barrier_pairs - c1.barrier_pairs, 1, "one barrier pair");
    assert_eq!(vm.backend().table_pages(), 2, "the level-1 and level-2 tables (spanning more than the window)");
    assert_eq!(c2.full_flushes - c1.full_flushes, 1, "n + 1 pages: one full flush");
    assert_eq!(c2.page_tlbis, c1.page_tlbis);
    assert!(!vm.backend().is_stale(ptrs[0]));
    let s = vm.stats();
    assert_eq!((s.parked_areas, s.purges, s.tlb_full_flushes, s.free_holes), (0, 1, 1, 1));
    assert!(s.purge_ns_max > 0 && s.purge_ns_p99 > 0);
    vm.check().unwrap();

    // A few parked pages: per-page TLBIs, one batch.
    let ptrs: Vec<_> = (0..10).map(|i| vm.vmalloc(PAGE_SIZE * (1 + i % 3)).unwrap()).collect();
    for p in &ptrs {
        vm.vfree(*p).unwrap();
    }
    let c3 = vm.backend().counters;
    vm.purge();
    let c4 = vm.backend().counters;
    // The last-level table given back: its walk-cache TLBI in the same batch.
    assert_eq!((c4.tables_freed - c3.tables_freed, c4.walk_tlbis - c3.walk_tlbis), (1, 1));
    assert_eq!(c4.barrier_pairs - c3.barrier_pairs, 1);
    assert_eq!(c4.full_flushes, c3.full_flushes);
    assert_eq!(c4.page_tlbis - c3.page_tlbis, 19, "1+2+3+1+2+3+1+2+3+1 mapped pages, guards not flushed");
    assert_eq!(vm.stats().tlb_page_ops, 19);
    assert_eq!(holes(&vm).len(), 1);
    assert_eq!(vm.backend().counters.violations, 0);
}

/// One lazy cycle of `n` one-page areas, each `align`-aligned: allocated and freed in turn;
/// the last free passes the lazy threshold (set to park exactly `n` areas first).
fn lazy_cycle(vm: &mut Vmalloc<SimBackend>, n: usize, align: usize) {
    let purges = vm.stats().purges;
    for _ in 0..n {
        let p = vm.vmalloc_aligned(PAGE_SIZE, align).unwrap();
        vm.vfree(p).unwrap();
    }
    assert_eq!(vm.stats().purges, purges + 1, "one automatic purge a cycle");
}

#[test]
fn an_automatic_purge_keeps_the_tables_its_ranges_met_for_one_cycle() {
    // 40 areas a cycle, each in a 2 MiB stretch of its own (beyond the lowest 16).
    let mut vm = new_vm(1 << 16, 4096);
    vm.set_lazy_max_pages(2 * 40 - 1);
    let tables = |vm: &Vmalloc<SimBackend>| (vm.backend().table_pages(), vm.backend().counters.tables_freed);
    lazy_cycle(&mut vm, 40, 2 << 20);
    let (made, freed) = tables(&vm);
    assert_eq!((made, freed), (2 + 40, 0), "the 40 tables the cycle met are kept");
    assert_eq!(vm.kept_tables().iter().map(|s| s.size() >> 21).sum::<u64>(), 40);
    // The same cycle again: it maps into the kept tables, makes none, and they stay.
    lazy_cycle(&mut vm, 40, 2 << 20);
    assert_eq!(tables(&vm), (made, 0));
    // A cycle that meets only the lowest stretch: the 39 it left go at its purge.
    lazy_cycle(&mut vm, 40, PAGE_SIZE);
    assert_eq!(tables(&vm), (2 + 1, 39));
    // An explicit purge keeps nothing: back to the two upper tables.
    vm.purge();
    assert_eq!(tables(&vm), (2, 40));
    assert!(vm.kept_tables().is_empty());
    assert_eq!(vm.backend().counters.violations, 0);
    vm.check().unwrap();
}

#[test]
fn a_purge_for_address_space_keeps_the_tables_the_last_purge_kept() {
    // A 16 MiB window: eight 2 MiB stretches, one table each.
    let mut vm = new_vm(4096, 8192);
    let tables = |vm: &Vmalloc<SimBackend>| (vm.backend().table_pages(), vm.backend().counters.tables_freed);
    for _ in 0..8 {
        let p = vm.vmalloc_aligned(PAGE_SIZE, 2 << 20).unwrap();
        vm.vfree(p).unwrap();
    }
    // Every stretch parked: the ninth finds no hole, purges, keeps the eight tables.
    let a = vm.vmalloc_aligned(PAGE_SIZE, 2 << 20).unwrap();
    assert_eq!(vm.stats().purges, 1);
    let (made, freed) = tables(&vm);
    assert_eq!((made, freed), (2 + 8, 0));
    // Only stretch 0 parked; the whole window asked for: a second purge for space, which
    // meets stretch 0 alone. The seven other tables (empty) stay for the allocation.
    vm.vfree(a).unwrap();
    let all = vm.vmalloc(4095 * PAGE_SIZE).unwrap();
    assert_eq!(vm.stats().purges, 2);
    assert_eq!(tables(&vm), (made, 0), "a purge for space gave tables back");
    vm.vfree(all).unwrap();
    vm.purge();
    assert_eq!(tables(&vm), (2, 8));
    assert_eq!(vm.backend().counters.violations, 0);
    vm.check().unwrap();
}

#[test]
fn a_purge_keeps_the_records_its_cycle_released_up_to_lazy_max_pages() {
    // Two workers' threshold (64 MiB): a cycle of 1-page areas parks 8,193 records. Size
    // knob: under Miri a threshold of 2 MiB, 257 records.
    let lazy = if cfg!(miri) { 512 } else { 16384 };
    let areas = lazy / 2 + 1;
    let mut vm = new_vm(1 << 16, 64);
    vm.set_lazy_max_pages(lazy);
    let cycle = |vm: &mut Vmalloc<SimBackend>| {
        for _ in 0..areas {
            let p = vm.vmalloc(PAGE_SIZE).unwrap();
            vm.vfree(p).unwrap();
        }
    };
    cycle(&mut vm);
    assert_eq!(vm.stats().purges, 1);
    let kept = vm.stats().spare_records;
    assert!(kept >= areas - 193, "{kept} spare records kept after a cycle of {areas} areas");
    // The next cycle takes its records from the spares, not the heap.
    let records = vm.stats().records;
    cycle(&mut vm);
    assert_eq!(vm.stats().purges, 2);
    assert!(vm.stats().records <= records + 2, "{} records, {records} before", vm.stats().records);
    vm.check().unwrap();
}

#[test]
fn purge_at_lazy_max_pages_and_on_exhaustion() {
    let mut vm = new_vm(1 << 16, 8192);
    assert_eq!(vm.config().lazy_max_pages, 8192);
    // Size knob: under Miri a threshold of 512 pages (256 cycles, not 4,096); the same
    // boundary is met.
    let lazy = if cfg!(miri) { 512 } else { 8192 };
    vm.set_lazy_max_pages(lazy);
    // Each 1-page area parks 2 pages (guard included, as Linux counts).
    for i in 0..lazy / 2 {
        let p = vm.vmalloc(PAGE_SIZE).unwrap();
        vm.vfree(p).unwrap();
        assert_eq!(vm.stats().purges, 0, "purged early at {i}");
    }
    assert_eq!(vm.stats().parked_pages, lazy);
    let p = vm.vmalloc(PAGE_SIZE).unwrap();
    vm.vfree(p).unwrap();
    assert_eq!(vm.stats().purges, 1);
    assert_eq!(vm.stats().parked_pages, 0);
    vm.set_lazy_max_pages(4);
    let p = vm.vmalloc(PAGE_SIZE).unwrap();
    vm.vfree(p).unwrap();
    let q = vm.vmalloc(PAGE_SIZE).unwrap();
    vm.vfree(q).unwrap();
    assert_eq!(vm.stats().purges, 1);
    let q = vm.vmalloc(PAGE_SIZE).unwrap();
    vm.vfree(q).unwrap();
    assert_eq!(vm.stats().purges, 2, "6 parked pages > 4");
    vm.check().unwrap();

    // Exhaustion: fill a small window with parked ranges; the next allocation purges.
    let mut vm = new_vm(64, 256);
    for _ in 0..32 {
        let p = vm.vmalloc(PAGE_SIZE).unwrap();
        vm.vfree(p).unwrap();
    }
    assert_eq!(vm.stats().largest_hole, 0);
    assert_eq!(vm.stats().parked_areas, 32);
    let p = vm.vmalloc(10 * PAGE_SIZE).unwrap();
    assert_eq!(p.as_u64(), BASE);
    assert_eq!(vm.stats().purges, 1);
    // Truly full: the error after a purge, state unchanged.
    let q = vm.vmalloc(40 * PAGE_SIZE).unwrap();
    let before = snapshot(&vm);
    assert_eq!(vm.vmalloc(20 * PAGE_SIZE), Err(VmallocError::NoVirtualSpace));
    assert_eq!(snapshot(&vm), before);
    vm.vfree(p).unwrap();
    vm.vfree(q).unwrap();
    vm.check().unwrap();
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn strict_mode_flushes_every_free() {
    let cfg = VmallocConfig { strict: true, ..VmallocConfig::default() };
    let mut vm = new_vm_with(1024, 1024, cfg);
    for i in 1..=5usize {
        let p = vm.vmalloc(i * PAGE_SIZE).unwrap();
        let c0 = vm.backend().counters;
        vm.vfree(p).unwrap();
        let c1 = vm.backend().counters;
        // The leaves' flush and the walk-cache flush of the table given back: one batch.
        assert_eq!(c1.barrier_pairs - c0.barrier_pairs, 1);
        assert_eq!((c1.tables_freed - c0.tables_freed, c1.walk_tlbis - c0.walk_tlbis), (1, 1));
        assert_eq!(c1.page_tlbis - c0.page_tlbis, i as u64);
        assert!(!vm.backend().is_stale(p));
        assert_eq!(vm.stats().parked_areas, 0);
        assert_eq!(holes(&vm).len(), 1);
        // Immediately reusable, and freed areas still explain use after free.
        let mut s = String::new();
        assert_eq!(vm.explain_fault(p, &mut s), FaultClass::UseAfterFree);
    }
    // Large frees in strict mode take a full flush.
    let p = vm.vmalloc(100 * PAGE_SIZE).unwrap();
    let c0 = vm.backend().counters;
    vm.vfree(p).unwrap();
    assert_eq!(vm.backend().counters.full_flushes - c0.full_flushes, 1);
    vm.check().unwrap();
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn failing_frame_k_of_n_leaves_nothing_behind() {
    let mut vm = new_vm(1 << 14, 4096);
    // Some fragmentation so the failed area splits a hole in the middle, at the edges, ...
    let a = vm.vmalloc(PAGE_SIZE).unwrap();
    let b = vm.vmalloc(200 * PAGE_SIZE).unwrap();
    let _c = vm.vmalloc(PAGE_SIZE).unwrap();
    vm.vfree(b).unwrap();
    vm.purge();
    // Size knob: under Miri the first, a middle and the last of the 64 frames.
    let ks: Vec<usize> = if cfg!(miri) { vec![1, 33, 64] } else { (1..=64).collect() };
    for zero in [false, true] {
        let flags = if zero { VmFlags::ZERO } else { VmFlags::NONE };
        for &k in &ks {
            let before = snapshot(&vm);
            vm.sim_mut().fail_frames_after(k - 1);
            assert_eq!(vm.vmalloc_with(64 * PAGE_SIZE, PAGE_SIZE, flags), Err(VmallocError::NoFrames), "k={k}");
            vm.sim_mut().clear_faults();
            assert_eq!(snapshot(&vm), before, "k={k}");
            vm.check().unwrap();
        }
    }
    // Failures after some chunks were mapped: unmapped, freed and flushed at once.
    // Size knob: under Miri past the first chunk, past the second, at the last frame.
    let after: &[usize] = if cfg!(miri) { &[65, 129, 200] } else { &[65, 100, 128, 129, 199, 200] };
    for &k in after {
        let before = snapshot(&vm);
        vm.sim_mut().fail_frames_after(k - 1);
        assert_eq!(vm.vmalloc(200 * PAGE_SIZE), Err(VmallocError::NoFrames), "k={k}");
        vm.sim_mut().clear_faults();
        assert_eq!(snapshot(&vm), before, "k={k}");
        assert_eq!(vm.stats().parked_areas, 0);
        vm.check().unwrap();
    }
    // Mapping failures, at each chunk.
    for m in 0..4usize {
        let before = snapshot(&vm);
        vm.sim_mut().fail_maps_after(m);
        assert_eq!(vm.vmalloc(200 * PAGE_SIZE), Err(VmallocError::MapFailed(MapError::NoMemory)));
        vm.sim_mut().clear_faults();
        assert_eq!(snapshot(&vm), before, "m={m}");
        vm.check().unwrap();
    }
    // vmap and ioremap map failures.
    let before = snapshot(&vm);
    vm.sim_mut().fail_maps_after(0);
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    assert!(unsafe { vm.vmap(&[PhysAddr::new(0x8000_0000)], Prot::ReadOnly) }.is_err());
    assert!(vm.ioremap(PhysAddr::new(0x0900_0000), 16, DeviceAttr::DeviceNGnRE).is_err());
    vm.sim_mut().clear_faults();
    assert_eq!(snapshot(&vm), before);
    // Out of frames for real.
    assert_eq!(vm.vmalloc(5000 * PAGE_SIZE), Err(VmallocError::NoFrames));
    assert_eq!(snapshot(&vm), before);
    vm.vfree(a).unwrap();
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn vzalloc_zeroes_reused_frames() {
    let mut vm = new_vm(1024, 1024);
    let next = vm.backend().next_free_frame().unwrap();
    vm.sim_mut().scribble_frame(next, 0xEE);
    let p = vm.vzalloc(100).unwrap();
    assert_eq!(vm.vmalloc_to_phys(p), Some(next));
    let mut buf = [1u8; PAGE_SIZE];
    assert!(vm.backend().read(p, &mut buf));
    assert!(buf.iter().all(|&b| b == 0));
    // Without ZERO the old contents show (the simulation does not hide them).
    let next = vm.backend().next_free_frame().unwrap();
    vm.sim_mut().scribble_frame(next, 0xEE);
    let q = vm.vmalloc(100).unwrap();
    assert!(vm.backend().read(q, &mut buf));
    assert_eq!(buf[0], 0xEE);
}

/// The test bytes: byte `i` is `31 i + seed` (mod 256), so they repeat every 256 bytes; one
/// period is made and copied out (under Miri a loop per byte was most of a vrealloc test).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let period: Vec<u8> = (0..=255u8).map(|i| i.wrapping_mul(31).wrapping_add(seed)).collect();
    let mut data = period.repeat(len.div_ceil(256));
    data.truncate(len);
    data
}

fn fill(vm: &mut Vmalloc<SimBackend>, p: VirtAddr, len: usize, seed: u8) {
    assert!(vm.sim_mut().write(p, &pattern(len, seed)));
}

fn verify(vm: &Vmalloc<SimBackend>, p: VirtAddr, len: usize, seed: u8) {
    let mut data = vec![0u8; len];
    assert!(vm.backend().read(p, &mut data));
    let want = pattern(len, seed);
    if data != want {
        let i = data.iter().zip(&want).position(|(a, b)| a != b).unwrap();
        panic!("byte {i}: {:#04x}, not {:#04x}", data[i], want[i]);
    }
}

#[test]
fn vrealloc_grows_and_shrinks_in_place_and_keeps_data() {
    // Linux's vrealloc_test: grow 1 -> 4 pages, shrink to 1, to half a page, grow back.
    let mut vm = new_vm(1024, 1024);
    let p = vm.vmalloc(PAGE_SIZE).unwrap();
    fill(&mut vm, p, PAGE_SIZE, 1);
    let p2 = vm.vrealloc(p, 4 * PAGE_SIZE).unwrap();
    assert_eq!(p2, p, "grows into the hole after it");
    verify(&vm, p, PAGE_SIZE, 1);
    fill(&mut vm, p, 4 * PAGE_SIZE, 2);
    let a = vm.find_area(p).unwrap();
    assert_eq!((a.pages, a.size), (4, 5 * PAGE));
    assert!(vm.backend().pte(p.add(4 * PAGE)).is_none(), "new guard page");
    let c0 = vm.backend().counters;
    assert_eq!(vm.vrealloc(p, PAGE_SIZE).unwrap(), p);
    let c1 = vm.backend().counters;
    assert_eq!(c1.frames_in_use, c0.frames_in_use - 3, "tail frames freed at once");
    assert_eq!(c1.page_tlbis - c0.page_tlbis, 3, "tail flushed");
    verify(&vm, p, PAGE_SIZE, 2);
    assert!(vm.backend().pte(p.add(PAGE)).is_none());
    let mut s = String::new();
    assert_eq!(vm.explain_fault(p.add(PAGE), &mut s), FaultClass::GuardPage, "{s}");
    assert_eq!(vm.vrealloc(p, PAGE_SIZE / 2).unwrap(), p);
    verify(&vm, p, PAGE_SIZE / 2, 2);
    assert_eq!(vm.find_area(p).unwrap().bytes, PAGE_SIZE / 2);
    assert_eq!(vm.vrealloc(p, 4 * PAGE_SIZE).unwrap(), p, "grows back in place");
    verify(&vm, p, PAGE_SIZE / 2, 2);
    assert_eq!(vm.find_area(p).unwrap().pages, 4);

    // Blocked by a neighbour: moves, data copied, old area parked.
    let blocker = vm.vmalloc(PAGE_SIZE).unwrap();
    assert_eq!(blocker.as_u64(), p.as_u64() + 5 * PAGE);
    fill(&mut vm, p, 4 * PAGE_SIZE, 3);
    let moved = vm.vrealloc(p, 9 * PAGE_SIZE).unwrap();
    assert_ne!(moved, p);
    verify(&vm, moved, 4 * PAGE_SIZE, 3);
    assert!(vm.find_area(p).is_none());
    assert_eq!(vm.vfree(p), Err(VmallocError::DoubleFree));
    let a = vm.find_area(moved).unwrap();
    assert_eq!((a.pages, a.bytes), (9, 9 * PAGE_SIZE));

    // A zeroed area stays zero past its size across shrink and regrow.
    let z = vm.vzalloc(2 * PAGE_SIZE).unwrap();
    fill(&mut vm, z, 2 * PAGE_SIZE, 4);
    assert_eq!(vm.vrealloc(z, 100).unwrap(), z);
    assert_eq!(vm.vrealloc(z, 3 * PAGE_SIZE).unwrap(), z);
    verify(&vm, z, 100, 4);
    let mut rest = vec![1u8; 3 * PAGE_SIZE - 100];
    assert!(vm.backend().read(z.add(100), &mut rest));
    assert!(rest.iter().all(|&b| b == 0));

    // End-aligned areas move on resize, keeping the end alignment.
    let e = vm.vmalloc_with(100, 1, VmFlags::END_ALIGNED).unwrap();
    fill(&mut vm, e, 100, 5);
    let e2 = vm.vrealloc(e, 200).unwrap();
    assert_eq!(e2.page_offset(), PAGE - 200);
    verify(&vm, e2, 100, 5);

    // A failed grow changes nothing.
    let before = snapshot(&vm);
    vm.sim_mut().fail_frames_after(1);
    assert_eq!(vm.vrealloc(moved, 20 * PAGE_SIZE), Err(VmallocError::NoFrames));
    assert_eq!(vm.vrealloc(z, 8 * PAGE_SIZE), Err(VmallocError::NoFrames));
    vm.sim_mut().clear_faults();
    assert_eq!(snapshot(&vm), before);
    vm.check().unwrap();
    for q in [moved, blocker, z, e2] {
        vm.vfree(q).unwrap();
    }
    vm.purge();
    vm.check().unwrap();
    assert_eq!(vm.backend().counters.frames_in_use, 0);
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn vmap_and_ioremap() {
    let mut vm = new_vm(1024, 64);
    let frames: Vec<_> = (0..3).map(|i| PhysAddr::new(0x8000_0000 + i * PAGE * 7)).collect();
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    let m = unsafe { vm.vmap(&frames, Prot::ReadOnly) }.unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(vm.vmalloc_to_phys(m.add(i as u64 * PAGE + 3)), Some(f.add(3)));
        assert!(vm.backend().pte(m.add(i as u64 * PAGE)).unwrap().2, "read only");
    }
    let a = vm.find_area(m).unwrap();
    assert_eq!((a.kind, a.pages, a.size), (AreaKind::Vmap, 3, 4 * PAGE));
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    let r = unsafe { vm.vmap_with(&frames[..1], Prot::ReadWrite, VmFlags::NO_GUARD) }.unwrap();
    assert_eq!(vm.find_area(r).unwrap().size, PAGE);
    let io = vm.ioremap(PhysAddr::new(0x0900_0004), 4, DeviceAttr::DeviceNGnRE).unwrap();
    assert_eq!(io.page_offset(), 4, "ioremap keeps the offset");
    assert_eq!(vm.vmalloc_to_phys(io), Some(PhysAddr::new(0x0900_0004)));
    assert!(vm.backend().pte(io).unwrap().1, "device memory");
    let a = vm.find_area(io).unwrap();
    assert_eq!((a.kind, a.phys, a.addr, a.bytes), (AreaKind::Ioremap, Some(PhysAddr::new(0x0900_0000)), io, 4));
    let io2 = vm.ioremap(PhysAddr::new(0x0a00_0ff0), 0x20, DeviceAttr::DeviceNGnRnE).unwrap();
    assert_eq!(vm.find_area(io2).unwrap().pages, 2, "straddles a page boundary");
    assert_eq!(vm.iounmap(io.page_down()), Err(VmallocError::NotAnArea), "pass the pointer ioremap gave");
    assert_eq!(vm.backend().counters.frames_in_use, 0, "no frames taken");
    vm.vunmap(m).unwrap();
    vm.vunmap(r).unwrap();
    vm.iounmap(io).unwrap();
    vm.iounmap(io2).unwrap();
    vm.purge();
    assert_eq!(vm.backend().counters.mapped, 0);
    vm.check().unwrap();
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn vmallocinfo_matches_linux_format() {
    let mut vm = new_vm(1024, 64);
    let (v, lv) = (vm.vmalloc(100).unwrap(), line!());
    let (m, lm) =
        // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
        (unsafe { vm.vmap(&[PhysAddr::new(0x8000_0000), PhysAddr::new(0x8000_1000)], Prot::ReadWrite) }.unwrap(), line!());
    let (io, li) = (vm.ioremap(PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE).unwrap(), line!());
    let f = vm.vmalloc(3 * PAGE_SIZE).unwrap();
    vm.vfree(f).unwrap();
    let info = vm.info().to_string();
    let (cv, cm, ci) =
        (vm.find_area(v).unwrap().caller, vm.find_area(m).unwrap().caller, vm.find_area(io).unwrap().caller);
    assert_eq!((cv.file(), cv.line(), cm.line(), ci.line()), (file!(), lv, lm, li));
    let expected = format!(
        "0x{v:016x}-0x{:016x}    8192 {cv} pages=1 vmalloc\n\
         0x{m:016x}-0x{:016x}   12288 {cm} pages=2 vmap\n\
         0x{io:016x}-0x{:016x}    8192 {ci} phys=0x0000000009000000 ioremap\n\
         0x{f:016x}-0x{:016x}   16384 unpurged vm_area\n",
        v.as_u64() + 2 * PAGE,
        m.as_u64() + 3 * PAGE,
        io.as_u64() + 2 * PAGE,
        f.as_u64() + 4 * PAGE,
    );
    assert_eq!(info, expected);
    let _ = (v, m, io);
}

#[test]
fn faults_are_explained() {
    let mut vm = new_vm(1024, 64);
    let (p, line) = (vm.vmalloc(4096).unwrap(), line!());
    let caller = vm.find_area(p).unwrap().caller;
    assert_eq!(caller.line(), line);
    let at = caller.to_string();
    let mut s = String::new();
    assert_eq!(vm.explain_fault(p.add(4096), &mut s), FaultClass::GuardPage);
    assert_eq!(
        s.trim_end(),
        format!(
            "vmalloc: guard page hit at {:#x}, 1 bytes past area {:#x}-{:#x} (4096) allocated at {at}",
            p.as_u64() + 4096,
            p.as_u64(),
            p.as_u64() + 4096
        )
    );
    let q = vm.vmalloc(100).unwrap();
    let mut s = String::new();
    assert_eq!(vm.explain_fault(q.add(4096), &mut s), FaultClass::GuardPage);
    assert!(s.contains("3997 bytes past area"), "{s}");
    let e = vm.vmalloc_with(100, 1, VmFlags::END_ALIGNED).unwrap();
    let mut s = String::new();
    assert_eq!(vm.explain_fault(e.add(100), &mut s), FaultClass::GuardPage);
    assert!(
        s.contains(&format!(
            "guard page hit at {:#x}, 1 bytes past area {:#x}-{:#x} (100)",
            e.as_u64() + 100,
            e.as_u64(),
            e.as_u64() + 100
        )),
        "{s}"
    );
    let mut s = String::new();
    assert_eq!(vm.explain_fault(q.add(8), &mut s), FaultClass::LiveArea);

    let free_line = line!() + 1;
    vm.vfree(p).unwrap();
    let mut s = String::new();
    assert_eq!(vm.explain_fault(p.add(10), &mut s), FaultClass::UseAfterFree);
    let freed_at = format!("{}:{free_line}:", file!());
    assert!(
        s.starts_with(&format!(
            "vmalloc: use after vfree at {:#x}: area {:#x}-{:#x} (4096) allocated at {at}",
            p.as_u64() + 10,
            p.as_u64(),
            p.as_u64() + 4096
        )),
        "{s}"
    );
    assert!(s.contains(&format!(", freed at {freed_at}")), "{s}");
    vm.purge();
    let mut s = String::new();
    assert_eq!(vm.explain_fault(p.add(10), &mut s), FaultClass::UseAfterFree, "from the history after the purge");
    assert!(s.contains(&freed_at));
    let mut s = String::new();
    assert_eq!(vm.explain_fault(VirtAddr::new(BASE + 900 * PAGE), &mut s), FaultClass::Unallocated);
    let mut s = String::new();
    assert_eq!(vm.explain_fault(VirtAddr::new(0x1000), &mut s), FaultClass::NotVmalloc);
    assert!(s.is_empty());
    // Reused range: a live area wins over the history.
    let r = vm.vmalloc(4096).unwrap();
    assert_eq!(r, p);
    let mut s = String::new();
    assert_eq!(vm.explain_fault(p.add(10), &mut s), FaultClass::LiveArea);
}

#[test]
fn locked_wrapper_refills_outside_and_try_locks_for_faults() {
    let vm = new_vm(4096, 4096);
    let lv = LockedVmalloc::new(vm);
    let mut ptrs = Vec::new();
    for i in 0..300usize {
        ptrs.push(lv.vmalloc(PAGE_SIZE * (1 + i % 4)).unwrap());
    }
    let p = lv.vzalloc(10).unwrap();
    let p = lv.vrealloc(p, 3 * PAGE_SIZE).unwrap();
    let io = lv.ioremap(PhysAddr::new(0x0900_0000), 8, DeviceAttr::DeviceNGnRE).unwrap();
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    let m = unsafe { lv.vmap_with(&[PhysAddr::new(0x8000_0000)], Prot::ReadWrite, VmFlags::NO_GUARD) }.unwrap();
    for q in ptrs.iter().step_by(2) {
        lv.vfree(*q).unwrap();
    }
    lv.purge();
    for q in ptrs.iter().skip(1).step_by(2) {
        lv.vfree(*q).unwrap();
    }
    lv.vfree(p).unwrap();
    lv.iounmap(io).unwrap();
    lv.vunmap(m).unwrap();
    {
        let guard = lv.lock();
        let mut s = String::new();
        assert_eq!(lv.try_explain_fault(ptrs[0], &mut s), None, "lock held: no report, no spin");
        assert!(s.is_empty());
        assert!(guard.stats().spare_records <= 4096);
        assert!(!guard.config().refill_inline);
    }
    let mut s = String::new();
    assert_eq!(lv.try_explain_fault(ptrs[299], &mut s), Some(FaultClass::UseAfterFree));
    lv.purge();
    let s = lv.stats();
    assert_eq!((s.live_areas, s.free_holes), (0, 1));
    assert!(s.spare_records <= 4096);
    lv.lock().check().unwrap();
    {
        let mut g = lv.lock();
        let spares = g.release_spares();
        assert!(g.stats().spare_records <= g.config().spare_high);
        drop(g);
        drop(spares);
    }
    // Through the bare guard, with an empty pool, calls fail cleanly rather than allocate.
    let mut g = lv.lock();
    let spare = g.take_excess_spares();
    drop(spare);
    while g.spares_wanted() == 0 {
        let _ = g.vmalloc_with(PAGE_SIZE, PAGE_SIZE, VmFlags::NO_GUARD).unwrap();
        if g.spares_wanted() > 0 {
            break;
        }
    }
    let before = g.stats();
    let r = g.vmalloc_aligned(PAGE_SIZE, 1 << 20);
    if r == Err(VmallocError::NoRecords) {
        assert_eq!(g.stats().records, before.records);
    }
    g.add_spares(memory::vmalloc::Spares::new(4).unwrap());
    assert_eq!(g.spares_wanted(), 0);
    g.check().unwrap();
}

/// An end-aligned object keeps ending at its guard page across vrealloc, even when its
/// size is a page multiple (offset 0), where the in-place path would otherwise apply.
#[test]
fn vrealloc_keeps_end_alignment() {
    let mut vm = new_vm(1024, 1024);
    let p = vm.vmalloc_with(2 * 4096, 4, VmFlags::END_ALIGNED).unwrap();
    let q = vm.vrealloc(p, 100).unwrap();
    assert_eq!((q.as_u64() + 100) % 4096, 0, "ends at its page end");
    let r = vm.vrealloc(q, 3 * 4096).unwrap();
    let a = vm.find_area(r).unwrap();
    assert_eq!(r.as_u64() + 3 * 4096, a.start.as_u64() + (a.pages * 4096) as u64);
    vm.vfree(r).unwrap();
    vm.purge();
    vm.check().unwrap();
}

#[test]
fn freeing_null_does_nothing_and_null_is_never_an_area() {
    let mut vm = new_vm(64, 64);
    let p = vm.vmalloc(PAGE_SIZE).unwrap();
    let before = snapshot(&vm);
    let failures = vm.stats().failures;
    let null = VirtAddr::new(0);
    assert_eq!(vm.vfree(null), Ok(()));
    assert_eq!(vm.vunmap(null), Ok(()));
    assert_eq!(vm.iounmap(null), Ok(()));
    assert_eq!((snapshot(&vm), vm.stats().failures), (before, failures));
    vm.vfree(p).unwrap();
    // A window holding address 0 could hand out NULL: refused.
    let at_zero = VirtRange::new(VirtAddr::new(0), 64 * PAGE).unwrap();
    assert_eq!(
        Vmalloc::new(SimBackend::new(at_zero, 64), at_zero, VmallocConfig::default()).unwrap_err(),
        VmallocError::BadRange
    );
}

#[test]
fn a_purge_gives_back_the_tables_its_ranges_left_empty_after_a_walk_invalidation() {
    let mut vm = new_vm(1 << 16, 4096);
    let keep = vm.vmalloc(PAGE_SIZE).unwrap();
    let tables = vm.backend().table_pages();
    // 3 MiB from the second 2 MiB stretch on: two more last-level tables.
    let p = vm.vmalloc_aligned(3 << 20, 2 << 20).unwrap();
    assert_eq!(vm.backend().table_pages(), tables + 2);
    vm.vfree(p).unwrap();
    assert_eq!(vm.backend().table_pages(), tables + 2, "kept until the purge: the TLB may still hold them");
    let c0 = vm.backend().counters;
    vm.purge();
    let c1 = vm.backend().counters;
    assert_eq!(vm.backend().table_pages(), tables, "the emptied tables went, the one `keep` uses stays");
    // 768 pages: a full flush, which covers the walk caches too (no TLBI of their own).
    assert_eq!((c1.tables_freed - c0.tables_freed, c1.walk_tlbis - c0.walk_tlbis), (2, 0));
    assert_eq!((c1.full_flushes - c0.full_flushes, c1.barrier_pairs - c0.barrier_pairs), (1, 1));
    assert_eq!(vm.stats().tables_freed, 2);
    assert!(vm.backend().has_table(3, keep));
    assert_eq!(c1.violations, 0);
    // Mapping there again makes them anew.
    let q = vm.vmalloc_aligned(3 << 20, 2 << 20).unwrap();
    assert_eq!(q, p);
    assert_eq!(vm.backend().table_pages(), tables + 2);
    vm.vfree(q).unwrap();
    vm.vfree(keep).unwrap();
    vm.purge();
    assert_eq!(vm.backend().table_pages(), 2, "the level-1 and level-2 tables, wider than the window");
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn the_oracle_catches_a_table_freed_without_a_walk_invalidation() {
    // A backend whose reclaim issues last-level TLBIs only (`vaale1is`): a walk cache may
    // still point at the table it frees. The simulation counts each such table.
    let mut vm = new_vm(1 << 16, 4096);
    vm.sim_mut().break_walk_invalidation();
    let p = vm.vmalloc(4 * PAGE_SIZE).unwrap();
    vm.vfree(p).unwrap();
    vm.purge();
    let c = vm.backend().counters;
    assert_eq!((c.tables_freed, c.walk_tlbis), (1, 0));
    assert_eq!(c.violations, 1, "a table freed while a walk cache may hold it");
}

#[test]
fn a_failed_allocation_gives_its_tables_back_at_once() {
    // A 4 GiB window, frames for 1.5 GiB: vmalloc(2 GiB) fails part-way, with hundreds of
    // last-level tables made. Size knob: under Miri frames for 12 MiB and vmalloc(16 MiB),
    // 6 tables (each page mapped is interpreted: 1.5 GiB of pages would take hours).
    let (frames, ask, min_tables) = if cfg!(miri) { (3 << 10, 16 << 20, 6) } else { (3 << 17, 2 << 30, 384) };
    // Under Miri a window of 64 MiB (the simulator keeps state for each page of it: over
    // 4 GiB, a million pages, Tree Borrows took a minute).
    let window = VirtRange::new(VirtAddr::new(BASE), if cfg!(miri) { 64 << 20 } else { 4 << 30 }).unwrap();
    let mut vm = Vmalloc::new(SimBackend::new(window, frames), window, VmallocConfig::default()).unwrap();
    // The level-1 table (512 GiB, wider than the window) is made once and kept; so is the
    // level-2 table (1 GiB) of Miri's smaller window.
    let p = vm.vmalloc(PAGE_SIZE).unwrap();
    vm.vfree(p).unwrap();
    vm.purge();
    let tables = vm.backend().table_pages();
    assert_eq!(tables, if cfg!(miri) { 2 } else { 1 });
    let made = vm.backend().counters.tables_freed;
    assert_eq!(vm.vmalloc(ask), Err(VmallocError::NoFrames));
    let c = vm.backend().counters;
    assert_eq!(vm.backend().table_pages(), tables, "no purge needed: given back by the failed call");
    assert!(c.tables_freed - made >= min_tables, "{} tables freed", c.tables_freed - made);
    assert_eq!((c.frames_in_use, c.mapped, c.violations), (0, 0, 0));
    assert_eq!(vm.stats().parked_areas, 0);
    vm.check().unwrap();
    // Same through a map failure part-way (a table page could not be had).
    let (part, maps) = if cfg!(miri) { (8 << 20, 10) } else { (64 << 20, 100) };
    vm.sim_mut().fail_maps_after(maps);
    assert_eq!(vm.vmalloc(part), Err(VmallocError::MapFailed(MapError::NoMemory)));
    assert_eq!(vm.backend().table_pages(), tables);
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn ioremap_aligns_a_block_aligned_range_so_blocks_can_map_it() {
    let window = VirtRange::new(VirtAddr::new(BASE), 4 << 30).unwrap();
    let mut vm = Vmalloc::new(SimBackend::new(window, 64), window, VmallocConfig::default()).unwrap();
    let dev = DeviceAttr::DeviceNGnRE;
    let small = vm.ioremap(PhysAddr::new(0x0900_0000), 0x1000, dev).unwrap();
    assert_eq!(small.as_u64(), BASE, "small mappings as before: lowest fit");
    // 2 MiB aligned physically, 4 MiB: the virtual range is 2 MiB aligned, the offset kept.
    let pa = 0x10_0020_0000u64;
    let p = vm.ioremap(PhysAddr::new(pa + 0x18), 4 << 20, dev).unwrap();
    assert_eq!(p.as_u64() % (2 << 20), 0x18);
    assert_eq!(vm.vmalloc_to_phys(p), Some(PhysAddr::new(pa + 0x18)));
    // 1 GiB aligned, 1 GiB and more: 1 GiB aligned virtually. Not under Miri: the simulator
    // maps device memory page by page (262,145 pages, hours interpreted).
    let q = if cfg!(miri) {
        None
    } else {
        let q = vm.ioremap(PhysAddr::new(0x40_0000_0000), (1 << 30) + 4096, dev).unwrap();
        assert_eq!(q.as_u64() % (1 << 30), 0);
        Some(q)
    };
    // Not aligned physically: no alignment asked (the next page-aligned fit).
    let r = vm.ioremap(PhysAddr::new(0x10_0000_1000), 4 << 20, dev).unwrap();
    assert_eq!(r.as_u64() % (2 << 20), 0x2000, "right after `small` and its guard page");
    for a in [small, p, r].into_iter().chain(q) {
        vm.iounmap(a).unwrap();
    }
    vm.purge();
    assert_eq!(vm.backend().table_pages(), 1, "only the level-1 table, wider than the window");
    assert_eq!(vm.backend().counters.violations, 0);
}

/// A purge with more parked ranges than span slots merges the lowest ones into one span;
/// that span must never take in an area set aside with `reserve` (another instance's
/// window, vm_map_ram's region), whose tables belong to someone else: an empty table there
/// (its owner may hold a handle to it) survives the purge.
#[test]
fn a_purge_never_frees_the_tables_of_a_reserved_area() {
    use memory::vmalloc::VmBackend;
    let mut vm = new_vm(1 << 18, 4096);
    let a = vm.vmalloc(PAGE_SIZE).unwrap();
    let r = vm.reserve(512, 2 << 20).unwrap();
    // The owner of the reserved area maps a page there and unmaps it: an empty table.
    let mut f = [PhysAddr::new(0)];
    assert_eq!(vm.sim_mut().alloc_frames(&mut f), 1);
    vm.sim_mut().map_pages(r, &f, memory::vmalloc::Prot::ReadWrite).unwrap();
    vm.sim_mut().unmap_pages(r, 1, |_| {});
    vm.sim_mut().tlb_flush_all();
    assert!(vm.sim_mut().has_table(3, r));
    // More spread-out parked ranges above it than a purge has span slots.
    let above: Vec<VirtAddr> = (0..24).map(|_| vm.vmalloc_aligned(PAGE_SIZE, 8 << 20).unwrap()).collect();
    assert!(above.iter().all(|p| p.as_u64() > r.as_u64()));
    vm.vfree(a).unwrap();
    for p in above {
        vm.vfree(p).unwrap();
    }
    vm.purge();
    assert!(vm.sim_mut().has_table(3, r), "the reserved area's table was freed by a purge");
    vm.check().unwrap();
}
