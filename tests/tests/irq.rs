//! Interrupts on every core: the per-CPU timer while the others allocate, cross-CPU calls,
//! CPU hotplug with hooks, and the lock checks. `./x test` boots this at `-smp 4` with
//! GICv2 and with GICv3 (and at `-smp 1`, where the multi-CPU tests are ignored).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use hal::dtb::MAX_CPUS;
use hal::smp::{self, HotplugHooks, Outcome};
use hal::sync::{IrqSpinLock, LockClass, SpinLock};
use tests::test;

fn info() -> &'static hal::boot::BootInfo {
    hal::boot::boot_info().expect("boot info")
}

fn online() -> usize {
    smp::online_cpus()
}

fn controller() -> &'static dyn hal::irq::InterruptController {
    hal::irq::controller().expect("the GIC is up")
}

fn gic_is_up() {
    let c = controller();
    let want = match info().platform.gic.unwrap().version {
        hal::dtb::GicVersion::V2 => "GICv2",
        hal::dtb::GicVersion::V3 => "GICv3",
    };
    assert_eq!(c.name(), want);
    assert!(hal::irq::irqs_enabled(), "thread code runs with IRQs on");
    for n in 1..online() {
        assert_eq!(smp::cpu_state(n), smp::state::IDLE, "CPU {n} idles in wfi");
    }
    hal::print!("({want}, {} CPUs) ", online());
}

// --- the timer --------------------------------------------------------------------------

/// Ticks each CPU takes; the period in counter ticks (200 µs).
const TICKS_WANTED: u64 = 10_000;
static PERIOD: AtomicU64 = AtomicU64::new(0);
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static MAX_LATENCY: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static FIRST_DEADLINE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static TIMER_CLASS: LockClass = LockClass::new("test: timer tally", 14);
/// Taken by the handler and by thread code: IRQ-safe.
static TALLY: IrqSpinLock<u64> = IrqSpinLock::new(&TIMER_CLASS, 0);
static GATE: AtomicUsize = AtomicUsize::new(0);

static END: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static DONE_AT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static LAST_DEADLINE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static NOT_DUE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn timer_handler(_intid: u32) {
    let cpu = smp::this_cpu();
    if !hal::timer::fired() {
        // Delivered after the handler already moved the deadline on: not a tick.
        NOT_DUE[cpu].fetch_add(1, Ordering::Relaxed);
        return;
    }
    let deadline = hal::timer::deadline();
    let late = hal::timer::now().saturating_sub(deadline);
    MAX_LATENCY[cpu].fetch_max(late, Ordering::Relaxed);
    LAST_DEADLINE[cpu].store(deadline, Ordering::Relaxed);
    TICKS[cpu].fetch_add(1, Ordering::Relaxed);
    *TALLY.lock() += 1;
    // CVAL += period: a late tick does not drift (the next one may be due already). The
    // window ends at END: past it the timer stops.
    let next = deadline + PERIOD.load(Ordering::Relaxed);
    if next <= END[cpu].load(Ordering::Relaxed) {
        hal::timer::arm_at(next);
    } else {
        hal::timer::stop();
        DONE_AT[cpu].store(hal::timer::now(), Ordering::Release);
    }
}

fn timer_body(cpu: usize) {
    let period = PERIOD.load(Ordering::Relaxed);
    let intid = info().platform.timer_intid.unwrap();
    controller().enable(intid);
    tests::rendezvous(&GATE);
    let start = hal::timer::now();
    let end = start + TICKS_WANTED * period;
    FIRST_DEADLINE[cpu].store(start + period, Ordering::Relaxed);
    END[cpu].store(end, Ordering::Relaxed);
    DONE_AT[cpu].store(0, Ordering::Relaxed);
    hal::timer::arm_at(start + period);
    // Allocate and free while the ticks come, and take the handler's lock from thread code.
    let mut keep: Vec<Box<[u64; 8]>> = Vec::with_capacity(64);
    let mut i = 0u64;
    while hal::timer::now() < end {
        keep.push(Box::new([i; 8]));
        if keep.len() == 64 {
            assert!(keep.iter().enumerate().all(|(k, b)| b[7] == i + 1 + k as u64 - 64), "a box changed");
            keep.clear();
        }
        if let Ok(pa) = memory::buddy::alloc_pages(0) {
            // SAFETY: the frame was just allocated here.
            unsafe { memory::buddy::free_pages(pa, 0) }.unwrap();
        }
        *TALLY.lock() += 0;
        i += 1;
    }
    // Let every tick due by `end` be taken (a CPU the host descheduled catches up).
    while DONE_AT[cpu].load(Ordering::Acquire) == 0 {
        assert!(
            hal::timer::now() < end + 5 * hal::timer::frequency(),
            "CPU {cpu}: ticks stopped at {} (handled {}, unhandled/spurious {:?}, DAIF {:#x})",
            TICKS[cpu].load(Ordering::Relaxed),
            hal::irq::handled(cpu),
            hal::irq::unhandled_and_spurious(),
            hal::cpu::daif()
        );
        core::hint::spin_loop();
    }
    controller().disable(intid);
}

