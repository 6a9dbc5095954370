//! Every core: the per-CPU data ([`CpuData`], found through `TPIDR_EL1`), [`PerCpu`]
//! values, the other CPUs' stacks, starting them through PSCI `CPU_ON`, and running a
//! function on every CPU at once ([`run_on_all`]).
//!
//! ## Life of a secondary CPU
//! At boot, every CPU the device tree lists (up to `maxcpus=N`, at most [`MAX_CPUS`]) is
//! started once and must check in — it reports the MPIDR it reads itself and the exception
//! level it entered at — or boot fails. A CPU with nothing to do powers itself off again
//! (PSCI `CPU_OFF`), so an idle core costs nothing (QEMU's `wfe` is a busy loop; waking
//! from `wfi` needs the interrupt controller, which the interrupt work brings). To run
//! something, [`run_on_all`] writes the function into the CPU's mailbox, cleans the boot
//! record to the point of coherency and calls `CPU_ON` again.
//!
//! Each start: `hal_secondary_entry` (`asm/entry.S`) masks DAIF, leaves EL2 as the boot
//! CPU did, and with the MMU still off — no stack, no lock, no atomic — loads the boot
//! CPU's MAIR/TCR/TTBRs/SCTLR from its boot record, runs a local `tlbi vmalle1` and turns
//! its MMU on. Only then does it set its stacks, `TPIDR_EL1` and `VBAR_EL1` and call
//! `hal_secondary_rust`.

mod cpu;
mod percpu;

#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
pub use cpu::host_play_cpu;
pub use cpu::{cpu_data, this_cpu, this_cpu_data, CpuData, HAL_CPUS};
pub use percpu::PerCpu;

use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use crate::boot::{BootInfo, ImageLayout};
use crate::dtb::MAX_CPUS;
use crate::exception::Fault;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Each secondary CPU's thread stack (link.ld `CPU_STACK_SIZE`).
pub const CPU_STACK_SIZE: u64 = 128 << 10;
/// Each secondary CPU's exception stack (link.ld `CPU_EXCEPTION_STACK_SIZE`).
pub const CPU_EXCEPTION_STACK_SIZE: u64 = 32 << 10;
/// One secondary's slot of the `.cpu_stacks` region: two guard pages and two stacks.
pub const CPU_STACK_SLOT: u64 = 2 * PAGE_SIZE as u64 + CPU_STACK_SIZE + CPU_EXCEPTION_STACK_SIZE;

/// One secondary CPU's stacks, as its slot of the image's `.cpu_stacks` lays them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStacks {
    /// Guard page below the thread stack (never mapped).
    pub stack_guard: PhysRange,
    /// Thread stack (SP_EL0).
    pub stack: PhysRange,
    /// Guard page below the exception stack (never mapped).
    pub exception_guard: PhysRange,
    /// Exception stack (SP_EL1).
    pub exception_stack: PhysRange,
}

impl CpuStacks {
    /// CPU `cpu`'s stacks (`1..MAX_CPUS`); `None` for CPU 0 (whose stacks are the image's
    /// boot and exception stacks) or past the region.
    pub fn of(image: &ImageLayout, cpu: usize) -> Option<Self> {
        if cpu == 0 || cpu >= MAX_CPUS {
            return None;
        }
        let base = image.cpu_stacks.start().as_u64() + (cpu as u64 - 1) * CPU_STACK_SLOT;
        if base + CPU_STACK_SLOT > image.cpu_stacks.end().as_u64() {
            return None;
        }
        let r = |at: u64, size: u64| PhysRange::new(PhysAddr::new(base + at), size).ok();
        let page = PAGE_SIZE as u64;
        Some(Self {
            stack_guard: r(0, page)?,
            stack: r(page, CPU_STACK_SIZE)?,
            exception_guard: r(page + CPU_STACK_SIZE, page)?,
            exception_stack: r(2 * page + CPU_STACK_SIZE, CPU_EXCEPTION_STACK_SIZE)?,
        })
    }
}

