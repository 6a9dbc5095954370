//! Host tests of the slab allocator: geometry, a model test, misuse, named caches,
//! strict mode, empty-slab caching, threads, the global `KernelAllocator`.

use std::collections::BTreeMap;

use hal::addr::PAGE_SIZE;
use hal::sync::{classes::BUDDY, IrqSpinLock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::buddy::testram::{self, TestRam};
use crate::buddy::{BuddyAllocator, BuddyStats};

const MIB: u64 = 1 << 20;
const BASE: u64 = 0x8000_0000;

/// Simulated RAM and a buddy allocator over it (one region, with a reserved hole).
struct Env {
    _ram: TestRam,
    buddy: IrqSpinLock<BuddyAllocator>,
}

impl Env {
    fn new(mib: u64, strict: bool) -> Self {
        let ram = TestRam::new(BASE, (mib * MIB) as usize);
        let reserved = [ram.range(0, 0x8000), ram.range(5 * MIB + 0x3000, 0x1000)];
        // SAFETY: the test RAM is used by nothing else and outlives the allocator.
        let buddy = unsafe { BuddyAllocator::new(&[ram.whole()], &reserved, ram.linear(), strict) }.unwrap();
        Env { _ram: ram, buddy: IrqSpinLock::new(&BUDDY, buddy) }
    }

    fn bstats(&self) -> BuddyStats {
        self.buddy.lock().stats()
    }
}

fn kfree(s: &SlabAllocator<'_>, p: NonNull<u8>) -> Result<(), SlabError> {
    // SAFETY: the tests free each object once and never use it afterwards (misuse tests
    // pass pointers the allocator must refuse without touching them).
    unsafe { s.kfree(p) }
}

fn fill(p: NonNull<u8>, len: usize, v: u8) {
    // SAFETY: the object is allocated to the test with at least `len` bytes.
    unsafe { p.as_ptr().write_bytes(v, len) }
}

fn holds(p: NonNull<u8>, len: usize, v: u8) -> bool {
    // SAFETY: as for `fill`.
    let bytes = unsafe { core::slice::from_raw_parts(p.as_ptr(), len) };
    // A slice comparison (a memcmp, also for Miri, which would interpret a loop per byte).
    bytes == vec![v; len].as_slice()
}

/// Asserts that no object was handed out twice among `objs`.
fn assert_distinct(objs: &[NonNull<u8>]) {
    let mut addrs: Vec<usize> = objs.iter().map(|p| p.as_ptr() as usize).collect();
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), objs.len(), "an object handed out twice");
}

fn stats_of(s: &SlabAllocator<'_>, name: &str) -> CacheStats {
    s.cache_stats().find(|c| c.name == name).unwrap()
}

#[test]
fn geometry_of_the_classes() {
    for strict in [false, true] {
        for (i, &size) in KMALLOC_SIZES.iter().enumerate() {
            let g = Geometry::new(size, KMALLOC_ALIGNS[i], strict).unwrap();
            assert_eq!(g.size, size);
            assert_eq!(g.first % g.align, 0);
            assert_eq!(g.stride % g.align, 0);
            assert!(g.first >= HEADER_BYTES + g.objs.div_ceil(64) * 8);
            assert!(g.first + g.objs * g.stride <= g.slab_bytes());
            if !strict {
                assert!(g.waste() * 8 <= g.slab_bytes(), "{size}: {g:?}");
            } else {
                assert!(g.stride >= size + RED_ZONE_MIN);
            }
        }
    }
    let g = Geometry::new(64, 64, false).unwrap();
    assert_eq!((g.order, g.objs, g.first), (0, 63, 64));
    let g = Geometry::new(8, 8, false).unwrap();
    assert_eq!((g.order, g.objs, g.first), (0, 500, 96));
    let g = Geometry::new(2048, 2048, false).unwrap();
    assert_eq!((g.order, g.objs), (2, 7));
    assert_eq!(Geometry::new(0, 8, false), None);
    assert_eq!(Geometry::new(8, 3, false), None);
    assert_eq!(Geometry::new(8, 8192, false), None);
    assert_eq!(Geometry::new(40_000, 8, false), None);
    assert!(Geometry::new(5, 1, false).is_some_and(|g| g.size == 8 && g.align == 8));
}

/// The reciprocal replaces the division by the stride: exact for every offset of a slab.
#[test]
#[cfg_attr(miri, ignore = "exhaustive arithmetic (millions of divisions), no memory access for Miri to check")]
fn reciprocal_division_is_exact() {
    let max = PAGE_SIZE << MAX_SLAB_ORDER;
    for stride in (8..=max / 2).step_by(8) {
        let recip = (1u64 << 32).div_ceil(stride as u64);
        for rel in 0..max as u64 {
            assert_eq!((rel * recip) >> 32, rel / stride as u64, "stride {stride}, rel {rel}");
        }
    }
}

#[test]
fn size_classes() {
    let cases = [
        (1, 1, Some(0)),
        (8, 8, Some(0)),
        (9, 1, Some(1)),
        (64, 8, Some(3)),
        (65, 8, Some(4)),
        (96, 8, Some(4)),
        (96, 64, Some(5)),
        (150, 64, Some(6)),
        (97, 8, Some(5)),
        (130, 8, Some(6)),
        (193, 8, Some(7)),
        (8, 512, Some(8)),
        (2048, 8, Some(10)),
        (2049, 8, None),
        (8, 4096, None),
    ];
    for (size, align, class) in cases {
        assert_eq!(kmalloc_class(size, align), class, "{size}/{align}");
    }
    assert_eq!(large_order(2049, 8), Ok(0));
    assert_eq!(large_order(4097, 8), Ok(1));
    assert_eq!(large_order(8, 8192), Ok(1));
    assert_eq!(large_order(4 << 20, 8), Ok(10));
    assert_eq!(large_order((4 << 20) + 1, 8), Err(SlabError::TooLarge));
}

