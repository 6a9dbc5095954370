//! The kernel address space built at boot (placeholder until the MMU layer lands: the
//! image runs with the MMU off).

use crate::boot::BootInfo;

/// Builds the kernel tables and turns the MMU on.
pub fn init(_info: &BootInfo) {}
