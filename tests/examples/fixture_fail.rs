//! Runner fixture: one test fails an assertion. qemu-run must report failure, naming it.
#![no_std]
#![no_main]
use tests::test;
fn passes() {}
fn fixture_assertion_fails() {
    assert_eq!(1 + 1, 3, "deliberate failure");
}
tests::main!(test!(passes), test!(fixture_assertion_fails), test!(passes));