/// The name of the stack guard page `addr` lies in, if any: "thread stack of CPU n" or
/// "exception stack of CPU n", for fault reports (no lock taken).
pub fn stack_guard_name(image: &ImageLayout, addr: u64) -> Option<(&'static str, usize)> {
    let pa = PhysAddr::new(addr);
    if image.boot_stack_guard.contains(pa) {
        return Some(("stack overflow: thread stack", 0));
    }
    if image.exception_stack_guard.contains(pa) {
        return Some(("stack overflow: exception stack", 0));
    }
    (1..MAX_CPUS).find_map(|cpu| {
        let s = CpuStacks::of(image, cpu)?;
        if s.stack_guard.contains(pa) {
            Some(("stack overflow: thread stack", cpu))
        } else if s.exception_guard.contains(pa) {
            Some(("stack overflow: exception stack", cpu))
        } else {
            None
        }
    })
}

/// How many CPUs checked in at boot (the boot CPU included): the ones [`run_on_all`] uses.
static ONLINE: AtomicUsize = AtomicUsize::new(1);

/// CPUs that checked in at boot, the boot CPU included (1 before boot started the others).
pub fn online_cpus() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// Why the other CPUs could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// The device tree does not list the CPU we run on (its MPIDR).
    BootCpuNotListed(u64),
    /// A CPU has no `enable-method = "psci"`, or there is no PSCI conduit.
    NotPsci(u64),
    /// `CPU_ON` failed for this MPIDR.
    CpuOn(u64),
    /// The CPU did not check in within the timeout.
    NoCheckIn(u64),
    /// The image has no stack slot for this logical CPU.
    NoStacks(usize),
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmpError::BootCpuNotListed(m) => write!(f, "the boot CPU (MPIDR {m:#x}) is not in /cpus"),
            SmpError::NotPsci(m) => write!(f, "CPU {m:#x} has no PSCI enable-method (or no PSCI conduit)"),
            SmpError::CpuOn(m) => write!(f, "PSCI CPU_ON({m:#x}) failed"),
            SmpError::NoCheckIn(m) => write!(f, "CPU {m:#x} did not check in"),
            SmpError::NoStacks(n) => write!(f, "no stack slot for CPU {n}"),
        }
    }
}

impl core::error::Error for SmpError {}

/// How long boot waits for a CPU to check in, and [`run_on_all`] for `CPU_ON` to be
/// accepted again after the CPU powered itself off.
const START_TIMEOUT_NS: u64 = 2_000_000_000;

/// This CPU's MPIDR affinity.
pub fn read_mpidr() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: reading MPIDR_EL1 has no side effect.
        unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v & crate::dtb::MPIDR_AFFINITY_MASK
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        0
    }
}

/// Starts every CPU the device tree lists, up to `max` CPUs in all (the boot CPU
/// included), and waits for each to check in; each powers itself off afterwards. Logical
/// numbers: 0 for the boot CPU, then the tree's order. Returns how many CPUs are online.
///
/// # Errors
/// An [`SmpError`]: boot fails unless every CPU it starts checks in.
pub fn start_secondaries(info: &BootInfo, max: usize) -> Result<usize, SmpError> {
    let me = read_mpidr();
    let cpus = &info.platform.cpus;
    if !cpus.iter().any(|(m, _)| m == me) {
        return Err(SmpError::BootCpuNotListed(me));
    }
    let boot = &HAL_CPUS[0];
    boot.mpidr.store(me, Ordering::Relaxed);
    boot.seen_mpidr.store(me, Ordering::Release);
    boot.entry_el.store(info.entry_el, Ordering::Release);
    boot.checked_in.store(true, Ordering::Release);
    let mut n = 1;
    for (mpidr, psci) in cpus.iter().filter(|&(m, _)| m != me) {
        if n >= max.min(MAX_CPUS) {
            break;
        }
        if !psci || crate::psci::conduit().is_none() {
            return Err(SmpError::NotPsci(mpidr));
        }
        let data = &HAL_CPUS[n];
        data.mpidr.store(mpidr, Ordering::Relaxed);
        let stacks = CpuStacks::of(&info.image, n).ok_or(SmpError::NoStacks(n))?;
        data.stack_top.store(stacks.stack.end().as_u64(), Ordering::Relaxed);
        data.exception_stack_top.store(stacks.exception_stack.end().as_u64(), Ordering::Relaxed);
        power_on(n, 0, 0)?;
        if !wait_done(n, START_TIMEOUT_NS) || !data.checked_in.load(Ordering::Acquire) {
            return Err(SmpError::NoCheckIn(mpidr));
        }
        n += 1;
    }
    ONLINE.store(n, Ordering::Release);
    Ok(n)
}

