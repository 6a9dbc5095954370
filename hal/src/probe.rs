//! Probing addresses without dying: each function touches an address once and returns
//! the [`Fault`] instead of stopping the machine when it faults. Used by tests (W^X, guard
//! pages, use after free) and by the console's `peek`/`poke`.
//!
//! On the host these functions touch nothing and answer `Ok` with zeroes: they exist so
//! code above compiles everywhere.

use crate::exception::Fault;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
mod ffi {
    unsafe extern "C" {
        pub fn hal_probe_read_u8(addr: *const u8, out: *mut u8) -> u32;
        pub fn hal_probe_read_u64(addr: *const u64, out: *mut u64) -> u32;
        pub fn hal_probe_write_u8(addr: *mut u8, value: u8) -> u32;
        pub fn hal_probe_write_u64(addr: *mut u64, value: u64) -> u32;
        pub fn hal_probe_exec(addr: usize) -> u32;
    }
}

/// Reads one byte at `addr`.
///
/// # Errors
/// The fault the read took.
pub fn read_u8(addr: usize) -> Result<u8, Fault> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let mut out = 0u8;
        // SAFETY: the probe's load is listed in __ex_table, so a fault resumes at its fixup
        // and returns 1; a successful read of any mapped address has no side effect on Rust
        // state (MMIO reads may have device side effects: the caller chose the address).
        match unsafe { ffi::hal_probe_read_u8(addr as *const u8, &mut out) } {
            0 => Ok(out),
            _ => Err(crate::exception::last_probe_fault()),
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = addr;
        Ok(0)
    }
}

/// Reads one aligned 64-bit word at `addr`.
///
/// # Errors
/// The fault the read took.
pub fn read_u64(addr: usize) -> Result<u64, Fault> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let mut out = 0u64;
        // SAFETY: as in `read_u8`.
        match unsafe { ffi::hal_probe_read_u64(addr as *const u64, &mut out) } {
            0 => Ok(out),
            _ => Err(crate::exception::last_probe_fault()),
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = addr;
        Ok(0)
    }
}

/// Writes one byte at `addr`.
///
/// # Safety
/// A write that succeeds changes memory: `addr` must not be memory that Rust code holds a
/// reference to or relies on (a probe of a page expected to fault, or memory the caller owns).
///
/// # Errors
/// The fault the write took (nothing was written).
pub unsafe fn write_u8(addr: usize, value: u8) -> Result<(), Fault> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        // SAFETY: the store is listed in __ex_table; the caller vouches for the target.
        match unsafe { ffi::hal_probe_write_u8(addr as *mut u8, value) } {
            0 => Ok(()),
            _ => Err(crate::exception::last_probe_fault()),
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = (addr, value);
        Ok(())
    }
}

/// Writes one aligned 64-bit word at `addr`.
///
/// # Safety
/// As [`write_u8`].
///
/// # Errors
/// The fault the write took (nothing was written).
pub unsafe fn write_u64(addr: usize, value: u64) -> Result<(), Fault> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        // SAFETY: the store is listed in __ex_table; the caller vouches for the target.
        match unsafe { ffi::hal_probe_write_u64(addr as *mut u64, value) } {
            0 => Ok(()),
            _ => Err(crate::exception::last_probe_fault()),
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = (addr, value);
        Ok(())
    }
}

/// Branches to `addr`, expecting an instruction abort (a probe of a non-executable page).
///
/// # Safety
/// If `addr` is executable, whatever is there runs: it must be a function that takes no
/// arguments and returns (e.g. a lone `ret`), or not executable at all.
///
/// # Errors
/// The instruction abort taken at `addr`.
pub unsafe fn exec(addr: usize) -> Result<(), Fault> {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        crate::exception::arm_exec_probe(addr);
        // SAFETY: the handler resumes an instruction abort at hal_probe_exec_fixup while
        // armed; if `addr` runs, the caller promised it returns.
        let r = unsafe { ffi::hal_probe_exec(addr) };
        crate::exception::arm_exec_probe(0);
        match r {
            0 => Ok(()),
            _ => Err(crate::exception::last_probe_fault()),
        }
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        let _ = addr;
        Ok(())
    }
}
