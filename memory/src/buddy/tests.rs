//! Host tests of the buddy allocator: a model test, error cases, bulk, strict mode,
//! metadata overhead.

use hal::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::testram::{self, TestRam};
use super::*;
use crate::gfp::{__GFP_NORETRY, __GFP_ZERO, GFP_ATOMIC, GFP_DMA, GFP_DMA32, GFP_NOWAIT};

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
        let mut m = Machine { ram, regions, reserved };
        if cfg!(miri) {
            // Size knob: Miri interprets every frame a test exhausts (milliseconds each), so
            // under it most of each region is reserved ballast. The layout is the same
            // (same regions and metadata, an order-10 block in each region), with about
            // 5,000 usable frames instead of 16,000.
            m.reserved.push(m.ram.range(8 * MIB, 8 * MIB));
            m.reserved.push(m.ram.range(40 * MIB, 32 * MIB));
        }
        m
    }

    /// [`Machine::new`] for a test that only needs some frames to exhaust or churn: under
    /// Miri, more ballast still (about 760 usable frames, against 5,000), since these tests
    /// walk, poison or check every frame; natively the same machine. The regions end where
    /// the usable frames do there (8 MiB and 2 MiB instead of 24 and 40): the frame map is
    /// 2,560 frames instead of 16,384, and a consistency check walks every one of them.
    fn small() -> Self {
        let mut m = Self::new();
        if cfg!(miri) {
            m.reserved.push(m.ram.range(2 * MIB, 4 * MIB));
            m.reserved.push(m.ram.range(16 * MIB, 7 * MIB));
            m.reserved.push(m.ram.range(33 * MIB, 7 * MIB));
            m.regions = [m.ram.range(32 * MIB, 2 * MIB), m.ram.range(0, 8 * MIB)];
        }
        m
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

    /// The frames [`Machine::usable`] accepts, counted range by range: each region's pages
    /// less those a reserved range (rounded outward to pages) or the metadata covers,
    /// overlaps counted once. Under Miri this stands in for the frame-by-frame count.
    /// [`Machine::usable`] of every frame of the test RAM, by frame index from [`BASE`]:
    /// made range by range, for a test that asks of thousands of frames (under Miri each
    /// `usable` walks the regions and reserved ranges, milliseconds).
    fn usable_map(&self, a: &BuddyAllocator) -> Box<[bool]> {
        let frame = |pa: u64| ((pa - BASE) / PAGE_SIZE as u64) as usize;
        let mut map = vec![false; self.ram.whole().pages() as usize].into_boxed_slice();
        let mut mark = |s: u64, e: u64, v: bool| {
            let (s, e) = (s.max(BASE), e.min(BASE + map.len() as u64 * PAGE_SIZE as u64));
            if s < e {
                map[frame(s)..frame(e.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64)].fill(v);
            }
        };
        for r in &self.regions {
            mark(r.start().as_u64(), r.end().as_u64(), true);
        }
        for r in self.reserved.iter().chain([&a.metadata_range()]) {
            mark(r.start().as_u64() & !(PAGE_SIZE as u64 - 1), r.end().as_u64(), false);
        }
        map
    }

    fn usable_pages(&self, a: &BuddyAllocator) -> usize {
        let page = PAGE_SIZE as u64;
        let meta = a.metadata_range();
        let mut holes: Vec<(u64, u64)> = self
            .reserved
            .iter()
            .map(|r| (r.start().as_u64() & !(page - 1), r.end().as_u64().div_ceil(page) * page))
            .chain([(meta.start().as_u64(), meta.end().as_u64())])
            .collect();
        holes.sort_unstable();
        let mut pages = 0;
        for r in &self.regions {
            let (start, end) = (r.start().as_u64(), r.end().as_u64());
            let (mut at, mut covered) = (start, 0);
            for &(s, e) in &holes {
                let (s, e) = (s.max(at), e.min(end));
                if s < e {
                    covered += e - s;
                    at = e;
                }
            }
            pages += (end - start - covered) / page;
        }
        pages as usize
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
    crate::poison::first_not(unsafe { core::slice::from_raw_parts(p, len) }, v).is_none()
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
    // Usable frames counted one by one, and range by range (only that under Miri, where
    // the frame-by-frame count took most of this test's time).
    let usable = m.usable_pages(&a);
    if !cfg!(miri) {
        let one_by_one = (0..72 * MIB / PAGE_SIZE as u64).filter(|i| m.usable(&a, BASE + i * PAGE_SIZE as u64)).count();
        assert_eq!(usable, one_by_one);
        let map = m.usable_map(&a);
        assert!(map.iter().enumerate().all(|(i, &u)| u == m.usable(&a, BASE + (i * PAGE_SIZE) as u64)));
    }
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

    let info = BuddyInfo {
        free_blocks: [[0; NR_ORDERS], [2; NR_ORDERS], [1, 0, 12, 3, 45, 6, 789, 0, 1, 22, 333]],
        populated: [false, true, true],
    };
    assert_eq!(
        info.to_string(),
        "Node 0, zone    DMA32      2      2      2      2      2      2      2      2      2      2      2\n\
         Node 0, zone   Normal      1      0     12      3     45      6    789      0      1     22    333"
    );
    // RAM at 1 GiB: DMA32 only, one line.
    let line = a.buddyinfo().to_string();
    assert!(line.starts_with("Node 0, zone    DMA32 "));
    assert_eq!(line.len(), "Node 0, zone    DMA32".len() + 7 * NR_ORDERS);
}

/// 100,000 random operations of mixed orders against a model of the live blocks, with
/// the default hot list.
#[test]
fn model_random_ops() {
    model(HOT_HIGH, HOT_BATCH, 0xb0dd1e5);
}

/// The same without the hot list (every order-0 free merges at once).
#[test]
fn model_random_ops_no_hot_list() {
    model(0, 1, 0xb0dd1e6);
}

/// The same with a tiny hot list, refilled and drained all the time.
#[test]
fn model_random_ops_tiny_hot_list() {
    model(3, 2, 0xb0dd1e7);
}

/// The same with the largest hot list, batch 1.
#[test]
fn model_random_ops_large_hot_list() {
    model(HOT_CAPACITY - 1, 1, 0xb0dd1e8);
}

fn model(high: usize, batch: usize, seed: u64) {
    let m = Machine::small();
    let mut a = m.alloc(false);
    a.set_hot_limits(high, batch);
    let start = a.stats();
    let mut rng = SmallRng::seed_from_u64(seed);
    // Live blocks, frame by frame over the machine's RAM: order + 1 at a block's first
    // frame, `TAIL` on its others, 0 where no live block is. (An array, not maps: Miri
    // interprets every hash round and B-tree search.)
    const TAIL: u8 = u8::MAX;
    let mut owner = vec![0u8; m.ram.whole().pages() as usize];
    let frame = |s: u64| ((s - BASE) / PAGE_SIZE as u64) as usize;
    let mut keys: Vec<u64> = Vec::new();
    let mut live_pages = 0usize;
    let mut failures = 0u64;
    let mut bulk = vec![PhysAddr::default(); 64];

    let usable = m.usable_map(&a);
    let add = |pa: PhysAddr, order: usize, owner: &mut [u8], keys: &mut Vec<u64>, a: &BuddyAllocator| {
        let s = pa.as_u64();
        let e = s + ((PAGE_SIZE as u64) << order);
        assert_eq!(s % ((PAGE_SIZE as u64) << order), 0, "block not aligned on its size");
        let f = frame(s);
        assert!(usable[f] && usable[frame(e) - 1], "block outside usable RAM");
        let block = &mut owner[f..f + (1 << order)];
        assert!(block.iter().all(|&o| o == 0), "block {s:#x} handed out twice (overlap)");
        block.fill(TAIL);
        block[0] = order as u8 + 1;
        keys.push(s);
        stamp(a, pa, order);
    };
    // The order of the live block at `s`, which is live no more.
    let take = |owner: &mut [u8], s: u64| {
        let f = frame(s);
        assert!(owner[f] != 0 && owner[f] != TAIL, "{s:#x} is not a live block");
        let order = usize::from(owner[f] - 1);
        owner[f..f + (1 << order)].fill(0);
        order
    };

    // Size knob: Miri interprets each step (milliseconds each).
    for step in 0..if cfg!(miri) { 150 } else { 100_000u32 } {
        let r: u32 = rng.random_range(0..100);
        if r < 45 && !keys.is_empty() {
            // Free a random live block.
            let k = rng.random_range(0..keys.len());
            let s = keys.swap_remove(k);
            let order = take(&mut owner, s);
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
                add(pa, 0, &mut owner, &mut keys, &a);
            }
            live_pages += n;
        } else {
            // Orders skewed small: order k with probability ~ 2^-(k+1).
            let order = (rng.random::<u32>() | 1 << MAX_ORDER).trailing_zeros() as usize;
            let before = a.free_blocks();
            let hot_before = a.hot_pages();
            match a.alloc(order) {
                Ok(pa) => {
                    add(pa, order, &mut owner, &mut keys, &a);
                    live_pages += 1 << order;
                }
                Err(BuddyError::OutOfMemory) => {
                    failures += 1;
                    // With enough frames free, the hot list was drained before giving up
                    // (order 0 only fails with it empty); with too few, the watermark check
                    // refused at once. Otherwise nothing changed.
                    if a.free_pages() >= 1 << order {
                        assert_eq!(a.hot_pages(), 0, "failed alloc left frames on the hot list");
                    } else {
                        assert_eq!(a.hot_pages(), hot_before, "a hopeless alloc drained the hot list");
                    }
                    if hot_before == 0 || a.free_pages() < 1 << order {
                        assert_eq!(a.free_blocks(), before, "failed alloc changed the lists");
                    }
                    assert!(a.free_blocks()[order..].iter().all(|&n| n == 0));
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(a.free_pages(), start.free_pages - live_pages);
        assert!(a.hot_pages() <= high);
        if step % 5_000 == 0 {
            a.check_consistency().unwrap();
        }
    }
    a.check_consistency().unwrap();
    assert_eq!(a.stats().alloc_failures, failures);
    // (Miri's 300 steps do not get there: the exhaustion tests cover it.)
    assert!(failures > 0 || cfg!(miri), "the test should reach exhaustion");
    // Free everything (in a random order): all memory merges back.
    while let Some(s) = keys.pop() {
        let order = take(&mut owner, s);
        check_stamp(&a, PhysAddr::new(s), order);
        free(&mut a, PhysAddr::new(s), order).unwrap();
    }
    a.check_consistency().unwrap();
    assert_eq!(a.free_pages(), start.free_pages);
    // The hot list holds up to `high` frames off the lists; drained, memory merges back.
    let hot = a.hot_pages();
    assert_eq!(a.drain_hot(), hot);
    a.check_consistency().unwrap();
    let end = a.stats();
    assert_eq!(end.free_pages, start.free_pages);
    assert_eq!(end.hot_pages, 0);
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
        (PhysAddr::new(BASE + 36 * MIB), 0, BuddyError::NotAllocated), // free
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
    let m = Machine::small();
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
    assert_eq!(a.hot_pages(), HOT_HIGH, "bulk frees fill the hot list up to its watermark");
    free(&mut a, held, 3).unwrap();
    a.check_consistency().unwrap();
    assert_eq!(a.free_pages(), total);
    a.drain_hot();
    assert_eq!(a.free_blocks(), m.alloc_fresh_blocks());
}

impl Machine {
    fn alloc_fresh_blocks(&self) -> [usize; NR_ORDERS] {
        self.alloc(false).free_blocks()
    }
}

#[test]
fn strict_mode_detects_use_after_free() {
    let m = Machine::small();
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
    // The fixed part: the allocator value itself, hot list ring included.
    let fixed = core::mem::size_of::<BuddyAllocator>();
    // Three zones, each with its hot-list ring of 8 KiB.
    assert!(fixed <= 28 * 1024, "{fixed}");
}

/// 4 GiB of RAM, above the 4 GiB physical line, without code changes: only the metadata
/// and the block heads are touched, so the host commits a few MiB of the buffer.
#[test]
#[cfg_attr(miri, ignore = "4 GiB of simulated RAM: beyond Miri's memory and time (run natively)")]
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
    // RAM from 1 GiB to 5 GiB: Normal (the top GiB) first, then DMA32, lowest first in each.
    assert_eq!(blocks[0].as_u64(), 1 << 32);
    assert_eq!(blocks[255].as_u64(), (5 << 30) - 4 * MIB);
    assert_eq!(blocks[256].as_u64(), BASE + 2 * MIB + 2 * MIB, "the first 4 MiB block after the metadata's");
    assert_eq!(blocks.last().unwrap().as_u64(), (4 << 30) - 4 * MIB);
    let s = a.stats();
    assert_eq!((s.zones[ZONE_DMA32].managed, s.zones[ZONE_NORMAL].managed), ((3 << 18) - 512, 1 << 18));
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
    let linear = *global().unwrap().lock().linear_map();
    assert_eq!(Some(f.virt()), linear.phys_to_virt(f.phys()));
    // SAFETY: the block is owned by `f` (the pointer from the map: no integer cast).
    assert_eq!(unsafe { *linear.ptr::<u64>(f.phys()) }, 0);
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
    check_consistency().unwrap();
}

// ----- the order-0 hot list -----

#[test]
fn hot_list_ping_pong_never_touches_the_lists() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let fresh = a.stats();
    assert_eq!((fresh.hot_pages, a.hot_limits()), (0, (HOT_HIGH, HOT_BATCH)));
    // The first order-0 allocation refills a batch; low memory still comes first.
    let p = a.alloc(0).unwrap();
    assert_eq!(p.as_u64(), BASE + 0x20_b000);
    assert_eq!(a.hot_pages(), HOT_BATCH - 1);
    assert_eq!(a.free_pages(), fresh.free_pages - 1);
    free(&mut a, p, 0).unwrap();
    assert_eq!(a.hot_pages(), HOT_BATCH);
    let lists = a.free_blocks();
    // Size knob: 200 ping-pongs under Miri, 10,000 natively.
    for _ in 0..if cfg!(miri) { 200 } else { 10_000 } {
        let q = a.alloc(0).unwrap();
        assert_eq!(q, p, "the most recently freed frame comes back first");
        free(&mut a, q, 0).unwrap();
    }
    assert_eq!(a.free_blocks(), lists, "ping-pong touched the lists");
    assert_eq!(a.hot_pages(), HOT_BATCH);
    // Hot frames are free: counted in free_pages, not in buddyinfo.
    let s = a.stats();
    assert_eq!(s.free_pages, fresh.free_pages);
    let listed: usize = s.free_blocks.iter().enumerate().map(|(o, n)| n << o).sum();
    assert_eq!(listed + s.hot_pages, s.free_pages);
    a.check_consistency().unwrap();
    assert_eq!(a.drain_hot(), HOT_BATCH);
    assert_eq!(a.stats().free_blocks, fresh.free_blocks);
    assert_eq!(a.stats(), fresh);
}

#[test]
fn hot_list_watermarks() {
    let m = Machine::small();
    let mut a = m.alloc(false);
    // The arithmetic below is written for Linux's small-zone limits.
    a.set_hot_limits(64, 16);
    let fresh = a.stats();
    let mut v: Vec<PhysAddr> = (0..200).map(|_| a.alloc(0).unwrap()).collect();
    // 200 = 12 batches of 16 + 8: 13 refills, 8 frames left hot.
    assert_eq!(a.hot_pages(), 13 * 16 - 200);
    a.check_consistency().unwrap();
    let mut max = 0;
    for (i, &p) in v.iter().enumerate() {
        free(&mut a, p, 0).unwrap();
        max = max.max(a.hot_pages());
        assert!(a.hot_pages() <= 64);
        if i % 17 == 0 {
            a.check_consistency().unwrap();
        }
    }
    assert_eq!(max, 64, "drains a batch only above the watermark");
    // 8 + 200 = 208 frames went through: each drain at 65 leaves 49.
    assert!(a.hot_pages() > 64 - 16);
    assert_eq!(a.free_pages(), fresh.free_pages);
    a.check_consistency().unwrap();
    // Lowering the watermark drains the excess; high 0 turns the hot list off.
    a.set_hot_limits(10, 100);
    assert_eq!(a.hot_limits(), (10, 10));
    assert_eq!(a.hot_pages(), 10);
    a.check_consistency().unwrap();
    a.set_hot_limits(0, 16);
    assert_eq!((a.hot_pages(), a.hot_limits()), (0, (0, 1)));
    assert_eq!(a.stats(), fresh);
    v.clear();
    let p = a.alloc(0).unwrap();
    free(&mut a, p, 0).unwrap();
    assert_eq!(a.stats(), fresh, "no hot list: an order-0 free merges at once");
    a.set_hot_limits(HOT_CAPACITY + 100, 0);
    assert_eq!(a.hot_limits(), (HOT_CAPACITY - 1, 1));
    a.check_consistency().unwrap();
}

#[test]
fn hot_frames_cannot_be_freed_twice() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let p = a.alloc(0).unwrap();
    let q = a.alloc(0).unwrap();
    free(&mut a, p, 0).unwrap();
    let before = a.stats();
    assert_eq!(free(&mut a, p, 0), Err(BuddyError::NotAllocated), "double free of a hot frame");
    assert_eq!(free_bulk(&mut a, &[p]), Err(BuddyError::NotAllocated));
    // A hot frame aligned like an order-1 block is still "not allocated" as one.
    let mut held = vec![q];
    while (held.last().unwrap().as_u64() >> 12) % 2 != 0 {
        held.push(a.alloc(0).unwrap());
    }
    let even = *held.last().unwrap();
    free_bulk(&mut a, &held).unwrap();
    let before2 = a.stats();
    assert_eq!(free(&mut a, even, 1), Err(BuddyError::NotAllocated));
    assert_eq!(a.stats(), before2);
    assert_ne!(before, before2);
    a.check_consistency().unwrap();
    // A frame still on the hot list (never handed out) is refused as well.
    let other = a.alloc(0).unwrap();
    let (e, _) = a.hot_entry(
        a.zones[ZONE_DMA32].hot.ring
            [(a.zones[ZONE_DMA32].hot.bottom + a.zones[ZONE_DMA32].hot.len - 1) & (HOT_CAPACITY - 1)],
    );
    let untouched = PhysAddr::new(e << 12);
    assert_ne!(untouched, other);
    let before3 = a.stats();
    assert_eq!(free(&mut a, untouched, 0), Err(BuddyError::NotAllocated));
    assert_eq!(a.stats(), before3);
    free(&mut a, other, 0).unwrap();
    a.check_consistency().unwrap();
}