#[test]
fn kmalloc_basics_and_slabinfo() {
    let env = Env::new(16, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let base = env.bstats().free_pages;
    let a = s.kmalloc(64, 8).unwrap();
    assert_eq!(a.as_ptr() as usize % 64, 0);
    assert_eq!(s.ksize(a), Ok(64));
    let b = s.kmalloc(100, 8).unwrap();
    assert_eq!(s.ksize(b), Ok(128));
    let c = s.kmalloc(3000, 8).unwrap();
    assert_eq!(s.ksize(c), Ok(4096));
    assert_eq!(c.as_ptr() as usize % 4096, 0);
    let d = s.kmalloc(10, 8192).unwrap();
    assert_eq!(d.as_ptr() as usize % 8192, 0);
    assert_eq!(s.ksize(d), Ok(8192));
    let z = s.kzalloc(200, 8).unwrap();
    assert!(holds(z, 200, 0));
    assert_eq!(s.kmalloc(0, 8), Err(SlabError::ZeroSize));
    assert_eq!(s.kmalloc(8, 3), Err(SlabError::BadLayout));
    assert_eq!(s.kmalloc(5 << 20, 8), Err(SlabError::TooLarge));
    assert_eq!(s.stats().alloc_failures, 3);
    let st = s.stats();
    assert_eq!((st.large_allocs, st.large_pages), (2, 3));
    assert_eq!(st.slab_pages, 3); // kmalloc-64, -128, -256
    assert_eq!(env.bstats().free_pages, base - 6);

    let info = s.slabinfo().to_string();
    let mut lines = info.lines();
    assert_eq!(lines.next(), Some("# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab>"));
    assert_eq!(lines.next(), Some("kmalloc-2048           0      0   2048    7    4"));
    assert!(info.contains("\nkmalloc-64             1     63     64   63    1\n"));
    assert!(info.contains("\nkmalloc-128            1     31    128   31    1\n"));
    assert_eq!(info.lines().count(), 1 + NR_KMALLOC);

    for p in [a, b, c, d, z] {
        kfree(&s, p).unwrap();
    }
    assert_eq!(s.stats().large_pages, 0);
    // One empty slab kept per cache used; shrink gives them back.
    assert_eq!(env.bstats().free_pages, base - 3);
    assert_eq!(s.shrink(), 3);
    assert_eq!(env.bstats().free_pages, base);
    env.buddy.lock().check_consistency().unwrap();
}

/// A live allocation in the model.
struct Live {
    ptr: NonNull<u8>,
    size: usize,
    fill: u8,
    large: bool,
}

fn random_layout(rng: &mut SmallRng) -> (usize, usize) {
    let r: u32 = rng.random_range(0..1000);
    let size = if r < 600 {
        rng.random_range(1..=256)
    } else if r < 950 {
        rng.random_range(257..=2048)
    } else if r < 995 {
        rng.random_range(2049..=40_000)
    } else {
        rng.random_range(40_001..=1 << 20)
    };
    let align = if rng.random_range(0..10) < 7 { 8 } else { 1 << rng.random_range(0..=12) };
    (size, align)
}

/// Random alloc/free of mixed sizes and alignments against a model.
fn model(strict: bool, ops: u32, seed: u64) {
    // Size knob: 32 MiB under Miri (its few hundred operations hold far less).
    let env = Env::new(if cfg!(miri) { 32 } else { 96 }, strict);
    let s = SlabAllocator::new(&env.buddy, strict).unwrap();
    let start = env.bstats();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut live: Vec<Live> = Vec::new();
    let mut spans: BTreeMap<usize, usize> = BTreeMap::new();
    let mut failures = 0;
    for step in 0..ops {
        let alloc = live.is_empty() || (live.len() < 8_000 && rng.random_range(0..100) < 55);
        if alloc {
            let (size, align) = random_layout(&mut rng);
            let p = match s.kmalloc(size, align) {
                Ok(p) => p,
                Err(SlabError::OutOfMemory) => {
                    failures += 1;
                    continue;
                }
                Err(e) => panic!("kmalloc({size}, {align}): {e}"),
            };
            let a = p.as_ptr() as usize;
            assert_eq!(a % align, 0, "kmalloc({size}, {align}) misaligned");
            let cap = s.ksize(p).unwrap();
            assert!(cap >= size);
            if let Some((_, &end)) = spans.range(..a + size).next_back() {
                assert!(end <= a, "object {a:#x} overlaps another");
            }
            spans.insert(a, a + size);
            let fill = step as u8 | 1;
            fill_obj(p, size, fill);
            live.push(Live { ptr: p, size, fill, large: size > KMALLOC_MAX_CACHE_SIZE || align > 2048 });
        } else {
            let i = rng.random_range(0..live.len());
            let l = live.swap_remove(i);
            assert!(holds(l.ptr, l.size, l.fill), "object {:p} contents changed", l.ptr);
            spans.remove(&(l.ptr.as_ptr() as usize));
            kfree(&s, l.ptr).unwrap();
        }
        if step % 2_000 == 0 {
            check_accounting(&env, &s, &start, &live);
        }
    }
    check_accounting(&env, &s, &start, &live);
    assert_eq!(s.stats().alloc_failures, failures);
    for l in live.drain(..) {
        assert!(holds(l.ptr, l.size, l.fill));
        kfree(&s, l.ptr).unwrap();
    }
    for c in s.cache_stats() {
        assert_eq!(c.active_objs, 0, "{}", c.name);
        assert!(c.slabs <= 1, "{} keeps {} slabs", c.name, c.slabs);
    }
    let kept: usize = s.cache_stats().map(|c| c.pages()).sum();
    assert_eq!(env.bstats().free_pages, start.free_pages - kept);
    assert_eq!(s.shrink(), kept);
    // The buddy's hot list keeps some order-0 frames off its lists: drain it to compare
    // buddyinfo.
    env.buddy.lock().drain_hot();
    let end = env.bstats();
    assert_eq!(end.free_pages, start.free_pages);
    assert_eq!(end.free_blocks, start.free_blocks);
    assert_eq!(end.corruptions, 0);
    let st = s.stats();
    assert_eq!((st.slab_pages, st.large_allocs, st.large_pages, st.invalid_frees, st.corruptions), (0, 0, 0, 0, 0));
    env.buddy.lock().check_consistency().unwrap();
}

fn fill_obj(p: NonNull<u8>, len: usize, v: u8) {
    fill(p, len, v);
}

fn check_accounting(env: &Env, s: &SlabAllocator<'_>, start: &BuddyStats, live: &[Live]) {
    let small = live.iter().filter(|l| !l.large).count();
    let large = live.iter().filter(|l| l.large).count();
    let active: usize = s.cache_stats().map(|c| c.active_objs).sum();
    assert_eq!(active, small);
    let st = s.stats();
    assert_eq!(st.large_allocs, large);
    let b = env.bstats();
    assert_eq!(b.free_pages + st.slab_pages + st.large_pages, start.free_pages);
    for c in s.cache_stats() {
        assert!(c.active_objs <= c.num_objs);
    }
}

#[test]
fn model_random_ops() {
    model(false, if cfg!(miri) { 400 } else { 100_000 }, 0x51ab);
}

#[test]
fn model_random_ops_strict() {
    model(true, if cfg!(miri) { 200 } else { 30_000 }, 0x5eed);
}

#[test]
fn misuse_is_refused_and_changes_nothing() {
    let env = Env::new(16, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let obj = s.kmalloc(32, 8).unwrap();
    let other = s.kmalloc(32, 8).unwrap();
    let large = s.kmalloc(9000, 8).unwrap();
    let page = env.buddy.lock().alloc(0).unwrap();
    let page_va = NonNull::new(env.buddy.lock().linear_map().ptr::<u8>(page)).unwrap();
    let mut local = 0u64;
    let stack = NonNull::from(&mut local).cast::<u8>();
    let slab_base = NonNull::new(obj.as_ptr().wrapping_sub(obj.as_ptr() as usize % PAGE_SIZE)).unwrap();
    let at = |p: NonNull<u8>, off: usize| NonNull::new(p.as_ptr().wrapping_add(off)).unwrap();
    let cases = [
        (page_va, SlabError::NotOwned),
        (at(page_va, 64), SlabError::NotOwned),
        (stack, SlabError::NotOwned),
        (at(obj, 8), SlabError::NotObjectStart),
        (at(obj, 1), SlabError::NotObjectStart),
        (slab_base, SlabError::NotObjectStart),
        (at(large, 8), SlabError::NotObjectStart),
        (at(large, PAGE_SIZE), SlabError::NotObjectStart),
        (at(large, 2 * PAGE_SIZE + 16), SlabError::NotObjectStart),
    ];
    let before = (env.bstats(), stats_of(&s, "kmalloc-32"));
    for (i, (p, err)) in cases.into_iter().enumerate() {
        assert_eq!(kfree(&s, p), Err(err), "case {i}: {p:p}");
        assert_eq!((env.bstats(), stats_of(&s, "kmalloc-32")), before);
        assert_eq!(s.stats().invalid_frees, i as u64 + 1);
    }
    assert_eq!(s.ksize(at(obj, 8)), Err(SlabError::NotObjectStart));
    assert_eq!(s.ksize(page_va), Err(SlabError::NotOwned));

    kfree(&s, obj).unwrap();
    let after = (env.bstats(), stats_of(&s, "kmalloc-32"));
    assert_eq!(kfree(&s, obj), Err(SlabError::DoubleFree));
    assert_eq!((env.bstats(), stats_of(&s, "kmalloc-32")), after);
    kfree(&s, large).unwrap();
    let after = env.bstats();
    assert_eq!(kfree(&s, large), Err(SlabError::DoubleFree), "a large object freed twice");
    assert_eq!(env.bstats(), after, "the refused double free changed nothing");
    // kfree(NULL) does nothing, as in Linux.
    let invalid = s.stats().invalid_frees;
    // SAFETY: NULL: nothing is freed.
    assert_eq!(unsafe { s.kfree(None) }, Ok(()));
    assert_eq!((env.bstats(), s.stats().invalid_frees), (after, invalid));
    // A slab given back to the buddy: its objects are no longer ours.
    kfree(&s, other).unwrap();
    assert_eq!(s.shrink(), 1);
    assert_eq!(kfree(&s, other), Err(SlabError::NotOwned));
    // SAFETY: allocated above, unused.
    unsafe { env.buddy.lock().free(page, 0) }.unwrap();
    env.buddy.lock().check_consistency().unwrap();
}

#[test]
fn named_caches() {
    let env = Env::new(16, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let base = env.bstats().free_pages;
    let areas = s.create_cache("vmap_area", 40, 8).unwrap();
    let nodes = s.create_cache("test_node", 24, 32).unwrap();
    assert_eq!(s.cache_object_size(&areas), Ok(40));
    assert_eq!(s.cache_object_size(&nodes), Ok(32));
    let mut objs = Vec::new();
    for _ in 0..250 {
        let p = s.cache_alloc(&areas).unwrap();
        assert_eq!(p.as_ptr() as usize % 8, 0);
        objs.push(p);
    }
    let n = s.cache_alloc(&nodes).unwrap();
    assert_eq!(n.as_ptr() as usize % 32, 0);
    let st = stats_of(&s, "vmap_area");
    assert_eq!((st.active_objs, st.objperslab, st.pagesperslab), (250, 101, 1));
    assert_eq!(st.num_objs, 303);
    let info = s.slabinfo().to_string();
    let mut lines = info.lines().skip(1);
    assert_eq!(lines.next(), Some("test_node              1    126     32  126    1"));
    assert_eq!(lines.next(), Some("vmap_area            250    303     40  101    1"));
    // SAFETY: `n` is live and not used after; the wrong cache must refuse it.
    assert_eq!(unsafe { s.cache_free(&areas, n) }, Err(SlabError::WrongCache));
    let k = s.kmalloc(40, 8).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { s.cache_free(&areas, k) }, Err(SlabError::WrongCache));
    kfree(&s, k).unwrap();
    assert_eq!(s.destroy_cache(nodes), Err(SlabError::CacheBusy));
    // kfree takes named caches' objects too.
    kfree(&s, n).unwrap();
    for p in objs {
        // SAFETY: live objects of `areas`, not used after.
        unsafe { s.cache_free(&areas, p) }.unwrap();
    }
    s.destroy_cache(areas).unwrap();
    assert!(!s.slabinfo().to_string().contains("vmap_area"));
    s.shrink();
    assert_eq!(env.bstats().free_pages, base);
    // Slots run out.
    let mut ids = Vec::new();
    loop {
        match s.create_cache("filler", 16, 8) {
            Ok(id) => ids.push(id),
            Err(e) => {
                assert_eq!(e, SlabError::TooManyCaches);
                break;
            }
        }
    }
    assert_eq!(ids.len(), MAX_CACHES - NR_KMALLOC - 1); // "test_node" is still there
    assert_eq!(s.create_cache("bad", 0, 8), Err(SlabError::BadLayout));
    for id in ids {
        s.destroy_cache(id).unwrap();
    }
}

#[test]
fn strict_mode_detects_overflow_and_use_after_free() {
    let env = Env::new(16, true);
    let s = SlabAllocator::new(&env.buddy, true).unwrap();
    let a = s.kmalloc(64, 8).unwrap();
    assert_eq!(s.stats().corruptions, 0);
    // Overflow by one byte into the red zone: reported on free, the free still happens.
    fill(a, 65, 0x11);
    kfree(&s, a).unwrap();
    assert_eq!(s.stats().corruptions, 1);
    // Freed objects are poisoned, every byte.
    assert!(holds(a, 64, POISON_FREE_BYTE));
    // Write after free: reported when the object is handed out again (the lowest free one:
    // the same).
    // SAFETY: a deliberate stray write into a free object of the simulated RAM.
    unsafe { a.as_ptr().add(10).write(0) };
    let b = s.kmalloc(64, 8).unwrap();
    assert_eq!(b, a);
    assert_eq!(s.stats().corruptions, 2);
    // A clean cycle reports nothing.
    kfree(&s, b).unwrap();
    let c = s.kmalloc(64, 8).unwrap();
    assert_eq!(s.stats().corruptions, 2);
    // Smash the first bytes of a free object (where a free-list link would be): reported,
    // and nothing is handed out twice.
    let d = s.kmalloc(64, 8).unwrap();
    kfree(&s, d).unwrap();
    // SAFETY: as above.
    unsafe { d.as_ptr().cast::<u32>().write(0xffff_ff00) };
    let mut got = vec![s.kmalloc(64, 8).unwrap()];
    assert_eq!(got[0], d);
    assert!(s.stats().corruptions >= 3);
    for _ in 0..200 {
        got.push(s.kmalloc(64, 8).unwrap());
    }
    got.push(c);
    assert_distinct(&got);
    for p in got {
        kfree(&s, p).unwrap();
    }
    s.shrink();
    env.buddy.lock().check_consistency().unwrap();
}

#[test]
fn a_write_after_free_does_not_reach_the_allocator() {
    // Without strict mode nothing checks a free object's bytes; but the allocator keeps
    // nothing in them (it used to keep a free-list link there, and then counted a
    // corruption and rebuilt the list), so objects scribbled over after their free come
    // back intact as objects: no corruption, nothing handed out twice.
    let env = Env::new(16, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let objs: Vec<_> = (0..300).map(|_| s.kmalloc(64, 8).unwrap()).collect();
    for &p in &objs {
        kfree(&s, p).unwrap();
    }
    for &p in &objs {
        // SAFETY: deliberate stray writes into free objects of the simulated RAM.
        unsafe { p.as_ptr().write_bytes(0x5a, 64) };
    }
    let again: Vec<_> = (0..300).map(|_| s.kmalloc(64, 8).unwrap()).collect();
    assert_distinct(&again);
    assert_eq!(s.stats().corruptions, 0);
    for p in again {
        kfree(&s, p).unwrap();
    }
    s.shrink();
    env.buddy.lock().check_consistency().unwrap();
}

#[test]
fn a_slab_whose_bitmap_was_overwritten_is_retired_not_trusted() {
    // The bitmap says no object is free while the in-use count says 62 are: the scan for a
    // free bit would run past the bitmap into the objects. The slab is retired instead, the
    // corruption counted, and the allocation served from a new slab.
    let env = Env::new(8, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let a = s.kmalloc(64, 8).unwrap();
    let header = a.as_ptr().wrapping_sub(a.as_ptr() as usize & (PAGE_SIZE - 1));
    // SAFETY: a deliberate write over the slab's bitmap word (after the 32-byte header),
    // in the simulated RAM.
    unsafe { header.wrapping_add(32).cast::<u64>().write(0) };
    let b = s.kmalloc(64, 8).unwrap();
    assert_ne!(b.as_ptr() as usize & !(PAGE_SIZE - 1), header as usize, "served from the retired slab");
    assert_eq!(s.stats().corruptions, 1);
    assert_eq!(stats_of(&s, "kmalloc-64").slabs, 2);
    // Nothing reaches the retired slab again: a free of its object is refused.
    assert_eq!(kfree(&s, a), Err(SlabError::NotOwned));
    kfree(&s, b).unwrap();
    for _ in 0..200 {
        let p = s.kmalloc(64, 8).unwrap();
        assert_ne!(p.as_ptr() as usize & !(PAGE_SIZE - 1), header as usize);
    }
}

#[test]
fn empty_slabs_are_kept_once_and_ping_pong_does_not_thrash() {
    let env = Env::new(16, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let base = env.bstats().free_pages;
    let first = s.kmalloc(64, 8).unwrap();
    kfree(&s, first).unwrap();
    let held = env.bstats().free_pages;
    assert_eq!(held, base - 1);
    for _ in 0..if cfg!(miri) { 200 } else { 10_000 } {
        let p = s.kmalloc(64, 8).unwrap();
        kfree(&s, p).unwrap();
        assert_eq!(env.bstats().free_pages, held);
    }
    // Three slabs' worth, all freed: one slab kept.
    let objs: Vec<_> = (0..3 * 63).map(|_| s.kmalloc(64, 8).unwrap()).collect();
    assert_eq!(stats_of(&s, "kmalloc-64").slabs, 3);
    for p in objs {
        kfree(&s, p).unwrap();
    }
    let st = stats_of(&s, "kmalloc-64");
    assert_eq!((st.slabs, st.active_objs), (1, 0));
    assert_eq!(env.bstats().free_pages, base - 1);
    assert_eq!(s.shrink(), 1);
    assert_eq!(s.shrink(), 0);
    assert_eq!(env.bstats().free_pages, base);
}

#[test]
fn threads_share_the_allocator() {
    let env = Env::new(64, false);
    let s = SlabAllocator::new(&env.buddy, false).unwrap();
    let base = env.bstats().free_pages;
    // Objects travel between threads through a shared pool: frees happen on the other
    // thread half of the time.
    // Pointers, not addresses: an object rebuilt from a `usize` would need an
    // integer-to-pointer cast, which Miri's strict provenance refuses.
    struct Obj(NonNull<u8>);
    // SAFETY: an object is owned by whoever holds its `Obj`, and the slab allocator may
    // free an object on any thread (it is `Sync`).
    unsafe impl Send for Obj {}
    let pool: std::sync::Mutex<Vec<Obj>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let (s, pool) = (&s, &pool);
            sc.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                for _ in 0..if cfg!(miri) { 300 } else { 50_000 } {
                    if rng.random_range(0..2) == 0 {
                        let (size, align) = random_layout(&mut rng);
                        let size = size.min(5000);
                        let p = s.kmalloc(size, align).unwrap();
                        fill(p, 8.min(size), 0x77);
                        pool.lock().unwrap().push(Obj(p));
                    } else {
                        let p = {
                            let mut v = pool.lock().unwrap();
                            if v.is_empty() {
                                continue;
                            }
                            let i = rng.random_range(0..v.len());
                            v.swap_remove(i)
                        };
                        kfree(s, p.0).unwrap();
                    }
                }
            });
        }
    });
    for p in pool.into_inner().unwrap() {
        kfree(&s, p.0).unwrap();
    }
    s.shrink();
    assert_eq!(env.bstats().free_pages, base);
    assert_eq!(s.stats().invalid_frees, 0);
    env.buddy.lock().check_consistency().unwrap();
}

