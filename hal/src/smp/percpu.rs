//! [`PerCpu<T>`]: one `T` per CPU, each reached only by its own CPU with interrupts masked.

use crate::dtb::MAX_CPUS;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// One value per CPU. [`PerCpu::with`] hands the calling CPU's value to a closure that runs
/// with IRQ and FIQ masked, so neither another CPU nor an interrupt handler on this one
/// can reach the same value meanwhile; a nested `with` on the same value (from an exception
/// taken inside the closure) is refused rather than aliased.
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
/// The closure's `&mut T` cannot leave it (it would outlive the masked section):
///
/// ```compile_fail
/// fn leak(per: &hal::smp::PerCpu<u64>) -> &mut u64 {
///     per.with(|v| v)
/// }
/// ```
pub struct PerCpu<T> {
    slots: [Slot<T>; MAX_CPUS],
}

struct Slot<T> {
    value: UnsafeCell<T>,
    busy: AtomicBool,
}

// SAFETY: each slot is only ever reached by the CPU it belongs to (`with` indexes by
// `this_cpu()`), inside a closure with interrupts masked and under the slot's `busy` flag,
// so no two `&mut T` to one slot exist at once. Values move between threads of execution
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
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let saved = crate::cpu::mask_interrupts();
        let slot = &self.slots[super::this_cpu()];
        let r = if slot.busy.swap(true, Ordering::Acquire) {
            None
        } else {
            // SAFETY: `busy` was clear and is now set by us: no other reference to this
            // slot's value exists (see the `Sync` argument), until we clear it below.
            let r = f(unsafe { &mut *slot.value.get() });
            slot.busy.store(false, Ordering::Release);
            Some(r)
        };
        crate::cpu::restore_interrupts(saved);
        r
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
