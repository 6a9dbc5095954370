//! Physical frame allocator: a binary buddy system over the machine's RAM regions.
//!
//! [`BuddyAllocator`] hands out naturally aligned blocks of `2^order` frames
//! (`order` in `0..=`[`MAX_ORDER`], 4 KiB to 4 MiB) out of one or more disjoint physical
//! RAM regions minus reserved ranges (device tree blob, kernel image, boot tables,
//! `/memreserve/` entries...). It reaches RAM through a [`LinearMap`]: the linear map of
//! RAM on target, a heap buffer in host tests.
//!
//! # Algorithm
//! One doubly linked free list per order, kept *inside* the free blocks themselves (the
//! first 16 bytes of a free block hold the frame numbers of its neighbours), plus a
//! bitmask of the non-empty lists. `alloc(order)` finds the smallest non-empty list at or
//! above `order` with one `trailing_zeros`, pops its head and splits it down, pushing the
//! upper halves. `free(pa, order)` merges with the buddy (`pfn ^ (1 << order)`) while the
//! buddy is a free block of the same order in the same region; the buddy is unlinked in
//! O(1) because the lists are doubly linked. No operation scans memory or divides; the
//! work per call is bounded by the number of splits or merges (at most [`MAX_ORDER`]).
//! Blocks are aligned on their size in *physical* frame numbers, so an order-9 block is a
//! 2 MiB-aligned physical block (usable for a block mapping). A block never spans two
//! regions (nor a reserved frame), even when regions touch.
//!
//! # Order-0 hot list
//! Most allocations are single frames (page tables, slabs, vmalloc's pages), and a lone
//! order-0 alloc/free pair would otherwise split a block down through every order and merge
//! it back up. A private allocator (one CPU at a time, behind its owner's lock) keeps the
//! hot list below; the kernel's allocator turns it off and keeps one such list per CPU and
//! zone in front of its lock instead ([`pcp`]: Linux's per-CPU page lists). The allocator
//! keeps a small
//! cache of free order-0 frames outside the buddy lists: [`BuddyAllocator::alloc`] of order 0
//! and [`BuddyAllocator::alloc_bulk`] take from it first (the most recently freed frame
//! first: its lines are likely still in the data cache), and order-0 frees put frames on it.
//! When it is empty, an order-0 allocation refills it with `batch` frames taken from the
//! lists at once; when a free takes it above `high` frames, the `batch` coldest ones go back
//! to the lists (and merge). Defaults: [`HOT_HIGH`] 512 and [`HOT_BATCH`] 64, about Linux's
//! `pcp->high`/`pcp->batch` on a 1 GiB zone; [`BuddyAllocator::set_hot_limits`] changes them
//! (`high` 0 turns the hot list off). An alloc/free ping-pong of order 0 thus never touches
//! the lists. The hot list is a ring of at most [`HOT_CAPACITY`] frame numbers inside the
//! allocator value: it writes nothing to the frames (except the poison in strict mode).
//!
//! Accounting stays exact:
//! - a frame on the hot list is *free*: it counts in [`BuddyAllocator::free_pages`] and
//!   [`BuddyStats::free_pages`], and apart in [`BuddyStats::hot_pages`];
//! - as in Linux, whose `/proc/buddyinfo` does not count per-CPU pages, the free-block
//!   counts ([`BuddyAllocator::free_blocks`], [`BuddyInfo`]) are those of the buddy lists
//!   only, so `free_pages == Σ free_blocks[o] << o + hot_pages`. Call
//!   [`BuddyAllocator::drain_hot`] (or [`drain_hot`] on the global instance) first for the
//!   buddyinfo of fully merged memory, e.g. to compare it with the boot state;
//! - a hot frame has its own state byte ("free, hot"): freeing it again is
//!   [`BuddyError::NotAllocated`], exactly as for a frame on the lists, and it is never
//!   merged with its buddy until it is drained;
//! - an allocation of order > 0 that finds no block drains the hot list and retries, so it
//!   fails only when the memory really is not there; order 0 fails only when both the hot
//!   list and the lists are empty;
//! - [`BuddyAllocator::check_consistency`] checks the hot list too (states, no duplicates,
//!   the counts).
//!
//! # Metadata, and its cost
//! Two arrays of one byte per frame of every region (reserved frames included), carved
//! at initialisation from the first free, page-aligned stretch of the managed RAM (no heap
//! exists then):
//! - the *state* byte: not managed (reserved, hole, metadata), free block head (with its
//!   order), allocated block head (with its order), or interior frame of a block. Raw
//!   [`BuddyAllocator::free`] checks it, so freeing a frame that is not the head of an
//!   allocated block of exactly that order is an error, not corruption;
//! - the *owner tag* byte ([`FrameTags`]): free for the owner of an allocated block to
//!   record what the frame is (the slab allocator records its cache there, which makes
//!   its `kfree` ownership check O(1) and exact). The buddy allocator never reads it.
//!
//! That is 2 bytes per 4,096-byte frame = **0.0488 %** of RAM, rounded up to whole pages:
//! 16 pages (64 KiB) for 128 MiB, 512 pages (2 MiB) for 4 GiB. The free lists cost
//! nothing (they live in the free memory), and the fixed part (`BuddyAllocator` itself,
//! about 8.8 KiB with the hot list's ring) lives wherever the value lives (a `static` on
//! target). A state array
//! alone would be 0.024 %; per-frame list links (2 × u32) would have brought the total to
//! 0.22 %, over the 0.2 % budget, hence the intrusive lists. See [`metadata_bytes`].
//!
//! # Strict mode
//! With `strict`, every free frame is filled with [`POISON_BYTE`] (except the 16-byte list
//! node at the head of each block on the lists; frames on the hot list are poisoned whole),
//! and every allocation checks the poison before
//! handing the block out. A mismatch (someone wrote to memory after freeing it) is logged
//! with `log::error!` (address and first bad offset) and counted in
//! [`BuddyStats::corruptions`]; the block is still handed out.
//!
//! # Global instance
//! [`init`] builds the allocator of the running kernel behind an [`IrqSpinLock`] (class
//! `buddy`: interrupt handlers may allocate), with the per-CPU page lists in front of it
//! ([`pcp`]); [`alloc_pages`], [`free_pages`], [`alloc_pages_bulk`], [`Frames`] and friends
//! use them. [`global`] gives the zones behind their lock, bypassing the per-CPU lists.
//! The struct itself works without the global (host tests build many).
//! The buddy allocator never allocates and never calls the slab allocator, so any other
//! lock may be held while its lock is taken (lock order: slab caches, then buddy).

use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use hal::addr::{PhysAddr, PhysRange, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use hal::linear::{LinearMap, LinearOffset};
use hal::mmu::TableAlloc;
use hal::sync::IrqSpinLock;
use spin::Once;

use crate::gfp::{Gfp, __GFP_NORETRY, __GFP_NOWARN, __GFP_ZERO, GFP_KERNEL};
pub use crate::gfp::{MAX_NR_ZONES, ZONE_DMA, ZONE_DMA32, ZONE_NAMES, ZONE_NORMAL};

pub mod pcp;
#[cfg(test)]
pub(crate) mod testram;
use pcp::HotList;
pub use pcp::{drain_local, pcp_limits, pcp_update_cpus, set_pcp_limits, PcpLimits};
#[cfg(test)]
mod tests;

/// The end of `ZONE_DMA32`: 4 GiB.
pub const DMA32_LIMIT: u64 = 1 << 32;
/// Linux's `sysctl_lowmem_reserve_ratio` per zone (`DMA`, `DMA32`: 256; `Normal`: 32, with
/// no zone above it to reserve against).
pub const LOWMEM_RESERVE_RATIO: [usize; MAX_NR_ZONES] = [256, 256, 32];

/// The largest block order: blocks of `2^10` frames (4 MiB), as Linux's default.
pub const MAX_ORDER: usize = 10;
/// Number of orders, `0..=MAX_ORDER`.
pub const NR_ORDERS: usize = MAX_ORDER + 1;
/// The most RAM regions one allocator manages.
pub const MAX_REGIONS: usize = 8;
/// The byte strict mode fills free frames with (Linux's `PAGE_POISON`).
pub const POISON_BYTE: u8 = 0xaa;
/// Bytes of metadata per frame (state byte and owner tag).
pub const METADATA_BYTES_PER_FRAME: usize = 2;
/// Most frames the order-0 hot list can hold (its `high` watermark is at most one less).
/// 1,024 frame numbers: 8 KiB inside the allocator value.
pub const HOT_CAPACITY: usize = 1024;
/// Default high watermark of the hot list: a free that takes it above this many frames
/// gives a batch back to the lists. 512 frames (2 MiB) holds a vmalloc area of a few
/// hundred pages freed and allocated again without touching the lists (Linux's per-CPU
/// lists hold about as much on a 1 GiB zone); measured on `long_busy_list_alloc_test`
/// (100-page areas), 64 cost 10% more.
pub const HOT_HIGH: usize = 512;
/// Default batch of the hot list: frames taken from the lists when it is empty, and given
/// back when it is above its high watermark (Linux's `pcp->batch` is 63 on such a zone).
pub const HOT_BATCH: usize = 64;

// A hot-list entry packs a frame number with its region's slot in 3 bits.
const _: () = assert!(MAX_REGIONS <= 8 && HOT_CAPACITY.is_power_of_two());

/// Size of the free-list node at the head of every free block.
const NODE_BYTES: usize = core::mem::size_of::<FreeNode>();
/// End of a free list.
const NIL: u64 = u64::MAX;

// Per-frame state byte.
/// Interior frame of a block (free or allocated), or a usable frame during init.
const ST_TAIL: u8 = 0x00;
/// Head of a free block; low bits: order.
const ST_FREE: u8 = 0x40;
/// Head of an allocated block; low bits: order.
const ST_ALLOC: u8 = 0x80;
/// A free order-0 frame on the hot list (not on any buddy list).
const ST_HOT: u8 = 0x20;
/// Head of an untouched free block beyond its zone's frontier (never written since
/// boot, on no list); low bits: order.
const ST_FRESH: u8 = 0x10;
/// Not managed: reserved, metadata.
const ST_NONE: u8 = 0xff;
/// Order bits of a state byte.
const ST_ORDER: u8 = 0x0f;

/// The list node kept in the first bytes of every free block.
#[repr(C)]
struct FreeNode {
    /// Frame number of the next free block of the same order, or [`NIL`].
    next: u64,
    /// Frame number of the previous free block of the same order, or [`NIL`].
    prev: u64,
}

/// Why a buddy allocator operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuddyError {
    /// No free block of the requested order (after splitting larger ones).
    OutOfMemory,
    /// An order above [`MAX_ORDER`].
    BadOrder,
    /// An address that is not page aligned, or not aligned on the block size of the order.
    Misaligned,
    /// An address outside every managed RAM region.
    OutOfRange,
    /// A frame in a reserved range (or the allocator's own metadata): never handed out.
    Reserved,
    /// The frame is not the head of an allocated block: it is free (a double free) or
    /// inside a larger block.
    NotAllocated,
    /// The block is allocated, but with a different order.
    WrongOrder {
        /// The order the block was allocated with.
        allocated: u8,
    },
    /// Initialisation: no region given, or no usable frame left after the reservations.
    NoMemory,
    /// Initialisation: more than [`MAX_REGIONS`] regions.
    TooManyRegions,
    /// Initialisation: two RAM regions overlap.
    OverlappingRegions,
    /// Initialisation: a RAM region is not covered by the linear map.
    OutsideLinearMap,
    /// Initialisation: no free stretch of RAM large enough for the metadata.
    NoRoomForMetadata,
    /// The global allocator was already initialised.
    AlreadyInitialized,
    /// The global allocator is not initialised yet.
    NotInitialized,
    /// The frames are there, but taking them would take every zone the request may use
    /// below its `min` watermark (3/8 of it for `GFP_ATOMIC`) plus its `lowmem_reserve`.
    BelowMin,
    /// A free list points outside managed RAM: memory was overwritten after being freed.
    Corrupted,
}

impl fmt::Display for BuddyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuddyError::OutOfMemory => f.write_str("out of physical memory"),
            BuddyError::BadOrder => write!(f, "block order above {MAX_ORDER}"),
            BuddyError::Misaligned => f.write_str("address not aligned on its block size"),
            BuddyError::OutOfRange => f.write_str("address outside managed RAM"),
            BuddyError::Reserved => f.write_str("address in a reserved range"),
            BuddyError::NotAllocated => f.write_str("frame is not the head of an allocated block (double free?)"),
            BuddyError::WrongOrder { allocated } => {
                write!(f, "block was allocated with order {allocated}")
            }
            BuddyError::NoMemory => f.write_str("no usable RAM"),
            BuddyError::TooManyRegions => write!(f, "more than {MAX_REGIONS} RAM regions"),
            BuddyError::OverlappingRegions => f.write_str("RAM regions overlap"),
            BuddyError::OutsideLinearMap => f.write_str("RAM region outside the linear map"),
            BuddyError::NoRoomForMetadata => f.write_str("no free RAM for the frame metadata"),
            BuddyError::AlreadyInitialized => f.write_str("frame allocator already initialised"),
            BuddyError::NotInitialized => f.write_str("frame allocator not initialised"),
            BuddyError::Corrupted => f.write_str("free list corrupted"),
            BuddyError::BelowMin => f.write_str("allocation would cross the min watermark"),
        }
    }
}

impl core::error::Error for BuddyError {}

/// One managed RAM region as seen by the metadata arrays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RegionInfo {
    /// First frame of the region.
    start_pfn: u64,
    /// Number of frames.
    frames: u64,
    /// Index of the region's first frame in the metadata arrays.
    index: usize,
    /// The region's slot in [`FrameMap`] (what hot-list entries record).
    slot: usize,
    /// The zone the region belongs to.
    zone: usize,
}

/// The map from physical frames to their index in the per-frame metadata arrays.
///
/// Frames of all regions are numbered densely, region after region, in address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameMap {
    regions: [RegionInfo; MAX_REGIONS],
    len: usize,
    frames: usize,
}

impl FrameMap {
    /// The metadata index of the frame holding `pa`, or `None` outside every region.
    ///
    /// # Example
    /// ```no_run
    /// let buddy = memory::buddy::global().unwrap().lock();
    /// let pa = hal::PhysAddr::new(0x4010_0000);
    /// if let Some(i) = buddy.frame_map().index(pa) {
    ///     log::debug!("frame {pa:#x} is metadata slot {i} of {}", buddy.frame_map().frames());
    /// }
    /// ```
    #[inline]
    pub fn index(&self, pa: PhysAddr) -> Option<usize> {
        self.index_of_pfn(pa.as_u64() >> PAGE_SHIFT)
    }