#[test]
fn misaligned_linear_map_is_refused() {
    let ram = TestRam::new(BASE, (8 * MIB) as usize);
    // A linear map whose offset is 4 KiB off the buffer's 4 MiB alignment.
    let phys = ram.range(0, 7 * MIB);
    let base = ram.linear().ptr::<u8>(ram.range(0x1000, 1).start());
    // SAFETY: the window is inside the test RAM, which outlives the allocator.
    let linear = unsafe { hal::linear::LinearMap::from_ptr(phys, base) };
    // SAFETY: as above.
    let buddy = IrqSpinLock::new(&BUDDY, unsafe { BuddyAllocator::new(&[phys], &[], linear, false) }.unwrap());
    assert_eq!(SlabAllocator::new(&buddy, false).err(), Some(SlabError::MisalignedLinearMap));
}

#[test]
fn global_kernel_allocator() {
    let _g = testram::global_lock();
    let a = KernelAllocator;
    shrink();
    let before = crate::buddy::stats().unwrap().free_pages;
    let layouts = [
        Layout::from_size_align(1, 1).unwrap(),
        Layout::from_size_align(24, 8).unwrap(),
        Layout::from_size_align(100, 64).unwrap(),
        Layout::from_size_align(3000, 8).unwrap(),
        Layout::from_size_align(64, 4096).unwrap(),
        Layout::from_size_align(100_000, 16).unwrap(),
    ];
    let mut ptrs = Vec::new();
    for l in layouts {
        // SAFETY: non-zero sizes.
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        assert_eq!(p as usize % l.align(), 0);
        ptrs.push((p, l));
    }
    // SAFETY: non-zero size.
    let z = unsafe { a.alloc_zeroed(Layout::from_size_align(500, 8).unwrap()) };
    assert!(holds(NonNull::new(z).unwrap(), 500, 0));
    // realloc within the class keeps the pointer, beyond moves and keeps the contents.
    let l = Layout::from_size_align(40, 8).unwrap();
    // SAFETY: non-zero size; reallocations follow GlobalAlloc's rules.
    unsafe {
        let p = a.alloc(l);
        p.write_bytes(0x5c, 40);
        assert_eq!(a.realloc(p, l, 64), p);
        let q = a.realloc(p, Layout::from_size_align(64, 8).unwrap(), 5000);
        assert!(holds(NonNull::new(q).unwrap(), 40, 0x5c));
        a.dealloc(q, Layout::from_size_align(5000, 8).unwrap());
        a.dealloc(z, Layout::from_size_align(500, 8).unwrap());
        for (p, l) in ptrs {
            a.dealloc(p, l);
        }
    }
    let invalid = stats().unwrap().invalid_frees;
    let mut x = 0u8;
    // SAFETY: a pointer the allocator never gave: reported and ignored.
    unsafe { a.dealloc(&mut x, Layout::new::<u8>()) };
    assert_eq!(stats().unwrap().invalid_frees, invalid + 1);
    // Named cache on the global instance.
    let c = KmemCache::new("global_test", 48, 16).unwrap();
    let o = c.alloc().unwrap();
    assert!(slabinfo().unwrap().to_string().contains("global_test"));
    // SAFETY: live object of `c`, not used after.
    unsafe { c.free(o) }.unwrap();
    c.destroy().unwrap();
    // Issue 12: the global `kfree` of a private allocator's object on the global buddy
    // was `Ok` (and corrupted both); the docs promise `NotOwned`.
    let private = SlabAllocator::new(crate::buddy::global().unwrap(), false).unwrap();
    let (small, large) = (private.kmalloc(64, 8).unwrap(), private.kmalloc(20_000, 8).unwrap());
    // SAFETY: refused without touching the objects.
    assert_eq!(unsafe { super::kfree(small) }, Err(SlabError::NotOwned));
    // SAFETY: as above.
    assert_eq!(unsafe { super::kfree(large) }, Err(SlabError::NotOwned));
    assert_eq!(self::ksize(small), Err(SlabError::NotOwned));
    let private_id = private.create_cache("private_cache", 32, 8).unwrap();
    assert_eq!(global().unwrap().cache_alloc(&private_id), Err(SlabError::WrongAllocator));
    private.destroy_cache(private_id).unwrap();
    // SAFETY: the private allocator's own objects, not used after.
    unsafe {
        private.kfree(small).unwrap();
        private.kfree(large).unwrap()
    };
    private.shrink();
    assert_eq!(init(false), Err(SlabError::AlreadyInitialized));
    shrink();
    assert_eq!(crate::buddy::stats().unwrap().free_pages, before);
}