/// Starts CPU `n` (whose boot record is filled) with `work(arg, n)` to run, or just to
/// check in when `work` is 0.
fn power_on(n: usize, work: usize, arg: usize) -> Result<(), SmpError> {
    let data = &HAL_CPUS[n];
    for (slot, value) in data.mmu.iter().zip(crate::mmu::arch::current_mmu_registers()) {
        slot.store(value, Ordering::Relaxed);
    }
    data.work_fn.store(work, Ordering::Relaxed);
    data.work_arg.store(arg, Ordering::Relaxed);
    data.work_result.store(0, Ordering::Relaxed);
    data.work_done.store(false, Ordering::Release);
    // The CPU reads its boot record with its MMU (and so its caches) off: the record must
    // be in memory, not only in our cache.
    crate::cpu::clean_dcache_to_poc(data as *const CpuData as u64, core::mem::size_of::<CpuData>() as u64);
    let entry = secondary_entry_address();
    let context = data as *const CpuData as u64;
    let mpidr = data.mpidr.load(Ordering::Relaxed);
    let t0 = crate::cpu::uptime_ns();
    loop {
        match crate::psci::cpu_on(mpidr, entry, context) {
            Ok(()) => return Ok(()),
            // Still on: its last `CPU_OFF` has not completed yet.
            Err(crate::psci::PsciError::AlreadyOn) | Err(crate::psci::PsciError::OnPending)
                if crate::cpu::uptime_ns() - t0 < START_TIMEOUT_NS =>
            {
                core::hint::spin_loop()
            }
            Err(_) => {
                data.work_done.store(true, Ordering::Release);
                return Err(SmpError::CpuOn(mpidr));
            }
        }
    }
}

/// Waits up to `timeout_ns` for CPU `n` to finish its work (a CPU [`run_on_all`] reported
/// [`Outcome::Hung`] may still finish); whether it is idle now.
pub fn wait_idle(n: usize, timeout_ns: u64) -> bool {
    if n >= MAX_CPUS {
        return false;
    }
    let t0 = crate::cpu::uptime_ns();
    // Done, and out of `BUSY`: its idle loop has come round (it turns IDLE just after).
    wait_done(n, timeout_ns) && wait_while_busy(n, timeout_ns.saturating_sub(crate::cpu::uptime_ns() - t0))
}

