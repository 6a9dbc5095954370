//! # gic — the Arm Generic Interrupt Controller, versions 2 and 3
//!
//! The driver maps the controller's memory-mapped parts with `memory::ioremap::IoMem`
//! (device memory, kept for the program's life) and implements
//! [`hal::irq::InterruptController`]; `hal` keeps dispatch, masking and the GICv3
//! `ICC_*` system registers. [`init`] finds the controller in the device tree, sets up the
//! distributor, installs the driver, and starts the other CPUs' idle loops (each sets up
//! its own part).
//!
//! - **GICv2** (`-machine virt`): distributor (`GICD`) and CPU interface (`GICC`) in MMIO.
//!   SGI and PPI enables and priorities are banked per CPU; an SGI's target is the CPU
//!   interface bit each CPU reads from `GICD_ITARGETSR0` (not its MPIDR). The acknowledge
//!   value of an SGI carries the source CPU, and the EOI writes it back whole.
//! - **GICv3** (`-machine virt,gic-version=3`): distributor with affinity routing,
//!   one redistributor per CPU — found by matching `GICR_TYPER`'s affinity to the CPU's
//!   MPIDR and woken through `GICR_WAKER` — and the system-register CPU interface.
//!
//! Every interrupt is group 1 (signalled as IRQ), priority [`PRIORITY`].
#![no_std]

mod v2;
mod v3;

pub use v2::GicV2;
pub use v3::GicV3;

use core::fmt;
use hal::boot::BootInfo;
use hal::dtb::GicVersion;
use hal::irq::InterruptController;
use memory::ioremap::{IoMem, IoremapError};
use spin::Once;

/// The priority every interrupt gets (lower is more urgent; the CPU's mask is `0xf0`).
pub const PRIORITY: u8 = 0xa0;

/// Why the controller could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicError {
    /// The device tree names no GIC, or not all of its register ranges.
    NoDevice,
    /// Mapping a register range failed.
    Map(IoremapError),
    /// GICv3 without the system-register interface on this CPU.
    NoSysregs,
    /// [`init`] ran already.
    AlreadyInitialized,
    /// The other CPUs could not be started into their idle loops.
    Smp(hal::smp::SmpError),
}

impl fmt::Display for GicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GicError::NoDevice => f.write_str("no usable GIC node in the device tree"),
            GicError::Map(e) => write!(f, "mapping the GIC: {e}"),
            GicError::NoSysregs => f.write_str("GICv3 without the ICC system-register interface"),
            GicError::AlreadyInitialized => f.write_str("the GIC is set up already"),
            GicError::Smp(e) => write!(f, "starting the other CPUs' idle loops: {e}"),
        }
    }
}

impl core::error::Error for GicError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            GicError::Map(e) => Some(e),
            GicError::Smp(e) => Some(e),
            _ => None,
        }
    }
}

/// A register range, mapped for the program's life (its `IoMem` is leaked: the
/// interrupt controller is never given back), read and written by offset.
pub(crate) struct Regs {
    base: usize,
    len: usize,
}

impl Regs {
    fn map(range: hal::PhysRange) -> Result<Self, GicError> {
        let size = usize::try_from(range.size()).map_err(|_| GicError::NoDevice)?;
        // SAFETY: the GIC driver owns the interrupt controller exclusively: its ranges
        // come from the device tree's GIC node and `init` maps them once (`GIC: Once`);
        // nothing else programs the distributor, redistributors or CPU interface (the
        // boot probe only reads two identification registers), and a GIC does no DMA.
        let io = unsafe { IoMem::new(range.start(), size) }.map_err(GicError::Map)?;
        let len = io.len();
        Ok(Self { base: io.leak().as_usize(), len })
    }

    fn ptr(&self, offset: usize, width: usize) -> usize {
        assert!(
            offset.checked_add(width).is_some_and(|end| end <= self.len),
            "GIC register {offset:#x} outside its range"
        );
        self.base + offset
    }

    pub(crate) fn read32(&self, offset: usize) -> u32 {
        let p = self.ptr(offset, 4) as *const u32;
        // SAFETY: `p` is inside the leaked, never-unmapped Device mapping of the GIC's registers
        // (checked above),
        // 4-byte aligned as every GIC register; device reads have no effect on Rust state.
        unsafe { p.read_volatile() }
    }

    pub(crate) fn write32(&self, offset: usize, value: u32) {
        let p = self.ptr(offset, 4) as *mut u32;
        // SAFETY: as in `read32`; writing a GIC register changes interrupt state only.
        unsafe { p.write_volatile(value) }
    }

    pub(crate) fn read64(&self, offset: usize) -> u64 {
        let p = self.ptr(offset, 8) as *const u64;
        // SAFETY: as in `read32`, for the GIC's 64-bit registers (8-byte aligned).
        unsafe { p.read_volatile() }
    }

    pub(crate) fn write8(&self, offset: usize, value: u8) {
        let p = self.ptr(offset, 1) as *mut u8;
        // SAFETY: as in `write32`; the priority and target registers are byte-accessible.
        unsafe { p.write_volatile(value) }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

static GIC: Once<Gic> = Once::new();

/// The installed driver (either version).
enum Gic {
    V2(GicV2),
    V3(GicV3),
}

impl Gic {
    fn controller(&'static self) -> &'static dyn InterruptController {
        match self {
            Gic::V2(g) => g,
            Gic::V3(g) => g,
        }
    }
}

/// Finds the GIC in the device tree, maps and sets up its distributor, installs the
/// driver as `hal`'s interrupt controller (this CPU's part is set up there), and starts
/// the other online CPUs' idle loops. Returns the controller's name.
///
/// # Errors
/// A [`GicError`].
pub fn init(info: &BootInfo) -> Result<&'static str, GicError> {
    if GIC.get().is_some() {
        return Err(GicError::AlreadyInitialized);
    }
    let node = info.platform.gic.ok_or(GicError::NoDevice)?;
    let gic = match node.version {
        GicVersion::V2 => Gic::V2(GicV2::new(&node)?),
        GicVersion::V3 => {
            if !hal::irq::gicv3::cpu_has_sysregs() {
                return Err(GicError::NoSysregs);
            }
            Gic::V3(GicV3::new(&node)?)
        }
    };
    let c = GIC.call_once(|| gic).controller();
    hal::irq::set_controller(c);
    hal::smp::start_idle().map_err(GicError::Smp)?;
    log::info!("{}: interrupts on, {} CPU(s) idle in wfi between work", c.name(), hal::smp::online_cpus());
    Ok(c.name())
}