#[test]
fn larger_orders_drain_the_hot_list_before_failing() {
    let m = Machine::small();
    let mut a = m.alloc(false);
    let total = a.total_pages();
    let mut out = vec![PhysAddr::default(); total];
    assert_eq!(a.alloc_bulk(&mut out), total);
    // Give back one aligned 64-frame block's worth of frames: all of it lands on the hot
    // list, the lists stay empty.
    let set: std::collections::HashSet<u64> = out.iter().map(|p| p.as_u64()).collect();
    let start = out
        .iter()
        .map(|p| p.as_u64())
        .find(|&s| s % (64 * PAGE_SIZE as u64) == 0 && (0..64).all(|i| set.contains(&(s + i * PAGE_SIZE as u64))))
        .unwrap();
    let block: Vec<PhysAddr> = (0..64).map(|i| PhysAddr::new(start + i * PAGE_SIZE as u64)).collect();
    free_bulk(&mut a, &block).unwrap();
    assert_eq!((a.hot_pages(), a.free_pages()), (64, 64));
    assert_eq!(a.free_blocks(), [0; NR_ORDERS]);
    a.check_consistency().unwrap();
    // Order 7 cannot be had: 64 frames are free in all (the watermark check says so
    // without draining, as Linux's `__zone_watermark_ok`).
    let failures = a.stats().alloc_failures;
    assert_eq!(a.alloc(7), Err(BuddyError::OutOfMemory));
    assert_eq!(a.stats().alloc_failures, failures + 1);
    assert_eq!(a.hot_pages(), 64);
    // Order 6 drains the hot list, whose frames merge into one block, and gets it.
    assert_eq!(a.alloc(6).map(|p| p.as_u64()), Ok(start));
    assert_eq!(a.hot_pages(), 0);
    free(&mut a, PhysAddr::new(start), 6).unwrap();
    assert_eq!(a.free_blocks()[6], 1, "the 64 frames merged into one block");
    // Refill the hot list from that block, then order 6 drains it and succeeds.
    let p = a.alloc(0).unwrap();
    free(&mut a, p, 0).unwrap();
    assert_eq!(a.hot_pages(), HOT_BATCH);
    assert_eq!(a.alloc(6).unwrap().as_u64(), start);
    assert_eq!((a.hot_pages(), a.free_pages()), (0, 0));
    // Order 0 with empty lists and a non-empty hot list is served from the hot list.
    free(&mut a, out[0], 0).unwrap();
    assert_eq!(a.free_blocks(), [0; NR_ORDERS]);
    assert_eq!(a.alloc(0), Ok(out[0]));
    assert_eq!(a.alloc(0), Err(BuddyError::OutOfMemory));
    a.check_consistency().unwrap();
}

