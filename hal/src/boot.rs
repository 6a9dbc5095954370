//! Early boot, shared by every image: the entry code (`asm/entry.S`), the exception
//! vectors, and the Rust side that finds the device tree, starts the console and logger,
//! builds the kernel address space and turns the MMU on, then calls the image's `main`
//! (declared with [`crate::entry!`]).

use crate::addr::{PhysAddr, PhysRange};
use crate::cmdline::CommandLine;
use crate::dtb::Platform;
use core::fmt;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
core::arch::global_asm!(
    include_str!("asm/macros.S"),
    include_str!("asm/entry.S"),
    include_str!("asm/vectors.S"),
    include_str!("asm/probe.S"),
    include_str!("asm/el2.S"),
);

/// The image's sections as `link.ld` lays them out (physical = virtual: the image runs
/// from the identity-mapped linear map).
#[derive(Clone, Copy, Debug)]
pub struct ImageLayout {
    /// Code (RX).
    pub text: PhysRange,
    /// Read-only data, the exception table included (R, XN).
    pub rodata: PhysRange,
    /// Data and BSS (RW, XN).
    pub data: PhysRange,
    /// The boot stack's guard page (never mapped).
    pub boot_stack_guard: PhysRange,
    /// The boot (thread) stack.
    pub boot_stack: PhysRange,
    /// The exception stack's guard page (never mapped).
    pub exception_stack_guard: PhysRange,
    /// The exception stack.
    pub exception_stack: PhysRange,
    /// The other CPUs' stacks ([`crate::smp::CpuStacks`] slices it per CPU).
    pub cpu_stacks: PhysRange,
    /// The whole image, stacks included.
    pub whole: PhysRange,
}

impl ImageLayout {
    /// Reads the section bounds `link.ld` exports.
    pub fn current() -> Self {
        #[cfg(all(target_arch = "aarch64", target_os = "none"))]
        {
            unsafe extern "C" {
                static __image_start: u8;
                static __text_end: u8;
                static __rodata_end: u8;
                static __boot_stack_guard: u8;
                static __boot_stack_bottom: u8;
                static __boot_stack_top: u8;
                static __exception_stack_guard: u8;
                static __exception_stack_bottom: u8;
                static __exception_stack_top: u8;
                static __cpu_stacks_start: u8;
                static __cpu_stacks_end: u8;
                static __image_end: u8;
            }
            let a = |s: &u8| PhysAddr::new(s as *const u8 as u64);
            let r = |s: PhysAddr, e: PhysAddr| PhysRange::from_bounds(s, e).expect("link.ld section order");
            // SAFETY: only the addresses of these linker symbols are taken, never their contents.
            unsafe {
                Self {
                    text: r(a(&__image_start), a(&__text_end)),
                    rodata: r(a(&__text_end), a(&__rodata_end)),
                    data: r(a(&__rodata_end), a(&__boot_stack_guard)),
                    boot_stack_guard: r(a(&__boot_stack_guard), a(&__boot_stack_bottom)),
                    boot_stack: r(a(&__boot_stack_bottom), a(&__boot_stack_top)),
                    exception_stack_guard: r(a(&__exception_stack_guard), a(&__exception_stack_bottom)),
                    exception_stack: r(a(&__exception_stack_bottom), a(&__exception_stack_top)),
                    cpu_stacks: r(a(&__cpu_stacks_start), a(&__cpu_stacks_end)),
                    whole: r(a(&__image_start), a(&__image_end)),
                }
            }
        }
        #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
        {
            let page = |i: u64, n: u64| PhysRange::new(PhysAddr::new(0x4020_0000 + i * 4096), n * 4096).unwrap();
            Self {
                text: page(0, 16),
                rodata: page(16, 4),
                data: page(20, 4),
                boot_stack_guard: page(24, 1),
                boot_stack: page(25, 64),
                exception_stack_guard: page(89, 1),
                exception_stack: page(90, 16),
                cpu_stacks: page(106, 7 * 42),
                whole: page(0, 106 + 7 * 42),
            }
        }
    }
}

/// What boot found and did, handed to the image's `main`.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The machine, from the device tree.
    pub platform: Platform,
    /// The exception level we were entered at (1, or 2 with `virtualization=on`).
    pub entry_el: u8,
    /// How the DTB was found.
    pub dtb_source: DtbSource,
    /// The image's sections.
    pub image: ImageLayout,
    /// Counter value when Rust started (for the boot time).
    pub start_ticks: u64,
}

impl BootInfo {
    /// The command line.
    pub fn cmdline(&self) -> CommandLine<'static> {
        CommandLine::new(self.platform.bootargs)
    }
}

/// Where the device tree came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtbSource {
    /// `x0` at entry (arm64 Image boot protocol).
    Register,
    /// RAM base, where QEMU puts it for an ELF `-kernel` (2 MiB below our load address).
    RamBase,
}

