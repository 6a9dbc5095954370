//! The physical allocators on target: every free frame allocated (by mixed orders, then in
//! bulk), stamped, verified and given back with buddyinfo back to its state at the start;
//! the kernel heap's slabinfo back to its baseline after 100,000 `Box`/`Vec`/`BTreeMap`
//! objects; misuse of `free_pages`/`kfree` refused with typed errors and no change; strict
//! mode catching writes after free and overflows in private instances; the order-0 hot list.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ptr::NonNull;

use hal::linear::LinearMap;
use hal::{PhysAddr, PhysRange, PAGE_SIZE};
use memory::buddy::{self, BuddyAllocator, BuddyError, BuddyStats, MAX_ORDER, NR_ORDERS};
use memory::slab::{self, KmemCache, SlabAllocator, SlabError, MAX_CACHES};
use tests::test;

/// Words per page.
const WORDS: usize = PAGE_SIZE / 8;
/// Mixed into the first word of every stamped page.
const SALT: u64 = 0x6d65_6d6f_7279_0000;
/// Frames handed to or taken from the bulk calls at a time.
const CHUNK: usize = 256;

fn linear() -> LinearMap {
    hal::kmap::linear_map().expect("MMU is on")
}

fn stats() -> BuddyStats {
    buddy::stats().expect("buddy allocator up")
}

fn ms_since(t0: u64) -> u64 {
    (hal::cpu::uptime_ns() - t0) / 1_000_000
}

/// The buddy state to come back to: the hot list drained, so that buddyinfo shows all free
/// memory fully merged.
fn baseline() -> BuddyStats {
    buddy::drain_hot();
    let s = stats();
    assert_eq!(s.hot_pages, 0);
    let listed: usize = s.free_blocks.iter().enumerate().map(|(o, n)| n << o).sum();
    assert_eq!(listed, s.free_pages, "buddyinfo disagrees with free_pages");
    s
}

/// Back at `start`: same free pages, and (hot list drained) the same buddyinfo.
fn assert_back_to(start: &BuddyStats) {
    let s = stats();
    assert_eq!(s.free_pages, start.free_pages, "free pages");
    assert_eq!(s.free_pages, s.free_blocks.iter().enumerate().map(|(o, n)| n << o).sum::<usize>() + s.hot_pages);
    buddy::drain_hot();
    let s = stats();
    assert_eq!(s.buddyinfo(), start.buddyinfo(), "buddyinfo not back to its state at the start");
    assert_eq!(s.corruptions, start.corruptions);
    buddy::check_consistency().unwrap();
}

/// A chain of allocated blocks threaded through the blocks themselves (no heap: the tests
/// that use it hold every free frame). Every page holds `pa ^ SALT` in its first word and
/// `!pa` in its last; the second word of a block's first page links to the next block
/// (its address with the order in the low bits).
struct Chain {
    /// First block (address | order), or 0.
    head: u64,
    blocks: usize,
    pages: usize,
    linear: LinearMap,
}

impl Chain {
    fn new() -> Self {
        Chain { head: 0, blocks: 0, pages: 0, linear: linear() }
    }

    fn word(&self, pa: u64, i: usize) -> *mut u64 {
        self.linear.ptr::<u64>(PhysAddr::new(pa)).wrapping_add(i)
    }

    /// Stamps a block just allocated and links it in.
    fn push(&mut self, pa: PhysAddr, order: usize) {
        let base = pa.as_u64();
        assert_eq!(base % ((PAGE_SIZE as u64) << order), 0, "block {pa:?} of order {order} misaligned");
        for i in 0..1u64 << order {
            let p = base + i * PAGE_SIZE as u64;
            // SAFETY: the block was just allocated to this test; its pages are RAM reached
            // through the linear map.
            unsafe {
                self.word(p, 0).write_volatile(p ^ SALT);
                self.word(p, WORDS - 1).write_volatile(!p);
            }
        }
        // SAFETY: as above.
        unsafe { self.word(base, 1).write_volatile(self.head) };
        self.head = base | order as u64;
        self.blocks += 1;
        self.pages += 1 << order;
    }

