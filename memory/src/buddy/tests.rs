//! Host tests of the buddy allocator: a model test, error cases, bulk, strict mode,
//! metadata overhead.

use std::collections::{BTreeMap, HashMap};

use hal::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::testram::{self, TestRam};
use super::*;

const MIB: u64 = 1 << 20;
const BASE: u64 = 0x4000_0000;

/// Two disjoint regions (24 MiB, then a 8 MiB hole, then 40 MiB) with reserved holes.
struct Machine {
    ram: TestRam,
    regions: [PhysRange; 2],
    reserved: Vec<PhysRange>,
}

impl Machine {
    fn new() -> Self {
        let ram = TestRam::new(BASE, (72 * MIB) as usize);
        let regions = [ram.range(32 * MIB, 40 * MIB), ram.range(0, 24 * MIB)];
        let reserved = vec![
            // "Kernel image" at the very start: the metadata must skip it.
            ram.range(0, 0x20_0000 + 0x3000),
            // A DTB, unaligned: rounds outward to pages.
            ram.range(0x100_0800, 0x1_0100),
            // A boot table page in the second region.
            ram.range(33 * MIB + 0x5000, 0x1000),
            // A /memreserve/ spanning the hole and the start of the second region.
            ram.range(23 * MIB, 9 * MIB + 0x2000),
            // Beyond RAM: ignored.
            PhysRange::new(PhysAddr::new(BASE + 100 * MIB), MIB).unwrap(),
        ];
        Machine { ram, regions, reserved }
    }

    fn alloc(&self, strict: bool) -> BuddyAllocator {
        // SAFETY: the test RAM is used by nothing else and outlives the allocator.
        unsafe { BuddyAllocator::new(&self.regions, &self.reserved, self.ram.linear(), strict) }.unwrap()
    }

    /// Whether `pa` is a frame the allocator may hand out (in a region, not reserved).
    fn usable(&self, a: &BuddyAllocator, pa: u64) -> bool {
        let p = PhysAddr::new(pa);
        self.regions.iter().any(|r| r.contains(p))
            && !self.reserved.iter().any(|r| {
                let s = r.start().as_u64() & !(PAGE_SIZE as u64 - 1);
                let e = r.end().as_u64().div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
                pa >= s && pa < e
            })
            && !a.metadata_range().contains(p)
    }
}

fn va(a: &BuddyAllocator, pa: PhysAddr) -> *mut u64 {
    a.linear_map().ptr(pa)
}

/// Writes a signature at both ends of a block.
fn stamp(a: &BuddyAllocator, pa: PhysAddr, order: usize) {
    let n = (PAGE_SIZE << order) / 8;
    let p = va(a, pa);
    // SAFETY: the block is allocated to the test.
    unsafe {
        p.write(pa.as_u64() ^ 0x5a5a);
        p.add(n - 1).write(!pa.as_u64());
    }
}

fn check_stamp(a: &BuddyAllocator, pa: PhysAddr, order: usize) {
    let n = (PAGE_SIZE << order) / 8;
    let p = va(a, pa);
    // SAFETY: the block is allocated to the test.
    unsafe {
        assert_eq!(p.read(), pa.as_u64() ^ 0x5a5a, "block {pa:?} overwritten");
        assert_eq!(p.add(n - 1).read(), !pa.as_u64(), "block {pa:?} overwritten");
    }
}

/// Frees through the unsafe API: the tests never use a block after freeing it (except
/// the deliberate stray writes of the strict-mode test, into simulated RAM).
fn free(a: &mut BuddyAllocator, pa: PhysAddr, order: usize) -> Result<(), BuddyError> {
    // SAFETY: see above.
    unsafe { a.free(pa, order) }
}

fn free_bulk(a: &mut BuddyAllocator, frames: &[PhysAddr]) -> Result<(), BuddyError> {
    // SAFETY: as for `free`.
    unsafe { a.free_bulk(frames) }
}

fn free_table(a: &mut BuddyAllocator, pa: PhysAddr) {
    // SAFETY: as for `free`.
    unsafe { a.free_table(pa) }
}

fn unsafe_free_pages(pa: PhysAddr, order: usize) -> Result<(), BuddyError> {
    // SAFETY: as for `free`.
    unsafe { free_pages(pa, order) }
}