    /// Number of frames covered (reserved frames included).
    ///
    /// # Example
    /// ```no_run
    /// let frames = memory::buddy::global().unwrap().lock().frame_map().frames();
    /// log::info!("buddy metadata covers {frames} frames");
    /// ```
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The regions, in address order.
    ///
    /// # Example
    /// ```no_run
    /// let buddy = memory::buddy::global().unwrap().lock();
    /// for r in buddy.frame_map().regions() {
    ///     log::info!("RAM {:#x}..{:#x}", r.start(), r.end());
    /// }
    /// ```
    pub fn regions(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.regions[..self.len]
            .iter()
            .filter_map(|r| PhysRange::new(PhysAddr::new(r.start_pfn << PAGE_SHIFT), r.frames << PAGE_SHIFT).ok())
    }

    /// The region holding frame `pfn`.
    #[inline(always)]
    fn region_of(&self, pfn: u64) -> Option<&RegionInfo> {
        // The first region is checked on its own: it is the only one on most machines.
        let first = &self.regions[0];
        if pfn.wrapping_sub(first.start_pfn) < first.frames {
            return Some(first);
        }
        self.regions[1..self.len].iter().find(|r| pfn.wrapping_sub(r.start_pfn) < r.frames)
    }

    #[inline(always)]
    fn index_of_pfn(&self, pfn: u64) -> Option<usize> {
        self.region_of(pfn).map(|r| r.index + (pfn - r.start_pfn) as usize)
    }
}

/// The per-frame owner tags: one byte per frame that the owner of an allocated block may
/// use to record what the frame holds (the slab allocator stores its cache number there).
///
/// Every tag is 0 after [`BuddyAllocator::new`]. The buddy allocator itself never reads
/// or writes them afterwards: an owner that sets tags must reset them to 0 before it
/// frees the block. Accesses are atomic, so tags can be read without the allocator lock.
///
/// The handle borrows the allocator it came from, so it cannot outlive it (the tag array
/// is the allocator's metadata):
///
/// ```compile_fail,E0505
/// # fn f(b: memory::buddy::BuddyAllocator, pa: hal::PhysAddr) {
/// let t = b.frame_tags();
/// drop(b);                 // error: `b` is borrowed by `t`
/// let _ = t.tag(pa);
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FrameTags<'a> {
    base: *const AtomicU8,
    map: FrameMap,
    _allocator: PhantomData<&'a BuddyAllocator>,
}

// SAFETY: the handle is a shared view of the allocator's tag array, `AtomicU8`s in RAM the
// allocator reserved for its whole lifetime (see `BuddyAllocator::new`), which the
// lifetime `'a` outlasts. Every access, from any core, is an atomic operation, and the
// buddy allocator itself never touches a tag after `new`, so moving the handle to another
// core (or using it on several at once) is sharing atomics.
unsafe impl Send for FrameTags<'_> {}
// SAFETY: as for `Send`: `&FrameTags` only gives `&AtomicU8`s, and concurrent atomic
// accesses from several cores are defined.
unsafe impl Sync for FrameTags<'_> {}

impl<'a> FrameTags<'a> {
    /// The same handle with a lifetime the caller chooses (the slab allocator keeps one for
    /// as long as it borrows the buddy allocator's mutex, not one guard).
    ///
    /// # Safety
    /// The RAM of the tag array must stay the allocator's for `'b`: the allocator this
    /// handle came from (or, when it was moved or replaced in its mutex, the RAM its
    /// contract in [`BuddyAllocator::new`] keeps reserved while a block it handed out is in
    /// use) must not be given back for `'b`.
    pub(crate) unsafe fn extend<'b>(self) -> FrameTags<'b> {
        FrameTags { base: self.base, map: self.map, _allocator: PhantomData }
    }

    /// The tag of the frame holding `pa`, or `None` outside managed RAM.
    ///
    /// # Example
    /// ```no_run
    /// use core::sync::atomic::Ordering;
    /// let f = memory::buddy::Frames::alloc(0)?;
    /// let buddy = memory::buddy::global().unwrap().lock();
    /// let tags = buddy.frame_tags();
    /// tags.tag(f.phys()).unwrap().store(0x42, Ordering::Release); // "this frame is a ring buffer"
    /// tags.tag(f.phys()).unwrap().store(0, Ordering::Release);    // reset before the block is freed
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    #[inline]
    pub fn tag(&self, pa: PhysAddr) -> Option<&AtomicU8> {
        let idx = self.map.index(pa)?;
        // SAFETY: `idx < map.frames`, the length of the tag array, which stays reserved
        // for the tags while the allocator (and the linear map it was built from) lives.
        Some(unsafe { &*self.base.add(idx) })
    }

    /// The tags of `frames` consecutive frames from the one holding `pa`, or `None` unless
    /// they all lie in one region.
    ///
    /// # Example
    /// ```no_run
    /// use core::sync::atomic::Ordering;
    /// let block = memory::buddy::Frames::alloc(2)?;                // 4 frames
    /// let buddy = memory::buddy::global().unwrap().lock();
    /// let tags = buddy.frame_tags();
    /// let all = tags.tags(block.phys(), 4).unwrap();
    /// assert!(all.iter().all(|t| t.load(Ordering::Acquire) == 0));
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    #[inline]
    pub fn tags(&self, pa: PhysAddr, frames: usize) -> Option<&[AtomicU8]> {
        let pfn = pa.as_u64() >> PAGE_SHIFT;
        let r = self.map.region_of(pfn)?;
        let first = pfn - r.start_pfn;
        if first + frames as u64 > r.frames {
            return None;
        }
        // SAFETY: `[r.index + first, + frames)` lies inside the region's part of the tag
        // array, which stays reserved for the tags (see `tag`).
        Some(unsafe { core::slice::from_raw_parts(self.base.add(r.index + first as usize), frames) })
    }

    /// The frame map the tags are indexed by.
    ///
    /// # Example
    /// ```no_run
    /// let buddy = memory::buddy::global().unwrap().lock();
    /// let tags = buddy.frame_tags();
    /// let frames = tags.frame_map().frames();
    /// # let _ = frames;
    /// ```
    pub fn frame_map(&self) -> &FrameMap {
        &self.map
    }
}

/// One zone's figures, as Linux's `/proc/zoneinfo` shows them (see [`ZoneInfo`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ZoneStats {
    /// First frame of the zone's span (0 when the zone is empty).
    pub start_pfn: u64,
    /// Frames from the zone's first RAM frame to its last, holes included.
    pub spanned: usize,
    /// RAM frames in the zone.
    pub present: usize,
    /// Frames the allocator manages in the zone: present less reservations and metadata.
    pub managed: usize,
    /// Free frames (on the lists, on the hot list, or untouched beyond the frontier).
    pub free_pages: usize,
    /// Free blocks per order: on the lists and beyond the frontier (the hot list apart,
    /// as Linux's per-CPU pages).
    pub free_blocks: [usize; NR_ORDERS],
    /// Free order-0 frames on the zone's hot list.
    pub hot_pages: usize,
    /// The `min` watermark, in frames.
    pub min: usize,
    /// The `low` watermark, in frames.
    pub low: usize,
    /// The `high` watermark, in frames.
    pub high: usize,
    /// `lowmem_reserve[j]`: frames a request whose highest zone is `j` must leave free here.
    pub lowmem_reserve: [usize; MAX_NR_ZONES],
    /// The kernel allocator's per-CPU lists of this zone: `high` and `batch` (0 for a
    /// private allocator, whose hot list `hot_limits` describes).
    pub pcp: PcpLimits,
}

/// A snapshot of the allocator's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuddyStats {
    /// Frames managed (free or allocated): RAM minus reservations and metadata.
    pub total_pages: usize,
    /// Frames free now.
    pub free_pages: usize,
    /// Free blocks per order, all zones together: on the buddy lists and beyond the
    /// untouched frontier (the hot list's frames are not counted here, as Linux's buddyinfo
    /// does not count per-CPU pages).
    pub free_blocks: [usize; NR_ORDERS],
    /// Free order-0 frames on the hot lists (included in `free_pages`).
    pub hot_pages: usize,
    /// Frames of the regions that are reserved (not managed), metadata excluded.
    pub reserved_pages: usize,
    /// Frames the metadata occupies.
    pub metadata_pages: usize,
    /// Allocation calls that failed (a bulk call that came up short counts once).
    pub alloc_failures: u64,
    /// Allocation calls refused because they would have taken a zone below its `min`
    /// watermark (counted in `alloc_failures` too).
    pub watermark_failures: u64,
    /// Strict mode: blocks found with corrupted poison on allocation.
    pub corruptions: u64,
    /// The zones, indexed by [`ZONE_DMA`], [`ZONE_DMA32`], [`ZONE_NORMAL`].
    pub zones: [ZoneStats; MAX_NR_ZONES],
    /// `min_free_kbytes` the watermarks were computed from.
    pub min_free_kbytes: usize,
}

impl BuddyStats {
    /// The free-block counts in the format of Linux's `/proc/buddyinfo`, one line per
    /// populated zone (hot-list frames not included; see the module docs).
    ///
    /// # Example
    /// ```no_run
    /// let stats = memory::buddy::stats().unwrap();
    /// log::info!("{}", stats.buddyinfo());   // "Node 0, zone    DMA32      3      1 ..."
    /// ```
    pub fn buddyinfo(&self) -> BuddyInfo {
        BuddyInfo { free_blocks: self.zones.map(|z| z.free_blocks), populated: self.zones.map(|z| z.present != 0) }
    }

    /// The zones in the format of Linux's `/proc/zoneinfo` (the lines this allocator has).
    ///
    /// # Example
    /// ```no_run
    /// let stats = memory::buddy::stats().unwrap();
    /// log::info!("{}", stats.zoneinfo());    // "Node 0, zone    DMA32\n  pages free     ..."
    /// ```
    pub fn zoneinfo(&self) -> ZoneInfo {
        ZoneInfo { zones: self.zones }
    }
}

/// Free block counts per order and zone, displayed as Linux's `/proc/buddyinfo`: per
/// populated zone a line `Node 0, zone    DMA32` followed by one right-aligned count per
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuddyInfo {
    /// Free blocks per order, per zone.
    pub free_blocks: [[usize; NR_ORDERS]; MAX_NR_ZONES],
    /// Whether the zone has RAM (empty zones print no line, as in Linux).
    pub populated: [bool; MAX_NR_ZONES],
}

impl fmt::Display for BuddyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (z, (populated, blocks)) in self.populated.iter().zip(&self.free_blocks).enumerate() {
            if !populated {
                continue;
            }
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            // Linux: "Node %d, zone %8s " then "%6lu " per order.
            write!(f, "Node 0, zone {:>8}", ZONE_NAMES[z])?;
            for n in blocks {
                write!(f, " {n:>6}")?;
            }
        }
        Ok(())
    }
}

/// The zones, displayed as Linux's `/proc/zoneinfo` (`mm/vmstat.c`'s
/// `zoneinfo_show_print`): per populated zone its header, `pages free`, `min`, `low`,
/// `high`, `spanned`, `present`, `managed` and `protection` (the `lowmem_reserve` array).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneInfo {
    /// The zones.
    pub zones: [ZoneStats; MAX_NR_ZONES],
}

impl fmt::Display for ZoneInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (i, z) in self.zones.iter().enumerate() {
            if z.present == 0 {
                continue;
            }
            if !first {
                f.write_str("\n")?;
            }
            first = false;
            write!(f, "Node 0, zone {:>8}", ZONE_NAMES[i])?;
            write!(f, "\n  pages free     {}", z.free_pages)?;
            write!(f, "\n        min      {}", z.min)?;
            write!(f, "\n        low      {}", z.low)?;
            write!(f, "\n        high     {}", z.high)?;
            write!(f, "\n        spanned  {}", z.spanned)?;
            write!(f, "\n        present  {}", z.present)?;
            write!(f, "\n        managed  {}", z.managed)?;
            write!(f, "\n        protection: ({}", z.lowmem_reserve[0])?;
            for r in &z.lowmem_reserve[1..] {
                write!(f, ", {r}")?;
            }
            f.write_str(")")?;
            if z.pcp.batch != 0 {
                write!(
                    f,
                    "\n  pagesets (every CPU)\n        count    {}\n        high     {}\n        batch    {}",
                    z.hot_pages, z.pcp.high, z.pcp.batch
                )?;
            }
        }
        Ok(())
    }
}

/// `min_free_kbytes` as Linux's `calculate_min_free_kbytes`: `sqrt(16 × lowmem KiB)`,
/// clamped to `[128, 262144]` KiB.
///
/// # Example
/// ```
/// assert_eq!(memory::buddy::default_min_free_kbytes(1 << 18), 4096);   // 1 GiB of RAM
/// assert_eq!(memory::buddy::default_min_free_kbytes(16), 128);         // the floor (64 KiB of RAM)
/// ```
pub fn default_min_free_kbytes(managed_pages: usize) -> usize {
    let lowmem_kbytes = (managed_pages as u64) * (PAGE_SIZE as u64 / 1024);
    (int_sqrt(lowmem_kbytes * 16) as usize).clamp(128, 262_144)
}

/// Integer square root (floor), as Linux's `int_sqrt`.
fn int_sqrt(x: u64) -> u64 {
    if x < 2 {
        return x;
    }
    // Newton's iteration from above converges to the floor.
    let mut r = 1u64 << (64 - x.leading_zeros()).div_ceil(2);
    loop {
        let n = (r + x / r) / 2;
        if n >= r {
            return r;
        }
        r = n;
    }
}

/// The watermarks of every zone as Linux's `__setup_per_zone_wmarks` and
/// `setup_per_zone_lowmem_reserve` compute them from `min_free_kbytes` and the zones'
/// managed frames: `[min, low, high]` per zone, and `lowmem_reserve`.
///
/// `min` is `pages_min × managed / Σ managed` (`pages_min = min_free_kbytes / 4`); with
/// `d = max(min / 4, managed / 1000)` (`watermark_scale_factor` 10), `low = min + d` and
/// `high = min + 2d`; `lowmem_reserve[i][j] = Σ managed of zones i+1..=j / 256` for the
/// zones below `Normal` (ratio 256), 0 on an unpopulated zone.
///
/// # Example
/// ```
/// use memory::buddy::per_zone_wmarks;
/// let (w, reserve) = per_zone_wmarks(8192, &[0, 786_432, 1_310_720]);  // 3 GiB + 5 GiB
/// assert_eq!(w[1][0] + w[2][0], 2048);                  // min split by managed frames
/// assert_eq!(reserve[1][2], 1_310_720 / 256);           // DMA32 kept from Normal requests
/// ```
pub fn per_zone_wmarks(
    min_free_kbytes: usize,
    managed: &[usize; MAX_NR_ZONES],
) -> ([[usize; 3]; MAX_NR_ZONES], [[usize; MAX_NR_ZONES]; MAX_NR_ZONES]) {
    let pages_min = (min_free_kbytes >> (PAGE_SHIFT - 10)) as u64;
    let lowmem: u64 = managed.iter().map(|&m| m as u64).sum();
    let mut w = [[0usize; 3]; MAX_NR_ZONES];
    for (wz, &m) in w.iter_mut().zip(managed) {
        let m = m as u64;
        let min = (pages_min * m).checked_div(lowmem).unwrap_or(0);
        let d = (min >> 2).max(m * 10 / 10_000);
        *wz = [min as usize, (min + d) as usize, (min + 2 * d) as usize];
    }
    let mut reserve = [[0usize; MAX_NR_ZONES]; MAX_NR_ZONES];
    for i in 0..MAX_NR_ZONES {
        let ratio = LOWMEM_RESERVE_RATIO[i];
        let clear = ratio == 0 || managed[i] == 0;
        let mut upper = 0usize;
        for j in i + 1..MAX_NR_ZONES {
            upper += managed[j];
            reserve[i][j] = if clear { 0 } else { upper / ratio };
        }
    }
    (w, reserve)
}