#[test]
fn bulk_takes_the_hot_list_first() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    // The arithmetic below is written for Linux's small-zone limits.
    a.set_hot_limits(64, 16);
    let v: Vec<PhysAddr> = (0..40).map(|_| a.alloc(0).unwrap()).collect();
    free_bulk(&mut a, &v).unwrap();
    let hot = a.hot_pages();
    assert_eq!(hot, 40 + 3 * 16 - 40);
    let mut out = vec![PhysAddr::default(); hot + 5];
    assert_eq!(a.alloc_bulk(&mut out), hot + 5);
    assert_eq!(a.hot_pages(), 0);
    // The hot list's top (the last frame freed) came first.
    assert_eq!(out[0], v[39]);
    a.check_consistency().unwrap();
    free_bulk(&mut a, &out).unwrap();
    assert_eq!(a.hot_pages(), hot + 5);
    a.check_consistency().unwrap();
}

#[test]
fn check_consistency_covers_the_hot_list() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let p = a.alloc(0).unwrap();
    free(&mut a, p, 0).unwrap();
    a.check_consistency().unwrap();
    // A duplicated entry.
    let top = a.zones[ZONE_DMA32].hot.pop_top();
    a.zones[ZONE_DMA32].hot.push_top(top);
    a.zones[ZONE_DMA32].hot.push_top(top);
    a.zones[ZONE_DMA32].free_pages += 1;
    assert_eq!(a.check_consistency(), Err("frame twice on the hot list"));
    a.zones[ZONE_DMA32].hot.pop_top();
    a.zones[ZONE_DMA32].free_pages -= 1;
    a.check_consistency().unwrap();
    // A hot frame whose state says allocated.
    let (_, idx) = a.hot_entry(top);
    a.set_state(idx, ST_ALLOC);
    assert_eq!(a.check_consistency(), Err("hot frame's state is not hot"));
    a.set_state(idx, ST_HOT);
    // A count that disagrees.
    a.zones[ZONE_DMA32].free_pages += 1;
    assert!(a.check_consistency().is_err());
    a.zones[ZONE_DMA32].free_pages -= 1;
    a.check_consistency().unwrap();
}

