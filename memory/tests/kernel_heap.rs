//! The global frame and slab allocators in a fresh process: nothing works before `init`
//! (allocation returns null), then `KernelAllocator` serves the kernel heap.

use std::alloc::{alloc_zeroed, GlobalAlloc, Layout};

use hal::addr::{PhysAddr, PhysRange};
use hal::linear::LinearMap;
use memory::buddy::{self, BuddyError, Frames};
use memory::slab::{self, KernelAllocator, KmemCache, SlabError};

const RAM: usize = 32 << 20;

/// Whether every byte of `b` is `v`, compared 256 bytes at a time (one `memcmp` each: a byte
/// loop is a step per byte, minutes under Miri for the megabytes this test writes).
fn all_are(b: &[u8], v: u8) -> bool {
    b.chunks(256).all(|c| c == &[v; 256][..c.len()])
}

#[test]
fn kernel_heap_before_and_after_init() {
    let heap = KernelAllocator;
    let l64 = Layout::from_size_align(64, 8).unwrap();
    // SAFETY: non-zero size.
    assert!(unsafe { heap.alloc(l64) }.is_null());
    // SAFETY: as above.
    assert!(unsafe { heap.alloc_zeroed(l64) }.is_null());
    let mut x = 0u8;
    // SAFETY: not from the heap: reported and ignored.
    unsafe { heap.dealloc(&mut x, Layout::new::<u8>()) };
    assert_eq!(slab::kmalloc(64, 8), Err(SlabError::NotInitialized));
    assert_eq!(slab::init(false), Err(SlabError::NotInitialized));
    assert!(KmemCache::new("early", 32, 8).is_err());
    assert_eq!(buddy::alloc_pages(0), Err(BuddyError::NotInitialized));
    assert_eq!(Frames::alloc(0).unwrap_err(), BuddyError::NotInitialized);
    assert!(buddy::stats().is_none() && slab::stats().is_none() && slab::slabinfo().is_none());

    // "RAM": a leaked, 4 MiB aligned buffer at physical 0x4000_0000, the first 64 KiB
    // reserved (a kernel image).
    let layout = Layout::from_size_align(RAM, 4 << 20).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null());
    let phys = PhysRange::new(PhysAddr::new(0x4000_0000), RAM as u64).unwrap();
    // SAFETY: the buffer is leaked and reached only through this map.
    let linear = unsafe { LinearMap::from_ptr(phys, p) };
    let image = PhysRange::new(PhysAddr::new(0x4000_0000), 0x1_0000).unwrap();
    // SAFETY: the buffer is used by nothing else for the rest of the process.
    unsafe { buddy::init(&[phys], &[image], linear, true) }.unwrap();
    slab::init(true).unwrap();
    let free0 = buddy::stats().unwrap().free_pages;

    // Heap traffic of every size class, large blocks, alignment, realloc.
    let mut live = Vec::new();
    // Size knob: under Miri the first 250 allocations (29 to 8,992 bytes: the classes from
    // kmalloc-32 up and large blocks; the small classes run in the slab suite there).
    for i in 1..if cfg!(miri) { 250 } else { 2_000usize } {
        let size = (i * 37) % 9_000 + 1;
        let align = 1 << (i % 8);
        let l = Layout::from_size_align(size, align).unwrap();
        // SAFETY: non-zero size.
        let q = unsafe { heap.alloc(l) };
        assert!(!q.is_null());
        assert_eq!(q as usize % align, 0);
        // SAFETY: `size` bytes were just allocated.
        unsafe { q.write_bytes(i as u8, size) };
        live.push((q, l, i as u8));
    }
    for (q, l, v) in live.drain(..) {
        // SAFETY: allocated above with `l`; read, then freed once.
        unsafe {
            assert!(all_are(std::slice::from_raw_parts(q, l.size()), v));
            heap.dealloc(q, l);
        }
    }
    // SAFETY: non-zero sizes; GlobalAlloc's realloc rules.
    unsafe {
        let q = heap.alloc(l64);
        q.write_bytes(7, 64);
        let r = heap.realloc(q, l64, 10_000);
        assert!(all_are(std::slice::from_raw_parts(r, 64), 7));
        heap.dealloc(r, Layout::from_size_align(10_000, 8).unwrap());
    }
    // SAFETY: not from the heap: reported, counted and ignored.
    unsafe { heap.dealloc(&mut x, Layout::new::<u8>()) };
    let s = slab::stats().unwrap();
    assert_eq!((s.invalid_frees, s.corruptions, s.large_allocs), (1, 0, 0));
    let info = slab::slabinfo().unwrap().to_string();
    assert!(info.starts_with("# name "));
    slab::shrink();
    assert_eq!(buddy::stats().unwrap().free_pages, free0);
    assert_eq!(buddy::stats().unwrap().corruptions, 0);
    let line = buddy::global().unwrap().lock().buddyinfo().to_string();
    // RAM below 4 GiB: one zone, DMA32.
    assert!(line.starts_with("Node 0, zone    DMA32"), "{line}");
    assert_eq!(slab::init(true), Err(SlabError::AlreadyInitialized));
}