/// Bytes of metadata [`BuddyAllocator::new`] carves for `regions` (before rounding up to
/// whole pages), or `None` when the frame count overflows.
///
/// [`METADATA_BYTES_PER_FRAME`] bytes for each frame of each region (rounded inward to
/// pages).
///
/// # Example
/// ```no_run
/// use hal::{PhysAddr, PhysRange};
/// let ram = PhysRange::new(PhysAddr::new(0x4000_0000), 128 << 20).unwrap();
/// assert_eq!(memory::buddy::metadata_bytes(&[ram]), Some(64 * 1024)); // 2 bytes per 4 KiB frame
/// ```
pub fn metadata_bytes(regions: &[PhysRange]) -> Option<u64> {
    let mut frames = 0u64;
    for r in regions {
        let (s, e) = page_bounds_inward(r);
        frames = frames.checked_add(e.saturating_sub(s))?;
    }
    frames.checked_mul(METADATA_BYTES_PER_FRAME as u64)
}

/// The frame bounds `[start, end)` of the whole pages inside `r`.
fn page_bounds_inward(r: &PhysRange) -> (u64, u64) {
    let start = r.start().as_u64().div_ceil(PAGE_SIZE as u64);
    let end = r.end().as_u64() >> PAGE_SHIFT;
    (start, end)
}

/// The frame bounds `[start, end)` of the pages touched by `r`.
fn page_bounds_outward(r: &PhysRange) -> (u64, u64) {
    let start = r.start().as_u64() >> PAGE_SHIFT;
    let end = r.end().as_u64().div_ceil(PAGE_SIZE as u64);
    (start, end)
}

/// One zone's free lists, hot list, frontier and counters (see the module docs).
struct Zone {
    heads: [u64; NR_ORDERS],
    /// Blocks on the lists, per order.
    counts: [usize; NR_ORDERS],
    /// Untouched blocks beyond the frontier, per order.
    fresh: [usize; NR_ORDERS],
    /// Bit `o` set when the free list of order `o` is not empty.
    nonempty: u32,
    /// Free frames: lists, hot list and frontier.
    free_pages: usize,
    /// Frames managed (free or allocated).
    managed: usize,
    /// RAM frames of the zone.
    present: usize,
    /// First frame of the zone's first region, and end of its last.
    start_pfn: u64,
    end_pfn: u64,
    /// The zone's regions: slots `first_slot..end_slot` of the frame map.
    first_slot: usize,
    end_slot: usize,
    /// The frontier: slot and frame where the search for the next untouched block goes on.
    front_slot: usize,
    front_pfn: u64,
    /// `[min, low, high]`.
    wmark: [usize; 3],
    lowmem_reserve: [usize; MAX_NR_ZONES],
    /// Free order-0 frames kept off the lists.
    hot: HotList,
}

impl Zone {
    const fn new() -> Self {
        Zone {
            heads: [NIL; NR_ORDERS],
            counts: [0; NR_ORDERS],
            fresh: [0; NR_ORDERS],
            nonempty: 0,
            free_pages: 0,
            managed: 0,
            present: 0,
            start_pfn: 0,
            end_pfn: 0,
            first_slot: 0,
            end_slot: 0,
            front_slot: 0,
            front_pfn: 0,
            wmark: [0; 3],
            lowmem_reserve: [0; MAX_NR_ZONES],
            hot: HotList::new(),
        }
    }

    /// Whether an allocation of `order` with `gfp`, whose highest zone is `high`, leaves
    /// this zone above its watermark (Linux's `__zone_watermark_ok` for order 0, without
    /// its per-order check: `take` finds out whether a block of the order exists).
    #[inline(always)]
    fn watermark_ok(&self, order: usize, gfp: Gfp, high: usize) -> bool {
        let min = gfp.min_watermark(self.wmark[WMARK_MIN]);
        self.free_pages + 1 > (1 << order) + min + self.lowmem_reserve[high]
    }
}

/// Index of the `min` watermark in a zone's `wmark`.
const WMARK_MIN: usize = 0;

/// The state byte of metadata index `idx`. State bytes are atomics (accessed `Relaxed`):
/// the per-CPU page lists flip a frame between "allocated" and "on a per-CPU list" without
/// the allocator lock, while the lock holder may read the same byte as a buddy candidate
/// (either value means "not mergeable", so no ordering is needed, only no data race).
#[inline(always)]
fn state_byte(state: *mut u8, map: &FrameMap, idx: usize) -> &AtomicU8 {
    debug_assert!(idx < map.frames);
    // SAFETY: callers pass indices from the frame map, below `map.frames`, the length of
    // the state array, which lives (in RAM the allocator reserved) as long as the map
    // borrowed here; every access to it is atomic (`AtomicU8` has `u8`'s layout).
    unsafe { AtomicU8::from_ptr(state.add(idx)) }
}

/// Checks that `pa` heads an allocated block of `order` (state byte `ST_ALLOC | order`);
/// returns its region and metadata index. Reads one state byte: no lock needed.
#[inline(always)]
fn check_allocated(
    map: &FrameMap,
    state: *mut u8,
    pa: PhysAddr,
    order: usize,
) -> Result<(RegionInfo, usize), BuddyError> {
    if order > MAX_ORDER {
        return Err(BuddyError::BadOrder);
    }
    let pfn = pa.as_u64() >> PAGE_SHIFT;
    if !pa.is_page_aligned() || pfn & ((1 << order) - 1) != 0 {
        return Err(BuddyError::Misaligned);
    }
    let r = *map.region_of(pfn).ok_or(BuddyError::OutOfRange)?;
    let idx = r.index + (pfn - r.start_pfn) as usize;
    let st = state_byte(state, map, idx).load(Ordering::Relaxed);
    if st == ST_ALLOC | order as u8 {
        return Ok((r, idx));
    }
    Err(match st {
        ST_NONE => BuddyError::Reserved,
        s if s & ST_ALLOC != 0 => BuddyError::WrongOrder { allocated: s & ST_ORDER },
        // Free on the lists, on the hot list, untouched, or inside a block.
        _ => BuddyError::NotAllocated,
    })
}

/// Zeroes `pages` whole pages from `p` with [`hal::cpu::zero_page`] (pairs of stores of
/// the zero register: under QEMU TCG 40% faster than `write_bytes`' memset): `__GFP_ZERO`.
///
/// # Safety
/// `p` is page aligned and the `pages` pages from it are writable memory the caller owns.
#[inline]
unsafe fn zero_frames(p: *mut u8, pages: usize) {
    for i in 0..pages {
        // SAFETY: page `i` of the caller's pages, page aligned.
        unsafe { hal::cpu::zero_page(p.wrapping_add(i * PAGE_SIZE)) };
    }
}

/// Strict mode: whether `bytes` (from offset `skip` of the block at frame `pfn`) all hold
/// [`POISON_BYTE`]; logs the first overwritten byte when not (a use after free).
#[cold]
fn poison_intact(bytes: &[u8], pfn: u64, skip: usize) -> bool {
    let Some(bad) = crate::poison::first_not(bytes, POISON_BYTE) else { return true };
    log::error!(
        "buddy: poison overwritten in free memory at {:#x} (block {:#x}, offset {:#x}): use after free?",
        (pfn << PAGE_SHIFT) + (skip + bad) as u64,
        pfn << PAGE_SHIFT,
        skip + bad
    );
    false
}

/// A binary buddy allocator of physical frames, split in zones. See the
/// [module documentation](self).
///
/// Not `Sync` (one core at a time; share it behind a lock):
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<memory::buddy::BuddyAllocator>();
/// ```
pub struct BuddyAllocator {
    map: FrameMap,
    /// State byte array (virtual address through the linear map).
    state: *mut u8,
    /// Owner tag array, right after the state array.
    tags: *const AtomicU8,
    /// The linear map as a pointer offset: frame pointers are derived from it (provenance).
    va_offset: LinearOffset,
    linear: LinearMap,
    /// Where the metadata lives.
    meta: PhysRange,
    zones: [Zone; MAX_NR_ZONES],
    total_pages: usize,
    reserved_pages: usize,
    alloc_failures: u64,
    watermark_failures: u64,
    corruptions: u64,
    min_free_kbytes: usize,
    strict: bool,
    /// Which of the 8 large-object owner marks slab allocators on this buddy hold (bit `k`:
    /// mark `k` taken; see `claim_owner_mark`).
    owner_marks: u8,
}

// SAFETY: the raw pointers lead to the allocator's own metadata and to free RAM it owns
// exclusively (the contract of `BuddyAllocator::new`), reached through the linear map that
// every core shares; nothing ties them to a core. Every mutation takes `&mut self`, so the
// allocator is used by one core at a time: it is not `Sync`, and the kernel shares it
// behind a `spin::Mutex`, whose acquire/release orders one core's metadata writes before
// the next holder's reads. (The frame tags, the one part reached through `&self`, are
// atomics: see `FrameTags`.)
unsafe impl Send for BuddyAllocator {}

impl fmt::Debug for BuddyAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuddyAllocator")
            .field("total_pages", &self.total_pages)
            .field("free_pages", &self.free_pages())
            .field("hot_pages", &self.hot_pages())
            .field("metadata", &self.meta)
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

