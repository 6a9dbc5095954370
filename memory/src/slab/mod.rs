//! Small-object allocation: slab caches, `kmalloc`/`kfree`, and the kernel's
//! [`GlobalAlloc`].
//!
//! # Caches
//! A cache hands out objects of one size from *slabs*: buddy blocks of `2^order` frames
//! (order 0 to [`MAX_SLAB_ORDER`]) cut into equal slots. `kmalloc` has one cache per size
//! class ([`KMALLOC_SIZES`]: 8 to 2048 bytes, with 96 and 192 as Linux has); larger
//! requests (or alignments above 2048) take whole buddy blocks of the right order. Named
//! caches for fixed-size objects come from [`SlabAllocator::create_cache`] (or
//! [`KmemCache::new`] on the global instance), like Linux's `kmem_cache_create`; they show
//! in [`SlabAllocator::slabinfo`] next to the kmalloc caches.
//!
//! # Layout of a slab
//! ```text
//!  block start (aligned on the block size)
//!  ┌────────────────────────────┬──────────┬──────────┬─────┬──────────┬───────┐
//!  │ header: magic, in-use,      │ object 0 │ object 1 │ ... │ object n │ waste │
//!  │ bitmap hint, list links,    │ [+ red   │          │     │          │       │
//!  │ free bitmap (1 bit/object)  │   zone]  │          │     │          │       │
//!  └────────────────────────────┴──────────┴──────────┴─────┴──────────┴───────┘
//! ```
//! The bitmap in the header records which objects are free: an allocation takes the
//! lowest free ones a bitmap word at a time (a `trailing_zeros` per object; the header's
//! `hint` names the first word that may have one), a free sets the object's bit, and a
//! double free is detected exactly. Outside strict mode the allocator never reads or writes an object, so a
//! write after free cannot corrupt what it hands out next, and a new slab is not written
//! past its header. Slabs with a free object sit on their cache's doubly linked *partial*
//! list; full slabs are on no list. The slab order is the smallest whose waste (header and
//! tail) is at most 1/8 of the block.
//!
//! # Ownership check (always on)
//! The buddy allocator keeps one owner tag byte per frame ([`FrameTags`]); the slab
//! allocator writes the cache number there for every frame of its slabs, and the order for
//! the first frame of a large allocation. `kfree(ptr)` turns the pointer into a frame,
//! reads the tag, and then, under the cache lock, finds the slab header (blocks are aligned
//! on their size), checks that the pointer is the start of an object (exact division by a
//! multiplication with a reciprocal) and that its bitmap bit says allocated. Any failure
//! is a [`SlabError`] and changes nothing. All of it is O(1).
//!
//! # Strict mode
//! Objects get a red zone (at least 8 bytes of [`RED_ZONE_BYTE`]) after them, checked on
//! free; freed objects are filled with [`POISON_FREE_BYTE`], checked when handed out
//! again. Corruption is reported with `log::error!` (the
//! address and first bad offset) and counted in [`SlabStats::corruptions`].
//!
//! # Empty slabs
//! A cache keeps at most one empty slab, so an alloc/free ping-pong does not go to the
//! buddy allocator each time; another slab that becomes empty goes back at once.
//! [`SlabAllocator::shrink`] gives the kept ones back too.
//!
//! # Locking
//! Each cache is behind its own [`IrqSpinLock`] (different sizes do not contend; one lock
//! for all would serialise every `kmalloc`), in front of which each CPU keeps a magazine of
//! free objects per cache ([`cpu`]): the local fast path takes no lock. A cache lock may be
//! held while taking the buddy lock (to get or give back a slab): the buddy allocator never
//! allocates nor calls back into the slab, so the order "cache, then buddy" cannot
//! deadlock. Large allocations take only the buddy lock; their tags are claimed with atomic
//! compare-exchange so two racing frees of one block cannot both succeed. Both locks mask
//! interrupts while held, and a handler that finds its CPU's magazines in use takes the
//! locked path, so `kmalloc` and `kfree` may be called from interrupt handlers (with
//! `GFP_ATOMIC` for a new slab).

//! # Global instance
//! [`init`] builds the slab allocator of the running kernel over the global buddy
//! allocator, with per-CPU object caches unless strict; [`kmalloc`], [`kfree`], [`KmemCache`] and [`KernelAllocator`] (the
//! `#[global_allocator]`) use it. [`KernelAllocator`] never calls vmalloc.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use hal::addr::{PhysAddr, PAGE_SIZE};
use hal::sync::IrqSpinLock;
use spin::Once;

use crate::buddy::{self, BuddyAllocator, FrameTags, MAX_ORDER};
use crate::gfp::{Gfp, __GFP_ZERO, GFP_KERNEL, ZONE_NORMAL};

pub mod cpu;
#[cfg(test)]
mod tests;

pub use cpu::{drain_all, drain_local, CPU_CACHE_OBJECTS};

/// The kmalloc size classes.
pub const KMALLOC_SIZES: [usize; NR_KMALLOC] = [8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048];
/// The alignment each kmalloc class guarantees (its largest power-of-two divisor).
pub const KMALLOC_ALIGNS: [usize; NR_KMALLOC] = [8, 16, 32, 64, 32, 128, 64, 256, 512, 1024, 2048];
const KMALLOC_NAMES: [&str; NR_KMALLOC] = [
    "kmalloc-8",
    "kmalloc-16",
    "kmalloc-32",
    "kmalloc-64",
    "kmalloc-96",
    "kmalloc-128",
    "kmalloc-192",
    "kmalloc-256",
    "kmalloc-512",
    "kmalloc-1024",
    "kmalloc-2048",
];
/// Number of kmalloc size classes.
pub const NR_KMALLOC: usize = 11;
/// Largest request served from a kmalloc cache; above, whole buddy blocks.
pub const KMALLOC_MAX_CACHE_SIZE: usize = 2048;
/// Most caches (kmalloc classes included) one slab allocator holds.
pub const MAX_CACHES: usize = 32;
/// Largest slab block order (32 KiB).
pub const MAX_SLAB_ORDER: usize = 3;
/// Strict mode: the byte freed objects are filled with (Linux's `POISON_FREE`).
pub const POISON_FREE_BYTE: u8 = 0x6b;
/// Strict mode: the byte red zones are filled with (Linux's `SLUB_RED_ACTIVE`).
pub const RED_ZONE_BYTE: u8 = 0xcc;
/// Strict mode: the least red zone after an object.
const RED_ZONE_MIN: usize = 8;
/// Smallest object alignment (and size): 64-bit users.
const MIN_ALIGN: usize = 8;
/// Header magic; the cache slot is or-ed in.
const SLAB_MAGIC: u32 = 0x51ab_0000;

// Owner tags (one byte per frame, see `FrameTags`).
/// Frame not owned by the slab allocator.
const TAG_NONE: u8 = 0;
/// Frame inside (not first) of a large allocation.
const TAG_LARGE_TAIL: u8 = 0x40;
/// First frame of a large allocation; bits 0-3: order, bits 4-6: the allocator's owner
/// mark (one of 8, unique among the slab allocators live on one buddy).
const TAG_LARGE: u8 = 0x80;
/// The order bits of a large tag.
const TAG_LARGE_ORDER: u8 = 0x0f;
/// The owner-mark bits of a large tag.
const TAG_LARGE_BRAND_SHIFT: u32 = 4;
// 1..=MAX_CACHES: frame of a slab of cache `tag - 1`.

/// Why a slab operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlabError {
    /// The buddy allocator has no block left for a slab or a large allocation.
    OutOfMemory,
    /// A request for zero bytes.
    ZeroSize,
    /// A request larger than the largest buddy block (or an alignment above it).
    TooLarge,
    /// An alignment that is not a power of two, or an object a cache cannot hold.
    BadLayout,
    /// The pointer was not handed out by this allocator (or its slab is gone).
    NotOwned,
    /// The pointer is inside an object or large block, not at its start.
    NotObjectStart,
    /// The object is already free.
    DoubleFree,
    /// The object belongs to another cache than the one it was freed to.
    WrongCache,
    /// The cache still has objects in use.
    CacheBusy,
    /// All [`MAX_CACHES`] cache slots are taken.
    TooManyCaches,
    /// A slab header does not match its owner tag: memory was overwritten.
    Corrupted,
    /// The linear map's offset is not aligned on the largest buddy block, so virtual
    /// addresses would not keep the alignment of physical ones.
    MisalignedLinearMap,
    /// The global slab allocator is not initialised (or the buddy allocator is not).
    NotInitialized,
    /// The global slab allocator is already initialised.
    AlreadyInitialized,
    /// A zone modifier (`__GFP_DMA32`, `__GFP_DMA`) in the flags of `kmalloc_gfp`: slab
    /// memory comes from any zone (Linux treats `kmalloc(GFP_DMA32)` as a bug); a device
    /// that needs low memory takes frames with `buddy::alloc_pages_gfp`.
    ZoneModifier,
    /// A [`CacheId`] of another slab allocator.
    WrongAllocator,
    /// A [`CacheId`] of a cache that has been destroyed.
    StaleCache,
    /// Every allocator identity ([`SlabAllocator::brand`], 2^32 − 1 of them) is used, or 8
    /// slab allocators are live on the buddy already.
    TooManyAllocators,
}

impl fmt::Display for SlabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlabError::OutOfMemory => "out of memory",
            SlabError::ZeroSize => "zero-sized request",
            SlabError::TooLarge => "request larger than the largest block",
            SlabError::BadLayout => "bad size or alignment",
            SlabError::NotOwned => "pointer not allocated by the slab allocator",
            SlabError::NotObjectStart => "pointer not at the start of an object",
            SlabError::DoubleFree => "object already free (double free)",
            SlabError::WrongCache => "object freed to another cache",
            SlabError::CacheBusy => "cache still has objects in use",
            SlabError::TooManyCaches => "no free cache slot",
            SlabError::Corrupted => "slab header overwritten",
            SlabError::MisalignedLinearMap => "linear map offset not aligned on 4 MiB",
            SlabError::NotInitialized => "slab allocator not initialised",
            SlabError::AlreadyInitialized => "slab allocator already initialised",
            SlabError::ZoneModifier => "kmalloc with a zone modifier (GFP_DMA32/GFP_DMA)",
            SlabError::WrongAllocator => "cache id of another slab allocator",
            SlabError::StaleCache => "cache id of a destroyed cache",
            SlabError::TooManyAllocators => "no slab allocator identity or owner mark left",
        })
    }
}

