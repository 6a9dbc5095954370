//! Exceptions: the trap frame, syndrome decoding, fault fixups, the fault-report hook,
//! recovery points for the test runner, and the fatal report.
//!
//! Three ways a synchronous exception can end:
//! 1. **Fixup** — the faulting instruction is one of the probes in [`crate::probe`]
//!    (listed in the `__ex_table` section): execution resumes at its fixup, which returns
//!    an error. Like Linux's `get_kernel_nofault`.
//! 2. **Recovery** — a [`catch`] is armed (the test runner arms one per test): the fault
//!    is reported, then execution resumes where `catch` was called, which returns `Err`.
//! 3. **Fatal** — the fault is reported (with the explanation of the fault-report hook,
//!    e.g. "guard page of area X") and the machine exits with a failure status.

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
use crate::console::EmergencyConsole;
use core::fmt;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Registers saved on exception entry (layout shared with `asm/vectors.S`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TrapFrame {
    /// General-purpose registers x0..x30.
    pub x: [u64; 31],
    /// The interrupted thread's stack pointer.
    pub sp_el0: u64,
    /// Where execution resumes.
    pub elr: u64,
    /// Saved processor state.
    pub spsr: u64,
    /// Exception syndrome.
    pub esr: u64,
    /// Fault address (meaningful for aborts).
    pub far: u64,
}

/// The decoded exception class of an `ESR_EL1` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass {
    /// EC 0x00: unknown reason (e.g. an undefined instruction).
    Unknown,
    /// EC 0x07: FP/SIMD access trapped.
    FpTrap,
    /// EC 0x0e: illegal execution state.
    IllegalState,
    /// EC 0x15: `svc`.
    Svc,
    /// EC 0x16: `hvc`.
    Hvc,
    /// EC 0x17: `smc`.
    Smc,
    /// EC 0x18: trapped system register access.
    SysReg,
    /// EC 0x20/0x21: instruction abort (lower / same EL).
    InstructionAbort,
    /// EC 0x22: PC alignment fault.
    PcAlignment,
    /// EC 0x24/0x25: data abort (lower / same EL).
    DataAbort,
    /// EC 0x26: SP alignment fault.
    SpAlignment,
    /// EC 0x2f: SError interrupt (an asynchronous abort).
    SError,
    /// EC 0x3c: `brk`.
    Brk,
    /// Any other class (the raw EC).
    Other(u8),
}

impl ExceptionClass {
    /// Decodes the EC field of `esr`.
    pub const fn from_esr(esr: u64) -> Self {
        match ((esr >> 26) & 0x3f) as u8 {
            0x00 => Self::Unknown,
            0x07 => Self::FpTrap,
            0x0e => Self::IllegalState,
            0x15 => Self::Svc,
            0x16 => Self::Hvc,
            0x17 => Self::Smc,
            0x18 => Self::SysReg,
            0x20 | 0x21 => Self::InstructionAbort,
            0x22 => Self::PcAlignment,
            0x24 | 0x25 => Self::DataAbort,
            0x26 => Self::SpAlignment,
            0x2f => Self::SError,
            0x3c => Self::Brk,
            ec => Self::Other(ec),
        }
    }

    /// A short human name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown reason / undefined instruction",
            Self::FpTrap => "FP/SIMD access trap",
            Self::IllegalState => "illegal execution state",
            Self::Svc => "SVC",
            Self::Hvc => "HVC",
            Self::Smc => "SMC",
            Self::SysReg => "system register trap",
            Self::InstructionAbort => "instruction abort",
            Self::PcAlignment => "PC alignment fault",
            Self::DataAbort => "data abort",
            Self::SpAlignment => "SP alignment fault",
            Self::SError => "SError interrupt (asynchronous abort)",
            Self::Brk => "BRK",
            Self::Other(_) => "other",
        }
    }
}

/// The fault status of an abort (ESR ISS bits `[5:0]`), decoded.
pub const fn fault_status_name(esr: u64) -> &'static str {
    match esr & 0x3f {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x08..=0x0b => "access flag fault",
        0x0c..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x21 => "alignment fault",
        0x30 => "TLB conflict abort",
        _ => "other fault status",
    }
}