impl BuddyAllocator {
    /// An allocator of the frames of `regions` minus `reserved`, reached through `linear`,
    /// with the zones `DMA32` (below 4 GiB) and `Normal` (see [`Self::new_zoned`]).
    ///
    /// Regions are rounded inward to whole pages and may come in any order; reserved
    /// ranges are rounded outward and may extend beyond RAM. The metadata is carved from
    /// the first free stretch of RAM that fits (in address order) and then counts as
    /// reserved. With `strict`, free memory is poisoned (see the module docs). The
    /// watermarks start at 0 (every free frame may be handed out);
    /// [`Self::set_min_free_kbytes`] sets them as Linux does, which [`init`] does for the
    /// kernel's allocator.
    ///
    /// Nothing is written to the free frames: only the metadata (see the module docs).
    ///
    /// # Errors
    /// - [`BuddyError::TooManyRegions`]: more than [`MAX_REGIONS`] regions once split at
    ///   the zone boundaries;
    /// - [`BuddyError::OverlappingRegions`]: two regions share a page;
    /// - [`BuddyError::OutsideLinearMap`]: a region is not inside `linear`;
    /// - [`BuddyError::NoRoomForMetadata`]: no free stretch is large enough for the
    ///   metadata (see [`metadata_bytes`]);
    /// - [`BuddyError::NoMemory`]: no region, or no usable frame left.
    ///
    /// When an error is returned, nothing was written to RAM, except for
    /// [`BuddyError::NoMemory`] after the metadata was placed (in RAM that is free anyway).
    ///
    /// # Safety
    /// Every byte of `regions` outside `reserved` must be RAM that nothing else uses, for
    /// as long as the allocator, any block it hands out, or a slab allocator built on it
    /// (which keeps its [`FrameTags`]) is in use: the allocator
    /// writes its metadata and free lists there. `linear` must satisfy its own contract
    /// for that long.
    ///
    /// # Example
    /// ```no_run
    /// use hal::linear::LinearMap;
    /// use hal::{PhysAddr, PhysRange, VirtAddr};
    /// use memory::buddy::BuddyAllocator;
    /// // 64 MiB of RAM the driver was given, reached at a fixed offset like the linear map.
    /// let ram = PhysRange::new(PhysAddr::new(0x4800_0000), 64 << 20).unwrap();
    /// // SAFETY: `ram` is mapped read-write at that address and no Rust reference points into it.
    /// let linear = unsafe { LinearMap::new(ram, VirtAddr::new(0xffff_0000_4800_0000)) };
    /// // SAFETY: nothing else uses `ram` while the allocator and its blocks live.
    /// let mut buddy = unsafe { BuddyAllocator::new(&[ram], &[], linear, false) }?;
    /// let pa = buddy.alloc(0)?;
    /// # let _ = pa;
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub unsafe fn new(
        regions: &[PhysRange],
        reserved: &[PhysRange],
        linear: LinearMap,
        strict: bool,
    ) -> Result<Self, BuddyError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::new_zoned(regions, reserved, linear, strict, None) }
    }

    /// As [`Self::new`], with a `DMA` zone below `dma_limit` (rounded down to a page, at
    /// most 4 GiB) when given: Linux's `zone_dma_limit`, from the device tree's
    /// `dma-ranges`. Zones: `DMA` below `dma_limit`, `DMA32` from there to 4 GiB, `Normal`
    /// above. Regions are split at the boundaries, so no block spans two zones.
    ///
    /// # Errors
    /// As [`Self::new`].
    ///
    /// # Safety
    /// As [`Self::new`].
    ///
    /// # Example
    /// ```no_run
    /// use hal::linear::LinearMap;
    /// use hal::{PhysAddr, PhysRange, VirtAddr};
    /// use memory::buddy::BuddyAllocator;
    /// let ram = PhysRange::new(PhysAddr::new(0x4000_0000), 1 << 30).unwrap();
    /// // SAFETY: `ram` is mapped read-write at that address and no Rust reference points into it.
    /// let linear = unsafe { LinearMap::new(ram, VirtAddr::new(0xffff_0000_4000_0000)) };
    /// // SAFETY: nothing else uses `ram` while the allocator and its blocks live.
    /// let buddy = unsafe { BuddyAllocator::new_zoned(&[ram], &[], linear, false, Some(PhysAddr::new(0x6000_0000))) }?;
    /// assert!(buddy.stats().zones[memory::gfp::ZONE_DMA].managed > 0);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub unsafe fn new_zoned(
        regions: &[PhysRange],
        reserved: &[PhysRange],
        linear: LinearMap,
        strict: bool,
        dma_limit: Option<PhysAddr>,
    ) -> Result<Self, BuddyError> {
        let window = page_bounds_inward(&linear.phys_range());
        let mut sorted = [(0u64, 0u64); MAX_REGIONS];
        let mut len = 0;
        for r in regions {
            let (s, e) = page_bounds_inward(r);
            if e <= s {
                continue;
            }
            if s < window.0 || e > window.1 {
                return Err(BuddyError::OutsideLinearMap);
            }
            if len == MAX_REGIONS {
                return Err(BuddyError::TooManyRegions);
            }
            // Insertion sort by start frame.
            let mut i = len;
            while i > 0 && sorted[i - 1].0 > s {
                sorted[i] = sorted[i - 1];
                i -= 1;
            }
            sorted[i] = (s, e);
            len += 1;
        }
        if len == 0 {
            return Err(BuddyError::NoMemory);
        }
        for i in 0..len - 1 {
            if sorted[i].1 > sorted[i + 1].0 {
                return Err(BuddyError::OverlappingRegions);
            }
        }
        // Split at the zone boundaries (in frames).
        let dma32_pfn = DMA32_LIMIT >> PAGE_SHIFT;
        let dma_pfn = dma_limit.map_or(0, |l| (l.as_u64() >> PAGE_SHIFT).min(dma32_pfn));
        let bounds = [dma_pfn, dma32_pfn, u64::MAX];
        let mut infos = [RegionInfo::default(); MAX_REGIONS];
        let mut n = 0;
        let mut frames = 0usize;
        let mut zones = [const { Zone::new() }; MAX_NR_ZONES];
        for &(s, e) in &sorted[..len] {
            let mut p = s;
            while p < e {
                let z = bounds.iter().position(|&b| p < b).unwrap_or(ZONE_NORMAL);
                let q = e.min(bounds[z]);
                if n == MAX_REGIONS {
                    return Err(BuddyError::TooManyRegions);
                }
                infos[n] = RegionInfo { start_pfn: p, frames: q - p, index: frames, slot: n, zone: z };
                let zone = &mut zones[z];
                if zone.present == 0 {
                    zone.start_pfn = p;
                    zone.first_slot = n;
                }
                zone.end_pfn = q;
                zone.end_slot = n + 1;
                zone.present += (q - p) as usize;
                frames += (q - p) as usize;
                n += 1;
                p = q;
            }
        }
        let map = FrameMap { regions: infos, len: n, frames };

        // Carve the metadata: the lowest page-aligned stretch of a region that touches
        // no reserved range.
        let meta_frames = (frames * METADATA_BYTES_PER_FRAME).div_ceil(PAGE_SIZE) as u64;
        let meta_start = Self::find_metadata_room(&map, reserved, meta_frames).ok_or(BuddyError::NoRoomForMetadata)?;
        let meta = PhysRange::new(PhysAddr::new(meta_start << PAGE_SHIFT), meta_frames << PAGE_SHIFT)
            .map_err(|_| BuddyError::NoRoomForMetadata)?;

        let va_offset = linear.offset();
        let state = va_offset.ptr::<u8>(meta.start().as_u64());
        let mut alloc = BuddyAllocator {
            map,
            state,
            // SAFETY: the metadata block holds `2 * frames` bytes: states then tags.
            tags: unsafe { state.add(frames) } as *const AtomicU8,
            va_offset,
            linear,
            meta,
            zones,
            total_pages: 0,
            reserved_pages: 0,
            alloc_failures: 0,
            watermark_failures: 0,
            corruptions: 0,
            min_free_kbytes: 0,
            strict,
            owner_marks: 0,
        };
        alloc.build(reserved, meta_start, meta_frames);
        if alloc.total_pages == 0 {
            return Err(BuddyError::NoMemory);
        }
        Ok(alloc)
    }

    /// The first frame of the lowest stretch of `need` frames inside one region that
    /// overlaps no reserved range.
    fn find_metadata_room(map: &FrameMap, reserved: &[PhysRange], need: u64) -> Option<u64> {
        for r in &map.regions[..map.len] {
            let end = r.start_pfn + r.frames;
            let mut cand = r.start_pfn;
            'search: while cand + need <= end {
                for res in reserved {
                    let (rs, re) = page_bounds_outward(res);
                    if rs < cand + need && cand < re {
                        cand = re;
                        continue 'search;
                    }
                }
                return Some(cand);
            }
        }
        None
    }

    /// Fills the metadata (called once, from `new`): every usable run of frames becomes
    /// maximal aligned *untouched* blocks beyond the zones' frontiers. The free frames are
    /// not written: the lists start empty (see the module docs).
    fn build(&mut self, reserved: &[PhysRange], meta_start: u64, meta_frames: u64) {
        let frames = self.map.frames;
        // SAFETY: the metadata block (2 * frames bytes, inside a region, touching no
        // reserved range) belongs to the allocator by the contract of `new`.
        unsafe {
            core::ptr::write_bytes(self.state, ST_TAIL, frames);
            core::ptr::write_bytes(self.tags as *mut u8, 0, frames);
        }
        let map = self.map;
        let excluded =
            || reserved.iter().map(page_bounds_outward).chain(core::iter::once((meta_start, meta_start + meta_frames)));
        for r in &map.regions[..map.len] {
            let end = r.start_pfn + r.frames;
            // Reserved frames of the region are not managed.
            for (s, e) in excluded() {
                let (lo, hi) = (s.max(r.start_pfn), e.min(end));
                if lo < hi {
                    // SAFETY: `[lo, hi)` lies inside region `r`, so the indices are inside
                    // the state array.
                    unsafe {
                        core::ptr::write_bytes(
                            self.state.add(r.index + (lo - r.start_pfn) as usize),
                            ST_NONE,
                            (hi - lo) as usize,
                        )
                    };
                }
            }
            // The usable runs, found from the reserved ranges (not by reading every state
            // byte: boot time stays O(regions × reserved² + blocks)).
            let mut p = r.start_pfn;
            while p < end {
                let mut moved = true;
                while moved {
                    moved = false;
                    for (s, e) in excluded() {
                        if s <= p && p < e {
                            p = e;
                            moved = true;
                        }
                    }
                }
                if p >= end {
                    break;
                }
                let mut q = end;
                for (s, _) in excluded() {
                    if s > p && s < q {
                        q = s;
                    }
                }
                let zone = &mut self.zones[r.zone];
                zone.managed += (q - p) as usize;
                zone.free_pages += (q - p) as usize;
                self.total_pages += (q - p) as usize;
                let mut b = p;
                while b < q {
                    let fit = 63 - (q - b).leading_zeros();
                    let order = (b.trailing_zeros().min(fit) as usize).min(MAX_ORDER);
                    self.zones[r.zone].fresh[order] += 1;
                    self.set_state(r.index + (b - r.start_pfn) as usize, ST_FRESH | order as u8);
                    b += 1 << order;
                }
                p = q;
            }
        }
        for z in &mut self.zones {
            z.front_slot = z.first_slot;
            z.front_pfn = map.regions[z.first_slot].start_pfn;
        }
        let present: usize = self.zones.iter().map(|z| z.present).sum();
        self.reserved_pages = present - self.total_pages - meta_frames as usize;
    }

    /// Carves the next untouched block of zone `z` off its frontier onto the lists.
    /// Returns `false` when the frontier is exhausted. In strict mode the block is poisoned
    /// now, the first time it is written.
    #[cold]
    #[inline(never)]
    fn carve(&mut self, z: usize) -> bool {
        loop {
            let zone = &self.zones[z];
            if zone.front_slot >= zone.end_slot {
                return false;
            }
            let r = self.map.regions[zone.front_slot];
            let pfn = zone.front_pfn;
            if pfn >= r.start_pfn + r.frames {
                let zone = &mut self.zones[z];
                zone.front_slot += 1;
                if zone.front_slot < zone.end_slot {
                    zone.front_pfn = self.map.regions[zone.front_slot].start_pfn;
                }
                continue;
            }
            let idx = r.index + (pfn - r.start_pfn) as usize;
            let st = self.state_at(idx);
            // Skip what is not untouched: reserved frames, and blocks carved before.
            let step = match st {
                ST_NONE | ST_TAIL | ST_HOT => 1,
                s if s & 0xf0 == ST_FRESH => {
                    let o = (s & ST_ORDER) as usize;
                    self.zones[z].front_pfn = pfn + (1 << o);
                    self.zones[z].fresh[o] -= 1;
                    if self.strict {
                        // SAFETY: an untouched free block of managed RAM, owned by the allocator.
                        unsafe { core::ptr::write_bytes(self.va::<u8>(pfn), POISON_BYTE, PAGE_SIZE << o) };
                    }
                    self.merge(z, r, idx, pfn, o);
                    return true;
                }
                s => 1u64 << (s & ST_ORDER),
            };
            self.zones[z].front_pfn = pfn + step;
        }
    }

    // ----- raw metadata and memory access -----

    /// The whole state array, one byte per frame of the map, for scans that read many
    /// bytes (a consistency check): a slice walks them without per-index arithmetic.
    fn states(&self) -> &[AtomicU8] {
        // SAFETY: the state array holds `map.frames` bytes (in RAM the allocator reserved)
        // and lives as long as `self`; every access to it is atomic, and `AtomicU8` has
        // `u8`'s layout, so a shared slice of atomics over it is sound.
        unsafe { core::slice::from_raw_parts(self.state.cast::<AtomicU8>(), self.map.frames) }
    }

    #[inline(always)]
    fn state_at(&self, idx: usize) -> u8 {
        state_byte(self.state, &self.map, idx).load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn set_state(&mut self, idx: usize, v: u8) {
        state_byte(self.state, &self.map, idx).store(v, Ordering::Relaxed)
    }

    /// The virtual address of frame `pfn` through the linear map.
    #[inline(always)]
    fn va<T>(&self, pfn: u64) -> *mut T {
        self.va_offset.ptr(pfn << PAGE_SHIFT)
    }

    #[inline(always)]
    fn node(&self, pfn: u64) -> *mut FreeNode {
        self.va(pfn)
    }

    /// Pushes the free block at `pfn` on the list of `order` of zone `z`.
    #[inline(always)]
    fn push(&mut self, z: usize, pfn: u64, order: usize) {
        let head = self.zones[z].heads[order];
        let n = self.node(pfn);
        // SAFETY: `pfn` heads a free block of managed RAM (owned by the allocator, mapped
        // by the linear map); `head`, when not NIL, heads another one.
        unsafe {
            (*n).next = head;
            (*n).prev = NIL;
            if head != NIL {
                (*self.node(head)).prev = pfn;
            }
        }
        let zone = &mut self.zones[z];
        zone.heads[order] = pfn;
        zone.counts[order] += 1;
        zone.nonempty |= 1 << order;
    }

    /// Removes the free block at `pfn` from the list of `order` of zone `z`.
    #[inline(always)]
    fn unlink(&mut self, z: usize, pfn: u64, order: usize) {
        let n = self.node(pfn);
        // SAFETY: `pfn` heads a free block on the list of `order`; its neighbours are
        // free blocks too.
        let (next, prev) = unsafe { ((*n).next, (*n).prev) };
        if prev == NIL {
            self.zones[z].heads[order] = next;
        } else {
            // SAFETY: `prev` heads a free block (list invariant).
            unsafe { (*self.node(prev)).next = next };
        }
        if next != NIL {
            // SAFETY: `next` heads a free block (list invariant).
            unsafe { (*self.node(next)).prev = prev };
        }
        let zone = &mut self.zones[z];
        zone.counts[order] -= 1;
        if zone.heads[order] == NIL {
            zone.nonempty &= !(1 << order);
        }
    }

    /// Pops the head of the (non-empty) list of `order` of zone `z`.
    #[inline(always)]
    fn pop(&mut self, z: usize, order: usize) -> u64 {
        let pfn = self.zones[z].heads[order];
        debug_assert_ne!(pfn, NIL);
        // SAFETY: the list is not empty, so `pfn` heads a free block.
        let next = unsafe { (*self.node(pfn)).next };
        if next != NIL {
            // SAFETY: `next` heads a free block (list invariant).
            unsafe { (*self.node(next)).prev = NIL };
        }
        let zone = &mut self.zones[z];
        zone.heads[order] = next;
        if next == NIL {
            zone.nonempty &= !(1 << order);
        }
        zone.counts[order] -= 1;
        pfn
    }

    // ----- allocation -----

    /// Allocates a block of `2^order` frames, aligned on its size, as
    /// [`Self::alloc_gfp`] with [`GFP_KERNEL`]. Order 0 comes from a hot list (refilled
    /// from the lists when empty; see the module docs).
    ///
    /// # Errors
    /// [`BuddyError::BadOrder`] above [`MAX_ORDER`]; [`BuddyError::OutOfMemory`] when no
    /// block is free (the hot lists were drained first); [`BuddyError::BelowMin`] when the
    /// frames are there but taking them would cross the zones' `min` watermark;
    /// [`BuddyError::Corrupted`] when a free list was overwritten. On `OutOfMemory`,
    /// `BelowMin` and `BadOrder` only the failure counters change, besides the drain of a
    /// hot list.
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// let block = buddy.alloc(9)?;                         // 512 frames, 2 MiB aligned
    /// assert_eq!(block.as_u64() % (2 << 20), 0);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    #[inline]
    pub fn alloc(&mut self, order: usize) -> Result<PhysAddr, BuddyError> {
        self.alloc_gfp(order, GFP_KERNEL)
    }

    /// Allocates a block of `2^order` frames with the flags `gfp` (see [`crate::gfp`]):
    /// from the highest zone `gfp` allows, falling back to lower zones (`Normal` →
    /// `DMA32` → `DMA`, never upwards), each only while the allocation leaves it above its
    /// `min` watermark (3/8 of it for [`crate::gfp::GFP_ATOMIC`]) plus its
    /// `lowmem_reserve` for the requested zone. [`crate::gfp::__GFP_ZERO`] zeroes the
    /// block; [`crate::gfp::__GFP_NORETRY`] does not drain the hot lists to retry.
    ///
    /// # Errors
    /// As [`Self::alloc`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::gfp::{GFP_DMA32, __GFP_ZERO};
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// let ring = buddy.alloc_gfp(0, GFP_DMA32 | __GFP_ZERO)?;  // a zeroed frame below 4 GiB
    /// assert!(ring.as_u64() < 1 << 32);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    #[inline]
    pub fn alloc_gfp(&mut self, order: usize, gfp: Gfp) -> Result<PhysAddr, BuddyError> {
        if order > MAX_ORDER {
            return Err(self.failed(BuddyError::BadOrder));
        }
        let high = gfp.zone();
        let mut z = high + 1;
        let mut below_min = false;
        while z > 0 {
            z -= 1;
            let zone = &self.zones[z];
            if !zone.watermark_ok(order, gfp, high) {
                below_min |= zone.free_pages >= 1 << order;
                continue;
            }
            match self.zone_alloc(z, order, gfp) {
                Ok(pa) => {
                    if gfp.contains(__GFP_ZERO) {
                        // SAFETY: the block was just allocated: the allocator owns it until it returns.
                        unsafe { zero_frames(self.va::<u8>(pa.as_u64() >> PAGE_SHIFT), 1 << order) };
                    }
                    return Ok(pa);
                }
                Err(BuddyError::OutOfMemory) => continue,
                Err(e) => return Err(self.failed(e)),
            }
        }
        Err(self.alloc_failed(below_min))
    }

    /// Counts a failure of `alloc_gfp`.
    #[cold]
    fn alloc_failed(&mut self, below_min: bool) -> BuddyError {
        if below_min {
            self.watermark_failures += 1;
            return self.failed(BuddyError::BelowMin);
        }
        self.failed(BuddyError::OutOfMemory)
    }

    /// Takes back the count of a failure that is retried (the per-CPU lists were drained):
    /// an allocation that succeeds on its retry did not fail, and one that fails again
    /// counts once.
    pub(crate) fn forget_failure(&mut self, e: BuddyError) {
        self.alloc_failures = self.alloc_failures.saturating_sub(1);
        if e == BuddyError::BelowMin {
            self.watermark_failures = self.watermark_failures.saturating_sub(1);
        }
    }

    #[cold]
    fn failed(&mut self, e: BuddyError) -> BuddyError {
        self.alloc_failures += 1;
        e
    }

    /// Allocates from zone `z`, whose watermark the caller checked.
    #[inline(always)]
    fn zone_alloc(&mut self, z: usize, order: usize, gfp: Gfp) -> Result<PhysAddr, BuddyError> {
        if order == 0 && self.zones[z].hot.high != 0 {
            if self.zones[z].hot.len == 0 {
                self.refill_hot(z)?;
            }
            return Ok(self.alloc_hot(z));
        }
        if order > MAX_ORDER {
            return Err(BuddyError::BadOrder);
        }
        let (pfn, idx) = match self.take(z, order) {
            Ok(t) => t,
            Err(e) => self.take_after_drain(z, order, e, gfp)?,
        };
        self.set_state(idx, ST_ALLOC | order as u8);
        self.zones[z].free_pages -= 1 << order;
        if self.strict {
            self.check_poison(pfn, ((1usize << order) << PAGE_SHIFT) - NODE_BYTES, NODE_BYTES);
        }
        Ok(PhysAddr::new(pfn << PAGE_SHIFT))
    }

    /// Hands out the top frame of the (non-empty) hot list of zone `z`.
    #[inline(always)]
    fn alloc_hot(&mut self, z: usize) -> PhysAddr {
        let e = self.zones[z].hot.pop_top();
        let (pfn, idx) = self.hot_entry(e);
        self.set_state(idx, ST_ALLOC);
        self.zones[z].free_pages -= 1;
        if self.strict {
            self.check_poison(pfn, PAGE_SIZE, 0);
        }
        PhysAddr::new(pfn << PAGE_SHIFT)
    }

    /// The frame number and metadata index of a hot-list entry.
    #[inline(always)]
    fn hot_entry(&self, e: u64) -> (u64, usize) {
        let r = &self.map.regions[(e & 7) as usize];
        let pfn = e >> 3;
        (pfn, r.index + (pfn - r.start_pfn) as usize)
    }

    /// `take(z, order)` failed with `err`: when it was for want of memory and the zone's
    /// hot list holds frames (which may complete a block), drains it and tries again,
    /// unless `gfp` has `__GFP_NORETRY`.
    #[cold]
    fn take_after_drain(
        &mut self,
        z: usize,
        order: usize,
        err: BuddyError,
        gfp: Gfp,
    ) -> Result<(u64, usize), BuddyError> {
        if err == BuddyError::OutOfMemory && self.zones[z].hot.len != 0 && !gfp.contains(__GFP_NORETRY) {
            self.drain_zone_hot(z, usize::MAX);
            self.take(z, order)
        } else {
            Err(err)
        }
    }

    /// Takes a block of `order` off the lists of zone `z`, splitting a larger one when
    /// needed (the upper halves go back on the lists) and carving from the frontier when
    /// the lists have none. Returns its frame number and metadata index; the head's state,
    /// `free_pages` and the counters are the caller's to update.
    #[inline(always)]
    fn take(&mut self, z: usize, order: usize) -> Result<(u64, usize), BuddyError> {
        let mut avail = self.zones[z].nonempty >> order;
        while avail == 0 {
            if !self.carve(z) {
                return Err(BuddyError::OutOfMemory);
            }
            avail = self.zones[z].nonempty >> order;
        }
        let mut o = order + avail.trailing_zeros() as usize;
        let Some(r) = self.map.region_of(self.zones[z].heads[o]).copied() else {
            return Err(self.corrupted_list(z, o));
        };
        let pfn = self.pop(z, o);
        let idx = r.index + (pfn - r.start_pfn) as usize;
        while o > order {
            o -= 1;
            self.push(z, pfn + (1 << o), o);
            self.set_state(idx + (1 << o), ST_FREE | o as u8);
        }
        Ok((pfn, idx))
    }

    /// Fills the empty hot list of zone `z` with up to `batch` frames from the lists,
    /// lowest address on top (so that low memory is still handed out first).
    ///
    /// # Errors
    /// The error of the first frame that could not be taken, when none could.
    #[cold]
    fn refill_hot(&mut self, z: usize) -> Result<(), BuddyError> {
        debug_assert_eq!(self.zones[z].hot.len, 0);
        for _ in 0..self.zones[z].hot.batch {
            let (pfn, idx) = match self.take(z, 0) {
                Ok(t) => t,
                Err(e) if self.zones[z].hot.len == 0 => return Err(e),
                Err(_) => break,
            };
            self.set_state(idx, ST_HOT);
            if self.strict {
                // The list node becomes part of a frame poisoned whole. The rest of the
                // frame is checked when it is handed out.
                // SAFETY: the frame is free memory owned by the allocator.
                unsafe { core::ptr::write_bytes(self.va::<u8>(pfn), POISON_BYTE, NODE_BYTES) };
            }
            let slot = self.map.region_of(pfn).map_or(0, |r| r.slot);
            self.zones[z].hot.push_bottom(HotList::entry(pfn, slot));
        }
        Ok(())
    }

    /// Allocates a block of `2^order` frames filled with zeroes (`GFP_KERNEL | __GFP_ZERO`).
    ///
    /// # Errors
    /// As [`Self::alloc`].
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// let ring = buddy.alloc_zeroed(1)?;                   // two zeroed frames for a DMA ring
    /// # let _ = ring;
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn alloc_zeroed(&mut self, order: usize) -> Result<PhysAddr, BuddyError> {
        self.alloc_gfp(order, GFP_KERNEL | __GFP_ZERO)
    }

    /// Reports a free-list head outside managed RAM, and drops the list. The caller counts
    /// the failed allocation.
    #[cold]
    fn corrupted_list(&mut self, z: usize, order: usize) -> BuddyError {
        let zone = &mut self.zones[z];
        log::error!(
            "buddy: free list of order {order} of zone {} points at frame {:#x}, outside RAM; list dropped",
            ZONE_NAMES[z],
            zone.heads[order]
        );
        zone.heads[order] = NIL;
        zone.free_pages -= zone.counts[order] << order;
        zone.counts[order] = 0;
        zone.nonempty &= !(1 << order);
        self.corruptions += 1;
        BuddyError::Corrupted
    }

    /// Strict mode: checks that `len` bytes from `skip` into frame `pfn` hold the poison.
    #[cold]
    fn check_poison(&mut self, pfn: u64, len: usize, skip: usize) {
        let base = self.va::<u8>(pfn);
        // SAFETY: the block was allocated by the caller and is owned by the allocator
        // until it returns; `skip + len` stays inside it.
        let bytes = unsafe { core::slice::from_raw_parts(base.add(skip), len) };
        if !poison_intact(bytes, pfn, skip) {
            self.corruptions += 1;
        }
    }

    /// Allocates order-0 frames into `out` until it is full or memory runs out, as
    /// [`Self::alloc_bulk_gfp`] with [`GFP_KERNEL`].
    ///
    /// # Example
    /// ```no_run
    /// let mut frames = [hal::PhysAddr::new(0); 32];
    /// let n = memory::buddy::global().unwrap().lock().alloc_bulk(&mut frames);
    /// let got = &frames[..n];                              // may be short when memory runs out
    /// # let _ = got;
    /// ```
    pub fn alloc_bulk(&mut self, out: &mut [PhysAddr]) -> usize {
        self.alloc_bulk_gfp(out, GFP_KERNEL)
    }

    /// Allocates order-0 frames into `out` until it is full, memory runs out or the zones
    /// reach their watermarks; returns how many were allocated (`out[..n]`). Zones are
    /// taken as by [`Self::alloc_gfp`]. In each zone the hot list's frames go first; then
    /// large blocks are broken up whole when the request is big enough, so the cost per
    /// frame stays a few stores. The hot lists are not refilled. `__GFP_ZERO` zeroes them.
    ///
    /// A call that comes up short counts as one allocation failure.
    ///
    /// # Example
    /// ```no_run
    /// let mut frames = [hal::PhysAddr::new(0); 32];
    /// let n = memory::buddy::global().unwrap().lock().alloc_bulk_gfp(&mut frames, memory::gfp::GFP_DMA32);
    /// assert!(frames[..n].iter().all(|pa| pa.as_u64() < 1 << 32));
    /// ```
    pub fn alloc_bulk_gfp(&mut self, out: &mut [PhysAddr], gfp: Gfp) -> usize {
        let high = gfp.zone();
        let mut n = 0;
        let mut below_min = false;
        for z in (0..=high).rev() {
            if n == out.len() {
                break;
            }
            let zone = &self.zones[z];
            let mark = gfp.min_watermark(zone.wmark[WMARK_MIN]) + zone.lowmem_reserve[high];
            // Frame by frame, Linux's check is `free > mark`.
            let may = zone.free_pages.saturating_sub(mark);
            if may < out.len() - n && zone.free_pages > may {
                below_min = true;
            }
            let want = may.min(out.len() - n);
            n += self.zone_bulk(z, &mut out[n..n + want]);
        }
        if gfp.contains(__GFP_ZERO) {
            for pa in &out[..n] {
                // SAFETY: the frame was just allocated: the allocator owns it until it returns.
                unsafe { zero_frames(self.va::<u8>(pa.as_u64() >> PAGE_SHIFT), 1) };
            }
        }
        if n < out.len() {
            self.alloc_failures += 1;
            if below_min {
                self.watermark_failures += 1;
            }
        }
        n
    }

    /// The bulk allocation of zone `z` (no watermark check).
    fn zone_bulk(&mut self, z: usize, out: &mut [PhysAddr]) -> usize {
        let mut n = 0;
        while n < out.len() && self.zones[z].hot.len != 0 {
            out[n] = self.alloc_hot(z);
            n += 1;
        }
        let from_hot = n;
        while n < out.len() {
            let nonempty = self.zones[z].nonempty;
            if nonempty & 1 != 0 {
                let Some(r) = self.map.region_of(self.zones[z].heads[0]).copied() else {
                    self.corrupted_list(z, 0);
                    continue;
                };
                let pfn = self.pop(z, 0);
                self.set_state(r.index + (pfn - r.start_pfn) as usize, ST_ALLOC);
                if self.strict {
                    self.check_poison(pfn, PAGE_SIZE - NODE_BYTES, NODE_BYTES);
                }
                out[n] = PhysAddr::new(pfn << PAGE_SHIFT);
                n += 1;
                continue;
            }
            if nonempty == 0 {
                if self.carve(z) {
                    continue;
                }
                break;
            }
            let o = nonempty.trailing_zeros() as usize;
            let Some(r) = self.map.region_of(self.zones[z].heads[o]).copied() else {
                self.corrupted_list(z, o);
                continue;
            };
            let want = out.len() - n;
            if want < 1 << o {
                // Split down to order 0 the usual way; the loop then takes order-0 frames.
                let pfn = self.pop(z, o);
                let idx = r.index + (pfn - r.start_pfn) as usize;
                let mut k = o;
                while k > 0 {
                    k -= 1;
                    self.push(z, pfn + (1 << k), k);
                    self.set_state(idx + (1 << k), ST_FREE | k as u8);
                }
                self.set_state(idx, ST_FREE);
                self.push(z, pfn, 0);
                continue;
            }
            // Hand out the whole block frame by frame.
            let pfn = self.pop(z, o);
            let idx = r.index + (pfn - r.start_pfn) as usize;
            for i in 0..(1u64 << o) {
                self.set_state(idx + i as usize, ST_ALLOC);
                out[n] = PhysAddr::new((pfn + i) << PAGE_SHIFT);
                n += 1;
            }
            if self.strict {
                self.check_poison(pfn, (PAGE_SIZE << o) - NODE_BYTES, NODE_BYTES);
            }
        }
        // `alloc_hot` already counted its frames.
        self.zones[z].free_pages -= n - from_hot;
        n
    }

    // ----- freeing -----

    /// Checks that `pa` heads an allocated block of `order`; returns its region.
    #[inline(always)]
    fn check_allocated(&self, pa: PhysAddr, order: usize) -> Result<(RegionInfo, usize), BuddyError> {
        check_allocated(&self.map, self.state, pa, order)
    }

    /// Frees the block of `2^order` frames at `pa` to its zone: an order-0 frame goes on
    /// the zone's hot list, a larger block merges with its free buddies.
    ///
    /// # Errors
    /// Nothing changes when an error is returned:
    /// - [`BuddyError::BadOrder`]: `order` above [`MAX_ORDER`];
    /// - [`BuddyError::Misaligned`]: `pa` not aligned on `PAGE_SIZE << order`;
    /// - [`BuddyError::OutOfRange`]: `pa` outside every managed region;
    /// - [`BuddyError::Reserved`]: `pa` in a reserved range or the metadata;
    /// - [`BuddyError::NotAllocated`]: `pa` is free (double free, on the lists or on the
    ///   hot list) or inside a block;
    /// - [`BuddyError::WrongOrder`]: the block was allocated with another order.
    ///
    /// # Safety
    /// The caller owns the block: it was allocated and not freed since, and no other free
    /// of it runs at the same time (a double free is refused when it comes after the
    /// first, not when two run at once on two CPUs). Nothing may use the freed memory
    /// afterwards (no reference into it, no mapping the program still reaches it through):
    /// the allocator writes to it and hands it out again. The checks catch wrong
    /// addresses and orders and sequential double frees, not memory still in use.
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// let pa = buddy.alloc(2)?;
    /// // SAFETY: the block was never mapped nor referenced; nothing uses it after this.
    /// unsafe { buddy.free(pa, 2) }?;
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    #[inline]
    pub unsafe fn free(&mut self, pa: PhysAddr, order: usize) -> Result<(), BuddyError> {
        let (r, idx) = self.check_allocated(pa, order)?;
        let pfn = pa.as_u64() >> PAGE_SHIFT;
        let z = r.zone;
        if order == 0 && self.zones[z].hot.high != 0 {
            self.free_hot(z, r.slot, idx, pfn);
            if self.zones[z].hot.len > self.zones[z].hot.high {
                self.drain_zone_hot(z, self.zones[z].hot.batch);
            }
        } else {
            self.free_checked(r, idx, pfn, order);
        }
        Ok(())
    }

    /// Puts an allocated order-0 frame (checked) on top of the hot list of zone `z`, which
    /// has room.
    #[inline(always)]
    fn free_hot(&mut self, z: usize, slot: usize, idx: usize, pfn: u64) {
        if self.strict {
            // SAFETY: the frame is allocated, and its owner gave it back.
            unsafe { core::ptr::write_bytes(self.va::<u8>(pfn), POISON_BYTE, PAGE_SIZE) };
        }
        self.set_state(idx, ST_HOT);
        let zone = &mut self.zones[z];
        zone.free_pages += 1;
        zone.hot.push_top(HotList::entry(pfn, slot));
    }

    /// Gives the `n` coldest frames of zone `z`'s hot list back to its buddy lists.
    #[cold]
    fn drain_zone_hot(&mut self, z: usize, n: usize) {
        for _ in 0..n.min(self.zones[z].hot.len) {
            let e = self.zones[z].hot.pop_bottom();
            let r = self.map.regions[(e & 7) as usize];
            let (pfn, idx) = self.hot_entry(e);
            // Strict mode: a hot frame is poisoned whole already.
            self.merge(z, r, idx, pfn, 0);
        }
    }

    /// Gives every frame of the hot lists back to the buddy lists, where they merge;
    /// returns how many. Afterwards [`Self::free_blocks`] describes all free memory, fully
    /// merged (what a comparison of buddyinfo with an earlier state needs). `free_pages`
    /// does not change.
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// buddy.drain_hot();
    /// log::info!("{}", buddy.buddyinfo());                 // all free memory, fully merged
    /// ```
    pub fn drain_hot(&mut self) -> usize {
        let mut n = 0;
        for z in 0..MAX_NR_ZONES {
            n += self.zones[z].hot.len;
            self.drain_zone_hot(z, usize::MAX);
        }
        n
    }

    /// Sets the hot lists' high watermark and batch (see the module docs): `high` is
    /// clamped to `HOT_CAPACITY - 1`, `batch` to `1..=high`; `high` 0 turns the hot lists
    /// off (order-0 frees then merge at once, as for other orders). Frames above the new
    /// watermark go back to the lists.
    ///
    /// # Example
    /// ```no_run
    /// memory::buddy::global().unwrap().lock().set_hot_limits(128, 16);
    /// ```
    pub fn set_hot_limits(&mut self, high: usize, batch: usize) {
        let high = high.min(HOT_CAPACITY - 1);
        for z in 0..MAX_NR_ZONES {
            let hot = &mut self.zones[z].hot;
            hot.high = high;
            hot.batch = batch.clamp(1, high.max(1));
            if hot.len > high {
                let extra = hot.len - high;
                self.drain_zone_hot(z, extra);
            }
        }
    }

    /// The hot lists' high watermark and batch.
    ///
    /// # Example
    /// ```no_run
    /// let (high, batch) = memory::buddy::global().unwrap().lock().hot_limits();
    /// # let _ = (high, batch);
    /// ```
    pub fn hot_limits(&self) -> (usize, usize) {
        (self.zones[0].hot.high, self.zones[0].hot.batch)
    }

    /// Free order-0 frames on the hot lists now (counted in [`Self::free_pages`], not in
    /// [`Self::free_blocks`]).
    ///
    /// # Example
    /// ```no_run
    /// let hot = memory::buddy::global().unwrap().lock().hot_pages();
    /// # let _ = hot;
    /// ```
    pub fn hot_pages(&self) -> usize {
        self.zones.iter().map(|z| z.hot.len).sum()
    }

    /// Moves up to `n` order-0 frames of zone `z` onto a per-CPU list (see [`pcp`]),
    /// lowest address on top, never more than keeps the zone above the watermark of `gfp`
    /// (whose highest zone is `high`); returns how many. They leave the zone's free count,
    /// as Linux's `NR_FREE_PAGES` does not count per-CPU pages.
    pub(crate) fn pcp_refill(&mut self, z: usize, list: &mut HotList, n: usize, gfp: Gfp, high: usize) -> usize {
        let zone = &self.zones[z];
        let mark = gfp.min_watermark(zone.wmark[WMARK_MIN]) + zone.lowmem_reserve[high];
        let n = n.min(zone.free_pages.saturating_sub(mark));
        let mut k = 0;
        while k < n {
            let Ok((pfn, idx)) = self.take(z, 0) else { break };
            self.set_state(idx, ST_HOT);
            if self.strict {
                // The list node becomes part of a frame poisoned whole.
                // SAFETY: the frame is free memory owned by the allocator.
                unsafe { core::ptr::write_bytes(self.va::<u8>(pfn), POISON_BYTE, NODE_BYTES) };
            }
            let slot = self.map.region_of(pfn).map_or(0, |r| r.slot);
            list.push_bottom(HotList::entry(pfn, slot));
            k += 1;
        }
        self.zones[z].free_pages -= k;
        k
    }

    /// Gives the `n` coldest frames of a per-CPU list of zone `z` back to the zone's lists,
    /// where they merge; returns how many.
    pub(crate) fn pcp_drain(&mut self, z: usize, list: &mut HotList, n: usize) -> usize {
        let k = n.min(list.len);
        for _ in 0..k {
            let e = list.pop_bottom();
            let r = self.map.regions[(e & 7) as usize];
            let (pfn, idx) = self.hot_entry(e);
            // Strict mode: a frame on a per-CPU list is poisoned whole already.
            self.merge(z, r, idx, pfn, 0);
        }
        self.zones[z].free_pages += k;
        k
    }

    /// Frees a block already checked by `check_allocated` to the lists.
    #[inline(always)]
    fn free_checked(&mut self, r: RegionInfo, idx: usize, pfn: u64, order: usize) {
        if self.strict {
            // SAFETY: the block is allocated, and its owner gave it back.
            unsafe { core::ptr::write_bytes(self.va::<u8>(pfn), POISON_BYTE, PAGE_SIZE << order) };
        }
        self.zones[r.zone].free_pages += 1 << order;
        self.merge(r.zone, r, idx, pfn, order);
    }

    /// Puts the free block at `pfn` (already counted free, poisoned in strict mode) on the
    /// lists of zone `z`, merging it with its free buddies.
    #[inline(always)]
    fn merge(&mut self, z: usize, r: RegionInfo, idx: usize, pfn: u64, order: usize) {
        self.set_state(idx, ST_TAIL);
        let (mut pfn, mut idx, mut o) = (pfn, idx, order);
        while o < MAX_ORDER {
            let buddy = pfn ^ (1 << o);
            if buddy.wrapping_sub(r.start_pfn) >= r.frames {
                break;
            }
            let bidx = r.index + (buddy - r.start_pfn) as usize;
            if self.state_at(bidx) != ST_FREE | o as u8 {
                break;
            }
            self.unlink(z, buddy, o);
            self.set_state(bidx, ST_TAIL);
            if self.strict {
                // The buddy's list node becomes the inside of a larger free block.
                // SAFETY: the buddy is free memory owned by the allocator.
                unsafe { core::ptr::write_bytes(self.va::<u8>(buddy), POISON_BYTE, NODE_BYTES) };
            }
            if buddy < pfn {
                pfn = buddy;
                idx = bidx;
            }
            o += 1;
        }
        self.set_state(idx, ST_FREE | o as u8);
        self.push(z, pfn, o);
    }

    /// Frees order-0 frames: onto their zone's hot list while it is below its high
    /// watermark, then to the lists. All entries are checked first: if one is invalid,
    /// nothing is freed.
    ///
    /// # Errors
    /// The error of the first invalid entry (as [`Self::free`] with order 0), with the
    /// allocator unchanged. A frame listed twice passes the check and is freed once; its
    /// second copy is then refused ([`BuddyError::NotAllocated`]), the only case in which
    /// the call returns an error after freeing.
    ///
    /// # Safety
    /// As [`Self::free`], for every block given.
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// let mut frames = [hal::PhysAddr::new(0); 16];
    /// let n = buddy.alloc_bulk(&mut frames);
    /// // SAFETY: the frames were just allocated and never used.
    /// unsafe { buddy.free_bulk(&frames[..n]) }?;
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub unsafe fn free_bulk(&mut self, frames: &[PhysAddr]) -> Result<(), BuddyError> {
        // Check everything before changing anything (an O(1) state read per frame).
        for &pa in frames {
            self.check_allocated(pa, 0)?;
        }
        let mut first_err = Ok(());
        for &pa in frames {
            match self.check_allocated(pa, 0) {
                Ok((r, idx)) => {
                    let pfn = pa.as_u64() >> PAGE_SHIFT;
                    let hot = &self.zones[r.zone].hot;
                    if hot.len < hot.high {
                        self.free_hot(r.zone, r.slot, idx, pfn);
                    } else {
                        self.free_checked(r, idx, pfn, 0);
                    }
                }
                Err(e) => {
                    if first_err.is_ok() {
                        first_err = Err(e);
                    }
                }
            }
        }
        first_err
    }

    // ----- watermarks -----

    /// Sets `min_free_kbytes` and recomputes every zone's watermarks and
    /// `lowmem_reserve` from it, as Linux's `setup_per_zone_wmarks` and
    /// `setup_per_zone_lowmem_reserve` (see [`per_zone_wmarks`]); `None` takes Linux's
    /// default, [`default_min_free_kbytes`] of the managed frames. 0 sets every `min` to 0
    /// (`lowmem_reserve` stays: [`Self::set_lowmem_reserve`] turns it off).
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// buddy.set_min_free_kbytes(Some(4096));               // as `sysctl vm.min_free_kbytes=4096`
    /// ```
    pub fn set_min_free_kbytes(&mut self, kbytes: Option<usize>) {
        let managed = [self.zones[0].managed, self.zones[1].managed, self.zones[2].managed];
        let kb = kbytes.unwrap_or_else(|| default_min_free_kbytes(managed.iter().sum()));
        let (w, reserve) = per_zone_wmarks(kb, &managed);
        for z in 0..MAX_NR_ZONES {
            self.zones[z].wmark = w[z];
            self.zones[z].lowmem_reserve = reserve[z];
        }
        self.min_free_kbytes = kb;
    }

    /// Sets `lowmem_reserve` of every zone to 0 (or back to Linux's, with `on`): what a
    /// test that must empty a low zone from a `Normal` request needs.
    ///
    /// # Example
    /// ```no_run
    /// memory::buddy::global().unwrap().lock().set_lowmem_reserve(false);
    /// ```
    pub fn set_lowmem_reserve(&mut self, on: bool) {
        let managed = [self.zones[0].managed, self.zones[1].managed, self.zones[2].managed];
        let (_, reserve) = per_zone_wmarks(self.min_free_kbytes, &managed);
        for (zone, r) in self.zones.iter_mut().zip(reserve) {
            zone.lowmem_reserve = if on { r } else { [0; MAX_NR_ZONES] };
        }
    }
    // ----- page-table frames -----

    /// A zeroed 4 KiB frame for a translation table, or `None` when memory is exhausted.
    /// The [`TableAlloc`] implementation calls this.
    ///
    /// # Example
    /// ```no_run
    /// let table = memory::buddy::global().unwrap().lock().alloc_table(); // zeroed, or None
    /// # let _ = table;
    /// ```
    pub fn alloc_table(&mut self) -> Option<PhysAddr> {
        self.alloc_zeroed(0).ok()
    }

    /// Frees a frame from [`Self::alloc_table`]. An invalid frame is reported with
    /// `log::error!` and ignored. The [`TableAlloc`] implementation calls this.
    ///
    /// # Safety
    /// As [`Self::free`], for the table page at `pa`.
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// if let Some(table) = buddy.alloc_table() {
    ///     // SAFETY: the table was never linked into a translation tree.
    ///     unsafe { buddy.free_table(table) };
    /// }
    /// ```
    pub unsafe fn free_table(&mut self, pa: PhysAddr) {
        // SAFETY: forwarded to our caller.
        if let Err(e) = unsafe { self.free(pa, 0) } {
            log::error!("buddy: free_table({pa:#x}): {e}");
        }
    }

    // ----- introspection -----

    /// Frames free now (on the lists or on the hot list).
    ///
    /// # Example
    /// ```no_run
    /// let free = memory::buddy::global().unwrap().lock().free_pages();
    /// log::info!("{} KiB free", free * 4);
    /// ```
    pub fn free_pages(&self) -> usize {
        self.zones.iter().map(|z| z.free_pages).sum()
    }

    /// Frames managed (free or allocated).
    ///
    /// # Example
    /// ```no_run
    /// let total = memory::buddy::global().unwrap().lock().total_pages();
    /// # let _ = total;
    /// ```
    pub fn total_pages(&self) -> usize {
        self.total_pages
    }

    /// Free blocks per order, all zones together, on the buddy lists and beyond the
    /// untouched frontiers (not counting the hot lists; see
    /// [`Self::drain_hot`]).
    ///
    /// # Example
    /// ```no_run
    /// let blocks = memory::buddy::global().unwrap().lock().free_blocks();
    /// let huge = blocks[memory::buddy::MAX_ORDER];         // free 4 MiB blocks
    /// # let _ = huge;
    /// ```
    pub fn free_blocks(&self) -> [usize; NR_ORDERS] {
        let mut b = [0; NR_ORDERS];
        for z in &self.zones {
            for (o, n) in b.iter_mut().enumerate() {
                *n += z.counts[o] + z.fresh[o];
            }
        }
        b
    }

    /// Whether strict mode (poisoning) is on.
    ///
    /// # Example
    /// ```no_run
    /// if memory::buddy::global().unwrap().lock().is_strict() {
    ///     log::warn!("buddy: strict mode (poisoning) is on");
    /// }
    /// ```
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// The physical range of the allocator's metadata.
    ///
    /// # Example
    /// ```no_run
    /// let meta = memory::buddy::global().unwrap().lock().metadata_range();
    /// log::info!("buddy metadata: {} pages at {:#x}", meta.pages(), meta.start());
    /// ```
    pub fn metadata_range(&self) -> PhysRange {
        self.meta
    }

    /// The linear map the allocator reaches RAM through.
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// let pa = buddy.alloc_table().unwrap();
    /// let va = buddy.linear_map().phys_to_virt(pa);        // where the driver reaches it
    /// # let _ = va;
    /// ```
    pub fn linear_map(&self) -> &LinearMap {
        &self.linear
    }

    /// The frame-number-to-metadata-index map.
    ///
    /// # Example
    /// ```no_run
    /// let frames = memory::buddy::global().unwrap().lock().frame_map().frames();
    /// # let _ = frames;
    /// ```
    pub fn frame_map(&self) -> &FrameMap {
        &self.map
    }

    /// Claims one of the 8 owner marks a slab allocator writes into the frame tag of its
    /// large blocks, so that allocators sharing this buddy tell their large blocks apart
    /// exactly; `None` when all 8 are held.
    pub(crate) fn claim_owner_mark(&mut self) -> Option<u8> {
        let k = (!self.owner_marks).trailing_zeros();
        if k >= 8 {
            return None;
        }
        self.owner_marks |= 1 << k;
        Some(k as u8)
    }

    /// Gives back an owner mark from [`Self::claim_owner_mark`].
    pub(crate) fn release_owner_mark(&mut self, k: u8) {
        self.owner_marks &= !(1u8 << (k & 7));
    }

    /// The per-frame owner tags (see [`FrameTags`]), borrowing the allocator (usable
    /// without its lock while the borrow lasts).
    ///
    /// # Example
    /// ```no_run
    /// let buddy = memory::buddy::global().unwrap().lock();
    /// let tags = buddy.frame_tags(); // atomics: no `&mut` needed
    /// # let _ = tags;
    /// ```
    pub fn frame_tags(&self) -> FrameTags<'_> {
        FrameTags { base: self.tags, map: self.map, _allocator: PhantomData }
    }

    /// A snapshot of the counters.
    ///
    /// # Example
    /// ```no_run
    /// let s = memory::buddy::global().unwrap().lock().stats();
    /// log::info!("{} of {} frames free ({} hot)", s.free_pages, s.total_pages, s.hot_pages);
    /// ```
    pub fn stats(&self) -> BuddyStats {
        let mut zones = [ZoneStats::default(); MAX_NR_ZONES];
        for (s, z) in zones.iter_mut().zip(&self.zones) {
            if z.present == 0 {
                continue;
            }
            let mut free_blocks = [0; NR_ORDERS];
            for (o, n) in free_blocks.iter_mut().enumerate() {
                *n = z.counts[o] + z.fresh[o];
            }
            *s = ZoneStats {
                start_pfn: z.start_pfn,
                spanned: (z.end_pfn - z.start_pfn) as usize,
                present: z.present,
                managed: z.managed,
                free_pages: z.free_pages,
                free_blocks,
                hot_pages: z.hot.len,
                min: z.wmark[0],
                low: z.wmark[1],
                high: z.wmark[2],
                lowmem_reserve: z.lowmem_reserve,
                pcp: PcpLimits::default(),
            };
        }
        BuddyStats {
            total_pages: self.total_pages,
            free_pages: self.free_pages(),
            free_blocks: self.free_blocks(),
            hot_pages: self.hot_pages(),
            reserved_pages: self.reserved_pages,
            metadata_pages: self.meta.pages() as usize,
            alloc_failures: self.alloc_failures,
            watermark_failures: self.watermark_failures,
            corruptions: self.corruptions,
            zones,
            min_free_kbytes: self.min_free_kbytes,
        }
    }

    /// The `/proc/buddyinfo` lines (one per populated zone) of the buddy lists (not counting the hot list, as Linux
    /// does not count per-CPU pages; [`Self::drain_hot`] first for all free memory).
    ///
    /// # Example
    /// ```no_run
    /// let mut buddy = memory::buddy::global().unwrap().lock();
    /// buddy.drain_hot();
    /// log::info!("{}", buddy.buddyinfo());
    /// ```
    pub fn buddyinfo(&self) -> BuddyInfo {
        self.stats().buddyinfo()
    }

    /// Free frames not yet carved from the zones' untouched frontiers: never written since
    /// boot (not in [`BuddyStats`], so that a snapshot compares equal whether or not an
    /// allocation carved a block and gave it back).
    ///
    /// # Example
    /// ```no_run
    /// let untouched = memory::buddy::global().unwrap().lock().untouched_pages();
    /// # let _ = untouched;
    /// ```
    pub fn untouched_pages(&self) -> usize {
        self.zones.iter().map(|z| z.fresh.iter().enumerate().map(|(o, n)| n << o).sum::<usize>()).sum()
    }

    /// The `/proc/zoneinfo` report of the zones.
    ///
    /// # Example
    /// ```no_run
    /// log::info!("{}", memory::buddy::global().unwrap().lock().zoneinfo());
    /// ```
    pub fn zoneinfo(&self) -> ZoneInfo {
        self.stats().zoneinfo()
    }

    /// Walks every zone's free lists, hot list, frontier and the whole state array and
    /// checks that they agree: list links, counts, states, alignment, zones, that no two
    /// free buddies were left unmerged, that every hot-list entry is a distinct frame of
    /// its zone in the hot state (and no other frame is), that untouched blocks lie beyond
    /// their frontier, the watermark, and that the free frame counts match. O(frames): for
    /// tests and debugging.
    ///
    /// # Errors
    /// A description of the first inconsistency found.
    ///
    /// # Example
    /// ```no_run
    /// memory::buddy::check_consistency()?;
    /// # Ok::<(), &'static str>(())
    /// ```
    pub fn check_consistency(&self) -> Result<(), &'static str> {
        self.check_consistency_with([0; MAX_NR_ZONES])
    }

    /// [`Self::check_consistency`] with `outside[z]` frames of zone `z` on per-CPU lists
    /// (in the hot state, not counted free by the zone).
    pub(crate) fn check_consistency_with(&self, outside: [usize; MAX_NR_ZONES]) -> Result<(), &'static str> {
        let states = self.states();
        let mut heads_listed = 0usize;
        let mut heads_fresh = 0usize;
        let mut hot_total = 0usize;
        for (z, zone) in self.zones.iter().enumerate() {
            let mut free = 0usize;
            for o in 0..NR_ORDERS {
                let mut n = 0;
                let mut prev = NIL;
                let mut pfn = zone.heads[o];
                if (zone.nonempty >> o) & 1 != (pfn != NIL) as u32 {
                    return Err("non-empty mask disagrees with a list head");
                }
                while pfn != NIL {
                    let r = self.map.region_of(pfn).ok_or("free block outside RAM")?;
                    if r.zone != z {
                        return Err("free block on another zone's list");
                    }
                    if pfn & ((1 << o) - 1) != 0 {
                        return Err("free block misaligned");
                    }
                    if pfn + (1 << o) > r.start_pfn + r.frames {
                        return Err("free block crosses a region end");
                    }
                    let idx = r.index + (pfn - r.start_pfn) as usize;
                    if self.state_at(idx) != ST_FREE | o as u8 {
                        return Err("listed block's state is not free with its order");
                    }
                    if first_other(&states[idx + 1..idx + (1 << o)], ST_TAIL).is_some() {
                        return Err("frame inside a free block is not a tail");
                    }
                    if o < MAX_ORDER {
                        let b = pfn ^ (1 << o);
                        if let Some(bidx) = self.map.index_of_pfn(b) {
                            if self.map.region_of(b).map(|x| x.start_pfn) == Some(r.start_pfn)
                                && matches!(self.state_at(bidx), s if s == ST_FREE | o as u8 || s == ST_FRESH | o as u8)
                            {
                                return Err("two free buddies left unmerged");
                            }
                        }
                    }
                    // SAFETY: `pfn` heads a free block (checked against its state above).
                    let node = unsafe { &*self.node(pfn) };
                    if node.prev != prev {
                        return Err("broken prev link");
                    }
                    prev = pfn;
                    pfn = node.next;
                    n += 1;
                    if n > self.map.frames {
                        return Err("free list loops");
                    }
                }
                if n != zone.counts[o] {
                    return Err("free block count disagrees with its list");
                }
                free += (n + zone.fresh[o]) << o;
                heads_listed += n;
                heads_fresh += zone.fresh[o];
            }
            let hot = &zone.hot;
            if hot.len > hot.high || hot.batch == 0 || hot.batch > hot.high.max(1) {
                return Err("hot list above its watermark, or bad batch");
            }
            for e in hot.iter() {
                let slot = (e & 7) as usize;
                let pfn = e >> 3;
                let r = self.map.region_of(pfn).ok_or("hot frame outside RAM")?;
                if r.slot != slot || r.zone != z {
                    return Err("hot entry names the wrong region or zone");
                }
                if self.state_at(r.index + (pfn - r.start_pfn) as usize) != ST_HOT {
                    return Err("hot frame's state is not hot");
                }
            }
            if has_duplicate(hot.iter()) {
                return Err("frame twice on the hot list");
            }
            free += hot.len;
            hot_total += hot.len + outside[z];
            if free != zone.free_pages {
                return Err("a zone's free page count disagrees with its lists, frontier and hot list");
            }
        }
        let (mut heads, mut fresh, mut hot) = (0, 0, 0);
        for r in &self.map.regions[..self.map.len] {
            let zone = &self.zones[r.zone];
            let region = &states[r.index..r.index + r.frames as usize];
            // An index loop: an iterator's calls per byte cost several times more under Miri,
            // where the host suites run this check after nearly every step.
            // The length is read once: every call taking the slice retags all of it.
            let (mut i, n) = (0, region.len());
            while i < n {
                let s = region[i].load(Ordering::Relaxed);
                i += 1;
                match s {
                    ST_NONE => {}
                    ST_HOT => hot += 1,
                    s if s & ST_FREE != 0 && s & ST_ALLOC == 0 => heads += 1,
                    s if s & 0xf0 == ST_FRESH => {
                        fresh += 1;
                        let pfn = r.start_pfn + (i - 1) as u64;
                        if r.slot < zone.front_slot || (r.slot == zone.front_slot && pfn < zone.front_pfn) {
                            return Err("untouched block behind its frontier");
                        }
                    }
                    _ => {}
                }
            }
        }
        if heads != heads_listed {
            return Err("free heads in the state array disagree with the lists");
        }
        if fresh != heads_fresh {
            return Err("untouched heads in the state array disagree with the counts");
        }
        if hot != hot_total {
            return Err("hot frames in the state array disagree with the hot list");
        }
        Ok(())
    }
}

