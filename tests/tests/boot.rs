//! Boot and exception machinery on target: probes, recovery, exit path.
#![no_std]
#![no_main]

use tests::test;

fn dtb_found() {
    let info = hal::boot::boot_info().expect("boot info");
    assert!(info.platform.ram.total() >= 128 << 20);
    assert!(info.platform.uart.is_some());
    assert!(info.platform.psci.is_some());
}

fn probe_reads_ram() {
    let x = 0x5au8;
    assert_eq!(hal::probe::read_u8(&x as *const u8 as usize), Ok(0x5a));
}

fn probe_of_unmapped_address_faults() {
    // Far outside RAM and devices: no bus answers (external abort with the MMU off, a
    // translation fault with it on).
    let r = hal::probe::read_u64(0x7fff_ffff_f000);
    let fault = r.expect_err("the read must fault");
    assert_eq!(fault.far, 0x7fff_ffff_f000);
}

fn panic_is_caught() {
    panic!("deliberate panic inside catch");
}

fn fault_is_caught() {
    // SAFETY: deliberately reads an address with nothing behind it; the runner expects the
    // fault and recovers.
    let v = unsafe { core::ptr::read_volatile(0x7fff_ffff_f000 as *const u64) };
    core::hint::black_box(v);
}

fn explainer(addr: u64, out: &mut dyn core::fmt::Write) -> bool {
    if addr == 0x7fff_ffff_f000 {
        let _ = write!(out, "test explainer knows {addr:#x}");
        true
    } else {
        false
    }
}

fn fault_hook_is_called() {
    hal::exception::set_fault_explainer(explainer);
    let mut s = Buf::default();
    assert!(hal::exception::explain(0x7fff_ffff_f000, &mut s));
    assert_eq!(s.as_str(), "test explainer knows 0x7ffffffff000");
}

fn catch_runs_and_returns() {
    let before = hal::exception::recovered_count();
    // Catches nest (the runner's is armed here): the innermost gets the panic, and this
    // test goes on.
    // SAFETY: the closure holds nothing whose destructor matters.
    let r = unsafe { hal::exception::catch(|| panic!("inner")) };
    assert_eq!(r, Err(hal::exception::Caught::Panic));
    assert_eq!(hal::exception::recovered_count(), before + 1);
    // SAFETY: as above.
    let ok = unsafe { hal::exception::catch(|| {}) };
    assert_eq!(ok, Ok(()));
}

/// A recovered fault resumes with the interrupt masks the catch point had (SError open),
/// not a fixed set: before, recovery left SError masked for the rest of the run.
fn recovery_keeps_the_catch_points_masks() {
    let before = hal::cpu::daif();
    // SAFETY: the closure holds nothing whose destructor matters.
    let r = unsafe {
        hal::exception::catch(|| {
            // SAFETY: deliberately reads an address with nothing behind it.
            core::hint::black_box(core::ptr::read_volatile(0x7fff_ffff_f000 as *const u64));
        })
    };
    assert!(matches!(r, Err(hal::exception::Caught::Fault(_))), "{r:?}");
    assert_eq!(hal::cpu::daif(), before);
}

struct Buf {
    b: [u8; 128],
    n: usize,
}
impl Default for Buf {
    fn default() -> Self {
        Self { b: [0; 128], n: 0 }
    }
}
impl Buf {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.b[..self.n]).unwrap()
    }
}
impl core::fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.n + s.len();
        self.b.get_mut(self.n..end).ok_or(core::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.n = end;
        Ok(())
    }
}

fn output_gets_out_while_the_console_lock_is_held() {
    use core::fmt::Write;
    let mut held = hal::console::lock();
    let _ = write!(held, "(holding the console) ");
    let before = hal::console::emergency_writes();
    // What an exception handler or a panic does while the interrupted code holds the lock.
    hal::print!("(printed around the held lock) ");
    assert_eq!(hal::console::emergency_writes(), before + 1, "took the emergency path");
    drop(held);
    hal::print!("(lock released) ");
    assert_eq!(hal::console::emergency_writes(), before + 1, "back on the locked path");
}

/// Boot masks everything at entry, whatever the loader left, and opens SError only once
/// the vectors and console are up: thread code runs with A clear, I and F masked.
fn serror_is_open_and_interrupts_masked() {
    let daif = hal::cpu::daif();
    assert_eq!(daif & hal::cpu::DAIF_A, 0, "SError must be unmasked (DAIF {daif:#x})");
    assert_eq!(daif & 0x40, 0x40, "FIQ stays masked (DAIF {daif:#x})");
    assert_eq!(daif & 0x80 == 0, hal::irq::controller().is_some(), "IRQs open iff a controller is up (DAIF {daif:#x})");
}

/// Entered at EL2 (virtualization=on), the EL2 stub raises a virtual SError: it must be
/// taken at once and reported (the runner's catch recovers it). Before boot unmasked
/// SError, it stayed pending for ever and this test ran to its panic.
fn virtual_serror_is_reported() {
    hal::el2::inject_virtual_serror().expect("the EL2 stub answers");
    for _ in 0..10_000 {
        core::hint::spin_loop();
    }
    panic!("the virtual SError was never taken");
}

fn virtual_serror_was_an_serror() {
    hal::el2::end_virtual_serror().expect("the EL2 stub answers");
    match tests::last_caught() {
        Some(hal::exception::Caught::Fault(f)) => {
            assert_eq!(f.class(), hal::exception::ExceptionClass::SError, "{f}");
        }
        other => panic!("expected an SError report, got {other:?}"),
    }
    // Taking it cleared HCR_EL2.VSE: nothing more is pending.
    serror_is_open_and_interrupts_masked();
}

fn entered_at_el2() -> bool {
    hal::el2::stub_present()
}

tests::main!(
    test!(dtb_found),
    test!(probe_reads_ram),
    test!(probe_of_unmapped_address_faults),
    test!(panic_is_caught, panic),
    test!(fault_is_caught, fault),
    test!(fault_hook_is_called),
    test!(catch_runs_and_returns),
    test!(recovery_keeps_the_catch_points_masks),
    test!(output_gets_out_while_the_console_lock_is_held),
    test!(serror_is_open_and_interrupts_masked),
    test!(virtual_serror_is_reported, fault).needing(entered_at_el2, "virtualization=on"),
    test!(virtual_serror_was_an_serror).needing(entered_at_el2, "virtualization=on"),
);