impl fmt::Display for DtbSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DtbSource::Register => "x0 (Image boot protocol)",
            DtbSource::RamBase => "RAM base (ELF boot)",
        })
    }
}

static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();

/// The boot information, once boot has reached `main`.
pub fn boot_info() -> Option<&'static BootInfo> {
    BOOT_INFO.get()
}

/// Declares the image's main function: `hal::entry!(main)` with
/// `fn main(info: &'static hal::boot::BootInfo) -> !`.
#[macro_export]
macro_rules! entry {
    ($path:path) => {
        /// Called by `hal`'s boot code once the machine is set up.
        #[unsafe(export_name = "__hal_main")]
        pub fn __hal_main(info: &'static $crate::boot::BootInfo) -> ! {
            let f: fn(&'static $crate::boot::BootInfo) -> ! = $path;
            f(info)
        }
    };
}

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn find_dtb(x0: usize, image: &ImageLayout) -> Result<(Platform, DtbSource), crate::dtb::DtbError> {
    let (ptr, source) = if x0 != 0 {
        (x0 as *mut u8, DtbSource::Register)
    } else {
        // For an ELF boot QEMU puts the DTB at RAM base, 2 MiB below our load address
        // (link.ld); the magic is checked before anything else is trusted.
        (image.whole.start().as_u64().saturating_sub(0x20_0000) as usize as *mut u8, DtbSource::RamBase)
    };
    // SAFETY: the boot protocol (or QEMU, for an ELF) put a DTB at `ptr`, outside the image,
    // in RAM that is ours and that the frame allocator keeps reserved; nothing has read it
    // yet. Removing QEMU's NOP tokens first lets the parser see every node.
    unsafe { crate::dtb::strip_nops_at(ptr) }?;
    // SAFETY: as above; nothing writes the tree from here on.
    let platform = unsafe { Platform::from_ptr(ptr, &[image.whole]) }.inspect_err(|e| {
        // SAFETY: same tree; the MMU is still off, so the UART's physical address reaches
        // it, and nothing drives the UART yet.
        if let Some(uart) = unsafe { crate::dtb::console_uart_at(ptr) } {
            refuse_early(uart, format_args!("{e}"));
        }
    })?;
    Ok((platform, source))
}

/// Prints `hal: refusing to start: <why>` through the PL011 at `uart` with plain stores:
/// the one message boot gives before the MMU and the console are up.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn refuse_early(uart: crate::addr::PhysAddr, why: fmt::Arguments<'_>) {
    let mut line = crate::console::LineBuf::new();
    let _ = fmt::Write::write_fmt(&mut line, format_args!("hal: refusing to start: {why}\n"));
    // SAFETY: boot calls this with the MMU still off, on the PL011 the device tree names,
    // before anything else drives it.
    unsafe { crate::console::early_write(uart.as_usize(), line.as_str()) };
}