/// The index of the first of `states` that is not `v`. An index loop with the length read
/// once, as in [`BuddyAllocator::check_consistency_with`], which calls it on the tail of
/// every free block.
fn first_other(states: &[AtomicU8], v: u8) -> Option<usize> {
    let (mut i, n) = (0, states.len());
    while i < n {
        if states[i].load(Ordering::Relaxed) != v {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Whether a hot list's entries (at most [`HOT_CAPACITY`]) name a frame twice: sorted in a
/// copy on the stack, O(n log n) (a pairwise scan of a full list is a quarter of a million
/// steps, a minute under Miri).
fn has_duplicate(entries: impl Iterator<Item = u64>) -> bool {
    let mut sorted = [0u64; HOT_CAPACITY];
    let n = sorted.iter_mut().zip(entries).map(|(slot, e)| *slot = e).count();
    let sorted = &mut sorted[..n];
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

// SAFETY: `alloc_table` hands out frames allocated from this allocator, which belong to
// the caller alone until it gives them back; they are 4 KiB aligned and inside the linear
// map the allocator was built over. Not zeroed here, as for `GlobalTableAlloc`: the walker
// zeroes every table page it takes ([`BuddyAllocator::alloc_table`], the zeroed frame for
// other callers, stays).
unsafe impl TableAlloc for BuddyAllocator {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        self.alloc(0).ok()
    }

    unsafe fn free_table(&mut self, page: PhysAddr) {
        // SAFETY: the trait's contract: no table or walk cache refers to `page` any more.
        unsafe { BuddyAllocator::free_table(self, page) }
    }
}

// ----- the global instance -----

static BUDDY: Once<pcp::Global> = Once::new();
static INIT_STARTED: AtomicBool = AtomicBool::new(false);

/// Builds the kernel's frame allocator (see [`BuddyAllocator::new`]).
///
/// # Errors
/// [`BuddyError::AlreadyInitialized`] on a second call, or an error of
/// [`BuddyAllocator::new`] (then nothing is written to RAM, and `init` may be retried).
///
/// # Safety
/// The contract of [`BuddyAllocator::new`], for the rest of the program's life.
///
/// # Example
/// ```no_run
/// use hal::{PhysAddr, PhysRange, VirtAddr};
/// let ram = PhysRange::new(PhysAddr::new(0x4000_0000), 1 << 30).unwrap();
/// let image = PhysRange::new(PhysAddr::new(0x4008_0000), 2 << 20).unwrap();
/// // SAFETY: RAM is mapped read-write at the kernel's linear-map offset.
/// let linear = unsafe { hal::linear::LinearMap::new(ram, VirtAddr::new(0xffff_0000_4000_0000)) };
/// // SAFETY: all of `ram` but the kernel image is free for the rest of the program.
/// unsafe { memory::buddy::init(&[ram], &[image], linear, false) }?;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
pub unsafe fn init(
    regions: &[PhysRange],
    reserved: &[PhysRange],
    linear_map: LinearMap,
    strict: bool,
) -> Result<(), BuddyError> {
    // SAFETY: forwarded to our caller.
    unsafe { init_zoned(regions, reserved, linear_map, strict, None) }
}

/// As [`init`], with a `DMA` zone below `dma_limit` (see [`BuddyAllocator::new_zoned`]).
/// Both set Linux's default watermarks ([`BuddyAllocator::set_min_free_kbytes`] with
/// `None`), as Linux's `init_per_zone_wmark_min`.
///
/// # Errors
/// As [`init`].
///
/// # Safety
/// As [`init`].
///
/// # Example
/// ```no_run
/// use hal::{PhysAddr, PhysRange, VirtAddr};
/// let ram = PhysRange::new(PhysAddr::new(0x4000_0000), 1 << 30).unwrap();
/// // SAFETY: RAM is mapped read-write at the kernel's linear-map offset.
/// let linear = unsafe { hal::linear::LinearMap::new(ram, VirtAddr::new(0xffff_0000_4000_0000)) };
/// // SAFETY: all of `ram` is free for the rest of the program.
/// unsafe { memory::buddy::init_zoned(&[ram], &[], linear, false, Some(PhysAddr::new(0x5000_0000))) }?;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
pub unsafe fn init_zoned(
    regions: &[PhysRange],
    reserved: &[PhysRange],
    linear_map: LinearMap,
    strict: bool,
    dma_limit: Option<PhysAddr>,
) -> Result<(), BuddyError> {
    if INIT_STARTED.swap(true, Ordering::AcqRel) {
        return Err(BuddyError::AlreadyInitialized);
    }
    // SAFETY: forwarded to our caller.
    match unsafe { BuddyAllocator::new_zoned(regions, reserved, linear_map, strict, dma_limit) } {
        Ok(mut a) => {
            a.set_min_free_kbytes(None);
            match pcp::Global::new(a) {
                Ok(g) => {
                    BUDDY.call_once(|| g);
                    Ok(())
                }
                Err(e) => {
                    INIT_STARTED.store(false, Ordering::Release);
                    Err(e)
                }
            }
        }
        Err(e) => {
            INIT_STARTED.store(false, Ordering::Release);
            Err(e)
        }
    }
}

/// The global allocator's zones behind their lock, once [`init`] has run. Calls through
/// it bypass the per-CPU page lists (order-0 frames go to and come from the zones'
/// lists directly); the free functions of this module ([`alloc_pages`], ...) use them.
///
/// # Example
/// ```no_run
/// let buddy = memory::buddy::global().ok_or(memory::buddy::BuddyError::NotInitialized)?;
/// let free = buddy.lock().free_pages();
/// # let _ = free;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
pub fn global() -> Option<&'static IrqSpinLock<BuddyAllocator>> {
    BUDDY.get().map(|g| &g.core)
}

/// The kernel's allocator, or [`BuddyError::NotInitialized`].
#[inline(always)]
fn kernel() -> Result<&'static pcp::Global, BuddyError> {
    BUDDY.get().ok_or(BuddyError::NotInitialized)
}

/// [`BuddyAllocator::alloc`] on the global allocator.
///
/// # Errors
/// [`BuddyError::NotInitialized`] before [`init`], else as [`BuddyAllocator::alloc`].
///
/// # Example
/// ```no_run
/// let pa = memory::buddy::alloc_pages(3)?;             // 8 frames, 32 KiB aligned
/// // SAFETY: the block is ours and nothing refers to it.
/// unsafe { memory::buddy::free_pages(pa, 3) }?;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
#[inline]
pub fn alloc_pages(order: usize) -> Result<PhysAddr, BuddyError> {
    kernel()?.alloc(order, GFP_KERNEL)
}

/// [`BuddyAllocator::alloc_gfp`] on the global allocator (Linux's
/// `alloc_pages(gfp, order)`). A failure is logged (rate-limited) unless `gfp` has
/// [`crate::gfp::__GFP_NOWARN`].
///
/// # Errors
/// [`BuddyError::NotInitialized`] before [`init`], else as [`BuddyAllocator::alloc_gfp`].
///
/// # Example
/// ```no_run
/// use memory::gfp::{GFP_ATOMIC, __GFP_NOWARN};
/// // From an interrupt handler: may dip into the reserves, must not spin for long.
/// let pa = memory::buddy::alloc_pages_gfp(GFP_ATOMIC | __GFP_NOWARN, 0)?;
/// # let _ = pa;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
pub fn alloc_pages_gfp(gfp: Gfp, order: usize) -> Result<PhysAddr, BuddyError> {
    let r = kernel()?.alloc(order, gfp);
    if let Err(e) = r {
        if !gfp.contains(__GFP_NOWARN) {
            warn_alloc(gfp, order, e);
        }
    }
    r
}

/// Linux's `warn_alloc`, rate-limited: the 1st, 2nd, 4th, 8th... failure is logged.
#[cold]
fn warn_alloc(gfp: Gfp, order: usize, e: BuddyError) {
    static WARNED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    let n = WARNED.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        log::warn!("buddy: page allocation failure: order:{order}, mode:{gfp:?}: {e} ({n} failures so far)");
    }
}

