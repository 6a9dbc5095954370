//! # hal — the AArch64 hardware layer
//!
//! Everything that touches a system register or an instruction the host lacks lives here,
//! so the `memory` crate above stays architecture-neutral and runs its tests on the host.
//! Only instruction lines are behind `cfg(target_os = "none")`; the logic compiles and is
//! tested on the host.
//!
//! ## Code organisation
//! - [`addr`]: `PhysAddr`, `VirtAddr`, `Pfn` and ranges with checked arithmetic.
//! - [`linear`]: the linear map through which physical memory is reached.
//! - [`mmu`]: descriptors, memory attributes, the 4-level walker, TLB maintenance.
//! - [`boot`]: entry code, the Rust start, [`entry!`] for images; [`kmap`]: the kernel
//!   address space.
//! - [`dtb`], [`cmdline`]: what the device tree and the command line say.
//! - [`console`]: PL011 console and logger; [`exception`]: vectors, fault decoding,
//!   fixups, the fault-report hook, recovery; [`probe`]: touching addresses safely.
//! - [`el2`]: the stub left at EL2 when entered there (it raises a virtual SError for tests).
//! - [`irq`]: the interrupt-controller trait, handlers, dispatch, masks; [`timer`]: the
//!   per-CPU generic timer; [`sync`]: IRQ-safe locks and the lock checks.
//! - [`smp`]: every core — per-CPU data, `PerCpu<T>`, secondary CPUs, running on all.
//! - [`cpu`]: counter and small instructions; [`psci`], [`exit`]: power off and exit status.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod boot;
pub mod cmdline;
pub mod console;
pub mod cpu;
pub mod dtb;
pub mod el2;
pub mod exception;
pub mod exit;
pub mod irq;
pub mod kmap;
pub mod linear;
pub mod mmu;
pub mod probe;
pub mod psci;
pub mod smp;
pub mod sync;
pub mod timer;

pub use addr::{Pfn, PhysAddr, PhysRange, VirtAddr, VirtRange, PAGE_SHIFT, PAGE_SIZE};
