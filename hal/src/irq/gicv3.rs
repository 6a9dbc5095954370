//! The GICv3 CPU interface: the `ICC_*_EL1` system registers (a GICv3 driver's
//! acknowledge, EOI, SGI and per-CPU set-up go through these; only `hal` runs `msr`/`mrs`).
//! Names are spelled as `S3_*` encodings, which every assembler accepts.

/// `ICC_SRE_EL1 = SRE | DFB | DIB`: the system-register interface on, legacy bypass off.
/// EL2 must have set `ICC_SRE_EL2.Enable` (boot's `LEAVE_EL2` does, on a GICv3 CPU).
pub fn enable_sre() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: switches this CPU's GIC interface to system registers; no memory effect.
    unsafe {
        core::arch::asm!("msr S3_0_C12_C12_5, {}", "isb", in(reg) 0x7u64, options(nomem, nostack, preserves_flags))
    };
}

/// `ICC_PMR_EL1`: interrupts of priority below (numerically above) `mask` are not signalled.
pub fn set_priority_mask(mask: u8) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: writes the priority mask; no memory effect.
    unsafe {
        core::arch::asm!("msr S3_0_C4_C6_0, {}", in(reg) mask as u64, options(nomem, nostack, preserves_flags))
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = mask;
}

/// `ICC_IGRPEN1_EL1 = 1`: group 1 interrupts signalled to this CPU (as IRQ).
pub fn enable_group1() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: enables signalling; the vectors handle what is taken.
    unsafe {
        core::arch::asm!("msr S3_0_C12_C12_7, {}", "isb", in(reg) 1u64, options(nomem, nostack, preserves_flags))
    };
}

/// `ICC_IAR1_EL1`: acknowledges the highest-priority pending group 1 interrupt.
pub fn acknowledge() -> u32 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: acknowledging changes GIC state only; the caller EOIs what it got.
        unsafe { core::arch::asm!("mrs {}, S3_0_C12_C12_0", out(reg) v, options(nomem, nostack, preserves_flags)) };
        (v & 0xff_ffff) as u32
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        super::SPURIOUS
    }
}

/// `ICC_EOIR1_EL1`: end of interrupt `intid` (priority drop and deactivation).
pub fn end_of_interrupt(intid: u32) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: signals the end of an interrupt this CPU acknowledged.
    unsafe {
        core::arch::asm!("msr S3_0_C12_C12_1, {}", "isb", in(reg) intid as u64, options(nomem, nostack, preserves_flags))
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = intid;
}

/// `ICC_SGI1R_EL1`: SGI `sgi` to the CPU with MPIDR affinity `mpidr` (Aff3.Aff2.Aff1 and
/// one bit of the target list for Aff0 < 16).
pub fn send_sgi(sgi: u32, mpidr: u64) {
    let aff0 = mpidr & 0xf;
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    let v = (aff3 << 48) | (aff2 << 32) | ((sgi as u64 & 0xf) << 24) | (aff1 << 16) | (1 << aff0);
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: generates an SGI; the target's vectors handle it. The `dsb` first makes
    // this CPU's earlier stores visible to the target before the interrupt can be seen.
    unsafe {
        core::arch::asm!("dsb ishst", "msr S3_0_C12_C11_5, {}", "isb", in(reg) v, options(nostack, preserves_flags))
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = v;
}

/// Whether this CPU implements the GICv3 system-register interface
/// (`ID_AA64PFR0_EL1.GIC`).
pub fn cpu_has_sysregs() -> bool {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: reading an ID register has no side effect.
        unsafe { core::arch::asm!("mrs {}, id_aa64pfr0_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
        (v >> 24) & 0xf != 0
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        false
    }
}
