//! `vfree` from interrupt handlers, deferred (Linux's `vfree_atomic`): the vmalloc and
//! kernel-table locks are never taken in interrupt context, so a handler's `vfree` queues
//! the address on its CPU's ring, and the next thread-context vmalloc call on that CPU
//! frees it, or the next `kernel::purge` from any CPU (which drains every CPU's ring, that
//! of a CPU switched off meanwhile included).
//!
//! Each CPU has a ring of [`DEFERRED_SLOTS`] addresses: only that CPU's handlers add to it
//! (a compare-exchange on the head, so a nested handler is safe too), and one drainer at a
//! time, in thread context, takes from it (a flag; another CPU may drain it at a purge).
//! A full ring refuses the `vfree` with [`VmallocError::InInterrupt`], the state unchanged.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

#[cfg(test)]
extern crate std;

use hal::dtb::MAX_CPUS;
use hal::VirtAddr;

use crate::vmalloc::VmallocError;

/// Addresses a CPU's ring holds.
pub const DEFERRED_SLOTS: usize = 256;

struct Ring {
    slots: [AtomicU64; DEFERRED_SLOTS],
    /// Next slot to fill (only this CPU's handlers move it).
    head: AtomicU32,
    /// Next slot to drain (only the drainer holding `draining` moves it).
    tail: AtomicU32,
    draining: AtomicBool,
}

static RINGS: [Ring; MAX_CPUS] = [const {
    Ring {
        slots: [const { AtomicU64::new(0) }; DEFERRED_SLOTS],
        head: AtomicU32::new(0),
        tail: AtomicU32::new(0),
        draining: AtomicBool::new(false),
    }
}; MAX_CPUS];

/// Frees whose address was refused when drained (logged; a handler cannot be told).
static FAILED: AtomicU64 = AtomicU64::new(0);
/// Frees completed from the rings.
static DONE: AtomicU64 = AtomicU64::new(0);

/// Queues `addr` for freeing on this CPU (interrupt context).
///
/// # Errors
/// [`VmallocError::InInterrupt`] when this CPU's ring is full (nothing queued).
pub(super) fn push(addr: VirtAddr) -> Result<(), VmallocError> {
    let ring = &RINGS[hal::smp::this_cpu()];
    let mut head = ring.head.load(Ordering::Relaxed);
    loop {
        if head.wrapping_sub(ring.tail.load(Ordering::Acquire)) as usize >= DEFERRED_SLOTS {
            return Err(VmallocError::InInterrupt);
        }
        // Claim the slot first (a nested handler on this CPU claims the next one).
        match ring.head.compare_exchange_weak(head, head.wrapping_add(1), Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => break,
            Err(h) => head = h,
        }
    }
    // Release: the drainer that sees the address (non-zero) sees it whole.
    ring.slots[head as usize % DEFERRED_SLOTS].store(addr.as_u64(), Ordering::Release);
    Ok(())
}

/// Whether this CPU's ring holds anything (one load pair: the fast path's check).
#[inline]
pub(super) fn pending_here() -> bool {
    let ring = &RINGS[hal::smp::this_cpu()];
    ring.head.load(Ordering::Relaxed) != ring.tail.load(Ordering::Relaxed)
}

/// Frees what `cpu`'s ring holds through `free` (thread context); returns how many.
pub(super) fn drain(cpu: usize, free: impl Fn(VirtAddr) -> Result<(), VmallocError>) -> usize {
    let Some(ring) = RINGS.get(cpu) else { return 0 };
    if ring.draining.swap(true, Ordering::Acquire) {
        return 0;
    }
    let mut n = 0;
    loop {
        let tail = ring.tail.load(Ordering::Relaxed);
        if tail == ring.head.load(Ordering::Acquire) {
            break;
        }
        let slot = &ring.slots[tail as usize % DEFERRED_SLOTS];
        // A claimed slot is filled right after its claim; wait for the store.
        let addr = loop {
            let a = slot.swap(0, Ordering::Acquire);
            if a != 0 {
                break a;
            }
            core::hint::spin_loop();
        };
        ring.tail.store(tail.wrapping_add(1), Ordering::Release);
        match free(VirtAddr::new(addr)) {
            Ok(()) => DONE.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                log::error!("vfree from an interrupt handler of {addr:#x}: {e}");
                FAILED.fetch_add(1, Ordering::Relaxed)
            }
        };
        n += 1;
    }
    ring.draining.store(false, Ordering::Release);
    n
}

/// Deferred frees: (waiting on every CPU's ring, completed, refused when drained).
pub fn deferred_stats() -> (usize, u64, u64) {
    let waiting = RINGS
        .iter()
        .map(|r| r.head.load(Ordering::Relaxed).wrapping_sub(r.tail.load(Ordering::Relaxed)) as usize)
        .sum();
    (waiting, DONE.load(Ordering::Relaxed), FAILED.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_order_refuses_when_full_and_drains_once() {
        // The host thread plays CPU 0 (no other test uses the rings).
        let base = 0xffff_0000_4000_0000u64;
        for i in 0..DEFERRED_SLOTS as u64 {
            push(VirtAddr::new(base + i * 4096)).unwrap();
        }
        assert!(pending_here());
        assert_eq!(push(VirtAddr::new(base)), Err(VmallocError::InInterrupt), "a full ring refuses");
        assert_eq!(deferred_stats().0, DEFERRED_SLOTS);
        let seen = std::sync::Mutex::new(std::vec::Vec::new());
        let n = drain(0, |a| {
            seen.lock().unwrap().push(a.as_u64());
            if a.as_u64() == base {
                Err(VmallocError::NotAnArea)
            } else {
                Ok(())
            }
        });
        assert_eq!(n, DEFERRED_SLOTS);
        let seen = seen.into_inner().unwrap();
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 4096), "in the order queued");
        assert!(!pending_here());
        let (waiting, done, failed) = deferred_stats();
        assert_eq!((waiting, done, failed), (0, DEFERRED_SLOTS as u64 - 1, 1));
        // Room again, and a second drainer while one runs finds nothing to do.
        push(VirtAddr::new(base)).unwrap();
        RINGS[0].draining.store(true, Ordering::Relaxed);
        assert_eq!(drain(0, |_| Ok(())), 0);
        RINGS[0].draining.store(false, Ordering::Relaxed);
        assert_eq!(drain(0, |_| Ok(())), 1);
    }
}
