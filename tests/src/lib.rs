//! # On-target test runner
//!
//! Each file in `tests/tests/` is a `harness = false` test binary: a bootable image whose
//! `main` hands a list of tests to [`run`]. Cargo's `runner` (`tools/qemu-run`) boots it in
//! QEMU. The output is libtest's:
//!
//! ```text
//! running 3 tests
//! test mmu::null_read_faults ... ok
//! test mmu::stack_overflow_is_reported ... ok
//! test vmalloc::guard_page_traps ... FAILED
//! 2 passed, 1 failed
//! ```
//!
//! A test that panics or takes a fatal exception is reported (with the fault report) and
//! counted as failed, and the run goes on with the next test: each test runs inside
//! [`hal::exception::catch`]. A test can also *expect* a fault ([`Expect::Fault`]). The exit
//! status is 0 only when every test passed; `qemu-run` also checks the summary line, because
//! a PSCI power-off (no semihosting) always exits 0.
#![no_std]

extern crate alloc;

use core::fmt::Write;
use hal::exception::{catch, Caught};
use hal::println;

/// What a test must do to pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Return normally.
    Pass,
    /// Take a fatal exception (e.g. touch a guard page directly, without a probe).
    Fault,
    /// Panic.
    Panic,
}

/// One on-target test.
#[derive(Clone, Copy, Debug)]
pub struct Test {
    /// `module::name`, printed in the report.
    pub name: &'static str,
    /// The test body; it fails by panicking (use `assert!`) or faulting.
    pub run: fn(),
    /// What counts as a pass.
    pub expect: Expect,
    /// What the machine must offer for the test to run (`None`: anything): when the check
    /// fails, the test is reported `ignored` with the reason, and counted apart.
    pub needs: Option<Needs>,
}

/// A condition a test needs of the machine, and what it is called.
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    /// Whether the machine offers it.
    pub check: fn() -> bool,
    /// What to boot with to get it (printed when it is missing).
    pub what: &'static str,
}

impl Test {
    /// A test that must return normally.
    pub const fn new(name: &'static str, run: fn()) -> Self {
        Self { name, run, expect: Expect::Pass, needs: None }
    }

    /// The same test, run only when `check` holds (else reported `ignored (what)`).
    pub const fn needing(self, check: fn() -> bool, what: &'static str) -> Self {
        Self { needs: Some(Needs { check, what }), ..self }
    }

    /// A test that must take a fatal exception.
    pub const fn expect_fault(name: &'static str, run: fn()) -> Self {
        Self { name, run, expect: Expect::Fault, needs: None }
    }

    /// A test that must panic.
    pub const fn expect_panic(name: &'static str, run: fn()) -> Self {
        Self { name, run, expect: Expect::Panic, needs: None }
    }
}

/// Builds a [`Test`] named after the function: `test!(path::to::function)`.
#[macro_export]
macro_rules! test {
    ($f:path) => {
        $crate::Test::new(stringify!($f), $f)
    };
    ($f:path, fault) => {
        $crate::Test::expect_fault(stringify!($f), $f)
    };
    ($f:path, panic) => {
        $crate::Test::expect_panic(stringify!($f), $f)
    };
}

static LAST_CAUGHT: spin::Mutex<Option<Caught>> = spin::Mutex::new(None);
/// The test running now (for reports from other CPUs).
static CURRENT_TEST: spin::Mutex<&'static str> = spin::Mutex::new("");

/// The name of the test running now.
pub fn current_test() -> &'static str {
    *CURRENT_TEST.lock()
}

/// How long [`on_every_cpu`] waits for the other CPUs before it reports one as hung.
pub const CPU_TIMEOUT_NS: u64 = 60_000_000_000;

/// Runs `body(cpu)` on every online CPU at once, this one included, and joins: each CPU
/// runs it inside its own `catch`, so a failure on one is reported (with that CPU's
/// number) and the others go on. A CPU that does not finish within `timeout_ns` is named
/// as hung, with the test. Returns every CPU's outcome (`NotRun` past the online ones).
pub fn on_every_cpu_within(body: fn(usize), timeout_ns: u64) -> [hal::smp::Outcome; hal::dtb::MAX_CPUS] {
    let out = hal::smp::run_on_all(body, timeout_ns);
    for (cpu, o) in out.iter().enumerate() {
        if *o == hal::smp::Outcome::Hung {
            println!(
                "\n*** test {}: CPU {cpu} did not finish within {} ms (hung)",
                current_test(),
                timeout_ns / 1_000_000
            );
        }
    }
    out
}

/// Whether at least two CPUs are online (for [`Test::needing`]).
pub fn two_cpus() -> bool {
    hal::smp::online_cpus() >= 2
}

/// Whether at least four CPUs are online (for [`Test::needing`]).
pub fn four_cpus() -> bool {
    hal::smp::online_cpus() >= 4
}

/// Every CPU that calls this spins until all online CPUs have (panicking after 10 s), so
/// the code after it runs on all of them at the same moment. `gate` starts at 0.
pub fn rendezvous(gate: &core::sync::atomic::AtomicUsize) {
    use core::sync::atomic::Ordering;
    gate.fetch_add(1, Ordering::AcqRel);
    let t0 = hal::cpu::uptime_ns();
    while gate.load(Ordering::Acquire) < hal::smp::online_cpus() {
        assert!(hal::cpu::uptime_ns() - t0 < 10_000_000_000, "CPU {} waited 10 s for the others", hal::smp::this_cpu());
        core::hint::spin_loop();
    }
}