    /// Checks every stamp; returns the pages seen.
    fn verify(&self) -> usize {
        let (mut e, mut blocks, mut pages) = (self.head, 0, 0);
        while e != 0 {
            blocks += 1;
            assert!(blocks <= self.blocks, "chain longer than the blocks linked: a frame was handed out twice");
            let base = e & !(PAGE_SIZE as u64 - 1);
            let order = (e & (PAGE_SIZE as u64 - 1)) as usize;
            for i in 0..1u64 << order {
                let p = base + i * PAGE_SIZE as u64;
                // SAFETY: the block is allocated to this test (linked, not yet freed).
                let (first, last) =
                    unsafe { (self.word(p, 0).read_volatile(), self.word(p, WORDS - 1).read_volatile()) };
                assert_eq!(first, p ^ SALT, "page {p:#x} overwritten (first word)");
                assert_eq!(last, !p, "page {p:#x} overwritten (last word)");
            }
            pages += 1 << order;
            // SAFETY: as above.
            e = unsafe { self.word(base, 1).read_volatile() };
        }
        assert_eq!((blocks, pages), (self.blocks, self.pages));
        pages
    }

    /// Unlinks the first block: (address, order).
    fn pop(&mut self) -> Option<(PhysAddr, usize)> {
        if self.head == 0 {
            return None;
        }
        let base = self.head & !(PAGE_SIZE as u64 - 1);
        let order = (self.head & (PAGE_SIZE as u64 - 1)) as usize;
        // SAFETY: the block is still allocated to this test: read its link before freeing.
        self.head = unsafe { self.word(base, 1).read_volatile() };
        self.blocks -= 1;
        self.pages -= 1 << order;
        Some((PhysAddr::new(base), order))
    }
}

fn every_free_frame_by_mixed_orders() {
    let start = baseline();
    // Every free frame: the min watermark (Linux's reserve) off for the test, as
    // `sysctl vm.min_free_kbytes=0` would.
    buddy::set_min_free_kbytes(Some(0));
    let t0 = hal::cpu::uptime_ns();
    let mut chain = Chain::new();
    // Orders in rotation; once an order fails, nothing of it or above is left (memory only
    // shrinks here), so the ceiling comes down until order 0 fails too.
    const ROTATION: [usize; 8] = [MAX_ORDER, 0, 5, 2, 9, 1, 7, 3];
    let mut ceiling = MAX_ORDER;
    let mut per_order = [0usize; NR_ORDERS];
    let mut i = 0;
    loop {
        let order = ROTATION[i % ROTATION.len()].min(ceiling);
        i += 1;
        match buddy::alloc_pages(order) {
            Ok(pa) => {
                chain.push(pa, order);
                per_order[order] += 1;
            }
            Err(BuddyError::OutOfMemory) if order == 0 => break,
            Err(BuddyError::OutOfMemory) => ceiling = order - 1,
            Err(e) => panic!("alloc_pages({order}): {e}"),
        }
    }
    let s = stats();
    assert_eq!((s.free_pages, s.hot_pages, s.free_blocks), (0, 0, [0; NR_ORDERS]), "everything allocated");
    assert_eq!(chain.pages, start.free_pages, "every free frame was handed out");
    let t1 = hal::cpu::uptime_ns();
    assert_eq!(chain.verify(), start.free_pages);
    let t2 = hal::cpu::uptime_ns();
    let blocks = chain.blocks;
    while let Some((pa, order)) = chain.pop() {
        // SAFETY: allocated above by this test, never used outside the chain.
        unsafe { buddy::free_pages(pa, order) }.unwrap();
    }
    assert_back_to(&start);
    buddy::set_min_free_kbytes(None);
    hal::print!(
        "({} frames in {blocks} blocks, per order {per_order:?}; alloc+stamp {} ms, verify {} ms, free {} ms) ",
        start.free_pages,
        (t1 - t0) / 1_000_000,
        (t2 - t1) / 1_000_000,
        ms_since(t2)
    );
}

fn every_free_frame_in_bulk() {
    let start = baseline();
    // Every free frame: the min watermark (Linux's reserve) off for the test, as
    // `sysctl vm.min_free_kbytes=0` would.
    buddy::set_min_free_kbytes(Some(0));
    let t0 = hal::cpu::uptime_ns();
    let mut chain = Chain::new();
    let mut out = [PhysAddr::default(); CHUNK];
    loop {
        let n = buddy::alloc_pages_bulk(&mut out);
        for &pa in &out[..n] {
            chain.push(pa, 0);
        }
        if n < CHUNK {
            break;
        }
    }
    let s = stats();
    assert_eq!((s.free_pages, s.hot_pages), (0, 0));
    assert_eq!(chain.pages, start.free_pages);
    assert_eq!(s.alloc_failures, start.alloc_failures + 1, "the one short bulk call");
    assert_eq!(buddy::alloc_pages(0), Err(BuddyError::OutOfMemory));
    let t1 = hal::cpu::uptime_ns();
    assert_eq!(chain.verify(), start.free_pages);
    let t2 = hal::cpu::uptime_ns();
    loop {
        let mut n = 0;
        while n < CHUNK {
            let Some((pa, _)) = chain.pop() else { break };
            out[n] = pa;
            n += 1;
        }
        if n == 0 {
            break;
        }
        // SAFETY: allocated above by this test, never used outside the chain.
        unsafe { buddy::free_pages_bulk(&out[..n]) }.unwrap();
    }
    assert_back_to(&start);
    buddy::set_min_free_kbytes(None);
    hal::print!(
        "({} frames; alloc+stamp {} ms, verify {} ms, free {} ms) ",
        start.free_pages,
        (t1 - t0) / 1_000_000,
        (t2 - t1) / 1_000_000,
        ms_since(t2)
    );
}