#[test]
fn strict_mode_with_the_hot_list() {
    let m = Machine::small();
    let mut a = m.alloc(true);
    let pa = a.alloc(0).unwrap();
    let p = va(&a, pa) as *mut u8;
    // SAFETY: the frame is allocated to the test.
    unsafe { p.write_bytes(0x11, PAGE_SIZE) };
    free(&mut a, pa, 0).unwrap();
    assert_eq!(a.hot_pages(), HOT_BATCH);
    // A hot frame is poisoned whole (no list node in it).
    assert!(all_bytes(p, PAGE_SIZE, POISON_BYTE));
    // Clean refills and ping-pongs report nothing.
    for _ in 0..3 {
        let q = a.alloc(0).unwrap();
        free(&mut a, q, 0).unwrap();
    }
    assert_eq!(a.stats().corruptions, 0);
    // A write after free into a hot frame, even in the bytes a list node would cover, is
    // caught when the frame is handed out again.
    // SAFETY: a stray write into free simulated RAM: what strict mode detects.
    unsafe { p.add(3).write(0) };
    assert_eq!(a.alloc(0).unwrap(), pa);
    assert_eq!(a.stats().corruptions, 1);
    free(&mut a, pa, 0).unwrap();
    // One caught after the frame was drained to the lists and merged.
    // SAFETY: as above.
    unsafe { p.add(0x800).write(0) };
    a.drain_hot();
    let mut out = vec![PhysAddr::default(); a.total_pages()];
    assert_eq!(a.alloc_bulk(&mut out), a.total_pages());
    assert_eq!(a.stats().corruptions, 2);
    free_bulk(&mut a, &out).unwrap();
    a.check_consistency().unwrap();
    // Frames drained from the hot list into the lists keep their poison: nothing new.
    a.drain_hot();
    assert_eq!(a.alloc_bulk(&mut out), a.total_pages());
    assert_eq!(a.stats().corruptions, 2);
    free_bulk(&mut a, &out).unwrap();
    a.check_consistency().unwrap();
}

