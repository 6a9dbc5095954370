//! The EL2 stub's services (`asm/el2.S`): when boot was entered at EL2 (QEMU's
//! `virtualization=on`), it drops to EL1 but leaves a stub behind that answers a few
//! hypervisor calls. Tests use it to raise what no EL1 code can: a virtual SError.

use core::fmt;

/// SMCCC function id (vendor-specific hypervisor service): inject a virtual SError.
pub const HVC_INJECT_VSERROR: u64 = 0xc600_0001;
/// SMCCC function id: stop routing SErrors to EL2 (clears `HCR_EL2.AMO` and `VSE`).
pub const HVC_END_VSERROR: u64 = 0xc600_0002;

/// There is no EL2 stub: boot was entered at EL1 (the hypervisor or firmware above us is
/// not ours to call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoStub;

impl fmt::Display for NoStub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no EL2 stub: entered at EL1 (boot with virtualization=on)")
    }
}

impl core::error::Error for NoStub {}

/// Whether our stub owns EL2 (boot was entered there).
pub fn stub_present() -> bool {
    crate::boot::boot_info().is_some_and(|i| i.entry_el == 2)
}

fn call(function: u64) -> Result<(), NoStub> {
    if !stub_present() {
        return Err(NoStub);
    }
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let mut x0 = function;
        // SAFETY: the stub of asm/el2.S answers this HVC; it changes x0 and x1 only and
        // HCR_EL2 bits that route or raise an SError, which the EL1 vectors report.
        unsafe { core::arch::asm!("hvc #0", inout("x0") x0, out("x1") _, options(nostack)) };
        if x0 != 0 {
            return Err(NoStub);
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = function;
    Ok(())
}

/// Makes a virtual SError pending for EL1 (`HCR_EL2.VSE`, routed by `AMO`). It is taken as
/// soon as `PSTATE.A` is clear — at once after boot, which unmasks SError — and reported
/// as an SError interrupt (ESR class 0x2f). Call [`end_virtual_serror`] afterwards.
///
/// # Errors
/// [`NoStub`] when boot was not entered at EL2.
pub fn inject_virtual_serror() -> Result<(), NoStub> {
    call(HVC_INJECT_VSERROR)
}

/// Gives physical SErrors back to EL1 after [`inject_virtual_serror`].
///
/// # Errors
/// [`NoStub`] when boot was not entered at EL2.
pub fn end_virtual_serror() -> Result<(), NoStub> {
    call(HVC_END_VSERROR)
}