/// [`BuddyAllocator::alloc_bulk_gfp`] on the global allocator (one lock hold); 0 before
/// [`init`].
///
/// # Example
/// ```no_run
/// let mut rx = [hal::PhysAddr::new(0); 64];
/// let n = memory::buddy::alloc_pages_bulk_gfp(&mut rx, memory::gfp::GFP_DMA32);
/// # let _ = n;
/// ```
pub fn alloc_pages_bulk_gfp(out: &mut [PhysAddr], gfp: Gfp) -> usize {
    kernel().map_or(0, |g| g.alloc_bulk(out, gfp))
}

/// [`BuddyAllocator::set_min_free_kbytes`] on the global allocator (Linux's
/// `vm.min_free_kbytes` sysctl); nothing before [`init`].
///
/// # Example
/// ```no_run
/// memory::buddy::set_min_free_kbytes(Some(0));         // a test that must empty memory
/// memory::buddy::set_min_free_kbytes(None);            // back to Linux's default
/// ```
pub fn set_min_free_kbytes(kbytes: Option<usize>) {
    if let Ok(g) = kernel() {
        g.locked(|a| {
            a.set_min_free_kbytes(kbytes);
            g.sync_marks(a);
        });
    }
}

/// [`BuddyAllocator::set_lowmem_reserve`] on the global allocator; nothing before [`init`].
///
/// # Example
/// ```no_run
/// memory::buddy::set_lowmem_reserve(false);            // a Normal request may empty DMA32
/// memory::buddy::set_lowmem_reserve(true);             // Linux's reserves again
/// ```
pub fn set_lowmem_reserve(on: bool) {
    if let Ok(g) = kernel() {
        g.locked(|a| {
            a.set_lowmem_reserve(on);
            g.sync_marks(a);
        });
    }
}

