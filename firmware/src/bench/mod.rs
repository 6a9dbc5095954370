//! Linux's `lib/test_vmalloc.c` workloads on our vmalloc, run from the kernel command line
//! exactly as Linux's built-in test module:
//!
//! ```text
//! test_vmalloc.run_test_mask=M test_vmalloc.test_loop_count=L test_vmalloc.nr_pages=P
//! test_vmalloc.test_repeat_count=R      (defaults: all, 1,000,000, 1, 1 — as Linux)
//! test_vmalloc.scaling=1                the scaling table (see `scaling.rs`) after the cases
//! test_vmalloc.profile=1                time each layer of a vmalloc + vfree first (`profile.rs`)
//! test_vmalloc.sample=1                 sample where each case spends its time (`sample.rs`)
//! test_vmalloc.nr_pcpu_objects=N        pcpu_alloc_test's object count (35,000)
//! seed=S (or test_vmalloc.seed=S)       the generator of the random cases
//! ```
//!
//! Cases by mask bit, as Linux's: 1 fix_size, 2 full_fit, 4 long_busy_list, 8 random_size,
//! 16 fix_align, 32 random_size_align, 64 align_shift (expected to fail: xfailed), 128
//! pcpu_alloc_test (kmalloc stands in for the per-cpu allocator we do not have), 256/512
//! kvfree_rcu_* (skipped: no RCU), 1024 vm_map_ram, 2048 no_block_alloc (Linux 6.17: xfail
//! there; our vmalloc never sleeps), 4096 vrealloc (Linux 6.15). Cases run in bit order
//! (Linux's `sequential_test_order=1`).
//!
//! `test_vmalloc.nr_threads=N` runs N workers at once, one per CPU (CPU 0 first), on the
//! global kernel instances, each running the selected cases as Linux's module does and
//! printing its own `Summary:` lines and `All test took worker%d=%llu cycles`. With more
//! than one worker the per-case counter checks (which read global counters) give way to one
//! check at the end: after a purge, buddy, slab, page tables and vmallocinfo are back at the
//! baseline taken before the workers started. Linux's stress preset is
//! `test_vmalloc.nr_threads=<ncpus> test_vmalloc.test_repeat_count=20 test_vmalloc.run_test_mask=127`.
//!
//! Each case prints Linux's line `Summary: NAME passed: N failed: N xfailed: N repeat: R
//! loops: L avg: U usec` (µs for one whole case, setup included, averaged over repeats),
//! then what it did: frames taken and returned, PTEs written, TLB operations and purges —
//! checked against what the workload implies ([`check::Model`]) — and the pages whose
//! translation was verified (every page of every [`cases::SAMPLE_EVERY`]th iteration).
//! Before and after each repeat everything parked is purged and buddy, slab, page tables and
//! vmallocinfo are compared ([`check::Baseline`]); any difference fails the repeat. Between
//! repeats the purge keeps the empty page tables the case met, as the lazy threshold's
//! purge would (Linux's module never purges there, and its kernel tables only grow), so a
//! repeat does not build its tables anew; the frames still add up exactly, and after the
//! last repeat an explicit purge gives those tables back and the page-table count must be
//! back at the case's first baseline. At the
//! end a table compares the times with Linux's (`../shared/bench/linux-test_vmalloc.md`).
//! The run exits 0 when no case failed.

mod cases;
mod check;
mod profile;
mod sample;
mod scaling;

use hal::boot::BootInfo;
use hal::println;
use memory::kernel;

use cases::{Ctx, Outcome, Rng};
use check::{Baseline, Measured, Model};

/// Whether the command line asks for the bench instead of the boot report.
pub fn requested(info: &BootInfo) -> bool {
    info.cmdline().params().flatten().any(|p| p.key.starts_with("test_vmalloc."))
}

/// The parameters, with Linux's defaults.
#[derive(Clone, Copy, Debug)]
struct Params {
    mask: u64,
    loops: u32,
    nr_pages: usize,
    repeat: u32,
    nr_pcpu: usize,
    seed: u64,
    scaling: bool,
    profile: bool,
    sample: bool,
    nr_threads: usize,
    /// `test_vmalloc.ab_pools=1`: each case's repeats alternate pools off and on
    /// (off, on, on, off, ...) in this one boot, and the ratio on/off is printed.
    ab_pools: bool,
}