/// Whether the `len` bytes at `p` all equal `v`.
fn all_bytes(p: *const u8, len: usize, v: u8) -> bool {
    // SAFETY: callers pass memory of the test RAM they may read (allocated to the test,
    // or free memory the test inspects while no allocator call runs).
    unsafe { core::slice::from_raw_parts(p, len) }.iter().all(|&b| b == v)
}

#[test]
fn init_layout_and_buddyinfo() {
    let m = Machine::new();
    let a = m.alloc(false);
    a.check_consistency().unwrap();
    // Metadata: 64 MiB of regions = 16384 frames * 2 bytes = 8 pages, placed after the
    // reserved "kernel image".
    assert_eq!(a.metadata_range().start().as_u64(), BASE + 0x20_3000);
    assert_eq!(a.metadata_range().pages(), 8);
    let s = a.stats();
    assert_eq!(s.metadata_pages, 8);
    // Usable frames counted one by one.
    let usable = (0..72 * MIB / PAGE_SIZE as u64).filter(|i| m.usable(&a, BASE + i * PAGE_SIZE as u64)).count();
    assert_eq!(s.total_pages, usable);
    assert_eq!(s.free_pages, usable);
    assert_eq!(s.total_pages + s.reserved_pages + s.metadata_pages, 16384);
    let sum: usize = s.free_blocks.iter().enumerate().map(|(o, n)| n << o).sum();
    assert_eq!(sum, usable);
    // Low memory first.
    let mut a = a;
    let first = a.alloc(0).unwrap();
    assert_eq!(first.as_u64(), BASE + 0x20_b000);
    free(&mut a, first, 0).unwrap();

    let info = BuddyInfo { free_blocks: [1, 0, 12, 3, 45, 6, 789, 0, 1, 22, 333] };
    assert_eq!(
        info.to_string(),
        "Node 0, zone   Normal      1      0     12      3     45      6    789      0      1     22    333"
    );
    let line = a.buddyinfo().to_string();
    assert!(line.starts_with("Node 0, zone   Normal "));
    assert_eq!(line.len(), "Node 0, zone   Normal".len() + 7 * NR_ORDERS);
}

