//! Reclaim under pressure: the shrinkers run when a zone crosses `low` while every CPU
//! allocates, the frames they give back show, and allocations go on; with nothing left to
//! reclaim an allocation fails cleanly and one out-of-memory report is printed per window.
//! `./x test` boots this at `-smp 4` (and at `-smp 1`).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use hal::addr::{PhysAddr, PAGE_SIZE};
use hal::dtb::MAX_CPUS;
use hal::smp;
use memory::buddy::{self, BuddyError};
use memory::gfp::ZONE_DMA32;
use memory::{kernel, reclaim, slab};
use tests::test;

fn linear() -> hal::linear::LinearMap {
    hal::kmap::linear_map().expect("MMU is on")
}

/// Frames allocated by this test, chained through their first word (no heap needed).
struct Chain {
    head: u64,
    len: usize,
}

impl Chain {
    const fn new() -> Self {
        Chain { head: 0, len: 0 }
    }

    fn push(&mut self, pa: PhysAddr) {
        // SAFETY: the frame was just allocated to us; its first word holds the chain.
        unsafe { linear().ptr::<u64>(pa).write(self.head) };
        self.head = pa.as_u64();
        self.len += 1;
    }

    fn free_all(&mut self) {
        while self.head != 0 {
            let pa = PhysAddr::new(self.head);
            // SAFETY: written by `push`.
            self.head = unsafe { linear().ptr::<u64>(pa).read() };
            // SAFETY: allocated by this test, no longer used.
            unsafe { buddy::free_pages(pa, 0) }.unwrap();
        }
        self.len = 0;
    }
}

fn settle() -> usize {
    kernel::purge();
    slab::shrink();
    buddy::drain_hot();
    buddy::stats().unwrap().free_pages
}

/// With every shrinker empty, allocating past the end fails with a typed error, the
/// shrinkers having been tried, and exactly one report is printed for many failures in
/// one window; its figures add up.
fn with_nothing_to_reclaim_allocation_fails_cleanly_with_one_report() {
    let free0 = settle();
    let before = reclaim::stats();
    buddy::set_min_free_kbytes(Some(0));
    buddy::set_lowmem_reserve(false);
    let mut chain = Chain::new();
    let err = loop {
        match buddy::alloc_pages(0) {
            Ok(pa) => chain.push(pa),
            Err(e) => break e,
        }
    };
    assert_eq!(err, BuddyError::OutOfMemory);
    for _ in 0..9 {
        assert_eq!(buddy::alloc_pages(0), Err(BuddyError::OutOfMemory), "still nothing");
    }
    let after = reclaim::stats();
    assert_eq!(after.failures - before.failures, 10, "every failure counted");
    assert_eq!(after.reports - before.reports, 1, "one report per window");
    assert!(after.runs > before.runs, "the shrinkers were tried first");
    let r = reclaim::last_oom_report().expect("a report");
    assert_eq!(r.order, 0);
    assert_eq!(r.free_pages, r.zone_free.iter().sum::<usize>() + r.pcp_pages, "the report adds up");
    for z in 0..r.zone_free.len() {
        let listed: usize = r.zone_blocks[z].iter().enumerate().map(|(o, n)| n << o).sum();
        assert_eq!(listed, r.zone_free[z], "zone {z}: its free blocks add up to its free count");
    }
    assert!(r.free_pages + chain.len <= r.total_pages, "free and taken fit in what is managed");
    assert!(r.free_pages < 64, "memory really was exhausted ({} free)", r.free_pages);
    hal::print!("({} frames taken; report: {r}) ", chain.len);
    chain.free_all();
    buddy::set_min_free_kbytes(None);
    buddy::set_lowmem_reserve(true);
    assert_eq!(settle(), free0, "every frame back");
    assert_eq!(hal::sync::take_reports(), 0, "lock checks silent");
}

static STOP: AtomicBool = AtomicBool::new(false);
static BACKGROUND: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static CHAIN: spin::Mutex<Chain> = spin::Mutex::new(Chain::new());

