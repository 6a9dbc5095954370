//! Locks that know interrupts and their place in the lock order.
//!
//! - [`SpinLock<T>`]: a spin lock for data no interrupt handler reaches.
//! - [`IrqSpinLock<T>`]: a spin lock whose data an interrupt handler can reach: it masks
//!   IRQ and FIQ on the local CPU while held (Linux's `spin_lock_irqsave`), so a handler on
//!   the same CPU cannot spin on a lock its own interrupted thread holds.
//!
//! Each lock belongs to a [`LockClass`] with a rank: the documented order, lowest taken
//! first — vmalloc (10) → kernel tables (20) → slab (30) → buddy (40); classes added
//! later slot in between. With the `lock-checks` feature (on in the on-target test
//! suites), two checks run on every acquisition and report what they find on the console
//! (counted by [`reports`]):
//! - **order**: taking a lock while this CPU holds one of a higher rank;
//! - **interrupt context**: a class taken both in interrupt context and, elsewhere, held
//!   with interrupts enabled — the pattern that deadlocks when the interrupt arrives while
//!   the thread holds it (lockdep's "IRQ-safe → IRQ-unsafe").
//!
//! Without the feature the checks compile away.

use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A class of locks: a name for reports and a rank in the lock order (1..=15).
#[derive(Debug)]
pub struct LockClass {
    /// Shown in reports.
    pub name: &'static str,
    /// Lower ranks are taken first; holding rank `h`, only ranks `>= h` may be taken.
    pub rank: u8,
    taken_in_irq: AtomicBool,
    held_irqs_on: AtomicBool,
    reported_irq: AtomicBool,
    /// Acquisitions that found the lock taken and had to spin.
    contended: AtomicU64,
    /// Whether holding a lock of this class forbids memory reclaim on the CPU (see
    /// [`reclaim_forbidden`]).
    forbids_reclaim: bool,
}

impl LockClass {
    /// A class of rank `rank` (clamped to 1..=15).
    pub const fn new(name: &'static str, rank: u8) -> Self {
        let rank = if rank == 0 {
            1
        } else if rank > 15 {
            15
        } else {
            rank
        };
        Self {
            name,
            rank,
            taken_in_irq: AtomicBool::new(false),
            held_irqs_on: AtomicBool::new(false),
            reported_irq: AtomicBool::new(false),
            contended: AtomicU64::new(0),
            forbids_reclaim: false,
        }
    }

    /// As [`LockClass::new`], for a class under whose locks memory reclaim must not run
    /// (the allocator's shrinkers may need them: the vmalloc instance, the kernel's
    /// tables). Holding one makes [`reclaim_forbidden`] true on the CPU.
    pub const fn forbidding_reclaim(name: &'static str, rank: u8) -> Self {
        let mut c = Self::new(name, rank);
        c.forbids_reclaim = true;
        c
    }

    /// How many acquisitions of a lock of this class found it taken (and spun) since boot
    /// or the last [`LockClass::take_contended`]. Counted on the contended path only, so
    /// an uncontended acquisition costs what it did.
    pub fn contended(&self) -> u64 {
        self.contended.load(Ordering::Relaxed)
    }

    /// [`LockClass::contended`], reset to 0 (for a bench that reports per run).
    pub fn take_contended(&self) -> u64 {
        self.contended.swap(0, Ordering::Relaxed)
    }
}

/// Takes `m`, counting a contended acquisition in `class`.
#[inline(always)]
fn lock_counted<'a, T>(m: &'a spin::Mutex<T>, class: &LockClass) -> spin::MutexGuard<'a, T> {
    match m.try_lock() {
        Some(g) => g,
        None => {
            class.contended.fetch_add(1, Ordering::Relaxed);
            m.lock()
        }
    }
}

