//! `vfree` from interrupt handlers, deferred (Linux's `vfree_atomic`): the vmalloc and
//! kernel-table locks are never taken in interrupt context, so a handler's `vfree` queues
//! the address on its CPU's ring, and the next thread-context vmalloc call on that CPU
//! frees it, or the next `kernel::purge` from any CPU (which drains every CPU's ring, that
//! of a CPU switched off meanwhile included), or, for a CPU switched off, the hotplug
//! "dead" hook on the CPU that switched it off.
//!
//! Each CPU has a ring of [`DEFERRED_SLOTS`] addresses: only that CPU's handlers add to it
//! (a compare-exchange on the head, so a nested handler is safe too), and one drainer at a
//! time, in thread context, takes from it (a flag; another CPU may drain it at a purge or once it is off).
//! A full ring refuses the `vfree` with [`VmallocError::InInterrupt`], the state unchanged.
//! A drain that meets a slot claimed but not yet filled (a handler on another CPU between
//! its two steps) stops there: what follows waits for that CPU's next vmalloc-family call
//! or the next purge (a CPU switched off has no handler in flight, so a purge then empties
//! its ring).

use core::sync::atomic::Ordering;

use crate::sync::{AtomicBool, AtomicU32, AtomicU64};

#[cfg(test)]
extern crate std;

use hal::dtb::MAX_CPUS;
use hal::VirtAddr;

use crate::vmalloc::VmallocError;

/// Addresses a CPU's ring holds.
pub const DEFERRED_SLOTS: usize = 256;

/// One CPU's ring of `N` addresses (0 is never an address: it marks an empty slot). The
/// protocol, model-checked under loom (`cargo test -p memory --lib --release` with
/// `RUSTFLAGS="--cfg loom"`, see the tests below):
/// - a pusher claims slot `head` with a compare-exchange on `head`, then stores the address
///   into it (release);
/// - one drainer at a time (the `draining` flag) takes slot `tail` once `tail != head`,
///   empties it and moves `tail` on; a claimed slot not yet filled ends the drain (the
///   next one takes it), so a drainer never waits for a handler. (A load and a store, not
///   a swap: only the drainer empties a slot; and the flag is taken with a
///   compare-exchange: loom 0.7 mis-models a swap racing a store, tokio-rs/loom#254.)
struct Ring<const N: usize> {
    slots: [AtomicU64; N],
    /// Next slot to fill (only this CPU's handlers move it).
    head: AtomicU32,
    /// Next slot to drain (only the drainer holding `draining` moves it).
    tail: AtomicU32,
    draining: AtomicBool,
}

impl<const N: usize> Ring<N> {
    /// `head % N` and `tail % N` stay in step across the u32 wrap only for a power of two.
    const POWER_OF_TWO: () = assert!(N.is_power_of_two(), "a ring's size is a power of two");