#[test]
fn global_drain_hot() {
    let _g = testram::global_lock();
    let p = alloc_pages(0).unwrap();
    // SAFETY: allocated just above, never used.
    unsafe { free_pages(p, 0) }.unwrap();
    let s = stats().unwrap();
    assert!(s.hot_pages > 0);
    assert_eq!(drain_hot(), s.hot_pages);
    let d = stats().unwrap();
    assert_eq!((d.hot_pages, d.free_pages), (0, s.free_pages));
    check_consistency().unwrap();
}

#[test]
fn free_bulk_with_a_bad_entry_frees_nothing() {
    let m = Machine::new();
    let mut a = m.alloc(false);
    let good: Vec<PhysAddr> = (0..8).map(|_| a.alloc(0).unwrap()).collect();
    let before = a.stats();
    let mut list = good.clone();
    list.insert(4, PhysAddr::new(good[0].as_u64() + 1)); // misaligned
    assert!(free_bulk(&mut a, &list).is_err());
    assert_eq!(a.stats(), before, "nothing freed");
    a.check_consistency().unwrap();
    free_bulk(&mut a, &good).unwrap();
    a.check_consistency().unwrap();
}

// ----- zones, gfp flags, watermarks, the untouched frontier -----

/// Each zone's share of [`straddling`]'s RAM. Size knob: 4 MiB under Miri (one block of
/// the largest order), which interprets every frame a test exhausts.
const HALF: u64 = if cfg!(miri) { 4 * MIB } else { 32 * MIB };
/// Frames in each zone of [`straddling`] (8192; 1024 under Miri).
const HALF_PAGES: usize = (HALF / PAGE_SIZE as u64) as usize;
/// [`straddling`]'s metadata: 2 bytes per frame (8 pages; 1 under Miri).
const HALF_META: usize = 2 * 2 * HALF_PAGES / PAGE_SIZE;

/// 64 MiB straddling 4 GiB: 32 MiB of DMA32, 32 MiB of Normal (4 + 4 under Miri).
fn straddling() -> (TestRam, BuddyAllocator) {
    let ram = TestRam::new((4 << 30) - HALF, 2 * HALF as usize);
    // SAFETY: the test RAM is used by nothing else and outlives the allocator.
    let a = unsafe { BuddyAllocator::new(&[ram.whole()], &[], ram.linear(), false) }.unwrap();
    (ram, a)
}

#[test]
fn zones_split_at_4_gib_and_buddyinfo_has_a_line_each() {
    let (_ram, a) = straddling();
    let s = a.stats();
    let (d, n) = (s.zones[ZONE_DMA32], s.zones[ZONE_NORMAL]);
    assert_eq!(s.zones[ZONE_DMA].present, 0);
    assert_eq!((d.start_pfn, d.spanned, d.present), (((4 << 30) - HALF) >> 12, HALF_PAGES, HALF_PAGES));
    assert_eq!((n.start_pfn, n.spanned, n.present, n.managed), (1 << 20, HALF_PAGES, HALF_PAGES, HALF_PAGES));
    // The metadata (2 bytes per frame: 8 pages) sits at the bottom of DMA32.
    assert_eq!(d.managed, HALF_PAGES - HALF_META);
    assert_eq!(d.managed + n.managed, s.total_pages);
    let zi = s.zoneinfo().to_string();
    let (h, f) = (HALF_PAGES, HALF_PAGES - HALF_META);
    assert!(zi.starts_with(&format!("Node 0, zone    DMA32\n  pages free     {f}\n        min      0\n")), "{zi}");
    assert!(zi.contains(&format!("\nNode 0, zone   Normal\n  pages free     {h}\n")), "{zi}");
    assert!(zi.contains(&format!(
        "        spanned  {h}\n        present  {h}\n        managed  {h}\n        protection: (0, 0, 0)"
    )));
    let bi = s.buddyinfo().to_string();
    let lines: Vec<&str> = bi.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("Node 0, zone    DMA32 ") && lines[1].starts_with("Node 0, zone   Normal "));
    let blocks = HALF_PAGES >> MAX_ORDER;
    assert!(lines[1].ends_with(&format!("{blocks:>7}")), "{blocks} blocks of 4 MiB: {}", lines[1]);
    a.check_consistency().unwrap();
}

#[test]
fn watermarks_as_linux() {
    // Linux at -m 8G: 3 GiB of DMA32, 5 GiB of Normal (managed pages as if nothing were
    // reserved): min_free_kbytes = int_sqrt(8 GiB in KiB × 16) = 11585.
    assert_eq!(default_min_free_kbytes(2 << 20), 11585);
    assert_eq!(default_min_free_kbytes(1 << 31), 262_144, "the ceiling: 256 MiB");
    assert_eq!(default_min_free_kbytes(10), 128, "the floor");
    let managed = [0, 786_432, 1_310_720];
    let (w, r) = per_zone_wmarks(11585, &managed);
    let pages_min = 11585 / 4;
    assert_eq!(w[1][0], pages_min * 786_432 / 2_097_152);
    assert_eq!(w[2][0], pages_min * 1_310_720 / 2_097_152);
    for z in 1..3 {
        let d = (w[z][0] / 4).max(managed[z] / 1000);
        assert_eq!(w[z], [w[z][0], w[z][0] + d, w[z][0] + 2 * d]);
    }
    assert_eq!(r[1], [0, 0, 1_310_720 / 256]);
    assert_eq!(r[0], [0, 0, 0], "an empty zone reserves nothing");
    assert_eq!(r[2], [0, 0, 0]);
    // With a DMA zone, DMA reserves against both zones above it.
    let (_, r) = per_zone_wmarks(11585, &[4096, 782_336, 1_310_720]);
    assert_eq!(r[0], [0, 782_336 / 256, (782_336 + 1_310_720) / 256]);
    // int_sqrt is exact.
    for x in [0u64, 1, 2, 3, 4, 15, 16, 17, 1 << 40, (1 << 40) - 1, u64::MAX / 2] {
        let r = int_sqrt(x);
        assert!(r * r <= x && (r + 1).checked_mul(r + 1).is_none_or(|q| q > x), "{x}");
    }
}