/// Per-cache (active objects, objects, slabs), in slot order, with the cache count.
type SlabSnapshot = ([(usize, usize, usize); MAX_CACHES], usize, usize, usize);

/// The slab state after a shrink, without touching the heap.
fn slab_snapshot() -> SlabSnapshot {
    slab::shrink();
    let s = slab::global().expect("slab allocator up");
    let mut caches = [(0, 0, 0); MAX_CACHES];
    let mut n = 0;
    for c in s.cache_stats() {
        caches[n] = (c.active_objs, c.num_objs, c.slabs);
        n += 1;
    }
    let st = s.stats();
    (caches, n, st.large_allocs, st.slab_pages)
}

/// A small deterministic generator (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn slabinfo_returns_to_baseline_after_100k_heap_objects() {
    let slab_before = slab_snapshot();
    let buddy_before = baseline();
    let invalid_before = slab::stats().unwrap().invalid_frees;
    let t0 = hal::cpu::uptime_ns();
    let mut rng = Rng(0x5eed_1234_abcd);
    let mut objects = 0usize;

    // 40,000 boxed slices of 1 to 3,000 bytes: every kmalloc class, and whole pages above
    // 2 KiB.
    let mut boxes: Vec<Box<[u8]>> = Vec::new();
    for i in 0..40_000u32 {
        let len = 1 + rng.below(3000) as usize;
        boxes.push(alloc::vec![i as u8; len].into_boxed_slice());
        objects += 1;
    }
    // 30,000 map entries, each value a Vec of 1 to 64 words (plus the tree's nodes).
    let mut map: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for i in 0..30_000u64 {
        let key = rng.next();
        let len = 1 + (i % 64) as usize;
        map.insert(key, (0..len as u32).map(|x| x ^ key as u32).collect());
        objects += 1;
    }
    // 30,000 small boxes of assorted types, and Vecs grown by push (reallocations).
    let mut words: Vec<Box<u64>> = Vec::new();
    let mut pairs: Vec<Box<(u32, [u8; 40])>> = Vec::new();
    let mut grown: Vec<Vec<u16>> = Vec::new();
    for i in 0..10_000u64 {
        words.push(Box::new(i * 3));
        pairs.push(Box::new((i as u32, [i as u8; 40])));
        let mut v = Vec::new();
        for k in 0..(i % 200) as u16 {
            v.push(k ^ i as u16);
        }
        grown.push(v);
        objects += 3;
    }
    let peak = slab::stats().unwrap();
    let t1 = hal::cpu::uptime_ns();

    // Everything still holds its contents.
    for (i, b) in boxes.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8), "box {i} corrupted");
    }
    for (key, v) in &map {
        assert!(v.iter().enumerate().all(|(x, &y)| y == x as u32 ^ *key as u32), "map value {key:#x} corrupted");
    }
    for i in 0..10_000usize {
        assert_eq!(*words[i], i as u64 * 3);
        assert_eq!(pairs[i].0, i as u32);
        assert!(pairs[i].1.iter().all(|&x| x == i as u8));
        assert!(grown[i].iter().enumerate().all(|(k, &x)| x == k as u16 ^ i as u16));
    }

    // Free in a scrambled order: every other box, the map half by half, then the rest.
    let mut i = 0;
    boxes.retain(|_| {
        i += 1;
        i % 2 == 0
    });
    let keys: Vec<u64> = map.keys().copied().step_by(2).collect();
    for k in keys {
        map.remove(&k);
    }
    drop(pairs);
    while !boxes.is_empty() {
        let k = rng.below(boxes.len() as u64) as usize;
        boxes.swap_remove(k);
    }
    drop(boxes);
    drop(grown);
    drop(map);
    drop(words);
    let t2 = hal::cpu::uptime_ns();

    let slab_after = slab_snapshot();
    assert_eq!(slab_after.1, slab_before.1, "cache count");
    for (i, (a, b)) in slab_after.0.iter().zip(&slab_before.0).enumerate() {
        assert_eq!(a, b, "cache slot {i}: (active objects, objects, slabs) not back to baseline");
    }
    assert_eq!(slab_after, slab_before);
    assert_eq!(slab::stats().unwrap().invalid_frees, invalid_before);
    assert_back_to(&buddy_before);
    hal::print!(
        "({objects} objects, peak {} slab pages and {} large blocks; alloc {} ms, free {} ms) ",
        peak.slab_pages,
        peak.large_allocs,
        (t1 - t0) / 1_000_000,
        (t2 - t1) / 1_000_000
    );
}