/// Issue 12: two slab allocators on one buddy share its frame tags. Before the fix, a
/// `kfree` through the wrong one passed every check (`Ok`), edited the owner's slab
/// without its lock and put it on the other's partial list: both then handed out the same
/// slots. Now each slab, large block and cache id carries its allocator's brand.
#[test]
fn objects_of_another_allocator_on_the_same_buddy_are_not_owned() {
    let env = Env::new(8, false);
    let a = SlabAllocator::new(&env.buddy, false).unwrap();
    let b = SlabAllocator::new(&env.buddy, false).unwrap();
    assert_ne!(a.brand(), b.brand());
    let small = a.kmalloc(64, 8).unwrap();
    let large = a.kmalloc(3 * PAGE_SIZE, 8).unwrap();
    assert_eq!(kfree(&b, small), Err(SlabError::NotOwned));
    assert_eq!(kfree(&b, large), Err(SlabError::NotOwned));
    assert_eq!(b.ksize(small), Err(SlabError::NotOwned));
    assert_eq!(b.ksize(large), Err(SlabError::NotOwned));
    assert_eq!(b.stats().invalid_frees, 2);
    assert_eq!(stats_of(&a, "kmalloc-64").active_objs, 1, "the owner's slab is untouched");
    assert_eq!(stats_of(&b, "kmalloc-64").slabs, 0, "nothing landed on b's lists");
    // No slot is handed out twice: b's objects come from b's own slabs.
    let from_b: Vec<_> = (0..64).map(|_| b.kmalloc(64, 8).unwrap()).collect();
    assert!(!from_b.contains(&small));
    for p in from_b {
        kfree(&b, p).unwrap();
    }
    assert_eq!(a.ksize(small), Ok(64));
    kfree(&a, small).unwrap();
    kfree(&a, large).unwrap();
}

