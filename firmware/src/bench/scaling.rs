//! The scaling table: one-page vmalloc + write + vfree against N live areas on a
//! fragmented layout, for N = 10 .. 100,000 (goal: the last within 1.3x of the first).
//!
//! Layout: N live one-page vmalloc areas, each followed by a hole of exactly one area's
//! range (a page and its guard page): N pairs are allocated in address order, then the
//! second of each pair is freed and purged. The hole makers are `vmap`s of one shared frame
//! (no guard page difference: a vmap has one too), which saves N frames; the live areas are
//! real vmalloc areas. Each measured operation takes the lowest hole, so the free tree holds
//! about N holes and the busy tree N areas while it runs.

use hal::println;
use hal::{PhysAddr, PAGE_SIZE};
use memory::kernel;
use memory::vmalloc::{Prot, VmFlags};

use super::cases::{Area, Ctx, Rng};
use super::check::{Baseline, Measured};

/// Live areas per row.
pub const SIZES: [usize; 5] = [10, 100, 1_000, 10_000, 100_000];
/// Operations per timed batch (four lazy purges' worth of one-page frees).
const BATCH: u32 = 16_384;
/// Timed batches per row (the median is reported), after one untimed batch.
const BATCHES: usize = 5;

fn ns_per_op(ticks: u64) -> u64 {
    hal::cpu::ticks_to_ns(ticks) / u64::from(BATCH)
}

/// One row: builds the layout, times the batches, tears it down and checks the baseline.
/// Returns (median, min, max) ns per alloc+free, or `None` on a failure.
fn row(n: usize) -> Option<(u64, u64, u64, usize)> {
    let mut c = Ctx::new(0, 1, 0, Rng::new(0));
    c.purge();
    let before = Baseline::take();
    let s0 = kernel::vmalloc_stats().unwrap_or_default();
    let frame: PhysAddr = memory::buddy::alloc_pages(0).ok()?;
    let (la, live) = c.ptr_array(n)?;
    let (ja, junk) = c.ptr_array(n)?;
    let mut ok = true;
    for i in 0..n {
        let a = c.vmalloc(PAGE_SIZE);
        live.set(i, a.map(|a| a.va));
        match kernel::vmap(&[frame], Prot::ReadWrite, VmFlags::NONE) {
            Ok(va) => {
                c.model.mapped(1, 0);
                junk.set(i, Some(va));
            }
            Err(_) => {
                c.model.failures += 1;
                junk.set(i, None);
                ok = false;
            }
        }
    }
    for i in 0..n {
        if let Some(va) = junk.get(i) {
            ok &= kernel::vunmap(va).is_ok();
            c.model.freed(2, 1, 0);
        }
    }
    c.purge();
    let holes = kernel::vmalloc_stats().map_or(0, |s| s.free_holes);
    let mut times = [0u64; BATCHES];
    for b in 0..=BATCHES {
        let t0 = hal::cpu::counter();
        for _ in 0..BATCH {
            let Some(a) = c.vmalloc(PAGE_SIZE) else {
                ok = false;
                break;
            };
            // SAFETY: a one-page area just allocated and owned here.
            unsafe { a.va.as_mut_ptr::<u8>().write_volatile(1) };
            ok &= c.vfree(a).is_ok();
        }
        let dt = hal::cpu::counter() - t0;
        if b > 0 {
            times[b - 1] = ns_per_op(dt);
        }
    }
    for i in 0..n {
        if let Some(va) = live.get(i) {
            ok &= c.vfree(Area { va, pages: 1, range: 2 }).is_ok();
        }
    }
    ok &= c.vfree(la).is_ok();
    ok &= c.vfree(ja).is_ok();
    // SAFETY: the frame came from alloc_pages above; every vmap of it is unmapped, and the
    // purge below flushes those pages before the frame can be reused.
    ok &= unsafe { memory::buddy::free_pages(frame, 0) }.is_ok();
    c.purge();
    let after = Baseline::take();
    let s1 = kernel::vmalloc_stats().unwrap_or_default();
    let name = "scaling";
    ok &= after.matches(&before, name);
    let m = Measured::delta(&s0, &s1);
    if !m.agrees(&c.model) {
        println!("  {name} N={n}: CHECK FAILED: counters {m:?}, workload implies {:?}", c.model);
        ok = false;
    }
    times.sort_unstable();
    ok.then_some((times[BATCHES / 2], times[0], times[BATCHES - 1], holes))
}

/// Prints the scaling table; returns whether every row ran and checked out.
pub fn run() -> bool {
    println!("\ntest_vmalloc scaling: 1-page vmalloc + write + vfree with N live areas, each followed by a hole");
    println!("  (median of {BATCHES} batches of {BATCH}, after one untimed batch)");
    println!("  {:>8} {:>8} {:>10} {:>10} {:>10} {:>9}", "live", "holes", "ns/op", "min", "max", "vs first");
    let mut first = None;
    let mut last = 0;
    let mut ok = true;
    for n in SIZES {
        match row(n) {
            Some((med, min, max, holes)) => {
                let base = *first.get_or_insert(med);
                let r = med as f64 / base.max(1) as f64;
                println!("  {n:>8} {holes:>8} {med:>10} {min:>10} {max:>10} {r:>8.2}x");
                last = med;
            }
            None => {
                println!("  {n:>8} FAILED");
                ok = false;
            }
        }
    }
    if let Some(f) = first {
        let r = last as f64 / f.max(1) as f64;
        let verdict = if r <= 1.3 { "goal met" } else { "goal missed" };
        println!("  last/first = {r:.2} (goal <= 1.30: {verdict})");
    }
    ok
}