fn free_pages_misuse_is_refused_and_changes_nothing() {
    let info = hal::boot::boot_info().unwrap();
    let p2 = buddy::alloc_pages(2).unwrap();
    let p0 = buddy::alloc_pages(0).unwrap();
    let ram_end = info.platform.ram.iter().map(|r| r.end()).max().unwrap();
    let meta = buddy::global().unwrap().lock().metadata_range().start();
    // An order-2 block freed as order 3: misaligned, unless it happens to be 8-page aligned.
    let order_3 = match p2.is_aligned(8 * PAGE_SIZE as u64) {
        true => BuddyError::WrongOrder { allocated: 2 },
        false => BuddyError::Misaligned,
    };
    let before = stats();
    let cases = [
        (p2, 1, BuddyError::WrongOrder { allocated: 2 }),
        (p2, 3, order_3),
        (p2.add(PAGE_SIZE as u64), 0, BuddyError::NotAllocated),
        (p2.add(0x10), 0, BuddyError::Misaligned),
        (p2, MAX_ORDER + 1, BuddyError::BadOrder),
        (ram_end, 0, BuddyError::OutOfRange),
        (PhysAddr::new(0), 0, BuddyError::OutOfRange),
        (info.image.text.start(), 0, BuddyError::Reserved),
        (info.platform.dtb.start().page_down(), 0, BuddyError::Reserved),
        (meta, 0, BuddyError::Reserved),
    ];
    for (pa, order, err) in cases {
        // SAFETY: every case is refused before anything is touched (asserted).
        assert_eq!(unsafe { buddy::free_pages(pa, order) }, Err(err), "free_pages({pa:?}, {order})");
        assert_eq!(stats(), before, "a refused free changed the state");
    }
    // SAFETY: allocated above, never used.
    unsafe { buddy::free_pages(p0, 0) }.unwrap();
    let after_one = stats();
    // Double free while the frame sits on the hot list, then once it is on the lists.
    // SAFETY: refused (asserted): the frame is free.
    assert_eq!(unsafe { buddy::free_pages(p0, 0) }, Err(BuddyError::NotAllocated), "double free (hot)");
    // SAFETY: as above.
    assert_eq!(unsafe { buddy::free_pages_bulk(&[p0]) }, Err(BuddyError::NotAllocated));
    assert_eq!(stats(), after_one);
    buddy::drain_hot();
    let drained = stats();
    // SAFETY: as above.
    assert_eq!(unsafe { buddy::free_pages(p0, 0) }, Err(BuddyError::NotAllocated), "double free (lists)");
    assert_eq!(stats(), drained);
    // SAFETY: allocated above, never used.
    unsafe { buddy::free_pages(p2, 2) }.unwrap();
    // SAFETY: refused (asserted).
    assert_eq!(unsafe { buddy::free_pages(p2, 2) }, Err(BuddyError::NotAllocated));
    buddy::check_consistency().unwrap();
}

