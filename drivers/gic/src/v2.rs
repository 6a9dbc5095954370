//! GICv2: distributor and CPU interface, both memory-mapped.

use crate::{GicError, Regs, PRIORITY};
use core::sync::atomic::{AtomicU8, Ordering};
use hal::dtb::{GicNode, MAX_CPUS};
use hal::irq::{Ack, InterruptController};

const GICD_CTLR: usize = 0x000;
const GICD_TYPER: usize = 0x004;
const GICD_ISENABLER: usize = 0x100;
const GICD_ICENABLER: usize = 0x180;
const GICD_IPRIORITYR: usize = 0x400;
const GICD_ITARGETSR: usize = 0x800;
const GICD_SGIR: usize = 0xf00;
const GICC_CTLR: usize = 0x000;
const GICC_PMR: usize = 0x004;
const GICC_BPR: usize = 0x008;
const GICC_IAR: usize = 0x00c;
const GICC_EOIR: usize = 0x010;

/// A GICv2: `GICD` and `GICC` mapped.
pub struct GicV2 {
    gicd: Regs,
    gicc: Regs,
    lines: u32,
    /// Each CPU's CPU-interface bit, as it read `GICD_ITARGETSR0` itself (0: not yet).
    targets: [AtomicU8; MAX_CPUS],
}

impl GicV2 {
    /// Maps the distributor (`reg` 0) and CPU interface (`reg` 1) and sets up the
    /// distributor: SPIs disabled, priority [`PRIORITY`], routed to CPU 0; then enabled.
    ///
    /// # Errors
    /// [`GicError::NoDevice`] without both ranges, or a mapping error.
    pub(crate) fn new(node: &GicNode) -> Result<Self, GicError> {
        let gicd = Regs::map(node.regs[0].ok_or(GicError::NoDevice)?)?;
        let gicc = Regs::map(node.regs[1].ok_or(GicError::NoDevice)?)?;
        let lines = (32 * ((gicd.read32(GICD_TYPER) & 0x1f) + 1)).min(1020);
        gicd.write32(GICD_CTLR, 0);
        for i in (32..lines).step_by(32) {
            gicd.write32(GICD_ICENABLER + i as usize / 8, u32::MAX);
        }
        for i in 32..lines as usize {
            gicd.write8(GICD_IPRIORITYR + i, PRIORITY);
            gicd.write8(GICD_ITARGETSR + i, 1);
        }
        gicd.write32(GICD_CTLR, 1);
        Ok(Self { gicd, gicc, lines, targets: [const { AtomicU8::new(0) }; MAX_CPUS] })
    }

    /// Interrupt lines the distributor implements.
    pub fn lines(&self) -> u32 {
        self.lines
    }
}

impl InterruptController for GicV2 {
    fn name(&self) -> &'static str {
        "GICv2"
    }

    fn init_cpu(&self, cpu: usize) {
        // GICD_ITARGETSR0..7 read back this CPU's own interface bit (banked).
        let mine = self.gicd.read32(GICD_ITARGETSR) as u8;
        if let Some(t) = self.targets.get(cpu) {
            t.store(mine, Ordering::Release);
        }
        // Banked SGI/PPI state: PPIs off until enabled, every one at our priority.
        self.gicd.write32(GICD_ICENABLER, 0xffff_0000);
        for i in 0..32 {
            self.gicd.write8(GICD_IPRIORITYR + i, PRIORITY);
        }
        self.gicc.write32(GICC_PMR, 0xf0);
        self.gicc.write32(GICC_BPR, 0);
        self.gicc.write32(GICC_CTLR, 1);
    }

    fn enable(&self, intid: u32) {
        if intid < self.lines {
            self.gicd.write32(GICD_ISENABLER + (intid as usize / 32) * 4, 1 << (intid % 32));
        }
    }

    fn disable(&self, intid: u32) {
        if intid < self.lines {
            self.gicd.write32(GICD_ICENABLER + (intid as usize / 32) * 4, 1 << (intid % 32));
        }
    }

    fn acknowledge(&self) -> Ack {
        let raw = self.gicc.read32(GICC_IAR);
        Ack { intid: raw & 0x3ff, raw }
    }

    fn end_of_interrupt(&self, ack: Ack) {
        // The whole IAR value: for an SGI it names the source CPU too.
        self.gicc.write32(GICC_EOIR, ack.raw);
    }

    fn send_sgi(&self, sgi: u32, cpu: usize) {
        let target = match self.targets.get(cpu).map(|t| t.load(Ordering::Acquire)) {
            Some(t) if t != 0 => t,
            _ => 1 << (cpu % 8),
        };
        // Make this CPU's stores visible before the target can take the interrupt.
        hal::cpu::dsb_ishst();
        self.gicd.write32(GICD_SGIR, (u32::from(target) << 16) | (sgi & 0xf));
    }
}

impl core::fmt::Debug for GicV2 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GicV2").field("lines", &self.lines).field("gicd_len", &self.gicd.len()).finish()
    }
}
