//! The interrupt controller and the generic timer's interrupts, as the device tree gives
//! them.

use crate::addr::{PhysAddr, PhysRange};
use flat_device_tree::Fdt;

/// Which GIC architecture the tree names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicVersion {
    /// GICv2 (`arm,cortex-a15-gic`, `arm,gic-400`): distributor and a memory-mapped CPU
    /// interface.
    V2,
    /// GICv3 (`arm,gic-v3`): distributor, redistributors, system-register CPU interface.
    V3,
}

/// The GIC node: its version and its `reg` ranges in order (GICv2: distributor, CPU
/// interface, …; GICv3: distributor, then the redistributor regions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicNode {
    /// The architecture version.
    pub version: GicVersion,
    /// `reg`, in order (at most four ranges kept; further ones are virtualization frames).
    pub regs: [Option<PhysRange>; 4],
}

impl GicNode {
    pub(super) fn parse(fdt: &Fdt<'_>) -> Option<Self> {
        let (node, version) = match fdt.find_compatible(&["arm,gic-v3"]) {
            Some(n) => (n, GicVersion::V3),
            None => (fdt.find_compatible(&["arm,cortex-a15-gic", "arm,gic-400"])?, GicVersion::V2),
        };
        let mut regs = [None; 4];
        for (slot, r) in regs.iter_mut().zip(node.reg()) {
            *slot = PhysRange::new(PhysAddr::new(r.starting_address as u64), r.size? as u64).ok();
        }
        regs[0]?;
        Some(Self { version, regs })
    }

    /// The distributor (`reg` 0).
    pub fn distributor(&self) -> Option<PhysRange> {
        self.regs[0]
    }
}

/// The generic timer's per-CPU interrupts (`arm,armv8-timer`): `interrupts` lists the
/// secure physical, non-secure physical, virtual and hypervisor timers, each as a PPI.
/// Returns the INTID (16 + PPI number) of the virtual timer, which this kernel uses.
pub(super) fn virtual_timer_intid(fdt: &Fdt<'_>) -> Option<u32> {
    let node = fdt.find_compatible(&["arm,armv8-timer"])?;
    let p = node.property("interrupts")?;
    // Three cells each: type (1 = PPI), number, flags. The virtual timer is the third.
    let cell = |i: usize| p.value.get(i * 4..i * 4 + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let (kind, number) = (cell(6)?, cell(7)?);
    (kind == 1).then_some(16 + number)
}
