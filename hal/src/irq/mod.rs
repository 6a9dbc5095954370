//! Interrupts: the controller behind a trait, handler registration, dispatch and EOI,
//! local masking, and whether the CPU is in interrupt context.
//!
//! `hal` never depends on `memory`, so the GIC's memory-mapped parts (distributor, GICv2
//! CPU interface, GICv3 redistributors) are mapped by a driver outside `hal`
//! (`drivers/gic`, through `memory::ioremap::IoMem`) that implements
//! [`InterruptController`] and registers itself with [`set_controller`]. Dispatch, the
//! per-CPU masks and the GICv3 `ICC_*` system registers ([`gicv3`]) stay here.
//!
//! An IRQ is taken on the exception stack with IRQ and FIQ masked (no nesting):
//! `handle` acknowledges, runs the registered handler, and signals end of interrupt;
//! INTID 1023 (spurious) gets no EOI.

pub mod gicv3;

use crate::dtb::MAX_CPUS;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use spin::Once;

/// INTIDs below this are SGIs (0–15), PPIs (16–31) and SPIs (32–1019).
pub const NR_INTIDS: usize = 1020;
/// The spurious INTID an acknowledge returns when nothing is pending.
pub const SPURIOUS: u32 = 1023;
/// SGI that wakes an idle CPU to look at its mailbox ([`crate::smp::run_on_all`]).
pub const SGI_WAKE: u32 = 0;
/// SGI that runs a cross-CPU call ([`crate::smp::on_cpu`]).
pub const SGI_CALL: u32 = 1;
/// SGI that stops a CPU for good (a fatal report on another CPU).
pub const SGI_STOP: u32 = 2;

/// What a GIC driver provides. Methods that act on "this CPU" run on the CPU concerned.
pub trait InterruptController: Sync {
    /// "GICv2" or "GICv3".
    fn name(&self) -> &'static str;
    /// Sets up this CPU's part: GICv2 its banked SGI/PPI configuration and CPU interface,
    /// GICv3 its redistributor (found by affinity, woken through `GICR_WAKER`) and CPU
    /// interface registers. Called on every CPU, and again after each `CPU_ON`.
    fn init_cpu(&self, cpu: usize);
    /// Enables `intid`: an SGI or PPI on this CPU only (they are banked), an SPI for all.
    fn enable(&self, intid: u32);
    /// Disables `intid` (as [`InterruptController::enable`]).
    fn disable(&self, intid: u32);
    /// Acknowledges the highest-priority pending interrupt ([`SPURIOUS`] when none).
    fn acknowledge(&self) -> Ack;
    /// Signals the end of the handling of what [`InterruptController::acknowledge`] gave.
    fn end_of_interrupt(&self, ack: Ack);
    /// Sends SGI `sgi` to logical CPU `cpu`.
    fn send_sgi(&self, sgi: u32, cpu: usize);
}

/// What an acknowledge returned: the INTID, and the raw register value the EOI must write
/// back (a GICv2 SGI's carries its source CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The interrupt's ID.
    pub intid: u32,
    /// The acknowledge register as read.
    pub raw: u32,
}

static CONTROLLER: Once<&'static dyn InterruptController> = Once::new();

/// Installs the interrupt controller (once; later calls are ignored) and sets up the
/// calling CPU's part. The other CPUs set up theirs when they next start
/// ([`crate::smp::start_idle`]).
pub fn set_controller(c: &'static dyn InterruptController) {
    let c = *CONTROLLER.call_once(|| c);
    c.init_cpu(crate::smp::this_cpu());
    for sgi in [SGI_WAKE, SGI_CALL, SGI_STOP] {
        c.enable(sgi);
    }
}

/// The controller, once installed.
pub fn controller() -> Option<&'static dyn InterruptController> {
    CONTROLLER.get().copied()
}

/// A function called with the INTID it handles, in interrupt context (IRQ and FIQ
/// masked, on the exception stack). It must not block on anything thread code may hold
/// with interrupts enabled: take only IRQ-safe locks ([`crate::sync::IrqSpinLock`]).
pub type Handler = fn(intid: u32);

static HANDLERS: [AtomicUsize; NR_INTIDS] = [const { AtomicUsize::new(0) }; NR_INTIDS];
static UNHANDLED: AtomicU64 = AtomicU64::new(0);
static SPURIOUS_COUNT: AtomicU64 = AtomicU64::new(0);
/// Interrupts handled per CPU.
static HANDLED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Why a handler could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// The INTID is not an SGI, PPI or SPI.
    BadIntid(u32),
    /// A handler is registered for it already.
    Busy(u32),
    /// No interrupt controller is installed.
    NoController,
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IrqError::BadIntid(i) => write!(f, "INTID {i} is not an SGI, PPI or SPI"),
            IrqError::Busy(i) => write!(f, "INTID {i} has a handler already"),
            IrqError::NoController => f.write_str("no interrupt controller installed"),
        }
    }
}