/// The Rust entry point, called by `asm/entry.S` on the boot stack with the MMU off.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[unsafe(no_mangle)]
extern "C" fn hal_boot_rust(x0: usize, entry_el: u64) -> ! {
    // The MMU is off: every access is Device memory, where load/store-exclusive pairs (the
    // atomics behind locks and once-cells) are unpredictable on real hardware. So nothing
    // here takes a lock or a once-cell until `kmap::init` has turned the MMU and caches on.
    let start_ticks = crate::cpu::counter();
    let image = ImageLayout::current();
    let (platform, dtb_source) = match find_dtb(x0, &image) {
        Ok(found) => found,
        // No console without a device tree: all we can do is exit with a status.
        Err(_) => crate::exit::exit(crate::exit::EXIT_FAULT),
    };
    // Plain stores only: how to leave the machine, known before anything can go wrong.
    crate::psci::set_conduit(platform.psci);
    crate::exit::detect_semihosting();
    let boot = BootInfo { platform, entry_el: entry_el as u8, dtb_source, image, start_ticks };
    let boot_tables = match crate::kmap::init(&boot) {
        Ok(pages) => pages,
        // No console yet (it is started through the mapping just built): say why with
        // plain stores, the MMU still off.
        Err(e) => {
            if let Some(uart) = platform.uart {
                refuse_early(uart.start(), format_args!("building the kernel tables failed: {e}"));
            }
            crate::exit::exit(crate::exit::EXIT_FAULT)
        }
    };

    // MMU on, caches on: locks and atomics behave from here.
    if let Some(uart) = platform.uart {
        // SAFETY: the device tree names this PL011, and `kmap` mapped its page at the same
        // address as Device-nGnRE for the program's life; nothing else drives the UART.
        unsafe { crate::console::init(crate::addr::VirtAddr::new(uart.start().as_u64())) };
    }
    let cmdline = CommandLine::new(platform.bootargs);
    let level = match cmdline.get("loglevel") {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    crate::console::init_logger(level);
    // Vectors and console are up: an asynchronous abort is reported from here on instead of
    // staying pending for ever (IRQ and FIQ stay masked).
    crate::cpu::unmask_serror();
    // Stack guard pages are named in fault reports by `smp::stack_guard_name`, every CPU's.
    let info = BOOT_INFO.call_once(|| boot);
    log_platform(info);
    log::info!(
        "MMU on: 4 KiB granule, 48-bit VA; {boot_tables} boot table pages; text RX, rodata R, data RW+XN, stack guards unmapped"
    );
    start_cpus(info);

    unsafe extern "Rust" {
        fn __hal_main(info: &'static BootInfo) -> !;
    }
    // SAFETY: every image declares `__hal_main` with this signature through `hal::entry!`.
    unsafe { __hal_main(info) }
}

/// Starts every other CPU the device tree lists (up to `maxcpus=N`) and logs each one's
/// check-in; exits if one does not check in.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
fn start_cpus(info: &BootInfo) {
    let max = match info.cmdline().get_u64("maxcpus") {
        Ok(Some(n)) if n >= 1 => n as usize,
        Ok(None) => usize::MAX,
        _ => {
            log::warn!("ignoring maxcpus={:?}: not a number of at least 1", info.cmdline().get("maxcpus"));
            usize::MAX
        }
    };
    let p = &info.platform;
    if p.cpus.beyond > 0 {
        log::warn!(
            "{} more CPUs listed than the {} this build brings up: left off",
            p.cpus.beyond,
            crate::dtb::MAX_CPUS
        );
    }
    match crate::smp::start_secondaries(info, max) {
        Ok(n) => {
            for cpu in (0..n).filter_map(crate::smp::cpu_data) {
                log::info!(
                    "CPU {} online: MPIDR {:#x} (device tree {:#x}), entered at EL{}",
                    cpu.id(),
                    cpu.seen_mpidr(),
                    cpu.mpidr(),
                    cpu.entry_el()
                );
            }
            log::info!("{n} of {} CPUs online (secondaries power off until interrupts are up)", p.cpus.len().min(max));
        }
        Err(e) => {
            log::error!("SMP: {e}");
            crate::exit::exit(crate::exit::EXIT_FAULT)
        }
    }
}

/// Logs what the device tree said: the memory map, devices, command line.
pub fn log_platform(info: &BootInfo) {
    let p = &info.platform;
    log::info!("{} — entered at EL{}, device tree from {}", p.model, info.entry_el, info.dtb_source);
    for r in p.ram.iter() {
        log::info!("RAM      {:#012x}-{:#012x} ({} MiB)", r.start(), r.end().as_u64(), r.size() >> 20);
    }
    for r in p.reserved.iter() {
        log::info!("reserved {r}");
    }
    log::info!("DTB      {:#012x}-{:#012x} ({} KiB)", p.dtb.start(), p.dtb.end().as_u64(), p.dtb.size() >> 10);
    let i = &info.image;
    log::info!(
        "image    {:#012x}-{:#012x} (text {} KiB, rodata {} KiB, data+bss {} KiB, stacks {} KiB)",
        i.whole.start(),
        i.whole.end().as_u64(),
        i.text.size() >> 10,
        i.rodata.size() >> 10,
        i.data.size() >> 10,
        (i.boot_stack.size() + i.exception_stack.size()) >> 10
    );
    if let Some(u) = p.uart {
        log::info!("console  PL011 at {:#x}", u.start());
    }
    if let Some(g) = p.gic_distributor {
        log::info!("GIC distributor at {:#x}", g.start());
    }
    match (p.psci, crate::psci::version()) {
        (Some(c), Some((maj, min))) => log::info!("PSCI {maj}.{min} via {c:?}"),
        (Some(c), None) => log::info!("PSCI via {c:?} (no version answer)"),
        (None, _) => log::info!("no PSCI node"),
    }
    let cmdline = info.cmdline();
    if !cmdline.raw().is_empty() {
        log::info!("command line \"{}\"", cmdline.raw());
    }
    for bad in cmdline.params().filter_map(Result::err) {
        log::warn!("ignoring malformed boot parameter \"{bad}\"");
    }
}

/// The panic handler of every image: print, return to a test's `catch` if armed, else exit.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let mut out = crate::console::Console;
    match info.location() {
        Some(l) => {
            let _ = writeln!(out, "\n*** PANIC at {}:{}:{}: {}", l.file(), l.line(), l.column(), info.message());
        }
        None => {
            let _ = writeln!(out, "\n*** PANIC: {}", info.message());
        }
    }
    crate::exception::recover_from_panic();
    crate::exception::report_stuck(crate::smp::stop_others(100_000_000));
    crate::exit::exit(crate::exit::EXIT_PANIC)
}
