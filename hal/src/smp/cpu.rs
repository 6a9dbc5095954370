//! [`CpuData`]: what each CPU keeps of its own, found through `TPIDR_EL1`.
//!
//! The first 64 bytes are the *boot record* a secondary CPU reads with its MMU still off
//! (`asm/entry.S`, `hal_secondary_entry`): its stacks and the MMU registers of the boot
//! CPU. `VECTOR_SPX` (`asm/vectors.S`) reads the exception-stack top at offset 0. The rest
//! is per-CPU state of the exception machinery (catch, probes, nested faults) and the
//! mailbox through which [`super::run_on_all`] hands a CPU its work.

use crate::dtb::MAX_CPUS;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// One CPU's data. Every field is an atomic, so the array is `Sync` without `static mut`;
/// fields a CPU alone uses are still atomics, read and written `Relaxed`.
#[repr(C, align(64))]
pub struct CpuData {
    // --- boot record (offsets used by asm) ---
    /// Top of the exception stack (SP_EL1). Offset 0.
    pub(crate) exception_stack_top: AtomicU64,
    /// Top of the thread stack (SP_EL0). Offset 8.
    pub(crate) stack_top: AtomicU64,
    /// MAIR_EL1, TCR_EL1, TTBR0_EL1, TTBR1_EL1, SCTLR_EL1 to enable the MMU with. 16..56.
    pub(crate) mmu: [AtomicU64; 5],
    _reserved: AtomicU64,
    // --- identity ---
    /// Logical number: 0 for the boot CPU, then the device tree's order.
    pub(crate) id: AtomicUsize,
    /// MPIDR affinity as the device tree lists it.
    pub(crate) mpidr: AtomicU64,
    /// MPIDR affinity as the CPU read it itself (0 until it has run).
    pub(crate) seen_mpidr: AtomicU64,
    /// The exception level the CPU was entered at, last time it started.
    pub(crate) entry_el: AtomicU8,
    /// Checked in at least once (boot waits for it).
    pub(crate) checked_in: AtomicBool,
    /// How many times it has been started.
    pub(crate) starts: AtomicU64,
    // --- exceptions (hal::exception) ---
    /// The innermost armed `catch` context of this CPU.
    pub(crate) catch: AtomicPtr<u8>,
    /// The last fault a probe absorbed: ESR, FAR, ELR.
    pub(crate) probe_fault: [AtomicU64; 3],
    /// The address `probe::exec` branches to while it runs (0 otherwise).
    pub(crate) exec_probe_armed: AtomicUsize,
    /// A fault inside an exception handler is being reported.
    pub(crate) nested: AtomicBool,
    /// The fault the last recovered `catch` saw (valid when `recovered_valid`).
    pub(crate) recovered_fault: [AtomicU64; 3],
    /// Whether `recovered_fault` holds the last recovery's fault (else it was a panic).
    pub(crate) recovered_valid: AtomicBool,
    /// Translation faults found spurious (valid by the time the handler looked) and retried.
    pub(crate) spurious_faults: AtomicU64,
    // --- work (hal::smp::run_on_all) ---
    /// `fn(arg, cpu)` to run, as a usize.
    pub(crate) work_fn: AtomicUsize,
    /// Its argument.
    pub(crate) work_arg: AtomicUsize,
    /// 0: none, 1: returned, 2: panicked, 3: faulted (`work_fault` says how).
    pub(crate) work_result: AtomicU8,
    /// The fault the work took: ESR, FAR, ELR.
    pub(crate) work_fault: [AtomicU64; 3],
    /// Set by the CPU when its work is over (before it powers itself off or idles).
    pub(crate) work_done: AtomicBool,
    // --- interrupts (hal::irq, hal::smp) ---
    /// Nesting depth of interrupt handling on this CPU (0: thread context).
    pub(crate) irq_depth: AtomicU32,
    /// What the CPU is doing: see `smp::state`.
    pub(crate) state: AtomicU8,
    /// A cross-CPU call for this CPU: `fn(arg)` and its argument (0: none).
    pub(crate) call_fn: AtomicUsize,
    /// The call's argument (a `&dyn Fn` made thin, see `smp::on_cpu`).
    pub(crate) call_arg: AtomicUsize,
    /// Set by the CPU when the call has run.
    pub(crate) call_done: AtomicBool,
    /// Asked to switch itself off (`smp::cpu_down`).
    pub(crate) down_requested: AtomicBool,
    /// Locks this CPU holds, counted per rank (`hal::sync`'s order check).
    pub(crate) held_locks: [AtomicU8; 16],
    /// Locks held that forbid memory reclaim on this CPU (`LockClass::forbids_reclaim`).
    pub(crate) no_reclaim: AtomicU32,
}