/// 100,000 random operations of mixed orders against a model of the live blocks.
#[test]
fn model_random_ops() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let start = a.stats();
    let mut rng = SmallRng::seed_from_u64(0xb0dd1e5);
    // Live blocks: start -> order, and start -> end for the overlap check.
    let mut live: HashMap<u64, usize> = HashMap::new();
    let mut spans: BTreeMap<u64, u64> = BTreeMap::new();
    let mut keys: Vec<u64> = Vec::new();
    let mut live_pages = 0usize;
    let mut failures = 0u64;
    let mut bulk = vec![PhysAddr::default(); 64];

    let add = |pa: PhysAddr,
               order: usize,
               live: &mut HashMap<u64, usize>,
               spans: &mut BTreeMap<u64, u64>,
               keys: &mut Vec<u64>,
               a: &BuddyAllocator| {
        let s = pa.as_u64();
        let e = s + ((PAGE_SIZE as u64) << order);
        assert_eq!(s % ((PAGE_SIZE as u64) << order), 0, "block not aligned on its size");
        assert!(m.usable(a, s) && m.usable(a, e - PAGE_SIZE as u64), "block outside usable RAM");
        if let Some((_, &pe)) = spans.range(..e).next_back() {
            assert!(pe <= s, "block {s:#x} handed out twice (overlap)");
        }
        spans.insert(s, e);
        assert!(live.insert(s, order).is_none());
        keys.push(s);
        stamp(a, pa, order);
    };

    for step in 0..100_000u32 {
        let r: u32 = rng.random_range(0..100);
        if r < 45 && !keys.is_empty() {
            // Free a random live block.
            let k = rng.random_range(0..keys.len());
            let s = keys.swap_remove(k);
            let order = live.remove(&s).unwrap();
            spans.remove(&s);
            check_stamp(&a, PhysAddr::new(s), order);
            free(&mut a, PhysAddr::new(s), order).unwrap();
            live_pages -= 1 << order;
        } else if r < 50 {
            // Bulk order-0 allocation, freed in part later.
            let want = rng.random_range(1..bulk.len());
            let n = a.alloc_bulk(&mut bulk[..want]);
            if n < want {
                failures += 1;
            }
            for &pa in &bulk[..n] {
                add(pa, 0, &mut live, &mut spans, &mut keys, &a);
            }
            live_pages += n;
        } else {
            // Orders skewed small: order k with probability ~ 2^-(k+1).
            let order = (rng.random::<u32>() | 1 << MAX_ORDER).trailing_zeros() as usize;
            let before = a.free_blocks();
            match a.alloc(order) {
                Ok(pa) => {
                    add(pa, order, &mut live, &mut spans, &mut keys, &a);
                    live_pages += 1 << order;
                }
                Err(BuddyError::OutOfMemory) => {
                    failures += 1;
                    assert_eq!(a.free_blocks(), before, "failed alloc changed the lists");
                    assert!(before[order..].iter().all(|&n| n == 0));
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(a.free_pages(), start.free_pages - live_pages);
        if step % 5_000 == 0 {
            a.check_consistency().unwrap();
        }
    }
    a.check_consistency().unwrap();
    assert_eq!(a.stats().alloc_failures, failures);
    assert!(failures > 0, "the test should reach exhaustion");
    // Free everything (in a random order): all memory merges back.
    while let Some(s) = keys.pop() {
        let order = live.remove(&s).unwrap();
        check_stamp(&a, PhysAddr::new(s), order);
        free(&mut a, PhysAddr::new(s), order).unwrap();
    }
    a.check_consistency().unwrap();
    let end = a.stats();
    assert_eq!(end.free_pages, start.free_pages);
    assert_eq!(end.free_blocks, start.free_blocks);
}

#[test]
fn misuse_is_refused_and_changes_nothing() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let p2 = a.alloc(2).unwrap();
    let p0 = a.alloc(0).unwrap();
    let before = a.stats();
    let cases = [
        (p2, 1, BuddyError::WrongOrder { allocated: 2 }),
        (p2, 3, BuddyError::Misaligned),
        (p2.add(0x1000), 0, BuddyError::NotAllocated), // inside an allocated block
        (p2.add(0x10), 0, BuddyError::Misaligned),
        (p2, 11, BuddyError::BadOrder),
        (PhysAddr::new(BASE + 200 * MIB), 0, BuddyError::OutOfRange),
        (PhysAddr::new(BASE + 26 * MIB), 0, BuddyError::OutOfRange), // the hole
        (PhysAddr::new(0), 0, BuddyError::OutOfRange),
        (PhysAddr::new(BASE + 0x1000), 0, BuddyError::Reserved), // kernel image
        (PhysAddr::new(BASE + 0x101_0000), 0, BuddyError::Reserved), // DTB, rounded out
        (PhysAddr::new(BASE + 33 * MIB + 0x5000), 0, BuddyError::Reserved),
        (a.metadata_range().start(), 0, BuddyError::Reserved),
        (PhysAddr::new(BASE + 40 * MIB), 0, BuddyError::NotAllocated), // free
    ];
    for (pa, order, err) in cases {
        assert_eq!(free(&mut a, pa, order), Err(err), "free({pa:?}, {order})");
        assert_eq!(a.stats(), before);
    }
    free(&mut a, p0, 0).unwrap();
    let after_one = a.stats();
    assert_eq!(free(&mut a, p0, 0), Err(BuddyError::NotAllocated), "double free");
    assert_eq!(a.stats(), after_one);
    assert_eq!(a.alloc(11), Err(BuddyError::BadOrder));
    assert_eq!(a.stats().alloc_failures, 1);
    free(&mut a, p2, 2).unwrap();
    assert_eq!(free(&mut a, p2, 2), Err(BuddyError::NotAllocated));
    assert_eq!(free_bulk(&mut a, &[p0, p2]), Err(BuddyError::NotAllocated));
    a.check_consistency().unwrap();
}

#[test]
fn init_errors() {
    let ram = TestRam::new(BASE, (16 * MIB) as usize);
    let l = ram.linear();
    let new = |r: &[PhysRange], res: &[PhysRange]| {
        // SAFETY: the test RAM is used by nothing else and outlives the calls, which fail
        // or build an allocator that is dropped at once.
        unsafe { BuddyAllocator::new(r, res, l, false) }
    };
    let r = |off: u64, len: u64| ram.range(off, len);
    assert_eq!(new(&[], &[]).unwrap_err(), BuddyError::NoMemory);
    assert_eq!(new(&[r(0, 8 * MIB), r(4 * MIB, 8 * MIB)], &[]).unwrap_err(), BuddyError::OverlappingRegions);
    assert_eq!(
        new(&[PhysRange::new(PhysAddr::new(BASE + 8 * MIB), 16 * MIB).unwrap()], &[]).unwrap_err(),
        BuddyError::OutsideLinearMap
    );
    let many: Vec<_> = (0..9).map(|i| r(i * MIB, MIB / 2)).collect();
    assert_eq!(new(&many, &[]).unwrap_err(), BuddyError::TooManyRegions);
    assert_eq!(new(&[r(0, 16 * MIB)], &[r(0, 16 * MIB)]).unwrap_err(), BuddyError::NoRoomForMetadata);
    // Room for the metadata only: nothing left to manage.
    assert_eq!(new(&[r(0, 16 * MIB)], &[r(0x2000, 16 * MIB - 0x2000)]).unwrap_err(), BuddyError::NoMemory);
    // A region smaller than a page vanishes; a misaligned one rounds inward.
    let a = new(&[r(0x800, 0x2800), r(MIB, 100)], &[]).unwrap();
    assert_eq!(a.total_pages(), 1);
    assert_eq!(a.metadata_range().start().as_u64(), BASE + 0x1000);
}

#[test]
fn bulk_runs_out_part_way() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let total = a.total_pages();
    let held = a.alloc(3).unwrap();
    let mut out = vec![PhysAddr::default(); total + 100];
    let n = a.alloc_bulk(&mut out);
    assert_eq!(n, total - 8);
    assert_eq!(a.free_pages(), 0);
    assert_eq!(a.stats().alloc_failures, 1);
    a.check_consistency().unwrap();
    let mut sorted: Vec<u64> = out[..n].iter().map(|p| p.as_u64()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), n, "a frame handed out twice");
    assert!(sorted.iter().all(|&pa| m.usable(&a, pa)));
    assert_eq!(a.alloc_bulk(&mut out[..1]), 0);
    assert_eq!(a.alloc(0), Err(BuddyError::OutOfMemory));
    free_bulk(&mut a, &out[..n]).unwrap();
    free(&mut a, held, 3).unwrap();
    a.check_consistency().unwrap();
    assert_eq!(a.free_pages(), total);
    assert_eq!(a.free_blocks(), m.alloc_fresh_blocks());
}

