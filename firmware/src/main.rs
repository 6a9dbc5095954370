//! The firmware image: boots, brings up the memory system and shows it at work, then
//! exits. With `test_vmalloc.*` boot parameters it runs Linux's `test_vmalloc` workloads
//! instead (see `bench.rs`).
#![no_std]
#![no_main]

extern crate alloc;

mod bench;
mod bench_mmu;
mod report;
mod shell;

use hal::boot::BootInfo;
use memory::kernel::{self, MemoryConfig};

/// Small objects (`Box`, `Vec`, `BTreeMap`) come from the slab allocator.
#[global_allocator]
static HEAP: memory::slab::KernelAllocator = memory::slab::KernelAllocator;

hal::entry!(main);

/// Boot parameters the firmware itself reads (besides `memory::kernel::BOOT_PARAMS`).
const FIRMWARE_PARAMS: &[&str] = &["loglevel", "shell", "bench", "seed", "test.filter"];

fn warn_unknown_params(info: &BootInfo) {
    for p in info.cmdline().params().flatten() {
        let known = FIRMWARE_PARAMS.contains(&p.key)
            || kernel::BOOT_PARAMS.contains(&p.key)
            || virtio::BOOT_PARAMS.contains(&p.key)
            || p.key.starts_with("test_vmalloc.");
        if !known {
            log::warn!("ignoring unknown boot parameter \"{}\"", p.key);
        }
    }
}

/// The interrupt controller, then interrupts on in thread context (as Linux runs it): the
/// other CPUs idle in `wfi` from here on, woken by SGIs.
fn start_interrupts(info: &'static BootInfo) {
    match gic::init(info) {
        Ok(_) => hal::irq::enable_local(),
        Err(e) => log::warn!("interrupts stay off: {e}"),
    }
}

fn main(info: &'static BootInfo) -> ! {
    warn_unknown_params(info);
    let config = MemoryConfig::from_cmdline(&info.cmdline());
    // SAFETY: called once, after hal turned the MMU on, with boot's own BootInfo.
    if let Err(e) = unsafe { kernel::init(info, config) } {
        panic!("memory init: {e}");
    }
    if let Err(e) = memory::ioremap::switch_console_to_ioremap(info) {
        log::warn!("console stays on its boot mapping: {e}");
    }
    if let Err(e) = memory::ioremap::probe_gic(info) {
        log::warn!("GIC: {e}");
    }
    start_interrupts(info);
    log::info!(
        "memory system up: buddy, slab, vmalloc [{:#x}, {:#x})",
        hal::kmap::VMALLOC_START,
        hal::kmap::VMALLOC_END
    );
    if info.cmdline().get("bench") == Some("mmu") {
        bench_mmu::run();
        hal::exit::exit(hal::exit::EXIT_SUCCESS);
    }
    if bench::requested(info) {
        let ok = bench::run(info);
        hal::exit::exit(if ok { hal::exit::EXIT_SUCCESS } else { hal::exit::EXIT_FAILURE });
    }
    report::run(info);
    virtio::boot_job();
    hal::println!("\n=== meminfo");
    shell::meminfo();
    if info.cmdline().get_bool("shell").unwrap_or(None).unwrap_or(false) {
        shell::run();
    }
    log::info!(
        "boot report complete in {} ms",
        hal::cpu::ticks_to_ns(hal::cpu::counter() - info.start_ticks) / 1_000_000
    );
    hal::exit::exit(hal::exit::EXIT_SUCCESS)
}