#[test]
fn gfp_dma32_never_above_4_gib_and_normal_falls_back() {
    let (_ram, mut a) = straddling();
    let mut got = Vec::new();
    // DMA32 requests only ever get frames below 4 GiB, though Normal has plenty.
    for i in 0..HALF_PAGES / 4 {
        let order = i % 3;
        let pa = a.alloc_gfp(order, GFP_DMA32).unwrap();
        assert!(pa.as_u64() + (PAGE_SIZE << order) as u64 <= 1 << 32);
        got.push((pa, order));
    }
    // Kernel requests take Normal first...
    let k = a.alloc(0).unwrap();
    assert!(k.as_u64() >= 1 << 32);
    free(&mut a, k, 0).unwrap();
    // ... and fall back to DMA32 once Normal is empty.
    let mut normal = Vec::new();
    loop {
        let pa = a.alloc(0).unwrap();
        if pa.as_u64() < 1 << 32 {
            got.push((pa, 0));
            break;
        }
        normal.push(pa);
    }
    assert_eq!(normal.len(), HALF_PAGES);
    assert_eq!(a.stats().zones[ZONE_NORMAL].free_pages, 0);
    // A DMA32 request never goes upwards: with DMA32 empty it fails though Normal frees.
    free_bulk(&mut a, &normal).unwrap();
    let mut rest = vec![PhysAddr::new(0); HALF_PAGES];
    let n = a.alloc_bulk_gfp(&mut rest, GFP_DMA32);
    assert!(rest[..n].iter().all(|p| p.as_u64() < 1 << 32));
    assert_eq!(a.stats().zones[ZONE_DMA32].free_pages, 0);
    assert_eq!(a.alloc_gfp(0, GFP_DMA32), Err(BuddyError::OutOfMemory));
    assert!(a.alloc(0).unwrap().as_u64() >= 1 << 32);
    a.check_consistency().unwrap();
}

#[test]
fn lowmem_reserve_keeps_the_last_of_dma32_from_normal_requests() {
    let (_ram, mut a) = straddling();
    a.set_min_free_kbytes(Some(0));
    let reserve = a.stats().zones[ZONE_DMA32].lowmem_reserve[ZONE_NORMAL];
    assert_eq!(reserve, HALF_PAGES / 256);
    // Empty Normal, then take DMA32 with kernel requests: they stop at the reserve.
    let mut v = Vec::new();
    while let Ok(pa) = a.alloc(0) {
        v.push(pa);
    }
    let s = a.stats();
    assert_eq!(s.zones[ZONE_NORMAL].free_pages, 0);
    assert_eq!(s.zones[ZONE_DMA32].free_pages, reserve);
    assert_eq!(a.alloc(0), Err(BuddyError::BelowMin), "frames are there, but kept for DMA32 requests");
    assert_eq!(a.stats().watermark_failures, 2, "the loop's last try and this one");
    // A DMA32 request may have them, down to the last one.
    for _ in 0..reserve {
        v.push(a.alloc_gfp(0, GFP_DMA32).unwrap());
    }
    assert_eq!(a.alloc_gfp(0, GFP_DMA32), Err(BuddyError::OutOfMemory));
    // Without the reserve a Normal request takes the last of DMA32.
    free_bulk(&mut a, &v[v.len() - 3..]).unwrap();
    a.set_lowmem_reserve(false);
    assert!(a.alloc(0).unwrap().as_u64() < 1 << 32);
    a.check_consistency().unwrap();
}

#[test]
fn atomic_may_dip_to_three_eighths_of_min_never_lower() {
    // Size knob: 8 MiB under Miri, which interprets every frame the test exhausts.
    let ram = TestRam::new(BASE, (if cfg!(miri) { 8 } else { 64 } * MIB) as usize);
    // SAFETY: the test RAM is used by nothing else and outlives the allocator.
    let mut a = unsafe { BuddyAllocator::new(&[ram.whole()], &[], ram.linear(), false) }.unwrap();
    a.set_min_free_kbytes(None);
    let s = a.stats();
    let min = s.zones[ZONE_DMA32].min;
    assert_eq!(s.min_free_kbytes, default_min_free_kbytes(s.total_pages));
    assert_eq!(min, s.min_free_kbytes / 4, "one zone: all of pages_min");
    // GFP_KERNEL stops at min: Linux's check is free - 1 > min for order 0 ...
    let mut v = Vec::new();
    while let Ok(pa) = a.alloc(0) {
        v.push(pa);
    }
    assert_eq!(a.free_pages(), min);
    assert_eq!(a.alloc(0), Err(BuddyError::BelowMin));
    assert_eq!(a.alloc_gfp(0, GFP_NOWAIT), Err(BuddyError::BelowMin), "no reserves without __GFP_HIGH");
    // ... GFP_ATOMIC goes on down to 3/8 of it.
    let floor = GFP_ATOMIC.min_watermark(min);
    assert_eq!(floor, (min - min / 2) - (min - min / 2) / 4);
    while let Ok(pa) = a.alloc_gfp(0, GFP_ATOMIC) {
        v.push(pa);
    }
    assert_eq!(a.free_pages(), floor);
    assert_eq!(a.alloc_gfp(0, GFP_ATOMIC), Err(BuddyError::BelowMin));
    // Bulk calls stop at the same marks.
    let mut out = [PhysAddr::new(0); 8];
    assert_eq!(a.alloc_bulk_gfp(&mut out, GFP_ATOMIC), 0);
    free_bulk(&mut a, &v[v.len() - 8..]).unwrap();
    assert_eq!(a.alloc_bulk(&mut out), 0, "still below min for GFP_KERNEL");
    assert_eq!(a.alloc_bulk_gfp(&mut out, GFP_ATOMIC), 8);
    // Higher orders: the whole block must fit above the mark.
    free_bulk(&mut a, &out[..7]).unwrap();
    assert_eq!(a.alloc_gfp(3, GFP_ATOMIC).map(|_| ()), Err(BuddyError::BelowMin));
    a.check_consistency().unwrap();
}