    /// An empty ring.
    #[cfg(not(loom))]
    const fn new() -> Self {
        Ring {
            slots: [const { AtomicU64::new(0) }; N],
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// An empty ring (loom's atomics have no `const` constructor; only the loom tests
    /// make rings then).
    #[cfg(all(loom, test))]
    fn new() -> Self {
        Ring {
            slots: core::array::from_fn(|_| AtomicU64::new(0)),
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// Queues `addr` (non-zero); `Err(())` when the ring is full (nothing queued).
    fn push(&self, addr: u64) -> Result<(), ()> {
        let () = Self::POWER_OF_TWO;
        debug_assert_ne!(addr, 0);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            if head.wrapping_sub(self.tail.load(Ordering::Acquire)) as usize >= N {
                return Err(());
            }
            // Claim the slot first (a nested handler on this CPU claims the next one).
            match self.head.compare_exchange_weak(head, head.wrapping_add(1), Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        // Release: the drainer that sees the address (non-zero) sees it whole.
        self.slots[head as usize % N].store(addr, Ordering::Release);
        Ok(())
    }

    /// Whether the ring holds anything.
    #[inline]
    fn pending(&self) -> bool {
        self.head.load(Ordering::Relaxed) != self.tail.load(Ordering::Relaxed)
    }

    /// Hands every queued address to `free`, in order, unless another drainer is at it;
    /// returns how many.
    fn drain(&self, mut free: impl FnMut(u64)) -> usize {
        if self.draining.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return 0;
        }
        let mut n = 0;
        loop {
            let tail = self.tail.load(Ordering::Relaxed);
            if tail == self.head.load(Ordering::Acquire) {
                break;
            }
            let slot = &self.slots[tail as usize % N];
            // A slot claimed but not yet filled (its handler is between the two steps, on
            // another CPU than this drainer): left, with what follows, to the next drain.
            let addr = slot.load(Ordering::Acquire);
            if addr == 0 {
                break;
            }
            // Emptied before `tail` moves on (release): the pusher that reuses this slot
            // claims it only after seeing the new `tail`, so its store comes after.
            slot.store(0, Ordering::Relaxed);
            self.tail.store(tail.wrapping_add(1), Ordering::Release);
            free(addr);
            n += 1;
        }
        self.draining.store(false, Ordering::Release);
        n
    }

    /// Addresses queued.
    fn waiting(&self) -> usize {
        self.head.load(Ordering::Relaxed).wrapping_sub(self.tail.load(Ordering::Relaxed)) as usize
    }
}

#[cfg(not(loom))]
static RINGS: [Ring<DEFERRED_SLOTS>; MAX_CPUS] = [const { Ring::new() }; MAX_CPUS];

/// Every CPU's ring.
#[cfg(not(loom))]
fn rings() -> &'static [Ring<DEFERRED_SLOTS>; MAX_CPUS] {
    &RINGS
}

/// Every CPU's ring: not modelled under loom, which checks the ring itself (a loom atomic
/// lives inside one model run, never in a `static`).
#[cfg(loom)]
fn rings() -> &'static [Ring<DEFERRED_SLOTS>; MAX_CPUS] {
    unreachable!("the kernel's rings are not used in loom builds")
}

/// Frees whose address was refused when drained (logged; a handler cannot be told).
static FAILED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Frees completed from the rings.
static DONE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Queues `addr` for freeing on this CPU (interrupt context).
///
/// # Errors
/// [`VmallocError::InInterrupt`] when this CPU's ring is full (nothing queued).
pub(super) fn push(addr: VirtAddr) -> Result<(), VmallocError> {
    rings()[hal::smp::this_cpu()].push(addr.as_u64()).map_err(|()| VmallocError::InInterrupt)
}

/// Whether this CPU's ring holds anything (one load pair: the fast path's check).
#[inline]
pub(super) fn pending_here() -> bool {
    rings()[hal::smp::this_cpu()].pending()
}

/// Frees what `cpu`'s ring holds through `free` (thread context); returns how many.
pub(super) fn drain(cpu: usize, free: impl Fn(VirtAddr) -> Result<(), VmallocError>) -> usize {
    let Some(ring) = rings().get(cpu) else { return 0 };
    ring.drain(|addr| match free(VirtAddr::new(addr)) {
        Ok(()) => {
            DONE.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            log::error!("vfree from an interrupt handler of {addr:#x}: {e}");
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
    })
}

/// Deferred frees: (waiting on every CPU's ring, completed, refused when drained).
pub fn deferred_stats() -> (usize, u64, u64) {
    let waiting = rings().iter().map(Ring::waiting).sum();
    (waiting, DONE.load(Ordering::Relaxed), FAILED.load(Ordering::Relaxed))
}

#[cfg(all(test, not(loom)))]
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

/// The ring's protocol under loom, every interleaving of the real code (up to loom's
/// bounds): `RUSTFLAGS="--cfg loom" cargo test -p memory --lib --release loom` (run by
/// `./x test`). Checked to fail when a drainer takes a claimed slot before its store, and
/// when two drainers may run at once (the `draining` flag removed).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::Ring;
    use loom::sync::Arc;
    use loom::thread;

    /// Loom's search, bounded to 3 preemptions per run.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(f);
    }

    /// A handler pushes two addresses while two drainers (the CPU itself and another
    /// CPU's purge) drain at once: each address is freed exactly once, in order, and the
    /// ring ends empty.
    #[test]
    fn loom_two_drainers_free_each_address_once() {
        model(|| {
            let ring = Arc::new(Ring::<2>::new());
            let freed = Arc::new(loom::sync::Mutex::new(std::vec::Vec::new()));
            let pusher = {
                let ring = ring.clone();
                thread::spawn(move || {
                    ring.push(0x1000).unwrap();
                    ring.push(0x2000).unwrap();
                })
            };
            let drainer = {
                let (ring, freed) = (ring.clone(), freed.clone());
                thread::spawn(move || {
                    ring.drain(|a| freed.lock().unwrap().push(a));
                })
            };
            ring.drain(|a| freed.lock().unwrap().push(a));
            pusher.join().unwrap();
            drainer.join().unwrap();
            ring.drain(|a| freed.lock().unwrap().push(a));
            assert_eq!(*freed.lock().unwrap(), [0x1000, 0x2000]);
            assert!(!ring.pending());
        });
    }

    /// Two drainers race over a queued address (a CPU's own call and another CPU's purge):
    /// the `draining` flag lets exactly one take it.
    #[test]
    fn loom_racing_drainers_take_a_queued_address_once() {
        model(|| {
            let ring = Arc::new(Ring::<2>::new());
            ring.push(0x1000).unwrap();
            let other = {
                let ring = ring.clone();
                thread::spawn(move || ring.drain(|a| assert_eq!(a, 0x1000)))
            };
            let here = ring.drain(|a| assert_eq!(a, 0x1000));
            let there = other.join().unwrap();
            let late = ring.drain(|_| ());
            assert_eq!(here + there + late, 1, "taken exactly once");
        });
    }

    /// A full ring refuses a push and changes nothing, while a drainer makes room.
    #[test]
    fn loom_a_full_ring_refuses_and_a_drain_makes_room() {
        model(|| {
            let ring = Arc::new(Ring::<1>::new());
            ring.push(0x1000).unwrap();
            let drainer = {
                let ring = ring.clone();
                thread::spawn(move || ring.drain(|a| assert_eq!(a, 0x1000)))
            };
            let pushed = ring.push(0x2000).is_ok();
            let drained = drainer.join().unwrap();
            assert_eq!(drained, 1);
            let rest = ring.drain(|a| assert_eq!(a, 0x2000));
            assert_eq!(rest, usize::from(pushed), "the second address is queued exactly when the push said so");
        });
    }
}
