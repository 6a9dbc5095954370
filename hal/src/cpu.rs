//! Small wrappers over system registers and instructions used by the rest of `hal`.
//!
//! Only the instruction lines are behind `cfg(target_os = "none")`: on the host each
//! function answers a harmless constant, so code above compiles and tests everywhere.

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTVCT_EL0, ID_AA64MMFR0_EL1};

/// The virtual counter (`CNTVCT_EL0`), in ticks of [`counter_frequency`].
#[inline(always)]
pub fn counter() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        // An isb first so the read is not speculated ahead of the code being timed.
        aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
        CNTVCT_EL0.get()
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        0
    }
}

/// The counter frequency in Hz (`CNTFRQ_EL0`; 62.5 MHz on QEMU virt).
pub fn counter_frequency() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        match CNTFRQ_EL0.get() {
            0 => 62_500_000,
            f => f,
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        62_500_000
    }
}

/// Converts counter ticks to nanoseconds without overflow for any uptime below 200 years.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let f = counter_frequency();
    ((ticks as u128 * 1_000_000_000) / f as u128) as u64
}

/// Nanoseconds since the counter started (roughly, since the machine was reset).
pub fn uptime_ns() -> u64 {
    ticks_to_ns(counter())
}

/// Bits of physical address the CPU implements (`ID_AA64MMFR0_EL1.PARange`: 32 to 52),
/// capped at 48, what a descriptor of the 4 KiB granule holds without LPA2 (and what
/// `TCR_EL1.IPS` is set to). An access above it takes an address size fault, so mapping such
/// an address is refused before it is made. The host answers 48.
///
/// # Example
/// ```
/// assert!((32..=48).contains(&hal::cpu::phys_addr_bits()));
/// ```
pub fn phys_addr_bits() -> u32 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        match ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange) {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            _ => 48,
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        48
    }
}

/// `PSTATE.DAIF`: bit 9 D (debug), 8 A (SError), 7 I (IRQ), 6 F (FIQ); a set bit masks.
pub fn daif() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let v: u64;
        // SAFETY: reading DAIF has no side effect.
        unsafe { core::arch::asm!("mrs {}, daif", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        0x3c0
    }
}

/// The `PSTATE.A` bit of [`daif`]: SError masked.
pub const DAIF_A: u64 = 1 << 8;

/// Unmasks SError (asynchronous aborts) on this CPU: one pending is taken at once and
/// reported through the vectors. Boot calls this once the vectors and the console are up.
pub fn unmask_serror() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: clearing PSTATE.A only lets an SError be taken; the vectors are installed
    // (entry.S sets VBAR_EL1 before any Rust code runs) and report it.
    unsafe {
        core::arch::asm!("msr daifclr, #4", "isb", options(nomem, nostack, preserves_flags))
    };
}

/// Masks IRQ and FIQ on this CPU and returns the previous `DAIF`, for
/// [`restore_interrupts`].
pub fn mask_interrupts() -> u64 {
    let saved = daif();
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: masking interrupts has no effect on memory; `restore_interrupts` undoes it.
    unsafe {
        core::arch::asm!("msr daifset, #3", options(nomem, nostack, preserves_flags))
    };
    saved
}

/// Puts back the IRQ and FIQ masks [`mask_interrupts`] returned (A and D untouched).
pub fn restore_interrupts(saved: u64) {
    // I and F separately: FIQ stays masked in this kernel while IRQs come and go.
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        if saved & 0x80 == 0 {
            // SAFETY: unmasking IRQ, which was unmasked before `mask_interrupts`.
            unsafe { core::arch::asm!("msr daifclr, #2", options(nomem, nostack, preserves_flags)) };
        }
        if saved & 0x40 == 0 {
            // SAFETY: unmasking FIQ, which was unmasked before `mask_interrupts`.
            unsafe { core::arch::asm!("msr daifclr, #1", options(nomem, nostack, preserves_flags)) };
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = saved;
}

/// Cleans `len` bytes at `addr` from the data caches to the point of coherency (`dc cvac`,
/// then `dsb sy`): for memory another CPU reads with its caches off.
pub fn clean_dcache_to_poc(addr: u64, len: u64) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let ctr: u64;
        // SAFETY: reading CTR_EL0 has no side effect.
        unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
        let line = 4u64 << ((ctr >> 16) & 0xf);
        let mut a = addr & !(line - 1);
        while a < addr + len {
            // SAFETY: cleaning a line writes its data back; memory contents do not change.
            unsafe { core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack, preserves_flags)) };
            a += line;
        }
        // SAFETY: a barrier.
        unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = (addr, len);
}

