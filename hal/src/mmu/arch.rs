//! The instructions behind the MMU layer: barriers, TLB invalidation, and turning the MMU on.
//!
//! Only the `asm!` lines are conditional (`target_arch = "aarch64"` *and* `target_os = "none"`,
//! so a host test on an AArch64 Linux machine does not execute EL1 instructions at EL0): on
//! the host the same functions run their logic and skip the instruction (a compiler fence
//! stands in for a barrier), so everything that calls them is tested there.
//!
//! No `asm!` here is marked `nomem`, so the compiler also treats each as a full compiler
//! barrier: no descriptor store is moved across a barrier or a TLBI.

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
use core::arch::asm;
use core::sync::atomic::{compiler_fence, Ordering};

use aarch64_cpu::registers::{ID_AA64MMFR0_EL1, SCTLR_EL1, TCR_EL1};

use super::attr::mair_el1;
use super::table::{PageTable, VaRange, VA_BITS};
use super::MmuError;

/// Make a zeroed table page visible to other observers (table walks, other cores) before the
/// descriptor that points at it: `dmb ishst`.
pub(crate) fn publish_new_table() {
    compiler_fence(Ordering::SeqCst);
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: a barrier; it touches no memory the compiler tracks.
    unsafe {
        asm!("dmb ishst", options(nostack, preserves_flags))
    };
}

/// Make descriptor writes visible to table walks, and this core's later instructions see
/// them: `dsb ishst; isb`. Without it a new mapping may fault (spuriously) when first used.
#[inline]
pub(crate) fn publish_descriptors() {
    dsb_ishst();
    isb();
}

/// `dsb ishst`: every earlier store (descriptor writes) is complete for the inner shareable
/// domain before any later instruction — in particular a TLBI — is executed.
#[inline]
pub(crate) fn dsb_ishst() {
    compiler_fence(Ordering::SeqCst);
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: a barrier; it changes no state the program relies on.
    unsafe {
        asm!("dsb ishst", options(nostack, preserves_flags))
    };
}

/// `dsb ish`: wait until every earlier TLBI has completed on every core of the inner
/// shareable domain (and every earlier memory access is complete).
pub(crate) fn dsb_ish() {
    compiler_fence(Ordering::SeqCst);
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: a barrier.
    unsafe {
        asm!("dsb ish", options(nostack, preserves_flags))
    };
}

/// `isb`: later instructions on this core are fetched and translated afresh.
#[inline]
pub(crate) fn isb() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: a context synchronisation; no memory effect.
    unsafe {
        asm!("isb", options(nostack, preserves_flags))
    };
    compiler_fence(Ordering::SeqCst);
}