/// The translation level of an abort's fault status (0..=3), when it has one.
pub const fn fault_level(esr: u64) -> Option<u8> {
    match esr & 0x3f {
        0x00..=0x0f => Some((esr & 3) as u8),
        _ => None,
    }
}

/// What a probe or a recovered fault saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `ESR_EL1` at the fault.
    pub esr: u64,
    /// `FAR_EL1` (the address that faulted, for aborts).
    pub far: u64,
    /// `ELR_EL1` (the faulting instruction).
    pub elr: u64,
}

impl Fault {
    /// The exception class.
    pub const fn class(&self) -> ExceptionClass {
        ExceptionClass::from_esr(self.esr)
    }

    /// Whether this was a write (data aborts only: ISS.WnR).
    pub const fn is_write(&self) -> bool {
        matches!(self.class(), ExceptionClass::DataAbort) && self.esr & (1 << 6) != 0
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = self.class();
        write!(f, "{}", class.name())?;
        if matches!(class, ExceptionClass::DataAbort | ExceptionClass::InstructionAbort) {
            write!(f, " ({}", fault_status_name(self.esr))?;
            if let Some(level) = fault_level(self.esr) {
                write!(f, ", level {level}")?;
            }
            if class == ExceptionClass::DataAbort {
                f.write_str(if self.is_write() { ", write" } else { ", read" })?;
            }
            write!(f, ") at {:#x}", self.far)?;
        }
        if class == ExceptionClass::SError {
            // ISS: IDS (bit 24) = implementation-defined syndrome; else AET [12:10], EA [9]
            // and DFSC [5:0] (0 = uncategorized, 0x11 = asynchronous SError).
            if self.esr & (1 << 24) != 0 {
                write!(f, " (implementation-defined syndrome {:#x})", self.esr & 0xff_ffff)?;
            } else {
                write!(f, " (AET {}, DFSC {:#x})", (self.esr >> 10) & 7, self.esr & 0x3f)?;
            }
        }
        write!(f, ", pc {:#x}, esr {:#x}", self.elr, self.esr)
    }
}

/// A function a higher layer registers to explain a faulting address (e.g. `memory`'s
/// "guard page of area X"). It must not block: it may only try-lock. It writes its
/// explanation and returns `true`, or returns `false` when it knows nothing of `addr`.
pub type FaultExplainer = fn(addr: u64, out: &mut dyn fmt::Write) -> bool;

static EXPLAINER: AtomicUsize = AtomicUsize::new(0);

/// Registers the fault-report hook (replacing any earlier one).
pub fn set_fault_explainer(f: FaultExplainer) {
    EXPLAINER.store(f as usize, Ordering::Release);
}

/// Asks the registered hook to explain `addr`; `false` when there is no hook or it has
/// nothing to say.
pub fn explain(addr: u64, out: &mut dyn fmt::Write) -> bool {
    let raw = EXPLAINER.load(Ordering::Acquire);
    if raw == 0 {
        return false;
    }
    // SAFETY: the only non-zero values stored are `FaultExplainer` function pointers
    // (`set_fault_explainer`), and fn pointers round-trip through usize on AArch64.
    let f: FaultExplainer = unsafe { core::mem::transmute::<usize, FaultExplainer>(raw) };
    f(addr, out)
}