#[test]
fn gfp_zero_zeroes_and_noretry_does_not_drain() {
    let m = Machine::small();
    let mut a = m.alloc(false);
    let p = a.alloc(2).unwrap();
    // SAFETY: the block is ours.
    unsafe { core::ptr::write_bytes(va(&a, p) as *mut u8, 0x5a, 4 * PAGE_SIZE) };
    free(&mut a, p, 2).unwrap();
    let q = a.alloc_gfp(2, GFP_KERNEL | __GFP_ZERO).unwrap();
    assert_eq!(q, p);
    // SAFETY: the block is ours.
    let bytes = unsafe { core::slice::from_raw_parts(va(&a, q) as *const u8, 4 * PAGE_SIZE) };
    assert!(bytes.iter().all(|&b| b == 0));
    free(&mut a, q, 2).unwrap();
    // Everything on the hot list: an order-1 request with __GFP_NORETRY fails rather than
    // drain it.
    let total = a.total_pages();
    let mut all = vec![PhysAddr::new(0); total];
    assert_eq!(a.alloc_bulk(&mut all), total);
    let pair: Vec<PhysAddr> = all.iter().copied().filter(|p| p.as_u64() & 0x1fff == 0).take(1).collect();
    let pair = [pair[0], pair[0].add(PAGE_SIZE as u64)];
    assert!(all.contains(&pair[1]));
    free_bulk(&mut a, &pair).unwrap();
    assert_eq!(a.alloc_gfp(1, GFP_KERNEL | __GFP_NORETRY), Err(BuddyError::OutOfMemory));
    assert_eq!(a.hot_pages(), 2);
    assert_eq!(a.alloc_gfp(1, GFP_KERNEL), Ok(pair[0]));
    a.check_consistency().unwrap();
}

#[test]
fn a_dma_zone_below_the_dma_limit() {
    let ram = TestRam::new(BASE, (64 * MIB) as usize);
    let limit = PhysAddr::new(BASE + 16 * MIB);
    // SAFETY: the test RAM is used by nothing else and outlives the allocator.
    let mut a = unsafe { BuddyAllocator::new_zoned(&[ram.whole()], &[], ram.linear(), false, Some(limit)) }.unwrap();
    let s = a.stats();
    assert_eq!((s.zones[ZONE_DMA].present, s.zones[ZONE_DMA32].present), (4096, 12288));
    assert_eq!(s.buddyinfo().to_string().lines().count(), 2);
    // Kernel requests take DMA32 first, DMA last; GFP_DMA only DMA.
    assert!(a.alloc(0).unwrap() >= limit);
    for _ in 0..100 {
        assert!(a.alloc_gfp(0, GFP_DMA).unwrap() < limit);
    }
    a.check_consistency().unwrap();
}

/// The boot writes no free frame: every byte outside the metadata keeps the pattern it
/// had before init, for two patterns (a write of the same value would pass one).
#[test]
fn init_writes_no_free_frame() {
    for strict in [false, true] {
        for pattern in [0x3cu8, 0xc3] {
            // Size knob: 8 MiB under Miri (it interprets the byte comparison below).
            let mib = if cfg!(miri) { 8 } else { 64 };
            let mut ram = TestRam::new(BASE, (mib * MIB) as usize);
            ram.bytes().fill(pattern);
            let reserved = [ram.range(0, 0x20_3000), ram.range(mib * 5 / 8 * MIB + 0x800, 0x1000)];
            // SAFETY: the test RAM is used by nothing else and outlives the allocator.
            let a = unsafe { BuddyAllocator::new(&[ram.whole()], &reserved, ram.linear(), strict) }.unwrap();
            let meta = a.metadata_range();
            assert_eq!(a.untouched_pages(), a.total_pages());
            assert_eq!(a.free_blocks().iter().enumerate().map(|(o, n)| n << o).sum::<usize>(), a.total_pages());
            a.check_consistency().unwrap();
            let (ms, me) = ((meta.start().as_u64() - BASE) as usize, (meta.end().as_u64() - BASE) as usize);
            let bytes = ram.bytes();
            let same = vec![pattern; bytes.len()];
            // Slice comparisons (a memcmp, also for Miri); the count only on failure.
            if bytes[..ms] != same[..ms] || bytes[me..] != same[me..] {
                let written = bytes.iter().enumerate().filter(|&(i, &b)| (i < ms || i >= me) && b != pattern).count();
                panic!("{written} bytes written outside the metadata (strict {strict})");
            }
        }
    }
}

/// Blocks are carved from the frontier on demand, low addresses first; what was carved
/// and freed merges back, and buddyinfo counts the untouched blocks all along.
#[test]
fn the_frontier_is_carved_on_demand() {
    let m = Machine::small();
    let mut a = m.alloc(true);
    let boot = a.stats();
    let untouched = a.untouched_pages();
    let p = a.alloc(0).unwrap();
    assert!(a.untouched_pages() < untouched, "the first allocation carved a block");
    assert!(a.untouched_pages() + 1024 >= untouched, "one max-order block at most");
    free(&mut a, p, 0).unwrap();
    a.drain_hot();
    assert_eq!(a.stats(), boot, "carved and given back: buddyinfo as at boot");
    // Carve everything: strict mode checks the poison of blocks carved from the frontier,
    // which it wrote at the carve, so nothing is reported.
    let total = a.total_pages();
    let mut all = vec![PhysAddr::new(0); total];
    assert_eq!(a.alloc_bulk(&mut all), total);
    assert_eq!(a.untouched_pages(), 0);
    assert_eq!(a.stats().corruptions, 0);
    free_bulk(&mut a, &all).unwrap();
    a.drain_hot();
    assert_eq!(a.stats().free_blocks, boot.free_blocks);
    a.check_consistency().unwrap();
}

// ----- the per-CPU page lists of the global allocator -----

