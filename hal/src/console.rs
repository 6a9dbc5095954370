//! The console: a PL011 UART behind a lock, a `log` logger with uptime stamps and the CPU,
//! and a raw emergency path so a fault or panic taken while the lock is held still gets out.
//!
//! The driver is the `arm-pl011-uart` crate (the `arm_pl011` crate needs nightly Rust).
//! Every `print!`/`println!` and log line holds the lock for its whole text, so CPUs never
//! cut into each other's lines: a CPU whose lock is held by another waits (a bounded
//! while, then it takes the emergency path rather than hang). Only output from the CPU
//! that holds the lock itself — a fault or panic taken while it printed — goes straight to
//! the data register. A CPU that starts writing while another CPU's line is still open
//! (a `print!` without newline) starts on a fresh line.

use crate::addr::VirtAddr;
use arm_pl011_uart::{DataBits, LineConfig, Parity, StopBits, Uart};
use core::fmt::{self, Write};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use log::{Level, LevelFilter, Log, Metadata, Record};
use safe_mmio::UniqueMmioPointer;
use spin::Mutex;

/// The console UART, once [`init`] has run.
static UART: Mutex<Option<Uart<'static>>> = Mutex::new(None);
/// The UART's base address for the emergency path (0: no console).
static RAW_BASE: AtomicUsize = AtomicUsize::new(0);
/// Bytes that went out through the emergency path (the lock was busy).
static EMERGENCY_WRITES: AtomicUsize = AtomicUsize::new(0);
/// The CPU holding the console lock, plus one (0: nobody).
static OWNER: AtomicUsize = AtomicUsize::new(0);
/// The CPU whose last output did not end its line, plus one (0: every line is closed).
static LINE_OPEN_BY: AtomicUsize = AtomicUsize::new(0);
/// How long a CPU waits for another's console lock before taking the emergency path.
const LOCK_WAIT_NS: u64 = 200_000_000;

const UART_DR: usize = 0x00;
const UART_FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;

/// Starts the console on the PL011 at `base`.
///
/// # Safety
/// `base` must be the address, in the current address space, of a PL011's registers
/// mapped as Device memory for the rest of the program (or until [`rebase`] replaces it),
/// and nothing else may drive that UART.
pub unsafe fn init(base: VirtAddr) {
    // SAFETY: the caller promises `base` maps a PL011 for the program's lifetime, used by
    // nobody else; UniqueMmioPointer needs exactly that.
    let regs = unsafe { UniqueMmioPointer::new(NonNull::new_unchecked(base.as_mut_ptr())) };
    let mut uart = Uart::new(regs);
    // QEMU ignores the divisor; a real board wants 115200 8N1 from a 24 MHz clock.
    let config = LineConfig { data_bits: DataBits::Bits8, parity: Parity::None, stop_bits: StopBits::One };
    let _ = uart.enable(config, 115_200, 24_000_000);
    let mut guard = UART.lock();
    *guard = Some(uart);
    RAW_BASE.store(base.as_usize(), Ordering::Release);
}

/// Moves the console to another mapping of the same UART (after `ioremap`).
///
/// # Safety
/// As [`init`]; the old mapping must stay valid until this returns.
pub unsafe fn rebase(base: VirtAddr) {
    // SAFETY: same contract as `init`, forwarded to the caller.
    let regs = unsafe { UniqueMmioPointer::new(NonNull::new_unchecked(base.as_mut_ptr())) };
    let mut guard = UART.lock();
    *guard = Some(Uart::new(regs));
    RAW_BASE.store(base.as_usize(), Ordering::Release);
}

/// The address the console currently writes to (0 before [`init`]).
pub fn base() -> usize {
    RAW_BASE.load(Ordering::Acquire)
}

fn raw_putc(base: usize, b: u8) {
    if base == 0 {
        return;
    }
    // SAFETY: `base` was registered by `init`/`rebase`, whose contract keeps a PL011 mapped
    // there. Racing the locked driver can at worst interleave characters, which is what an
    // emergency path accepts.
    unsafe { putc_at(base, b) }
}

/// Polls the PL011 at `base` until its FIFO has room, then writes `b`.
///
/// # Safety
/// `base` must be the address of a PL011's registers, reachable as Device memory now.
unsafe fn putc_at(base: usize, b: u8) {
    let fr = (base + UART_FR) as *const u32;
    let dr = (base + UART_DR) as *mut u32;
    // SAFETY: the caller promises a PL011 at `base`; FR and DR are 32-bit registers at
    // these offsets.
    unsafe {
        while fr.read_volatile() & FR_TXFF != 0 {}
        dr.write_volatile(b as u32);
    }
}

/// Writes `s` to the PL011 at physical address `base` with plain loads and stores — no
/// driver, lock or atomic — for the one message boot prints with the MMU still off: why
/// it refuses the device tree.
///
/// # Safety
/// The MMU must be off (so `base` is reached as Device memory) and `base` must be a
/// PL011's register base that nothing else is driving.
pub unsafe fn early_write(base: usize, s: &str) {
    // SAFETY: forwarded from our caller.
    crlf_bytes(s, |b| unsafe { putc_at(base, b) });
}