impl core::error::Error for SlabError {}

/// Size class index for a request of `size` bytes (`size <= 2048`), by `(size + 7) / 8`.
const SIZE_INDEX: [u8; KMALLOC_MAX_CACHE_SIZE / 8 + 1] = {
    let mut t = [0u8; KMALLOC_MAX_CACHE_SIZE / 8 + 1];
    let mut i = 0;
    while i < t.len() {
        let mut c = 0;
        while KMALLOC_SIZES[c] < i * 8 {
            c += 1;
        }
        t[i] = c as u8;
        i += 1;
    }
    t
};

/// The kmalloc class serving `size` bytes aligned on `align`, or `None` for whole pages.
#[inline(always)]
fn kmalloc_class(size: usize, align: usize) -> Option<usize> {
    if size > KMALLOC_MAX_CACHE_SIZE {
        return None;
    }
    let mut c = SIZE_INDEX[(size + 7) >> 3] as usize;
    while KMALLOC_ALIGNS[c] < align {
        c += 1;
        if c == NR_KMALLOC {
            return None;
        }
    }
    Some(c)
}

/// The buddy order of a large allocation of `size` bytes aligned on `align`.
fn large_order(size: usize, align: usize) -> Result<usize, SlabError> {
    let bytes = size.max(align).max(PAGE_SIZE);
    let pages = bytes.div_ceil(PAGE_SIZE);
    let order = pages.next_power_of_two().trailing_zeros() as usize;
    if order > MAX_ORDER {
        return Err(SlabError::TooLarge);
    }
    Ok(order)
}

/// How a cache cuts its slabs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Geometry {
    /// Usable object size.
    size: usize,
    /// Guaranteed alignment of objects.
    align: usize,
    /// Distance between objects (size, plus the red zone in strict mode).
    stride: usize,
    /// Slab block order.
    order: usize,
    /// Objects per slab.
    objs: usize,
    /// Offset of object 0 from the block start.
    first: usize,
    /// `ceil(2^32 / stride)`: `(rel * recip) >> 32 == rel / stride` for `rel < 2^16`.
    recip: u64,
}

/// [`Geometry::object_index`] from its parts (the per-CPU free path reads them from a
/// lock-free mirror).
#[inline(always)]
fn object_index(off: usize, first: usize, stride: usize, objs: usize, recip: u64) -> Option<usize> {
    let rel = off.checked_sub(first)?;
    let idx = ((rel as u64 * recip) >> 32) as usize;
    (idx < objs && idx * stride == rel).then_some(idx)
}

/// Size of the fixed part of a slab header.
const HEADER_BYTES: usize = core::mem::size_of::<SlabHeader>();

impl Geometry {
    /// The geometry for objects of `size` bytes aligned on `align`.
    fn new(size: usize, align: usize, strict: bool) -> Option<Geometry> {
        if size == 0 || !align.is_power_of_two() || align > PAGE_SIZE {
            return None;
        }
        let align = align.max(MIN_ALIGN);
        let size = size.checked_next_multiple_of(align)?;
        // Larger than the largest slab: no geometry (and no arithmetic near `usize::MAX`).
        if size > PAGE_SIZE << MAX_SLAB_ORDER {
            return None;
        }
        let stride = if strict { size.checked_add(RED_ZONE_MIN)?.checked_next_multiple_of(align)? } else { size };
        let mut best: Option<Geometry> = None;
        for order in 0..=MAX_SLAB_ORDER {
            let bytes = PAGE_SIZE << order;
            let mut objs = bytes / stride;
            let first = loop {
                if objs == 0 {
                    break 0;
                }
                let first = (HEADER_BYTES + objs.div_ceil(64) * 8).next_multiple_of(align);
                if first + objs * stride <= bytes {
                    break first;
                }
                objs -= 1;
            };
            if objs == 0 {
                continue;
            }
            let g = Geometry { size, align, stride, order, objs, first, recip: (1u64 << 32).div_ceil(stride as u64) };
            let waste = bytes - objs * stride;
            if waste * 8 <= bytes {
                return Some(g);
            }
            // Otherwise keep the order with the least waste per byte.
            if best.is_none_or(|b| waste * (PAGE_SIZE << b.order) < b.waste() * bytes) {
                best = Some(g);
            }
        }
        best
    }

    /// The index of the object starting `off` bytes into a slab, or `None` when no object
    /// starts there (exact division by a multiplication with the reciprocal).
    #[inline(always)]
    fn object_index(&self, off: usize) -> Option<usize> {
        object_index(off, self.first, self.stride, self.objs, self.recip)
    }

    fn waste(&self) -> usize {
        (PAGE_SIZE << self.order) - self.objs * self.stride
    }

    fn slab_bytes(&self) -> usize {
        PAGE_SIZE << self.order
    }
}

/// The header at the start of every slab block; the free bitmap follows it.
#[repr(C)]
struct SlabHeader {
    /// [`SLAB_MAGIC`] | cache slot.
    magic: u32,
    /// Objects in use.
    inuse: u32,
    /// The lowest bitmap word that may hold a free bit (every word below it is zero).
    hint: u32,
    /// The owning allocator's [`SlabAllocator::brand`]: `kfree` through another allocator
    /// that shares the buddy (so the frame tags) is refused with `NotOwned`.
    brand: u32,
    /// Partial list links.
    next: *mut SlabHeader,
    prev: *mut SlabHeader,
}

impl SlabHeader {
    /// The free bitmap (bit set: object free).
    #[inline(always)]
    fn bitmap(s: *mut SlabHeader) -> *mut u64 {
        s.wrapping_add(1).cast()
    }
}

/// One cache: geometry, slab lists, counters. Always behind its slot's lock.
struct Cache {
    name: &'static str,
    /// Whether the slot holds a cache.
    live: bool,
    /// Bumped each time a cache is created in the slot: a [`CacheId`] names one
    /// generation, so the id of a destroyed cache does not reach its successor.
    generation: u32,
    geo: Geometry,
    /// Slabs with at least one free object (doubly linked through their headers).
    partial: *mut SlabHeader,
    /// The one empty slab kept (it is on the partial list too), or null. May name a slab
    /// that has been allocated from since (see `free_object`).
    empty: *mut SlabHeader,
    /// Objects in use.
    active: usize,
    /// Slabs held.
    slabs: usize,
}

// SAFETY: the pointers lead to slabs this cache owns (buddy blocks it allocated, reached
// through the linear map every core shares), and a `Cache` is only ever used under its
// slot's lock (a checked `hal::sync::SpinLock` over a `spin::Mutex`): whichever core
// holds the lock has the only access, and the lock's
// acquire/release makes the previous holder's writes to headers, bitmaps and partial lists
// visible to it. Another slab allocator on the same buddy never touches them (its `kfree`
// checks the brand in the header, read-only, before anything else).
unsafe impl Send for Cache {}

impl Cache {
    const VACANT: Cache = Cache {
        name: "",
        live: false,
        generation: 0,
        geo: Geometry { size: 0, align: 0, stride: 0, order: 0, objs: 0, first: 0, recip: 0 },
        partial: ptr::null_mut(),
        empty: ptr::null_mut(),
        active: 0,
        slabs: 0,
    };

    /// Puts `s` at the head of the partial list.
    #[inline(always)]
    fn push(&mut self, s: *mut SlabHeader) {
        let head = self.partial;
        // SAFETY: `s` and `head` (when not null) are slab headers of this cache.
        unsafe {
            (*s).next = head;
            (*s).prev = ptr::null_mut();
            if !head.is_null() {
                (*head).prev = s;
            }
        }
        self.partial = s;
    }

    /// Takes `s` off the partial list.
    #[inline(always)]
    fn unlink(&mut self, s: *mut SlabHeader) {
        // SAFETY: `s` is a slab header of this cache on the partial list; its neighbours
        // are too.
        unsafe {
            let (next, prev) = ((*s).next, (*s).prev);
            if prev.is_null() {
                self.partial = next;
            } else {
                (*prev).next = next;
            }
            if !next.is_null() {
                (*next).prev = prev;
            }
        }
    }

    fn stats(&self) -> CacheStats {
        CacheStats {
            name: self.name,
            active_objs: self.active,
            num_objs: self.slabs * self.geo.objs,
            objsize: self.geo.size,
            objperslab: self.geo.objs,
            pagesperslab: 1 << self.geo.order,
            slabs: self.slabs,
        }
    }
}

/// One cache's counters, as a `/proc/slabinfo` line shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// The cache's name.
    pub name: &'static str,
    /// Objects in use.
    pub active_objs: usize,
    /// Objects in all slabs (in use or free).
    pub num_objs: usize,
    /// Object size.
    pub objsize: usize,
    /// Objects per slab.
    pub objperslab: usize,
    /// Frames per slab.
    pub pagesperslab: usize,
    /// Slabs held.
    pub slabs: usize,
}

impl CacheStats {
    /// Frames held by the cache.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let held: usize = slab.cache_stats().map(|c| c.pages()).sum();
    /// # let _ = held;
    /// ```
    pub fn pages(&self) -> usize {
        self.slabs * self.pagesperslab
    }
}

impl fmt::Display for CacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<17} {:>6} {:>6} {:>6} {:>4} {:>4}",
            self.name, self.active_objs, self.num_objs, self.objsize, self.objperslab, self.pagesperslab
        )
    }
}

/// Whole-allocator counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlabStats {
    /// Frames held by all caches' slabs.
    pub slab_pages: usize,
    /// Live large allocations (whole buddy blocks).
    pub large_allocs: usize,
    /// Frames held by large allocations.
    pub large_pages: usize,
    /// Allocation calls that failed.
    pub alloc_failures: u64,
    /// Frees refused (pointer not owned, not an object start, already free, ...).
    pub invalid_frees: u64,
    /// Strict mode: red zones or poison found overwritten.
    pub corruptions: u64,
}

/// A named cache of a [`SlabAllocator`]. Not `Copy`: destroying the cache consumes it.
///
/// It carries the identity of its allocator ([`SlabAllocator::brand`]) and the generation
/// of its slot: used on another allocator it is refused with [`SlabError::WrongAllocator`],
/// on a cache since destroyed with [`SlabError::StaleCache`]; nothing is touched then.
#[derive(Debug, PartialEq, Eq)]
pub struct CacheId {
    slot: u8,
    generation: u32,
    brand: u32,
}

/// The next [`SlabAllocator::brand`] (0 is never one).
static NEXT_BRAND: AtomicU32 = AtomicU32::new(1);

