//! Zones, gfp flags and watermarks on target. Run at `-m 8G` in `./x test` (DMA32 of
//! 3 GiB, Normal of 5 GiB); at other sizes the tests that need both zones say what they
//! found and fail, so the suite must be booted with Normal present:
//! - zoneinfo and buddyinfo add up to the RAM the device tree gives, less what is reserved;
//! - 100,000 `GFP_DMA32` allocations, with Normal not exhausted, never return a frame at or
//!   above 4 GiB;
//! - allocating until Normal is empty falls back to DMA32; `lowmem_reserve` stops a Normal
//!   request from taking the last of DMA32; `GFP_ATOMIC` succeeds where `GFP_KERNEL` would
//!   cross `min`, down to 3/8 of it, never lower.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use hal::{PhysAddr, PAGE_SIZE};
use memory::buddy::{self, BuddyError, BuddyStats, MAX_ORDER, ZONE_DMA, ZONE_DMA32, ZONE_NORMAL};
use memory::gfp::{__GFP_NOWARN, GFP_ATOMIC, GFP_DMA32, GFP_KERNEL};
use tests::test;

const FOUR_GIB: u64 = 1 << 32;

fn stats() -> BuddyStats {
    buddy::stats().expect("buddy allocator up")
}

fn info() -> &'static hal::boot::BootInfo {
    hal::boot::boot_info().expect("boot info")
}

/// The zones cover the device tree's RAM exactly, and each zone's frames add up.
fn zones_add_up_to_the_ram_of_the_device_tree() {
    let s = stats();
    let ram_pages: u64 = info().platform.ram.iter().map(|r| r.size() / PAGE_SIZE as u64).sum();
    let below: u64 = info()
        .platform
        .ram
        .iter()
        .map(|r| (r.end().as_u64().min(FOUR_GIB)).saturating_sub(r.start().as_u64()) / PAGE_SIZE as u64)
        .sum();
    let present: usize = s.zones.iter().map(|z| z.present).sum();
    assert_eq!(present as u64, ram_pages, "zones' present pages vs the device tree's memory nodes");
    assert_eq!(s.zones[ZONE_DMA32].present as u64, below);
    assert_eq!(s.zones[ZONE_NORMAL].present as u64, ram_pages - below);
    assert_eq!(s.zones[ZONE_DMA].present, 0, "QEMU virt's tree has no dma-ranges limit");
    let managed: usize = s.zones.iter().map(|z| z.managed).sum();
    assert_eq!(managed, s.total_pages);
    assert_eq!(managed + s.reserved_pages + s.metadata_pages, present, "managed + reserved + metadata = RAM");
    // buddyinfo and the hot lists hold exactly the free pages, zone by zone.
    for z in &s.zones {
        let listed: usize = z.free_blocks.iter().enumerate().map(|(o, n)| n << o).sum();
        assert_eq!(listed + z.hot_pages, z.free_pages);
        assert!(z.free_pages <= z.managed && z.present <= z.spanned);
    }
    let bi = s.buddyinfo().to_string_lines();
    let zi = alloc::format!("{}", s.zoneinfo());
    let populated = s.zones.iter().filter(|z| z.present != 0).count();
    assert_eq!(bi, populated, "one buddyinfo line per populated zone");
    assert_eq!(zi.matches("Node 0, zone").count(), populated);
    // Watermarks as Linux's.
    let kb = buddy::default_min_free_kbytes(s.total_pages);
    assert_eq!(s.min_free_kbytes, kb);
    let (w, r) = buddy::per_zone_wmarks(kb, &[s.zones[0].managed, s.zones[1].managed, s.zones[2].managed]);
    for (i, z) in s.zones.iter().enumerate() {
        assert_eq!([z.min, z.low, z.high], w[i]);
        assert_eq!(z.lowmem_reserve, r[i]);
    }
    hal::print!(
        "({} MiB of RAM: {} pages DMA32, {} Normal; min_free_kbytes {kb}) ",
        ram_pages * 4 / 1024,
        below,
        ram_pages - below
    );
}

trait Lines {
    fn to_string_lines(&self) -> usize;
}

impl Lines for memory::buddy::BuddyInfo {
    fn to_string_lines(&self) -> usize {
        alloc::format!("{self}").lines().count()
    }
}

fn need_both_zones(s: &BuddyStats) {
    assert!(
        s.zones[ZONE_NORMAL].managed > 0 && s.zones[ZONE_DMA32].managed > 0,
        "this test needs DMA32 and Normal: boot with QEMU_MEM=8G"
    );
}