/// A bulk free with one bad frame frees nothing; one with a frame listed twice frees every
/// frame once and names the copy; both for lists short enough for the one-pass path (up to
/// 64 frames), longer ones, and a per-CPU list too full to take them all at once.
fn bulk_free_misuse_frees_nothing_or_only_the_copy() {
    let info = hal::boot::boot_info().unwrap();
    let free = || stats().free_pages;
    let text = info.image.text.start();
    for n in [2usize, 10, 64, 65, 100, 200] {
        let mut frames = alloc::vec![PhysAddr::new(0); n];
        assert_eq!(buddy::alloc_pages_bulk(&mut frames), n);
        let mid = n / 2;
        for (bad, err) in [(text, BuddyError::Reserved), (frames[0].add(0x10), BuddyError::Misaligned)] {
            let mut list = frames.clone();
            list.insert(mid, bad);
            // Counted after the list's own allocation (the heap may take a frame).
            let before = free();
            // SAFETY: refused before anything is freed (asserted); the frames stay ours.
            assert_eq!(unsafe { buddy::free_pages_bulk(&list) }, Err(err), "{n} frames, bad one at {mid}");
            assert_eq!(free(), before, "{n} frames: a refused bulk free freed something");
        }
        let mut list = frames.clone();
        list.push(frames[mid]);
        list.swap(mid + 1, n);
        let before = free();
        // SAFETY: every frame is ours; the copy is refused (asserted).
        assert_eq!(unsafe { buddy::free_pages_bulk(&list) }, Err(BuddyError::NotAllocated), "{n}: the copy");
        assert_eq!(free(), before + n, "{n} frames: each freed once");
        // SAFETY: refused: all free now.
        assert_eq!(unsafe { buddy::free_pages(frames[0], 0) }, Err(BuddyError::NotAllocated));
    }
    // A list at its high mark, as high as it can be: the pass makes room first.
    buddy::set_pcp_limits(Some(buddy::PcpLimits { high: buddy::PcpLimits::MAX_HIGH, batch: 1 }));
    let mut frames = alloc::vec![PhysAddr::new(0); 1100];
    assert_eq!(buddy::alloc_pages_bulk(&mut frames), 1100);
    let mut list = frames[1036..].to_vec();
    list[40] = text;
    let before = free();
    for &pa in &frames[..1036] {
        // SAFETY: allocated above, never used.
        unsafe { buddy::free_pages(pa, 0) }.unwrap();
    }
    assert_eq!(buddy::pcp::pcp_pages_on(hal::smp::this_cpu()), buddy::PcpLimits::MAX_HIGH, "the list at its high mark");
    // SAFETY: refused (asserted): nothing freed.
    assert_eq!(unsafe { buddy::free_pages_bulk(&list) }, Err(BuddyError::Reserved));
    assert_eq!(free(), before + 1036);
    // SAFETY: allocated above, never used.
    unsafe { buddy::free_pages_bulk(&frames[1036..]) }.unwrap();
    assert_eq!(free(), before + 1100);
    assert!(buddy::pcp::pcp_pages_on(hal::smp::this_cpu()) <= buddy::PcpLimits::MAX_HIGH);
    buddy::set_pcp_limits(None);
    buddy::check_consistency().unwrap();
}

fn kfree_misuse_is_refused_and_changes_nothing() {
    let s = slab::global().unwrap();
    let obj = slab::kmalloc(40, 8).unwrap();
    let large = slab::kmalloc(3 * PAGE_SIZE, 8).unwrap();
    let page = buddy::alloc_pages(0).unwrap();
    let page_va = NonNull::new(linear().ptr::<u8>(page)).unwrap();
    let cache = KmemCache::new("test-48", 48, 8).unwrap();
    let named = cache.alloc().unwrap();
    let mut local = 0u64;
    let stack = NonNull::from(&mut local).cast::<u8>();
    let image = NonNull::new(linear().ptr::<u8>(hal::boot::boot_info().unwrap().image.rodata.start())).unwrap();

    let counters =
        |st: slab::SlabStats| (st.slab_pages, st.large_allocs, st.large_pages, st.alloc_failures, st.corruptions);
    let before = s.stats();
    let caches_before = slab_state();
    let buddy_before = stats();
    let cases = [
        (stack, SlabError::NotOwned),
        (image, SlabError::NotOwned),
        (page_va, SlabError::NotOwned),
        (offset(obj, 8), SlabError::NotObjectStart),
        (offset(large, PAGE_SIZE), SlabError::NotObjectStart),
        (offset(large, 8), SlabError::NotObjectStart),
    ];
    for (p, err) in cases {
        // SAFETY: every case is refused before anything is touched (asserted).
        assert_eq!(unsafe { slab::kfree(p) }, Err(err), "kfree({p:p})");
    }
    // An object of a named cache freed as another cache's, and the other way round.
    // SAFETY: refused (asserted).
    assert_eq!(unsafe { cache.free(obj) }, Err(SlabError::WrongCache));
    let after = s.stats();
    assert_eq!(counters(after), counters(before), "a refused kfree changed the state");
    assert_eq!(after.invalid_frees, before.invalid_frees + cases.len() as u64 + 1);
    assert_eq!(slab_state(), caches_before);
    assert_eq!(stats(), buddy_before);

    // Double frees.
    // SAFETY: allocated above, freed once here.
    unsafe { slab::kfree(obj) }.unwrap();
    // SAFETY: refused (asserted).
    assert_eq!(unsafe { slab::kfree(obj) }, Err(SlabError::DoubleFree));
    // SAFETY: allocated above, freed once here.
    unsafe { slab::kfree(large) }.unwrap();
    let after_free = (s.stats().large_allocs, stats().free_pages);
    // SAFETY: refused (asserted): the pages are back with the buddy allocator.
    assert_eq!(unsafe { slab::kfree(large) }, Err(SlabError::DoubleFree));
    assert_eq!((s.stats().large_allocs, stats().free_pages), after_free);
    // SAFETY: allocated above, freed once here.
    unsafe { cache.free(named) }.unwrap();
    // SAFETY: refused (asserted).
    assert_eq!(unsafe { cache.free(named) }, Err(SlabError::DoubleFree));
    cache.destroy().unwrap();
    // SAFETY: allocated above, never used.
    unsafe { buddy::free_pages(page, 0) }.unwrap();
}