/// Test-only switch: when set, the broadcast TLBIs below issue their local forms instead
/// (`vaale1`, `vaae1`, `vmalle1`), so other cores keep stale entries. It exists so the
/// cross-core TLB test can show that it fails without broadcast maintenance; nothing else
/// may set it.
static LOCAL_TLBI_FOR_TEST: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Test-only: makes the broadcast TLBIs of this module issue their local forms (`vaale1`,
/// `vaae1`, `vmalle1`) while `local` is set, so other cores keep stale entries; returns the
/// previous setting. It exists so the cross-core TLB test can show that it fails without
/// broadcast maintenance.
///
/// # Safety
/// While set, a translation another core cached survives its unmapping: the caller must
/// be a test that touches only memory it owns on other cores and clears the switch again.
pub unsafe fn set_local_tlbi_for_test(local: bool) -> bool {
    LOCAL_TLBI_FOR_TEST.swap(local, Ordering::SeqCst)
}

fn local_for_test() -> bool {
    LOCAL_TLBI_FOR_TEST.load(Ordering::Relaxed)
}

/// `tlbi vaale1is`: the *last-level* (leaf) entry translating `va`, any ASID, every core of
/// the inner shareable domain. Walk caches are untouched. Does not wait for completion.
pub(crate) fn tlbi_vaale1is(va: u64) {
    let operand = tlbi_operand(va);
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: TLB maintenance removes cached translations only; the next access walks the
    // tables again.
    unsafe {
        if local_for_test() {
            asm!("tlbi vaale1, {0}", in(reg) operand, options(nostack, preserves_flags))
        } else {
            asm!("tlbi vaale1is, {0}", in(reg) operand, options(nostack, preserves_flags))
        }
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = (operand, local_for_test());
}

/// `tlbi vaae1is`: every level's entry used to translate `va` — the leaf and the table
/// entries cached in walk caches — any ASID, every core of the inner shareable domain.
/// Does not wait for completion.
pub(crate) fn tlbi_vaae1is(va: u64) {
    let operand = tlbi_operand(va);
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: as in `tlbi_vaale1is`.
    unsafe {
        if local_for_test() {
            asm!("tlbi vaae1, {0}", in(reg) operand, options(nostack, preserves_flags))
        } else {
            asm!("tlbi vaae1is, {0}", in(reg) operand, options(nostack, preserves_flags))
        }
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = operand;
}

/// The register operand of a TLBI by VA: VA[55:12] in bits 43:0 (ASID and TTL fields zero).
const fn tlbi_operand(va: u64) -> u64 {
    (va >> 12) & ((1 << 44) - 1)
}

/// `tlbi vmalle1is`: every EL1&0 entry, walk caches included, on every core of the inner
/// shareable domain. Does not wait for completion.
pub(crate) fn tlbi_vmalle1is() {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: as in `tlbi_vaale1is`.
    unsafe {
        if local_for_test() {
            asm!("tlbi vmalle1", options(nostack, preserves_flags))
        } else {
            asm!("tlbi vmalle1is", options(nostack, preserves_flags))
        }
    };
}

/// `ID_AA64MMFR0_EL1.TGran4` value meaning "4 KiB granule not implemented".
const TGRAN4_NOT_SUPPORTED: u64 = 0b1111;

/// The `TCR_EL1` value for our layout, given the CPU's `ID_AA64MMFR0_EL1`:
/// 48-bit VAs in both halves (`T0SZ = T1SZ = 16`), 4 KiB granules, table walks inner
/// shareable and write-back cacheable, `IPS` = the CPU's physical range capped at 48 bits
/// (the most a descriptor holds), 8-bit ASIDs from `TTBR0`, no top-byte ignore. Walks
/// through `TTBR1` are disabled when there is no upper tree.
///
/// # Errors
/// [`MmuError::GranuleUnsupported`] when `TGran4` reads `0b1111`. (`0b0001` means 4 KiB
/// *with* 52-bit addresses, still supported.)
pub fn tcr_el1(id_aa64mmfr0: u64, upper: bool) -> Result<u64, MmuError> {
    let mmfr0 = tock_registers::LocalRegisterCopy::<u64, ID_AA64MMFR0_EL1::Register>::new(id_aa64mmfr0);
    if mmfr0.read(ID_AA64MMFR0_EL1::TGran4) == TGRAN4_NOT_SUPPORTED {
        return Err(MmuError::GranuleUnsupported);
    }
    // PARange and IPS share encodings 0 (32 bits) to 5 (48 bits).
    let ips = mmfr0.read(ID_AA64MMFR0_EL1::PARange).min(0b101);
    let t_sz = 64 - u64::from(VA_BITS);
    let walks1 = if upper { TCR_EL1::EPD1::EnableTTBR1Walks } else { TCR_EL1::EPD1::DisableTTBR1Walks };
    Ok((TCR_EL1::T0SZ.val(t_sz)
        + TCR_EL1::T1SZ.val(t_sz)
        + TCR_EL1::TG0::KiB_4
        + TCR_EL1::TG1::KiB_4
        + TCR_EL1::SH0::Inner
        + TCR_EL1::SH1::Inner
        + TCR_EL1::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL1::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL1::IRGN1::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL1::ORGN1::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL1::EPD0::EnableTTBR0Walks
        + walks1
        + TCR_EL1::A1::TTBR0
        + TCR_EL1::IPS.val(ips))
    .value)
}

/// The `SCTLR_EL1` bits [`enable`] sets: MMU on, data and instruction caches on, and
/// `WXN` (any writable page is also execute-never: W^X enforced by the hardware too).
pub fn sctlr_el1_enable_bits() -> u64 {
    (SCTLR_EL1::M::Enable + SCTLR_EL1::C::Cacheable + SCTLR_EL1::I::Cacheable + SCTLR_EL1::WXN::Enable).value
}

fn read_id_aa64mmfr0() -> u64 {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    let value: u64 = {
        let v;
        // SAFETY: reading an ID register has no side effect.
        unsafe { asm!("mrs {0}, id_aa64mmfr0_el1", out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    };
    // Off target, a Cortex-A72: 4 KiB granule, 44-bit physical addresses.
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let value: u64 = 0b0100;
    value
}

/// Program `MAIR_EL1`, `TCR_EL1`, `TTBR0_EL1` (`lower`) and `TTBR1_EL1` (`upper`, or walks
/// disabled), invalidate this core's TLB, and turn on the MMU and caches at EL1.
///
/// # Safety
/// - Runs at EL1. The trees map everything the program uses from here on — the code being
///   executed, the stack, every object it refers to — at the virtual addresses it uses, with
///   attributes that permit that use (text executable, data writable); if the MMU is
///   already on, they agree with the current tables wherever the program is.
/// - The trees stay alive and installed for as long as they are in use: not freed, and not
///   changed except through [`PageTable`]'s own methods (whose contracts then apply).
/// - Nothing else is running on other cores with different expectations of EL1 translation.
/// - Table walks are cacheable (`TCR_EL1.IRGN/ORGN`): if the tables were written with the
///   MMU or data cache off, no stale line for them may remain in any cache (invalidate them
///   by VA first on hardware; QEMU does not model caches, so it cannot catch this).
///
/// # Errors
/// [`MmuError::WrongVaRange`] when `lower` is not a [`VaRange::Lower`] tree or `upper` not a
/// [`VaRange::Upper`] one; [`MmuError::GranuleUnsupported`] when the CPU lacks 4 KiB granules.
/// Nothing is written on error.
pub unsafe fn enable(lower: &PageTable, upper: Option<&PageTable>) -> Result<(), MmuError> {
    if lower.va_range() != VaRange::Lower || upper.is_some_and(|u| u.va_range() != VaRange::Upper) {
        return Err(MmuError::WrongVaRange);
    }
    let tcr = tcr_el1(read_id_aa64mmfr0(), upper.is_some())?;
    let mair = mair_el1();
    let ttbr0 = lower.root().as_u64();
    let ttbr1 = upper.map_or(0, |u| u.root().as_u64());
    let sctlr_bits = sctlr_el1_enable_bits();
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    // SAFETY: the caller promises EL1 and trees that map everything the program uses with
    // fitting attributes, so the instruction after `msr sctlr_el1` and every later access
    // translate to what they did before. The `isb`s make the register writes take effect in
    // order; the local TLB invalidation drops anything cached under an old configuration.
    unsafe {
        asm!(
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr0}",
            "msr ttbr1_el1, {ttbr1}",
            "dsb ish",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "isb",
            "mrs {tmp}, sctlr_el1",
            "orr {tmp}, {tmp}, {bits}",
            "msr sctlr_el1, {tmp}",
            "isb",
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr0 = in(reg) ttbr0,
            ttbr1 = in(reg) ttbr1,
            bits = in(reg) sctlr_bits,
            tmp = out(reg) _,
            options(nostack),
        )
    };
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = (tcr, mair, ttbr0, ttbr1, sctlr_bits);
    Ok(())
}

/// This CPU's MAIR_EL1, TCR_EL1, TTBR0_EL1, TTBR1_EL1 and SCTLR_EL1, in that order: what a
/// secondary CPU loads to turn its MMU on over the same tables (its boot record).
pub fn current_mmu_registers() -> [u64; 5] {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let (mair, tcr, ttbr0, ttbr1, sctlr): (u64, u64, u64, u64, u64);
        // SAFETY: reading these registers has no side effect.
        unsafe {
            asm!(
                "mrs {0}, mair_el1",
                "mrs {1}, tcr_el1",
                "mrs {2}, ttbr0_el1",
                "mrs {3}, ttbr1_el1",
                "mrs {4}, sctlr_el1",
                out(reg) mair, out(reg) tcr, out(reg) ttbr0, out(reg) ttbr1, out(reg) sctlr,
                options(nomem, nostack, preserves_flags)
            )
        };
        [mair, tcr, ttbr0, ttbr1, sctlr]
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        [0; 5]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcr_for_a72_and_for_a52_bit_cpu() {
        // Cortex-A72: TGran4 = 0, PARange = 0b0100 (44 bits).
        let tcr = tcr_el1(0b0100, true).unwrap();
        assert_eq!(tcr & 0x3f, 16, "T0SZ");
        assert_eq!((tcr >> 16) & 0x3f, 16, "T1SZ");
        assert_eq!((tcr >> 14) & 0b11, 0b00, "TG0 = 4 KiB");
        assert_eq!((tcr >> 30) & 0b11, 0b10, "TG1 = 4 KiB");
        assert_eq!((tcr >> 32) & 0b111, 0b100, "IPS = 44 bits");
        assert_eq!((tcr >> 23) & 1, 0, "TTBR1 walks on");
        assert_eq!(tcr, 0x0000_0004_b510_3510);
        // `-cpu max`: TGran4 = 1 (4 KiB with LPA2) is supported; PARange 52 bits caps at 48.
        let tcr = tcr_el1((0b0001 << 28) | 0b0110, false).unwrap();
        assert_eq!((tcr >> 32) & 0b111, 0b101, "IPS capped at 48 bits");
        assert_eq!((tcr >> 23) & 1, 1, "TTBR1 walks off");
        assert_eq!(tcr_el1(0b1111 << 28, true), Err(MmuError::GranuleUnsupported));
    }

    #[test]
    fn sctlr_bits_are_m_c_i_wxn() {
        assert_eq!(sctlr_el1_enable_bits(), (1 << 0) | (1 << 2) | (1 << 12) | (1 << 19));
    }

    #[test]
    fn tlbi_operand_keeps_va_55_12() {
        assert_eq!(tlbi_operand(0x4000_0fff), 0x4_0000);
        // VA[55:48] of an upper-half address are kept (0xff), VA[63:56] dropped.
        assert_eq!(tlbi_operand(0xffff_8000_0000_1000), 0xff8_0000_0001);
        assert_eq!(tlbi_operand(u64::MAX), (1 << 44) - 1);
    }
}
