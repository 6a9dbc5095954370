//! PSCI calls through the conduit the device tree names (`/psci` `method`), by the
//! `smccc` crate.

use crate::dtb::Conduit;
use core::sync::atomic::{AtomicU8, Ordering};

/// 0: unknown (no call is made), 1: HVC, 2: SMC.
static CONDUIT: AtomicU8 = AtomicU8::new(0);

/// Records the conduit found in the device tree.
pub fn set_conduit(conduit: Option<Conduit>) {
    let v = match conduit {
        None => 0,
        Some(Conduit::Hvc) => 1,
        Some(Conduit::Smc) => 2,
    };
    CONDUIT.store(v, Ordering::Release);
}

/// The conduit in use, if known.
pub fn conduit() -> Option<Conduit> {
    match CONDUIT.load(Ordering::Acquire) {
        1 => Some(Conduit::Hvc),
        2 => Some(Conduit::Smc),
        _ => None,
    }
}

/// The PSCI version as (major, minor), if a conduit is known and answers.
pub fn version() -> Option<(u16, u16)> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v = match conduit()? {
            Conduit::Hvc => smccc::psci::version::<smccc::Hvc>(),
            Conduit::Smc => smccc::psci::version::<smccc::Smc>(),
        };
        v.ok().map(|v| (v.major, v.minor))
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        None
    }
}

/// Powers the machine off; returns only if there is no conduit or the call fails.
pub fn system_off() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let _ = match conduit() {
            Some(Conduit::Hvc) => smccc::psci::system_off::<smccc::Hvc>(),
            Some(Conduit::Smc) => smccc::psci::system_off::<smccc::Smc>(),
            None => Ok(()),
        };
    }
}

/// Why a PSCI call failed (the PSCI return codes that matter here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciError {
    /// No conduit is known.
    NoConduit,
    /// `ALREADY_ON`: the CPU is still on.
    AlreadyOn,
    /// `ON_PENDING`: a `CPU_ON` for it is in progress.
    OnPending,
    /// Any other failure.
    Other,
}

impl core::fmt::Display for PsciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PsciError::NoConduit => "no PSCI conduit (neither HVC nor SMC) is known",
            PsciError::AlreadyOn => "PSCI: the CPU is already on",
            PsciError::OnPending => "PSCI: a CPU_ON for the CPU is in progress",
            PsciError::Other => "PSCI call failed",
        })
    }
}

impl core::error::Error for PsciError {}

/// `CPU_ON`: starts the CPU with MPIDR affinity `mpidr` at physical address `entry`, MMU
/// off, with `context` in `x0`.
///
/// # Errors
/// A [`PsciError`].
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> Result<(), PsciError> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let r = match conduit().ok_or(PsciError::NoConduit)? {
            Conduit::Hvc => smccc::psci::cpu_on::<smccc::Hvc>(mpidr, entry, context),
            Conduit::Smc => smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, context),
        };
        r.map_err(|e| match e {
            smccc::psci::Error::AlreadyOn => PsciError::AlreadyOn,
            smccc::psci::Error::OnPending => PsciError::OnPending,
            _ => PsciError::Other,
        })
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = (mpidr, entry, context);
        Err(PsciError::NoConduit)
    }
}

/// `CPU_OFF`: powers the calling CPU off; returns only if the call fails.
pub fn cpu_off() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let _ = match conduit() {
            Some(Conduit::Hvc) => smccc::psci::cpu_off::<smccc::Hvc>(),
            Some(Conduit::Smc) => smccc::psci::cpu_off::<smccc::Smc>(),
            None => Ok(()),
        };
    }
}

/// `AFFINITY_INFO` for one CPU (lowest affinity level 0): whether it is on.
///
/// # Errors
/// A [`PsciError`].
pub fn cpu_is_off(mpidr: u64) -> Result<bool, PsciError> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        use smccc::psci::{AffinityState, LowestAffinityLevel};
        let r = match conduit().ok_or(PsciError::NoConduit)? {
            Conduit::Hvc => smccc::psci::affinity_info::<smccc::Hvc>(mpidr, LowestAffinityLevel::All),
            Conduit::Smc => smccc::psci::affinity_info::<smccc::Smc>(mpidr, LowestAffinityLevel::All),
        };
        r.map(|s| s == AffinityState::Off).map_err(|_| PsciError::Other)
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = mpidr;
        Err(PsciError::NoConduit)
    }
}