fn pressure_body(cpu: usize) {
    if cpu != 0 {
        // The others allocate and free meanwhile (their page lists fill and empty).
        while !STOP.load(Ordering::Acquire) {
            let mut got = [PhysAddr::new(0); 16];
            let n = buddy::alloc_pages_bulk(&mut got);
            // SAFETY: allocated just above, unused.
            unsafe { buddy::free_pages_bulk(&got[..n]) }.unwrap();
            if let Ok(p) = slab::kmalloc(256, 8) {
                // SAFETY: as above.
                unsafe { slab::kfree(p) }.unwrap();
            }
            BACKGROUND[cpu].fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    // CPU 0 takes frames until DMA32 crosses `low`, then a little more.
    let low = buddy::stats().unwrap().zones[ZONE_DMA32].low;
    let mut chain = CHAIN.lock();
    let runs0 = reclaim::stats().runs;
    loop {
        let pa = buddy::alloc_pages(0).expect("frames above min");
        chain.push(pa);
        let s = buddy::stats().unwrap();
        let z = &s.zones[ZONE_DMA32];
        if z.free_pages - z.hot_pages < low && reclaim::stats().runs > runs0 {
            break;
        }
        assert!(chain.len < s.total_pages, "reclaim never ran");
    }
    // Allocations go on after reclaim.
    for _ in 0..64 {
        chain.push(buddy::alloc_pages(0).expect("allocations go on after reclaim"));
    }
    STOP.store(true, Ordering::Release);
}

/// Every shrinker has something (per-CPU lists on every CPU, objects in magazines and an
/// empty slab, quarantined frames); CPU 0 takes frames until DMA32 crosses `low` while
/// the others allocate: reclaim runs, each shrinker is called and gives frames back, and
/// the allocations that follow succeed.
fn a_zone_below_low_runs_every_shrinker() {
    let free0 = settle();
    let before = reclaim::stats();
    // Something for each shrinker: objects in magazines, kept empty slabs...
    let mut objs = [None; 200];
    for o in &mut objs {
        *o = Some(slab::kmalloc(512, 8).unwrap());
    }
    for o in objs {
        // SAFETY: allocated just above, unused.
        unsafe { slab::kfree(o) }.unwrap();
    }
    // ...quarantined frames (the suites run with vmalloc.quarantine=1)...
    let v = kernel::vmalloc(64 * PAGE_SIZE).unwrap();
    kernel::vfree(v).unwrap();
    assert!(kernel::vmalloc_stats().unwrap().quarantined_frames >= 64, "vfree quarantined its frames");
    // ...and frames on this CPU's page list.
    let p = buddy::alloc_pages(0).unwrap();
    // SAFETY: allocated just above, unused.
    unsafe { buddy::free_pages(p, 0) }.unwrap();
    STOP.store(false, Ordering::Release);
    tests::on_every_cpu(pressure_body);
    let after = reclaim::stats();
    assert!(after.runs > before.runs);
    for (a, b) in after.shrinkers[..after.nr_shrinkers].iter().zip(&before.shrinkers) {
        assert!(a.calls > b.calls, "shrinker {} was called", a.name);
        assert!(a.reclaimed > b.reclaimed, "shrinker {} gave frames back", a.name);
    }
    hal::print!("\n{after}  ");
    CHAIN.lock().free_all();
    assert_eq!(settle(), free0, "every frame back");
    for (n, b) in BACKGROUND.iter().enumerate().take(smp::online_cpus()).skip(1) {
        assert!(b.load(Ordering::Relaxed) > 0, "CPU {n} allocated meanwhile");
    }
    assert_eq!(hal::sync::take_reports(), 0, "lock checks silent");
}

tests::main!(
    test!(with_nothing_to_reclaim_allocation_fails_cleanly_with_one_report),
    test!(a_zone_below_low_runs_every_shrinker),
);
