//! Runner fixture: starts a test run, then exits 0 without the summary line.
#![no_std]
#![no_main]
hal::entry!(main);
fn main(_info: &'static hal::boot::BootInfo) -> ! {
    hal::println!("\nrunning 1 tests");
    hal::print!("test fixture_vanishes ... ");
    hal::exit::exit(hal::exit::EXIT_SUCCESS)
}
