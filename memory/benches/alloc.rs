//! Host benchmark: our buddy allocator against `buddy_system_allocator::FrameAllocator`,
//! our kmalloc against `talc`, plain `Instant`; prints a table. The buddy rows are medians of 5
//! runs of each side; the kmalloc rows run ours and talc in turn 11 times (host drift falls
//! on both alike) and give the median of the run-by-run ratios as the speedup.
//!
//! Run with `cargo bench -p memory --bench alloc`; `-- buddy` or `-- kmalloc` runs one
//! group, `-- nohot` turns the buddy's order-0 hot list off (to measure what it buys).

use std::alloc::{alloc_zeroed, Layout};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use buddy_system_allocator::FrameAllocator;
use hal::addr::{PhysAddr, PhysRange, PAGE_SHIFT};
use hal::linear::LinearMap;
use memory::buddy::{BuddyAllocator, MAX_ORDER};
use memory::slab::SlabAllocator;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use talc::base::Talc;
use talc::source::Manual;
use talc::DefaultBinning;

const RUNS: usize = 5;
const RAM_BASE: u64 = 0x4000_0000;
const RAM_BYTES: usize = 256 << 20;
const FRAMES: usize = RAM_BYTES >> PAGE_SHIFT;

/// Simulated RAM, 4 MiB aligned, leaked (the benchmark process is short-lived).
fn ram() -> LinearMap {
    let layout = Layout::from_size_align(RAM_BYTES, 4 << 20).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null());
    let phys = PhysRange::new(PhysAddr::new(RAM_BASE), RAM_BYTES as u64).unwrap();
    // SAFETY: the buffer is leaked and only reached through this map.
    unsafe { LinearMap::from_ptr(phys, p) }
}

/// `-- nohot`: the buddy allocators are built with their hot list off.
static NO_HOT: AtomicBool = AtomicBool::new(false);

fn ours(linear: LinearMap) -> BuddyAllocator {
    // SAFETY: every run builds a fresh allocator over the same buffer, after the previous
    // one (and everything it handed out) is gone.
    let mut a = unsafe { BuddyAllocator::new(&[linear.phys_range()], &[], linear, false) }.unwrap();
    if NO_HOT.load(Ordering::Relaxed) {
        a.set_hot_limits(0, 1);
    }
    a
}

fn theirs() -> FrameAllocator<{ MAX_ORDER + 1 }> {
    let mut f = FrameAllocator::<{ MAX_ORDER + 1 }>::new();
    let first = (RAM_BASE >> PAGE_SHIFT) as usize;
    f.add_frame(first, first + FRAMES);
    f
}

fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..RUNS).map(|_| f()).collect();
    v.sort();
    v[RUNS / 2]
}

#[derive(Clone, Copy)]
enum Op {
    Alloc { order: u8, slot: u32 },
    Free { slot: u32 },
}

/// A random sequence of mixed-order allocations and frees that keeps at most half of RAM
/// in use, so neither allocator runs dry.
fn buddy_ops(n: usize) -> (Vec<Op>, usize) {
    let mut rng = SmallRng::seed_from_u64(42);
    let mut ops = Vec::with_capacity(n);
    let mut live: Vec<(u32, u8)> = Vec::new();
    let mut used = 0usize;
    let mut slots = 0u32;
    while ops.len() < n {
        let order = ((rng.random::<u32>() | 1 << MAX_ORDER).trailing_zeros()) as u8;
        if !live.is_empty() && (rng.random_range(0..2) == 0 || used + (1 << order) > FRAMES / 2) {
            let (slot, o) = live.swap_remove(rng.random_range(0..live.len()));
            used -= 1 << o;
            ops.push(Op::Free { slot });
        } else {
            live.push((slots, order));
            used += 1 << order;
            ops.push(Op::Alloc { order, slot: slots });
            slots += 1;
        }
    }
    (ops, slots as usize)
}

struct Row {
    name: &'static str,
    ops: usize,
    ours: Duration,
    other_name: &'static str,
    other: Duration,
    /// The median of run-by-run ratios (other / ours) where the two ran interleaved;
    /// else the ratio of the medians.
    pair_ratio: Option<f64>,
}