#[test]
fn large_blocks_of_allocators_eight_brands_apart_are_told_apart() {
    // Large tags have room for 3 bits of owner. They held the brand modulo 8, so an
    // allocator made eight allocators after another took the other's large blocks for
    // its own: `kfree` through it returned `Ok` and gave them to the buddy.
    let env = Env::new(8, false);
    let a = SlabAllocator::new(&env.buddy, false).unwrap();
    // (Other tests make allocators meanwhile: take new ones until the brands agree.)
    let b = loop {
        let b = SlabAllocator::new(&env.buddy, false).unwrap();
        if b.brand() % 8 == a.brand() % 8 {
            break b;
        }
    };
    let large = a.kmalloc(3 * PAGE_SIZE, 8).unwrap();
    assert_eq!(kfree(&b, large), Err(SlabError::NotOwned));
    assert_eq!(b.ksize(large), Err(SlabError::NotOwned));
    assert_eq!(a.stats().large_allocs, 1);
    kfree(&a, large).unwrap();
    // Eight live allocators share a buddy at most: the ninth is refused, and a dropped
    // one's mark serves again.
    let more: Vec<_> = (0..6).map(|_| SlabAllocator::new(&env.buddy, false).unwrap()).collect();
    assert_eq!(SlabAllocator::new(&env.buddy, false).err(), Some(SlabError::TooManyAllocators));
    drop(more);
    SlabAllocator::new(&env.buddy, false).unwrap();
}

