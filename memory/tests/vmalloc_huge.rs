//! Huge vmalloc areas ([`VmFlags::HUGE`], Linux's `vmalloc_huge`) on the simulated MMU:
//! 2 MiB blocks for whole 2 MiB stretches, pages for the tail and where no block is free,
//! the guard page kept, and every failure part-way leaving nothing behind.

use hal::{VirtAddr, VirtRange, PAGE_SIZE};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{VmFlags, Vmalloc, VmallocConfig, VmallocError, BLOCK_PAGES, BLOCK_SIZE};

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;
const BLOCK: u64 = BLOCK_SIZE as u64;
/// A 64 MiB window.
const WINDOW_PAGES: u64 = 16384;

fn new_vm(frames: usize, blocks: usize) -> Vmalloc<SimBackend> {
    let range = VirtRange::new(VirtAddr::new(BASE), WINDOW_PAGES * PAGE).unwrap();
    Vmalloc::new(SimBackend::new(range, frames).with_blocks(blocks), range, VmallocConfig::default()).unwrap()
}

fn holes(vm: &Vmalloc<SimBackend>) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    vm.free_space().for_each_hole(|s, e| v.push((s, e)));
    v
}

/// Everything a failed call must leave as it was (failure counters aside).
fn snapshot(vm: &Vmalloc<SimBackend>) -> (Vec<(u64, u64)>, usize, usize, usize, usize, usize) {
    let (s, c) = (vm.stats(), vm.backend().counters);
    (holes(vm), s.live_areas, s.huge_blocks, c.frames_in_use, c.blocks_in_use, c.mapped)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn whole_2mib_stretches_get_blocks_and_the_tail_gets_pages() {
    let mut vm = new_vm(1024, 8);
    // A small area first, so the huge one cannot simply start the window.
    let small = vm.vmalloc(PAGE_SIZE).unwrap();
    let size = 2 * BLOCK_SIZE + 3 * PAGE_SIZE;
    let p = vm.vmalloc_with(size, PAGE_SIZE, VmFlags::HUGE).unwrap();
    assert_eq!(p.as_u64() % BLOCK, 0, "a huge area starts at a 2 MiB boundary");
    assert!(p.as_u64() > small.as_u64());
    let b = vm.backend();
    assert!(b.is_block(p) && b.is_block(VirtAddr::new(p.as_u64() + BLOCK + 5 * PAGE)));
    let tail = VirtAddr::new(p.as_u64() + 2 * BLOCK);
    assert!(!b.is_block(tail) && b.pte(tail).is_some(), "the tail is mapped with pages");
    let guard = VirtAddr::new(p.as_u64() + size as u64);
    assert!(b.pte(guard).is_none(), "the guard page stays unmapped");
    assert_eq!((b.counters.blocks_in_use, b.counters.frames_in_use), (2, 1 + 3));
    // One descriptor per block, one per page.
    assert_eq!(b.counters.ptes_written, 1 + 2 + 3);
    let s = vm.stats();
    assert_eq!((s.huge_blocks, s.mapped_pages, s.owned_frames), (2, 1 + 2 * BLOCK_PAGES + 3, 1 + 2 * BLOCK_PAGES + 3));
    let info = vm.info().to_string();
    assert!(info.contains(&format!("pages={} vmalloc huge\n", 2 * BLOCK_PAGES + 3)), "{info}");
    assert!(info.contains("pages=1 vmalloc\n"), "{info}");
    let area = vm.find_area(p).unwrap();
    assert_eq!((area.pages, area.size), (2 * BLOCK_PAGES + 3, size as u64 + PAGE));
    // The memory works across the block / page boundary, and translates contiguously.
    let data = pattern(3 * PAGE_SIZE, 7);
    let at = VirtAddr::new(p.as_u64() + 2 * BLOCK - PAGE);
    assert!(vm.sim_mut().write(at, &data));
    let mut back = vec![0u8; data.len()];
    assert!(vm.backend().read(at, &mut back));
    assert_eq!(back, data);
    let pa0 = vm.vmalloc_to_phys(p).unwrap();
    assert_eq!(vm.vmalloc_to_phys(VirtAddr::new(p.as_u64() + BLOCK - 1)).unwrap().as_u64(), pa0.as_u64() + BLOCK - 1);

    vm.vfree(p).unwrap();
    vm.vfree(small).unwrap();
    vm.purge();
    let (s, c) = (vm.stats(), vm.backend().counters);
    assert_eq!((s.live_areas, s.huge_blocks, s.owned_frames, s.mapped_pages), (0, 0, 0, 0));
    assert_eq!((c.blocks_in_use, c.frames_in_use, c.mapped, c.violations), (0, 0, 0, 0));
    assert_eq!(s.frames_taken, s.frames_returned);
    assert_eq!(holes(&vm), vec![(BASE, BASE + WINDOW_PAGES * PAGE)]);
    vm.check().unwrap();
}

#[test]
fn below_2mib_the_flag_changes_nothing() {
    let mut vm = new_vm(1024, 8);
    let a = vm.vmalloc(PAGE_SIZE).unwrap();
    let p = vm.vmalloc_with(BLOCK_SIZE - PAGE_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
    assert_eq!(p.as_u64(), a.as_u64() + 2 * PAGE, "placed like any area: right after the first and its guard");
    assert_eq!((vm.backend().counters.blocks_in_use, vm.stats().huge_blocks), (0, 0));
    vm.vfree(p).unwrap();
    vm.vfree(a).unwrap();
    vm.purge();
    assert_eq!(vm.backend().counters.frames_in_use, 0);
}

#[test]
fn without_free_blocks_stretches_fall_back_to_pages() {
    let mut vm = new_vm(4096, 8);
    vm.sim_mut().fail_blocks_after(1);
    let size = 3 * BLOCK_SIZE;
    let p = vm.vmalloc_with(size, PAGE_SIZE, VmFlags::HUGE).unwrap();
    let b = vm.backend();
    assert!(b.is_block(p));
    for k in 1..3 {
        let at = VirtAddr::new(p.as_u64() + k * BLOCK);
        assert!(!b.is_block(at) && b.pte(at).is_some(), "stretch {k} mapped with pages");
    }
    assert_eq!((b.counters.blocks_in_use, b.counters.frames_in_use), (1, 2 * BLOCK_PAGES));
    assert_eq!((vm.stats().huge_blocks, vm.stats().huge_fallbacks), (1, 2));
    vm.vfree(p).unwrap();
    vm.purge();
    let c = vm.backend().counters;
    assert_eq!((c.blocks_in_use, c.frames_in_use, c.mapped, c.violations), (0, 0, 0, 0));
    vm.check().unwrap();

    // A backend with no blocks at all (the trait's default) maps huge areas with pages.
    let mut plain = new_vm(1024, 0);
    let q = plain.vmalloc_with(BLOCK_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
    assert_eq!(q.as_u64() % BLOCK, 0);
    assert_eq!((plain.backend().counters.frames_in_use, plain.stats().huge_fallbacks), (BLOCK_PAGES, 1));
    plain.vfree(q).unwrap();
    plain.purge();
    assert_eq!(plain.backend().counters.frames_in_use, 0);
}

#[test]
fn running_out_part_way_gives_everything_back() {
    // Frames run out in the tail after two blocks were mapped; then map calls fail at every
    // point. Each time the allocator and the backend are as they were. Size knob: under
    // Miri the first and last frame of the tail, and maps failing at the first block, the
    // last block and the tail.
    let (frame_ks, map_ks): (&[usize], &[usize]) =
        if cfg!(miri) { (&[0, 3], &[0, 2, 3]) } else { (&[0, 1, 2, 3], &[0, 1, 2, 3]) };
    for &k in frame_ks {
        let mut vm = new_vm(1024, 8);
        let keep = vm.vmalloc(PAGE_SIZE).unwrap();
        let before = snapshot(&vm);
        vm.sim_mut().fail_frames_after(k);
        let r = vm.vmalloc_with(2 * BLOCK_SIZE + 8 * PAGE_SIZE, PAGE_SIZE, VmFlags::HUGE);
        assert_eq!(r, Err(VmallocError::NoFrames));
        vm.sim_mut().clear_faults();
        vm.purge();
        assert_eq!(snapshot(&vm), before, "frames fail after {k}");
        assert_eq!(vm.backend().counters.violations, 0);
        vm.check().unwrap();
        vm.vfree(keep).unwrap();
    }
    for &k in map_ks {
        let mut vm = new_vm(4096, 8);
        let before = snapshot(&vm);
        vm.sim_mut().fail_maps_after(k);
        let r = vm.vmalloc_with(3 * BLOCK_SIZE + PAGE_SIZE, PAGE_SIZE, VmFlags::HUGE | VmFlags::ZERO);
        assert!(r.is_err(), "maps fail after {k}");
        vm.sim_mut().clear_faults();
        vm.purge();
        assert_eq!(snapshot(&vm), before, "maps fail after {k}");
        assert_eq!(vm.backend().counters.violations, 0);
        vm.check().unwrap();
    }
}

#[test]
fn a_reused_block_is_zeroed_for_vzalloc_only() {
    let mut vm = new_vm(64, 1);
    let p = vm.vmalloc_with(BLOCK_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
    let data = pattern(PAGE_SIZE, 3);
    let at = VirtAddr::new(p.as_u64() + 17 * PAGE);
    assert!(vm.sim_mut().write(at, &data));
    vm.vfree(p).unwrap();
    vm.purge();
    // The one block comes back with its old contents...
    let q = vm.vmalloc_with(BLOCK_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
    let mut back = vec![0u8; PAGE_SIZE];
    assert!(vm.backend().read(VirtAddr::new(q.as_u64() + 17 * PAGE), &mut back));
    assert_eq!(back, data, "the simulation keeps a freed block's bytes");
    vm.vfree(q).unwrap();
    vm.purge();
    // ...unless zeroing was asked for.
    let z = vm.vmalloc_with(BLOCK_SIZE, PAGE_SIZE, VmFlags::HUGE | VmFlags::ZERO).unwrap();
    assert!(vm.backend().is_block(z));
    assert!(vm.backend().read(VirtAddr::new(z.as_u64() + 17 * PAGE), &mut back));
    assert!(back.iter().all(|&b| b == 0), "vzalloc'd block not zeroed");
    vm.vfree(z).unwrap();
}

#[test]
fn vrealloc_moves_a_huge_area_and_keeps_its_data() {
    let mut vm = new_vm(2048, 8);
    let p = vm.vmalloc_with(BLOCK_SIZE + PAGE_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
    let data = pattern(3 * PAGE_SIZE, 9);
    let at = BLOCK - PAGE;
    assert!(vm.sim_mut().write(VirtAddr::new(p.as_u64() + at), &data[..2 * PAGE_SIZE]));
    let q = vm.vrealloc(p, 2 * BLOCK_SIZE).unwrap();
    assert_ne!(q, p, "a huge area moves rather than being cut or grown in place");
    assert!(vm.backend().is_block(q) && vm.backend().is_block(VirtAddr::new(q.as_u64() + BLOCK)));
    let mut back = vec![0u8; 2 * PAGE_SIZE];
    assert!(vm.backend().read(VirtAddr::new(q.as_u64() + at), &mut back));
    assert_eq!(back, data[..2 * PAGE_SIZE]);
    // Shrinking below 2 MiB moves it to a page-mapped area.
    let r = vm.vrealloc(q, PAGE_SIZE).unwrap();
    assert!(!vm.backend().is_block(r));
    vm.vfree(r).unwrap();
    vm.purge();
    let c = vm.backend().counters;
    assert_eq!((c.blocks_in_use, c.frames_in_use, c.mapped, c.violations), (0, 0, 0, 0));
    assert_eq!(vm.stats().huge_blocks, 0);
    vm.check().unwrap();
}

#[test]
fn strict_mode_and_the_lazy_purge_flush_blocks_before_reuse() {
    // Reusing a block's range before its flush would be a violation the simulation counts.
    for strict in [false, true] {
        let cfg = VmallocConfig { strict, lazy_max_pages: 2 * BLOCK_PAGES, ..VmallocConfig::default() };
        let range = VirtRange::new(VirtAddr::new(BASE), 4 * BLOCK).unwrap();
        let mut vm = Vmalloc::new(SimBackend::new(range, 2048).with_blocks(4), range, cfg).unwrap();
        // Size knob: 6 rounds under Miri (a purge every second round), 20 natively.
        for _ in 0..if cfg!(miri) { 6 } else { 20 } {
            let p = vm.vmalloc_with(BLOCK_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
            assert!(vm.backend().is_block(p));
            vm.vfree(p).unwrap();
        }
        vm.purge();
        let c = vm.backend().counters;
        assert_eq!((c.blocks_in_use, c.violations), (0, 0), "strict {strict}");
        vm.check().unwrap();
    }
}