/// 100,000 `GFP_DMA32` allocations (orders 0 to 2) held at once, with Normal untouched:
/// none at or above 4 GiB.
fn gfp_dma32_never_at_or_above_4_gib() {
    need_both_zones(&stats());
    let mut held: Vec<(PhysAddr, usize)> = Vec::with_capacity(100_000);
    let start = stats();
    for i in 0..100_000usize {
        let order = [0, 0, 1, 0, 2][i % 5];
        let pa = buddy::alloc_pages_gfp(GFP_DMA32, order).expect("DMA32 has room for 100,000 small blocks");
        assert!(pa.as_u64() + ((PAGE_SIZE as u64) << order) <= FOUR_GIB, "GFP_DMA32 got {pa:#x} (order {order})");
        held.push((pa, order));
    }
    let mid = stats();
    assert_eq!(mid.zones[ZONE_NORMAL].free_pages, start.zones[ZONE_NORMAL].free_pages, "Normal was not used");
    for &(pa, order) in &held {
        // SAFETY: allocated above, never used.
        unsafe { buddy::free_pages(pa, order) }.unwrap();
    }
    assert_eq!(stats().free_pages, start.free_pages);
    drop(held);
    hal::print!(
        "(DMA32 free went from {} to {} pages and back) ",
        start.zones[ZONE_DMA32].free_pages,
        mid.zones[ZONE_DMA32].free_pages
    );
}