/// The classes of the documented order. Ranks 1–15: vm_map_ram blocks 9 → vmalloc 10 →
/// kernel tables 11 → slab 12 → buddy 13 (spaced so that later classes, per-CPU lists
/// among them, fit).
pub mod classes {
    use super::LockClass;
    /// `vm_map_ram`'s lists of clean and dirty blocks (taken once per block, not per call).
    pub static VMAP_BLOCKS: LockClass = LockClass::new("vm_map_ram blocks", 9);
    /// The vmalloc instance (free space, busy areas, purge).
    pub static VMALLOC: LockClass = LockClass::forbidding_reclaim("vmalloc", 10);
    /// The kernel's translation tables (`hal::kmap`).
    pub static KERNEL_TABLES: LockClass = LockClass::forbidding_reclaim("kernel tables", 11);
    /// A slab cache.
    pub static SLAB: LockClass = LockClass::new("slab", 12);
    /// The buddy allocator.
    pub static BUDDY: LockClass = LockClass::new("buddy", 13);
}

static REPORTS: AtomicU64 = AtomicU64::new(0);

/// How many lock-check reports were printed since boot (0 without `lock-checks`).
pub fn reports() -> u64 {
    REPORTS.load(Ordering::Relaxed)
}

/// Returns the report count and resets it (for a test that triggers a check on purpose).
pub fn take_reports() -> u64 {
    REPORTS.swap(0, Ordering::AcqRel)
}

/// Whether the checks are compiled in.
pub const CHECKS: bool = cfg!(feature = "lock-checks");

fn report(args: core::fmt::Arguments<'_>) {
    REPORTS.fetch_add(1, Ordering::Relaxed);
    crate::println!("\n*** lock check on CPU {}: {args}", crate::smp::this_cpu());
}

/// Whether this CPU holds a lock under which memory reclaim must not run (a class made
/// with [`LockClass::forbidding_reclaim`]): the page allocator then fails rather than
/// call its shrinkers. Counted always (one per-CPU load and store per such lock), not only
/// with `lock-checks`.
#[inline]
pub fn reclaim_forbidden() -> bool {
    crate::smp::this_cpu_data().no_reclaim.load(Ordering::Relaxed) != 0
}