/// Runs `ours` and each of `others` in turn, `RUNS_PAIRED` times (A B C A B C …, so host
/// drift falls on all alike): the median time of each and, per other, the median of the
/// run-by-run ratios other / ours.
fn interleaved(
    ours: &mut dyn FnMut() -> Duration,
    others: &mut [&mut dyn FnMut() -> Duration],
) -> (Duration, Vec<(Duration, f64)>) {
    let mut mine = Vec::with_capacity(RUNS_PAIRED);
    let mut theirs: Vec<Vec<Duration>> = vec![Vec::with_capacity(RUNS_PAIRED); others.len()];
    for _ in 0..RUNS_PAIRED {
        mine.push(ours());
        for (o, t) in others.iter_mut().zip(theirs.iter_mut()) {
            t.push(o());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let results = theirs
        .iter()
        .map(|t| {
            let mut r: Vec<f64> = t.iter().zip(&mine).map(|(o, m)| o.as_secs_f64() / m.as_secs_f64()).collect();
            let mut s = t.clone();
            s.sort();
            (s[s.len() / 2], med(&mut r))
        })
        .collect();
    mine.sort();
    (mine[RUNS_PAIRED / 2], results)
}

/// Runs of each side in an interleaved comparison.
const RUNS_PAIRED: usize = 11;

fn ns(d: Duration, ops: usize) -> f64 {
    d.as_nanos() as f64 / ops as f64
}

fn buddy_rows(linear: LinearMap, rows: &mut Vec<Row>) {
    // (a) the same random sequence on both.
    let (ops, nslots) = buddy_ops(200_000);
    let mut orders = vec![0u8; nslots];
    for op in &ops {
        if let Op::Alloc { order, slot } = *op {
            orders[slot as usize] = order;
        }
    }
    let mine = median(|| {
        let mut a = ours(linear);
        let mut slots = vec![PhysAddr::new(0); nslots];
        let t = Instant::now();
        for op in &ops {
            match *op {
                Op::Alloc { order, slot } => {
                    slots[slot as usize] = a.alloc(order as usize).unwrap_or(PhysAddr::new(0));
                }
                Op::Free { slot } => {
                    let pa = slots[slot as usize];
                    if pa.as_u64() != 0 {
                        // SAFETY: allocated by this sequence, freed once, never touched.
                        unsafe { a.free(pa, orders[slot as usize] as usize) }.unwrap();
                    }
                }
            }
        }
        t.elapsed()
    });
    let other = median(|| {
        let mut f = theirs();
        let mut slots = vec![usize::MAX; nslots];
        let t = Instant::now();
        for op in &ops {
            match *op {
                Op::Alloc { order, slot } => {
                    slots[slot as usize] = f.alloc(1 << order).unwrap_or(usize::MAX);
                }
                Op::Free { slot } => {
                    let s = slots[slot as usize];
                    if s != usize::MAX {
                        f.dealloc(s, 1 << orders[slot as usize]);
                    }
                }
            }
        }
        t.elapsed()
    });
    rows.push(Row {
        name: "buddy: random mixed orders 0..=10",
        ops: ops.len(),
        ours: mine,
        other_name: "buddy_system_allocator",
        other,
        pair_ratio: None,
    });

    // Order 0: alloc N, then free N.
    const N: usize = 10_000;
    const ROUNDS: usize = 20;
    let mine = median(|| {
        let mut a = ours(linear);
        let mut v = vec![PhysAddr::new(0); N];
        let t = Instant::now();
        for _ in 0..ROUNDS {
            for p in v.iter_mut() {
                *p = a.alloc(0).unwrap();
            }
            for &p in &v {
                // SAFETY: allocated just above, freed once.
                unsafe { a.free(p, 0) }.unwrap();
            }
        }
        t.elapsed()
    });
    let other = median(|| {
        let mut f = theirs();
        let mut v = vec![0usize; N];
        let t = Instant::now();
        for _ in 0..ROUNDS {
            for p in v.iter_mut() {
                *p = f.alloc(1).unwrap();
            }
            for &p in &v {
                f.dealloc(p, 1);
            }
        }
        t.elapsed()
    });
    rows.push(Row {
        name: "buddy: order 0, alloc 10k then free 10k",
        ops: 2 * N * ROUNDS,
        ours: mine,
        other_name: "buddy_system_allocator",
        other,
        pair_ratio: None,
    });

    // Order 0 ping-pong.
    const PP: usize = 1_000_000;
    let mine = median(|| {
        let mut a = ours(linear);
        let t = Instant::now();
        for _ in 0..PP {
            let p = black_box(a.alloc(0).unwrap());
            // SAFETY: allocated just above, freed once.
            unsafe { a.free(p, 0) }.unwrap();
        }
        t.elapsed()
    });
    let other = median(|| {
        let mut f = theirs();
        let t = Instant::now();
        for _ in 0..PP {
            let p = black_box(f.alloc(1).unwrap());
            f.dealloc(p, 1);
        }
        t.elapsed()
    });
    rows.push(Row {
        name: "buddy: order 0 ping-pong alloc/free",
        ops: 2 * PP,
        ours: mine,
        other_name: "buddy_system_allocator",
        other,
        pair_ratio: None,
    });

    // Bulk order 0 (ours only has it; compared with single calls of the other).
    let mine = median(|| {
        let mut a = ours(linear);
        let mut v = vec![PhysAddr::new(0); N];
        let t = Instant::now();
        for _ in 0..ROUNDS {
            assert_eq!(a.alloc_bulk(&mut v), N);
            // SAFETY: allocated just above, freed once.
            unsafe { a.free_bulk(&v) }.unwrap();
        }
        t.elapsed()
    });
    rows.push(Row {
        name: "buddy: alloc_bulk 10k + free_bulk 10k",
        ops: 2 * N * ROUNDS,
        ours: mine,
        other_name: "buddy_system_allocator (single)",
        other: rows[1].other,
        pair_ratio: None,
    });

    // vmalloc's hot path: 16 frames (a 64 KiB area) in bulk, given back in bulk.
    const SMALL: usize = 16;
    const SMALL_ROUNDS: usize = 100_000;
    let mine = median(|| {
        let mut a = ours(linear);
        let mut v = [PhysAddr::new(0); SMALL];
        let t = Instant::now();
        for _ in 0..SMALL_ROUNDS {
            assert_eq!(a.alloc_bulk(black_box(&mut v)), SMALL);
            // SAFETY: allocated just above, freed once.
            unsafe { a.free_bulk(black_box(&v)) }.unwrap();
        }
        t.elapsed()
    });
    let other = median(|| {
        let mut f = theirs();
        let mut v = [0usize; SMALL];
        let t = Instant::now();
        for _ in 0..SMALL_ROUNDS {
            for p in v.iter_mut() {
                *p = f.alloc(1).unwrap();
            }
            for &p in black_box(&v) {
                f.dealloc(p, 1);
            }
        }
        t.elapsed()
    });
    rows.push(Row {
        name: "buddy: alloc_bulk 16 + free_bulk 16",
        ops: 2 * SMALL * SMALL_ROUNDS,
        ours: mine,
        other_name: "buddy_system_allocator (single)",
        other,
        pair_ratio: None,
    });
}

type TalcHeap = Talc<Manual, DefaultBinning>;

/// A fresh Talc heap over `arena` (each run starts from a clean heap).
fn talc_heap(arena: *mut u8) -> TalcHeap {
    let mut t = Talc::new(Manual);
    // SAFETY: the arena is leaked memory that only one heap at a time uses.
    unsafe { t.claim(arena, TALC_ARENA) }.unwrap();
    t
}

const TALC_ARENA: usize = 32 << 20;

fn slab_rows(linear: LinearMap, rows: &mut Vec<Row>) {
    const N: usize = 10_000;
    const ROUNDS: usize = 50;
    const PP: usize = 1_000_000;
    let l64 = Layout::from_size_align(64, 8).unwrap();
    let arena = Box::leak(vec![0u8; TALC_ARENA].into_boxed_slice()).as_mut_ptr();
    let buddy = hal::sync::IrqSpinLock::new(&hal::sync::classes::BUDDY, ours(linear));
    // The kernel's configuration: per-CPU object caches in front of the cache locks, this
    // thread playing one CPU (so its per-CPU slot is claimed as on target: no atomic).
    hal::smp::host_play_cpu(1);
    let slab = SlabAllocator::with_cpu_caches(&buddy, false).unwrap();

    let kmalloc_loop = || {
        let mut v = vec![NonNull::<u8>::dangling(); N];
        let t = Instant::now();
        for _ in 0..ROUNDS {
            for p in v.iter_mut() {
                *p = slab.kmalloc(64, 8).unwrap();
            }
            for &p in &v {
                // SAFETY: allocated just above, freed once, never used.
                unsafe { slab.kfree(p) }.unwrap();
            }
        }
        t.elapsed()
    };
    let talc_loop = |locked: bool| {
        let mut heap = spin::Mutex::new(talc_heap(arena));
        let mut v = vec![NonNull::<u8>::dangling(); N];
        let t = Instant::now();
        for _ in 0..ROUNDS {
            for p in v.iter_mut() {
                // SAFETY: non-zero size.
                *p = unsafe {
                    if locked {
                        heap.lock().allocate(l64)
                    } else {
                        heap.get_mut().allocate(l64)
                    }
                }
                .unwrap();
            }
            for &p in &v {
                // SAFETY: allocated just above with this layout, freed once.
                unsafe {
                    if locked {
                        heap.lock().deallocate(p.as_ptr(), l64)
                    } else {
                        heap.get_mut().deallocate(p.as_ptr(), l64)
                    }
                }
            }
        }
        t.elapsed()
    };
    let (mine, theirs) = interleaved(&mut { kmalloc_loop }, &mut [&mut || talc_loop(true), &mut || talc_loop(false)]);
    for ((other, pair_ratio), other_name) in theirs.into_iter().zip(["talc (spin::Mutex)", "talc (&mut, no lock)"]) {
        rows.push(Row {
            name: "kmalloc 64 B: alloc 10k then free 10k",
            ops: 2 * N * ROUNDS,
            ours: mine,
            other_name,
            other,
            pair_ratio: Some(pair_ratio),
        });
    }

    let kmalloc_pp = || {
        let t = Instant::now();
        for _ in 0..PP {
            let p = black_box(slab.kmalloc(64, 8).unwrap());
            // SAFETY: allocated just above, freed once, never used.
            unsafe { slab.kfree(p) }.unwrap();
        }
        t.elapsed()
    };
    let talc_pp = |locked: bool| {
        let mut heap = spin::Mutex::new(talc_heap(arena));
        let t = Instant::now();
        for _ in 0..PP {
            // SAFETY: non-zero size; freed once with the same layout.
            unsafe {
                if locked {
                    let p = black_box(heap.lock().allocate(l64).unwrap());
                    heap.lock().deallocate(p.as_ptr(), l64);
                } else {
                    let p = black_box(heap.get_mut().allocate(l64).unwrap());
                    heap.get_mut().deallocate(p.as_ptr(), l64);
                }
            }
        }
        t.elapsed()
    };
    let (mine, theirs) = interleaved(&mut { kmalloc_pp }, &mut [&mut || talc_pp(true), &mut || talc_pp(false)]);
    for ((other, pair_ratio), other_name) in theirs.into_iter().zip(["talc (spin::Mutex)", "talc (&mut, no lock)"]) {
        rows.push(Row {
            name: "kmalloc 64 B: ping-pong alloc/free",
            ops: 2 * PP,
            ours: mine,
            other_name,
            other,
            pair_ratio: Some(pair_ratio),
        });
    }
    slab.shrink();
}

fn main() {
    // `cargo bench -p memory --bench alloc -- buddy|kmalloc` runs one group.
    let mut filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if let Some(i) = filter.iter().position(|a| a == "nohot") {
        NO_HOT.store(true, Ordering::Relaxed);
        filter.remove(i);
    }
    let want = |g: &str| filter.is_empty() || filter.iter().any(|f| f == g);
    let linear = ram();
    let mut rows = Vec::new();
    if want("buddy") {
        buddy_rows(linear, &mut rows);
    }
    if want("kmalloc") {
        slab_rows(linear, &mut rows);
    }
    if want("lock") {
        let m = spin::Mutex::new(0u64);
        let d = median(|| {
            let t = Instant::now();
            for _ in 0..2_000_000 {
                *black_box(&m).lock() += 1;
            }
            t.elapsed()
        });
        println!("spin lock+unlock: {:.2} ns", ns(d, 2_000_000));
    }
    println!(
        "{:<42} {:>10} {:>12} {:<32} {:>12} {:>8}",
        "benchmark (medians)", "ops", "ours ns/op", "other", "other ns/op", "speedup"
    );
    for r in &rows {
        let (o, t) = (ns(r.ours, r.ops), ns(r.other, r.ops));
        let ratio = r.pair_ratio.unwrap_or(t / o);
        println!("{:<42} {:>10} {:>12.1} {:<32} {:>12.1} {:>7.2}x", r.name, r.ops, o, r.other_name, t, ratio);
    }
}
