//! [`PerCpu<T>`]: one `T` per CPU, each reached only by its own CPU, a nested use (from an
//! interrupt handler) refused.

use crate::dtb::MAX_CPUS;
use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, AtomicBool, Ordering};

/// The orderings of `busy`'s load and store. On target only its own CPU touches `busy`, and
/// one CPU observes its own accesses in program order (an exception is context
/// synchronizing): the compiler fences around them are all the ordering needed, and plain
/// loads and stores avoid what `ldar`/`stlr` cost under QEMU with several vCPUs (a host
/// fence each). On the host, threads hand CPUs over to each other, so acquire/release.
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
const ACQUIRE: Ordering = Ordering::Relaxed;
#[cfg(all(target_arch = "aarch64", target_os = "none"))]
const RELEASE: Ordering = Ordering::Relaxed;
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
const ACQUIRE: Ordering = Ordering::Acquire;
#[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
const RELEASE: Ordering = Ordering::Release;

/// One value per CPU. [`PerCpu::try_with`] hands the calling CPU's value to a closure; no
/// other CPU reaches that value, and a nested use on this CPU meanwhile (an interrupt
/// handler, or an exception taken inside the closure) is refused rather than aliased, so
/// code that interrupt handlers reach falls back to a slow path. This kernel has no
/// preemption: code inside the closure stays on its CPU.
///
/// Shared between CPUs only for `T: Send` (a value may be created on one CPU and used on
/// another): a `PerCpu` of a thread-bound type such as `Rc` is not `Sync`, so it cannot be a
/// `static` nor be reached from two CPUs:
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<hal::smp::PerCpu<std::rc::Rc<u64>>>();
/// ```
///
/// Every CPU's value at once ([`PerCpu::get_mut`]) needs `&mut self`, which no shared
/// `PerCpu` (a `static`, or one reached from another CPU) gives:
///
/// ```compile_fail,E0596
/// fn peek(per: &hal::smp::PerCpu<u64>) -> Option<&mut u64> {
///     per.get_mut(1)
/// }
/// ```
///
/// The closure's `&mut T` cannot leave it (it would outlive the claim):
///
/// ```compile_fail
/// fn leak(per: &hal::smp::PerCpu<u64>) -> &mut u64 {
///     per.with(|v| v)
/// }
/// ```
pub struct PerCpu<T> {
    slots: [Slot<T>; MAX_CPUS],
}

/// One CPU's value and its in-use flag, on cache lines of their own (no false sharing
/// between CPUs).
#[repr(align(64))]
struct Slot<T> {
    value: UnsafeCell<T>,
    busy: AtomicBool,
}

// SAFETY: each slot is only ever reached by the CPU it belongs to (`try_with` indexes by
// `this_cpu()`, and no code moves between CPUs: there is no preemption), under the slot's
// `busy` flag, so no two `&mut T` to one slot exist at once: on target what comes between
// `busy`'s load and store on the same CPU (an interrupt handler, an exception) runs to
// completion, and clears the flag if it set it, before the interrupted code goes on; no
// other CPU indexes this slot. On the host, threads play CPUs: CPU 1 and up by one thread at a
// time (`host_play_cpu` hands each to one thread), which claims its slot as on target;
// CPU 0 by every other thread, which claims slot 0 with an atomic swap. Values move between threads of execution
// only as CPUs run different code over time, which `T: Send` allows.
unsafe impl<T: Send> Sync for PerCpu<T> {}

impl<T> PerCpu<T> {
    /// A value per CPU, each made by `init(cpu)`.
    pub fn new(init: impl Fn(usize) -> T) -> Self {
        Self {
            slots: core::array::from_fn(|cpu| Slot { value: UnsafeCell::new(init(cpu)), busy: AtomicBool::new(false) }),
        }
    }

    /// Runs `f` on this CPU's value; `None` when this CPU's value is already in use further
    /// up the stack: an interrupt handler (or exception) that came while the interrupted
    /// code was inside `f` on the same value. Interrupts stay as they are (masking them
    /// would cost two `DAIF` writes per call, which QEMU makes dear): the busy flag sends
    /// the handler to its slow path instead, as Linux's `pcp_spin_trylock` does.
    ///
    /// The claim takes no atomic read-modify-write on target: `busy` is only ever touched
    /// by its own CPU, and whatever interrupts the load and the store runs to completion
    /// before the interrupted code goes on (compiler fences keep the accesses in order). On
    /// the host a thread playing CPU 1 or up does the same; CPU 0, which every other thread
    /// plays, is claimed with a swap.
    #[inline]
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let slot = &self.slots[super::this_cpu()];
        if !Self::claim(&slot.busy) {
            return None;
        }
        // SAFETY: `busy` was clear and is now set by us: no other reference to this slot's
        // value exists (see the `Sync` argument), until we clear it below.
        let r = f(unsafe { &mut *slot.value.get() });
        // `barrier()`: nothing of `f` moves past the store below.
        compiler_fence(Ordering::SeqCst);
        slot.busy.store(false, RELEASE);
        Some(r)
    }

    /// Sets `busy`; false when it was set already (a nested use on this CPU).
    #[inline(always)]
    fn claim(busy: &AtomicBool) -> bool {
        #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
        if !super::cpu::host_owns_cpu() {
            // Several host threads play CPU 0.
            return !busy.swap(true, Ordering::Acquire);
        }
        // Only this CPU (on the host: this thread) reaches `busy`; what interrupts it
        // between the load and the store (a handler, an exception) runs to completion
        // first. `barrier()` after the store: no access of the closure moves above it.
        if busy.load(ACQUIRE) {
            return false;
        }
        busy.store(true, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        true
    }

    /// [`PerCpu::try_with`] that panics on a nested call.
    ///
    /// # Panics
    /// When this CPU's value is already in use further up the stack.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.try_with(f).expect("PerCpu::with nested on the same CPU")
    }

    /// Every CPU's value, for the caller alone (no CPU can be inside `with`: `&mut self`).
    pub fn get_mut(&mut self, cpu: usize) -> Option<&mut T> {
        self.slots.get_mut(cpu).map(|s| s.value.get_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cpu_has_its_own_value_and_nesting_is_refused() {
        let per = PerCpu::new(|cpu| cpu as u64 * 10);
        // The host is CPU 0.
        assert_eq!(per.with(|v| *v), 0);
        per.with(|v| *v += 5);
        assert_eq!(per.with(|v| *v), 5);
        assert_eq!(per.with(|_| per.try_with(|_| ())), None, "nested use refused");
        assert_eq!(per.try_with(|v| *v), Some(5), "free again afterwards");
        let mut per = per;
        assert_eq!(per.get_mut(3).copied(), Some(30));
        assert!(per.get_mut(MAX_CPUS).is_none());
    }
}