/// [`BuddyAllocator::alloc_zeroed`] on the global allocator.
///
/// # Errors
/// [`BuddyError::NotInitialized`] before [`init`], else as [`BuddyAllocator::alloc`].
///
/// # Example
/// ```no_run
/// let queue = memory::buddy::alloc_zeroed_pages(0)?;   // a zeroed virtqueue page
/// # let _ = queue;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
pub fn alloc_zeroed_pages(order: usize) -> Result<PhysAddr, BuddyError> {
    kernel()?.alloc(order, GFP_KERNEL | __GFP_ZERO)
}

/// [`BuddyAllocator::free`] on the global allocator.
///
/// # Errors
/// [`BuddyError::NotInitialized`] before [`init`], else as [`BuddyAllocator::free`].
///
/// # Safety
/// As [`BuddyAllocator::free`].
///
/// # Example
/// ```no_run
/// let pa = memory::buddy::alloc_pages(0)?;
/// // SAFETY: the device is done with the frame and nothing maps it any more.
/// unsafe { memory::buddy::free_pages(pa, 0) }?;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
#[inline]
pub unsafe fn free_pages(pa: PhysAddr, order: usize) -> Result<(), BuddyError> {
    // SAFETY: forwarded to our caller.
    unsafe { kernel()?.free(pa, order) }
}