/// `dsb ishst`: this CPU's earlier stores are visible to the inner shareable domain before
/// any later instruction executes (before an SGI is sent, say).
pub fn dsb_ishst() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: a barrier.
    unsafe {
        core::arch::asm!("dsb ishst", options(nostack, preserves_flags))
    };
}

/// Waits for an event forever: the end of the line when nothing else can be done.
pub fn halt() -> ! {
    loop {
        #[cfg(all(target_arch = "aarch64", target_os = "none"))]
        aarch64_cpu::asm::wfe();
        #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
        core::hint::spin_loop();
    }
}

/// Zeroes the page at `p` with pairs of 8-byte stores of the zero register, 64 bytes per
/// iteration. Under QEMU TCG this takes 0.41 µs a page, against 0.93 µs for `write_bytes`
/// (compiler-builtins' memset, one 8-byte store per instruction) and 0.91 µs for `DC ZVA`
/// (a helper call per 64-byte block, [`zero_page_zva`]), as the firmware's
/// `test_vmalloc.profile=1` measures; on hardware, plain stores of whole lines are as fast
/// as a memset.
///
/// # Safety
/// `p` is page aligned and the whole page is writable memory the caller owns.
#[inline]
pub unsafe fn zero_page(p: *mut u8) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: forwarded from the caller; the loop writes exactly the page's bytes from `p`
    // (PAGE_SIZE / 64 iterations of 64 bytes) and touches no other memory or register.
    unsafe {
        core::arch::asm!(
            "2:",
            "stp xzr, xzr, [{p}]",
            "stp xzr, xzr, [{p}, #16]",
            "stp xzr, xzr, [{p}, #32]",
            "stp xzr, xzr, [{p}, #48]",
            "add {p}, {p}, #64",
            "subs {n}, {n}, #1",
            "b.ne 2b",
            p = inout(reg) p => _,
            n = inout(reg) crate::PAGE_SIZE / 64 => _,
            options(nostack)
        );
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    // SAFETY: forwarded from the caller: the page is ours to write.
    unsafe {
        core::ptr::write_bytes(p, 0, crate::PAGE_SIZE);
    }
}

/// Zeroes one page with `DC ZVA` (the instruction Linux's `clear_page` uses on arm64), or
/// with plain stores where `DCZID_EL0` forbids it; for comparing with [`zero_page`].
///
/// # Safety
/// `p` is a whole, page-aligned page of RAM the caller owns.
pub unsafe fn zero_page_zva(p: *mut u8) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let dczid: u64;
        // SAFETY: reading DCZID_EL0 has no side effect.
        unsafe { core::arch::asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack)) };
        if dczid & 16 != 0 {
            // SAFETY: as below, with plain stores.
            unsafe { core::ptr::write_bytes(p, 0, crate::PAGE_SIZE) };
            return;
        }
        let block = 4usize << (dczid & 15);
        let mut off = 0;
        while off < crate::PAGE_SIZE {
            // SAFETY: `p` is a whole page of RAM the caller owns, page aligned, so every
            // block-aligned block inside it is ours to zero.
            unsafe { core::arch::asm!("dc zva, {}", in(reg) p.wrapping_add(off), options(nostack)) };
            off += block;
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    // SAFETY: as above.
    unsafe {
        core::ptr::write_bytes(p, 0, crate::PAGE_SIZE)
    };
}