/// How many freed large objects a [`SlabAllocator`] remembers, to report a second `kfree`
/// of one as [`SlabError::DoubleFree`] (their frames are back with the buddy allocator, so
/// no owner tag says so any more).
pub const FREED_LARGE_HISTORY: usize = 64;

/// A slab allocator over a buddy allocator. See the [module documentation](self).
pub struct SlabAllocator<'b> {
    buddy: &'b IrqSpinLock<BuddyAllocator>,
    /// This allocator's identity, written into its slab headers and cache ids.
    brand: u32,
    /// Its owner mark among the slab allocators on its buddy, written into the frame tags
    /// of its large blocks (3 bits: a brand would not fit).
    mark: u8,
    tags: FrameTags<'b>,
    /// The buddy's linear map: object pointers are derived from its pointer (provenance).
    linear: hal::linear::LinearMap,
    /// The linear map as a pointer offset (`virtual = physical + delta`, wrapping).
    va_offset: hal::linear::LinearOffset,
    strict: bool,
    caches: [IrqSpinLock<Cache>; MAX_CACHES],
    /// The caches' geometry, readable without their locks (the per-CPU free path).
    geos: [cpu::GeoMirror; MAX_CACHES],
    /// The per-CPU object caches, when on (see [`cpu`]).
    cpu: Option<cpu::CpuLayer>,
    large_allocs: AtomicUsize,
    large_pages: AtomicUsize,
    alloc_failures: AtomicU64,
    invalid_frees: AtomicU64,
    corruptions: AtomicU64,
    /// Physical addresses of the last [`FREED_LARGE_HISTORY`] large objects freed (0: none).
    freed_large: [AtomicU64; FREED_LARGE_HISTORY],
    freed_large_next: AtomicUsize,
}

