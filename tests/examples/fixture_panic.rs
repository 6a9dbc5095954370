//! Runner fixture: a test panics; the run continues and reports it as failed.
#![no_std]
#![no_main]
use tests::test;
fn passes() {}
fn fixture_panics() {
    panic!("deliberate panic");
}
tests::main!(test!(fixture_panics), test!(passes));