/// Each CPU takes 10,000 timer interrupts (`CVAL += period`) while all of them allocate
/// and free; each count is elapsed / period ± 1; the handler shares a lock with thread code.
fn every_cpu_takes_its_timer_ticks_while_allocating() {
    let period = hal::timer::frequency() / 5_000;
    PERIOD.store(period, Ordering::Relaxed);
    GATE.store(0, Ordering::Relaxed);
    hal::irq::register(info().platform.timer_intid.unwrap(), timer_handler).unwrap();
    let before = *TALLY.lock();
    tests::on_every_cpu(timer_body);
    hal::irq::unregister(info().platform.timer_intid.unwrap());
    let mut total = 0;
    for n in 0..online() {
        let ticks = TICKS[n].load(Ordering::Relaxed);
        let first = FIRST_DEADLINE[n].load(Ordering::Relaxed);
        assert!(ticks.abs_diff(TICKS_WANTED) <= 1, "CPU {n}: {ticks} ticks, want {TICKS_WANTED} ± 1");
        assert!(first != 0);
        total += ticks;
        let us = MAX_LATENCY[n].load(Ordering::Relaxed) * 1_000_000 / hal::timer::frequency();
        let not_due = NOT_DUE[n].load(Ordering::Relaxed);
        // Elapsed: from arming to the last deadline the window held, in periods.
        let elapsed = (LAST_DEADLINE[n].load(Ordering::Relaxed) + period - first) / period;
        assert!(ticks.abs_diff(elapsed) <= 1, "CPU {n}: {ticks} ticks in {elapsed} periods");
        assert_eq!(elapsed, TICKS_WANTED, "CPU {n}: the window is {TICKS_WANTED} periods");
        hal::print!("(CPU {n}: {ticks} ticks, max latency {us} us, {not_due} not due) ");
    }
    assert_eq!(*TALLY.lock() - before, total, "every tick took the shared lock once");
}

// --- cross-CPU calls --------------------------------------------------------------------

static CALLED: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