impl CpuData {
    const fn new(id: usize) -> Self {
        Self {
            exception_stack_top: AtomicU64::new(0),
            stack_top: AtomicU64::new(0),
            mmu: [const { AtomicU64::new(0) }; 5],
            _reserved: AtomicU64::new(0),
            id: AtomicUsize::new(id),
            mpidr: AtomicU64::new(0),
            seen_mpidr: AtomicU64::new(0),
            entry_el: AtomicU8::new(0),
            checked_in: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            catch: AtomicPtr::new(core::ptr::null_mut()),
            probe_fault: [const { AtomicU64::new(0) }; 3],
            exec_probe_armed: AtomicUsize::new(0),
            nested: AtomicBool::new(false),
            recovered_fault: [const { AtomicU64::new(0) }; 3],
            recovered_valid: AtomicBool::new(false),
            spurious_faults: AtomicU64::new(0),
            work_fn: AtomicUsize::new(0),
            work_arg: AtomicUsize::new(0),
            work_result: AtomicU8::new(0),
            work_fault: [const { AtomicU64::new(0) }; 3],
            work_done: AtomicBool::new(true),
            irq_depth: AtomicU32::new(0),
            state: AtomicU8::new(0),
            call_fn: AtomicUsize::new(0),
            call_arg: AtomicUsize::new(0),
            call_done: AtomicBool::new(true),
            down_requested: AtomicBool::new(false),
            held_locks: [const { AtomicU8::new(0) }; 16],
            no_reclaim: AtomicU32::new(0),
        }
    }

    /// Logical CPU number.
    #[inline]
    pub fn id(&self) -> usize {
        self.id.load(Ordering::Relaxed)
    }

    /// MPIDR affinity as the device tree lists it.
    pub fn mpidr(&self) -> u64 {
        self.mpidr.load(Ordering::Relaxed)
    }

    /// MPIDR affinity as the CPU read it itself when it last started (0 if never).
    pub fn seen_mpidr(&self) -> u64 {
        self.seen_mpidr.load(Ordering::Acquire)
    }

    /// The exception level the CPU entered at when it last started (0 if never).
    pub fn entry_el(&self) -> u8 {
        self.entry_el.load(Ordering::Acquire)
    }

    /// How many times the CPU was started (0 for the boot CPU).
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Acquire)
    }

    /// Spurious translation faults retried on this CPU.
    pub fn spurious_faults(&self) -> u64 {
        self.spurious_faults.load(Ordering::Relaxed)
    }
}

/// Every CPU's data, indexed by logical number. `TPIDR_EL1` of CPU `n` points at
/// `HAL_CPUS[n]` (asm reads it by this name).
#[unsafe(no_mangle)]
pub static HAL_CPUS: [CpuData; MAX_CPUS] = {
    let mut cpus = [const { CpuData::new(0) }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        cpus[i] = CpuData::new(i);
        i += 1;
    }
    cpus
};

/// This CPU's data (`TPIDR_EL1`; the boot CPU's before boot has set it).
#[inline]
pub fn this_cpu_data() -> &'static CpuData {
    &HAL_CPUS[this_cpu()]
}

