//! `test_vmalloc.sample=1`: a sampling profiler for the cases. While a case runs, CPU 0's
//! virtual timer interrupts it every [`PERIOD_US`] µs and the handler records where it was
//! ([`hal::irq::interrupted_pc`]); after the case the most frequent addresses are printed,
//! one `sample:` line each, for `tools/symbolize-samples` to name by function on the host
//! (the image carries no symbol table).
//!
//! Under QEMU TCG this is how we found that code layout matters: a direct branch to another
//! 4 KiB guest page is never chained by QEMU, so a hot loop that straddles a page boundary
//! pays a translation-block lookup each time round (see `link.ld`'s `.text.hot`).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hal::println;

/// Sampling period (emulated time, which follows the host clock).
const PERIOD_US: u64 = 50;
/// Samples kept per case (the rest are counted only).
const RING: usize = 1 << 16;
/// Addresses printed per case.
const TOP: usize = 400;

static SAMPLES: [AtomicU64; RING] = [const { AtomicU64::new(0) }; RING];
static TAKEN: AtomicUsize = AtomicUsize::new(0);
/// Timer ticks between samples; 0: stopped.
static PERIOD: AtomicU64 = AtomicU64::new(0);
static REGISTERED: AtomicBool = AtomicBool::new(false);

fn tick(_intid: u32) {
    if !hal::timer::fired() {
        return;
    }
    let pc = hal::irq::interrupted_pc();
    let n = TAKEN.fetch_add(1, Ordering::Relaxed);
    if let Some(slot) = SAMPLES.get(n) {
        slot.store(pc, Ordering::Relaxed);
    }
    match PERIOD.load(Ordering::Relaxed) {
        0 => hal::timer::stop(),
        // From now, not from the deadline: a late tick does not start a storm.
        p => hal::timer::arm_at(hal::timer::now() + p),
    }
}

/// Starts sampling this CPU (the one running the case); false when there is no timer
/// interrupt to sample with.
pub fn start() -> bool {
    let (Some(c), Some(intid)) = (hal::irq::controller(), hal::boot::boot_info().and_then(|i| i.platform.timer_intid))
    else {
        return false;
    };
    if !REGISTERED.swap(true, Ordering::AcqRel) && hal::irq::register(intid, tick).is_err() {
        println!("  sample: the timer interrupt has another handler; not sampling");
        return false;
    }
    c.enable(intid);
    TAKEN.store(0, Ordering::Relaxed);
    let p = (hal::timer::frequency() * PERIOD_US / 1_000_000).max(1);
    PERIOD.store(p, Ordering::Relaxed);
    hal::timer::arm_at(hal::timer::now() + p);
    true
}

/// Stops sampling and prints the case's most frequent addresses:
/// `sample: CASE PC COUNT` lines after a `sample: CASE total N` line.
pub fn stop_and_report(case: &str) {
    PERIOD.store(0, Ordering::Relaxed);
    hal::timer::stop();
    let taken = TAKEN.load(Ordering::Relaxed);
    let mut pcs: alloc::vec::Vec<u64> = SAMPLES[..taken.min(RING)].iter().map(|s| s.load(Ordering::Relaxed)).collect();
    pcs.sort_unstable();
    let mut counts: alloc::vec::Vec<(u64, u32)> = alloc::vec::Vec::new();
    for pc in pcs {
        match counts.last_mut() {
            Some((last, n)) if *last == pc => *n += 1,
            _ => counts.push((pc, 1)),
        }
    }
    counts.sort_unstable_by_key(|c| core::cmp::Reverse(c.1));
    println!("sample: {case} total {taken}");
    for (pc, n) in counts.iter().take(TOP) {
        println!("sample: {case} {pc:#x} {n}");
    }
}