/// `p + bytes`, for pointers the tests only hand to `kfree` (never dereferenced).
fn offset(p: NonNull<u8>, bytes: usize) -> NonNull<u8> {
    NonNull::new(p.as_ptr().wrapping_add(bytes)).unwrap()
}

/// Per-cache (active objects, slabs), with the cache count (no heap).
fn slab_state() -> ([(usize, usize); MAX_CACHES], usize) {
    let mut caches = [(0, 0); MAX_CACHES];
    let mut n = 0;
    for c in slab::global().unwrap().cache_stats() {
        caches[n] = (c.active_objs, c.slabs);
        n += 1;
    }
    (caches, n)
}

/// A private strict buddy allocator over a 4 MiB block of the global one.
fn with_private_strict_buddy(f: impl FnOnce(&hal::sync::IrqSpinLock<BuddyAllocator>)) {
    let block = buddy::alloc_pages(MAX_ORDER).unwrap();
    let region = PhysRange::new(block, (PAGE_SIZE << MAX_ORDER) as u64).unwrap();
    {
        // SAFETY: the block is this test's until it is freed below, after the private
        // allocator and everything it handed out are gone; the linear map covers all RAM for
        // good.
        let a = unsafe { BuddyAllocator::new(&[region], &[], linear(), true) }.unwrap();
        assert!(a.is_strict());
        let m = hal::sync::IrqSpinLock::new(&hal::sync::classes::BUDDY, a);
        f(&m);
        let a = m.lock();
        a.check_consistency().unwrap();
        assert_eq!(a.free_pages(), a.total_pages(), "the private allocator got everything back");
    }
    // SAFETY: allocated above; the private allocator using it is gone, and so is everything
    // it handed out (all its frames are free).
    unsafe { buddy::free_pages(block, MAX_ORDER) }.unwrap();
}

fn strict_buddy_catches_a_write_after_free() {
    with_private_strict_buddy(|m| {
        let mut a = m.lock();
        let total = a.total_pages();
        let pa = a.alloc(0).unwrap();
        let p = linear().ptr::<u8>(pa);
        // SAFETY: the frame is allocated to this test.
        unsafe { p.write_bytes(0x11, PAGE_SIZE) };
        // SAFETY: allocated above; the test's deliberate write after free follows.
        unsafe { a.free(pa, 0) }.unwrap();
        assert_eq!(a.stats().corruptions, 0);
        // SAFETY: a stray write into a free (poisoned) frame of the private allocator's RAM,
        // which this test owns: exactly what strict mode must report.
        unsafe { p.add(0x123).write_volatile(0) };
        assert_eq!(a.alloc(0).unwrap(), pa, "the hot list hands the same frame back");
        assert_eq!(a.stats().corruptions, 1, "write after free not detected");
        // SAFETY: allocated again above, not used.
        unsafe { a.free(pa, 0) }.unwrap();
        // The same after the frame went back to the lists and merged: caught when the
        // memory holding it is handed out.
        a.drain_hot();
        // SAFETY: as above.
        unsafe { p.add(0x800).write_volatile(0x42) };
        let mut all = alloc::vec![PhysAddr::default(); total];
        assert_eq!(a.alloc_bulk(&mut all), total);
        assert_eq!(a.stats().corruptions, 2, "write after free in a merged block not detected");
        // SAFETY: allocated above, not used.
        unsafe { a.free_bulk(&all) }.unwrap();
        drop(all);
        // Clean traffic reports nothing more.
        let mut out = [PhysAddr::default(); 64];
        for _ in 0..4 {
            assert_eq!(a.alloc_bulk(&mut out), 64);
            // SAFETY: allocated just above, never used.
            unsafe { a.free_bulk(&out) }.unwrap();
        }
        assert_eq!(a.stats().corruptions, 2);
        assert_eq!(a.free_pages(), total);
    });
}