/// Issue 12: a `CacheId` of one allocator used on another reached the other's slot of the
/// same number: a vacant slot handed out allocator metadata as an object, a live one was
/// destroyed. Now the id is refused and nothing is touched.
#[test]
fn a_cache_id_of_another_allocator_or_a_destroyed_cache_is_refused() {
    let env = Env::new(8, false);
    let a = SlabAllocator::new(&env.buddy, false).unwrap();
    let b = SlabAllocator::new(&env.buddy, false).unwrap();
    let ours = b.create_cache("b_objects", 48, 16).unwrap();
    let theirs = a.create_cache("a_objects", 48, 16).unwrap();
    let obj = b.cache_alloc(&ours).unwrap();
    assert_eq!(b.cache_alloc(&theirs), Err(SlabError::WrongAllocator));
    assert_eq!(b.cache_object_size(&theirs), Err(SlabError::WrongAllocator));
    // SAFETY: refused before anything is touched.
    assert_eq!(unsafe { b.cache_free(&theirs, obj) }, Err(SlabError::WrongAllocator));
    assert_eq!(b.destroy_cache(theirs), Err(SlabError::WrongAllocator));
    assert_eq!(stats_of(&b, "b_objects").active_objs, 1, "b's cache is still there");
    // SAFETY: `obj` came from `ours` and is not used after.
    unsafe { b.cache_free(&ours, obj) }.unwrap();
    // An id of a destroyed cache (ids are not `Clone`; a forged copy stands for one that
    // outlived its cache) does not reach the cache made in its slot afterwards.
    let stale = CacheId { slot: ours.slot, generation: ours.generation, brand: ours.brand };
    b.destroy_cache(ours).unwrap();
    assert_eq!(b.cache_alloc(&stale), Err(SlabError::StaleCache));
    let next = b.create_cache("b_next", 64, 8).unwrap();
    assert_eq!(next.slot, stale.slot, "the slot is reused");
    assert_eq!(b.cache_alloc(&stale), Err(SlabError::StaleCache));
    assert_eq!(b.destroy_cache(stale), Err(SlabError::StaleCache));
    assert_eq!(b.cache_object_size(&next), Ok(64));
    b.destroy_cache(next).unwrap();
}