const DEFAULT_SEED: u64 = 0x7e57_5eed;

/// The `test_vmalloc.*` parameters we read (others are warned about).
const KNOWN: &[&str] = &[
    "run_test_mask",
    "test_loop_count",
    "nr_pages",
    "test_repeat_count",
    "nr_threads",
    "sequential_test_order",
    "use_huge",
    "nr_pcpu_objects",
    "scaling",
    "profile",
    "sample",
    "seed",
    "ab_pools",
];

impl Params {
    fn from_cmdline(info: &BootInfo) -> Self {
        let cmd = info.cmdline();
        let num = |key: &str, default: u64| match cmd.get_u64(key) {
            Ok(v) => v.unwrap_or(default),
            Err(_) => {
                log::warn!("test_vmalloc: {key}={:?} is not a number; using {default}", cmd.get(key).unwrap_or(""));
                default
            }
        };
        for p in cmd.params().flatten() {
            if let Some(k) = p.key.strip_prefix("test_vmalloc.") {
                if !KNOWN.contains(&k) {
                    log::warn!("test_vmalloc: unknown parameter {k}");
                }
            }
        }
        let online = hal::smp::online_cpus();
        let mut nr_threads = num("test_vmalloc.nr_threads", 1).max(1) as usize;
        if nr_threads > online {
            log::warn!("test_vmalloc: nr_threads={nr_threads} but {online} CPUs are online; running {online} workers");
            nr_threads = online;
        }
        if num("test_vmalloc.use_huge", 0) != 0 || cmd.get("test_vmalloc.use_huge").is_some_and(|v| v == "Y") {
            log::warn!("test_vmalloc: use_huge is not supported; fix_size_alloc_test maps 4 KiB pages");
        }
        let seed = num("seed", DEFAULT_SEED);
        Self {
            mask: num("test_vmalloc.run_test_mask", i32::MAX as u64),
            // Linux: values <= 0 mean 1.
            loops: num("test_vmalloc.test_loop_count", 1_000_000).clamp(1, i32::MAX as u64) as u32,
            nr_pages: num("test_vmalloc.nr_pages", 0).clamp(1, 1 << 20) as usize,
            repeat: num("test_vmalloc.test_repeat_count", 1).clamp(1, i32::MAX as u64) as u32,
            nr_pcpu: num("test_vmalloc.nr_pcpu_objects", 35_000).clamp(1, 1 << 22) as usize,
            seed: num("test_vmalloc.seed", seed),
            scaling: matches!(cmd.get_bool("test_vmalloc.scaling"), Ok(Some(true))),
            profile: matches!(cmd.get_bool("test_vmalloc.profile"), Ok(Some(true))),
            sample: matches!(cmd.get_bool("test_vmalloc.sample"), Ok(Some(true))),
            nr_threads,
            ab_pools: matches!(cmd.get_bool("test_vmalloc.ab_pools"), Ok(Some(true))),
        }
    }
}