/// [`on_every_cpu_within`] [`CPU_TIMEOUT_NS`], then fails the test (panics, naming the CPU)
/// unless every online CPU returned normally.
pub fn on_every_cpu(body: fn(usize)) {
    let out = on_every_cpu_within(body, CPU_TIMEOUT_NS);
    for (cpu, o) in out.iter().enumerate().take(hal::smp::online_cpus()) {
        assert_eq!(*o, hal::smp::Outcome::Returned, "CPU {cpu}");
    }
}

/// How the previous test that panicked or faulted ended (for a follow-up test that checks
/// the details, e.g. that a stack overflow hit the guard page).
pub fn last_caught() -> Option<Caught> {
    *LAST_CAUGHT.lock()
}

/// Counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tests that behaved as expected.
    pub passed: usize,
    /// Tests that did not.
    pub failed: usize,
    /// Tests skipped by the `test.filter=` boot parameter.
    pub filtered: usize,
    /// Tests not run because the machine lacks what they need ([`Test::needing`]).
    pub ignored: usize,
}

/// Runs `tests` in order, prints libtest-style lines and the summary, and returns the
/// counts. Tests whose name does not contain the `test.filter=` boot parameter (when
/// given) are skipped.
pub fn run_tests(tests: &[Test]) -> Summary {
    let filter = hal::boot::boot_info().and_then(|i| i.cmdline().get("test.filter"));
    let selected = tests.iter().filter(|t| filter.is_none_or(|f| t.name.contains(f)));
    let total = selected.clone().count();
    let mut summary = Summary { filtered: tests.len() - total, ..Summary::default() };
    println!("\nrunning {total} tests");
    for t in selected {
        *CURRENT_TEST.lock() = t.name;
        // Printed before the test runs: if it hangs, qemu-run names it from this line.
        hal::print!("test {} ... ", t.name);
        if let Some(needs) = t.needs.filter(|n| !(n.check)()) {
            summary.ignored += 1;
            println!("ignored (needs {})", needs.what);
            continue;
        }
        // SAFETY: test bodies are plain functions written for this harness: a failing one is
        // abandoned where it stands, and none relies on a destructor for soundness.
        let result = unsafe { catch(t.run) };
        if let Err(c) = result {
            *LAST_CAUGHT.lock() = Some(c);
        }
        let ok = matches!(
            (t.expect, result),
            (Expect::Pass, Ok(())) | (Expect::Fault, Err(Caught::Fault(_))) | (Expect::Panic, Err(Caught::Panic))
        );
        if ok {
            summary.passed += 1;
            println!("ok");
        } else {
            summary.failed += 1;
            let why = match (t.expect, result) {
                (_, Ok(())) => "returned, but a fault or panic was expected",
                (Expect::Pass, Err(Caught::Panic)) => "panicked",
                (Expect::Pass, Err(Caught::Fault(_))) => "faulted",
                (_, Err(_)) => "failed in another way than expected",
            };
            println!("FAILED ({why})");
            println!("test {} ... FAILED", t.name);
        }
    }
    summary
}

/// Runs `tests`, prints the summary line and exits QEMU: status 0 only if all passed.
pub fn run(tests: &[Test]) -> ! {
    let mut s = run_tests(tests);
    let mut out = hal::console::Console;
    if s.filtered > 0 {
        let _ = writeln!(out, "({} tests filtered out)", s.filtered);
    }
    // The lock checks must stay silent through a whole suite (tests that trigger them on
    // purpose take their reports).
    if hal::sync::CHECKS && hal::sync::reports() > 0 {
        let _ = writeln!(out, "lock checks: {} report(s) during the run", hal::sync::reports());
        s.failed += 1;
    }
    if s.ignored > 0 {
        let _ = writeln!(out, "{} passed, {} failed, {} ignored", s.passed, s.failed, s.ignored);
    } else {
        let _ = writeln!(out, "{} passed, {} failed", s.passed, s.failed);
    }
    hal::exit::exit(if s.failed == 0 { hal::exit::EXIT_SUCCESS } else { hal::exit::EXIT_FAILURE })
}

/// Every test image's heap: the slab allocator, as in the firmware.
#[global_allocator]
static HEAP: memory::slab::KernelAllocator = memory::slab::KernelAllocator;

/// Brings up the memory system as the firmware does (boot parameters included), with
/// vmalloc's quarantine on unless the command line says `vmalloc.quarantine=0`: in the test
/// suites a write after `vfree` is caught, never lands in someone else's frame.
pub fn init_memory(info: &'static hal::boot::BootInfo) {
    let cmdline = info.cmdline();
    let mut config = memory::kernel::MemoryConfig::from_cmdline(&cmdline);
    if cmdline.get("vmalloc.quarantine").is_none() {
        config.vmalloc.quarantine = true;
    }
    // SAFETY: called once per boot, by `main!`, after hal turned the MMU on.
    if let Err(e) = unsafe { memory::kernel::init(info, config) } {
        panic!("memory init: {e}");
    }
    if let Err(e) = memory::ioremap::switch_console_to_ioremap(info) {
        log::warn!("console stays on its boot mapping: {e}");
    }
    if let Err(e) = memory::ioremap::probe_gic(info) {
        log::warn!("GIC: {e}");
    }
    // Interrupts on in thread context once the controller is up, as in the firmware.
    match gic::init(info) {
        Ok(_) => hal::irq::enable_local(),
        Err(e) => log::warn!("interrupts stay off: {e}"),
    }
}

/// Declares a test binary's entry: `tests::main!(test!(a), test!(b, fault), ...)`. The
/// memory system is up before the first test runs.
#[macro_export]
macro_rules! main {
    ($($t:expr),* $(,)?) => {
        hal::entry!(__test_main);
        fn __test_main(info: &'static hal::boot::BootInfo) -> ! {
            $crate::init_memory(info);
            $crate::run(&[$($t),*])
        }
    };
}
