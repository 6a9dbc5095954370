//! The pools of ready-made areas (`vmalloc/pool.rs`, after Linux 6.9's `vmap_node` pools):
//! the aligned ranges a lazy purge flushed are kept by size and handed out again to aligned
//! requests without a free-tree search; what a lazy cycle did not take goes back at the
//! next purge, everything at an explicit one or when an allocation finds no hole; never a
//! range before its flush.

use hal::{VirtAddr, VirtRange, PAGE_SIZE};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{Vmalloc, VmallocConfig, VmallocError, POOL_MAX_PAGES};

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;

fn new_vm(pages: u64, lazy: usize, pools: bool) -> Vmalloc<SimBackend> {
    let w = VirtRange::new(VirtAddr::new(BASE), pages * PAGE).unwrap();
    let cfg = VmallocConfig { lazy_max_pages: lazy, pools, ..VmallocConfig::default() };
    // 4,096 frames: more than any test here keeps mapped, and cheap to set up under Miri.
    Vmalloc::new(SimBackend::new(w, 4096), w, cfg).unwrap()
}

/// Parks `n` one-page areas aligned to two pages (two pages each with the guard, so they
/// lie back to back) and returns their addresses.
fn churn(vm: &mut Vmalloc<SimBackend>, n: usize) -> Vec<VirtAddr> {
    let v: Vec<VirtAddr> = (0..n).map(|_| vm.vmalloc_aligned(PAGE_SIZE, 2 * PAGE_SIZE).unwrap()).collect();
    for &p in &v {
        vm.vfree(p).unwrap();
    }
    v
}