/// Named ranges checked in fault reports (e.g. stack guard pages): `(start, end, name)`.
static GUARD_REGIONS: spin::Mutex<[(u64, u64, &'static str); 4]> = spin::Mutex::new([(0, 0, ""); 4]);

/// Names a range whose touch means something specific, e.g. a stack's guard page:
/// a fault there is reported as `name` ("stack overflow").
pub fn register_guard_region(start: u64, end: u64, name: &'static str) {
    let mut regions = GUARD_REGIONS.lock();
    if let Some(slot) = regions.iter_mut().find(|r| r.0 == r.1) {
        *slot = (start, end, name);
    }
}

fn guard_region_name(addr: u64, out: &mut dyn fmt::Write) -> bool {
    if let Some((name, cpu)) = crate::boot::boot_info().and_then(|i| crate::smp::stack_guard_name(&i.image, addr)) {
        let _ = write!(out, "{name} of CPU {cpu}");
        return true;
    }
    let Some(regions) = GUARD_REGIONS.try_lock() else { return false };
    match regions.iter().find(|r| addr >= r.0 && addr < r.1) {
        Some(r) => {
            let _ = out.write_str(r.2);
            true
        }
        None => false,
    }
}

/// The fault the last failing probe absorbed on this CPU.
pub fn last_probe_fault() -> Fault {
    let f = &crate::smp::this_cpu_data().probe_fault;
    Fault { esr: f[0].load(Ordering::Acquire), far: f[1].load(Ordering::Acquire), elr: f[2].load(Ordering::Acquire) }
}

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn record_probe_fault(frame: &TrapFrame) {
    let f = &crate::smp::this_cpu_data().probe_fault;
    f[0].store(frame.esr, Ordering::Release);
    f[1].store(frame.far, Ordering::Release);
    f[2].store(frame.elr, Ordering::Release);
}

/// Arms (`addr`) or disarms (0) this CPU's exec probe: an instruction abort at `addr`
/// resumes at the probe's fixup.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub(crate) fn arm_exec_probe(addr: usize) {
    crate::smp::this_cpu_data().exec_probe_armed.store(addr, Ordering::Release);
}

/// Spurious translation faults retried on this CPU: the entry was valid by the time the
/// handler looked, because another CPU had just published it.
pub fn spurious_faults() -> u64 {
    crate::smp::this_cpu_data().spurious_faults()
}

/// A function run at the start of every synchronous abort's handling, before the
/// spurious-fault check (0: none).
static ABORT_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs (or, with `None`, removes) a function the handler calls with the fault address
/// at the start of every data or instruction abort, before it checks whether the fault is
/// spurious. Tests use it to publish a translation "from another CPU" at the exact moment
/// between the walk that faulted and the handler's look.
///
/// # Safety
/// The hook runs in exception context: it must not fault, block, or take a lock the
/// interrupted code may hold.
pub unsafe fn set_abort_hook(hook: Option<fn(u64)>) {
    ABORT_HOOK.store(hook.map_or(0, |f| f as usize), Ordering::Release);
}

/// Saved callee-saved state of a [`catch`] (layout shared with `asm/probe.S` up to
/// `daif`), and the catch it nests in.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[repr(C)]
struct CatchContext {
    regs: [u64; 10], // x19..x28
    fp: [u64; 8],    // d8..d15
    sp: u64,
    /// DAIF at the catch point: recovery resumes with these masks.
    daif: u64,
    /// The enclosing catch of this CPU (null: none).
    prev: *mut CatchContext,
}

/// How many faults and panics were recovered by [`catch`], all CPUs together.
static RECOVERED: AtomicU64 = AtomicU64::new(0);

/// Why a [`catch`] did not return normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caught {
    /// The function panicked (the panic message was printed).
    Panic,
    /// The function took a fatal exception (the report was printed).
    Fault(Fault),
}

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
unsafe extern "C" {
    fn hal_catch_call(ctx: *mut CatchContext, f: extern "C" fn(*mut u8), arg: *mut u8) -> u64;
    fn hal_catch_longjmp(ctx: *const CatchContext) -> !;
    fn hal_probe_exec_fixup();
    static __ex_table_start: [u64; 0];
    static __ex_table_end: [u64; 0];
}

