//! Fault injection for tests, after Linux's `failslab` / `fail_page_alloc` `interval`
//! attribute: make every k-th internal allocation of the memory system fail.
//!
//! "Internal allocation" means every allocation a call makes on its own behalf, not only
//! page frames: vmalloc's area records ([`crate::vmalloc::Spares`], the free-space index),
//! the slab's buddy blocks (new slabs, large `kmalloc` objects), and — in the simulated
//! MMU of host tests ([`crate::vmalloc::sim::SimBackend`]) — frames, 2 MiB blocks and the
//! page-table pages behind each map call. A call that meets an injected failure must return
//! its typed error (`VmallocError::NoRecords`, `NoFrames`, `MapFailed`,
//! `SlabError::OutOfMemory`) and leave the state as it was; host tests check exactly that.
//!
//! The setting is global (one atomic), off by default, and costs one relaxed load per
//! allocation that can fail (none of them is on a fast path that does not already call the
//! buddy allocator or the heap).
//!
//! ```
//! memory::fault::fail_every(3);            // the 3rd, 6th, 9th ... allocation fails
//! assert!(!memory::fault::should_fail());  // 1st
//! assert!(!memory::fault::should_fail());  // 2nd
//! assert!(memory::fault::should_fail());   // 3rd
//! memory::fault::stop();
//! assert!(!memory::fault::should_fail());
//! ```

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

static INTERVAL: AtomicUsize = AtomicUsize::new(0);
static SEEN: AtomicUsize = AtomicUsize::new(0);
static INJECTED: AtomicU64 = AtomicU64::new(0);

/// From now on, fail every `interval`-th internal allocation (1: all of them); 0 stops.
/// The count restarts.
pub fn fail_every(interval: usize) {
    SEEN.store(0, Ordering::Relaxed);
    INTERVAL.store(interval, Ordering::Relaxed);
}

/// Stop injecting failures.
pub fn stop() {
    INTERVAL.store(0, Ordering::Relaxed);
}

/// Failures injected since the program started.
pub fn injected() -> u64 {
    INJECTED.load(Ordering::Relaxed)
}

/// Called by each internal allocation before it allocates: whether it must fail instead.
#[inline]
pub fn should_fail() -> bool {
    let k = INTERVAL.load(Ordering::Relaxed);
    if k == 0 {
        return false;
    }
    let n = SEEN.fetch_add(1, Ordering::Relaxed) + 1;
    let fail = n.is_multiple_of(k);
    if fail {
        INJECTED.fetch_add(1, Ordering::Relaxed);
    }
    fail
}