/// On the host, each thread plays one CPU: CPU 0 unless it chose another with
/// [`host_play_cpu`] (host stress tests and benches run one thread per CPU).
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
mod host {
    extern crate std;
    use super::MAX_CPUS;
    use core::cell::Cell;
    use core::sync::atomic::{AtomicBool, Ordering};

    /// CPUs 1.. that a thread plays: each by one thread at a time.
    static OWNED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

    /// Gives the CPU back when its thread ends.
    struct Owner(Cell<usize>);

    impl Drop for Owner {
        fn drop(&mut self) {
            // Later thread-local destructors of this thread play CPU 0 (shared, swapped).
            let _ = CPU.try_with(|c| c.set(0));
            release(self.0.get());
        }
    }

    std::thread_local! {
        static CPU: Cell<usize> = const { Cell::new(0) };
        static OWNER: Owner = const { Owner(Cell::new(0)) };
    }

    fn release(n: usize) {
        if n != 0 {
            OWNED[n].store(false, Ordering::Release);
        }
    }

    #[inline]
    pub(super) fn cpu() -> usize {
        CPU.with(Cell::get)
    }

    /// Whether this thread is the one thread playing its CPU (any CPU but 0).
    #[inline]
    pub(super) fn owns_cpu() -> bool {
        cpu() != 0
    }

    pub(super) fn set(n: usize) {
        OWNER.with(|o| {
            release(o.0.replace(0));
            CPU.with(|c| c.set(0));
            if n != 0 {
                while OWNED[n].swap(true, Ordering::Acquire) {
                    std::thread::yield_now();
                }
                o.0.set(n);
            }
            CPU.with(|c| c.set(n));
        });
    }
}

/// Host only: the calling thread plays CPU `n % MAX_CPUS` from now on, for [`this_cpu`]
/// and everything per-CPU (a host stress test runs one thread per CPU). CPUs 1 and up are
/// played by one thread at a time: the call waits until no other thread plays `n`, and a
/// thread gives its CPU back when it plays another or ends. CPU 0 is every other thread's,
/// so [`crate::smp::PerCpu`] claims its slot with an atomic swap, while a thread playing CPU
/// 1 or up claims its own with a plain load and store, as on target.
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
pub fn host_play_cpu(n: usize) {
    host::set(n % MAX_CPUS);
}

/// Host only: whether the calling thread is the one thread playing its CPU (see
/// [`host_play_cpu`]).
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
#[inline]
pub(crate) fn host_owns_cpu() -> bool {
    host::owns_cpu()
}

/// This CPU's logical number (0 for the boot CPU): on target the index of the
/// `HAL_CPUS` element `TPIDR_EL1` points at (computed, not loaded: the per-CPU fast paths
/// start here), on the host the CPU the calling thread plays.
#[inline]
pub fn this_cpu() -> usize {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let p: usize;
        // SAFETY: reading TPIDR_EL1 has no side effect.
        unsafe { core::arch::asm!("mrs {}, tpidr_el1", out(reg) p, options(nomem, nostack, preserves_flags)) };
        let base = HAL_CPUS.as_ptr() as usize;
        let size = core::mem::size_of::<CpuData>();
        // Only ever set to an element of HAL_CPUS (entry.S for CPU 0, the secondary entry
        // for the others); anything else (0 before entry.S set it) means CPU 0.
        let index = p.wrapping_sub(base) / size;
        if p >= base && (p - base).is_multiple_of(size) && index < MAX_CPUS {
            return index;
        }
        0
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        host::cpu()
    }
}

/// CPU `n`'s data, if `n < MAX_CPUS`.
pub fn cpu_data(n: usize) -> Option<&'static CpuData> {
    HAL_CPUS.get(n)
}

const _: () = assert!(core::mem::offset_of!(CpuData, exception_stack_top) == 0);
const _: () = assert!(core::mem::offset_of!(CpuData, stack_top) == 8);
const _: () = assert!(core::mem::offset_of!(CpuData, mmu) == 16);