impl fmt::Debug for SlabAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabAllocator")
            .field("strict", &self.strict)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<'b> SlabAllocator<'b> {
    /// A slab allocator taking its pages from `buddy`, with the kmalloc caches set up
    /// (no page is taken until the first allocation). `strict` adds red zones and
    /// poisoning (see the module docs).
    ///
    /// # Errors
    /// [`SlabError::MisalignedLinearMap`] when the buddy allocator's linear map offset is
    /// not a multiple of the largest buddy block (4 MiB); [`SlabError::TooManyAllocators`]
    /// when 8 slab allocators are live on `buddy` already (each needs one of the 8 owner
    /// marks its large blocks' frame tags carry; one dropped while a large block of it was
    /// still allocated keeps its mark), or every identity has been used.
    ///
    /// # Example
    /// ```no_run
    /// use memory::slab::{SlabAllocator, SlabError};
    /// // A private slab allocator for a driver, on the kernel's buddy allocator.
    /// let buddy = memory::buddy::global().ok_or(SlabError::NotInitialized)?;
    /// let slab = SlabAllocator::new(buddy, false)?;
    /// let p = slab.kmalloc(100, 8)?;
    /// # let _ = p;
    /// # Ok::<(), SlabError>(())
    /// ```
    pub fn new(buddy: &'b IrqSpinLock<BuddyAllocator>, strict: bool) -> Result<Self, SlabError> {
        let (tags, linear, mark) = {
            let mut b = buddy.lock();
            // The marks are the buddy value's: a buddy swapped into the mutex while slab
            // allocators live on the old one would hand theirs out again (no caller does).
            let mark = b.claim_owner_mark().ok_or(SlabError::TooManyAllocators)?;
            // SAFETY: the slab allocator borrows the buddy's mutex for `'b`, so the
            // allocator in it cannot be dropped meanwhile; and should it be swapped out of
            // the mutex, `BuddyAllocator::new`'s contract keeps its RAM (the tag array
            // included) reserved while a slab allocator built on it is in use.
            (unsafe { b.frame_tags().extend::<'b>() }, *b.linear_map(), mark)
        };
        let refuse = |e| {
            buddy.lock().release_owner_mark(mark);
            Err(e)
        };
        let va_offset = linear.offset();
        if va_offset.delta() & ((PAGE_SIZE << MAX_ORDER) as u64 - 1) != 0 {
            return refuse(SlabError::MisalignedLinearMap);
        }
        let Ok(brand) = NEXT_BRAND.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_add(1)) else {
            return refuse(SlabError::TooManyAllocators);
        };
        let s = SlabAllocator {
            buddy,
            brand,
            mark,
            tags,
            linear,
            va_offset,
            strict,
            caches: core::array::from_fn(|_| IrqSpinLock::new(&hal::sync::classes::SLAB, Cache::VACANT)),
            geos: Default::default(),
            cpu: None,
            large_allocs: AtomicUsize::new(0),
            large_pages: AtomicUsize::new(0),
            alloc_failures: AtomicU64::new(0),
            invalid_frees: AtomicU64::new(0),
            corruptions: AtomicU64::new(0),
            freed_large: core::array::from_fn(|_| AtomicU64::new(0)),
            freed_large_next: AtomicUsize::new(0),
        };
        for (i, slot) in s.caches[..NR_KMALLOC].iter().enumerate() {
            let geo = Geometry::new(KMALLOC_SIZES[i], KMALLOC_ALIGNS[i], strict).ok_or(SlabError::BadLayout)?;
            *slot.lock() = Cache { name: KMALLOC_NAMES[i], live: true, geo, ..Cache::VACANT };
            s.geos[i].set(&geo);
        }
        Ok(s)
    }

    /// As [`Self::new`], with per-CPU object caches (see [`cpu`]) unless `strict` (strict
    /// mode checks every free exactly, under the cache lock). The magazines take one
    /// buddy block (about 68 KiB for 8 CPUs), given back when the allocator is dropped.
    ///
    /// # Errors
    /// As [`Self::new`], and [`SlabError::OutOfMemory`] when the block cannot be had.
    ///
    /// # Example
    /// ```no_run
    /// use memory::slab::{SlabAllocator, SlabError};
    /// let buddy = memory::buddy::global().ok_or(SlabError::NotInitialized)?;
    /// let slab = SlabAllocator::with_cpu_caches(buddy, false)?;
    /// assert!(slab.has_cpu_caches());
    /// # Ok::<(), SlabError>(())
    /// ```
    pub fn with_cpu_caches(buddy: &'b IrqSpinLock<BuddyAllocator>, strict: bool) -> Result<Self, SlabError> {
        let mut s = Self::new(buddy, strict)?;
        if !strict {
            s.cpu = Some(cpu::CpuLayer::new(buddy).ok_or(SlabError::OutOfMemory)?);
        }
        Ok(s)
    }

    /// This allocator's identity: distinct for every slab allocator made (never 0). Its
    /// slab headers and [`CacheId`]s carry it (its large blocks' frame tags carry its owner
    /// mark instead, one of 8 unique among the allocators live on its buddy).
    ///
    /// # Example
    /// ```no_run
    /// use memory::slab::{SlabAllocator, SlabError};
    /// let buddy = memory::buddy::global().ok_or(SlabError::NotInitialized)?;
    /// let private = SlabAllocator::new(buddy, false)?;
    /// assert_ne!(private.brand(), memory::slab::global().unwrap().brand());
    /// # Ok::<(), SlabError>(())
    /// ```
    pub fn brand(&self) -> u32 {
        self.brand
    }

    /// The large tag of a block of `order` of this allocator.
    #[inline(always)]
    fn large_tag(&self, order: usize) -> u8 {
        TAG_LARGE | self.mark << TAG_LARGE_BRAND_SHIFT | order as u8
    }

    /// Whether a large tag is one of this allocator's (the owner marks agree).
    #[inline(always)]
    fn owns_large(&self, tag: u8) -> bool {
        tag & !TAG_LARGE_ORDER == self.large_tag(0)
    }

    /// Checks `id` names a live cache of this allocator and returns its slot.
    fn slot_of(&self, id: &CacheId) -> Result<usize, SlabError> {
        if id.brand != self.brand {
            return Err(SlabError::WrongAllocator);
        }
        let slot = id.slot as usize;
        let c = self.caches.get(slot).ok_or(SlabError::WrongAllocator)?.lock();
        if !c.live || c.generation != id.generation {
            return Err(SlabError::StaleCache);
        }
        Ok(slot)
    }

    /// Whether strict mode is on.
    ///
    /// # Example
    /// ```no_run
    /// if memory::slab::global().unwrap().is_strict() {
    ///     log::warn!("slab: red zones and poisoning on");
    /// }
    /// ```
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    #[inline(always)]
    fn va(&self, pa: u64) -> *mut u8 {
        // Derived from the linear map's pointer, not cast from an integer: the block keeps
        // the provenance of the RAM (Miri's strict provenance on the host).
        self.linear.ptr(PhysAddr::new(pa))
    }

    #[inline(always)]
    fn pa(&self, va: *const u8) -> PhysAddr {
        PhysAddr::new(self.va_offset.phys(va))
    }

    /// A block for a slab or a large object: the kernel's slab allocator takes it through
    /// the buddy's per-CPU page lists, a private one from its buddy under the lock.
    #[inline]
    fn pages_alloc(&self, order: usize, gfp: Gfp) -> Result<PhysAddr, buddy::BuddyError> {
        if buddy::global().is_some_and(|g| ptr::eq(g, self.buddy)) {
            buddy::alloc_pages_gfp(gfp | crate::gfp::__GFP_NOWARN, order)
        } else {
            self.buddy.lock().alloc_gfp(order, gfp)
        }
    }

    /// Gives back a block from [`Self::pages_alloc`].
    ///
    /// # Safety
    /// As [`BuddyAllocator::free`].
    #[inline]
    unsafe fn pages_free(&self, pa: PhysAddr, order: usize) -> Result<(), buddy::BuddyError> {
        if buddy::global().is_some_and(|g| ptr::eq(g, self.buddy)) {
            // SAFETY: forwarded to our caller.
            unsafe { buddy::free_pages(pa, order) }
        } else {
            // SAFETY: forwarded to our caller.
            unsafe { self.buddy.lock().free(pa, order) }
        }
    }

    #[cold]
    fn fail<T>(&self, e: SlabError) -> Result<T, SlabError> {
        self.alloc_failures.fetch_add(1, Ordering::Relaxed);
        Err(e)
    }

    // ----- kmalloc -----

    /// Allocates `size` bytes aligned on `align` (a power of two): from the smallest
    /// kmalloc class that fits both, or as a whole buddy block above 2048 bytes.
    ///
    /// # Errors
    /// [`SlabError::ZeroSize`], [`SlabError::BadLayout`] (alignment not a power of two),
    /// [`SlabError::TooLarge`] (above 4 MiB), [`SlabError::OutOfMemory`]. Only the failure
    /// counter changes.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let p = slab.kmalloc(100, 8)?;                       // from kmalloc-128
    /// // SAFETY: `p` came from `slab.kmalloc` and is not used after.
    /// unsafe { slab.kfree(p) }?;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    #[inline]
    pub fn kmalloc(&self, size: usize, align: usize) -> Result<NonNull<u8>, SlabError> {
        self.kmalloc_gfp(size, align, GFP_KERNEL)
    }

    /// As [`Self::kmalloc`], with allocation flags (see [`crate::gfp`]): a new slab or a
    /// large block is taken from the buddy with `gfp` (so `GFP_ATOMIC` may use the
    /// reserves); `__GFP_ZERO` zeroes the object.
    ///
    /// # Errors
    /// As [`Self::kmalloc`], and [`SlabError::ZoneModifier`] for `GFP_DMA32`/`GFP_DMA`
    /// (nothing changes then).
    ///
    /// # Example
    /// ```no_run
    /// use memory::gfp::{GFP_ATOMIC, GFP_DMA32};
    /// let slab = memory::slab::global().unwrap();
    /// let p = slab.kmalloc_gfp(100, 8, GFP_ATOMIC)?;       // from an interrupt handler
    /// assert_eq!(slab.kmalloc_gfp(100, 8, GFP_DMA32), Err(memory::slab::SlabError::ZoneModifier));
    /// // SAFETY: `p` came from `slab.kmalloc_gfp` and is not used after.
    /// unsafe { slab.kfree(p) }?;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    #[inline]
    pub fn kmalloc_gfp(&self, size: usize, align: usize, gfp: Gfp) -> Result<NonNull<u8>, SlabError> {
        if gfp.zone() != ZONE_NORMAL {
            return self.fail(SlabError::ZoneModifier);
        }
        let p = self.kmalloc_raw(size, align, gfp)?;
        if gfp.contains(__GFP_ZERO) {
            // SAFETY: `p` was just allocated with at least `size` bytes.
            unsafe { p.as_ptr().write_bytes(0, size) };
        }
        Ok(p)
    }

    #[inline(always)]
    fn kmalloc_raw(&self, size: usize, align: usize, gfp: Gfp) -> Result<NonNull<u8>, SlabError> {
        if size == 0 {
            return self.fail(SlabError::ZeroSize);
        }
        if !align.is_power_of_two() {
            return self.fail(SlabError::BadLayout);
        }
        match kmalloc_class(size, align) {
            Some(c) => self.alloc_from(c, gfp),
            None => self.alloc_large(size, align, gfp),
        }
    }

    /// As [`Self::kmalloc`], with the memory zeroed.
    ///
    /// # Errors
    /// As [`Self::kmalloc`].
    ///
    /// # Example
    /// ```no_run
    /// let desc = memory::slab::global().unwrap().kzalloc(64, 64)?; // one zeroed cache line
    /// # let _ = desc;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn kzalloc(&self, size: usize, align: usize) -> Result<NonNull<u8>, SlabError> {
        let p = self.kmalloc(size, align)?;
        // SAFETY: `p` was just allocated with at least `size` bytes.
        unsafe { p.as_ptr().write_bytes(0, size) };
        Ok(p)
    }

    /// Frees memory from [`Self::kmalloc`] (or from a named cache). Takes a `NonNull` or an
    /// `Option<NonNull>`: `None` (C's `kfree(NULL)`, e.g. `NonNull::new(p)` of a null `p`)
    /// does nothing and succeeds, as in Linux.
    ///
    /// # Errors
    /// Nothing changes when an error is returned (but the invalid-free counter):
    /// [`SlabError::NotOwned`] (not from this allocator), [`SlabError::NotObjectStart`],
    /// [`SlabError::DoubleFree`] (a small object already free, or one of the last
    /// [`FREED_LARGE_HISTORY`] large objects freed), [`SlabError::Corrupted`] (slab header
    /// overwritten).
    ///
    /// # Safety
    /// Nothing may use the object after this call: it is handed out again. The checks
    /// catch pointers that are not live objects, not objects still in use.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let p = slab.kmalloc(32, 8)?;
    /// // SAFETY: `p` came from `slab.kmalloc` and nothing uses it after this.
    /// unsafe { slab.kfree(p) }?;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    #[inline]
    pub unsafe fn kfree(&self, ptr: impl Into<Option<NonNull<u8>>>) -> Result<(), SlabError> {
        // kfree(NULL) does nothing, as in Linux (ported cleanup paths rely on it).
        let Some(ptr) = ptr.into() else { return Ok(()) };
        let r = self.free_inner(ptr, None);
        if r.is_err() {
            self.invalid_frees.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The usable size of the object or large block at `ptr`.
    ///
    /// # Errors
    /// [`SlabError::NotOwned`] or [`SlabError::NotObjectStart`] as for [`Self::kfree`]
    /// (whether the object is currently allocated is not checked).
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let p = slab.kmalloc(100, 8)?;
    /// assert_eq!(slab.ksize(p)?, 128);                      // the whole kmalloc-128 slot is usable
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn ksize(&self, ptr: NonNull<u8>) -> Result<usize, SlabError> {
        let pa = self.pa(ptr.as_ptr());
        let tag = self.tags.tag(pa).ok_or(SlabError::NotOwned)?.load(Ordering::Acquire);
        match tag {
            TAG_NONE => Err(SlabError::NotOwned),
            TAG_LARGE_TAIL => Err(SlabError::NotObjectStart),
            t if t & TAG_LARGE != 0 => {
                if !self.owns_large(t) {
                    return Err(SlabError::NotOwned);
                }
                if pa.page_offset() != 0 {
                    return Err(SlabError::NotObjectStart);
                }
                Ok(PAGE_SIZE << (t & TAG_LARGE_ORDER))
            }
            t => {
                let id = t as usize - 1;
                let c = self.caches.get(id).ok_or(SlabError::Corrupted)?.lock();
                let g = c.geo;
                let off = pa.as_u64() & (g.slab_bytes() as u64 - 1);
                if !c.live || !self.slab_is_ours(ptr.as_ptr().wrapping_sub(off as usize).cast(), id) {
                    return Err(SlabError::NotOwned);
                }
                let rel = off.checked_sub(g.first as u64).ok_or(SlabError::NotObjectStart)?;
                if rel % g.stride as u64 != 0 || rel / g.stride as u64 >= g.objs as u64 {
                    return Err(SlabError::NotObjectStart);
                }
                Ok(g.size)
            }
        }
    }

    fn alloc_large(&self, size: usize, align: usize, gfp: Gfp) -> Result<NonNull<u8>, SlabError> {
        let order = match large_order(size, align) {
            Ok(o) => o,
            Err(e) => return self.fail(e),
        };
        if crate::fault::should_fail() {
            return self.fail(SlabError::OutOfMemory);
        }
        let Ok(pa) = self.pages_alloc(order, gfp) else {
            return self.fail(SlabError::OutOfMemory);
        };
        let Some(tags) = self.tags.tags(pa, 1 << order) else {
            // Unreachable (a buddy block lies in one region); give the block back.
            self.give_back(pa, order);
            return self.fail(SlabError::Corrupted);
        };
        for t in &tags[1..] {
            t.store(TAG_LARGE_TAIL, Ordering::Relaxed);
        }
        tags[0].store(self.large_tag(order), Ordering::Release);
        self.large_allocs.fetch_add(1, Ordering::Relaxed);
        self.large_pages.fetch_add(1 << order, Ordering::Relaxed);
        // SAFETY: a block of managed RAM is never at address 0 of the linear map.
        Ok(unsafe { NonNull::new_unchecked(self.va(pa.as_u64())) })
    }

    fn free_large(&self, pa: PhysAddr, tag: u8, head: &AtomicU8) -> Result<(), SlabError> {
        if !self.owns_large(tag) {
            return Err(SlabError::NotOwned);
        }
        if pa.page_offset() != 0 {
            return Err(SlabError::NotObjectStart);
        }
        let order = (tag & TAG_LARGE_ORDER) as usize;
        // Claim the block: of two racing frees, one wins, the other sees a double free.
        if head.compare_exchange(tag, TAG_NONE, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return Err(SlabError::DoubleFree);
        }
        let slot = self.freed_large_next.fetch_add(1, Ordering::Relaxed) % FREED_LARGE_HISTORY;
        self.freed_large[slot].store(pa.as_u64(), Ordering::Relaxed);
        if let Some(tags) = self.tags.tags(pa, 1 << order) {
            for t in &tags[1..] {
                t.store(TAG_NONE, Ordering::Relaxed);
            }
        }
        // SAFETY: the block was a live large allocation (its tag said so and we claimed
        // it); our caller's contract says nothing uses it any more.
        if let Err(e) = unsafe { self.pages_free(pa, order) } {
            log::error!("slab: large block {pa:#x} (order {order}) refused by the buddy: {e}");
            return Err(SlabError::Corrupted);
        }
        self.large_allocs.fetch_sub(1, Ordering::Relaxed);
        self.large_pages.fetch_sub(1 << order, Ordering::Relaxed);
        Ok(())
    }

    #[inline(always)]
    fn free_inner(&self, ptr: NonNull<u8>, cache: Option<usize>) -> Result<(), SlabError> {
        let pa = self.pa(ptr.as_ptr());
        let tag_ref = self.tags.tag(pa).ok_or(SlabError::NotOwned)?;
        let tag = tag_ref.load(Ordering::Acquire);
        match tag {
            TAG_NONE if self.freed_large_recently(pa) => Err(SlabError::DoubleFree),
            TAG_NONE => Err(SlabError::NotOwned),
            TAG_LARGE_TAIL => Err(SlabError::NotObjectStart),
            t if t & TAG_LARGE != 0 => {
                if cache.is_some() {
                    return Err(SlabError::WrongCache);
                }
                self.free_large(pa, t, tag_ref)
            }
            t => {
                let id = t as usize - 1;
                if cache.is_some_and(|c| c != id) {
                    return Err(SlabError::WrongCache);
                }
                self.free_object(id, ptr.as_ptr(), pa)
            }
        }
    }

    /// Whether `pa` starts one of the last [`FREED_LARGE_HISTORY`] large objects freed (the
    /// error path of `kfree` only).
    #[cold]
    fn freed_large_recently(&self, pa: PhysAddr) -> bool {
        pa.page_offset() == 0 && self.freed_large.iter().any(|f| f.load(Ordering::Relaxed) == pa.as_u64())
    }

    // ----- cache internals -----

    /// Allocates an object from cache `id`: from this CPU's object cache when the
    /// allocator has them (see [`cpu`]), else under the cache lock.
    #[inline(always)]
    fn alloc_from(&self, id: usize, gfp: Gfp) -> Result<NonNull<u8>, SlabError> {
        if let Some(layer) = &self.cpu {
            // A raw pointer out of the closure (null: take the locked path), not a
            // `Result`: an `Option<Result<NonNull, _>>` is rebuilt through the stack with
            // overlapping stores and loads, a store-forwarding stall on each call.
            let p = layer.cpus.try_with(|p| self.alloc_cached(layer, p.get(), id, gfp)).unwrap_or(ptr::null_mut());
            if let Some(p) = NonNull::new(p) {
                return Ok(p);
            }
        }
        // No per-CPU caches, this CPU's in use further up the stack, or its magazine
        // empty and nothing to refill it with: the locked path decides and counts any error.
        self.alloc_locked(id, gfp)
    }

    /// Allocates an object from cache `id` under its lock.
    fn alloc_locked(&self, id: usize, gfp: Gfp) -> Result<NonNull<u8>, SlabError> {
        let mut obj = ptr::null_mut();
        let r = self.take_or_grow(&mut self.caches[id].lock(), id, gfp, core::slice::from_mut(&mut obj));
        match r {
            // SAFETY: one object was taken: `take_objects` forms only object pointers.
            Ok(_) => Ok(unsafe { NonNull::new_unchecked(obj) }),
            Err(e) => self.fail(e),
        }
    }

    /// Fills `out` (not empty) from `c`'s partial slabs (the cache's lock held), growing
    /// the cache by a slab when there are none, or when those there were found corrupt and
    /// retired; returns how many (at least one), or why there is no slab.
    fn take_or_grow(&self, c: &mut Cache, id: usize, gfp: Gfp, out: &mut [*mut u8]) -> Result<usize, SlabError> {
        loop {
            if c.partial.is_null() {
                self.grow(c, id, gfp)?;
            }
            // Zero only when every partial slab was retired: a new one serves.
            let n = self.take_objects(c, out);
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// Fills `out` with free objects from the first slab of `c`'s partial list (not empty;
    /// the cache's lock is held), moving on to the next partial slab while `out` has room;
    /// returns how many. The objects are the lowest free ones, found in the bitmap a word
    /// at a time: the allocator reads and writes only the slab header, never an object
    /// (so a write after free cannot corrupt what it hands out next).
    #[inline(always)]
    fn take_objects(&self, c: &mut Cache, out: &mut [*mut u8]) -> usize {
        let g = c.geo;
        let mut n = 0;
        while n < out.len() && !c.partial.is_null() {
            let s = c.partial;
            let words = g.objs.div_ceil(64);
            // SAFETY: `s` heads the partial list: a slab of this cache, whose header and
            // bitmap (`words` words) lie inside its block, owned by the cache; every read
            // and write below stays in those `words` words (`w < words` is checked before
            // each read), and every object pointer formed has `idx < objs`.
            unsafe {
                let map = SlabHeader::bitmap(s);
                let mut w = (*s).hint as usize;
                let mut took = 0u32;
                let mut bad = false;
                'fill: while n < out.len() && (*s).inuse + took < g.objs as u32 {
                    while w < words && *map.add(w) == 0 {
                        w += 1;
                    }
                    if w >= words {
                        bad = true;
                        break;
                    }
                    let mut word = *map.add(w);
                    while word != 0 && n < out.len() {
                        let idx = w * 64 + word.trailing_zeros() as usize;
                        if idx >= g.objs {
                            bad = true;
                            break 'fill;
                        }
                        word &= word - 1;
                        out[n] = s.cast::<u8>().add(g.first + idx * g.stride);
                        n += 1;
                        took += 1;
                    }
                    *map.add(w) = word;
                }
                (*s).hint = w.min(words) as u32;
                (*s).inuse += took;
                c.active += took as usize;
                if bad {
                    self.retire_corrupt_slab(c, s);
                } else if (*s).inuse == g.objs as u32 {
                    c.unlink(s);
                }
            }
        }
        if self.strict {
            for &obj in &out[..n] {
                self.check_free_object(c.name, &g, obj);
            }
        }
        n
    }

    /// A slab whose header and bitmap disagree (its in-use count says a free object is
    /// left, its bitmap has none, or a bit lies past the last object: memory written over):
    /// counted, logged, taken off the partial list and its magic cleared, so nothing
    /// reaches it again: a free of one of its objects is refused (`NotOwned`), and the slab
    /// is never given back (leaked: what else is overwritten in it is unknown).
    #[cold]
    fn retire_corrupt_slab(&self, c: &mut Cache, s: *mut SlabHeader) {
        self.corruptions.fetch_add(1, Ordering::Relaxed);
        log::error!("slab {}: header or bitmap of slab {s:p} overwritten; slab retired", c.name);
        c.unlink(s);
        if c.empty == s {
            c.empty = ptr::null_mut();
        }
        // SAFETY: `s` is a slab header of this cache, whose lock the caller holds.
        unsafe { (*s).magic = 0 };
    }

    /// Strict mode: checks the poison and red zone of an object about to be handed out.
    #[cold]
    fn check_free_object(&self, name: &str, g: &Geometry, obj: *mut u8) {
        // SAFETY: `obj` is an object slot (with its red zone) of a slab of a locked cache.
        let (body, rz) = unsafe {
            (core::slice::from_raw_parts(obj, g.size), core::slice::from_raw_parts(obj.add(g.size), g.stride - g.size))
        };
        if let Some(bad) = crate::poison::first_not(body, POISON_FREE_BYTE) {
            self.corruptions.fetch_add(1, Ordering::Relaxed);
            log::error!("slab {name}: free object {obj:p} written after free at offset {bad:#x}");
        }
        if let Some(bad) = crate::poison::first_not(rz, RED_ZONE_BYTE) {
            self.corruptions.fetch_add(1, Ordering::Relaxed);
            log::error!("slab {name}: red zone of free object {obj:p} overwritten at offset {:#x}", g.size + bad);
        }
    }

    /// Gets a new slab for cache `c` (whose lock the caller holds) from the buddy
    /// allocator and puts it on the partial list.
    #[inline(never)]
    fn grow(&self, c: &mut Cache, id: usize, gfp: Gfp) -> Result<(), SlabError> {
        let g = c.geo;
        if crate::fault::should_fail() {
            return Err(SlabError::OutOfMemory);
        }
        // Lock order: cache, then buddy. The buddy never calls back into the slab.
        let pa = self.pages_alloc(g.order, gfp).map_err(|_| SlabError::OutOfMemory)?;
        let Some(tags) = self.tags.tags(pa, 1 << g.order) else {
            // Unreachable (a buddy block lies in one region); give the block back.
            self.give_back(pa, g.order);
            return Err(SlabError::Corrupted);
        };
        let s = self.va(pa.as_u64()).cast::<SlabHeader>();
        // SAFETY: the block was just allocated to us; header, bitmap and objects lie inside
        // it (`Geometry::new` made sure they fit).
        unsafe {
            s.write(SlabHeader {
                magic: SLAB_MAGIC | id as u32,
                inuse: 0,
                hint: 0,
                brand: self.brand,
                next: ptr::null_mut(),
                prev: ptr::null_mut(),
            });
            let map = SlabHeader::bitmap(s);
            let words = g.objs.div_ceil(64);
            for w in 0..words {
                let bits = (g.objs - w * 64).min(64);
                *map.add(w) = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            }
            // The objects themselves are not written (strict mode poisons them).
            if self.strict {
                let base = s.cast::<u8>();
                for i in 0..g.objs {
                    let obj = base.add(g.first + i * g.stride);
                    obj.write_bytes(POISON_FREE_BYTE, g.size);
                    obj.add(g.size).write_bytes(RED_ZONE_BYTE, g.stride - g.size);
                }
            }
        }
        for t in tags {
            t.store(id as u8 + 1, Ordering::Release);
        }
        c.push(s);
        c.slabs += 1;
        Ok(())
    }

    /// Gives a block that was never handed out back to the buddy allocator.
    #[cold]
    fn give_back(&self, pa: PhysAddr, order: usize) {
        // SAFETY: the block was just allocated and nothing else has seen it.
        if let Err(e) = unsafe { self.pages_free(pa, order) } {
            log::error!("slab: block {pa:#x} refused by the buddy: {e}");
        }
    }

    /// Gives an empty slab of cache `c` (lock held) back to the buddy allocator.
    fn release(&self, c: &mut Cache, s: *mut SlabHeader) {
        c.unlink(s);
        c.slabs -= 1;
        let pa = self.pa(s.cast());
        if let Some(tags) = self.tags.tags(pa, 1 << c.geo.order) {
            for t in tags {
                t.store(TAG_NONE, Ordering::Release);
            }
        }
        // SAFETY: the slab is empty (no object in use) and off every list; its tags are
        // cleared, so no `kfree` can reach it any more.
        if let Err(e) = unsafe { self.pages_free(pa, c.geo.order) } {
            log::error!("slab {}: slab {pa:#x} refused by the buddy: {e}", c.name);
        }
    }

    /// Frees the object at `ptr` (frame tag says cache `id`): into this CPU's object
    /// cache when the allocator has them, else under the cache lock.
    #[inline(always)]
    fn free_object(&self, id: usize, ptr: *mut u8, pa: PhysAddr) -> Result<(), SlabError> {
        if id >= MAX_CACHES {
            return Err(SlabError::NotOwned);
        }
        if let Some(layer) = &self.cpu {
            if let Some(r) = layer.cpus.try_with(|p| self.free_cached(layer, p.get(), id, ptr, pa)) {
                return r;
            }
        }
        self.free_locked(id, ptr, pa)
    }

    /// [`Self::free_object`] under the cache lock: no per-CPU caches, or this CPU's in use
    /// further up the stack (out of line: the per-CPU path stays short).
    #[cold]
    #[inline(never)]
    fn free_locked(&self, id: usize, ptr: *mut u8, pa: PhysAddr) -> Result<(), SlabError> {
        self.free_in(&mut self.caches[id].lock(), id, ptr, pa)
    }

    /// Frees the object at `ptr` to its slab of cache `c` (slot `id`, lock held), with
    /// every check: the frame tag still names cache `id` (under the lock it is stable; it
    /// may have changed since it was read, and a late double free from a magazine may name
    /// a slab given back since, whose header is not ours to read), the slab is ours,
    /// `ptr` an object start, the object allocated (the bitmap's exact double-free check).
    fn free_in(&self, c: &mut Cache, id: usize, ptr: *mut u8, pa: PhysAddr) -> Result<(), SlabError> {
        let (s, off) = self.owned_slab(c, id, ptr, pa)?;
        let idx = c.geo.object_index(off).ok_or(SlabError::NotObjectStart)?;
        if self.strict {
            // SAFETY: the bit's word lies in the bitmap of `s`, ours, whose cache is locked.
            if unsafe { Self::is_free(s, idx) } {
                return Err(SlabError::DoubleFree);
            }
            self.check_red_zone(c.name, &c.geo, ptr);
            // SAFETY: the object is allocated and being freed; its slot is `size` bytes.
            unsafe { ptr.write_bytes(POISON_FREE_BYTE, c.geo.size) };
        }
        // SAFETY: `idx < objs` (`object_index`) in slab `s`, ours, whose cache is locked.
        unsafe { Self::set_free(s, idx) }?;
        // SAFETY: as above; one object of `s` was marked free.
        unsafe { self.slab_freed(c, s, 1, idx >> 6) };
        Ok(())
    }

    /// Frees objects that sat in a per-CPU magazine of cache `c` (slot `id`, lock held) to
    /// their slabs, with [`Self::free_in`]'s checks, in runs: the objects of one run lie
    /// in one slab, whose frame tag and header are checked once for the run, and whose
    /// counts and lists are updated once; each object's start and bit are checked one by
    /// one. A magazine flushed after a bulk free holds runs of one slab. Each object
    /// refused is logged and counted (a double free caught late, or memory written over).
    fn free_batch_in(&self, c: &mut Cache, id: usize, objs: &[*mut u8]) {
        let slab_bytes = c.geo.slab_bytes();
        let mut i = 0;
        while let Some(&head) = objs.get(i) {
            let pa = self.pa(head);
            let base = head.wrapping_sub(pa.as_u64() as usize & (slab_bytes - 1));
            let run = objs[i..]
                .iter()
                .position(|&o| (o as usize).wrapping_sub(base as usize) >= slab_bytes)
                .unwrap_or(objs.len() - i);
            let this = &objs[i..i + run];
            i += run;
            if self.strict || self.owned_slab(c, id, head, pa).is_err() {
                // Refused for the slab (or strict mode's poison): each object on its own,
                // so each gets its own error.
                for &obj in this {
                    if let Err(e) = self.free_in(c, id, obj, self.pa(obj)) {
                        self.refused_from_magazine(c, obj, e);
                    }
                }
                continue;
            }
            let s = base.cast::<SlabHeader>();
            let (mut freed, mut lowest) = (0, u32::MAX);
            for &obj in this {
                let off = (obj as usize).wrapping_sub(base as usize);
                let r = c.geo.object_index(off).ok_or(SlabError::NotObjectStart).and_then(|idx| {
                    // SAFETY: `idx < objs` in slab `s`, checked ours above, cache locked.
                    unsafe { Self::set_free(s, idx) }.map(|()| idx)
                });
                match r {
                    Ok(idx) => {
                        freed += 1;
                        lowest = lowest.min((idx >> 6) as u32);
                    }
                    Err(e) => self.refused_from_magazine(c, obj, e),
                }
            }
            if freed > 0 {
                // SAFETY: `freed` objects of `s` (ours, cache locked) were marked free.
                unsafe { self.slab_freed(c, s, freed, lowest as usize) };
            }
        }
    }

    /// An object from a per-CPU magazine that its slab refused: logged and counted.
    #[cold]
    fn refused_from_magazine(&self, c: &Cache, obj: *mut u8, e: SlabError) {
        self.invalid_frees.fetch_add(1, Ordering::Relaxed);
        log::error!("slab {}: object {obj:p} from a per-CPU cache refused: {e}", c.name);
    }

    /// The slab of cache `c` (slot `id`, lock held) holding `ptr` (at `pa`), and the
    /// offset of `ptr` in it, if the frame tag names cache `id` and the slab is ours.
    #[inline(always)]
    fn owned_slab(
        &self,
        c: &Cache,
        id: usize,
        ptr: *mut u8,
        pa: PhysAddr,
    ) -> Result<(*mut SlabHeader, usize), SlabError> {
        if self.tags.tag(pa).is_none_or(|t| t.load(Ordering::Relaxed) != id as u8 + 1) {
            return Err(SlabError::NotOwned);
        }
        let off = pa.as_u64() as usize & (c.geo.slab_bytes() - 1);
        let s = ptr.wrapping_sub(off).cast::<SlabHeader>();
        // Another allocator on the same buddy writes the same tags: its slab is not ours
        // to touch (its lock is not held), so nothing may run on it.
        if !self.slab_is_ours(s, id) {
            return Err(SlabError::NotOwned);
        }
        Ok((s, off))
    }

    /// Whether object `idx` of slab `s` is free (its bit set).
    ///
    /// # Safety
    /// `s` is a slab of ours whose cache's lock is held, and `idx` is below its object count.
    #[inline(always)]
    unsafe fn is_free(s: *mut SlabHeader, idx: usize) -> bool {
        // SAFETY: the caller's promise: the word is inside the bitmap of a locked slab.
        unsafe { *SlabHeader::bitmap(s).add(idx >> 6) & 1 << (idx & 63) != 0 }
    }

    /// Marks object `idx` of slab `s` free: [`SlabError::DoubleFree`] when it is already
    /// (the bitmap's exact check), nothing changed then.
    ///
    /// # Safety
    /// As for [`Self::is_free`].
    #[inline(always)]
    unsafe fn set_free(s: *mut SlabHeader, idx: usize) -> Result<(), SlabError> {
        // SAFETY: the caller's promise: the word is inside the bitmap of a locked slab.
        let word = unsafe { &mut *SlabHeader::bitmap(s).add(idx >> 6) };
        let bit = 1u64 << (idx & 63);
        if *word & bit != 0 {
            return Err(SlabError::DoubleFree);
        }
        *word |= bit;
        Ok(())
    }

    /// After `n` objects of slab `s` were marked free (the lowest in bitmap word
    /// `lowest`): the slab's count and hint, the cache's count, the partial list (a full
    /// slab goes back on it), and the empty-slab rule (at most one empty slab is kept).
    ///
    /// # Safety
    /// `s` is a slab of ours in cache `c` (whose lock is held), with at least `n` objects
    /// in use before the marking.
    #[inline(always)]
    unsafe fn slab_freed(&self, c: &mut Cache, s: *mut SlabHeader, n: usize, lowest: usize) {
        let objs = c.geo.objs as u32;
        // SAFETY: the header of this slab (the caller's promise).
        let (was_full, now_empty) = unsafe {
            let was_full = (*s).inuse == objs;
            (*s).inuse -= n as u32;
            if (lowest as u32) < (*s).hint {
                (*s).hint = lowest as u32;
            }
            (was_full, (*s).inuse == 0)
        };
        c.active -= n;
        if was_full {
            c.push(s);
        }
        if now_empty {
            // At most one empty slab, and `c.empty` points at it when there is one. The
            // slab `c.empty` names may have been allocated from since (it is not cleared
            // then, to keep the alloc path short): then it is not empty, and `s` replaces it.
            let e = c.empty;
            // SAFETY: `c.empty` always names a slab the cache still holds (it is cleared
            // before that slab is given back).
            if e.is_null() || e == s || unsafe { (*e).inuse } != 0 {
                c.empty = s;
            } else {
                self.release(c, s);
            }
        }
    }

    /// Whether the slab whose header is at `s` (a frame tag says: a slab of cache `id` of
    /// some allocator on our buddy) is one of ours. Reads only `magic` and `brand`, which
    /// its owner wrote before publishing the frame tags (release; our tag load acquires)
    /// and does not change while the slab has a live object (the pointer freed, by the
    /// caller's contract): a read that races with nothing, whoever owns the slab.
    #[inline(always)]
    fn slab_is_ours(&self, s: *const SlabHeader, id: usize) -> bool {
        // SAFETY: the frame tag (not `TAG_NONE`) says the block at `s` is a live slab of a
        // slab allocator sharing our buddy; its header's `magic` and `brand` are plain
        // `u32`s written once when the slab was made, read here without a reference to the
        // header (raw place reads), so nothing its owner does under its own lock to the
        // other fields is aliased.
        let (magic, brand) = unsafe { (ptr::addr_of!((*s).magic).read(), ptr::addr_of!((*s).brand).read()) };
        brand == self.brand && magic == SLAB_MAGIC | id as u32
    }

    /// Strict mode: checks (and restores) the red zone of an object being freed.
    #[cold]
    fn check_red_zone(&self, name: &str, g: &Geometry, obj: *mut u8) {
        // SAFETY: the red zone follows the object inside its slot.
        let rz = unsafe { core::slice::from_raw_parts_mut(obj.add(g.size), g.stride - g.size) };
        if let Some(bad) = crate::poison::first_not(rz, RED_ZONE_BYTE) {
            self.corruptions.fetch_add(1, Ordering::Relaxed);
            log::error!("slab {name}: red zone of object {obj:p} overwritten at offset {:#x} (overflow)", g.size + bad);
            rz.fill(RED_ZONE_BYTE);
        }
    }

    // ----- named caches -----

    /// Creates a cache of objects of `size` bytes aligned on `align` (at least 8), named
    /// `name` in [`Self::slabinfo`] (like Linux's `kmem_cache_create`).
    ///
    /// # Errors
    /// [`SlabError::BadLayout`] for a zero size, an alignment that is not a power of two
    /// or above 4096, or an object that does not fit a 32 KiB slab;
    /// [`SlabError::TooManyCaches`] when the [`MAX_CACHES`] slots are taken.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let requests = slab.create_cache("virtio_blk_req", 48, 16)?;
    /// let req = slab.cache_alloc(&requests)?;
    /// # let _ = req;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn create_cache(&self, name: &'static str, size: usize, align: usize) -> Result<CacheId, SlabError> {
        let geo = Geometry::new(size, align, self.strict).ok_or(SlabError::BadLayout)?;
        for (i, slot) in self.caches.iter().enumerate().skip(NR_KMALLOC) {
            let mut c = slot.lock();
            if !c.live {
                let generation = c.generation.wrapping_add(1);
                *c = Cache { name, live: true, generation, geo, ..Cache::VACANT };
                self.geos[i].set(&geo);
                return Ok(CacheId { slot: i as u8, generation, brand: self.brand });
            }
        }
        Err(SlabError::TooManyCaches)
    }

    /// Allocates an object from a named cache.
    ///
    /// # Errors
    /// [`SlabError::OutOfMemory`]; [`SlabError::WrongAllocator`] or
    /// [`SlabError::StaleCache`] for an id of another allocator or of a destroyed cache.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let cache = slab.create_cache("rx_desc", 32, 16)?;
    /// let desc = slab.cache_alloc(&cache)?;
    /// # let _ = desc;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn cache_alloc(&self, cache: &CacheId) -> Result<NonNull<u8>, SlabError> {
        let slot = match self.slot_of(cache) {
            Ok(slot) => slot,
            Err(e) => return self.fail(e),
        };
        self.alloc_from(slot, GFP_KERNEL)
    }

    /// Frees an object of a named cache.
    ///
    /// # Errors
    /// As [`Self::kfree`], [`SlabError::WrongCache`] for an object of another cache, and
    /// as [`Self::cache_alloc`] for a bad id.
    ///
    /// # Safety
    /// As [`Self::kfree`].
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let cache = slab.create_cache("rx_desc", 32, 16)?;
    /// let desc = slab.cache_alloc(&cache)?;
    /// // SAFETY: `desc` came from `cache` and nothing uses it after this.
    /// unsafe { slab.cache_free(&cache, desc) }?;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub unsafe fn cache_free(&self, cache: &CacheId, ptr: NonNull<u8>) -> Result<(), SlabError> {
        let r = self.slot_of(cache).and_then(|slot| self.free_inner(ptr, Some(slot)));
        if r.is_err() {
            self.invalid_frees.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The object size of a named cache.
    ///
    /// # Errors
    /// As [`Self::cache_alloc`] for a bad id.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let cache = slab.create_cache("rx_desc", 32, 16)?;
    /// assert_eq!(slab.cache_object_size(&cache)?, 32);
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn cache_object_size(&self, cache: &CacheId) -> Result<usize, SlabError> {
        let slot = self.slot_of(cache)?;
        Ok(self.caches[slot].lock().geo.size)
    }

    /// Destroys a named cache, giving its pages back.
    ///
    /// # Errors
    /// [`SlabError::CacheBusy`] when objects are still in use: the cache then stays (as
    /// Linux's `kmem_cache_destroy`, it cannot free what others hold), under its name.
    /// [`SlabError::WrongAllocator`] or [`SlabError::StaleCache`] for an id of another
    /// allocator or of a destroyed cache: no cache is touched.
    ///
    /// # Example
    /// ```no_run
    /// let slab = memory::slab::global().unwrap();
    /// let cache = slab.create_cache("probe_scratch", 256, 8)?;
    /// slab.destroy_cache(cache)?;                          // no object in use: pages given back
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn destroy_cache(&self, cache: CacheId) -> Result<(), SlabError> {
        if cache.brand != self.brand {
            return Err(SlabError::WrongAllocator);
        }
        if cache.slot as usize >= MAX_CACHES {
            return Err(SlabError::WrongAllocator);
        }
        // Objects of the cache in this CPU's magazine go back first (other CPUs': see
        // `KmemCache::destroy`, which drains them all).
        self.drain_local();
        let mut guard = self.caches[cache.slot as usize].lock();
        let c = &mut *guard;
        if !c.live || c.generation != cache.generation {
            return Err(SlabError::StaleCache);
        }
        if c.active != 0 {
            return Err(SlabError::CacheBusy);
        }
        // Every slab is empty, so at most the kept one is left.
        while !c.partial.is_null() {
            let s = c.partial;
            self.release(c, s);
        }
        *c = Cache { generation: c.generation, ..Cache::VACANT };
        Ok(())
    }

    // ----- housekeeping and statistics -----

    /// Gives every cache's kept empty slab back to the buddy allocator; returns the number
    /// of frames given back.
    ///
    /// # Example
    /// ```no_run
    /// let freed = memory::slab::global().unwrap().shrink();
    /// log::info!("slab: {freed} frames given back");
    /// ```
    pub fn shrink(&self) -> usize {
        self.drain_local();
        self.caches.iter().map(|slot| self.release_kept_empty(&mut slot.lock())).sum()
    }

    /// Gives cache `c`'s kept empty slab (lock held) back to the buddy; the frames given.
    fn release_kept_empty(&self, c: &mut Cache) -> usize {
        let s = c.empty;
        c.empty = ptr::null_mut();
        // SAFETY: `c.empty` names a slab the cache holds (see `free_object`).
        if !s.is_null() && unsafe { (*s).inuse } == 0 {
            self.release(c, s);
            return 1 << c.geo.order;
        }
        0
    }

    /// As [`Self::shrink`] without waiting: a cache whose lock is taken is skipped (for
    /// reclaim, whose shrinkers only try-lock). Returns the frames given back.
    ///
    /// # Example
    /// ```no_run
    /// let freed = memory::slab::global().unwrap().try_shrink();
    /// # let _ = freed;
    /// ```
    pub fn try_shrink(&self) -> usize {
        self.try_drain_local();
        self.caches.iter().filter_map(IrqSpinLock::try_lock).map(|mut c| self.release_kept_empty(&mut c)).sum()
    }

    /// Frames in the empty slabs the caches keep (what [`Self::shrink`] would give back
    /// now, objects in magazines not counted); caches whose lock is taken are skipped.
    pub fn reclaimable_pages(&self) -> usize {
        let mut pages = 0;
        for slot in &self.caches {
            let Some(c) = slot.try_lock() else { continue };
            // SAFETY: `c.empty` names a slab the cache holds (see `free_object`).
            if !c.empty.is_null() && unsafe { (*c.empty).inuse } == 0 {
                pages += 1 << c.geo.order;
            }
        }
        pages
    }

    /// The counters of every cache, in slot order (kmalloc classes first).
    ///
    /// # Example
    /// ```no_run
    /// for c in memory::slab::global().unwrap().cache_stats() {
    ///     log::debug!("{}: {} of {} objects in use", c.name, c.active_objs, c.num_objs);
    /// }
    /// ```
    pub fn cache_stats(&self) -> impl Iterator<Item = CacheStats> + use<'_, 'b> {
        self.caches.iter().enumerate().filter_map(|(id, slot)| self.stats_of(id, slot))
    }

    /// Cache `id`'s counters, objects in per-CPU magazines counted free; `None` when the
    /// slot holds no cache.
    fn stats_of(&self, id: usize, slot: &IrqSpinLock<Cache>) -> Option<CacheStats> {
        let mut st = {
            let c = slot.lock();
            if !c.live {
                return None;
            }
            c.stats()
        };
        st.active_objs = st.active_objs.saturating_sub(self.cpu_cached(id));
        Some(st)
    }

    /// Whole-allocator counters.
    ///
    /// # Example
    /// ```no_run
    /// let s = memory::slab::global().unwrap().stats();
    /// log::info!("slab: {} pages, {} invalid frees", s.slab_pages, s.invalid_frees);
    /// ```
    pub fn stats(&self) -> SlabStats {
        SlabStats {
            slab_pages: self.cache_stats().map(|c| c.pages()).sum(),
            large_allocs: self.large_allocs.load(Ordering::Relaxed),
            large_pages: self.large_pages.load(Ordering::Relaxed),
            alloc_failures: self.alloc_failures.load(Ordering::Relaxed),
            invalid_frees: self.invalid_frees.load(Ordering::Relaxed),
            corruptions: self.corruptions.load(Ordering::Relaxed),
        }
    }

    /// The caches in the format of Linux's `/proc/slabinfo` (newest cache first).
    ///
    /// # Example
    /// ```no_run
    /// log::info!("{}", memory::slab::global().unwrap().slabinfo());
    /// ```
    pub fn slabinfo(&self) -> SlabInfo<'_, 'b> {
        SlabInfo(self)
    }
}

impl Drop for SlabAllocator<'_> {
    /// Gives the per-CPU magazines back to their caches and their block to the buddy
    /// (slabs still holding objects stay allocated, as before: their objects may be in use),
    /// and its owner mark back to the buddy, unless a large block of it is still allocated:
    /// then the mark stays taken for good, so that no later allocator takes that block for
    /// its own.
    fn drop(&mut self) {
        self.drop_cpu_layer();
        // A large block still held keeps the mark: another allocator with it would take
        // that block for its own.
        if self.large_allocs.load(Ordering::Relaxed) == 0 {
            self.buddy.lock().release_owner_mark(self.mark);
        }
    }
}

/// Displays a slab allocator's caches like Linux's `/proc/slabinfo`: a header line
/// `# name <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab>`, then one line
/// per cache, newest first.
pub struct SlabInfo<'a, 'b>(&'a SlabAllocator<'b>);

impl fmt::Display for SlabInfo<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab>")?;
        for (id, slot) in self.0.caches.iter().enumerate().rev() {
            if let Some(stats) = self.0.stats_of(id, slot) {
                writeln!(f, "{stats}")?;
            }
        }
        Ok(())
    }
}

