//! Leaving the machine: semihosting `SYS_EXIT_EXTENDED` with a status (QEMU
//! `-semihosting` exits with it), else PSCI `SYSTEM_OFF`, else halt.
//!
//! PSCI cannot carry a status (QEMU then exits 0), which is why the test runner never
//! trusts the exit status alone and also reads the summary line.

use crate::psci;
use core::sync::atomic::{AtomicU8, Ordering};

/// Whether semihosting answers: 0 not probed yet, 1 yes, 2 no.
static SEMIHOSTING: AtomicU8 = AtomicU8::new(0);

/// Clean exit.
pub const EXIT_SUCCESS: u32 = 0;
/// Generic failure (e.g. a test failed).
pub const EXIT_FAILURE: u32 = 1;
/// A fatal exception.
pub const EXIT_FAULT: u32 = 3;
/// A panic.
pub const EXIT_PANIC: u32 = 101;

const SYS_EXIT_EXTENDED: u32 = 0x20;
const SYS_ERRNO: u32 = 0x13;
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
unsafe extern "C" {
    fn hal_semihosting_call(op: u32, arg: usize, out: *mut usize) -> u32;
}

/// Finds out once, from thread context at boot, whether semihosting answers (a harmless
/// `SYS_ERRNO` query): the exit path must not try `hlt` from an exception handler when it
/// would trap, because a trap there is a nested fault.
pub fn detect_semihosting() -> bool {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let mut out = 0usize;
        // SAFETY: SYS_ERRNO takes no argument and changes nothing; the hlt is listed in
        // __ex_table, so without semihosting it traps to a fixup that returns 1.
        let present = unsafe { hal_semihosting_call(SYS_ERRNO, 0, &mut out) } == 0;
        SEMIHOSTING.store(if present { 1 } else { 2 }, Ordering::Release);
        present
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = SYS_ERRNO;
        SEMIHOSTING.store(2, Ordering::Release);
        false
    }
}

/// Asks the host to end the run with `code`. Returns `false` when semihosting is not
/// enabled (known from [`detect_semihosting`], or the `hlt` trapped and its fixup returned).
pub fn semihosting_exit(code: u32) -> bool {
    if SEMIHOSTING.load(Ordering::Acquire) == 2 {
        return false;
    }
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let block = [ADP_STOPPED_APPLICATION_EXIT, code as u64];
        let mut out = 0usize;
        // SAFETY: SYS_EXIT_EXTENDED reads the two-word block we pass; the hlt is listed in
        // __ex_table, so without semihosting it traps to a fixup that returns 1.
        let r = unsafe { hal_semihosting_call(SYS_EXIT_EXTENDED, block.as_ptr() as usize, &mut out) };
        r == 0
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = (code, SYS_EXIT_EXTENDED, ADP_STOPPED_APPLICATION_EXIT);
        false
    }
}

/// Ends the run with `code`: semihosting, else PSCI `SYSTEM_OFF` (status lost), else halt.
pub fn exit(code: u32) -> ! {
    semihosting_exit(code);
    psci::system_off();
    crate::cpu::halt()
}
