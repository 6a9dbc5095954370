//! The CPUs the device tree lists (`/cpus/cpu@N`): their MPIDR affinity (`reg`) and how
//! they are started (`enable-method`).

use core::fmt;
use flat_device_tree::Fdt;

/// How many CPUs boot brings up (QEMU virt's GICv2 limit; `-smp` up to 8). Further CPUs
/// the tree lists stay off, and boot says so.
pub const MAX_CPUS: usize = 8;

/// The MPIDR_EL1 bits that name a CPU (Aff3 in 39:32, Aff2..Aff0 in 23:0), as `reg` gives
/// them.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The CPUs of the tree, in its order.
#[derive(Clone, Copy)]
pub struct CpuList {
    mpidr: [u64; MAX_CPUS],
    psci: [bool; MAX_CPUS],
    len: usize,
    /// CPUs listed beyond [`MAX_CPUS`].
    pub beyond: usize,
}

impl CpuList {
    /// No CPU.
    pub const fn new() -> Self {
        Self { mpidr: [0; MAX_CPUS], psci: [false; MAX_CPUS], len: 0, beyond: 0 }
    }

    /// Reads `/cpus`: every `device_type = "cpu"` child (disabled ones skipped).
    pub(super) fn parse(fdt: &Fdt<'_>) -> Self {
        let mut list = Self::new();
        for cpu in fdt.cpus() {
            if super::status_disabled(cpu.property("status")) {
                continue;
            }
            let Ok(mpidr) = cpu.ids().and_then(|ids| ids.first()) else { continue };
            let psci = cpu.property("enable-method").and_then(|p| p.as_str()) == Some("psci");
            if list.len < MAX_CPUS {
                list.mpidr[list.len] = mpidr as u64 & MPIDR_AFFINITY_MASK;
                list.psci[list.len] = psci;
                list.len += 1;
            } else {
                list.beyond += 1;
            }
        }
        list
    }

    /// `(mpidr, started through PSCI)` of each CPU, in the tree's order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, bool)> + '_ {
        self.mpidr[..self.len].iter().copied().zip(self.psci[..self.len].iter().copied())
    }

    /// How many CPUs are kept.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree lists none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for CpuList {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|(m, _)| m)).finish()
    }
}
