//! # hal — the AArch64 hardware layer
//!
//! Everything that touches a system register or an instruction the host lacks lives here,
//! so the `memory` crate above stays architecture-neutral and runs its tests on the host.
//!
//! ## Code organisation
//! - [`addr`]: `PhysAddr`, `VirtAddr`, `Pfn` and ranges with checked arithmetic.
//! - [`linear`]: the linear map through which physical memory is reached.
//! - [`mmu`]: descriptors, memory attributes, the 4-level walker, TLB maintenance.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod linear;
pub mod mmu;

pub use addr::{PhysAddr, PhysRange, Pfn, VirtAddr, VirtRange, PAGE_SHIFT, PAGE_SIZE};