/// Counts a reclaim-forbidding lock taken (`+1`) or released (`-1`) on this CPU: only this
/// CPU writes its counter, so a load and a store do.
#[inline(always)]
fn count_no_reclaim(class: &LockClass, up: bool) {
    if class.forbids_reclaim {
        let c = &crate::smp::this_cpu_data().no_reclaim;
        #[cfg(all(target_arch = "aarch64", target_os = "none"))]
        {
            let v = c.load(Ordering::Relaxed);
            c.store(if up { v + 1 } else { v.saturating_sub(1) }, Ordering::Relaxed);
        }
        // On the host many threads play CPU 0.
        #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
        if up {
            c.fetch_add(1, Ordering::Relaxed);
        } else {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Records that this CPU takes `class` (with interrupts as they are now), checking both
/// rules first.
#[inline]
fn acquire(class: &'static LockClass) {
    count_no_reclaim(class, true);
    if !CHECKS {
        return;
    }
    let cpu = crate::smp::this_cpu_data();
    let held = &cpu.held_locks;
    if let Some(higher) = (class.rank as usize + 1..held.len()).rev().find(|&r| held[r].load(Ordering::Relaxed) > 0) {
        report(format_args!(
            "lock order: taking \"{}\" (rank {}) while holding a lock of rank {higher}",
            class.name, class.rank
        ));
    }
    if crate::irq::in_interrupt() {
        class.taken_in_irq.store(true, Ordering::Relaxed);
    } else if crate::irq::irqs_enabled() {
        class.held_irqs_on.store(true, Ordering::Relaxed);
    }
    if class.taken_in_irq.load(Ordering::Relaxed)
        && class.held_irqs_on.load(Ordering::Relaxed)
        && !class.reported_irq.swap(true, Ordering::Relaxed)
    {
        report(format_args!(
            "\"{}\" is taken in interrupt context and also held with interrupts enabled: an interrupt on the holder's CPU deadlocks (use an IrqSpinLock)",
            class.name
        ));
    }
    held[class.rank as usize].fetch_add(1, Ordering::Relaxed);
}

#[inline]
fn release(class: &'static LockClass) {
    count_no_reclaim(class, false);
    if CHECKS {
        crate::smp::this_cpu_data().held_locks[class.rank as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Clears a class's interrupt-context history (for a test that triggers the check).
pub fn forget_irq_history(class: &LockClass) {
    class.taken_in_irq.store(false, Ordering::Relaxed);
    class.held_irqs_on.store(false, Ordering::Relaxed);
    class.reported_irq.store(false, Ordering::Relaxed);
}

/// A spin lock of a [`LockClass`], for data no interrupt handler reaches.
pub struct SpinLock<T> {
    inner: spin::Mutex<T>,
    class: &'static LockClass,
}

impl<T> SpinLock<T> {
    /// A lock of `class` around `value`.
    pub const fn new(class: &'static LockClass, value: T) -> Self {
        Self { inner: spin::Mutex::new(value), class }
    }

    /// Takes the lock, spinning.
    pub fn lock(&self) -> SpinLockGuard<'_, T> {
        acquire(self.class);
        SpinLockGuard { guard: lock_counted(&self.inner, self.class), class: self.class }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<SpinLockGuard<'_, T>> {
        let guard = self.inner.try_lock()?;
        acquire(self.class);
        Some(SpinLockGuard { guard, class: self.class })
    }

    /// The value, through exclusive access to the lock.
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }
}

/// Holds a [`SpinLock`].
pub struct SpinLockGuard<'a, T> {
    guard: spin::MutexGuard<'a, T>,
    class: &'static LockClass,
}

impl<T> Drop for SpinLockGuard<'_, T> {
    fn drop(&mut self) {
        release(self.class);
    }
}

impl<T> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// A spin lock of a [`LockClass`] whose data interrupt handlers reach: IRQ and FIQ are
/// masked on this CPU from before it is taken until after it is released.
pub struct IrqSpinLock<T> {
    inner: spin::Mutex<T>,
    class: &'static LockClass,
}

impl<T> IrqSpinLock<T> {
    /// A lock of `class` around `value`.
    pub const fn new(class: &'static LockClass, value: T) -> Self {
        Self { inner: spin::Mutex::new(value), class }
    }

    /// Masks interrupts, then takes the lock, spinning.
    pub fn lock(&self) -> IrqSpinLockGuard<'_, T> {
        let saved = crate::cpu::mask_interrupts();
        acquire(self.class);
        IrqSpinLockGuard { guard: Some(lock_counted(&self.inner, self.class)), class: self.class, saved }
    }

    /// Takes the lock if it is free (interrupts masked while held).
    pub fn try_lock(&self) -> Option<IrqSpinLockGuard<'_, T>> {
        let saved = crate::cpu::mask_interrupts();
        match self.inner.try_lock() {
            Some(guard) => {
                acquire(self.class);
                Some(IrqSpinLockGuard { guard: Some(guard), class: self.class, saved })
            }
            None => {
                crate::cpu::restore_interrupts(saved);
                None
            }
        }
    }
}

/// Holds an [`IrqSpinLock`]; dropping it releases the lock, then restores the masks.
pub struct IrqSpinLockGuard<'a, T> {
    guard: Option<spin::MutexGuard<'a, T>>,
    class: &'static LockClass,
    saved: u64,
}

impl<T> Drop for IrqSpinLockGuard<'_, T> {
    fn drop(&mut self) {
        self.guard = None;
        release(self.class);
        crate::cpu::restore_interrupts(self.saved);
    }
}

impl<T> Deref for IrqSpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("held until drop")
    }
}

impl<T> DerefMut for IrqSpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("held until drop")
    }
}