// ----- the global instance -----

static SLAB: Once<SlabAllocator<'static>> = Once::new();

/// Builds the kernel's slab allocator over the global buddy allocator
/// ([`buddy::init`] first).
///
/// # Errors
/// [`SlabError::NotInitialized`] before [`buddy::init`], [`SlabError::AlreadyInitialized`]
/// on a second call, or an error of [`SlabAllocator::new`].
///
/// # Example
/// ```no_run
/// // after memory::buddy::init:
/// memory::slab::init(false)?;
/// let p = memory::slab::kmalloc(24, 8)?;
/// # let _ = p;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub fn init(strict: bool) -> Result<(), SlabError> {
    let b = buddy::global().ok_or(SlabError::NotInitialized)?;
    if SLAB.is_completed() {
        return Err(SlabError::AlreadyInitialized);
    }
    SLAB.try_call_once(|| SlabAllocator::with_cpu_caches(b, strict)).map(|_| ())
}

/// The global slab allocator, once [`init`] has run.
///
/// # Example
/// ```no_run
/// let slab = memory::slab::global().ok_or(memory::slab::SlabError::NotInitialized)?;
/// let p = slab.kmalloc(24, 8)?;
/// # let _ = p;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub fn global() -> Option<&'static SlabAllocator<'static>> {
    SLAB.get()
}

