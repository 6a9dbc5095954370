//! Runner fixture: a test takes a data abort; the run continues and reports it as failed.
#![no_std]
#![no_main]
use tests::test;
fn passes() {}
fn fixture_faults() {
    // SAFETY: deliberately reads an address with nothing behind it.
    let v = unsafe { core::ptr::read_volatile(0x7fff_ffff_f000 as *const u64) };
    core::hint::black_box(v);
}
tests::main!(test!(passes), test!(fixture_faults));