fn strict_slab_catches_overflow_and_write_after_free() {
    with_private_strict_buddy(|m| {
        let s = SlabAllocator::new(m, true).unwrap();
        let p = s.kmalloc(64, 8).unwrap();
        assert_eq!(s.ksize(p), Ok(64));
        // SAFETY: 64 bytes are ours; byte 64 is the red zone: a deliberate overflow, into
        // the private allocator's RAM this test owns.
        unsafe { p.as_ptr().add(64).write_volatile(0) };
        // SAFETY: allocated above, freed once.
        unsafe { s.kfree(p) }.unwrap();
        assert_eq!(s.stats().corruptions, 1, "red zone overflow not detected");
        let q = s.kmalloc(64, 8).unwrap();
        // SAFETY: allocated above, freed once; the write after free follows.
        unsafe { s.kfree(q) }.unwrap();
        // SAFETY: a stray write into the freed object (poisoned), in the private allocator's
        // RAM this test owns.
        unsafe { q.as_ptr().add(16).write_volatile(0) };
        let r = s.kmalloc(64, 8).unwrap();
        assert_eq!(r, q, "the freed object comes back first");
        assert_eq!(s.stats().corruptions, 2, "write after free not detected");
        // SAFETY: allocated above, freed once.
        unsafe { s.kfree(r) }.unwrap();
        s.shrink();
        assert_eq!(s.stats().slab_pages, 0);
    });
}

/// Checks where order-0 frames come from, not how fast: with the hot list on, an
/// alloc+free pair is served by the hot list and leaves the buddy lists untouched; with it
/// off, the same pair splits a block off the lists and merges it back. (Its speed is a
/// benchmark's business: `bench=mmu` and the host benches; the time is printed here only as
/// a figure.)
fn hot_list_serves_order_0_ping_pong() {
    const N: u64 = 20_000;
    let ping_pong = || {
        let t = hal::cpu::uptime_ns();
        let mut first = None;
        for _ in 0..N {
            let p = buddy::alloc_pages(0).unwrap();
            assert_eq!(*first.get_or_insert(p), p);
            // SAFETY: allocated just above, never used.
            unsafe { buddy::free_pages(p, 0) }.unwrap();
        }
        (hal::cpu::uptime_ns() - t) / N
    };
    let start = baseline();
    let limits = buddy::pcp_limits();
    assert!(limits.iter().any(|l| l.high > 0), "the per-CPU lists are on by default");

    // Hot: the first free parks the frame on the hot list; from then on the pair is served
    // there, and the lists never change.
    let p = buddy::alloc_pages(0).unwrap();
    // SAFETY: allocated just above, never used.
    unsafe { buddy::free_pages(p, 0) }.unwrap();
    let before = stats();
    assert!(before.hot_pages > 0, "an order-0 free goes to the hot list");
    let q = buddy::alloc_pages(0).unwrap();
    let during = stats();
    assert_eq!(q, p, "the hot list is LIFO: the frame just freed comes back");
    assert_eq!(during.hot_pages, before.hot_pages - 1, "served from the hot list");
    assert_eq!(during.free_blocks, before.free_blocks, "an order-0 allocation touched the buddy lists");
    // SAFETY: allocated just above, never used.
    unsafe { buddy::free_pages(q, 0) }.unwrap();
    let hot_ns = ping_pong();
    let after = stats();
    assert_eq!((after.hot_pages, after.free_blocks), (before.hot_pages, before.free_blocks));

    // Cold: with the hot list off, each pair splits a block off the lists and merges it back.
    buddy::set_pcp_limits(Some(buddy::PcpLimits { high: 0, batch: 1 }));
    buddy::drain_hot();
    let cold = stats();
    assert_eq!(cold.hot_pages, 0, "high watermark 0 drains the hot list");
    let r = buddy::alloc_pages(0).unwrap();
    let split = stats();
    assert_eq!(split.hot_pages, 0);
    assert_ne!(split.free_blocks, cold.free_blocks, "without the hot list the lists serve the frame");
    // SAFETY: allocated just above, never used.
    unsafe { buddy::free_pages(r, 0) }.unwrap();
    assert_eq!(stats().free_blocks, cold.free_blocks, "the free merged back with its buddies");
    let cold_ns = ping_pong();
    assert_eq!(stats().free_blocks, cold.free_blocks);
    buddy::set_pcp_limits(None);
    assert_eq!(buddy::pcp_limits(), limits);
    assert_back_to(&start);
    hal::print!("(figure, not a check: order-0 alloc+free {hot_ns} ns with the hot list, {cold_ns} ns without) ");
}