fn wait_while_busy(n: usize, timeout_ns: u64) -> bool {
    let t0 = crate::cpu::uptime_ns();
    while HAL_CPUS[n].state.load(Ordering::Acquire) == state::BUSY {
        if crate::cpu::uptime_ns() - t0 > timeout_ns {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn wait_done(n: usize, timeout_ns: u64) -> bool {
    let t0 = crate::cpu::uptime_ns();
    while !HAL_CPUS[n].work_done.load(Ordering::Acquire) {
        if crate::cpu::uptime_ns() - t0 > timeout_ns {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn secondary_entry_address() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        unsafe extern "C" {
            fn hal_secondary_entry();
        }
        hal_secondary_entry as *const () as u64
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        0
    }
}

/// What a CPU is doing (`CpuData::state`).
pub mod state {
    /// Powered off (idle before an interrupt controller exists, or switched off).
    pub const OFF: u8 = 0;
    /// In its idle loop, waiting in `wfi` for work or a call.
    pub const IDLE: u8 = 1;
    /// Running work from [`super::run_on_all`].
    pub const BUSY: u8 = 2;
    /// Stopped for good by another CPU's fatal report.
    pub const STOPPED: u8 = 3;
    /// Switching itself off ([`super::cpu_down`]).
    pub const GOING_DOWN: u8 = 4;
}

/// Runs this CPU's mailbox work, if any, inside a catch, and records how it ended.
#[cfg_attr(not(all(target_arch = "aarch64", target_os = "none")), allow(dead_code))]
fn run_mailbox(data: &'static CpuData) {
    let work = data.work_fn.swap(0, Ordering::AcqRel);
    if work != 0 {
        data.state.store(state::BUSY, Ordering::Release);
        // SAFETY: `run_on_all` stores only `fn(usize)` pointers here.
        let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(work) };
        let cpu = data.id();
        // SAFETY: `f` is a plain function (no captures): abandoning it on a failure leaves
        // nothing whose destructor matters.
        let result = unsafe { crate::exception::catch(|| f(cpu)) };
        let code = match result {
            Ok(()) => 1,
            Err(crate::exception::Caught::Panic) => 2,
            Err(crate::exception::Caught::Fault(fault)) => {
                for (slot, v) in data.work_fault.iter().zip([fault.esr, fault.far, fault.elr]) {
                    slot.store(v, Ordering::Relaxed);
                }
                3
            }
        };
        data.work_result.store(code, Ordering::Relaxed);
    }
    data.work_done.store(true, Ordering::Release);
}

/// The Rust side of a secondary CPU's start, MMU and caches on, on its own stacks.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[unsafe(no_mangle)]
extern "C" fn hal_secondary_rust(data: &'static CpuData, entry_el: u64) -> ! {
    crate::cpu::unmask_serror();
    data.seen_mpidr.store(read_mpidr(), Ordering::Relaxed);
    data.entry_el.store(entry_el as u8, Ordering::Relaxed);
    data.starts.fetch_add(1, Ordering::Relaxed);
    data.checked_in.store(true, Ordering::Release);
    match crate::irq::controller() {
        // Interrupts exist: this CPU's part of the controller, the hotplug "up" hooks, then
        // the idle loop (work arrives with an SGI).
        Some(c) => {
            c.init_cpu(data.id());
            for sgi in [crate::irq::SGI_WAKE, crate::irq::SGI_CALL, crate::irq::SGI_STOP] {
                c.enable(sgi);
            }
            run_hooks(data.id(), Step::Up);
            idle_loop(data)
        }
        // No interrupts yet: run the work, then power off (an idle `wfe` would spin).
        None => {
            run_mailbox(data);
            data.state.store(state::OFF, Ordering::Release);
            crate::psci::cpu_off();
            crate::cpu::halt()
        }
    }
}

/// A secondary's life once interrupts exist: work from the mailbox (interrupts open), calls
/// taken as SGIs, [`wait_for_work`] in between; leaves only to switch itself off.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn idle_loop(data: &'static CpuData) -> ! {
    data.state.store(state::IDLE, Ordering::Release);
    loop {
        // Work runs as thread code does once interrupts exist: with IRQs open.
        crate::irq::enable_local();
        run_mailbox(data);
        crate::irq::disable_local();
        if data.down_requested.load(Ordering::Acquire) {
            data.down_requested.store(false, Ordering::Relaxed);
            data.state.store(state::GOING_DOWN, Ordering::Release);
            run_hooks(data.id(), Step::Down);
            crate::irq::disable_local();
            data.state.store(state::OFF, Ordering::Release);
            crate::psci::cpu_off();
            crate::cpu::halt();
        }
        data.state.store(state::IDLE, Ordering::Release);
        wait_for_work(data);
    }
}

/// Sleeps in `wfi` unless work or a down request is already posted, and takes the
/// interrupt that woke it. Called and returns with interrupts masked.
///
/// The check and the `wfi` both run masked: an SGI posted after the check stays pending,
/// and a pending interrupt ends `wfi` whatever the mask. With interrupts open in between,
/// an SGI taken after the check and before the `wfi` would be consumed by its handler and
/// the CPU would sleep through the request it carried (Linux's idle loop masks for the
/// same reason).
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn wait_for_work(data: &CpuData) {
    if data.work_fn.load(Ordering::Acquire) == 0 && !data.down_requested.load(Ordering::Acquire) {
        // SAFETY: waits for an interrupt; no memory effect.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack, preserves_flags)) };
    }
    // The pending interrupt, if any, is taken here.
    crate::irq::enable_local();
    crate::irq::disable_local();
}

/// Starts every online secondary that is powered off into its idle loop, once an
/// interrupt controller is installed; they stay online from then on (woken by SGIs).
///
/// # Errors
/// [`SmpError::CpuOn`] when a CPU does not start.
pub fn start_idle() -> Result<(), SmpError> {
    if crate::irq::controller().is_none() {
        return Ok(());
    }
    crate::irq::register(crate::irq::SGI_WAKE, |_| {}).ok();
    crate::irq::register(crate::irq::SGI_CALL, call_handler).ok();
    crate::irq::register(crate::irq::SGI_STOP, stop_handler).ok();
    for (n, d) in HAL_CPUS.iter().enumerate().take(online_cpus()).skip(1) {
        if d.state.load(Ordering::Acquire) == state::OFF && d.work_done.load(Ordering::Acquire) {
            power_on(n, 0, 0)?;
            wait_state(n, state::IDLE, START_TIMEOUT_NS);
        }
    }
    Ok(())
}

fn wait_state(n: usize, want: u8, timeout_ns: u64) -> bool {
    let t0 = crate::cpu::uptime_ns();
    while HAL_CPUS[n].state.load(Ordering::Acquire) != want {
        if crate::cpu::uptime_ns() - t0 > timeout_ns {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// The state of CPU `n` (see [`state`]).
pub fn cpu_state(n: usize) -> u8 {
    HAL_CPUS.get(n).map_or(state::OFF, |d| d.state.load(Ordering::Acquire))
}

/// How one CPU's share of [`run_on_all`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not run: the CPU is not online, or still busy with work that hung earlier.
    NotRun,
    /// The function returned.
    Returned,
    /// It panicked (the message was printed).
    Panicked,
    /// It took a fault (the report was printed).
    Faulted(Fault),
    /// It did not finish within the timeout (and still runs: the CPU is skipped from now on).
    Hung,
}

/// Runs `f(cpu)` on every online CPU at once, this one included, each inside its own
/// [`crate::exception::catch`], and waits up to `timeout_ns` for the others. `f` is a plain
/// function (shared state lives in statics), so a CPU that hangs holds no reference into
/// this call's frame when it returns. Index `i` of the result is CPU `i`'s outcome.
pub fn run_on_all(f: fn(usize), timeout_ns: u64) -> [Outcome; MAX_CPUS] {
    let me = this_cpu();
    let mut out = [Outcome::NotRun; MAX_CPUS];
    let mut started = [false; MAX_CPUS];
    for n in (0..online_cpus()).filter(|&n| n != me) {
        let d = &HAL_CPUS[n];
        if !d.work_done.load(Ordering::Acquire) {
            continue;
        }
        match (d.state.load(Ordering::Acquire), crate::irq::controller()) {
            // BUSY with its work done: the idle loop is on its way round and looks at the
            // mailbox again before it sleeps.
            (state::IDLE | state::BUSY, Some(c)) => {
                d.work_result.store(0, Ordering::Relaxed);
                d.work_done.store(false, Ordering::Relaxed);
                d.work_fn.store(f as usize, Ordering::Release);
                c.send_sgi(crate::irq::SGI_WAKE, n);
                started[n] = true;
            }
            (state::OFF, _) => started[n] = power_on(n, f as usize, 0).is_ok(),
            _ => {}
        }
    }
    // SAFETY: `f` is a plain function; abandoning it on a failure leaves nothing whose
    // destructor matters (catch nests inside the caller's).
    out[me] = match unsafe { crate::exception::catch(|| f(me)) } {
        Ok(()) => Outcome::Returned,
        Err(crate::exception::Caught::Panic) => Outcome::Panicked,
        Err(crate::exception::Caught::Fault(fault)) => Outcome::Faulted(fault),
    };
    let t0 = crate::cpu::uptime_ns();
    for n in (0..MAX_CPUS).filter(|&n| started[n]) {
        let left = timeout_ns.saturating_sub(crate::cpu::uptime_ns() - t0);
        out[n] = if !wait_done(n, left) {
            Outcome::Hung
        } else {
            let d = &HAL_CPUS[n];
            match d.work_result.load(Ordering::Relaxed) {
                1 => Outcome::Returned,
                2 => Outcome::Panicked,
                _ => {
                    let [esr, far, elr] = [0, 1, 2].map(|i| d.work_fault[i].load(Ordering::Relaxed));
                    Outcome::Faulted(Fault { esr, far, elr })
                }
            }
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_sliced_per_cpu_with_guard_pages() {
        let image = ImageLayout::current();
        assert!(CpuStacks::of(&image, 0).is_none(), "CPU 0 uses the image's boot stacks");
        assert!(CpuStacks::of(&image, MAX_CPUS).is_none());
        let mut last_end = image.cpu_stacks.start();
        for cpu in 1..MAX_CPUS {
            let s = CpuStacks::of(&image, cpu).unwrap();
            assert_eq!(s.stack_guard.start(), last_end, "slots follow each other");
            assert_eq!(s.stack_guard.end(), s.stack.start());
            assert_eq!(s.stack.end(), s.exception_guard.start());
            assert_eq!(s.exception_guard.end(), s.exception_stack.start());
            assert_eq!((s.stack.size(), s.exception_stack.size()), (CPU_STACK_SIZE, CPU_EXCEPTION_STACK_SIZE));
            assert_eq!(
                stack_guard_name(&image, s.stack_guard.start().as_u64()),
                Some(("stack overflow: thread stack", cpu))
            );
            assert_eq!(
                stack_guard_name(&image, s.exception_guard.end().as_u64() - 1),
                Some(("stack overflow: exception stack", cpu))
            );
            assert_eq!(stack_guard_name(&image, s.stack.start().as_u64()), None);
            last_end = s.exception_stack.end();
        }
        assert_eq!(last_end, image.cpu_stacks.end(), "the region holds exactly MAX_CPUS - 1 slots");
    }
}

// --- cross-CPU calls, stopping, hotplug -------------------------------------------------

/// Why a cross-CPU call or a hotplug request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// No interrupt controller: calls travel as SGIs.
    NoInterrupts,
    /// The CPU is not online and idle or busy (off, stopped, out of range, or this CPU).
    NotOnline(usize),
    /// The CPU did not switch off or on within the timeout.
    Timeout(usize),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::NoInterrupts => f.write_str("no interrupt controller"),
            CallError::NotOnline(n) => write!(f, "CPU {n} is not online"),
            CallError::Timeout(n) => write!(f, "CPU {n} did not change state in time"),
        }
    }
}

impl core::error::Error for CallError {}

/// Serialises callers of [`on_cpu`] per target.
static CALL_LOCKS: [core::sync::atomic::AtomicBool; MAX_CPUS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; MAX_CPUS];

fn lock_calls(cpu: usize) {
    while CALL_LOCKS[cpu].compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
}

fn call_thunk<F: Fn() + Sync>(arg: usize) {
    // SAFETY: `on_cpu` stores `&F` as `arg` and waits until the call has run.
    let f = unsafe { &*(arg as *const F) };
    f();
}

/// The SGI_CALL handler: runs this CPU's posted call.
fn call_handler(_intid: u32) {
    let d = this_cpu_data();
    let thunk = d.call_fn.swap(0, Ordering::AcqRel);
    if thunk != 0 {
        // SAFETY: only `call_thunk::<F>` pointers are stored, with their matching argument.
        let thunk: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(thunk) };
        thunk(d.call_arg.load(Ordering::Acquire));
        d.call_done.store(true, Ordering::Release);
    }
}

/// The SGI_STOP handler: this CPU stops for good (another CPU is reporting a fatal error).
fn stop_handler(_intid: u32) {
    this_cpu_data().state.store(state::STOPPED, Ordering::Release);
    crate::cpu::halt()
}

/// Runs `f` on CPU `cpu` (in its interrupt context) and waits for it to finish. The target
/// must be online with interrupts on (idle, or running work that enabled them).
///
/// Call it with interrupts enabled and not from an interrupt handler: two CPUs calling each
/// other with interrupts masked would wait for ever (debug builds assert this).
///
/// # Errors
/// [`CallError::NoInterrupts`] or [`CallError::NotOnline`] (this CPU included: run `f`
/// directly instead).
pub fn on_cpu<F: Fn() + Sync>(cpu: usize, f: &F) -> Result<(), CallError> {
    debug_assert!(!crate::irq::in_interrupt(), "on_cpu from interrupt context");
    debug_assert!(crate::irq::irqs_enabled(), "on_cpu with interrupts masked");
    let c = crate::irq::controller().ok_or(CallError::NoInterrupts)?;
    if cpu == this_cpu() || cpu >= online_cpus() || !matches!(cpu_state(cpu), state::IDLE | state::BUSY) {
        return Err(CallError::NotOnline(cpu));
    }
    lock_calls(cpu);
    // Checked again under the lock: `cpu_down` holds it while the CPU goes off, so a call
    // is never posted to a CPU that will not take it.
    if !matches!(cpu_state(cpu), state::IDLE | state::BUSY) {
        CALL_LOCKS[cpu].store(false, Ordering::Release);
        return Err(CallError::NotOnline(cpu));
    }
    let d = &HAL_CPUS[cpu];
    d.call_done.store(false, Ordering::Relaxed);
    d.call_arg.store(f as *const F as usize, Ordering::Relaxed);
    d.call_fn.store(call_thunk::<F> as fn(usize) as usize, Ordering::Release);
    c.send_sgi(crate::irq::SGI_CALL, cpu);
    // Unbounded on purpose: the target holds `f`, borrowed from this frame, until it is done.
    while !d.call_done.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    CALL_LOCKS[cpu].store(false, Ordering::Release);
    Ok(())
}

/// Runs `f` on every other online CPU (one after another) and waits; returns how many ran it.
///
/// # Errors
/// [`CallError::NoInterrupts`]; CPUs that are not online are skipped.
pub fn on_each_cpu<F: Fn() + Sync>(f: &F) -> Result<usize, CallError> {
    let mut n = 0;
    for cpu in (0..online_cpus()).filter(|&c| c != this_cpu()) {
        match on_cpu(cpu, f) {
            Ok(()) => n += 1,
            Err(CallError::NotOnline(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Stops every other CPU (SGI_STOP) and waits up to `timeout_ns` for each; returns a bit
/// per CPU that did not stop (GICv2 has no NMI: a CPU spinning with interrupts masked never
/// takes the SGI). For fatal reports: takes no lock.
pub fn stop_others(timeout_ns: u64) -> u32 {
    let Some(c) = crate::irq::controller() else { return 0 };
    let me = this_cpu();
    let mut waiting = 0u32;
    for n in (0..online_cpus()).filter(|&n| n != me) {
        if matches!(cpu_state(n), state::IDLE | state::BUSY | state::GOING_DOWN) {
            c.send_sgi(crate::irq::SGI_STOP, n);
            waiting |= 1 << n;
        }
    }
    let t0 = crate::cpu::uptime_ns();
    while waiting != 0 && crate::cpu::uptime_ns() - t0 < timeout_ns {
        for n in 0..MAX_CPUS {
            if waiting & (1 << n) != 0 && matches!(cpu_state(n), state::STOPPED | state::OFF) {
                waiting &= !(1 << n);
            }
        }
        core::hint::spin_loop();
    }
    waiting
}

/// Functions run as a CPU goes off ([`cpu_down`]) and as it comes back up: where per-CPU
/// caches are drained and refilled. After Linux's CPU hotplug states: `down` is a "dying"
/// step (on the CPU itself, interrupts masked, nothing else can run there), `dead` a
/// "dead" step (on the CPU that asked, in its thread context, once the CPU is off).
#[derive(Clone, Copy, Debug)]
pub struct HotplugHooks {
    /// Runs on the CPU going down, interrupts masked, before it switches itself off: for
    /// what only that CPU may touch (its per-CPU lists and caches).
    pub down: fn(cpu: usize),
    /// Runs on the CPU that called [`cpu_down`], in thread context with interrupts as the
    /// caller had them, once `cpu` is off and before `cpu_down` returns: for work that may
    /// take long or take locks never held with interrupts masked (what the CPU left queued
    /// or parked). [`cpu_up`] waits for it to return (other paths that start an off CPU,
    /// [`run_on_all`] and [`start_idle`], do not: a hook must cope with the CPU coming back
    /// meanwhile, as memory's does, whose work is done under locks it shares with that CPU).
    pub dead: fn(cpu: usize),
    /// Runs on the CPU coming up, before its idle loop.
    pub up: fn(cpu: usize),
}

/// A hotplug step, naming which hook [`run_hooks`] calls.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(all(target_arch = "aarch64", target_os = "none")), allow(dead_code))]
enum Step {
    Down,
    Dead,
    Up,
}

static HOOKS: spin::Mutex<[Option<HotplugHooks>; 8]> = spin::Mutex::new([None; 8]);

/// Registers hotplug hooks (up to 8 sets).
///
/// # Errors
/// `Err(hooks)` when all slots are taken.
pub fn register_hotplug(hooks: HotplugHooks) -> Result<(), HotplugHooks> {
    let mut all = HOOKS.lock();
    let slot = all.iter_mut().find(|h| h.is_none()).ok_or(hooks)?;
    *slot = Some(hooks);
    Ok(())
}

#[cfg_attr(not(all(target_arch = "aarch64", target_os = "none")), allow(dead_code))]
fn run_hooks(cpu: usize, step: Step) {
    let hooks = *HOOKS.lock();
    for h in hooks.iter().flatten() {
        match step {
            Step::Down => (h.down)(cpu),
            Step::Dead => (h.dead)(cpu),
            Step::Up => (h.up)(cpu),
        }
    }
}

/// Switches CPU `cpu` off: it runs the hotplug "down" hooks itself and calls PSCI
/// `CPU_OFF`; once `AFFINITY_INFO` reports it off, the caller runs the "dead" hooks
/// ([`HotplugHooks`]) and returns.
///
/// # Errors
/// [`CallError::NotOnline`] unless the CPU is a secondary in its idle loop;
/// [`CallError::Timeout`] when it does not go off within 2 s.
pub fn cpu_down(cpu: usize) -> Result<(), CallError> {
    let c = crate::irq::controller().ok_or(CallError::NoInterrupts)?;
    if cpu == 0 || cpu >= online_cpus() || cpu_state(cpu) != state::IDLE || cpu == this_cpu() {
        return Err(CallError::NotOnline(cpu));
    }
    // No cross-CPU call can be posted while it goes down (and one in flight finishes first).
    lock_calls(cpu);
    let d = &HAL_CPUS[cpu];
    d.down_requested.store(true, Ordering::Release);
    c.send_sgi(crate::irq::SGI_WAKE, cpu);
    let t0 = crate::cpu::uptime_ns();
    let r = loop {
        if d.state.load(Ordering::Acquire) == state::OFF && crate::psci::cpu_is_off(d.mpidr()).unwrap_or(false) {
            break Ok(());
        }
        if crate::cpu::uptime_ns() - t0 > START_TIMEOUT_NS {
            break Err(CallError::Timeout(cpu));
        }
        core::hint::spin_loop();
    };
    if r.is_ok() {
        run_hooks(cpu, Step::Dead);
    }
    CALL_LOCKS[cpu].store(false, Ordering::Release);
    r
}

/// Brings CPU `cpu` back after [`cpu_down`]: `CPU_ON` once `AFFINITY_INFO` reports it off;
/// it sets up its interrupt-controller part, runs the "up" hooks and idles.
///
/// # Errors
/// [`CallError::NotOnline`] unless the CPU is a secondary that checked in at boot and is
/// off; [`CallError::Timeout`] when it does not come up within 2 s.
pub fn cpu_up(cpu: usize) -> Result<(), CallError> {
    crate::irq::controller().ok_or(CallError::NoInterrupts)?;
    if cpu == 0 || cpu >= online_cpus() || cpu_state(cpu) != state::OFF {
        return Err(CallError::NotOnline(cpu));
    }
    // Not while a `cpu_down` of it still runs its "dead" hooks (it holds the call lock).
    lock_calls(cpu);
    let r = power_back_on(cpu);
    CALL_LOCKS[cpu].store(false, Ordering::Release);
    r
}

/// [`cpu_up`]'s work, under the CPU's call lock.
fn power_back_on(cpu: usize) -> Result<(), CallError> {
    let d = &HAL_CPUS[cpu];
    if cpu_state(cpu) != state::OFF {
        return Err(CallError::NotOnline(cpu));
    }
    let t0 = crate::cpu::uptime_ns();
    while !crate::psci::cpu_is_off(d.mpidr()).unwrap_or(false) {
        if crate::cpu::uptime_ns() - t0 > START_TIMEOUT_NS {
            return Err(CallError::Timeout(cpu));
        }
        core::hint::spin_loop();
    }
    power_on(cpu, 0, 0).map_err(|_| CallError::Timeout(cpu))?;
    if wait_state(cpu, state::IDLE, START_TIMEOUT_NS) {
        Ok(())
    } else {
        Err(CallError::Timeout(cpu))
    }
}