/// Runs `f`; if it panics or takes a fatal exception, the report is printed and `catch`
/// returns `Err` instead of the machine stopping. Catches nest, per CPU: a failure returns
/// to the innermost `catch` of the CPU it happened on, which resumes with the interrupt
/// masks it had when it was entered.
///
/// Locks `f` held when it failed stay held: use this to keep a test suite going, not as
/// an error-handling mechanism.
///
/// # Safety
/// A failure longjmps over `f`'s frames without running their destructors, which Rust
/// does not allow in general: `f` must not rely on a destructor running (no pinned data,
/// no guard whose drop is needed for soundness). For test harnesses.
pub unsafe fn catch<F: FnOnce()>(f: F) -> Result<(), Caught> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        extern "C" fn trampoline<F: FnOnce()>(arg: *mut u8) {
            // SAFETY: `arg` is the `Option<F>` on `catch`'s stack, alive for this call.
            let slot = unsafe { &mut *(arg as *mut Option<F>) };
            if let Some(f) = slot.take() {
                f();
            }
        }
        let cpu = crate::smp::this_cpu_data();
        let prev = cpu.catch.load(Ordering::Acquire) as *mut CatchContext;
        let mut ctx = CatchContext { regs: [0; 10], fp: [0; 8], sp: 0, daif: 0, prev };
        cpu.recovered_valid.store(false, Ordering::Relaxed);
        cpu.catch.store(&mut ctx as *mut CatchContext as *mut u8, Ordering::Release);
        let mut slot = Some(f);
        // SAFETY: `ctx` outlives the call and is only jumped to while this CPU's catch
        // points at it; the trampoline's argument is `slot`, of the type it expects.
        let r = unsafe { hal_catch_call(&mut ctx, trampoline::<F>, &mut slot as *mut Option<F> as *mut u8) };
        // On a recovery the handler already popped `ctx`; either way the enclosing catch
        // is the innermost again.
        cpu.catch.store(prev as *mut u8, Ordering::Release);
        if r == 0 {
            Ok(())
        } else {
            // A longjmp skipped F's destructors (its captures may leak), as a panic=abort
            // world must accept.
            core::mem::forget(slot);
            if cpu.recovered_valid.swap(false, Ordering::AcqRel) {
                let [esr, far, elr] = [0, 1, 2].map(|i| cpu.recovered_fault[i].load(Ordering::Relaxed));
                Err(Caught::Fault(Fault { esr, far, elr }))
            } else {
                Err(Caught::Panic)
            }
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        f();
        Ok(())
    }
}

/// Pops this CPU's innermost catch context (null: none armed).
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn pop_catch() -> *mut CatchContext {
    let cpu = crate::smp::this_cpu_data();
    let ctx = cpu.catch.load(Ordering::Acquire) as *mut CatchContext;
    if !ctx.is_null() {
        // SAFETY: a non-null pointer here was armed by a `catch` frame still on this CPU's
        // stack (it restores the enclosing one before it returns).
        let prev = unsafe { (*ctx).prev };
        cpu.catch.store(prev as *mut u8, Ordering::Release);
        RECOVERED.fetch_add(1, Ordering::Relaxed);
    }
    ctx
}

/// Called by the panic handler: if a [`catch`] is armed on this CPU, return to it (never
/// returns); otherwise returns so the caller can stop the machine.
pub fn recover_from_panic() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        // A panic inside an exception handler runs on SP_EL1: a longjmp from there would
        // leave thread code on the exception stack. Stop instead.
        let spsel: u64;
        // SAFETY: reading SPSel has no side effect.
        unsafe { core::arch::asm!("mrs {}, spsel", out(reg) spsel, options(nomem, nostack)) };
        if spsel & 1 != 0 {
            return;
        }
        let ctx = pop_catch();
        if !ctx.is_null() {
            // SAFETY: `ctx` was armed by a `catch` frame that is still on the stack below
            // us, so its saved registers are valid; its DAIF is restored as it was.
            unsafe {
                let daif = (*ctx).daif;
                core::arch::asm!("msr daif, {}", in(reg) daif, options(nomem, nostack));
                hal_catch_longjmp(ctx)
            }
        }
    }
}

/// Faults and panics recovered by [`catch`] since boot.
pub fn recovered_count() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn fixup_for(pc: u64) -> Option<u64> {
    // SAFETY: link.ld brackets the __ex_table section (pairs of u64) with these symbols.
    let table = unsafe {
        let start = __ex_table_start.as_ptr();
        let end = __ex_table_end.as_ptr();
        core::slice::from_raw_parts(start, (end as usize - start as usize) / 8)
    };
    table.chunks_exact(2).find(|e| e[0] == pc).map(|e| e[1])
}

const KIND_NAMES: [&str; 6] = ["synchronous", "IRQ", "FIQ", "SError", "from lower EL", "from AArch32"];

