//! The scullv driver on target, over the kernel's vmalloc: megabytes written and read back
//! across many quanta, the quanta listed in vmallocinfo at scullv's source line, a guard
//! page after each one, running out of frames part way, and every page given back.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use hal::{probe, PAGE_SIZE};
use memory::kernel;
use memory::vmalloc::VmallocError;
use scullv::{ScullError, ScullV, DEFAULT_ORDER, DEFAULT_QSET};
use tests::test;

/// Where every quantum is allocated, as vmallocinfo and fault reports name it.
const CALLER: &str = "drivers/scullv/src/quantum.rs:";
const QUANTUM: usize = PAGE_SIZE << DEFAULT_ORDER;

fn free_pages() -> usize {
    memory::buddy::stats().unwrap().free_pages
}

/// Every page accounted for, as in the vmalloc suite: buddy free pages + the kept table
/// pages of the vmalloc window + slab pages after shrinking.
fn pages_accounted() -> usize {
    memory::slab::shrink();
    free_pages() + kernel::vmalloc_table_pages() + memory::slab::stats().unwrap().slab_pages
}

fn vmallocinfo() -> String {
    let mut s = String::new();
    kernel::write_vmallocinfo(&mut s).unwrap();
    s
}

/// The live vmalloc areas allocated by scullv: (start, end) of each.
fn scullv_areas() -> Vec<(usize, usize)> {
    let info = vmallocinfo();
    info.lines()
        .filter(|l| l.contains(CALLER))
        .map(|l| {
            let (range, _) = l.split_once(' ').unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let hex = |s: &str| usize::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (hex(a), hex(b))
        })
        .collect()
}

fn fill(offset: usize, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i) as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16).wrapping_mul(31)) as u8;
    }
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Writes `bytes` of the pattern in `chunk`-byte writes; returns the checksum written.
fn write_pattern(dev: &mut ScullV, bytes: usize, chunk: usize) -> u64 {
    let mut buf = alloc::vec![0u8; chunk];
    let (mut offset, mut h) = (0, 0xcbf2_9ce4_8422_2325);
    while offset < bytes {
        let b = &mut buf[..chunk.min(bytes - offset)];
        fill(offset, b);
        h = fnv1a(h, b);
        offset += dev.write(offset, b).unwrap();
    }
    h
}

/// Reads `bytes` back in `chunk`-byte reads; returns their checksum.
fn read_checksum(dev: &ScullV, bytes: usize, chunk: usize) -> u64 {
    let mut buf = alloc::vec![0u8; chunk];
    let (mut offset, mut h) = (0, 0xcbf2_9ce4_8422_2325);
    while offset < bytes {
        let n = dev.read(offset, &mut buf).unwrap();
        assert!(n > 0, "short device at {offset}");
        h = fnv1a(h, &buf[..n]);
        offset += n;
    }
    h
}

fn megabytes_round_trip_across_many_quanta() {
    let before = memory::kernel::MemSnapshot::settled();
    megabytes_round_trip();
    before.check_no_leak().unwrap(); // the driver gave back everything it took
}

fn megabytes_round_trip() {
    let bytes = 6 << 20;
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    let written = write_pattern(&mut dev, bytes, 4093);
    assert_eq!(dev.size(), bytes);
    let s = dev.stats();
    assert_eq!((s.quanta, s.qset_arrays, s.quantum_size), (bytes / QUANTUM, 1, QUANTUM));
    assert_eq!(read_checksum(&dev, bytes, 7919), written);
    assert_eq!(read_checksum(&dev, bytes, QUANTUM + 1), written);
    // Small quanta and sets: the same data over 1536 quanta in 52 sets.
    let mut small = ScullV::new(0, 30).unwrap();
    let written = write_pattern(&mut small, bytes, 5000);
    assert_eq!((small.stats().quanta, small.stats().qset_arrays), (1536, 52));
    assert_eq!(read_checksum(&small, bytes, 3000), written);
    hal::print!("({} MiB, checksum {written:#018x}) ", bytes >> 20);
}

fn quanta_are_vmalloc_areas_at_scullvs_line() {
    kernel::purge();
    assert!(scullv_areas().is_empty(), "no scullv area before the test");
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    write_pattern(&mut dev, 8 * QUANTUM - 100, 10_000);
    let info = vmallocinfo();
    let lines: Vec<&str> = info.lines().filter(|l| l.contains(CALLER)).collect();
    assert_eq!(lines.len(), 8, "{info}");
    for l in &lines {
        // 64 KiB of pages plus the guard page; 16 pages mapped.
        assert!(l.contains(&alloc::format!(" {} {CALLER}", QUANTUM + PAGE_SIZE)), "{l}");
        assert!(l.ends_with("pages=16 vmalloc"), "{l}");
    }
    hal::print!("({}) ", lines[0]);
    for (start, _) in scullv_areas() {
        assert!(kernel::is_vmalloc_addr(hal::VirtAddr::new(start as u64)));
        let area = kernel::find_area(hal::VirtAddr::new(start as u64)).expect("a live area");
        assert_eq!((area.bytes, area.pages, area.guard), (QUANTUM, QUANTUM / PAGE_SIZE, true));
        assert_eq!(area.caller.file(), "drivers/scullv/src/quantum.rs");
    }
    dev.trim();
    assert!(scullv_areas().is_empty(), "trim vfreed every quantum");
    let parked = vmallocinfo().lines().filter(|l| l.ends_with(" 69632 unpurged vm_area")).count();
    assert!(parked >= 8, "the freed quanta wait for the lazy purge");
    kernel::purge();
}