#[test]
fn a_lazy_purge_pools_what_it_flushed_and_the_next_allocation_of_that_size_takes_it() {
    let mut vm = new_vm(4096, 16, true);
    // 9 areas of 2 pages: the ninth free passes 16 parked pages and purges.
    let first = churn(&mut vm, 9);
    let s = vm.stats();
    assert_eq!((s.purges, s.parked_areas, s.pooled_areas, s.pooled_pages), (1, 0, 9, 18), "{s:?}");
    vm.check().unwrap();
    // The pooled ranges left the free tree: it is the one hole above them.
    assert_eq!(vm.free_space().holes(), 1);
    // The purge pools its ranges highest first, so a pool hands out its lowest range
    // first, without a search.
    let p = vm.vmalloc_aligned(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    assert_eq!(p, first[0]);
    assert_eq!(vm.stats().pooled_areas, 8);
    // Another size is not served from the pools: lowest fit above them.
    let q = vm.vmalloc_aligned(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    assert_eq!(q.as_u64(), BASE + 18 * PAGE);
    // Nor is a page-aligned request of the pooled size: the free tree serves it.
    let r = vm.vmalloc(PAGE_SIZE).unwrap();
    assert_eq!(r.as_u64(), BASE + 21 * PAGE);
    assert_eq!(vm.stats().pooled_areas, 8);
    vm.vfree(r).unwrap();
    vm.check().unwrap();
    // Written and read back: a pooled range maps as any other.
    assert!(vm.sim_mut().write(p, &[7; PAGE_SIZE]));
    vm.vfree(p).unwrap();
    vm.vfree(q).unwrap();
    // An explicit purge gives every pooled range back: one hole again.
    vm.purge();
    let s = vm.stats();
    assert_eq!((s.pooled_areas, s.pooled_pages, s.free_holes, s.live_areas), (0, 0, 1, 0), "{s:?}");
    vm.check().unwrap();
    assert_eq!(vm.backend().counters.violations, 0);
}

#[test]
fn each_lazy_purge_gives_back_what_the_last_one_pooled_and_no_one_took() {
    let mut vm = new_vm(1 << 16, 64, true);
    churn(&mut vm, 33); // 66 parked pages: one purge, 33 pooled
    assert_eq!(vm.stats().pooled_areas, 33);
    // Parked ranges of another size (4 pages with the guard): the next purge gives the
    // 33 untouched ranges back to the free tree and pools its own 17.
    let v: Vec<VirtAddr> = (0..17).map(|_| vm.vmalloc_aligned(3 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap()).collect();
    for p in v {
        vm.vfree(p).unwrap();
    }
    let s = vm.stats();
    assert_eq!((s.purges, s.pooled_areas, s.pooled_pages), (2, 17, 17 * 4), "{s:?}");
    vm.check().unwrap();
}

#[test]
fn page_aligned_areas_are_never_pooled() {
    let mut vm = new_vm(4096, 16, true);
    let v: Vec<VirtAddr> = (0..9).map(|_| vm.vmalloc(PAGE_SIZE).unwrap()).collect();
    for p in v {
        vm.vfree(p).unwrap();
    }
    let s = vm.stats();
    assert_eq!((s.purges, s.pooled_areas, s.free_holes), (1, 0, 1), "{s:?}");
    assert_eq!(vm.vmalloc(PAGE_SIZE).unwrap().as_u64(), BASE, "lowest fit");
}

#[test]
fn a_pooled_range_is_taken_only_when_its_start_has_the_alignment_asked() {
    let mut vm = new_vm(4096, 4, true);
    let _live = vm.vmalloc(PAGE_SIZE).unwrap(); // pages 0-1
                                                // Three 1-page areas at pages 2, 4, 6, purged into the 2-page pool, lowest first.
    churn(&mut vm, 3);
    assert_eq!(vm.stats().pooled_areas, 3);
    // 8-page alignment: page 2 is not aligned, so the free tree serves it (lowest fit
    // above the pooled ranges: page 8), and the pool is untouched.
    let p = vm.vmalloc_aligned(PAGE_SIZE, 8 * PAGE_SIZE).unwrap();
    assert_eq!(p.as_u64(), BASE + 8 * PAGE);
    assert_eq!(vm.stats().pooled_areas, 3);
    // 2-page alignment: page 2 has it, and comes from the pool.
    let q = vm.vmalloc_aligned(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    assert_eq!(q.as_u64(), BASE + 2 * PAGE);
    assert_eq!(vm.stats().pooled_areas, 2);
    vm.check().unwrap();
}

#[test]
fn an_allocation_that_finds_no_hole_gets_the_pooled_ranges_back_into_the_free_tree() {
    // 32 pages of window: 8 one-page areas (16 pages) churned into the pools, and 16 more
    // pages live; a 12-page allocation fits only once the pooled ranges merge again.
    let mut vm = new_vm(32, 8, true);
    let live = vm.vmalloc(15 * PAGE_SIZE).unwrap(); // 16 pages at the bottom
    churn(&mut vm, 5); // 10 pages: past 8, purged and pooled
    assert_eq!(vm.stats().pooled_areas, 5);
    let big = vm.vmalloc(12 * PAGE_SIZE).expect("the pools give their ranges back for an allocation with no hole");
    assert_eq!(big.as_u64(), BASE + 16 * PAGE);
    let s = vm.stats();
    assert_eq!(s.pooled_areas, 0, "{s:?}");
    vm.check().unwrap();
    vm.vfree(big).unwrap();
    vm.vfree(live).unwrap();
    vm.purge();
    assert_eq!(vm.stats().free_holes, 1);
    // And with nothing to give back, the same request past the window is NoVirtualSpace.
    let mut vm = new_vm(32, 8, true);
    let _live = vm.vmalloc(15 * PAGE_SIZE).unwrap();
    assert_eq!(vm.vmalloc(16 * PAGE_SIZE), Err(VmallocError::NoVirtualSpace));
    vm.check().unwrap();
}

#[test]
fn ranges_above_the_largest_pooled_size_go_back_to_the_free_tree() {
    let mut vm = new_vm(4096, 8, true);
    let p = vm.vmalloc_aligned(POOL_MAX_PAGES * PAGE_SIZE, 2 * PAGE_SIZE).unwrap(); // 257 pages with the guard
    vm.vfree(p).unwrap();
    let s = vm.stats();
    assert_eq!((s.purges, s.pooled_areas, s.free_holes), (1, 0, 1), "{s:?}");
    // The largest pooled size itself (255 pages + the guard) is pooled.
    let p = vm.vmalloc_aligned((POOL_MAX_PAGES - 1) * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    vm.vfree(p).unwrap();
    let s = vm.stats();
    assert_eq!((s.purges, s.pooled_areas, s.pooled_pages), (2, 1, POOL_MAX_PAGES), "{s:?}");
    vm.check().unwrap();
}

#[test]
fn with_pools_off_every_allocation_is_lowest_fit() {
    let mut vm = new_vm(4096, 16, false);
    churn(&mut vm, 9);
    let s = vm.stats();
    assert_eq!((s.purges, s.pooled_areas, s.free_holes), (1, 0, 1), "{s:?}");
    assert_eq!(vm.vmalloc_aligned(PAGE_SIZE, 2 * PAGE_SIZE).unwrap().as_u64(), BASE);
    // Switched on and off again at run time: off gives every pooled range back.
    vm.set_pools(true);
    let mut vm2 = new_vm(4096, 16, true);
    churn(&mut vm2, 9);
    assert_eq!(vm2.stats().pooled_areas, 9);
    vm2.set_pools(false);
    assert_eq!((vm2.stats().pooled_areas, vm2.stats().free_holes), (0, 1));
    vm2.check().unwrap();
    vm.check().unwrap();
}

#[test]
fn strict_mode_never_pools() {
    let w = VirtRange::new(VirtAddr::new(BASE), 4096 * PAGE).unwrap();
    let cfg = VmallocConfig { strict: true, ..VmallocConfig::default() };
    let mut vm = Vmalloc::new(SimBackend::new(w, 4096), w, cfg).unwrap();
    churn(&mut vm, 20);
    assert_eq!(vm.stats().pooled_areas, 0);
    assert_eq!(vm.vmalloc_aligned(PAGE_SIZE, 2 * PAGE_SIZE).unwrap().as_u64(), BASE, "strict mode stays lowest fit");
}

/// The stale-TLB oracle over many lazy cycles with pools: no pooled range is handed out
/// while a TLB entry of its last use could remain (the simulator counts every access
/// through a stale translation as a violation).
#[test]
fn pooled_ranges_never_meet_a_stale_translation() {
    let mut vm = new_vm(1 << 14, 64, true);
    let mut live: Vec<(VirtAddr, usize)> = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    // Size knob: under Miri 350 operations (some 11 purges, areas pooled).
    let ops = if cfg!(miri) { 350 } else { 20_000 };
    for i in 0..ops {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if live.len() < 40 && (seed & 3 != 0 || live.is_empty()) {
            let pages = 1 + (seed >> 8) as usize % 6;
            let align = PAGE_SIZE << ((seed >> 24) % 5);
            let p = vm.vmalloc_aligned(pages * PAGE_SIZE, align).unwrap();
            assert!(vm.sim_mut().write(p, &vec![i as u8; pages * PAGE_SIZE]));
            live.push((p, pages));
        } else {
            let (p, pages) = live.swap_remove((seed >> 16) as usize % live.len());
            let mut buf = vec![0u8; pages * PAGE_SIZE];
            assert!(vm.sim_mut().read(p, &mut buf));
            // One slice compare (a memcmp, which Miri runs natively), not a byte loop.
            assert!(buf[1..] == buf[..buf.len() - 1], "an area's contents changed under it");
            vm.vfree(p).unwrap();
        }
        if i % 1000 == 0 {
            vm.check().unwrap();
        }
    }
    vm.check().unwrap();
    assert_eq!(vm.backend().counters.violations, 0);
    assert!(vm.stats().purges > if cfg!(miri) { 5 } else { 10 }, "{} purges", vm.stats().purges);
    assert!(vm.stats().pooled_areas > 0);
}

#[test]
fn the_purge_threshold_grows_as_linuxs_with_fls_of_the_cpus() {
    use memory::vmalloc::lazy_max_pages;
    let got: Vec<usize> = [0, 1, 2, 3, 4, 7, 8, 16].iter().map(|&c| lazy_max_pages(c) / 8192).collect();
    assert_eq!(got, [1, 1, 2, 2, 3, 3, 4, 5]);
}

/// `vrealloc` grows in place into a pooled neighbour (flushed address space), as it did
/// into a hole before the pools: found by review, where the growth moved instead, and in a
/// full window failed with `NoVirtualSpace`.
#[test]
fn vrealloc_grows_in_place_into_a_pooled_neighbour() {
    let mut vm = new_vm(32, 1, true);
    let a = vm.vmalloc(PAGE_SIZE).unwrap(); // pages 0-1
    let b = vm.vmalloc_aligned(PAGE_SIZE, 2 * PAGE_SIZE).unwrap(); // pages 2-3
    let _rest = vm.vmalloc(27 * PAGE_SIZE).unwrap(); // pages 4-31: the window is full
    vm.vfree(b).unwrap(); // 2 parked pages > 1: purged, and pooled
    assert_eq!(vm.stats().pooled_areas, 1);
    assert_eq!(vm.vrealloc(a, 3 * PAGE_SIZE), Ok(a), "grown in place over the pooled range");
    assert_eq!(vm.find_area(a).map(|i| i.pages), Some(3));
    vm.check().unwrap();
}

#[test]
fn areas_aligned_beyond_64_kib_are_not_pooled() {
    use memory::vmalloc::POOL_MAX_ALIGN;
    let mut vm = new_vm(1 << 12, 4, true);
    let align = 2 * POOL_MAX_ALIGN as usize;
    let v: Vec<VirtAddr> = (0..3).map(|_| vm.vmalloc_aligned(PAGE_SIZE, align).unwrap()).collect();
    for p in v {
        vm.vfree(p).unwrap();
    }
    let s = vm.stats();
    assert_eq!((s.purges, s.pooled_areas, s.free_holes), (1, 0, 1), "{s:?}");
    // At 64 KiB they are.
    let v: Vec<VirtAddr> = (0..3).map(|_| vm.vmalloc_aligned(PAGE_SIZE, POOL_MAX_ALIGN as usize).unwrap()).collect();
    for p in v {
        vm.vfree(p).unwrap();
    }
    assert_eq!(vm.stats().pooled_areas, 3);
    vm.check().unwrap();
}