/// Prints the full report of an exception to the emergency console.
///
/// The fault-report hook is asked to explain the address unless `hooks` is false (a fault
/// inside a handler is reported without it: the hook may be what faulted).
pub fn report(frame: &TrapFrame, kind: u64, out: &mut dyn fmt::Write, hooks: bool) {
    let fault = Fault { esr: frame.esr, far: frame.far, elr: frame.elr };
    let kind_name = KIND_NAMES.get(kind as usize).copied().unwrap_or("?");
    let _ = writeln!(out, "\n*** EXCEPTION ({kind_name}) on CPU {}: {fault}", crate::smp::this_cpu());
    if matches!(fault.class(), ExceptionClass::DataAbort | ExceptionClass::InstructionAbort) {
        let _ = write!(out, "*** ");
        if guard_region_name(frame.far, out) {
            let _ = writeln!(out, " (fault address {:#x} is in its guard page)", frame.far);
        } else {
            if !(hooks && explain(frame.far, out)) {
                let _ = write!(out, "no owner known for {:#x}", frame.far);
            }
            let _ = writeln!(out);
        }
    }
    let _ = writeln!(out, "    ELR {:#018x}  SPSR {:#010x}  SP_EL0 {:#018x}", frame.elr, frame.spsr, frame.sp_el0);
    for row in 0..8 {
        for col in 0..4 {
            let i = row * 4 + col;
            if i < 31 {
                let _ = write!(out, "    x{i:<2} {:#018x}", frame.x[i]);
            }
        }
        let _ = writeln!(out);
    }
}

/// Whether a translation fault at `far` is spurious: the address translates now (`AT
/// S1E1R`), because another CPU published the entry after our walk missed it, as Linux's
/// `is_spurious_el1_translation_fault`. Such a fault is retried and counted.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn is_spurious_translation_fault(frame: &TrapFrame) -> bool {
    let class = ExceptionClass::from_esr(frame.esr);
    // Same-EL aborts (EC 0x21 / 0x25), translation faults (DFSC 0b0001xx) only.
    let same_el = matches!((frame.esr >> 26) & 0x3f, 0x21 | 0x25);
    if !same_el
        || !matches!(class, ExceptionClass::DataAbort | ExceptionClass::InstructionAbort)
        || frame.esr & 0x3c != 0x04
    {
        return false;
    }
    let par: u64;
    // SAFETY: AT only writes PAR_EL1, which nothing else relies on across this handler.
    unsafe {
        core::arch::asm!("at s1e1r, {va}", "isb", "mrs {par}, par_el1", va = in(reg) frame.far, par = out(reg) par, options(nostack))
    };
    if par & 1 == 0 {
        return true;
    }
    // A fault of another kind now (a permission fault, say): the entry changed under us, so
    // the translation fault itself was transient; retrying reports the real one.
    let fst = (par >> 1) & 0x3f;
    fst & 0x3c != 0x04
}