/// Host threads playing four CPUs allocate and free order-0 frames (and some larger
/// blocks) on the global allocator, each freeing a third of its frames on another "CPU";
/// every frame's contents are checked; after each CPU drained its lists, the allocator is
/// back where it started, fully merged and consistent.
#[test]
#[cfg_attr(miri, ignore = "over 10 minutes under Miri even at 60 operations a thread")]
fn per_cpu_lists_under_thread_stress_end_at_baseline() {
    let _g = testram::global_lock();
    drain_hot();
    let before = stats().unwrap();
    let ops = if cfg!(miri) { 60 } else { 20_000 };
    let (tx, rx): (Vec<_>, Vec<_>) = (0..4).map(|_| std::sync::mpsc::channel::<(u64, usize)>()).unzip();
    let rx: Vec<_> = rx.into_iter().map(std::sync::Mutex::new).collect();
    std::thread::scope(|sc| {
        for cpu in 0..4 {
            let tx = tx.clone();
            let rx = &rx;
            sc.spawn(move || {
                hal::smp::host_play_cpu(cpu);
                let mut held: Vec<(PhysAddr, usize, u8)> = Vec::new();
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ cpu as u64;
                let linear = *global().unwrap().lock().linear_map();
                let fill = |pa: PhysAddr, order: usize, v: u8| {
                    // SAFETY: the block is ours (just allocated), inside the linear map.
                    unsafe { linear.ptr::<u8>(pa).write_bytes(v, PAGE_SIZE << order) }
                };
                let check = |pa: PhysAddr, order: usize, v: u8| {
                    // SAFETY: as for `fill`: a block this thread (or its sender) filled.
                    let b = unsafe { core::slice::from_raw_parts(linear.ptr::<u8>(pa), PAGE_SIZE << order) };
                    assert!(b.iter().all(|&x| x == v), "frame {pa:#x} overwritten");
                };
                for i in 0..ops {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Frames sent here by other CPUs: free them on this one.
                    while let Ok((pa, order)) = rx[cpu].lock().unwrap().try_recv() {
                        // SAFETY: the sender gave up the block; nothing else uses it.
                        unsafe { free_pages(PhysAddr::new(pa), order) }.unwrap();
                    }
                    if held.len() < 48 && (!seed.is_multiple_of(3) || held.is_empty()) {
                        let order = if seed.is_multiple_of(17) { 2 } else { 0 };
                        let pa = alloc_pages(order).unwrap();
                        let v = (i as u8) ^ cpu as u8;
                        fill(pa, order, v);
                        held.push((pa, order, v));
                    } else {
                        let (pa, order, v) = held.swap_remove((seed >> 8) as usize % held.len());
                        check(pa, order, v);
                        if seed % 9 < 3 {
                            tx[(cpu + 1 + (seed >> 20) as usize % 3) % 4].send((pa.as_u64(), order)).unwrap();
                        } else {
                            // SAFETY: the block is ours and no longer used.
                            unsafe { free_pages(pa, order) }.unwrap();
                        }
                    }
                }
                for (pa, order, v) in held {
                    check(pa, order, v);
                    // SAFETY: the block is ours and no longer used.
                    unsafe { free_pages(pa, order) }.unwrap();
                }
            });
        }
    });
    // Frames still in flight, then every CPU's lists.
    for r in &rx {
        while let Ok((pa, order)) = r.lock().unwrap().try_recv() {
            // SAFETY: the sender gave up the block.
            unsafe { free_pages(PhysAddr::new(pa), order) }.unwrap();
        }
    }
    for cpu in 0..4 {
        std::thread::scope(|sc| {
            sc.spawn(move || {
                hal::smp::host_play_cpu(cpu);
                drain_local();
            });
        });
    }
    check_consistency().unwrap();
    let after = stats().unwrap();
    assert_eq!(after.hot_pages, 0);
    assert_eq!(after.free_pages, before.free_pages);
    assert_eq!(after.free_blocks, before.free_blocks, "everything merged back");
}

/// The global allocator's order-0 path goes through the calling CPU's list: a frame freed
/// comes back first on the same CPU, is counted free (in `hot_pages`), and a double free
/// of it is refused; `high` 0 sends every free straight to the zone.
#[test]
fn per_cpu_lists_recycle_locally_and_refuse_double_frees() {
    let _g = testram::global_lock();
    drain_hot();
    let before = stats().unwrap();
    let p = alloc_pages(0).unwrap();
    // SAFETY: the frame is ours and unused.
    unsafe { free_pages(p, 0) }.unwrap();
    let s = stats().unwrap();
    assert!(s.hot_pages > 0, "the refill left frames on this CPU's list");
    assert_eq!(s.free_pages, before.free_pages);
    assert_eq!(unsafe_free_pages(p, 0), Err(BuddyError::NotAllocated), "double free refused");
    assert_eq!(alloc_pages(0).unwrap(), p, "the most recently freed frame comes back first");
    // SAFETY: as above.
    unsafe { free_pages(p, 0) }.unwrap();
    let limits = pcp_limits();
    assert!(limits.iter().any(|l| l.batch > 0 && l.high >= 4 * l.batch));
    set_pcp_limits(Some(PcpLimits { high: 0, batch: 1 }));
    let q = alloc_pages(0).unwrap();
    // SAFETY: as above.
    unsafe { free_pages(q, 0) }.unwrap();
    assert_eq!(stats().unwrap().hot_pages, 0, "high 0: nothing stays on the list");
    set_pcp_limits(None);
    assert_eq!(pcp_limits(), limits);
    check_consistency().unwrap();
    drain_hot();
    assert_eq!(stats().unwrap().free_blocks, before.free_blocks);
}

/// The per-CPU lists' bulk free: a bad frame anywhere frees nothing; a frame listed twice
/// is freed once and the copy refused; for the one-pass length (up to 64) and beyond it.
#[test]
fn per_cpu_bulk_free_with_a_bad_frame_frees_nothing_and_a_copy_once() {
    let _g = testram::global_lock();
    hal::smp::host_play_cpu(0);
    drain_hot();
    let free = || stats().unwrap().free_pages;
    for n in [3usize, 64, 70] {
        let mut frames = vec![PhysAddr::new(0); n];
        assert_eq!(alloc_pages_bulk(&mut frames), n);
        let gone = alloc_pages(0).unwrap();
        // SAFETY: just allocated, never used.
        unsafe { free_pages(gone, 0) }.unwrap();
        let before = free();
        // Misaligned, and free already (not a copy of an earlier entry).
        for bad in [frames[0].add(0x10), gone] {
            let mut list = frames.clone();
            list.insert(n / 2, bad);
            // SAFETY: refused before anything is freed (asserted); the frames stay ours.
            assert!(unsafe { free_pages_bulk(&list) }.is_err(), "{n} frames, bad one at {}", n / 2);
            assert_eq!(free(), before, "{n} frames: a refused bulk free freed something");
        }
        let mut list = frames.clone();
        list.insert(n / 2 + 1, frames[n / 2]);
        // SAFETY: the frames are ours; the copy is refused (asserted).
        assert_eq!(unsafe { free_pages_bulk(&list) }, Err(BuddyError::NotAllocated));
        assert_eq!(free(), before + n, "{n} frames: each freed once");
    }
    drain_hot();
    check_consistency().unwrap();
}
