//! Runner fixture: a test never returns; qemu-run's timeout must name it.
#![no_std]
#![no_main]
use tests::test;
fn passes() {}
fn fixture_hangs() {
    loop {
        core::hint::spin_loop();
    }
}
tests::main!(test!(passes), test!(fixture_hangs), test!(passes));
