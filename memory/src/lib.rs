//! # memory — physical and virtual memory management for AArch64 unikernels
//!
//! The memory system after Linux's design, written to be linked by drivers:
//!
//! | module | what | Linux |
//! |---|---|---|
//! | [`buddy`] | page frames in blocks of 2^order pages, split and merged with the buddy (`pfn ^ (1 << order)`), an order-0 hot list, bulk calls, `buddyinfo` | `alloc_pages`, `free_pages`, `/proc/buddyinfo` |
//! | [`gfp`] | allocation flags: which zone may serve a request, how far into the reserves, zeroing | `gfp_t`, `GFP_KERNEL`, `GFP_ATOMIC`, `GFP_DMA32` |
//! | [`slab`] | size-class caches (8 B – 2 KiB) and named caches on buddy pages; the `#[global_allocator]` | `kmalloc`, `kmem_cache_create`, `/proc/slabinfo` |
//! | [`vmalloc`] | virtually contiguous areas: O(log n) lowest-fit free space, a guard page after each area, lazy unmapping with batched TLB flushes, `vmallocinfo`, faults explained | `mm/vmalloc.c` |
//! | [`ioremap`] | device MMIO in the same window with device attributes; `IoMem`/`Mmio` handles with typed register blocks | `ioremap`, `ioremap_np`, `ioremap_wc` |
//! | [`kernel`] | the global instances wired to `hal`'s translation tables: the API drivers call | |
//! | [`snapshot`] | one look at the whole memory system and a diff: "nothing leaked" in one line | |
//! | [`fault`] | fault injection: every k-th internal allocation fails (tests) | `failslab`, `fail_page_alloc` |
//!
//! The allocators are architecture-neutral: they reach physical memory through
//! [`hal::linear::LinearMap`] and the MMU through [`vmalloc::VmBackend`], so every one of
//! them runs its model tests on the host over simulated RAM and a simulated MMU.
//!
//! ## Using it from a driver
//! ```no_run
//! use memory::kernel;
//! // Large, virtually contiguous, page-backed; a guard page traps an overflow.
//! let table = kernel::vzalloc(256 * 1024)?;
//! // Device registers, typed, unmapped on drop.
//! // SAFETY: the example's device is owned by it alone and does no DMA.
//! let uart = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x1000) }.unwrap();
//! # let _ = uart;
//! kernel::vfree(table)?;
//! # Ok::<(), memory::vmalloc::VmallocError>(())
//! ```
//!
//! ## Boot order
//! `hal` turns the MMU on, then [`kernel::init`] starts the buddy allocator over the RAM
//! the device tree names (less the image, the DTB and reserved memory), the slab on top of
//! it, and vmalloc over `hal::kmap::VMALLOC_START..VMALLOC_END`, and registers the
//! fault-report hook that names guard-page hits and uses after `vfree`.
//!
//! ## Locks
//! Lock order: vmalloc → kernel page tables → buddy; a slab cache → buddy. Nothing
//! allocates while the vmalloc lock is held (area records are taken before it). Only
//! [`kernel::explain_fault`] may run in exception context (it only try-locks).
#![cfg_attr(not(test), no_std)]

pub mod buddy;
pub mod fault;
pub mod gfp;
pub mod ioremap;
pub mod kernel;
mod poison;
pub mod reclaim;
pub mod slab;
pub mod snapshot;
mod sync;
pub mod vmalloc;