/// What a case does here.
#[derive(Clone, Copy)]
enum Body {
    Run(fn(&mut Ctx) -> Outcome),
    Skip(&'static str),
}

struct Case {
    name: &'static str,
    body: Body,
    /// Linux's `xfail`: a failure of the workload is expected.
    xfail: bool,
    /// Linux 6.12's median times (µs) in the same QEMU, from
    /// `../shared/bench/linux-test_vmalloc.md`: one worker at `-smp 1` and per worker of two
    /// at `-smp 2` for 1,000,000 loops, per worker of four at `-smp 4` for 50,000 loops.
    linux_us: Option<[u64; 3]>,
}

/// Linux's cases, in mask-bit order.
const CASES: [Case; 13] = [
    Case {
        name: "fix_size_alloc_test",
        body: Body::Run(cases::fix_size_alloc_test),
        xfail: false,
        linux_us: Some([3_928_525, 4_320_000, 60_600_000]),
    },
    Case {
        name: "full_fit_alloc_test",
        body: Body::Run(cases::full_fit_alloc_test),
        xfail: false,
        linux_us: Some([4_714_451, 5_240_000, 253_200_000]),
    },
    Case {
        name: "long_busy_list_alloc_test",
        body: Body::Run(cases::long_busy_list_alloc_test),
        xfail: false,
        linux_us: Some([48_688_585, 55_600_000, 123_500_000]),
    },
    Case {
        name: "random_size_alloc_test",
        body: Body::Run(cases::random_size_alloc_test),
        xfail: false,
        linux_us: Some([24_315_721, 28_700_000, 49_100_000]),
    },
    Case {
        name: "fix_align_alloc_test",
        body: Body::Run(cases::fix_align_alloc_test),
        xfail: false,
        linux_us: Some([11_512_634, 11_000_000, 17_900_000]),
    },
    Case {
        name: "random_size_align_alloc_test",
        body: Body::Run(cases::random_size_align_alloc_test),
        xfail: false,
        linux_us: Some([11_801_566, 13_300_000, 51_200_000]),
    },
    Case {
        name: "align_shift_alloc_test",
        body: Body::Run(cases::align_shift_alloc_test),
        xfail: true,
        linux_us: None,
    },
    Case { name: "pcpu_alloc_test", body: Body::Run(cases::pcpu_alloc_test), xfail: false, linux_us: None },
    Case {
        name: "kvfree_rcu_1_arg_vmalloc_test",
        body: Body::Skip("no RCU (kvfree_rcu needs grace periods)"),
        xfail: false,
        linux_us: None,
    },
    Case {
        name: "kvfree_rcu_2_arg_vmalloc_test",
        body: Body::Skip("no RCU (kvfree_rcu needs grace periods)"),
        xfail: false,
        linux_us: None,
    },
    Case {
        name: "vm_map_ram_test",
        body: Body::Run(cases::vm_map_ram_test),
        xfail: false,
        linux_us: Some([1_015_128, 1_050_000, 331_000]),
    },
    Case { name: "no_block_alloc_test", body: Body::Run(cases::no_block_alloc_test), xfail: true, linux_us: None },
    Case { name: "vrealloc_test", body: Body::Run(cases::vrealloc_test), xfail: false, linux_us: None },
];

/// A case's tallies, Linux's fields.
#[derive(Clone, Copy, Default)]
struct Tally {
    passed: u32,
    failed: u32,
    xfailed: u32,
    avg_us: u64,
}

/// Touches every free frame once (QEMU backs guest RAM lazily with host huge pages; the
/// first touch of each 2 MiB costs milliseconds), as a booted Linux's RAM has been: takes
/// every free block, largest first, writes each page, and gives them all back.
fn warm_up() {
    let Some(lin) = hal::kmap::linear_map() else { return };
    let t0 = hal::cpu::counter();
    let mut head: Option<hal::PhysAddr> = None;
    let mut pages = 0usize;
    for order in (0..=memory::buddy::MAX_ORDER).rev() {
        // Until the order runs out: an expected failure, not an out-of-memory report.
        let gfp = memory::gfp::GFP_KERNEL | memory::gfp::__GFP_NOWARN | memory::gfp::__GFP_NORETRY;
        while let Ok(pa) = memory::buddy::alloc_pages_gfp(gfp, order) {
            let p = lin.ptr::<u64>(pa);
            // SAFETY: the block of 2^order frames was just taken from the buddy allocator and
            // is ours until freed below; the identity map covers it. Each page's first word is
            // written, and the block's first two words then link it into our list.
            unsafe {
                for i in 0..1usize << order {
                    p.wrapping_add(i * hal::PAGE_SIZE / 8).write_volatile(0);
                }
                p.write(head.map_or(0, hal::PhysAddr::as_u64));
                p.add(1).write(order as u64);
            }
            head = Some(pa);
            pages += 1 << order;
        }
    }
    while let Some(pa) = head {
        let p = lin.ptr::<u64>(pa);
        // SAFETY: a block linked above: its first two words hold the next block and its order.
        let (next, order) = unsafe { (p.read(), p.add(1).read() as usize) };
        // SAFETY: the block came from alloc_pages(order) above and nothing else refers to it.
        if let Err(e) = unsafe { memory::buddy::free_pages(pa, order) } {
            log::error!("test_vmalloc: warm-up free {pa:#x}: {e}");
        }
        head = (next != 0).then_some(hal::PhysAddr::new(next));
    }
    let ms = hal::cpu::ticks_to_ns(hal::cpu::counter() - t0) / 1_000_000;
    println!("test_vmalloc: warm-up touched {pages} free pages in {ms} ms");
}

/// Prints the pools on/off ratio of each pair of repeats and their median.
fn print_ab(name: &str, ab: &[(bool, u64)]) {
    let mut ratios: alloc::vec::Vec<f64> = ab
        .chunks_exact(2)
        .filter(|p| p[0].0 != p[1].0 && p[0].1 > 0 && p[1].1 > 0)
        .map(|p| {
            let (on, off) = if p[0].0 { (p[0].1, p[1].1) } else { (p[1].1, p[0].1) };
            on as f64 / off as f64
        })
        .collect();
    if ratios.is_empty() {
        return;
    }
    ratios.sort_unstable_by(f64::total_cmp);
    let med = ratios[ratios.len() / 2];
    let (lo, hi) = (ratios[0], ratios[ratios.len() - 1]);
    println!(
        "  ab_pools: {name}: pools on / off, {} pairs in this boot: median {med:.3} ({lo:.3}-{hi:.3})",
        ratios.len()
    );
}

/// Runs one case `repeat` times with the checks around each repeat.
fn run_case(idx: usize, case: &Case, f: fn(&mut Ctx) -> Outcome, p: &Params) -> Tally {
    let mut t = Tally::default();
    let mut ticks = 0u64;
    let (mut model, mut measured) = (Model::default(), Measured::default());
    let (mut verified, mut tables, mut slab_moved, mut in_place, mut moved) = (0u64, 0isize, 0isize, 0u64, 0u64);
    // Every `tlbi vmalle1is` issued (any code, not only vmalloc's purges): in the timed
    // calls, and in the purges between repeats.
    let (mut full_in_case, mut full_in_purges) = (0u64, 0u64);
    let mut align_fail = None;
    // The baseline before the first repeat, which the last one's explicit purge returns to.
    let mut first: Option<Baseline> = None;
    // With `ab_pools`: the ticks of each repeat, and whether pools were on for it.
    let mut ab: alloc::vec::Vec<(bool, u64)> =
        alloc::vec::Vec::with_capacity(if p.ab_pools { p.repeat as usize } else { 0 });
    for r in 0..p.repeat {
        // With `ab_pools`: off, on, on, off, off, on, ...: each pair has both orders equally
        // often.
        let pools_on = (r % 4 == 1) || (r % 4 == 2);
        if p.ab_pools {
            for v in kernel::vmalloc_instances() {
                v.lock().set_pools(pools_on);
            }
            // The spare records and caches the switch moved, back to their steady state.
            memory::snapshot::settle();
        }
        let seed = p.seed ^ (idx as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(r) << 48;
        let mut c = Ctx::new(p.loops, p.nr_pages, p.nr_pcpu, Rng::new(seed));
        if r == 0 {
            c.purge();
        }
        let before = Baseline::take();
        let first = *first.get_or_insert(before);
        let s0 = kernel::vmalloc_stats().unwrap_or_default();
        let sampling = p.sample && sample::start();
        let f0 = hal::mmu::tlb::full_invalidations_issued();
        let t0 = hal::cpu::counter();
        let outcome = f(&mut c);
        let dt = hal::cpu::counter() - t0;
        let f1 = hal::mmu::tlb::full_invalidations_issued();
        full_in_case += f1 - f0;
        if sampling {
            sample::stop_and_report(case.name);
        }
        ticks += dt;
        if p.ab_pools {
            ab.push((pools_on, dt));
        }
        // As the lazy threshold would, the purge keeps the empty tables the case met: Linux's
        // module does not purge between repeats, and its tables stay for ever.
        c.purge_keeping_tables();
        full_in_purges += hal::mmu::tlb::full_invalidations_issued() - f1;
        let after = Baseline::take();
        let s1 = kernel::vmalloc_stats().unwrap_or_default();
        let m = Measured::delta(&s0, &s1);
        let mut checks = after.matches_keeping_tables(&before, case.name);
        if r + 1 == p.repeat {
            // The kept tables given back too: everything back at the case's first baseline.
            let f2 = hal::mmu::tlb::full_invalidations_issued();
            c.purge();
            full_in_purges += hal::mmu::tlb::full_invalidations_issued() - f2;
            let last = Baseline::take();
            tables = last.tables_grown(&first);
            checks &= last.matches(&first, case.name);
        }
        if !m.agrees(&c.model) {
            println!("  {}: CHECK FAILED: counters {m:?}", case.name);
            println!("  {}: but the workload implies {:?}", case.name, c.model);
            checks = false;
        }
        if c.bad > 0 {
            println!("  {}: CHECK FAILED: {} verification failures", case.name, c.bad);
            checks = false;
        }
        match (outcome, checks) {
            (Ok(()), true) => t.passed += 1,
            (Err(()), true) if case.xfail => t.xfailed += 1,
            _ => t.failed += 1,
        }
        model.add(&c.model);
        measured.add(&m);
        verified += c.verified_pages;
        slab_moved += after.slab_pages_moved(&before);
        in_place += c.realloc_in_place;
        moved += c.realloc_moved;
        align_fail = align_fail.or(c.align_fail);
    }
    t.avg_us = hal::cpu::ticks_to_ns(ticks) / 1000 / u64::from(p.repeat);
    if p.ab_pools {
        print_ab(case.name, &ab);
        for v in kernel::vmalloc_instances() {
            v.lock().set_pools(true);
        }
    }
    println!(
        "Summary: {} passed: {} failed: {} xfailed: {} repeat: {} loops: {} avg: {} usec",
        case.name, t.passed, t.failed, t.xfailed, p.repeat, p.loops, t.avg_us
    );
    // align_shift and pcpu do not loop test_loop_count times.
    let per_loop = match case.name {
        "align_shift_alloc_test" | "pcpu_alloc_test" => alloc::string::String::new(),
        _ => alloc::format!("{} ns/loop; ", hal::cpu::ticks_to_ns(ticks) / u64::from(p.repeat) / u64::from(p.loops)),
    };
    let agree = if measured.agrees(&model) { "as the workload implies" } else { "MISMATCH (see above)" };
    println!(
        "  {per_loop}frames {} taken, {} returned; {} PTEs written (frames + vmap'd pages); TLB: {} full flushes, {} page ops in {} \
         batches; {} purges; {} failed calls — {agree}; every vmalle1is: {full_in_case} in the case, {full_in_purges} in the purges between repeats",
        measured.frames_taken,
        measured.frames_returned,
        model.ptes,
        measured.full,
        measured.page_ops,
        measured.batches,
        measured.purges,
        measured.failures,
    );
    println!(
        "  translation verified for {verified} pages (every page, every {}th iteration); page tables {tables:+} (given back by the purges); \
         slab pages {slab_moved:+} (same objects)",
        cases::SAMPLE_EVERY
    );
    if let Some(s) = align_fail {
        println!("  first failure at align 2^{s} (Linux arm64: 2^47; our window is 2^47 bytes)");
    }
    if in_place + moved > 0 {
        println!("  vrealloc: {in_place} resized in place, {moved} moved");
    }
    t
}

fn comparison(p: &Params, tallies: &[Option<Tally>]) {
    // Linux's figures: 1,000,000 loops at one and two workers, 50,000 at four (its
    // 1,000,000 did not finish in 25 minutes there).
    let (column, workers, base) = match p.nr_threads {
        1 => (0, "1 worker at -smp 1", 1_000_000),
        2 => (1, "per worker of 2 at -smp 2", 1_000_000),
        4 => (2, "per worker of 4 at -smp 4", 50_000),
        _ => {
            println!("\n(no Linux 6.12 figures at nr_threads={}: see ../shared/bench)", p.nr_threads);
            return;
        }
    };
    let scaled = u64::from(p.loops) != base;
    println!("\ntest_vmalloc vs Linux 6.12 on the same QEMU ({workers}; ../shared/bench/linux-test_vmalloc.md)");
    if scaled {
        println!("  (Linux's {base}-loop figures scaled to {} loops: setup is not scaled, no verdict)", p.loops);
    }
    println!("  {:<30} {:>12} {:>12} {:>7}  goal <= 0.50", "case", "ours usec", "Linux usec", "ratio");
    for (case, t) in CASES.iter().zip(tallies) {
        let Some(t) = t else { continue };
        let linux =
            case.linux_us.map(|l| l[column]).filter(|_| !(case.name == "fix_size_alloc_test" && p.nr_pages != 1));
        match linux {
            Some(l) => {
                let l = l * u64::from(p.loops) / base;
                let r = t.avg_us as f64 / l.max(1) as f64;
                let verdict = match (scaled, r <= 0.5) {
                    (true, _) => "-",
                    (false, true) => "met",
                    (false, false) => "MISSED",
                };
                println!("  {:<30} {:>12} {:>12} {:>7.2}  {verdict}", case.name, t.avg_us, l, r);
            }
            None => println!("  {:<30} {:>12} {:>12} {:>7}", case.name, t.avg_us, "-", "-"),
        }
    }
}

/// The parameters and per-worker results of a multi-worker run (workers are plain `fn`s).
static WORKER_PARAMS: spin::Once<Params> = spin::Once::new();
static WORKER_RESULTS: spin::Mutex<[[Option<Tally>; CASES.len()]; hal::dtb::MAX_CPUS]> =
    spin::Mutex::new([[None; CASES.len()]; hal::dtb::MAX_CPUS]);

/// One worker of a multi-worker run: the selected cases in bit order, as Linux's
/// `test_func` runs them, with Linux's lines. The per-case counter checks read global
/// counters and are left to the end-of-run baseline check.
fn worker(cpu: usize) {
    let Some(p) = WORKER_PARAMS.get() else { return };
    if cpu >= p.nr_threads {
        return;
    }
    let start = hal::cpu::counter();
    for (idx, case) in CASES.iter().enumerate() {
        let Body::Run(f) = case.body else { continue };
        if p.mask & (1 << idx) == 0 {
            continue;
        }
        let mut t = Tally::default();
        let mut ticks = 0;
        for r in 0..p.repeat {
            let seed =
                p.seed ^ (idx as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(r) << 48 ^ (cpu as u64) << 40;
            let mut c = Ctx::new(p.loops, p.nr_pages, p.nr_pcpu, Rng::new(seed));
            // CPU 0's worker is sampled as a single worker is (the timer is CPU 0's).
            let sampling = cpu == 0 && p.sample && sample::start();
            let t0 = hal::cpu::counter();
            let outcome = f(&mut c);
            ticks += hal::cpu::counter() - t0;
            if sampling {
                sample::stop_and_report(case.name);
            }
            match (outcome, c.bad) {
                (Ok(()), 0) => t.passed += 1,
                (Err(()), 0) if case.xfail => t.xfailed += 1,
                _ => t.failed += 1,
            }
        }
        t.avg_us = hal::cpu::ticks_to_ns(ticks) / 1000 / u64::from(p.repeat);
        println!(
            "Summary: {} passed: {} failed: {} xfailed: {} repeat: {} loops: {} avg: {} usec",
            case.name, t.passed, t.failed, t.xfailed, p.repeat, p.loops, t.avg_us
        );
        WORKER_RESULTS.lock()[cpu][idx] = Some(t);
    }
    println!("All test took worker{cpu}={} cycles", hal::cpu::counter() - start);
}

/// `nr_threads` > 1: every worker at once, then the baseline check; per case, the median of
/// the workers' times goes to the comparison.
fn run_workers(p: &Params) -> Tally {
    WORKER_PARAMS.call_once(|| *p);
    check::settle();
    let before = Baseline::take();
    let classes = [
        &hal::sync::classes::VMALLOC,
        &hal::sync::classes::KERNEL_TABLES,
        &hal::sync::classes::SLAB,
        &hal::sync::classes::BUDDY,
    ];
    for c in classes {
        c.take_contended();
    }
    let out = hal::smp::run_on_all(worker, u64::MAX);
    // Contention while the workers ran (before the settling below takes locks too).
    {
        // Freed before the baseline is taken.
        let mut line = alloc::string::String::from("lock contention (acquisitions that had to spin):");
        for c in classes {
            let _ = core::fmt::Write::write_fmt(&mut line, format_args!(" {}={}", c.name, c.take_contended()));
        }
        println!("{line}");
    }
    check::settle();
    let after = Baseline::take();
    let mut total = Tally::default();
    for (cpu, o) in out.iter().enumerate().take(p.nr_threads) {
        if *o != hal::smp::Outcome::Returned {
            println!("test_vmalloc: worker{cpu}: {o:?}");
            total.failed += 1;
        }
    }
    if !after.matches(&before, "all workers") {
        total.failed += 1;
    }
    let results = *WORKER_RESULTS.lock();
    let mut medians: [Option<Tally>; CASES.len()] = [None; CASES.len()];
    for (idx, m) in medians.iter_mut().enumerate() {
        let mut times: alloc::vec::Vec<u64> =
            results[..p.nr_threads].iter().filter_map(|w| w[idx]).map(|t| t.avg_us).collect();
        for t in results[..p.nr_threads].iter().filter_map(|w| w[idx]) {
            total.passed += t.passed;
            total.failed += t.failed;
            total.xfailed += t.xfailed;
        }
        if times.is_empty() {
            continue;
        }
        times.sort_unstable();
        *m = Some(Tally { avg_us: times[times.len() / 2], ..Tally::default() });
    }
    println!("\nper-worker time (median of {} workers; every worker's Summary lines above)", p.nr_threads);
    comparison(p, &medians);
    total
}

/// Runs the cases the command line selects and returns whether all passed.
pub fn run(info: &BootInfo) -> bool {
    let p = Params::from_cmdline(info);
    println!(
        "test_vmalloc: run_test_mask={:#x} test_loop_count={} nr_pages={} test_repeat_count={} nr_threads={} seed={:#x}{}",
        p.mask,
        p.loops,
        p.nr_pages,
        p.repeat,
        p.nr_threads,
        p.seed,
        if p.scaling { " scaling=1" } else { "" }
    );
    warm_up();
    if p.nr_threads > 1 {
        let total = run_workers(&p);
        println!("test_vmalloc: {} passed, {} failed ({} xfailed)", total.passed, total.failed, total.xfailed);
        return total.failed == 0;
    }
    if p.profile {
        profile::run(info);
    }
    let mut tallies: [Option<Tally>; CASES.len()] = [None; CASES.len()];
    let (mut skipped, mut total) = (0u32, Tally::default());
    let start = hal::cpu::counter();
    for (idx, case) in CASES.iter().enumerate() {
        if p.mask & (1 << idx) == 0 {
            continue;
        }
        match case.body {
            Body::Skip(why) => {
                println!("{}: skipped: {why}", case.name);
                skipped += 1;
            }
            Body::Run(f) => {
                let t = run_case(idx, case, f, &p);
                total.passed += t.passed;
                total.failed += t.failed;
                total.xfailed += t.xfailed;
                tallies[idx] = Some(t);
            }
        }
    }
    // Linux's get_cycles() on arm64 reads the same counter (CNTVCT_EL0); the checks between
    // repeats are included here.
    println!("All test took worker0={} cycles", hal::cpu::counter() - start);
    let scaling_ok = !p.scaling || scaling::run();
    comparison(&p, &tallies);
    if let Some(s) = kernel::vmalloc_stats() {
        println!("\n  purge time: max {} us, p99 {} us", s.purge_ns_max / 1000, s.purge_ns_p99 / 1000);
    }
    if !scaling_ok {
        total.failed += 1;
    }
    println!(
        "test_vmalloc: {} passed, {} failed ({} xfailed, {} skipped)",
        total.passed, total.failed, total.xfailed, skipped
    );
    total.failed == 0
}
