//! The per-CPU generic timer: the EL1 virtual timer (`CNTV_*_EL0`), whose interrupt is a
//! PPI ([`crate::dtb::Platform::timer_intid`], 27 on QEMU virt). Each CPU has its own
//! comparator; a periodic tick re-arms with `CVAL += period`, so a late handler does not
//! drift: the count stays elapsed / period.

/// The virtual count now (`CNTVCT_EL0`).
pub fn now() -> u64 {
    crate::cpu::counter()
}

/// Counter ticks per second (`CNTFRQ_EL0`).
pub fn frequency() -> u64 {
    crate::cpu::counter_frequency()
}

/// Arms this CPU's virtual timer to fire when the count reaches `deadline`, interrupt
/// unmasked at the timer (`CNTV_CTL_EL0 = ENABLE`).
pub fn arm_at(deadline: u64) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: programs this CPU's own timer; no memory effect.
    unsafe {
        core::arch::asm!(
            "msr cntv_cval_el0, {cval}",
            "msr cntv_ctl_el0, {ctl}",
            "isb",
            cval = in(reg) deadline,
            ctl = in(reg) 1u64,
            options(nomem, nostack, preserves_flags)
        )
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = deadline;
}

/// The deadline this CPU's timer is armed for (`CNTV_CVAL_EL0`).
pub fn deadline() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: reading the comparator has no side effect.
        unsafe { core::arch::asm!("mrs {}, cntv_cval_el0", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        0
    }
}

/// Whether this CPU's timer condition is met (`CNTV_CTL_EL0.ISTATUS`): a handler checks it,
/// as Linux's does, since an interrupt already re-armed past may still be delivered once.
pub fn fired() -> bool {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: reading the control register has no side effect.
        unsafe { core::arch::asm!("mrs {}, cntv_ctl_el0", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v & 0b101 == 0b101
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        false
    }
}

/// Stops this CPU's virtual timer (`CNTV_CTL_EL0 = IMASK`, disabled).
pub fn stop() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: programs this CPU's own timer; no memory effect.
    unsafe {
        core::arch::asm!("msr cntv_ctl_el0, {}", "isb", in(reg) 2u64, options(nomem, nostack, preserves_flags))
    };
}