/// [`BuddyAllocator::alloc_bulk`] on the global allocator (one lock hold); 0 before
/// [`init`].
///
/// # Example
/// ```no_run
/// // Receive buffers for a NIC: one frame each, taken under one lock hold.
/// let mut rx = [hal::PhysAddr::new(0); 64];
/// let n = memory::buddy::alloc_pages_bulk(&mut rx);
/// # let _ = n;
/// ```
pub fn alloc_pages_bulk(out: &mut [PhysAddr]) -> usize {
    alloc_pages_bulk_gfp(out, GFP_KERNEL)
}

/// [`BuddyAllocator::free_bulk`] on the global allocator (one lock hold).
///
/// # Errors
/// [`BuddyError::NotInitialized`] before [`init`], else as [`BuddyAllocator::free_bulk`].
///
/// # Safety
/// As [`BuddyAllocator::free_bulk`].
///
/// # Example
/// ```no_run
/// let mut rx = [hal::PhysAddr::new(0); 64];
/// let n = memory::buddy::alloc_pages_bulk(&mut rx);
/// // SAFETY: the NIC was reset: no descriptor points to these frames any more.
/// unsafe { memory::buddy::free_pages_bulk(&rx[..n]) }?;
/// # Ok::<(), memory::buddy::BuddyError>(())
/// ```
pub unsafe fn free_pages_bulk(frames: &[PhysAddr]) -> Result<(), BuddyError> {
    // SAFETY: forwarded to our caller.
    unsafe { kernel()?.free_bulk(frames) }
}

/// [`BuddyAllocator::drain_hot`] on the global allocator: gives the hot list back to the
/// buddy lists, so that [`stats`]' buddyinfo shows all free memory fully merged. Returns
/// the frames moved (0 before [`init`]).
///
/// # Example
/// ```no_run
/// memory::buddy::drain_hot();
/// let info = memory::buddy::stats().unwrap().buddyinfo(); // compare with the boot state
/// # let _ = info;
/// ```
pub fn drain_hot() -> usize {
    let Ok(g) = kernel() else { return 0 };
    let moved = AtomicUsize::new(g.drain_local());
    // The other CPUs drain their own lists (nothing to do where no interrupt controller
    // runs yet: then no other CPU allocates).
    let _ = hal::smp::on_each_cpu(&|| {
        moved.fetch_add(g.drain_local(), Ordering::Relaxed);
    });
    moved.into_inner()
}

/// [`BuddyAllocator::check_consistency`] of the global allocator, counting the frames on
/// the per-CPU lists; for tests, while no other CPU allocates.
///
/// # Errors
/// As [`BuddyAllocator::check_consistency`]; `"not initialised"` before [`init`].
///
/// # Example
/// ```no_run
/// memory::buddy::check_consistency()?;
/// # Ok::<(), &'static str>(())
/// ```
pub fn check_consistency() -> Result<(), &'static str> {
    kernel().map_err(|_| "not initialised")?.check_consistency()
}

/// The global allocator's counters, or `None` before [`init`].
///
/// # Example
/// ```no_run
/// if let Some(s) = memory::buddy::stats() {
///     log::info!("{} frames free, {} allocation failures", s.free_pages, s.alloc_failures);
/// }
/// ```
pub fn stats() -> Option<BuddyStats> {
    kernel().ok().map(pcp::Global::stats)
}

/// The global allocator as a [`TableAlloc`] for page-table pages, through the per-CPU page
/// lists. The frames are not zeroed here: the walker zeroes every table page it takes
/// (`TableAlloc` promises no contents), and zeroing twice was half of a table's cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalTableAlloc;

// SAFETY: as for `BuddyAllocator`: the frames come from the global allocator and belong
// to the caller until it hands them back.
unsafe impl TableAlloc for GlobalTableAlloc {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        alloc_pages_gfp(GFP_KERNEL, 0).ok()
    }

    unsafe fn free_table(&mut self, page: PhysAddr) {
        // SAFETY: the trait's contract: no table or walk cache refers to `page` any more.
        if let Err(e) = unsafe { free_pages(page, 0) } {
            log::error!("buddy: free_table({page:#x}): {e}");
        }
    }
}

/// An owned block of `2^order` frames from the global allocator, freed when dropped.
///
/// It cannot be freed twice: freeing consumes it, and it is neither `Clone` nor `Copy`.
#[derive(Debug, PartialEq, Eq)]
pub struct Frames {
    pa: PhysAddr,
    order: u8,
}

impl Frames {
    /// Allocates a block of `2^order` frames.
    ///
    /// # Errors
    /// As [`alloc_pages`].
    ///
    /// # Example
    /// ```no_run
    /// let block = memory::buddy::Frames::alloc(2)?;        // 16 KiB, freed on drop
    /// assert_eq!(block.size(), 16 * 1024);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn alloc(order: usize) -> Result<Self, BuddyError> {
        Ok(Frames { pa: alloc_pages(order)?, order: order as u8 })
    }

    /// Allocates a block of `2^order` zeroed frames.
    ///
    /// # Errors
    /// As [`alloc_pages`].
    ///
    /// # Example
    /// ```no_run
    /// let page = memory::buddy::Frames::alloc_zeroed(0)?;
    /// # let _ = page;
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn alloc_zeroed(order: usize) -> Result<Self, BuddyError> {
        Ok(Frames { pa: alloc_zeroed_pages(order)?, order: order as u8 })
    }

    /// Physical address of the first frame.
    ///
    /// # Example
    /// ```no_run
    /// let ring = memory::buddy::Frames::alloc_zeroed(0)?;
    /// let dma = ring.phys().as_u64();                      // what the device is told
    /// # let _ = dma;
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn phys(&self) -> PhysAddr {
        self.pa
    }

    /// The block's order.
    ///
    /// # Example
    /// ```no_run
    /// let block = memory::buddy::Frames::alloc(4)?;
    /// assert_eq!(block.order(), 4);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn order(&self) -> usize {
        self.order as usize
    }

    /// Size in bytes.
    ///
    /// # Example
    /// ```no_run
    /// let block = memory::buddy::Frames::alloc(1)?;
    /// assert_eq!(block.size(), 2 * 4096);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn size(&self) -> usize {
        PAGE_SIZE << self.order
    }

    /// The block's virtual address in the linear map.
    ///
    /// # Example
    /// ```no_run
    /// let page = memory::buddy::Frames::alloc(0)?;
    /// // SAFETY: the frame is ours and mapped read-write by the linear map.
    /// unsafe { page.virt().as_mut_ptr::<u8>().write_bytes(0xff, page.size()) };
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn virt(&self) -> VirtAddr {
        // The global exists: `self` came from it.
        BUDDY.get().and_then(|g| g.linear.phys_to_virt(self.pa)).unwrap_or_default()
    }

    /// Gives up ownership without freeing; returns the physical address.
    ///
    /// # Example
    /// ```no_run
    /// use memory::buddy::Frames;
    /// let pa = Frames::alloc(0)?.into_raw();               // handed to the device, not freed
    /// // SAFETY: the device gave the frame back; we own it again.
    /// let page = unsafe { Frames::from_raw(pa, 0) };       // freed on drop
    /// # drop(page);
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub fn into_raw(self) -> PhysAddr {
        let pa = self.pa;
        core::mem::forget(self);
        pa
    }

    /// Takes ownership of a block allocated from the global allocator.
    ///
    /// # Safety
    /// `pa` must head a block of `order` allocated from the global allocator, owned by
    /// the caller and not used after the returned value drops (which frees it).
    ///
    /// # Example
    /// ```no_run
    /// use memory::buddy::Frames;
    /// let pa = Frames::alloc_zeroed(1)?.into_raw();
    /// // SAFETY: `pa` heads an order-1 block of the global allocator that only we own.
    /// let block = unsafe { Frames::from_raw(pa, 1) };
    /// drop(block);                                         // freed here
    /// # Ok::<(), memory::buddy::BuddyError>(())
    /// ```
    pub unsafe fn from_raw(pa: PhysAddr, order: usize) -> Self {
        Frames { pa, order: order as u8 }
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        // SAFETY: `self` owned the block, and ownership ends here.
        if let Err(e) = unsafe { free_pages(self.pa, self.order as usize) } {
            log::error!("buddy: dropping Frames at {:#x}: {e}", self.pa);
        }
    }
}