/// [`SlabAllocator::kmalloc`] on the global allocator.
///
/// # Errors
/// [`SlabError::NotInitialized`] before [`init`], else as [`SlabAllocator::kmalloc`].
///
/// # Example
/// ```no_run
/// let hdr = memory::slab::kmalloc(40, 8)?;             // from kmalloc-64
/// // SAFETY: 40 bytes were just allocated at `hdr`, aligned on 8.
/// unsafe { hdr.cast::<u64>().as_ptr().write(0) };
/// // SAFETY: `hdr` came from kmalloc and nothing uses it after this.
/// unsafe { memory::slab::kfree(hdr) }?;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub fn kmalloc(size: usize, align: usize) -> Result<NonNull<u8>, SlabError> {
    SLAB.get().ok_or(SlabError::NotInitialized)?.kmalloc(size, align)
}

/// [`SlabAllocator::kmalloc_gfp`] on the global allocator.
///
/// # Errors
/// [`SlabError::NotInitialized`] before [`init`], else as [`SlabAllocator::kmalloc_gfp`].
///
/// # Example
/// ```no_run
/// let p = memory::slab::kmalloc_gfp(64, 8, memory::gfp::GFP_ATOMIC | memory::gfp::__GFP_ZERO)?;
/// // SAFETY: `p` came from kmalloc_gfp and nothing uses it after this.
/// unsafe { memory::slab::kfree(p) }?;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub fn kmalloc_gfp(size: usize, align: usize, gfp: Gfp) -> Result<NonNull<u8>, SlabError> {
    SLAB.get().ok_or(SlabError::NotInitialized)?.kmalloc_gfp(size, align, gfp)
}

