//! The device tree as boot honours it: reserved memory never handed out, `no-map` ranges
//! out of the linear map (and open to ioremap), the tree's counts as boot parameters say.
//!
//! `cargo test` boots this with QEMU's own tree; `tools/test-dtb` boots it again with a
//! tree edited by `dtc` (40 more `/reserved-memory` children, a `no-map` range, a
//! `size`-only child, two `/memreserve/` entries) and `test.dt.*` parameters that say what
//! to expect.
#![no_std]
#![no_main]

use hal::dtb::ReservedKind;
use hal::{PhysAddr, PhysRange, PAGE_SIZE};
use memory::buddy::{self, BuddyError, MAX_ORDER};
use memory::ioremap::{self, IoremapError};
use tests::test;

fn info() -> &'static hal::boot::BootInfo {
    hal::boot::boot_info().expect("boot info")
}

fn expected(key: &str) -> usize {
    match info().cmdline().get_u64(key) {
        Ok(Some(n)) => n as usize,
        Ok(None) => 0,
        Err(_) => panic!("{key} is not a number"),
    }
}

/// The counts the boot parameters announce (QEMU's own tree: none of each).
fn layout_is_as_announced() {
    let r = &info().platform.reserved;
    assert_eq!(r.len(), expected("test.dt.reserved"), "reserved ranges: {r:?}");
    assert_eq!(r.no_map().count(), expected("test.dt.no_map"), "no-map ranges");
    assert_eq!(r.iter().filter(|r| r.kind == ReservedKind::Dynamic).count(), expected("test.dt.dynamic"));
    assert_eq!(r.iter().filter(|r| r.kind == ReservedKind::MemReserve).count(), expected("test.dt.memreserve"));
}

/// Memory nothing may be handed out from: every reservation, the DTB, the image in use.
fn forbidden(pa: PhysAddr, pages: u64) -> Option<&'static str> {
    let i = info();
    let block = PhysRange::new(pa, pages * PAGE_SIZE as u64).unwrap();
    if i.platform.reserved.overlaps(&block) {
        return Some("a reserved range");
    }
    if i.platform.dtb.overlaps(&block) {
        return Some("the DTB");
    }
    (0..pages).any(|k| hal::kmap::is_image_frame(&i.image, pa.add(k * PAGE_SIZE as u64))).then_some("the image")
}

/// Allocates every free frame, largest blocks first, chained through the blocks
/// themselves; none may touch a reserved range; then frees them all.
fn reserved_frames_are_never_handed_out() {
    let linear = hal::kmap::linear_map().unwrap();
    // Every free frame: the watermarks and the low zones' reserves off for the test.
    buddy::set_min_free_kbytes(Some(0));
    buddy::set_lowmem_reserve(false);
    let start = buddy::stats().unwrap().free_pages;
    let mut head: Option<(PhysAddr, usize)> = None;
    let (mut pages, mut blocks) = (0u64, 0usize);
    for order in (0..=MAX_ORDER).rev() {
        loop {
            match buddy::alloc_pages(order) {
                Ok(pa) => {
                    if let Some(what) = forbidden(pa, 1 << order) {
                        panic!("order-{order} block at {pa:#x} lies in {what}");
                    }
                    let link: *mut [u64; 2] = linear.ptr(pa);
                    let next = head.map_or([u64::MAX, 0], |(p, o)| [p.as_u64(), o as u64]);
                    // SAFETY: the block was just handed to us; its first 16 bytes hold the
                    // chain until it is freed below.
                    unsafe { link.write(next) };
                    head = Some((pa, order));
                    pages += 1 << order;
                    blocks += 1;
                }
                Err(BuddyError::OutOfMemory) => break,
                Err(e) => panic!("alloc_pages({order}): {e}"),
            }
        }
    }
    assert_eq!(pages as usize, start, "every free frame was handed out");
    while let Some((pa, order)) = head {
        // SAFETY: written when the block was allocated, above.
        let [next, next_order] = unsafe { linear.ptr::<[u64; 2]>(pa).read() };
        head = (next != u64::MAX).then(|| (PhysAddr::new(next), next_order as usize));
        // SAFETY: allocated above by this test and no longer used.
        unsafe { buddy::free_pages(pa, order) }.unwrap();
    }
    assert_eq!(buddy::stats().unwrap().free_pages, start);
    buddy::set_min_free_kbytes(None);
    buddy::set_lowmem_reserve(true);
    hal::print!("({pages} frames in {blocks} blocks, none reserved) ");
}

/// `no-map` ranges have no mapping at all: a read of their first, middle and last page
/// faults, and the linear map does not translate them.
fn no_map_ranges_are_not_mapped() {
    let mut checked = 0;
    for r in info().platform.reserved.no_map() {
        let first = r.start().page_down();
        let last = PhysAddr::new(r.end().as_u64() - 1).page_down();
        let middle = PhysAddr::new(first.as_u64() + (last.as_u64() - first.as_u64()) / 2).page_down();
        for pa in [first, middle, last] {
            let fault = hal::probe::read_u64(pa.as_usize()).expect_err("a no-map page must not be mapped");
            assert_eq!(fault.far, pa.as_u64());
            let lower = hal::kmap::kernel_space().unwrap().lock();
            assert!(lower.lower().translate(hal::VirtAddr::new(pa.as_u64())).is_none(), "{pa:#x} translated");
            checked += 1;
        }
        // The pages around the hole are RAM mapped as usual (unless reserved themselves).
        for pa in [first.as_u64().wrapping_sub(PAGE_SIZE as u64), last.as_u64() + PAGE_SIZE as u64] {
            if info().platform.ram.contains(PhysAddr::new(pa)) && !info().platform.reserved.contains(PhysAddr::new(pa))
            {
                assert!(hal::probe::read_u64(pa as usize).is_ok(), "{pa:#x} next to the hole must stay mapped");
            }
        }
    }
    assert_eq!(checked, 3 * expected("test.dt.no_map"));
}

/// A driver may ioremap a `no-map` range (Linux's `pfn_is_map_memory` rule), but never a
/// reservation the linear map covers.
fn no_map_ranges_can_be_ioremapped_others_not() {
    for r in info().platform.reserved.iter() {
        let got = ioremap::ioremap(r.range.start(), r.range.size() as usize);
        if r.no_map {
            let va = got.unwrap_or_else(|e| panic!("ioremap of no-map {r}: {e}"));
            ioremap::iounmap(va).unwrap();
        } else {
            assert_eq!(got, Err(IoremapError::Ram), "{r}");
        }
    }
}

/// Each reservation's line as boot logs it: start, end, size, name, kind (tools/test-dtb
/// also reads the log for each start address it put in the tree).
fn reserved_ranges_are_listed() {
    for r in info().platform.reserved.iter() {
        let line = alloc::format!("{r}");
        assert!(
            line.starts_with(&alloc::format!("{:#012x}-{:#012x}", r.range.start(), r.range.end().as_u64())),
            "{line}"
        );
        assert!(line.contains(r.name), "{line}");
        assert_eq!(line.contains("[no-map]"), r.no_map, "{line}");
        assert_eq!(line.contains("[placed at boot]"), r.kind == ReservedKind::Dynamic, "{line}");
    }
}

extern crate alloc;

tests::main!(
    test!(layout_is_as_announced),
    test!(reserved_frames_are_never_handed_out),
    test!(no_map_ranges_are_not_mapped),
    test!(no_map_ranges_can_be_ioremapped_others_not),
    test!(reserved_ranges_are_listed),
);
