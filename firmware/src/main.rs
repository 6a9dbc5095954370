//! The firmware image: boots, shows the memory system at work, and exits.
#![no_std]
#![no_main]

use hal::boot::BootInfo;

hal::entry!(main);

fn main(info: &'static BootInfo) -> ! {
    log::info!("hello from EL1, {} MiB of RAM", info.platform.ram.total() >> 20);
    log::info!("boot report complete");
    hal::exit::exit(hal::exit::EXIT_SUCCESS)
}