/// Prints buddyinfo as boot left it (lists only, the hot list apart), then drained.
fn buddyinfo_at_boot_and_drained() {
    let s = stats();
    let listed: usize = s.free_blocks.iter().enumerate().map(|(o, n)| n << o).sum();
    assert_eq!(listed + s.hot_pages, s.free_pages);
    hal::print!("\n  {}  + {} frames on the hot list", s.buddyinfo(), s.hot_pages);
    let moved = buddy::drain_hot();
    let d = stats();
    assert_eq!((moved, d.hot_pages, d.free_pages), (s.hot_pages, 0, s.free_pages));
    hal::print!("\n  {}  (hot list drained)\n  ", d.buddyinfo());
}

/// Linux semantics drivers port cleanup paths against: freeing NULL does nothing, and a
/// second free of a large kmalloc object or of a kvmalloc'd slab object is a double free.
fn null_frees_are_no_ops_and_double_frees_are_named() {
    use memory::kernel;
    use memory::vmalloc::VmallocError;
    let before = kernel::MemSnapshot::settled();
    let invalid = slab::stats().unwrap().invalid_frees;
    assert_eq!(kernel::vfree(hal::VirtAddr::new(0)), Ok(()));
    // SAFETY: NULL: nothing is freed.
    assert_eq!(unsafe { slab::kfree(None) }, Ok(()));
    // SAFETY: as above.
    assert_eq!(unsafe { kernel::kvfree(None) }, Ok(()));
    // SAFETY: as above: the C idiom `kfree(p)` with `p == NULL`.
    assert_eq!(unsafe { slab::kfree(NonNull::new(core::ptr::null_mut())) }, Ok(()));
    assert_eq!(slab::stats().unwrap().invalid_frees, invalid, "a NULL free counted as invalid");
    let small = kernel::kvmalloc(200).unwrap();
    let large = kernel::kvmalloc(1 << 20).unwrap();
    let big = slab::kmalloc(64 << 10, 8).unwrap();
    // SAFETY: each freed once, then refused (asserted) without being touched.
    unsafe {
        kernel::kvfree(small).unwrap();
        assert_eq!(kernel::kvfree(small), Err(VmallocError::DoubleFree));
        kernel::kvfree(large).unwrap();
        assert_eq!(kernel::kvfree(large), Err(VmallocError::DoubleFree));
        slab::kfree(big).unwrap();
        assert_eq!(slab::kfree(big), Err(SlabError::DoubleFree));
        assert_eq!(kernel::kvfree(big), Err(VmallocError::DoubleFree));
    }
    before.check_no_leak().unwrap();
}

/// The snapshot names what a test leaked, and is clean once it is given back.
fn snapshot_names_leaks_in_one_line() {
    use memory::kernel;
    let before = kernel::MemSnapshot::settled();
    let area = kernel::vmalloc(3 * PAGE_SIZE).unwrap();
    let obj = slab::kmalloc(100, 8).unwrap();
    let d = before.check_no_leak().unwrap_err();
    // Two slab objects: the kmalloc one and the area's record (spares are topped up again).
    assert_eq!((d.vmalloc_areas, d.vmalloc_pages, d.slab_objects), (1, 3, 2), "{d}");
    assert!(d.frames <= -3, "{d}");
    let text = alloc::format!("{d}");
    assert!(text.contains("vmalloc_areas +1") && text.contains("slab_objects +2"), "{text}");
    drop(text); // a live String is a slab object too: the check would name it
    kernel::vfree(area).unwrap();
    // Parked, then purged by the settling inside the check: no leak.
    // SAFETY: allocated above, freed once.
    unsafe { slab::kfree(obj) }.unwrap();
    before.check_no_leak().unwrap();
    let s = kernel::snapshot();
    assert_eq!((s.parked_areas, s.quarantined_frames), (0, 0), "{s:?}");
}

tests::main!(
    test!(null_frees_are_no_ops_and_double_frees_are_named),
    test!(snapshot_names_leaks_in_one_line),
    test!(buddyinfo_at_boot_and_drained),
    test!(every_free_frame_by_mixed_orders),
    test!(every_free_frame_in_bulk),
    test!(slabinfo_returns_to_baseline_after_100k_heap_objects),
    test!(free_pages_misuse_is_refused_and_changes_nothing),
    test!(bulk_free_misuse_frees_nothing_or_only_the_copy),
    test!(kfree_misuse_is_refused_and_changes_nothing),
    test!(strict_buddy_catches_a_write_after_free),
    test!(strict_slab_catches_overflow_and_write_after_free),
    test!(hot_list_serves_order_0_ping_pong),
);