fn each_quantum_ends_in_a_guard_page() {
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    dev.write(QUANTUM - 1, &[0xa5, 0x5a]).unwrap();
    // The device's bytes are the areas' bytes.
    let last = dev.addr_of(QUANTUM - 1).unwrap().as_ptr() as usize;
    let next = dev.addr_of(QUANTUM).unwrap().as_ptr() as usize;
    assert_eq!(probe::read_u8(last), Ok(0xa5));
    assert_eq!(probe::read_u8(next), Ok(0x5a));
    let area = kernel::find_area(hal::VirtAddr::new(last as u64)).expect("quantum 0 is a vmalloc area");
    assert_eq!(area.addr.as_usize() + QUANTUM - 1, last);
    let pa = kernel::vmalloc_to_phys(hal::VirtAddr::new(last as u64)).expect("mapped");
    // One past the quantum: its guard page traps and is named after scullv's line.
    let f = probe::read_u8(last + 1).expect_err("the guard page must trap");
    assert_eq!(f.far as usize, last + 1);
    let mut text = String::new();
    assert!(kernel::explain_fault((last + 1) as u64, &mut text));
    assert!(text.contains("guard page hit") && text.contains("1 bytes past") && text.contains(CALLER), "{text}");
    hal::print!("(byte {:#x} at PA {pa:#x}; {}) ", QUANTUM - 1, text.trim_end());
    drop(dev);
    kernel::purge();
}

fn sparse_device_holds_only_what_was_written() {
    let (free, areas) = (free_pages(), scullv_areas().len());
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    let far = 100 << 30; // 100 GiB in
    dev.write(0, b"head").unwrap();
    dev.write(far, b"tail").unwrap();
    assert_eq!(dev.size(), far + 4);
    assert_eq!(dev.stats().quanta, 2);
    assert_eq!(scullv_areas().len(), areas + 2);
    // Two quanta, the list of sets (3200 empty entries) and some tables; nowhere near 100 GiB.
    assert!(free - free_pages() < 2 * (QUANTUM / PAGE_SIZE) + 256, "took {} pages", free - free_pages());
    let mut buf = [0xffu8; 12];
    assert_eq!(dev.read(far - 8, &mut buf), Ok(12));
    assert_eq!(&buf, b"\0\0\0\0\0\0\0\0tail");
    assert_eq!(dev.read_quantum(far - QUANTUM, &mut buf), Ok(0), "LDD: a hole reads as 0 bytes");
    drop(dev);
    kernel::purge();
}

fn running_out_of_frames_mid_write_gives_everything_back() {
    kernel::purge();
    let before = pages_accounted();
    // A quantum that fits in free memory once but not twice: a 2-byte write across the
    // boundary of two quanta gets the first and fails on the second.
    let free = free_pages();
    let order = (usize::BITS - 1 - free.leading_zeros()).min(scullv::MAX_ORDER);
    let mut dev = ScullV::new(order, 4).unwrap();
    let quantum = dev.quantum_size();
    assert!(2 * (quantum / PAGE_SIZE) > free, "order {order}: two quanta must not fit");
    assert_eq!(dev.write(quantum - 1, &[1, 2]), Err(ScullError::Quantum(VmallocError::NoFrames)));
    let s = dev.stats();
    assert_eq!((s.size, s.quanta, s.qset_arrays), (0, 0, 0));
    hal::print!("({} MiB quanta: {} taken then given back) ", quantum >> 20, s.total_quantum_allocs);
    // The device still works.
    assert_eq!(dev.write(5, b"small"), Ok(5));
    drop(dev);
    kernel::purge();
    assert_eq!(pages_accounted(), before, "every page given back");
}

fn demo_reports_and_gives_everything_back() {
    let r = scullv::demo(4).unwrap();
    assert_eq!((r.bytes, r.quantum_size, r.quanta, r.qset_arrays), (4 << 20, QUANTUM, 64, 1));
    assert_eq!(r.checksum, scullv::expected_checksum(4 << 20));
    assert!(scullv_areas().is_empty());
    hal::print!("({r:?}) ");
    kernel::purge();
}

/// A full cycle: write many quanta, read back, trim.
fn round() {
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    let w = write_pattern(&mut dev, 3 << 20, 6000);
    assert_eq!(read_checksum(&dev, 3 << 20, 6000), w);
    dev.trim();
    assert_eq!(dev.stats().quanta, 0);
    kernel::purge();
}

fn trim_and_purge_return_to_baseline() {
    // The first round may grow caches that stay (vmalloc's spare records, tables of the
    // window); from then on a round leaves no trace: buddy free pages + kept table pages +
    // slab pages are back where they were, and no scullv area is listed.
    round();
    let before = pages_accounted();
    let (free, tables) = (free_pages(), kernel::vmalloc_table_pages());
    let live = kernel::vmalloc_stats().unwrap().live_areas;
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    write_pattern(&mut dev, 3 << 20, 6000);
    let used = free - free_pages();
    assert!(used >= 48 * (QUANTUM / PAGE_SIZE), "48 quanta of 16 pages are in use ({used} pages)");
    dev.trim();
    kernel::purge();
    assert_eq!(pages_accounted(), before);
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live);
    assert!(scullv_areas().is_empty());
    hal::print!("(table pages +{}) ", kernel::vmalloc_table_pages() - tables);
    round();
    assert_eq!(pages_accounted(), before);
}

tests::main!(
    test!(megabytes_round_trip_across_many_quanta),
    test!(quanta_are_vmalloc_areas_at_scullvs_line),
    test!(each_quantum_ends_in_a_guard_page),
    test!(sparse_device_holds_only_what_was_written),
    test!(running_out_of_frames_mid_write_gives_everything_back),
    test!(demo_reports_and_gives_everything_back),
    test!(trim_and_purge_return_to_baseline),
);