/// Rust side of every exception from thread context (`asm/vectors.S`).
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[unsafe(no_mangle)]
extern "C" fn hal_trap(frame: &mut TrapFrame, kind: u64) {
    if kind == 1 {
        crate::irq::handle();
        return;
    }
    let cpu = crate::smp::this_cpu_data();
    if kind == 0 {
        let class = ExceptionClass::from_esr(frame.esr);
        if matches!(class, ExceptionClass::DataAbort | ExceptionClass::InstructionAbort) {
            let hook = ABORT_HOOK.load(Ordering::Acquire);
            if hook != 0 {
                // SAFETY: only `fn(u64)` pointers are stored (`set_abort_hook`), whose
                // caller promised they are safe to run here.
                let hook: fn(u64) = unsafe { core::mem::transmute::<usize, fn(u64)>(hook) };
                hook(frame.far);
            }
            if is_spurious_translation_fault(frame) {
                cpu.spurious_faults.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Some(fixup) = fixup_for(frame.elr) {
            record_probe_fault(frame);
            frame.elr = fixup;
            return;
        }
        // Only the abort at the probed address itself: anything else is a real fault.
        let armed = cpu.exec_probe_armed.load(Ordering::Acquire) as u64;
        if class == ExceptionClass::InstructionAbort && armed != 0 && frame.elr == armed {
            record_probe_fault(frame);
            frame.elr = hal_probe_exec_fixup as *const () as u64;
            return;
        }
    }
    let ctx = pop_catch();
    if ctx.is_null() {
        // Fatal: stop the other CPUs first (100 ms at most), then report whatever they do.
        let stuck = crate::smp::stop_others(100_000_000);
        report_on_console(frame, kind, true);
        report_stuck(stuck);
        let _ = writeln!(EmergencyConsole, "*** fatal: stopping (CPU {})", cpu.id());
        crate::exit::exit(crate::exit::EXIT_FAULT);
    }
    report_on_console(frame, kind, true);
    {
        for (slot, v) in cpu.recovered_fault.iter().zip([frame.esr, frame.far, frame.elr]) {
            slot.store(v, Ordering::Relaxed);
        }
        cpu.recovered_valid.store(true, Ordering::Release);
        // Resume in hal_catch_longjmp(ctx) at EL1 on SP_EL0, with the interrupt masks the
        // catch point had.
        frame.x[0] = ctx as u64;
        frame.elr = hal_catch_longjmp as *const () as u64;
        // SAFETY: `ctx` was armed by a `catch` frame still on this CPU's stack.
        frame.spsr = (unsafe { (*ctx).daif } & 0x3c0) | 0x4;
    }
}

/// Names the CPUs [`crate::smp::stop_others`] could not stop (bit `n`: CPU `n`).
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub(crate) fn report_stuck(stuck: u32) {
    if stuck != 0 {
        let _ = write!(EmergencyConsole, "*** CPUs that did not stop within 100 ms (interrupts masked?):");
        for n in (0..32).filter(|n| stuck & (1 << n) != 0) {
            let _ = write!(EmergencyConsole, " {n}");
        }
        let _ = writeln!(EmergencyConsole);
    }
}

/// Prints the report of `frame` whole: under the console lock when this CPU can have it
/// (other CPUs' lines do not cut into it), else on the emergency path.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn report_on_console(frame: &TrapFrame, kind: u64, hooks: bool) {
    match crate::console::lock_for_report() {
        Some(mut guard) => report(frame, kind, &mut guard, hooks),
        None => report(frame, kind, &mut EmergencyConsole, hooks),
    }
}

/// Rust side of an exception taken while already handling one: report and stop.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[unsafe(no_mangle)]
extern "C" fn hal_trap_nested(frame: &mut TrapFrame, kind: u64) -> ! {
    // A fault while reporting this one (the console itself, say) must not loop: the second
    // time round, stop at once.
    if crate::smp::this_cpu_data().nested.swap(true, Ordering::AcqRel) {
        crate::exit::exit(crate::exit::EXIT_FAULT);
    }
    let _ = writeln!(EmergencyConsole, "\n*** EXCEPTION INSIDE AN EXCEPTION HANDLER (exception stack reset)");
    report(frame, kind, &mut EmergencyConsole, false);
    crate::exit::exit(crate::exit::EXIT_FAULT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_translation_fault_write() {
        // EC 0x25 (data abort, same EL), WnR, DFSC 0x07 (translation fault, level 3).
        let esr = (0x25 << 26) | (1 << 25) | (1 << 6) | 0x07;
        let f = Fault { esr, far: 0xdead_0000, elr: 0x4020_0000 };
        assert_eq!(f.class(), ExceptionClass::DataAbort);
        assert!(f.is_write());
        let text = format!("{f}");
        assert!(text.contains("translation fault, level 3, write) at 0xdead0000"), "{text}");
    }

    #[test]
    fn serror_is_named_with_its_syndrome() {
        let f = Fault { esr: (0x2f << 26) | (1 << 25), far: 0, elr: 0x4020_0000 };
        assert_eq!(f.class(), ExceptionClass::SError);
        let text = format!("{f}");
        assert!(text.starts_with("SError interrupt (asynchronous abort) (AET 0, DFSC 0x0)"), "{text}");
        let ids = Fault { esr: (0x2f << 26) | (1 << 24) | 0x1234, ..f };
        assert!(format!("{ids}").contains("implementation-defined syndrome 0x1234"), "{ids}");
    }

    #[test]
    fn permission_fault_and_unknown() {
        let esr = (0x21 << 26) | 0x0f;
        assert_eq!(ExceptionClass::from_esr(esr), ExceptionClass::InstructionAbort);
        assert_eq!(fault_status_name(esr), "permission fault");
        assert_eq!(ExceptionClass::from_esr(0), ExceptionClass::Unknown);
    }
}