/// Normal emptied to its `min`, then DMA32 down to `min + lowmem_reserve[Normal]` by
/// kernel requests; then `GFP_ATOMIC` to 3/8 of `min` in both; `GFP_DMA32` may still take
/// DMA32 down to its own `min` (the reserve is for it). Exact frame counts throughout.
fn fallback_lowmem_reserve_and_atomic_reserves() {
    // What reclaim could give back is given back first (the quarantine, empty slabs, the
    // per-CPU lists), so the totals compare exactly at the end.
    memory::kernel::purge();
    memory::slab::shrink();
    buddy::drain_hot();
    let start = stats();
    need_both_zones(&start);
    let (n0, d0) = (start.zones[ZONE_NORMAL], start.zones[ZONE_DMA32]);
    // No allocation may happen behind the test's back while memory is short: the vector
    // holding the blocks is allocated up front.
    let mut held: Vec<(PhysAddr, usize)> = Vec::with_capacity(2 * (start.free_pages >> MAX_ORDER) + 64 * 1024);
    // Order-10 kernel requests: Normal first, then DMA32 once Normal cannot give one.
    let mut first_dma32 = None;
    loop {
        match buddy::alloc_pages_gfp(GFP_KERNEL | __GFP_NOWARN, MAX_ORDER) {
            Ok(pa) => {
                if pa.as_u64() < FOUR_GIB && first_dma32.is_none() {
                    // What the zone itself holds: frames on per-CPU lists are not its to give
                    // (as Linux's NR_FREE_PAGES).
                    let n = stats().zones[ZONE_NORMAL];
                    first_dma32 = Some(n.free_pages - n.hot_pages);
                }
                held.push((pa, MAX_ORDER));
            }
            Err(BuddyError::BelowMin | BuddyError::OutOfMemory) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let normal_left = first_dma32.expect("fell back to DMA32");
    assert!(
        normal_left < n0.min + (1 << MAX_ORDER),
        "fell back only once Normal could not give a block: {normal_left}"
    );
    // Order-0 kernel requests until refused: both zones at their marks exactly.
    loop {
        match buddy::alloc_pages_gfp(GFP_KERNEL | __GFP_NOWARN, 0) {
            Ok(pa) => held.push((pa, 0)),
            Err(e) => {
                assert_eq!(e, BuddyError::BelowMin, "frames are there, refused by the watermarks");
                break;
            }
        }
    }
    let s = stats();
    let (n, d) = (s.zones[ZONE_NORMAL], s.zones[ZONE_DMA32]);
    let reserve = d.lowmem_reserve[ZONE_NORMAL];
    assert_eq!(reserve, n0.managed / 256);
    assert_eq!(n.free_pages, n0.min, "Normal down to min, not below");
    assert_eq!(d.free_pages, d0.min + reserve, "lowmem_reserve kept the last of DMA32 from Normal requests");
    // GFP_ATOMIC goes on, down to 3/8 of min in each zone (plus the reserve in DMA32).
    let mut atomic = 0;
    loop {
        match buddy::alloc_pages_gfp(GFP_ATOMIC | __GFP_NOWARN, 0) {
            Ok(pa) => {
                held.push((pa, 0));
                atomic += 1;
            }
            Err(e) => {
                assert_eq!(e, BuddyError::BelowMin);
                break;
            }
        }
    }
    let s = stats();
    let (n2, d2) = (s.zones[ZONE_NORMAL], s.zones[ZONE_DMA32]);
    assert_eq!(n2.free_pages, GFP_ATOMIC.min_watermark(n0.min), "Normal: 3/8 of min");
    assert_eq!(d2.free_pages, GFP_ATOMIC.min_watermark(d0.min) + reserve, "DMA32: 3/8 of min + reserve");
    assert!(atomic > 0 && n2.free_pages * 8 >= n0.min * 3 - 8, "never below 3/8 of min");
    assert_eq!(buddy::alloc_pages_gfp(GFP_KERNEL | __GFP_NOWARN, 0), Err(BuddyError::BelowMin));
    // A DMA32 request may use the reserve, down to DMA32's own min (3/8 of it atomically).
    let mut dma32 = 0;
    while let Ok(pa) = buddy::alloc_pages_gfp(GFP_DMA32 | __GFP_NOWARN, 0) {
        assert!(pa.as_u64() < FOUR_GIB);
        held.push((pa, 0));
        dma32 += 1;
    }
    let s = stats();
    assert_eq!(dma32, reserve - (d0.min - GFP_ATOMIC.min_watermark(d0.min)));
    assert_eq!(s.zones[ZONE_DMA32].free_pages, d0.min, "a kernel request stops at min");
    let taken = held.len();
    for (pa, order) in held {
        // SAFETY: allocated above, never used.
        unsafe { buddy::free_pages(pa, order) }.unwrap();
    }
    assert_eq!(stats().free_pages, start.free_pages);
    buddy::check_consistency().unwrap();
    hal::print!(
        "(Normal min {} / 3/8 {}; DMA32 min {} + reserve {reserve}; {taken} blocks, {atomic} atomic) ",
        n0.min,
        n2.free_pages,
        d0.min
    );
}

/// `__vmalloc(GFP_DMA32)` maps only frames below 4 GiB (Normal has plenty);
/// `kmalloc_gfp(GFP_DMA32)` is refused with a typed error; `kvmalloc_gfp(GFP_DMA32)` goes to
/// vmalloc and its frames are below 4 GiB too.
fn vmalloc_and_kmalloc_with_gfp_dma32() {
    need_both_zones(&stats());
    let size = 8 << 20;
    let va = memory::kernel::__vmalloc(size, GFP_DMA32 | memory::gfp::__GFP_ZERO).unwrap();
    let vm = memory::kernel::vmalloc_instance().unwrap();
    for i in 0..size / PAGE_SIZE {
        let pa = vm.vmalloc_to_phys(va.add((i * PAGE_SIZE) as u64)).expect("mapped");
        assert!(pa.as_u64() < FOUR_GIB, "page {i} of a GFP_DMA32 vmalloc at {pa:#x}");
    }
    // SAFETY: the area is ours, mapped and zeroed.
    assert_eq!(unsafe { va.as_ptr::<u64>().read() }, 0);
    memory::kernel::vfree(va).unwrap();
    // The same size with GFP_KERNEL takes Normal's frames.
    let k = memory::kernel::__vmalloc(size, GFP_KERNEL).unwrap();
    assert!(vm.vmalloc_to_phys(k).unwrap().as_u64() >= FOUR_GIB, "GFP_KERNEL prefers Normal");
    memory::kernel::vfree(k).unwrap();
    assert_eq!(memory::slab::kmalloc_gfp(64, 8, GFP_DMA32), Err(memory::slab::SlabError::ZoneModifier));
    let p = memory::kernel::kvmalloc_gfp(100, GFP_DMA32).unwrap();
    let pa = vm.vmalloc_to_phys(hal::VirtAddr::from_ptr(p.as_ptr())).expect("a DMA32 kvmalloc is a vmalloc area");
    assert!(pa.as_u64() < FOUR_GIB);
    // SAFETY: from kvmalloc_gfp, not used after.
    unsafe { memory::kernel::kvfree(p) }.unwrap();
}

tests::main!(
    test!(vmalloc_and_kmalloc_with_gfp_dma32),
    test!(zones_add_up_to_the_ram_of_the_device_tree),
    test!(gfp_dma32_never_at_or_above_4_gib),
    test!(fallback_lowmem_reserve_and_atomic_reserves),
);