// ----- per-CPU object caches -----

/// Host threads playing four CPUs `kmalloc` and `kfree` through the per-CPU caches of one
/// allocator, a third of the frees on another CPU than the allocation; every object's
/// bytes are checked. After each CPU drained its magazines, no object is in use, slabinfo
/// agrees, and dropping the allocator gives the buddy back every frame.
#[test]
#[cfg_attr(miri, ignore = "minutes under Miri; the per-CPU paths run in the other cpu_caches tests")]
fn cpu_caches_under_thread_stress_end_at_baseline() {
    let env = Env::new(64, false);
    let before = env.bstats();
    let s = SlabAllocator::with_cpu_caches(&env.buddy, false).unwrap();
    assert!(s.has_cpu_caches());
    let ops = if cfg!(miri) { 80 } else { 40_000 };
    let sizes = [8usize, 24, 64, 100, 192, 256, 700, 2048];
    let (tx, rx): (Vec<_>, Vec<_>) = (0..4).map(|_| std::sync::mpsc::channel::<(usize, usize, u8)>()).unzip();
    let rx: Vec<_> = rx.into_iter().map(std::sync::Mutex::new).collect();
    let check = |p: usize, size: usize, v: u8| {
        // SAFETY: a live object of at least `size` bytes that its owner filled with `v`.
        let b = unsafe { core::slice::from_raw_parts(p as *const u8, size) };
        assert!(b.iter().all(|&x| x == v), "object {p:#x} overwritten");
    };
    std::thread::scope(|sc| {
        for cpu in 0..4 {
            let (tx, rx, s) = (tx.clone(), &rx, &s);
            sc.spawn(move || {
                hal::smp::host_play_cpu(cpu);
                let mut held: Vec<(usize, usize, u8)> = Vec::new();
                let mut seed = 0x2545_f491_4f6c_dd1du64 ^ (cpu as u64) << 32;
                for i in 0..ops {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    while let Ok((p, size, v)) = rx[cpu].lock().unwrap().try_recv() {
                        check(p, size, v);
                        // SAFETY: the sender gave the object up.
                        unsafe { s.kfree(NonNull::new(p as *mut u8)) }.unwrap();
                    }
                    if held.len() < 200 && (seed.is_multiple_of(2) || held.is_empty()) {
                        let size = sizes[(seed >> 10) as usize % sizes.len()];
                        let p = s.kmalloc(size, 8).unwrap();
                        let v = i as u8 ^ cpu as u8;
                        // SAFETY: `size` bytes were just allocated at `p`.
                        unsafe { p.as_ptr().write_bytes(v, size) };
                        held.push((p.as_ptr() as usize, size, v));
                    } else {
                        let (p, size, v) = held.swap_remove((seed >> 16) as usize % held.len());
                        if seed.is_multiple_of(3) {
                            tx[(cpu + 1) % 4].send((p, size, v)).unwrap();
                        } else {
                            check(p, size, v);
                            // SAFETY: the object is ours and no longer used.
                            unsafe { s.kfree(NonNull::new(p as *mut u8)) }.unwrap();
                        }
                    }
                }
                for (p, size, v) in held {
                    check(p, size, v);
                    // SAFETY: as above.
                    unsafe { s.kfree(NonNull::new(p as *mut u8)) }.unwrap();
                }
            });
        }
    });
    for r in &rx {
        while let Ok((p, size, v)) = r.lock().unwrap().try_recv() {
            check(p, size, v);
            // SAFETY: the sender gave the object up.
            unsafe { s.kfree(NonNull::new(p as *mut u8)) }.unwrap();
        }
    }
    // Magazines still hold objects: free for users, allocated for their slabs.
    let listed: usize = s.cache_stats().map(|c| c.active_objs).sum();
    assert_eq!(listed, 0, "slabinfo counts objects in magazines as free");
    for cpu in 0..4 {
        std::thread::scope(|sc| {
            sc.spawn(|| {
                hal::smp::host_play_cpu(cpu);
                s.drain_local();
            });
        });
    }
    assert_eq!(s.stats().invalid_frees, 0);
    s.shrink();
    assert_eq!(s.stats().slab_pages, 0, "every slab went back");
    drop(s);
    assert_eq!(env.bstats().free_pages, before.free_pages, "the magazines' block went back too");
}

