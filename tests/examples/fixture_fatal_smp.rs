//! Runner fixture (boot at `-smp 4`): CPU 1 spins with interrupts masked, then CPU 0 takes
//! a fatal fault outside any catch. The report must come after the others were asked to
//! stop, naming CPU 1 as the one that did not (GICv2 has no NMI); CPUs 2 and 3 stop.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, Ordering};

static SPINNING: AtomicBool = AtomicBool::new(false);

fn spin_masked(cpu: usize) {
    if cpu == 1 {
        hal::irq::disable_local();
        SPINNING.store(true, Ordering::Release);
        loop {
            core::hint::spin_loop();
        }
    }
}

hal::entry!(main);

fn main(info: &'static hal::boot::BootInfo) -> ! {
    tests::init_memory(info);
    // CPU 1 never finishes (reported hung after 200 ms and left spinning).
    let _ = hal::smp::run_on_all(spin_masked, 200_000_000);
    while !SPINNING.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    hal::println!("fixture: CPU 1 spins with interrupts masked; CPU 0 faults now");
    // SAFETY: deliberately reads an address with nothing behind it, outside any catch:
    // the fatal path runs.
    let v = unsafe { core::ptr::read_volatile(0x7fff_ffff_f000 as *const u64) };
    core::hint::black_box(v);
    hal::exit::exit(hal::exit::EXIT_SUCCESS)
}