/// `on_cpu` runs a closure on the named CPU (in its interrupt context) and waits;
/// `on_each_cpu` on every other one.
fn cross_cpu_calls_run_where_asked() {
    let seen = AtomicUsize::new(usize::MAX);
    smp::on_cpu(1, &|| {
        assert!(hal::irq::in_interrupt());
        seen.store(smp::this_cpu(), Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), 1);
    let n = smp::on_each_cpu(&|| {
        CALLED[smp::this_cpu()].fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(n, online() - 1);
    for (cpu, c) in CALLED.iter().enumerate().take(online()).skip(1) {
        assert_eq!(c.load(Ordering::Relaxed), 1, "CPU {cpu}");
    }
    assert_eq!(CALLED[0].load(Ordering::Relaxed), 0, "not on the caller");
    assert_eq!(smp::on_cpu(smp::this_cpu(), &|| {}), Err(smp::CallError::NotOnline(smp::this_cpu())));
}

// --- hotplug ----------------------------------------------------------------------------

static PER_CPU_COUNT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static DRAINED: AtomicU64 = AtomicU64::new(0);
static UPS: AtomicU64 = AtomicU64::new(0);
static STOP_BUSY: AtomicBool = AtomicBool::new(false);
static BUSY_LOOPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn drain(cpu: usize) {
    DRAINED.fetch_add(PER_CPU_COUNT[cpu].swap(0, Ordering::AcqRel), Ordering::AcqRel);
}

/// Counts "dead" steps that ran as documented: on another CPU, the CPU already off.
static DEADS: AtomicU64 = AtomicU64::new(0);

fn dead(cpu: usize) {
    if smp::this_cpu() != cpu && smp::cpu_state(cpu) == smp::state::OFF {
        DEADS.fetch_add(1, Ordering::Relaxed);
    }
}

fn came_up(_cpu: usize) {
    UPS.fetch_add(1, Ordering::Relaxed);
}

fn hotplug_body(cpu: usize) {
    match cpu {
        0 => {
            assert!(smp::wait_idle(1, 5_000_000_000));
            for cycle in 0..100u64 {
                // Work lands on CPU 1's counter, then CPU 1 goes down: its hook drains it.
                smp::on_cpu(1, &|| {
                    PER_CPU_COUNT[smp::this_cpu()].fetch_add(cycle + 1, Ordering::Relaxed);
                })
                .unwrap();
                smp::cpu_down(1).unwrap_or_else(|e| panic!("cycle {cycle}: down: {e}"));
                assert_eq!(smp::cpu_state(1), smp::state::OFF);
                smp::cpu_up(1).unwrap_or_else(|e| panic!("cycle {cycle}: up: {e}"));
            }
            STOP_BUSY.store(true, Ordering::Release);
        }
        1 => {}
        n => {
            while !STOP_BUSY.load(Ordering::Acquire) {
                BUSY_LOOPS[n].fetch_add(1, Ordering::Relaxed);
                drop(core::hint::black_box(Box::new(n)));
            }
        }
    }
}

/// CPU 1 is switched off and on 100 times while the others run; a hotplug hook drains its
/// per-CPU counter each time it goes down, the "dead" hook runs on CPU 0 once it is off,
/// and the totals match.
fn a_secondary_goes_off_and_on_100_times() {
    smp::register_hotplug(HotplugHooks { down: drain, dead, up: came_up }).unwrap();
    let ups = UPS.load(Ordering::Relaxed);
    let deads = DEADS.load(Ordering::Relaxed);
    let out = tests::on_every_cpu_within(hotplug_body, tests::CPU_TIMEOUT_NS);
    assert_eq!(out[0], Outcome::Returned, "{:?}", out);
    assert_eq!(DRAINED.load(Ordering::Relaxed), (1..=100).sum::<u64>(), "every cycle's count drained");
    assert_eq!(UPS.load(Ordering::Relaxed) - ups, 100, "the up hook ran each time");
    assert_eq!(DEADS.load(Ordering::Relaxed) - deads, 100, "the dead hook ran each time, on CPU 0, CPU 1 off");
    assert_eq!(PER_CPU_COUNT[1].load(Ordering::Relaxed), 0);
    assert_eq!(smp::cpu_state(1), smp::state::IDLE, "back in its idle loop");
    for (n, b) in BUSY_LOOPS.iter().enumerate().take(online()).skip(2) {
        assert!(b.load(Ordering::Relaxed) > 0, "CPU {n} ran meanwhile");
    }
    assert_eq!(smp::cpu_data(1).unwrap().seen_mpidr(), smp::cpu_data(1).unwrap().mpidr());
}

// --- lock checks ------------------------------------------------------------------------

static HIGH_CLASS: LockClass = LockClass::new("test: high", 15);
static LOW_CLASS: LockClass = LockClass::new("test: low", 2);
static HIGH: SpinLock<u32> = SpinLock::new(&HIGH_CLASS, 0);
static LOW: SpinLock<u32> = SpinLock::new(&LOW_CLASS, 0);

/// Taking a low-rank lock while holding a high-rank one is reported; the right order is not.
fn lock_order_check_fires() {
    const { assert!(hal::sync::CHECKS, "the suites build hal with lock-checks") };
    let before = hal::sync::take_reports();
    assert_eq!(before, 0, "nothing reported before this test");
    {
        let _low = LOW.lock();
        let _high = HIGH.lock();
    }
    assert_eq!(hal::sync::reports(), 0, "low then high is the documented order");
    {
        let _high = HIGH.lock();
        let _low = LOW.lock();
    }
    assert_eq!(hal::sync::take_reports(), 1, "high then low is reported once");
}

static IRQ_CLASS: LockClass = LockClass::new("test: irq-unsafe", 5);
static UNSAFE_LOCK: SpinLock<u32> = SpinLock::new(&IRQ_CLASS, 0);

/// A plain lock taken in interrupt context and, elsewhere, held with interrupts on is
/// reported (an IRQ arriving while the thread holds it would deadlock on that CPU).
fn irq_context_check_fires() {
    hal::sync::forget_irq_history(&IRQ_CLASS);
    assert_eq!(hal::sync::take_reports(), 0);
    // In interrupt context on CPU 1 (an SGI call).
    smp::on_cpu(1, &|| {
        *UNSAFE_LOCK.lock() += 1;
    })
    .unwrap();
    assert_eq!(hal::sync::reports(), 0, "only one side seen yet");
    // Thread code, interrupts on.
    assert!(hal::irq::irqs_enabled());
    *UNSAFE_LOCK.lock() += 1;
    assert_eq!(hal::sync::take_reports(), 1, "reported");
    // An IRQ-safe lock used the same way is fine.
    hal::sync::forget_irq_history(&TIMER_CLASS);
    smp::on_cpu(1, &|| {
        *TALLY.lock() += 0;
    })
    .unwrap();
    *TALLY.lock() += 0;
    assert_eq!(hal::sync::take_reports(), 0, "IrqSpinLock masks interrupts while held");
}

tests::main!(
    test!(gic_is_up),
    test!(every_cpu_takes_its_timer_ticks_while_allocating),
    test!(cross_cpu_calls_run_where_asked).needing(tests::two_cpus, "-smp 2"),
    test!(a_secondary_goes_off_and_on_100_times).needing(tests::four_cpus, "-smp 4"),
    test!(lock_order_check_fires),
    test!(irq_context_check_fires).needing(tests::two_cpus, "-smp 2"),
);
