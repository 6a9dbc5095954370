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
    n < MAX_CPUS && wait_done(n, timeout_ns)
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

/// The Rust side of a secondary CPU's start, MMU and caches on, on its own stacks.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[unsafe(no_mangle)]
extern "C" fn hal_secondary_rust(data: &'static CpuData, entry_el: u64) -> ! {
    crate::cpu::unmask_serror();
    data.seen_mpidr.store(read_mpidr(), Ordering::Relaxed);
    data.entry_el.store(entry_el as u8, Ordering::Relaxed);
    data.starts.fetch_add(1, Ordering::Relaxed);
    data.checked_in.store(true, Ordering::Release);
    let work = data.work_fn.load(Ordering::Acquire);
    if work != 0 {
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
    crate::psci::cpu_off();
    // CPU_OFF does not return; if it did, wait here for ever.
    crate::cpu::halt()
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
        if HAL_CPUS[n].work_done.load(Ordering::Acquire) && power_on(n, f as usize, 0).is_ok() {
            started[n] = true;
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
