//! [`PerCpu<T>`]: one `T` per CPU, each reached only by its own CPU with interrupts masked.

use crate::dtb::MAX_CPUS;
use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, AtomicBool, Ordering};

/// One value per CPU. [`PerCpu::with`] hands the calling CPU's value to a closure that runs
/// with IRQ and FIQ masked, so neither another CPU nor an interrupt handler on this one
/// can reach the same value meanwhile; a nested `with` on the same value (from an exception
/// taken inside the closure) is refused rather than aliased.
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

// SAFETY: each slot is only ever reached by the CPU it belongs to (`with` indexes by
// `this_cpu()`), inside a closure with interrupts masked and under the slot's `busy` flag,
// so no two `&mut T` to one slot exist at once: on target nothing but an exception on the
// same CPU can come between `busy`'s load and store (interrupts are masked, and no other
// CPU indexes this slot). On the host, threads play CPUs: CPU 1 and up by one thread at a
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

    /// Runs `f` on this CPU's value with IRQ and FIQ masked; `None` when this CPU's value
    /// is already in use further up the stack (a nested call from an exception).
    ///
    /// On target the fast path takes no atomic read-modify-write: `busy` is only ever
    /// touched by its own CPU with interrupts masked, so a plain load and store (with
    /// compiler fences against an exception taken inside `f`) suffice. On the host a thread
    /// playing CPU 1 or up does the same; CPU 0, which every other thread plays, is claimed
    /// with a swap.
    #[inline]
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let saved = crate::cpu::mask_interrupts();
        let slot = &self.slots[super::this_cpu()];
        let r = if !Self::claim(&slot.busy) {
            None
        } else {
            // SAFETY: `busy` was clear and is now set by us: no other reference to this
            // slot's value exists (see the `Sync` argument), until we clear it below.
            let r = f(unsafe { &mut *slot.value.get() });
            compiler_fence(Ordering::Release);
            slot.busy.store(false, Ordering::Release);
            Some(r)
        };
        crate::cpu::restore_interrupts(saved);
        r
    }

    /// Sets `busy`; false when it was set already (a nested use on this CPU).
    #[inline(always)]
    fn claim(busy: &AtomicBool) -> bool {
        #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
        if !super::cpu::host_owns_cpu() {
            // Several host threads play CPU 0.
            return !busy.swap(true, Ordering::Acquire);
        }
        // Only this CPU (on the host: this thread) reaches `busy`, and with interrupts
        // masked only an exception taken inside `f` can come between the load and store.
        if busy.load(Ordering::Relaxed) {
            return false;
        }
        busy.store(true, Ordering::Relaxed);
        compiler_fence(Ordering::Acquire);
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