/// A double free into the local magazine is refused at once; strict mode has no per-CPU
/// caches (every free checked exactly, as SLUB's debug caches).
#[test]
fn cpu_caches_refuse_a_double_free_and_strict_mode_goes_without() {
    let env = Env::new(16, false);
    let s = SlabAllocator::with_cpu_caches(&env.buddy, false).unwrap();
    let p = s.kmalloc(64, 8).unwrap();
    // SAFETY: `p` is live and unused.
    unsafe { s.kfree(p) }.unwrap();
    // SAFETY: testing the refusal: `p` is not touched.
    assert_eq!(unsafe { s.kfree(p) }, Err(SlabError::DoubleFree));
    assert_eq!(s.kmalloc(64, 8).unwrap(), p, "the magazine hands back the last freed object first");
    // Not an object start, not ours: refused on the per-CPU path too.
    // SAFETY: testing the refusals: nothing is freed.
    assert_eq!(unsafe { s.kfree(NonNull::new(p.as_ptr().wrapping_add(8))) }, Err(SlabError::NotObjectStart));
    drop(s);
    let strict_env = Env::new(16, true);
    let strict = SlabAllocator::with_cpu_caches(&strict_env.buddy, true).unwrap();
    assert!(!strict.has_cpu_caches());
}

/// A magazine's flush frees its objects in runs of one slab: a run is checked once for
/// its slab and each object in it on its own, so a double free in the middle of a run, one
/// repeated in a later run of the same slab, and a run of another slab in between are each
/// handled as a lone free would be: the two late double frees are refused (counted, the
/// bitmap unchanged), every other object goes back, and the slabs end empty.
#[test]
fn a_flush_in_slab_runs_refuses_each_late_double_free_alone() {
    let env = Env::new(16, false);
    let before = env.bstats();
    let s = SlabAllocator::with_cpu_caches(&env.buddy, false).unwrap();
    let per_slab = PAGE_SIZE / 64 - 1;
    // Two slabs' worth and one more, so at least two slabs hold objects.
    let objs: Vec<NonNull<u8>> = (0..2 * per_slab + 1).map(|_| s.kmalloc(64, 8).unwrap()).collect();
    let slab_of = |p: NonNull<u8>| p.as_ptr() as usize & !(PAGE_SIZE - 1);
    let (a, b): (Vec<_>, Vec<_>) = objs.iter().partition(|&&p| slab_of(p) == slab_of(objs[0]));
    assert!(a.len() >= 4 && b.len() >= 4, "objects of two slabs");
    // Freed: three of slab A, the first of them again (not the object freed last, so the
    // magazine's own check lets it by), four of slab B, then A's second again.
    let order = [a[0], a[1], a[2], a[0], b[0], b[1], b[2], b[3], a[1]];
    for &p in &order {
        kfree(&s, p).unwrap();
    }
    assert_eq!(s.stats().invalid_frees, 0, "both double frees are still in the magazine");
    s.drain_local();
    assert_eq!(s.stats().invalid_frees, 2, "each late double free is refused once");
    for p in objs.iter().filter(|p| !order.contains(p)) {
        kfree(&s, *p).unwrap();
    }
    s.drain_local();
    assert_eq!(s.stats().invalid_frees, 2);
    let listed: usize = s.cache_stats().map(|c| c.active_objs).sum();
    assert_eq!(listed, 0, "every object went back to its slab exactly once");
    s.shrink();
    assert_eq!(s.stats().slab_pages, 0, "every slab went back");
    drop(s);
    assert_eq!(env.bstats().free_pages, before.free_pages);
}
