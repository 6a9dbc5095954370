//! Runner fixture: the fault-report hook itself faults while a fault is being reported —
//! a fault inside the exception handler. It must be reported as such (on a fresh exception
//! stack), and the run must end with a failure status, not hang or loop.
#![no_std]
#![no_main]
use tests::test;
fn faulting_explainer(_addr: u64, _out: &mut dyn core::fmt::Write) -> bool {
    // SAFETY: deliberately reads an address with nothing behind it, inside the handler.
    let v = unsafe { core::ptr::read_volatile(0x7fff_ffff_e000 as *const u64) };
    v != 0
}
fn passes() {}
fn fixture_faults_in_the_handler() {
    hal::exception::set_fault_explainer(faulting_explainer);
    // SAFETY: deliberately reads an address with nothing behind it.
    let v = unsafe { core::ptr::read_volatile(0x7fff_ffff_f000 as *const u64) };
    core::hint::black_box(v);
}
tests::main!(test!(passes), test!(fixture_faults_in_the_handler), test!(passes));