/// [`SlabAllocator::kzalloc`] on the global allocator.
///
/// # Errors
/// [`SlabError::NotInitialized`] before [`init`], else as [`SlabAllocator::kmalloc`].
///
/// # Example
/// ```no_run
/// let state = memory::slab::kzalloc(512, 64)?;         // zeroed driver state
/// # let _ = state;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub fn kzalloc(size: usize, align: usize) -> Result<NonNull<u8>, SlabError> {
    SLAB.get().ok_or(SlabError::NotInitialized)?.kzalloc(size, align)
}

/// [`SlabAllocator::kfree`] on the global allocator; `kfree(None)` does nothing.
///
/// # Errors
/// [`SlabError::NotInitialized`] before [`init`], else as [`SlabAllocator::kfree`].
///
/// # Safety
/// As [`SlabAllocator::kfree`].
///
/// # Example
/// ```no_run
/// let p = memory::slab::kmalloc(64, 8)?;
/// // SAFETY: `p` came from kmalloc and nothing uses it after this.
/// unsafe { memory::slab::kfree(p) }?;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub unsafe fn kfree(ptr: impl Into<Option<NonNull<u8>>>) -> Result<(), SlabError> {
    // kfree(NULL) does nothing, even before `init`.
    let Some(ptr) = ptr.into() else { return Ok(()) };
    // SAFETY: forwarded to our caller.
    unsafe { SLAB.get().ok_or(SlabError::NotInitialized)?.kfree(ptr) }
}

