//! The scaling table: one-page vmalloc + write + vfree against N live areas on a
//! fragmented layout, for N = 10 .. 100,000 (goal: the last within 1.3x of the first).
//!
//! Layout: N live one-page vmalloc areas, each followed by a hole of exactly one area's
//! range (a page and its guard page): N pairs are allocated in address order, then the
//! second of each pair is freed and purged. The hole makers are `vmap`s of one shared frame
//! (no guard page difference: a vmap has one too), which saves N frames; the live areas are
//! real vmalloc areas. The free tree then holds N holes and the busy tree N areas.
//!
//! Two ways to free, two columns:
//! - lazy (the default): each free parks its range until the purge after ~4096 one-page
//!   frees, so a batch walks up through the holes (exact fits, each range back in the free
//!   tree at the purge). With fewer holes than frees per purge, most of a batch lands in the
//!   free space above the layout instead (clipping one hole, ranges merged at the purge):
//!   the rows below ~4096 live areas and those above measure different work.
//! - strict (`Vmalloc::set_strict`, each free flushed and its range returned at once): every
//!   operation is an exact fit into the lowest hole and a return of it, at every N — the
//!   same work, on trees of N areas and N holes (plus a one-page TLBI per free).

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
fn row(n: usize, strict: bool) -> Option<(u64, u64, u64, usize)> {
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
        // SAFETY: the frames were just allocated to this benchmark and outlive the mapping.
        match unsafe { kernel::vmap(&[frame], Prot::ReadWrite, VmFlags::NONE) } {
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
    let vm = kernel::vmalloc_instance()?;
    if strict {
        vm.lock().set_strict(true);
        c.model.set_strict(true);
    }
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
    if strict {
        vm.lock().set_strict(false);
        c.model.set_strict(false);
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
    println!("  ns per operation, median of {BATCHES} batches of {BATCH} after one untimed batch (min-max)");
    println!("  {:>8} {:>8}   {:>29}   {:>29}", "live", "holes", "lazy (default)", "strict (hole reused)");
    let mut first = [None; 2];
    let mut last = [0u64; 2];
    let mut ok = true;
    for n in SIZES {
        let mut cols = [alloc::string::String::new(), alloc::string::String::new()];
        let mut holes = 0;
        for (k, strict) in [false, true].into_iter().enumerate() {
            match row(n, strict) {
                Some((med, min, max, h)) => {
                    holes = h;
                    let base = *first[k].get_or_insert(med);
                    let r = med as f64 / base.max(1) as f64;
                    cols[k] = alloc::format!("{med:>6} ({min}-{max}) {r:>5.2}x");
                    last[k] = med;
                }
                None => {
                    cols[k] = alloc::string::String::from("FAILED");
                    ok = false;
                }
            }
        }
        println!("  {n:>8} {holes:>8}   {:>29}   {:>29}", cols[0], cols[1]);
    }
    for (k, name) in ["lazy", "strict"].into_iter().enumerate() {
        if let Some(f) = first[k] {
            let r = last[k] as f64 / f.max(1) as f64;
            let verdict = if r <= 1.3 { "goal met" } else { "goal missed" };
            println!("  {name}: last/first = {r:.2} (goal <= 1.30: {verdict})");
        }
    }
    ok
}
