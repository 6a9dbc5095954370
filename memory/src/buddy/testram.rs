//! Host test support: a heap buffer that plays the part of physical RAM.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::{Mutex as StdMutex, MutexGuard, Once as StdOnce};

use hal::addr::{PhysAddr, PhysRange};
use hal::linear::LinearMap;

/// Alignment of the buffer: the largest buddy block, so that virtual and physical
/// alignments agree up to 4 MiB (as the linear map does on target).
const ALIGN: usize = 4 << 20;

/// Simulated RAM: `size` bytes reached as physical addresses from `base`.
pub(crate) struct TestRam {
    /// What the host allocator returned.
    raw: *mut u8,
    /// The 4 MiB aligned start of the simulated RAM.
    ptr: *mut u8,
    size: usize,
    layout: Layout,
    base: u64,
}

impl TestRam {
    /// `size` bytes of zeroed simulated RAM at physical address `base` (4 MiB aligned).
    pub(crate) fn new(base: u64, size: usize) -> Self {
        Self::try_new(base, size).expect("test RAM allocation failed")
    }

    /// As `new`, or `None` when the host refuses the memory. Large buffers are zeroed
    /// lazily by the host, so only the pages touched cost memory.
    pub(crate) fn try_new(base: u64, size: usize) -> Option<Self> {
        assert_eq!(base % ALIGN as u64, 0);
        // A small alignment gets `calloc`, which maps fresh zero pages for a large size
        // (a large alignment would be zeroed by a memset, touching every page); the
        // 4 MiB alignment is obtained by over-allocating.
        let layout = Layout::from_size_align(size + ALIGN, 16).unwrap();
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        if raw.is_null() {
            return None;
        }
        let ptr = raw.wrapping_add(raw.align_offset(ALIGN));
        Some(TestRam { raw, ptr, size, layout, base })
    }

    /// The physical range `[base + off, base + off + len)`.
    pub(crate) fn range(&self, off: u64, len: u64) -> PhysRange {
        PhysRange::new(PhysAddr::new(self.base + off), len).unwrap()
    }

    /// The whole buffer as a physical range.
    pub(crate) fn whole(&self) -> PhysRange {
        self.range(0, self.size as u64)
    }

    /// A linear map of the buffer.
    pub(crate) fn linear(&self) -> LinearMap {
        // SAFETY: the buffer is ours, mapped read-write, and only reached through the map
        // until it is dropped (tests drop allocators before their RAM).
        unsafe { LinearMap::from_ptr(self.whole(), self.ptr) }
    }

    /// The simulated RAM as bytes (no allocator may be alive over it while the slice is).
    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr + size` lies inside the allocation, which `self` owns; the
        // `&mut self` borrow keeps every other access out for the slice's life.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.size) }
    }

    /// Leaks the buffer (for the global allocators, which live forever).
    pub(crate) fn leak(self) -> LinearMap {
        let l = self.linear();
        core::mem::forget(self);
        l
    }
}

impl Drop for TestRam {
    fn drop(&mut self) {
        // SAFETY: allocated in `try_new` with this layout.
        unsafe { dealloc(self.raw, self.layout) };
    }
}

static GLOBAL_LOCK: StdMutex<()> = StdMutex::new(());
static GLOBAL_INIT: StdOnce = StdOnce::new();

/// Physical base of the global allocators' simulated RAM.
pub(crate) const GLOBAL_BASE: u64 = 0x4000_0000;
/// Size of the global allocators' simulated RAM.
pub(crate) const GLOBAL_SIZE: usize = 64 << 20;

/// Initialises the global buddy (non-strict) and slab allocators once, over leaked
/// simulated RAM, and serialises the tests that use them.
pub(crate) fn global_lock() -> MutexGuard<'static, ()> {
    let g = GLOBAL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    GLOBAL_INIT.call_once(|| {
        let ram = TestRam::new(GLOBAL_BASE, GLOBAL_SIZE);
        let whole = ram.whole();
        let linear = ram.leak();
        // SAFETY: the leaked buffer is used by nothing else, for the rest of the process.
        unsafe { crate::buddy::init(&[whole], &[], linear, false) }.unwrap();
        crate::slab::init(false).unwrap();
    });
    g
}
