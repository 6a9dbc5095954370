//! Where quanta come from: the [`QuantumAlloc`] trait and its kernel implementation over
//! `vzalloc`/`vfree`.
//!
//! The device only ever asks for blocks of one size (its quantum) and gives back exactly
//! what it got, so the interface is two calls. Keeping it a trait lets the host tests count
//! every quantum and make any allocation fail, while the kernel build uses
//! [`VmallocQuanta`], whose body is the whole of what a driver needs from `vmalloc`.

use core::ptr::NonNull;

use hal::VirtAddr;
use memory::kernel;
use memory::vmalloc::VmFlags;
use memory::vmalloc::VmallocError;

/// An allocator of quanta: `bytes`-sized, zero-filled blocks.
///
/// # Safety
/// [`ScullV`](crate::ScullV) reads and writes quanta through the pointers it gets, so an
/// implementation must guarantee that a pointer returned by `alloc(bytes)`
/// - points to `bytes` readable and writable bytes, all zero;
/// - is not reachable by anyone else (the device owns the block exclusively), and
/// - stays valid until it is passed to [`free`](Self::free), from any CPU (the device may
///   be moved between CPUs while it holds quanta).
pub unsafe trait QuantumAlloc {
    /// Allocates a zero-filled block of `bytes` bytes (`bytes` is a multiple of the page
    /// size, never zero).
    ///
    /// # Errors
    /// Why no block could be given, as vmalloc reports it; nothing is allocated then.
    fn alloc(&mut self, bytes: usize) -> Result<NonNull<u8>, VmallocError>;

    /// Gives back a block.
    ///
    /// # Errors
    /// The allocator did not know the block (a bug in the caller); the device only counts it
    /// ([`ScullStats::free_errors`](crate::ScullStats::free_errors)).
    ///
    /// # Safety
    /// `ptr` came from [`alloc`](Self::alloc) of this allocator with the same `bytes`, was not
    /// freed since, and nothing uses it afterwards.
    unsafe fn free(&mut self, ptr: NonNull<u8>, bytes: usize) -> Result<(), VmallocError>;
}

/// The kernel's quanta: each one a `vzalloc` area — `bytes` of virtually contiguous memory
/// over pages the buddy allocator picked anywhere in RAM, followed by an unmapped guard page
/// (so running off the end of a quantum traps instead of corrupting its neighbour).
///
/// Because the `vzalloc` call sits in this file, `memory::kernel::write_vmallocinfo` lists
/// each live quantum as
///
/// ```text
/// 0xffff...-0xffff...   69632 drivers/scullv/src/quantum.rs:LINE:COL pages=16 vmalloc
/// ```
///
/// (69632 = a 64 KiB quantum plus its guard page). Needs `memory::kernel::init` to have run;
/// before that every allocation fails with [`VmallocError::NotInitialized`].
#[derive(Clone, Copy, Debug, Default)]
pub struct VmallocQuanta;

// SAFETY: `vmalloc_with(bytes, .., ZERO | OWNED)` maps `bytes` (rounded up to whole pages)
// of fresh zeroed frames at an address no one else has been given, in the kernel's TTBR1
// tables that every CPU shares. OWNED makes a plain `vfree` of that address fail, so the
// area stays mapped until `vfree_owned`, which only `free` calls.
unsafe impl QuantumAlloc for VmallocQuanta {
    fn alloc(&mut self, bytes: usize) -> Result<NonNull<u8>, VmallocError> {
        // vmallocinfo names this line as the caller of every quantum.
        let va = kernel::vmalloc_with(bytes, hal::PAGE_SIZE, VmFlags::ZERO | VmFlags::OWNED)?;
        // vmalloc never hands out address zero; a null here would be a vmalloc bug, and the
        // area is given back rather than leaked.
        NonNull::new(va.as_mut_ptr::<u8>()).ok_or_else(|| {
            // SAFETY: just allocated, never handed out.
            let _ = unsafe { kernel::vfree_owned(va) };
            VmallocError::NotAnArea
        })
    }

    unsafe fn free(&mut self, ptr: NonNull<u8>, _bytes: usize) -> Result<(), VmallocError> {
        // vfree unmaps the pages and returns the frames to the buddy allocator now; the
        // virtual range is parked until the next batched TLB flush (or `kernel::purge`).
        // SAFETY: the trait's contract: `ptr` came from `alloc` and no reference into the
        // quantum outlives this call.
        unsafe { kernel::vfree_owned(VirtAddr::from_ptr(ptr.as_ptr())) }
    }
}