/// Calls `put` with the bytes of `s`, each `\n` preceded by `\r` (a terminal's line end).
fn crlf_bytes(s: &str, mut put: impl FnMut(u8)) {
    for b in s.bytes() {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

/// Writes through the locked driver when the console is up, else the emergency path.
fn write_locked(uart: &mut Option<Uart<'static>>, s: &str) {
    match uart {
        Some(uart) => crlf_bytes(s, |b| uart.write_word(b)),
        None => emergency_write(s),
    }
}

/// Writes straight to the UART registers, ignoring the lock: for fault and panic reports.
pub fn emergency_write(s: &str) {
    let base = RAW_BASE.load(Ordering::Acquire);
    crlf_bytes(s, |b| raw_putc(base, b));
    EMERGENCY_WRITES.fetch_add(1, Ordering::Relaxed);
}

/// A `fmt::Write` sink for the console: each `write_str` under the lock (see the module
/// docs for when it goes raw instead). `print!` holds one [`lock`] for a whole line.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match lock_for_report() {
            Some(mut guard) => guard.write_str(s),
            None => {
                emergency_write(s);
                Ok(())
            }
        }
    }
}

/// Takes the console lock, unless this CPU holds it already (output from a fault or panic
/// taken while it printed) or another CPU keeps it past a bounded wait: `None` then, and
/// the caller goes raw ([`EmergencyConsole`]).
pub fn lock_for_report() -> Option<ConsoleGuard> {
    let me = crate::smp::this_cpu() + 1;
    if OWNER.load(Ordering::Acquire) == me {
        return None;
    }
    let t0 = crate::cpu::uptime_ns();
    loop {
        if let Some(guard) = UART.try_lock() {
            return Some(ConsoleGuard::new(guard));
        }
        if crate::cpu::uptime_ns().wrapping_sub(t0) > LOCK_WAIT_NS {
            return None;
        }
        core::hint::spin_loop();
    }
}

/// Bytes written through the emergency path since boot (each call counts once): how often
/// output had to bypass a busy console lock.
pub fn emergency_writes() -> usize {
    EMERGENCY_WRITES.load(Ordering::Relaxed)
}

/// The console held for several writes in a row (lines from elsewhere cannot interleave).
/// Output from an exception or a panic on this CPU meanwhile does not wait for it: it
/// takes the emergency path.
pub struct ConsoleGuard {
    guard: spin::MutexGuard<'static, Option<Uart<'static>>>,
}

impl ConsoleGuard {
    fn new(mut guard: spin::MutexGuard<'static, Option<Uart<'static>>>) -> Self {
        let me = crate::smp::this_cpu() + 1;
        OWNER.store(me, Ordering::Release);
        let open = LINE_OPEN_BY.load(Ordering::Relaxed);
        if open != 0 && open != me {
            // Another CPU's line is still open: ours starts on a line of its own.
            write_locked(&mut guard, "\n");
            LINE_OPEN_BY.store(0, Ordering::Relaxed);
        }
        Self { guard }
    }
}

impl Drop for ConsoleGuard {
    fn drop(&mut self) {
        OWNER.store(0, Ordering::Release);
    }
}

/// Takes the console for several writes in a row (see [`ConsoleGuard`]); waits for it.
pub fn lock() -> ConsoleGuard {
    ConsoleGuard::new(UART.lock())
}

impl Write for ConsoleGuard {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(&last) = s.as_bytes().last() {
            LINE_OPEN_BY.store(if last == b'\n' { 0 } else { crate::smp::this_cpu() + 1 }, Ordering::Relaxed);
        }
        write_locked(&mut self.guard, s);
        Ok(())
    }
}

/// The emergency path as a `fmt::Write` sink.
pub struct EmergencyConsole;

impl Write for EmergencyConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        emergency_write(s);
        Ok(())
    }
}

/// Reads one byte if the UART has received one.
pub fn try_read_byte() -> Option<u8> {
    let base = RAW_BASE.load(Ordering::Acquire);
    if base == 0 {
        return None;
    }
    let guard = UART.try_lock()?;
    let fr = (base + UART_FR) as *const u32;
    let dr = (base + UART_DR) as *const u32;
    // SAFETY: as in `raw_putc`; we hold the driver lock so nobody else reads DR.
    let byte = unsafe {
        if fr.read_volatile() & FR_RXFE != 0 {
            None
        } else {
            Some(dr.read_volatile() as u8)
        }
    };
    drop(guard);
    byte
}

/// Prints to the console (no newline), holding the console for the whole text.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        match $crate::console::lock_for_report() {
            Some(mut c) => { let _ = write!(c, $($arg)*); }
            None => { let _ = write!($crate::console::EmergencyConsole, $($arg)*); }
        }
    }};
}

/// Prints a line to the console, holding the console for the whole line.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        match $crate::console::lock_for_report() {
            Some(mut c) => { let _ = writeln!(c, $($arg)*); }
            None => { let _ = writeln!($crate::console::EmergencyConsole, $($arg)*); }
        }
    }};
}

struct Logger;

static LOGGER: Logger = Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::cpu::uptime_ns();
        let (s, us) = (ns / 1_000_000_000, (ns / 1_000) % 1_000_000);
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let target = record.target();
        let module = target.split("::").next().unwrap_or(target);
        // One write per line so concurrent lines do not interleave mid-line.
        let mut line = LineBuf::new();
        let cpu = crate::smp::this_cpu();
        let _ = writeln!(line, "[{s:5}.{us:06}] {level} cpu{cpu} {module}: {}", record.args());
        let _ = Console.write_str(line.as_str());
    }

    fn flush(&self) {}
}

/// A line buffer on the stack: a log line is formatted first, then written at once.
/// A line of at most 512 bytes, built before it is written in one piece.
pub(crate) struct LineBuf {
    buf: [u8; 512],
    len: usize,
}

impl LineBuf {
    pub(crate) const fn new() -> Self {
        Self { buf: [0; 512], len: 0 }
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only whole `&str`s are appended (truncated at a char boundary), so this is UTF-8.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<log line not utf-8>\n")
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// Installs the logger at `level`. Calling it twice only changes the level.
pub fn init_logger(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
