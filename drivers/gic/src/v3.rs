//! GICv3: distributor with affinity routing, one redistributor per CPU, and the
//! system-register CPU interface (`hal::irq::gicv3`).

use crate::{GicError, Regs, PRIORITY};
use core::sync::atomic::{AtomicUsize, Ordering};
use hal::dtb::{GicNode, MAX_CPUS};
use hal::irq::{gicv3, Ack, InterruptController};

const GICD_CTLR: usize = 0x0000;
const GICD_TYPER: usize = 0x0004;
const GICD_IGROUPR: usize = 0x0080;
const GICD_ISENABLER: usize = 0x0100;
const GICD_ICENABLER: usize = 0x0180;
const GICD_IPRIORITYR: usize = 0x0400;
/// `GICD_CTLR`: RWP, register write pending.
const CTLR_RWP: u32 = 1 << 31;
/// `GICD_CTLR`: ARE (affinity routing) and both group enables.
const CTLR_ARE_G1_G0: u32 = (1 << 4) | (1 << 1) | 1;
const GICR_TYPER: usize = 0x0008;
const GICR_WAKER: usize = 0x0014;
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// The SGI/PPI frame follows each redistributor's control frame.
const SGI_FRAME: usize = 0x1_0000;
const GICR_IGROUPR0: usize = SGI_FRAME + 0x080;
const GICR_ISENABLER0: usize = SGI_FRAME + 0x100;
const GICR_ICENABLER0: usize = SGI_FRAME + 0x180;
const GICR_IPRIORITYR: usize = SGI_FRAME + 0x400;

/// A GICv3: distributor and the redistributor region mapped.
pub struct GicV3 {
    gicd: Regs,
    gicr: Regs,
    lines: u32,
    /// Each CPU's redistributor offset in the region, plus one (0: not found yet).
    rd: [AtomicUsize; MAX_CPUS],
}

impl GicV3 {
    /// Maps the distributor (`reg` 0) and the first redistributor region (`reg` 1), and
    /// sets up the distributor: affinity routing, SPIs group 1, disabled, priority
    /// [`PRIORITY`]; then enabled.
    ///
    /// # Errors
    /// [`GicError::NoDevice`] without both ranges, or a mapping error.
    pub(crate) fn new(node: &GicNode) -> Result<Self, GicError> {
        let gicd = Regs::map(node.regs[0].ok_or(GicError::NoDevice)?)?;
        let gicr = Regs::map(node.regs[1].ok_or(GicError::NoDevice)?)?;
        let lines = (32 * ((gicd.read32(GICD_TYPER) & 0x1f) + 1)).min(1020);
        let g = Self { gicd, gicr, lines, rd: [const { AtomicUsize::new(0) }; MAX_CPUS] };
        g.gicd.write32(GICD_CTLR, 0);
        g.wait_rwp();
        for i in (32..lines).step_by(32) {
            g.gicd.write32(GICD_IGROUPR + i as usize / 8, u32::MAX);
            g.gicd.write32(GICD_ICENABLER + i as usize / 8, u32::MAX);
        }
        for i in 32..lines as usize {
            g.gicd.write8(GICD_IPRIORITYR + i, PRIORITY);
        }
        g.wait_rwp();
        g.gicd.write32(GICD_CTLR, CTLR_ARE_G1_G0);
        g.wait_rwp();
        Ok(g)
    }

    fn wait_rwp(&self) {
        while self.gicd.read32(GICD_CTLR) & CTLR_RWP != 0 {
            core::hint::spin_loop();
        }
    }

    /// The redistributor whose `GICR_TYPER` affinity is `mpidr`'s: its offset.
    fn find_rd(&self, mpidr: u64) -> Option<usize> {
        let want = ((mpidr >> 8) & 0xff00_0000) | (mpidr & 0xff_ffff);
        let mut off = 0;
        while off + 2 * SGI_FRAME <= self.gicr.len() {
            let typer = self.gicr.read64(off + GICR_TYPER);
            if (typer >> 32) == want {
                return Some(off);
            }
            if typer & (1 << 4) != 0 {
                return None; // Last
            }
            // GICv4 redistributors have two more frames (VLPIS, bit 1).
            off += if typer & (1 << 1) != 0 { 4 * SGI_FRAME } else { 2 * SGI_FRAME };
        }
        None
    }

    fn rd_of_this_cpu(&self) -> Option<usize> {
        self.rd.get(hal::smp::this_cpu()).map(|r| r.load(Ordering::Acquire)).filter(|&r| r != 0).map(|r| r - 1)
    }

    /// Interrupt lines the distributor implements.
    pub fn lines(&self) -> u32 {
        self.lines
    }
}

impl InterruptController for GicV3 {
    fn name(&self) -> &'static str {
        "GICv3"
    }

    fn init_cpu(&self, cpu: usize) {
        let Some(rd) = self.find_rd(hal::smp::read_mpidr()) else {
            log::error!("GICv3: no redistributor for CPU {cpu} (MPIDR {:#x})", hal::smp::read_mpidr());
            return;
        };
        if let Some(slot) = self.rd.get(cpu) {
            slot.store(rd + 1, Ordering::Release);
        }
        // Wake the redistributor: ProcessorSleep off, then wait for ChildrenAsleep to clear.
        let waker = self.gicr.read32(rd + GICR_WAKER);
        self.gicr.write32(rd + GICR_WAKER, waker & !WAKER_PROCESSOR_SLEEP);
        while self.gicr.read32(rd + GICR_WAKER) & WAKER_CHILDREN_ASLEEP != 0 {
            core::hint::spin_loop();
        }
        self.gicr.write32(rd + GICR_IGROUPR0, u32::MAX);
        self.gicr.write32(rd + GICR_ICENABLER0, 0xffff_0000);
        for i in 0..32 {
            self.gicr.write8(rd + GICR_IPRIORITYR + i, PRIORITY);
        }
        gicv3::enable_sre();
        gicv3::set_priority_mask(0xf0);
        gicv3::enable_group1();
    }

    fn enable(&self, intid: u32) {
        if intid < 32 {
            if let Some(rd) = self.rd_of_this_cpu() {
                self.gicr.write32(rd + GICR_ISENABLER0, 1 << intid);
            }
        } else if intid < self.lines {
            self.gicd.write32(GICD_ISENABLER + (intid as usize / 32) * 4, 1 << (intid % 32));
        }
    }

    fn disable(&self, intid: u32) {
        if intid < 32 {
            if let Some(rd) = self.rd_of_this_cpu() {
                self.gicr.write32(rd + GICR_ICENABLER0, 1 << intid);
            }
        } else if intid < self.lines {
            self.gicd.write32(GICD_ICENABLER + (intid as usize / 32) * 4, 1 << (intid % 32));
        }
    }

    fn acknowledge(&self) -> Ack {
        let raw = gicv3::acknowledge();
        Ack { intid: raw, raw }
    }

    fn end_of_interrupt(&self, ack: Ack) {
        gicv3::end_of_interrupt(ack.raw);
    }

    fn send_sgi(&self, sgi: u32, cpu: usize) {
        if let Some(d) = hal::smp::cpu_data(cpu) {
            gicv3::send_sgi(sgi, d.mpidr());
        }
    }
}

impl core::fmt::Debug for GicV3 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GicV3").field("lines", &self.lines).field("gicr_len", &self.gicr.len()).finish()
    }
}