impl Machine {
    fn alloc_fresh_blocks(&self) -> [usize; NR_ORDERS] {
        self.alloc(false).free_blocks()
    }
}

#[test]
fn strict_mode_detects_use_after_free() {
    let m = Machine::new();
    let mut a = m.alloc(true);
    let pa = a.alloc(0).unwrap();
    assert_eq!(a.stats().corruptions, 0);
    let p = va(&a, pa) as *mut u8;
    // SAFETY: the frame is allocated to the test.
    unsafe { p.write_bytes(0x11, PAGE_SIZE) };
    free(&mut a, pa, 0).unwrap();
    // Freed memory is poisoned (past the list node).
    assert!(all_bytes(p.wrapping_add(16), PAGE_SIZE - 16, POISON_BYTE));
    // Clean allocations report nothing.
    let again = a.alloc(0).unwrap();
    assert_eq!(again, pa);
    free(&mut a, again, 0).unwrap();
    assert_eq!(a.stats().corruptions, 0);
    // A write after free is caught when the memory is handed out again, wherever the
    // frame went when it merged.
    // SAFETY: a stray write into free simulated RAM: exactly what strict mode detects.
    unsafe { p.add(0x123).write(0) };
    let mut out = vec![PhysAddr::default(); a.total_pages()];
    let n = a.alloc_bulk(&mut out);
    assert_eq!(n, a.total_pages());
    assert_eq!(a.stats().corruptions, 1);
    free_bulk(&mut a, &out).unwrap();
    // Orders above zero, and merged buddies' nodes re-poisoned.
    let big = a.alloc(5).unwrap();
    free(&mut a, big, 5).unwrap();
    let big2 = a.alloc_zeroed(5).unwrap();
    assert!(all_bytes(va(&a, big2) as *const u8, PAGE_SIZE << 5, 0));
    free(&mut a, big2, 5).unwrap();
    assert_eq!(a.stats().corruptions, 1);
    a.check_consistency().unwrap();
}

