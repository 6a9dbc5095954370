//! Quarantine mode (`VmallocConfig::quarantine`) on the simulated MMU: a freed area's frames
//! are poisoned and held until the purge's flush, a write through a stale TLB entry (here:
//! into the frame, as the hardware would) is reported at the purge with the area, its
//! callers and the offset, and nothing is freed before the flush.

use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{VmFlags, Vmalloc, VmallocConfig, BLOCK_SIZE, QUARANTINE_POISON};

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;

fn new_vm(quarantine: bool) -> Vmalloc<SimBackend> {
    let range = VirtRange::new(VirtAddr::new(BASE), 16384 * PAGE).unwrap();
    let cfg = VmallocConfig { quarantine, ..VmallocConfig::default() };
    Vmalloc::new(SimBackend::new(range, 4096).with_blocks(2), range, cfg).unwrap()
}

fn frames_of(vm: &Vmalloc<SimBackend>, p: VirtAddr, pages: usize) -> Vec<PhysAddr> {
    (0..pages).map(|i| vm.vmalloc_to_phys(VirtAddr::new(p.as_u64() + i as u64 * PAGE)).unwrap()).collect()
}

#[test]
fn freed_frames_are_held_poisoned_until_the_purge_and_writes_are_reported() {
    let mut vm = new_vm(true);
    let (p, alloc_line) = (vm.vmalloc(3 * PAGE_SIZE).unwrap(), line!());
    let frames = frames_of(&vm, p, 3);
    let (_, free_line) = (vm.vfree(p).unwrap(), line!());
    // Held: not back with the frame allocator, so nobody else can get them.
    assert!(frames.iter().all(|&f| vm.backend().frame_taken(f)));
    let s = vm.stats();
    assert_eq!(s.quarantined_frames, 3 + 1, "three frames and one index frame");
    assert_eq!(vm.backend().counters.frames_in_use, 4);
    // A write through the stale TLB entry lands in the held frame.
    vm.sim_mut().poke_frame(frames[1], 0x123, 0x5a);
    vm.purge();
    let s = vm.stats();
    assert_eq!((s.quarantined_frames, s.quarantine_hits), (0, 1));
    let r = vm.last_use_after_vfree().expect("reported");
    assert_eq!((r.area_start, r.offset, r.value), (p, PAGE + 0x123, 0x5a));
    assert_eq!(r.addr.as_u64(), p.as_u64() + PAGE + 0x123);
    assert_eq!((r.caller.unwrap().line(), r.freer.unwrap().line()), (alloc_line, free_line));
    let text = r.to_string();
    assert!(text.contains("use after vfree") && text.contains("offset 0x1123"), "{text}");
    assert!(frames.iter().all(|&f| !vm.backend().frame_taken(f)), "freed after the purge");
    assert_eq!(vm.backend().counters.frames_in_use, 0);
    assert_eq!(vm.backend().counters.violations, 0);
    vm.check().unwrap();
    // An untouched quarantine reports nothing.
    let q = vm.vzalloc(PAGE_SIZE).unwrap();
    vm.vfree(q).unwrap();
    vm.purge();
    assert_eq!(vm.stats().quarantine_hits, 1);
}

#[test]
fn without_quarantine_frames_go_back_at_vfree() {
    let mut vm = new_vm(false);
    let p = vm.vmalloc(2 * PAGE_SIZE).unwrap();
    let frames = frames_of(&vm, p, 2);
    vm.vfree(p).unwrap();
    assert!(frames.iter().all(|&f| !vm.backend().frame_taken(f)));
    assert_eq!(vm.stats().quarantined_frames, 0);
}

#[test]
fn many_areas_and_huge_blocks_are_held_and_all_freed() {
    let mut vm = new_vm(true);
    // Size knob: 150 areas under Miri, 300 natively (their entries fill more than one
    // index page either way).
    let n = if cfg!(miri) { 150 } else { 300 };
    let mut areas = Vec::new();
    for i in 0..n {
        areas.push(vm.vmalloc((1 + i % 3) * PAGE_SIZE).unwrap());
    }
    let pages: usize = (0..n).map(|i| 1 + i % 3).sum();
    let huge = vm.vmalloc_with(BLOCK_SIZE + PAGE_SIZE, PAGE_SIZE, VmFlags::HUGE).unwrap();
    assert_eq!(vm.stats().huge_blocks, 1);
    let block = vm.vmalloc_to_phys(huge).unwrap();
    for a in areas {
        vm.vfree(a).unwrap();
    }
    vm.vfree(huge).unwrap();
    let s = vm.stats();
    let entries = pages + 2; // the block is one entry, the tail page another
    let index = entries.div_ceil(255);
    assert!(index > 1);
    assert_eq!(s.quarantined_frames, pages + 512 + 1 + index);
    assert_eq!(vm.backend().counters.blocks_in_use, 1, "the block is held");
    // A write into the block's sixth page.
    vm.sim_mut().poke_frame(PhysAddr::new(block.as_u64() + 5 * PAGE), 7, 0);
    vm.purge();
    let s = vm.stats();
    assert_eq!((s.quarantined_frames, s.quarantine_hits), (0, 1));
    let r = vm.last_use_after_vfree().unwrap();
    assert_eq!((r.area_start, r.offset, r.value), (huge, 5 * PAGE + 7, 0));
    let c = vm.backend().counters;
    assert_eq!((c.frames_in_use, c.blocks_in_use, c.violations), (0, 0, 0));
    vm.check().unwrap();
}

#[test]
fn no_index_frame_means_freed_at_once_not_lost() {
    let mut vm = new_vm(true);
    let p = vm.vmalloc(2 * PAGE_SIZE).unwrap();
    let frames = frames_of(&vm, p, 2);
    vm.sim_mut().fail_frames_after(0);
    vm.vfree(p).unwrap();
    vm.sim_mut().clear_faults();
    let s = vm.stats();
    assert_eq!((s.quarantined_frames, s.quarantine_bypassed), (0, 1));
    assert!(frames.iter().all(|&f| !vm.backend().frame_taken(f)));
    vm.purge();
    assert_eq!(vm.backend().counters.frames_in_use, 0);
    assert_eq!(QUARANTINE_POISON, 0x6b);
}