/// [`SlabAllocator::ksize`] on the global allocator.
///
/// # Errors
/// [`SlabError::NotInitialized`] before [`init`], else as [`SlabAllocator::ksize`].
///
/// # Example
/// ```no_run
/// let p = memory::slab::kmalloc(200, 8)?;
/// let room = memory::slab::ksize(p)?;                  // 256: the kmalloc-256 slot
/// # let _ = room;
/// # Ok::<(), memory::slab::SlabError>(())
/// ```
pub fn ksize(ptr: NonNull<u8>) -> Result<usize, SlabError> {
    SLAB.get().ok_or(SlabError::NotInitialized)?.ksize(ptr)
}

/// [`SlabAllocator::shrink`] on the global allocator (0 before [`init`]).
///
/// # Example
/// ```no_run
/// let frames = memory::slab::shrink();                 // e.g. under memory pressure
/// # let _ = frames;
/// ```
pub fn shrink() -> usize {
    drain_all();
    SLAB.get().map_or(0, SlabAllocator::shrink)
}

/// The global allocator's counters, or `None` before [`init`].
///
/// # Example
/// ```no_run
/// if let Some(s) = memory::slab::stats() {
///     log::info!("slab: {} pages, {} large allocations", s.slab_pages, s.large_allocs);
/// }
/// ```
pub fn stats() -> Option<SlabStats> {
    SLAB.get().map(SlabAllocator::stats)
}

/// The global allocator's `/proc/slabinfo`, or `None` before [`init`].
///
/// # Example
/// ```no_run
/// if let Some(info) = memory::slab::slabinfo() {
///     log::info!("{info}");                            // as /proc/slabinfo
/// }
/// ```
pub fn slabinfo() -> Option<SlabInfo<'static, 'static>> {
    SLAB.get().map(SlabAllocator::slabinfo)
}

/// A named cache of the global slab allocator (`kmem_cache_create`). Keep it in a
/// `static` (`spin::Once`) or a long-lived structure; it is not `Clone`.
#[derive(Debug, PartialEq, Eq)]
pub struct KmemCache(CacheId);

impl KmemCache {
    /// Creates a cache of `size`-byte objects aligned on `align`, shown as `name`.
    ///
    /// # Errors
    /// [`SlabError::NotInitialized`] before [`init`], else as
    /// [`SlabAllocator::create_cache`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::slab::KmemCache;
    /// static REQUESTS: spin::Once<KmemCache> = spin::Once::new();
    /// let cache = REQUESTS.try_call_once(|| KmemCache::new("virtio_blk_req", 48, 16))?;
    /// let req = cache.alloc()?;
    /// # let _ = req;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn new(name: &'static str, size: usize, align: usize) -> Result<Self, SlabError> {
        let s = SLAB.get().ok_or(SlabError::NotInitialized)?;
        s.create_cache(name, size, align).map(KmemCache)
    }

    /// The global allocator (a `KmemCache` only exists after `init`).
    fn slab() -> Result<&'static SlabAllocator<'static>, SlabError> {
        SLAB.get().ok_or(SlabError::NotInitialized)
    }

    /// Allocates an object.
    ///
    /// # Errors
    /// [`SlabError::OutOfMemory`].
    ///
    /// # Example
    /// ```no_run
    /// let cache = memory::slab::KmemCache::new("rx_desc", 32, 16)?;
    /// let desc = cache.alloc()?;
    /// # let _ = desc;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn alloc(&self) -> Result<NonNull<u8>, SlabError> {
        Self::slab()?.cache_alloc(&self.0)
    }

    /// Frees an object of this cache.
    ///
    /// # Errors
    /// As [`SlabAllocator::cache_free`].
    ///
    /// # Safety
    /// As [`SlabAllocator::kfree`].
    ///
    /// # Example
    /// ```no_run
    /// let cache = memory::slab::KmemCache::new("rx_desc", 32, 16)?;
    /// let desc = cache.alloc()?;
    /// // SAFETY: `desc` came from `cache` and nothing uses it after this.
    /// unsafe { cache.free(desc) }?;
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<(), SlabError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::slab()?.cache_free(&self.0, ptr) }
    }

    /// The object size.
    ///
    /// # Example
    /// ```no_run
    /// let cache = memory::slab::KmemCache::new("rx_desc", 32, 16)?;
    /// assert_eq!(cache.object_size(), 32);
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn object_size(&self) -> usize {
        Self::slab().and_then(|s| s.cache_object_size(&self.0)).unwrap_or(0)
    }

    /// Destroys the cache.
    ///
    /// # Errors
    /// As [`SlabAllocator::destroy_cache`].
    ///
    /// # Example
    /// ```no_run
    /// let cache = memory::slab::KmemCache::new("probe_scratch", 256, 8)?;
    /// cache.destroy()?;                                    // refused while objects are in use
    /// # Ok::<(), memory::slab::SlabError>(())
    /// ```
    pub fn destroy(self) -> Result<(), SlabError> {
        // Objects of the cache may sit in any CPU's magazine.
        drain_all();
        Self::slab()?.destroy_cache(self.0)
    }
}

/// The kernel heap: [`GlobalAlloc`] over the global slab and buddy allocators.
///
/// Before [`init`], allocation returns null. `dealloc` of a pointer the allocator does
/// not own is reported with `log::error!` (and counted in [`SlabStats::invalid_frees`]);
/// the allocator stays consistent. Never calls vmalloc.
///
/// # Example
/// ```no_run
/// // In the kernel binary's crate root:
/// #[global_allocator]
/// static HEAP: memory::slab::KernelAllocator = memory::slab::KernelAllocator;
///
/// fn main() {
///     // after memory::kernel::init: `alloc` collections live on the slab
///     let v: Vec<u32> = (0..100).collect();
///     # let _ = v;
/// }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelAllocator;

// SAFETY: blocks come from the slab allocator, which hands out each byte to one owner at a
// time, sized and aligned as the layout asks (kmalloc honours alignment).
unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match SLAB.get() {
            Some(s) => s.kmalloc(layout.size(), layout.align()).map_or(ptr::null_mut(), NonNull::as_ptr),
            None => ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match SLAB.get() {
            Some(s) => s.kzalloc(layout.size(), layout.align()).map_or(ptr::null_mut(), NonNull::as_ptr),
            None => ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (Some(s), Some(p)) = (SLAB.get(), NonNull::new(ptr)) else {
            log::error!("kernel heap: dealloc({ptr:p}, {layout:?}) of memory it never gave");
            return;
        };
        // SAFETY: `GlobalAlloc`'s contract: `ptr` came from this allocator and is not used
        // after. Should it not have, `kfree` refuses it without touching anything.
        if let Err(e) = unsafe { s.kfree(p) } {
            log::error!("kernel heap: dealloc({ptr:p}, {layout:?}): {e}");
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (Some(s), Some(p)) = (SLAB.get(), NonNull::new(ptr)) else {
            return ptr::null_mut();
        };
        // Still fits (and the alignment is unchanged): keep it.
        if s.ksize(p).is_ok_and(|cap| new_size <= cap) {
            return ptr;
        }
        let Ok(new) = s.kmalloc(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        // SAFETY: both blocks are live and distinct; the old one holds `layout.size()`
        // bytes, the new one `new_size`.
        unsafe {
            ptr::copy_nonoverlapping(ptr, new.as_ptr(), layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new.as_ptr()
    }
}