impl core::error::Error for IrqError {}

/// Registers `handler` for `intid` (one handler per INTID, shared by all CPUs: a PPI's
/// handler runs on whichever CPU took it).
///
/// # Errors
/// [`IrqError::BadIntid`] or [`IrqError::Busy`].
pub fn register(intid: u32, handler: Handler) -> Result<(), IrqError> {
    let slot = HANDLERS.get(intid as usize).ok_or(IrqError::BadIntid(intid))?;
    slot.compare_exchange(0, handler as usize, Ordering::AcqRel, Ordering::Acquire)
        .map_err(|_| IrqError::Busy(intid))?;
    Ok(())
}

/// Removes `intid`'s handler (a later interrupt on it is counted as unhandled).
pub fn unregister(intid: u32) {
    if let Some(slot) = HANDLERS.get(intid as usize) {
        slot.store(0, Ordering::Release);
    }
}

/// Handles one IRQ exception: acknowledge, handler, EOI, until the controller answers
/// spurious. Called by the vectors.
#[cfg_attr(not(all(target_arch = "aarch64", target_os = "none")), allow(dead_code))]
pub(crate) fn handle() {
    let Some(c) = controller() else {
        SPURIOUS_COUNT.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let cpu = crate::smp::this_cpu_data();
    cpu.irq_depth.fetch_add(1, Ordering::Relaxed);
    loop {
        let ack = c.acknowledge();
        let intid = ack.intid;
        if intid as usize >= NR_INTIDS {
            if intid == SPURIOUS {
                SPURIOUS_COUNT.fetch_add(1, Ordering::Relaxed);
            }
            break;
        }
        match HANDLERS[intid as usize].load(Ordering::Acquire) {
            0 => {
                UNHANDLED.fetch_add(1, Ordering::Relaxed);
            }
            h => {
                // SAFETY: only `Handler` pointers are stored (`register`).
                let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
                h(intid);
            }
        }
        HANDLED[cpu.id()].fetch_add(1, Ordering::Relaxed);
        c.end_of_interrupt(ack);
    }
    cpu.irq_depth.fetch_sub(1, Ordering::Relaxed);
}

/// Where the interrupted code was (`ELR_EL1`), for a handler that samples it (a profiler's
/// timer tick). Meaningful only inside an interrupt handler that has taken no exception of
/// its own yet (a fault or a nested interrupt would overwrite the register); 0 on the host.
#[inline]
pub fn interrupted_pc() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: reading ELR_EL1 has no side effect.
        unsafe { core::arch::asm!("mrs {}, elr_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        0
    }
}

/// Interrupts handled on CPU `cpu` since boot.
pub fn handled(cpu: usize) -> u64 {
    HANDLED.get(cpu).map_or(0, |h| h.load(Ordering::Relaxed))
}

/// Interrupts that arrived with no handler registered, and spurious acknowledges.
pub fn unhandled_and_spurious() -> (u64, u64) {
    (UNHANDLED.load(Ordering::Relaxed), SPURIOUS_COUNT.load(Ordering::Relaxed))
}

/// Whether this CPU is handling an interrupt now.
#[inline]
pub fn in_interrupt() -> bool {
    crate::smp::this_cpu_data().irq_depth.load(Ordering::Relaxed) > 0
}

/// Whether IRQs are unmasked on this CPU.
#[inline]
pub fn irqs_enabled() -> bool {
    crate::cpu::daif() & (1 << 7) == 0
}

/// Unmasks IRQs on this CPU (FIQ stays masked: the GIC signals group 1 as IRQ).
pub fn enable_local() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: lets pending IRQs be taken; the vectors handle them.
    unsafe {
        core::arch::asm!("msr daifclr, #2", options(nomem, nostack, preserves_flags))
    };
}

/// Masks IRQs on this CPU.
pub fn disable_local() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: masking interrupts has no memory effect.
    unsafe {
        core::arch::asm!("msr daifset, #2", options(nomem, nostack, preserves_flags))
    };
}

/// IRQ and FIQ masked on this CPU until the guard drops, then as they were (Linux's
/// `local_irq_save`/`local_irq_restore`).
pub struct IrqGuard {
    saved: u64,
}

impl IrqGuard {
    /// Masks IRQ and FIQ, remembering the previous state.
    pub fn new() -> Self {
        Self { saved: crate::cpu::mask_interrupts() }
    }
}

impl Default for IrqGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for IrqGuard {
    fn drop(&mut self) {
        crate::cpu::restore_interrupts(self.saved);
    }
}