#[test]
fn metadata_overhead() {
    for size in [128 * MIB, 4096 * MIB] {
        let r = PhysRange::new(PhysAddr::new(BASE), size).unwrap();
        let bytes = metadata_bytes(&[r]).unwrap();
        let pages = bytes.div_ceil(PAGE_SIZE as u64);
        let frac = (pages * PAGE_SIZE as u64) as f64 / size as f64;
        assert!(frac <= 0.002, "{size}: {frac}");
        assert!((frac - 2.0 / 4096.0).abs() < 1e-9);
    }
    assert_eq!(metadata_bytes(&[PhysRange::new(PhysAddr::new(BASE), 128 * MIB).unwrap()]), Some(64 * 1024));
    // And the allocator really uses that much on 128 MiB.
    let ram = TestRam::new(BASE, (128 * MIB) as usize);
    // SAFETY: the test RAM is used by nothing else and outlives the allocator.
    let a = unsafe { BuddyAllocator::new(&[ram.whole()], &[], ram.linear(), false) }.unwrap();
    assert_eq!(a.metadata_range().size(), 64 * 1024);
    assert_eq!(a.total_pages(), 32768 - 16);
}

/// 4 GiB of RAM, above the 4 GiB physical line, without code changes: only the metadata
/// and the block heads are touched, so the host commits a few MiB of the buffer.
#[test]
fn four_gib_of_ram() {
    let Some(ram) = TestRam::try_new(BASE, (4096 * MIB) as usize) else {
        eprintln!("four_gib_of_ram: the host refused 4 GiB of address space; skipped");
        return;
    };
    // SAFETY: the test RAM is used by nothing else and outlives the allocator.
    let mut a = unsafe { BuddyAllocator::new(&[ram.whole()], &[], ram.linear(), false) }.unwrap();
    assert_eq!(a.metadata_range().size(), 2 * MIB);
    assert_eq!(a.total_pages(), (1 << 20) - 512);
    // 1024 blocks of 4 MiB, less the one that holds the metadata (split into the rest).
    assert_eq!(a.free_blocks()[MAX_ORDER], 1023);
    assert_eq!(a.free_blocks()[9], 1);
    let mut blocks = Vec::new();
    while let Ok(pa) = a.alloc(MAX_ORDER) {
        blocks.push(pa);
    }
    assert_eq!(blocks.len(), 1023);
    assert_eq!(blocks.last().unwrap().as_u64(), BASE + 4096 * MIB - 4 * MIB);
    assert_eq!(a.free_pages(), 512);
    for pa in blocks {
        free(&mut a, pa, MAX_ORDER).unwrap();
    }
    a.check_consistency().unwrap();
    assert_eq!(a.free_pages(), a.total_pages());
}

#[test]
fn tables_are_zeroed() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let pa = a.alloc(0).unwrap();
    // SAFETY: the frame is allocated to the test.
    unsafe { (va(&a, pa) as *mut u8).write_bytes(0xee, PAGE_SIZE) };
    free(&mut a, pa, 0).unwrap();
    let t = a.alloc_table().unwrap();
    assert_eq!(t, pa);
    assert!(all_bytes(va(&a, t) as *const u8, PAGE_SIZE, 0));
    free_table(&mut a, t);
    free_table(&mut a, t); // logged, ignored
    a.check_consistency().unwrap();
}

#[test]
fn global_instance_and_frames() {
    let _g = testram::global_lock();
    let before = stats().unwrap();
    let f = Frames::alloc_zeroed(3).unwrap();
    assert_eq!(f.size(), 8 * PAGE_SIZE);
    // SAFETY: the block is owned by `f`.
    assert_eq!(unsafe { *f.virt().as_ptr::<u64>() }, 0);
    assert_eq!(stats().unwrap().free_pages, before.free_pages - 8);
    let pa = f.phys();
    drop(f);
    assert_eq!(stats().unwrap().free_pages, before.free_pages);
    assert_eq!(unsafe_free_pages(pa, 3), Err(BuddyError::NotAllocated));
    let g = Frames::alloc(0).unwrap();
    let raw = g.into_raw();
    assert_eq!(unsafe_free_pages(raw, 0), Ok(()));
    let mut out = [PhysAddr::default(); 10];
    assert_eq!(alloc_pages_bulk(&mut out), 10);
    // SAFETY: the frames were allocated just above and are not used.
    unsafe { free_pages_bulk(&out) }.unwrap();
    let p = alloc_pages(1).unwrap();
    unsafe_free_pages(p, 1).unwrap();
    assert_eq!(stats().unwrap().free_pages, before.free_pages);
    // SAFETY: the global allocator is already initialised: refused before touching RAM.
    let again = unsafe { init(&[], &[], *global().unwrap().lock().linear_map(), false) };
    assert_eq!(again, Err(BuddyError::AlreadyInitialized));
    global().unwrap().lock().check_consistency().unwrap();
}
