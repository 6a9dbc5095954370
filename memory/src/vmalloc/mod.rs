//! # vmalloc — virtually contiguous memory with guard pages and lazy, batched TLB flushes
//!
//! ## The window
//! ```text
//!   range.start                                                              range.end
//!   │ area A (3 pages)    │G│ area B │G│   hole   │ parked C │G│      hole          │
//!   ├──┬──┬──┬──┼──┼──┼──┼──┼─ ─ ─ ─ ─┼──┼──┼──┼─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ┤
//!   G = guard page: part of the area's range, never mapped, so an overflow traps.
//!   parked = freed: PTEs cleared and frames freed at once, range kept out of the free
//!            tree until one batched TLB flush (the purge) makes it safe to reuse.
//! ```
//! Each area's range (guard included) is one record that lives in the **busy tree** (a
//! treap by address, O(1) expected rotations per update) while live, on the **parked list**
//! (Linux's purge list) once freed, and whose range returns to the **free tree** (AVL
//! augmented with the largest hole per subtree, see [`FreeSpace`]) when purged. Allocation is
//! lowest-address first fit with any power-of-two alignment in O(log n); freeing never walks
//! the areas (only error and fault paths scan the parked list: at most `lazy_max_pages / 2`
//! areas with guard pages, `lazy_max_pages` with `NO_GUARD` one-page areas).
//!
//! ## A call, as data flows
//! 1. `vmalloc(size)`: round up to pages, add a guard page (unless [`VmFlags::NO_GUARD`]).
//! 2. For an aligned request, a pooled range of that exact size and alignment if there is
//!    one; else lowest fit in
//!    the free tree; the hole is clipped (Linux's `va_clip`) and the area's
//!    record, taken from a spare pool filled *before* the lock, enters the busy tree.
//! 3. Frames from [`VmBackend::alloc_frames`] in chunks of up to 64, mapped with
//!    [`VmBackend::map_pages`]. The guard page stays unmapped. With [`VmFlags::HUGE`] an
//!    area of 2 MiB or more starts on a 2 MiB boundary and each whole 2 MiB is one block
//!    ([`VmBackend::alloc_block`], [`VmBackend::map_block`]); pages where no block is free,
//!    and for the tail.
//! 4. Any failure part-way: unmap what was mapped, free every frame and block, flush those pages,
//!    give the range back. Nothing leaks (see [`VmallocStats`]).
//! 5. `vfree(ptr)`: unmap (no TLB operation), free the frames (and blocks), park the range.
//! 6. Purge, when the parked pages pass [`VmallocConfig::lazy_max_pages`] or an allocation
//!    finds no hole: one flush for every parked range — per-page TLBIs when they cover at most
//!    [`VmallocConfig::flush_page_threshold`] mapped pages, a full flush otherwise — then the
//!    ranges of up to [`POOL_MAX_PAGES`] pages of aligned areas wait in pools of ready-made
//!    areas by size for the next aligned allocation of that size (`pool.rs`, [`VmallocConfig::pools`]); the others
//!    merge back into the free tree.
//!
//! ## Records and the lock
//! [`Vmalloc`] itself takes `&mut self`; a global instance wraps it in a lock
//! ([`LockedVmalloc`]). No method allocates from the heap while it runs **if** the spare pool
//! holds the two records an allocation may need: [`LockedVmalloc`] tops the pool up outside
//! its lock ([`Vmalloc::spares_wanted`], [`Vmalloc::add_spares`]) and frees surplus records
//! after unlocking ([`Vmalloc::take_excess_spares`]). A bare `Vmalloc` with
//! [`VmallocConfig::refill_inline`] (the default) tops up and trims itself.
//!
//! ## Exception context
//! Only [`Vmalloc::explain_fault`], [`Vmalloc::find_area`], [`Vmalloc::vmalloc_to_phys`] and
//! [`Vmalloc::is_vmalloc_addr`] take `&self` and never allocate; from an exception handler
//! call them only through [`LockedVmalloc::try_explain_fault`] (a try-lock) or a similar
//! try-lock, never through a blocking lock.
//!
//! ## Example
//! ```ignore
//! use memory::vmalloc::{Vmalloc, VmallocConfig, sim::SimBackend};
//! let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 1 << 30)?;
//! let mut vm = Vmalloc::new(SimBackend::new(range, 4096), range, VmallocConfig::default())?;
//! let p = vm.vzalloc(10_000)?;          // 3 pages + 1 guard page
//! let p = vm.vrealloc(p, 20_000)?;      // grows, contents kept
//! vm.vfree(p)?;                         // no TLB flush yet
//! println!("{}", vm.info());            // /proc/vmallocinfo
//! ```

// Declared here so this module does not depend on the crate root declaring it.
extern crate alloc;

mod backend;
mod free;
mod info;
mod kept;
mod links;
mod locked;
mod node;
mod pool;
mod purge;
mod quarantine;
pub mod sim;
mod treap;
mod tree;
pub mod vmap_block;

use core::fmt;
use core::panic::Location;

use hal::{PhysAddr, PhysRange, VirtAddr, VirtRange, PAGE_SIZE};

pub use backend::{DeviceAttr, MapError, Prot, TlbFlush, VmBackend, BLOCK_ORDER, BLOCK_PAGES, BLOCK_SIZE};
pub use free::{FreeSpace, SearchStats};
pub use info::{FaultClass, VmallocInfo};
pub use locked::LockedVmalloc;
pub use node::Spares;

use alloc::vec::Vec;
use info::{History, PurgeHistogram};
use kept::{KeptTables, OUT_SPANS};
use node::{Link, NodePtr, State};
use pool::ReadyPools;
pub use pool::{POOL_MAX_ALIGN, POOL_MAX_PAGES};
use purge::Purge;
use quarantine::Quarantine;
pub use quarantine::{UseAfterVfree, QUARANTINE_POISON};
use treap::Treap;
use tree::Tree;

const PAGE: u64 = PAGE_SIZE as u64;
/// Frames taken and mapped per backend call.
const CHUNK: usize = 64;
/// The stack buffers for small and middling areas (less to initialise on the hot path:
/// the buffer is zeroed on every call, a `memset` of 512 bytes for a whole chunk).
const SMALL_CHUNK: usize = 4;
/// See [`SMALL_CHUNK`].
const MID_CHUNK: usize = 16;
/// Upper bound of [`VmallocConfig::flush_page_threshold`] (size of the stack buffer of ranges).
pub const MAX_FLUSH_PAGE_THRESHOLD: usize = 256;
/// Records an allocation may need: the area, and the right part of a hole split in the middle.
const RECORDS_PER_CALL: usize = 2;
/// How many records [`Vmalloc`] allocates at once when it refills itself.
const REFILL_BATCH: usize = 16;
/// Spans (2 MiB-rounded, joined) a purge makes of the ranges it flushes, for
/// [`VmBackend::flush_and_free_tables`] (its one call per purge) and for [`KeptTables`].
const RECLAIM_SPANS: usize = 16;
/// Areas [`Vmalloc::reserve`] can set aside in one instance (a node per CPU but the
/// first, and vm_map_ram's region).
const MAX_RESERVED: usize = 16;
/// A placeholder for unused slots of such a batch.
const NO_SPAN: VirtRange = match VirtRange::new(VirtAddr::new(0), PAGE) {
    Ok(r) => r,
    Err(_) => panic!("one page is a range"),
};

/// What an area maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AreaKind {
    /// Frames allocated (and freed) by vmalloc.
    Vmalloc,
    /// Frames owned by the caller ([`Vmalloc::vmap`]); never freed by vmalloc.
    Vmap,
    /// A device's physical range ([`Vmalloc::ioremap`]); no frames.
    Ioremap,
    /// Address space set aside for `vm_map_ram`'s per-CPU blocks ([`Vmalloc::reserve`],
    /// [`vmap_block::VmapBlocks`]): vmalloc maps nothing there and frees nothing of it.
    VmapRam,
    /// Address space set aside for another instance (a CPU's vmalloc node, which manages
    /// it as its own window): this one maps nothing there.
    Node,
}

impl AreaKind {
    /// The word vmallocinfo prints.
    ///
    /// # Example
    /// ```no_run
    /// let p = memory::kernel::vmalloc(4096)?;
    /// let area = memory::kernel::find_area(p).unwrap();
    /// assert_eq!(area.kind.as_str(), "vmalloc");
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            AreaKind::Vmalloc => "vmalloc",
            AreaKind::Vmap => "vmap",
            AreaKind::Ioremap => "ioremap",
            AreaKind::VmapRam => "vm_map_ram",
            AreaKind::Node => "vmalloc_node",
        }
    }
}

impl fmt::Display for AreaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options for an allocation; combine with `|`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmFlags(u8);

impl VmFlags {
    /// Nothing special: one guard page, start of the area returned, contents undefined.
    pub const NONE: Self = Self(0);
    /// Zero the pages (and keep bytes past the size zero across [`Vmalloc::vrealloc`]).
    pub const ZERO: Self = Self(1);
    /// Omit the guard page (like `VM_NO_GUARD` / `vm_map_ram`).
    pub const NO_GUARD: Self = Self(2);
    /// Place the object at the end of its last page, like KFENCE, so a one-byte overflow of
    /// any size hits the guard page. The alignment argument then aligns the pointer (at most
    /// `PAGE_SIZE`); the overflow traps at once when the size is a multiple of it.
    pub const END_ALIGNED: Self = Self(4);
    /// The area belongs to an owning handle (`VBox`, `IoMem`) that hands out references into
    /// it: plain [`Vmalloc::vfree`] / [`Vmalloc::iounmap`] refuse it with
    /// [`VmallocError::Owned`], so safe code cannot pull the memory from under the handle;
    /// only the handle frees it ([`Vmalloc::vfree_owned`], [`Vmalloc::iounmap_owned`]).
    pub const OWNED: Self = Self(8);
    /// Map whole 2 MiB stretches of the area with block entries, like Linux's
    /// `vmalloc_huge`: one buddy allocation and one descriptor per 2 MiB instead of 512, and
    /// one TLB entry covering them. An area of at least [`BLOCK_SIZE`] is then aligned to
    /// it; a stretch for which no free 2 MiB block exists is mapped with pages (Linux falls
    /// back for the whole area), and so is the tail past the last whole block, so a
    /// 2 MiB + 4 KiB request takes 2 MiB + 4 KiB, not 4 MiB. The guard page stays. Smaller
    /// areas, `vmap` and `ioremap` ignore the flag; [`Vmalloc::vrealloc`] moves such an area
    /// rather than resizing it in place.
    pub const HUGE: Self = Self(16);

    /// The guard pages an area with these flags has after its pages: 1, or 0 with
    /// [`Self::NO_GUARD`] (Linux's `get_vm_area_size`). The one place the guard is decided.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// assert_eq!((VmFlags::ZERO.guard_pages(), VmFlags::NO_GUARD.guard_pages()), (1, 0));
    /// ```
    pub const fn guard_pages(self) -> usize {
        if self.contains(Self::NO_GUARD) {
            0
        } else {
            1
        }
    }

    /// Whether every flag of `other` is set.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// let flags = VmFlags::ZERO | VmFlags::END_ALIGNED;
    /// assert!(flags.contains(VmFlags::ZERO) && !flags.contains(VmFlags::NO_GUARD));
    /// ```
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// assert_eq!((VmFlags::ZERO | VmFlags::NO_GUARD).bits(), 3);
    /// ```
    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl core::ops::BitOr for VmFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Why a vmalloc call failed. Every failure leaves the allocator as it was before the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmallocError {
    /// A size of zero (or an empty frame list).
    ZeroSize,
    /// The size (with its guard page) is larger than the whole window.
    TooLarge,
    /// The alignment is not a power of two, or above `PAGE_SIZE` for an end-aligned area.
    BadAlignment,
    /// A frame or physical address is not page aligned.
    Misaligned,
    /// The address is not the pointer of a live area (interior pointers are refused).
    NotAnArea,
    /// The address is the pointer of an area already freed (parked or recently purged).
    DoubleFree,
    /// The area is not of the kind this call frees (e.g. `vfree` of a `vmap` area).
    WrongKind,
    /// No hole fits, even after a purge.
    NoVirtualSpace,
    /// The backend ran out of frames.
    NoFrames,
    /// The backend could not map.
    MapFailed(MapError),
    /// No area record could be had: the heap is out of memory (state unchanged), or inline
    /// refill is off and the spare pool is empty (top up with [`Vmalloc::add_spares`]).
    NoRecords,
    /// Ioremap of a range that touches RAM.
    RamRange,
    /// An address computation overflowed.
    Overflow,
    /// The range given to [`Vmalloc::new`] is not page aligned or is empty.
    BadRange,
    /// The global instance is used before `memory::kernel::init`.
    NotInitialized,
    /// The area belongs to an owning handle ([`VmFlags::OWNED`]): drop the handle instead.
    Owned,
    /// `vmap` of a frame that is not RAM, or that holds the kernel image.
    NotRam,
    /// A call that takes the vmalloc or kernel-table lock, made from an interrupt handler
    /// (those locks are never taken in interrupt context).
    InInterrupt,
}

impl fmt::Display for VmallocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmallocError::ZeroSize => f.write_str("size is zero"),
            VmallocError::TooLarge => f.write_str("size larger than the vmalloc range"),
            VmallocError::BadAlignment => f.write_str("alignment is not a power of two (or too large for end-aligned)"),
            VmallocError::Misaligned => f.write_str("address is not page aligned"),
            VmallocError::NotAnArea => f.write_str("not the start of a live vmalloc area"),
            VmallocError::DoubleFree => f.write_str("area already freed (double free)"),
            VmallocError::WrongKind => f.write_str("area is of another kind (vmalloc/vmap/ioremap)"),
            VmallocError::NoVirtualSpace => f.write_str("out of vmalloc space"),
            VmallocError::NoFrames => f.write_str("out of page frames"),
            VmallocError::MapFailed(e) => write!(f, "mapping failed: {e}"),
            VmallocError::NoRecords => f.write_str("no area record (out of memory)"),
            VmallocError::RamRange => f.write_str("ioremap of RAM"),
            VmallocError::Overflow => f.write_str("address arithmetic overflows"),
            VmallocError::BadRange => f.write_str("vmalloc range is empty or not page aligned"),
            VmallocError::NotInitialized => f.write_str("vmalloc used before memory::kernel::init"),
            VmallocError::Owned => f.write_str("area belongs to an owning handle (drop the handle)"),
            VmallocError::NotRam => f.write_str("vmap of a frame that is not free-standing RAM"),
            VmallocError::InInterrupt => f.write_str("called from an interrupt handler"),
        }
    }
}

impl core::error::Error for VmallocError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            VmallocError::MapFailed(e) => Some(e),
            _ => None,
        }
    }
}

/// Linux's `lazy_max_pages()` for `cpus` CPUs: 32 MiB of parked ranges times
/// `fls(cpus)` (the purge threshold grows with the CPUs whose TLBs a flush reaches, but
/// slower than their number). 8192 pages at one CPU, 16,384 at 2–3, 24,576 at 4–7.
///
/// # Example
/// ```
/// assert_eq!(memory::vmalloc::lazy_max_pages(1), 8192);
/// assert_eq!(memory::vmalloc::lazy_max_pages(4), 3 * 8192);
/// ```
pub const fn lazy_max_pages(cpus: usize) -> usize {
    let fls = (usize::BITS - cpus.leading_zeros()) as usize;
    let fls = if fls == 0 { 1 } else { fls };
    fls * ((32 << 20) / PAGE_SIZE)
}

/// Tunables (Linux's boot parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmallocConfig {
    /// Purge once more than this many pages (guard pages included, as Linux counts) are
    /// parked. Default 8192 (32 MiB), Linux's `lazy_max_pages()` on one CPU.
    pub lazy_max_pages: usize,
    /// Flush the TLB at every free instead of parking (Linux `debug_pagealloc`-like).
    pub strict: bool,
    /// A purge covering at most this many mapped pages issues one `TLBI VAALE1IS` per page;
    /// more, one `TLBI VMALLE1IS`. Default 64: a per-page TLBI costs about as much as one
    /// TLB refill after a full flush, and a kernel's working set holds far more than 64 live
    /// entries, so below 64 pages the targeted flush is cheaper (arm64 Linux switches at 512
    /// pages of *span*, `MAX_TLBI_OPS`). Clamped to [`MAX_FLUSH_PAGE_THRESHOLD`].
    pub flush_page_threshold: usize,
    /// Allocate missing spare records (and free surplus ones) inside calls. Turn off when a
    /// lock wraps the allocator; [`LockedVmalloc`] does.
    pub refill_inline: bool,
    /// Spare records always kept. After a purge up to as many as it released are kept too
    /// (at most `lazy_max_pages`: what one cycle parked and the next will park again), so a
    /// steady alloc/free workload does not churn the heap;
    /// [`Vmalloc::release_spares`] gives them back.
    pub spare_high: usize,
    /// Quarantine (`vmalloc.quarantine=1`, a debugging mode): a freed vmalloc area's frames
    /// are not given back at `vfree` but filled with [`QUARANTINE_POISON`] and held until
    /// the purge whose TLB flush kills the area's stale entries. The purge then checks the
    /// poison: a write through a stale TLB entry in between lands in a held frame (never in
    /// a frame someone else got meanwhile) and is reported ([`UseAfterVfree`], with the
    /// area, its allocating and freeing callers and the offset), then the frames are freed.
    /// Costs a page fill at `vfree` and a page scan at the purge per page, and one index
    /// frame per 255 quarantined pages; off in strict mode (which flushes at once).
    pub quarantine: bool,
    /// Keep every page-table page once made, as Linux does (`vmalloc.keep_tables=1`): no
    /// purge, failed allocation or shrink gives tables back. Off by default; for comparing
    /// the cost of giving them back.
    pub keep_tables: bool,
    /// Pools of ready-made areas (on by default, after Linux 6.9's `vmap_node` pools): a
    /// lazy purge keeps the flushed ranges of up to 256 pages of areas aligned beyond a
    /// page by size, and the next such request of a size takes one without searching the
    /// free tree (`docs/ARCHITECTURE.md`, "Pools of ready-made areas").
    pub pools: bool,
}

impl Default for VmallocConfig {
    fn default() -> Self {
        Self {
            lazy_max_pages: 8192,
            pools: true,
            strict: false,
            flush_page_threshold: 64,
            refill_inline: true,
            spare_high: 64,
            quarantine: false,
            keep_tables: false,
        }
    }
}

/// A live area, as [`Vmalloc::find_area`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AreaInfo {
    /// First byte of the area's range.
    pub start: VirtAddr,
    /// First byte past the range, guard page included.
    pub end: VirtAddr,
    /// `end - start`, as vmallocinfo prints it.
    pub size: u64,
    /// The pointer handed out (`start` plus the end-aligned or ioremap offset).
    pub addr: VirtAddr,
    /// Bytes requested.
    pub bytes: usize,
    /// Pages mapped from `start`.
    pub pages: usize,
    /// What the area maps.
    pub kind: AreaKind,
    /// Who created it.
    pub caller: &'static Location<'static>,
    /// Ioremap: the page-aligned physical base.
    pub phys: Option<PhysAddr>,
    /// Whether a guard page follows the area.
    pub guard: bool,
}

/// Counters. Every count of things held goes back to its baseline when everything is freed
/// and purged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmallocStats {
    /// Live areas.
    pub live_areas: usize,
    /// Pages mapped by live areas (all kinds).
    pub mapped_pages: usize,
    /// Frames held by live vmalloc areas.
    pub owned_frames: usize,
    /// Parked (freed, not yet flushed) areas.
    pub parked_areas: usize,
    /// Pages of parked ranges, guard pages included (compared with `lazy_max_pages`).
    pub parked_pages: usize,
    /// Pages of parked ranges that were mapped (what the purge must flush).
    pub parked_mapped_pages: usize,
    /// Flushed ranges kept in the pools of ready-made areas ([`VmallocConfig::pools`]).
    pub pooled_areas: usize,
    /// Pages of those ranges, guard pages included.
    pub pooled_pages: usize,
    /// Holes in the free tree.
    pub free_holes: usize,
    /// Largest hole, in bytes.
    pub largest_hole: u64,
    /// Area records on the heap (in trees, parked, or spare).
    pub records: usize,
    /// Spare records.
    pub spare_records: usize,
    /// Purges done.
    pub purges: u64,
    /// Per-page TLB invalidations issued.
    pub tlb_page_ops: u64,
    /// Batches of per-page invalidations (each ends with one barrier pair).
    pub tlb_page_batches: u64,
    /// Full TLB flushes.
    pub tlb_full_flushes: u64,
    /// Calls that failed.
    pub failures: u64,
    /// Frames taken from the backend for areas, ever (the quarantine's index frames not
    /// included).
    pub frames_taken: u64,
    /// Frames of areas given back to the backend, ever.
    pub frames_returned: u64,
    /// Pages mapped, ever (all kinds, growth by `vrealloc` included).
    pub pages_mapped: u64,
    /// Longest purge, in backend clock nanoseconds.
    pub purge_ns_max: u64,
    /// 99th percentile of purge times (bucket upper bound, within 12.5 %).
    pub purge_ns_p99: u64,
    /// 2 MiB blocks mapped by live [`VmFlags::HUGE`] areas (counted in `mapped_pages` and
    /// `owned_frames` as 512 pages each).
    pub huge_blocks: usize,
    /// 2 MiB stretches of huge areas mapped with pages because no block was available, ever.
    pub huge_fallbacks: u64,
    /// Page-table pages of the window given back because they mapped nothing any more
    /// (purges, failed allocations, strict mode, shrinks; [`VmBackend::free_empty_tables`]),
    /// ever.
    pub tables_freed: u64,
    /// Frames of freed areas held in quarantine until the purge ([`VmallocConfig::quarantine`];
    /// a 2 MiB block counts 512), index frames included.
    pub quarantined_frames: usize,
    /// Quarantined pages found written after `vfree` (poison changed), ever.
    pub quarantine_hits: u64,
    /// Areas freed at once instead of quarantined because no index frame could be had, ever.
    pub quarantine_bypassed: u64,
}

impl VmallocStats {
    /// Adds `o`'s counters to these (several instances seen as one: the kernel's global
    /// instance and its per-CPU nodes); the largest hole and the purge times are maxima.
    pub fn merge(&mut self, o: &Self) {
        self.live_areas += o.live_areas;
        self.mapped_pages += o.mapped_pages;
        self.owned_frames += o.owned_frames;
        self.parked_areas += o.parked_areas;
        self.parked_pages += o.parked_pages;
        self.parked_mapped_pages += o.parked_mapped_pages;
        self.pooled_areas += o.pooled_areas;
        self.pooled_pages += o.pooled_pages;
        self.free_holes += o.free_holes;
        self.largest_hole = self.largest_hole.max(o.largest_hole);
        self.records += o.records;
        self.spare_records += o.spare_records;
        self.purges += o.purges;
        self.tlb_page_ops += o.tlb_page_ops;
        self.tlb_page_batches += o.tlb_page_batches;
        self.tlb_full_flushes += o.tlb_full_flushes;
        self.failures += o.failures;
        self.frames_taken += o.frames_taken;
        self.frames_returned += o.frames_returned;
        self.pages_mapped += o.pages_mapped;
        self.purge_ns_max = self.purge_ns_max.max(o.purge_ns_max);
        self.purge_ns_p99 = self.purge_ns_p99.max(o.purge_ns_p99);
        self.huge_blocks += o.huge_blocks;
        self.huge_fallbacks += o.huge_fallbacks;
        self.tables_freed += o.tables_freed;
        self.quarantined_frames += o.quarantined_frames;
        self.quarantine_hits += o.quarantine_hits;
        self.quarantine_bypassed += o.quarantine_bypassed;
    }
}

#[derive(Default)]
struct Counters {
    live_areas: usize,
    mapped_pages: usize,
    owned_frames: usize,
    parked_areas: usize,
    parked_pages: usize,
    parked_mapped: usize,
    purges: u64,
    tlb_page_ops: u64,
    tlb_page_batches: u64,
    tlb_full: u64,
    failures: u64,
    frames_taken: u64,
    frames_returned: u64,
    pages_mapped: u64,
    huge_blocks: usize,
    huge_fallbacks: u64,
    tables_freed: u64,
    quarantined: usize,
    quarantine_hits: u64,
    quarantine_bypassed: u64,
}

/// A vmalloc allocator over one window of virtual addresses.
///
/// Not `Sync` (one core at a time; share it behind a lock):
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<memory::vmalloc::Vmalloc<memory::vmalloc::sim::SimBackend>>();
/// ```
pub struct Vmalloc<B: VmBackend> {
    backend: B,
    range: VirtRange,
    start: u64,
    end: u64,
    free: FreeSpace,
    /// Live areas, except `pending`.
    busy: Treap,
    /// The area allocated last, live, not yet in `busy`: it goes in when the next area is
    /// allocated, so the common alloc-use-free pattern never touches the busy tree. Every
    /// query over live areas looks here too.
    pending: Link,
    parked_head: Link,
    config: VmallocConfig,
    c: Counters,
    /// Spare records to keep: `spare_high`, or as many as the last purge released (capped),
    /// since the same workload will need them again before the next purge.
    spare_keep: usize,
    purge_hist: PurgeHistogram,
    history: History,
    /// Frames of freed areas held until the purge ([`VmallocConfig::quarantine`]).
    q: Quarantine,
    /// The areas set aside with [`Vmalloc::reserve`] (another instance's window,
    /// vm_map_ram's region): no purge span of this instance may take them in.
    reserved: [Option<(u64, u64)>; MAX_RESERVED],
    /// Reports of the purge under way (the log is rate-limited).
    q_reported: usize,
    last_use_after_vfree: Option<UseAfterVfree>,
    /// The spans whose empty tables the last automatic purge kept (`kept.rs`).
    kept: KeptTables,
    /// Flushed ranges kept by size for the next allocations (`pool.rs`).
    pools: ReadyPools,
}

// SAFETY: the allocator owns its records exclusively (see `node`'s ownership invariant): no
// pointer to them leaves it, so moving it to another core moves every record with it, and
// their `Cell`s are then touched by that core alone. `Vmalloc` is not `Sync` (its records
// are `Cell`s behind `NodePtr`s, which are neither `Send` nor `Sync`): cores share one
// through `LockedVmalloc`'s spin lock, whose acquire/release orders one holder's `Cell`
// writes before the next holder's reads. `B: Send` moves the backend along.
unsafe impl<B: VmBackend + Send> Send for Vmalloc<B> {}

impl<B: VmBackend> Vmalloc<B> {
    /// An allocator handing out addresses of `range` (page aligned), with `backend`.
    ///
    /// # Errors
    /// [`VmallocError::BadRange`] when the range is not page aligned, empty or starts at
    /// address 0 (NULL is never an area);
    /// [`VmallocError::NoRecords`] when the heap has no record for the first hole (or, with
    /// [`VmallocConfig::refill_inline`], for the first batch of spares).
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// // A private instance over a 16 MiB window; on target the backend is the kernel's.
    /// let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vzalloc(10_000)?;                         // 3 pages + 1 guard page
    /// vm.vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn new(backend: B, range: VirtRange, config: VmallocConfig) -> Result<Self, VmallocError> {
        if !range.is_page_aligned() {
            return Err(VmallocError::BadRange);
        }
        let (start, end) = (range.start().as_u64(), range.end().as_u64());
        // Address 0 is NULL: never handed out, so that freeing NULL can be a no-op.
        if start >= end || start == 0 {
            return Err(VmallocError::BadRange);
        }
        let free = FreeSpace::new(start, end).ok_or(VmallocError::NoRecords)?;
        let mut config = config;
        config.flush_page_threshold = config.flush_page_threshold.min(MAX_FLUSH_PAGE_THRESHOLD);
        let mut v = Self {
            backend,
            range,
            start,
            end,
            free,
            busy: Treap::new(),
            pending: None,
            parked_head: None,
            config,
            c: Counters::default(),
            spare_keep: config.spare_high,
            purge_hist: PurgeHistogram::new(),
            history: History::new(),
            q: Quarantine::EMPTY,
            reserved: [None; MAX_RESERVED],
            q_reported: 0,
            last_use_after_vfree: None,
            kept: KeptTables::new(),
            pools: ReadyPools::new(),
        };
        if v.config.refill_inline && !v.free.pool.fill_to(REFILL_BATCH) {
            return Err(VmallocError::NoRecords);
        }
        Ok(v)
    }

    /// The backend.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// log::debug!("{} frames left", vm.backend().free_frames_count());
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    ///
    /// # Safety
    /// Calls through it bypass the allocator: the caller must not break the [`VmBackend`]
    /// contract the allocator relies on — free, unmap, zero or copy only what no live or
    /// parked area of this instance uses. (A real backend writes memory and page tables.)
    /// [`Vmalloc::sim_mut`] is the safe accessor for the simulated backend of tests.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// // SAFETY: only reads a counter of the backend.
    /// let left = unsafe { vm.backend_mut() }.free_frames_count();
    /// # let _ = left;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub unsafe fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The window.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// log::info!("vmalloc window {:#x}..{:#x}", vm.range().start(), vm.range().end());
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn range(&self) -> VirtRange {
        self.range
    }

    /// The configuration in force.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// assert_eq!(vm.config().lazy_max_pages, 8192);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn config(&self) -> &VmallocConfig {
        &self.config
    }

    /// Set the purge threshold (Linux's `lazy_max_pages`); purges at once if already past it.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.set_lazy_max_pages(1024);                         // purge after 4 MiB of parked ranges
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn set_lazy_max_pages(&mut self, pages: usize) {
        self.config.lazy_max_pages = pages;
        if self.c.parked_pages > pages {
            self.purge();
        }
    }

    /// Switch strict mode (flush at every free); turning it on purges what is parked.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.set_strict(true);                                 // debugging a use after vfree
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn set_strict(&mut self, strict: bool) {
        self.config.strict = strict;
        if strict {
            self.purge();
        }
    }

    /// Switch the pools of ready-made areas ([`VmallocConfig::pools`]); turning them off
    /// gives every pooled range back to the free tree.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.set_pools(false);                                 // pure lowest fit from here on
    /// assert_eq!(vm.stats().pooled_areas, 0);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn set_pools(&mut self, on: bool) {
        self.config.pools = on;
        if !on {
            self.unpool_all();
        }
    }

    /// Gives every pooled range back to the free tree (flushed ranges: as free as holes).
    fn unpool_all(&mut self) {
        let free = &mut self.free;
        self.pools.drain(|n| free.give_back(n));
    }

    /// Set the per-page/full flush threshold (clamped to [`MAX_FLUSH_PAGE_THRESHOLD`]).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.set_flush_page_threshold(16);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn set_flush_page_threshold(&mut self, pages: usize) {
        self.config.flush_page_threshold = pages.min(MAX_FLUSH_PAGE_THRESHOLD);
    }

    /// Whether `addr` lies in the vmalloc window.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(4096)?;
    /// assert!(vm.is_vmalloc_addr(p));
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[inline]
    pub fn is_vmalloc_addr(&self, addr: VirtAddr) -> bool {
        (self.start..self.end).contains(&addr.as_u64())
    }

    // ----- records -----

    /// How many spare records must be added before the next call can run without
    /// allocating (0 when enough are there).
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::Spares;
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// // Outside any lock: allocate the records the next call needs, then hand them over.
    /// let spares = Spares::new(vm.spares_wanted())?;
    /// vm.add_spares(spares);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[inline]
    pub fn spares_wanted(&self) -> usize {
        RECORDS_PER_CALL.saturating_sub(self.free.pool.len())
    }

    /// Hand over records allocated outside the lock.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.add_spares(memory::vmalloc::Spares::new(16)?);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn add_spares(&mut self, mut spares: Spares) {
        self.free.pool.absorb(&mut spares.pool);
    }

    /// Take the spare records beyond what the allocator keeps (see
    /// [`VmallocConfig::spare_high`]), to be dropped after unlocking.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let excess = vm.take_excess_spares();
    /// drop(excess);                                        // after unlocking, in a locked wrapper
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn take_excess_spares(&mut self) -> Spares {
        let mut out = Spares::empty();
        if self.free.pool.len() > self.spare_keep {
            self.free.pool.split_excess(self.spare_keep, &mut out.pool);
        }
        out
    }

    /// Take every spare record beyond [`VmallocConfig::spare_high`] (memory pressure), to be
    /// dropped after unlocking.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let spares = vm.release_spares();                    // under memory pressure
    /// log::info!("vmalloc: {} spare records released", spares.len());
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn release_spares(&mut self) -> Spares {
        self.spare_keep = self.config.spare_high;
        self.take_excess_spares()
    }

    /// Count a call that failed before it reached the allocator (a wrapper's refill).
    pub(crate) fn count_failure(&mut self) {
        self.c.failures += 1;
    }

    #[inline]
    fn ensure_records(&mut self) -> Result<(), VmallocError> {
        if self.free.pool.len() >= RECORDS_PER_CALL {
            return Ok(());
        }
        // Out of memory: a short batch is enough if it covers this call; otherwise the
        // records taken are given back and nothing has changed.
        let had = self.free.pool.len();
        if self.config.refill_inline
            && (self.free.pool.fill_to(REFILL_BATCH) || self.free.pool.len() >= RECORDS_PER_CALL)
        {
            return Ok(());
        }
        self.free.pool.trim(had);
        Err(VmallocError::NoRecords)
    }

    // ----- allocation -----

    /// Allocate `size` bytes of virtually contiguous, page-backed memory.
    ///
    /// # Errors
    /// [`VmallocError::ZeroSize`], [`VmallocError::TooLarge`],
    /// [`VmallocError::NoVirtualSpace`], [`VmallocError::NoFrames`],
    /// [`VmallocError::MapFailed`], [`VmallocError::NoRecords`].
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let table = vm.vmalloc(1 << 20)?;                    // 256 pages + a guard page
    /// vm.vfree(table)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vmalloc(&mut self, size: usize) -> Result<VirtAddr, VmallocError> {
        self.vmalloc_with(size, PAGE_SIZE, VmFlags::NONE)
    }

    /// As [`Self::vmalloc`], the memory zeroed.
    ///
    /// # Errors
    /// As [`Self::vmalloc`].
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let ring = vm.vzalloc(64 * 1024)?;
    /// # let _ = ring;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vzalloc(&mut self, size: usize) -> Result<VirtAddr, VmallocError> {
        self.vmalloc_with(size, PAGE_SIZE, VmFlags::ZERO)
    }

    /// As [`Self::vmalloc`], the area aligned to `align` (a power of two; below a page
    /// means a page).
    ///
    /// # Errors
    /// As [`Self::vmalloc`], and [`VmallocError::BadAlignment`].
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let buf = vm.vmalloc_aligned(5 * 4096, 64 * 1024)?;
    /// assert_eq!(buf.as_u64() % (64 * 1024), 0);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vmalloc_aligned(&mut self, size: usize, align: usize) -> Result<VirtAddr, VmallocError> {
        self.vmalloc_with(size, align, VmFlags::NONE)
    }

    /// The general allocation call: `size` bytes, `align` (power of two), `flags`.
    ///
    /// # Errors
    /// As [`Self::vmalloc_aligned`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let obj = vm.vmalloc_with(100, 8, VmFlags::END_ALIGNED | VmFlags::ZERO)?; // one byte past traps
    /// # let _ = obj;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vmalloc_with(&mut self, size: usize, align: usize, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
        let caller = Location::caller();
        let r = self.vmalloc_inner(size, align, flags, caller);
        if r.is_err() {
            self.c.failures += 1;
        }
        r.map(|n| self.pointer(n))
    }

    #[inline]
    fn pointer(&self, n: NodePtr) -> VirtAddr {
        let nd = n.get();
        VirtAddr::new(nd.start.get() + u64::from(nd.offset.get()))
    }

    // Inlined into `vmalloc_with`, the allocation fast path (as it was before huge areas made
    // the body larger): a call here costs a few percent of a 1-page vmalloc under QEMU.
    #[inline(always)]
    fn vmalloc_inner(
        &mut self,
        size: usize,
        align: usize,
        flags: VmFlags,
        caller: &'static Location<'static>,
    ) -> Result<NodePtr, VmallocError> {
        if size == 0 {
            return Err(VmallocError::ZeroSize);
        }
        if !align.is_power_of_two() || (flags.contains(VmFlags::END_ALIGNED) && align > PAGE_SIZE) {
            return Err(VmallocError::BadAlignment);
        }
        let pages = size.div_ceil(PAGE_SIZE);
        let huge = flags.contains(VmFlags::HUGE) && pages >= BLOCK_PAGES;
        let area_align = align.max(if huge { BLOCK_SIZE } else { PAGE_SIZE }) as u64;
        let node = self.alloc_area(pages, area_align, flags, caller)?;
        let nd = node.get();
        nd.kind.set(AreaKind::Vmalloc);
        nd.bytes.set(size);
        nd.align_shift.set(align.trailing_zeros() as u8);
        if flags.contains(VmFlags::END_ALIGNED) {
            let off = ((pages * PAGE_SIZE - size) & !(align - 1)) as u32;
            nd.offset.set(off);
        }
        let start = nd.start.get();
        let zero = flags.contains(VmFlags::ZERO);
        let populated = if huge { self.populate_huge(start, pages, zero) } else { self.populate(start, pages, zero) };
        if let Err(e) = populated {
            self.abort_area(node);
            return Err(e);
        }
        nd.pages.set(pages);
        self.c.live_areas += 1;
        self.c.mapped_pages += pages;
        self.c.pages_mapped += pages as u64;
        self.c.owned_frames += pages;
        Ok(node)
    }

    /// Find, clip and record a range of `pages` (+ guard) at `align`; purges and retries
    /// once when nothing fits. The record is in the busy tree, with nothing mapped.
    fn alloc_area(
        &mut self,
        pages: usize,
        align: u64,
        flags: VmFlags,
        caller: &'static Location<'static>,
    ) -> Result<NodePtr, VmallocError> {
        let total = (pages as u64)
            .checked_add(flags.guard_pages() as u64)
            .and_then(|p| p.checked_mul(PAGE))
            .ok_or(VmallocError::TooLarge)?;
        if total > self.end - self.start {
            return Err(VmallocError::TooLarge);
        }
        let node = match self.pools.take(total, align) {
            Some(n) => n,
            None => self.alloc_from_free(total, align)?,
        };
        let nd = node.get();
        nd.state.set(State::Busy);
        nd.flags.set(flags.bits());
        nd.offset.set(0);
        nd.pages.set(0);
        nd.phys.set(0);
        nd.caller.set(caller);
        nd.freer.set(None);
        nd.next.set(None);
        if let Some(p) = self.pending.replace(node) {
            self.busy.insert(p);
        }
        Ok(node)
    }

    /// A range of `total` bytes at `align` clipped from the lowest fitting hole; when none
    /// fits, purges (pools included) and retries once.
    fn alloc_from_free(&mut self, total: u64, align: u64) -> Result<NodePtr, VmallocError> {
        self.ensure_records()?;
        let found = match self.free.lowest_fit(total, align) {
            Some(f) => Some(f),
            None if self.parked_head.is_some() || self.pools.ranges() > 0 => {
                self.purge_with(Purge::NoHole);
                self.free.lowest_fit(total, align)
            }
            None => None,
        };
        let (hole, at) = found.ok_or(VmallocError::NoVirtualSpace)?;
        self.free.clip(hole, at, total).ok_or(VmallocError::NoRecords)
    }

    /// Undo [`Self::alloc_area`] for an area with nothing mapped (or mapped and flushed).
    fn abort_area(&mut self, node: NodePtr) {
        self.unlink_live(node);
        self.free.give_back(node);
    }

    /// Take and map frames for `pages` pages from `va`. On error nothing stays mapped or
    /// taken, and pages that were mapped have been flushed.
    #[inline]
    fn populate(&mut self, va: u64, pages: usize, zero: bool) -> Result<(), VmallocError> {
        if pages <= SMALL_CHUNK {
            self.populate_with::<SMALL_CHUNK>(va, pages, zero)
        } else if pages <= MID_CHUNK {
            self.populate_with::<MID_CHUNK>(va, pages, zero)
        } else {
            self.populate_with::<CHUNK>(va, pages, zero)
        }
    }

    fn populate_with<const N: usize>(&mut self, va: u64, pages: usize, zero: bool) -> Result<(), VmallocError> {
        let mut buf = [PhysAddr::new(0); N];
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(N);
            let frames = &mut buf[..n];
            let got = self.backend.alloc_frames(frames);
            self.c.frames_taken += got as u64;
            let err = if got < n {
                Some(VmallocError::NoFrames)
            } else {
                if zero {
                    self.backend.zero_frames(frames);
                }
                let at = VirtAddr::new(va + (done * PAGE_SIZE) as u64);
                self.backend.map_pages(at, frames, Prot::ReadWrite).err().map(VmallocError::MapFailed)
            };
            if let Some(e) = err {
                self.backend.free_frames(&buf[..got]);
                self.c.frames_returned += got as u64;
                if done > 0 {
                    self.unmap_free(va, done);
                    // The tables this allocation made go back at once, not at a purge.
                    self.flush_reclaim(va, done, va, va + (done * PAGE_SIZE) as u64);
                }
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }

    /// As [`Self::populate`] for a [`VmFlags::HUGE`] area starting at a block boundary:
    /// each whole 2 MiB stretch gets a block (pages when there is none), the tail pages.
    /// Kept out of line, like [`Self::unmap_free_huge`], so the common path stays as small.
    #[inline(never)]
    fn populate_huge(&mut self, va: u64, pages: usize, zero: bool) -> Result<(), VmallocError> {
        let mut done = 0usize;
        while done < pages {
            let at = va + (done * PAGE_SIZE) as u64;
            let n = (pages - done).min(BLOCK_PAGES);
            if n == BLOCK_PAGES {
                if let Some(pa) = self.backend.alloc_block() {
                    self.c.frames_taken += BLOCK_PAGES as u64;
                    if zero {
                        self.backend.zero_block(pa);
                    }
                    if self.backend.map_block(VirtAddr::new(at), pa).is_ok() {
                        self.c.huge_blocks += 1;
                        done += n;
                        continue;
                    }
                    self.backend.free_block(pa);
                    self.c.frames_returned += BLOCK_PAGES as u64;
                }
                self.c.huge_fallbacks += 1;
            }
            if let Err(e) = self.populate(at, n, zero) {
                if done > 0 {
                    self.unmap_free_huge(va, done, false);
                    self.flush_reclaim(va, done, va, va + (done * PAGE_SIZE) as u64);
                }
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }

    /// As [`Self::unmap_free`] for a [`VmFlags::HUGE`] area (starting at a block boundary):
    /// its whole 2 MiB stretches may be blocks. With `quarantine` the frames and blocks are
    /// poisoned and held until the purge instead of freed.
    #[inline(never)]
    fn unmap_free_huge(&mut self, va: u64, pages: usize, quarantine: bool) {
        let mut done = 0usize;
        while done < pages {
            let at = va + (done * PAGE_SIZE) as u64;
            let n = (pages - done).min(BLOCK_PAGES);
            if n == BLOCK_PAGES && at.is_multiple_of(BLOCK_SIZE as u64) {
                if let Some(pa) = self.backend.unmap_block(VirtAddr::new(at)) {
                    self.c.huge_blocks -= 1;
                    if !(quarantine && self.quarantine_block(at, pa)) {
                        self.backend.free_block(pa);
                        self.c.frames_returned += BLOCK_PAGES as u64;
                    }
                    done += n;
                    continue;
                }
            }
            self.unmap_free_with_q(at, n, quarantine);
            done += n;
        }
    }

    /// Unmap `pages` from `va` (no TLB operation) and give their frames back.
    #[inline]
    fn unmap_free(&mut self, va: u64, pages: usize) {
        self.unmap_free_with_q(va, pages, false);
    }

    /// [`Self::unmap_free`], or with `quarantine` poison the frames and hold them until the
    /// purge.
    #[inline]
    fn unmap_free_with_q(&mut self, va: u64, pages: usize, quarantine: bool) {
        if pages <= SMALL_CHUNK {
            self.unmap_free_with::<SMALL_CHUNK>(va, pages, quarantine);
        } else if pages <= MID_CHUNK {
            self.unmap_free_with::<MID_CHUNK>(va, pages, quarantine);
        } else {
            self.unmap_free_with::<CHUNK>(va, pages, quarantine);
        }
    }

    fn unmap_free_with<const N: usize>(&mut self, va: u64, pages: usize, quarantine: bool) {
        let mut buf = [PhysAddr::new(0); N];
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(N);
            let mut k = 0usize;
            let at = VirtAddr::new(va + (done * PAGE_SIZE) as u64);
            self.backend.unmap_pages(at, n, |pa| {
                if let Some(slot) = buf.get_mut(k) {
                    *slot = pa;
                    k += 1;
                }
            });
            let held = if quarantine { self.quarantine_frames(at.as_u64(), &buf[..k]) } else { 0 };
            let rest = buf.get(held..k).unwrap_or(&[]);
            self.backend.free_frames(rest);
            self.c.frames_returned += rest.len() as u64;
            done += n;
        }
    }

    /// Map caller-owned `frames` contiguously (read-write), with a guard page.
    ///
    /// # Errors
    /// [`VmallocError::ZeroSize`] for no frames, [`VmallocError::Misaligned`],
    /// [`VmallocError::NotRam`] for a frame the backend refuses
    /// ([`VmBackend::check_vmap_frames`]: the kernel's refuses all but RAM outside the
    /// image, reserved memory and the device tree), and as [`Self::vmalloc`] (never
    /// [`VmallocError::NoFrames`]).
    ///
    /// # Safety
    /// The frames must be the caller's (allocated to it, e.g. [`Frames`](crate::buddy::Frames),
    /// not free in the buddy allocator nor another owner's) and stay so until the area is
    /// unmapped: the area is a second way to reach them, and anyone else's use of them through
    /// it, or theirs of the frames after they are freed, is a data race or a use after free.
    /// The allocator checks what it can (RAM, not the image, reserved memory or the device
    /// tree: [`VmallocError::NotRam`]), not who owns a frame.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{Prot, VmBackend};
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// // Two frames the driver owns (here from the simulated MMU), seen as one 8 KiB window.
    /// let mut frames = [hal::PhysAddr::new(0); 2];
    /// assert_eq!(vm.sim_mut().alloc_frames(&mut frames), 2);
    /// // SAFETY: the frames are ours (simulated) and outlive the mapping.
    /// let va = unsafe { vm.vmap(&frames, Prot::ReadWrite) }?;
    /// vm.vunmap(va)?;                                      // the frames stay ours
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub unsafe fn vmap(&mut self, frames: &[PhysAddr], prot: Prot) -> Result<VirtAddr, VmallocError> {
        // SAFETY: forwarded to our caller.
        unsafe { self.vmap_with(frames, prot, VmFlags::NONE) }
    }

    /// [`Self::vmap`] with flags ([`VmFlags::NO_GUARD`] for `vm_map_ram`-style mappings;
    /// other flags are ignored).
    ///
    /// # Errors
    /// As [`Self::vmap`].
    ///
    /// # Safety
    /// As [`Self::vmap`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{Prot, VmBackend, VmFlags};
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let mut frames = [hal::PhysAddr::new(0); 4];
    /// vm.sim_mut().alloc_frames(&mut frames);
    /// // SAFETY: the frames are ours (simulated) and outlive the mapping.
    /// let va = unsafe { vm.vmap_with(&frames, Prot::ReadOnly, VmFlags::NO_GUARD) }?; // vm_map_ram style
    /// vm.vunmap(va)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub unsafe fn vmap_with(
        &mut self,
        frames: &[PhysAddr],
        prot: Prot,
        flags: VmFlags,
    ) -> Result<VirtAddr, VmallocError> {
        let caller = Location::caller();
        let r = self.vmap_inner(frames, prot, flags, caller);
        if r.is_err() {
            self.c.failures += 1;
        }
        r.map(|n| self.pointer(n))
    }

    fn vmap_inner(
        &mut self,
        frames: &[PhysAddr],
        prot: Prot,
        flags: VmFlags,
        caller: &'static Location<'static>,
    ) -> Result<NodePtr, VmallocError> {
        if frames.is_empty() {
            return Err(VmallocError::ZeroSize);
        }
        if frames.iter().any(|f| !f.is_page_aligned()) {
            return Err(VmallocError::Misaligned);
        }
        // Here, not in a wrapper: every vmap path goes through it.
        self.backend.check_vmap_frames(frames)?;
        let flags = VmFlags(flags.0 & VmFlags::NO_GUARD.0);
        let node = self.alloc_area(frames.len(), PAGE, flags, caller)?;
        let nd = node.get();
        if let Err(e) = self.backend.map_pages(VirtAddr::new(nd.start.get()), frames, prot) {
            self.abort_area(node);
            return Err(VmallocError::MapFailed(e));
        }
        nd.kind.set(AreaKind::Vmap);
        nd.pages.set(frames.len());
        nd.bytes.set(frames.len() * PAGE_SIZE);
        nd.align_shift.set(PAGE_SIZE.trailing_zeros() as u8);
        self.c.live_areas += 1;
        self.c.mapped_pages += frames.len();
        self.c.pages_mapped += frames.len() as u64;
        Ok(node)
    }

    /// Map the device range `[phys, phys + size)` with `attr`; returns the address of
    /// `phys` (the sub-page offset kept: `ioremap(0x0900_0004, 4)` gives `base + 4`).
    ///
    /// # Errors
    /// [`VmallocError::ZeroSize`], [`VmallocError::Overflow`], [`VmallocError::RamRange`]
    /// when any page is RAM, and as [`Self::vmalloc`] (never [`VmallocError::NoFrames`]).
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::DeviceAttr;
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let fr = vm.ioremap(hal::PhysAddr::new(0x0900_0018), 4, DeviceAttr::DeviceNGnRE)?;
    /// assert_eq!(fr.as_u64() % 4096, 0x18);                // PL011 UARTFR: the offset is kept
    /// vm.iounmap(fr)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn ioremap(&mut self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, VmallocError> {
        self.ioremap_with(phys, size, attr, VmFlags::NONE)
    }

    /// [`Self::ioremap`] with flags: [`VmFlags::OWNED`] (for a handle) and
    /// [`VmFlags::NO_GUARD`] are honoured, the others ignored.
    ///
    /// # Errors
    /// As [`Self::ioremap`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{DeviceAttr, VmFlags};
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let uart = hal::PhysAddr::new(0x0900_0000);
    /// let regs = vm.ioremap_with(uart, 0x1000, DeviceAttr::DeviceNGnRE, VmFlags::NO_GUARD)?;
    /// vm.iounmap(regs)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn ioremap_with(
        &mut self,
        phys: PhysAddr,
        size: usize,
        attr: DeviceAttr,
        flags: VmFlags,
    ) -> Result<VirtAddr, VmallocError> {
        let caller = Location::caller();
        let flags = VmFlags(flags.0 & (VmFlags::OWNED.0 | VmFlags::NO_GUARD.0));
        let r = self.ioremap_inner(phys, size, attr, flags, caller);
        if r.is_err() {
            self.c.failures += 1;
        }
        r.map(|n| self.pointer(n))
    }

    fn ioremap_inner(
        &mut self,
        phys: PhysAddr,
        size: usize,
        attr: DeviceAttr,
        flags: VmFlags,
        caller: &'static Location<'static>,
    ) -> Result<NodePtr, VmallocError> {
        if size == 0 {
            return Err(VmallocError::ZeroSize);
        }
        let range = PhysRange::covering_pages(phys, size as u64).map_err(|_| VmallocError::Overflow)?;
        let pages = usize::try_from(range.pages()).map_err(|_| VmallocError::TooLarge)?;
        if self.backend.phys_is_ram(range.start(), pages) {
            return Err(VmallocError::RamRange);
        }
        // Where the physical range is aligned to a block it covers, so is the virtual one:
        // the backend can then map 1 GiB / 2 MiB blocks (a large ioremap costs a few table
        // pages, not one per 2 MiB).
        let pa = range.start().as_u64();
        let align = [1 << 30, BLOCK_SIZE as u64]
            .into_iter()
            .find(|&b| range.size() >= b && pa.is_multiple_of(b))
            .unwrap_or(PAGE);
        let node = self.alloc_area(pages, align, flags, caller)?;
        let nd = node.get();
        if let Err(e) = self.backend.map_device(VirtAddr::new(nd.start.get()), range.start(), pages, attr) {
            self.abort_area(node);
            return Err(VmallocError::MapFailed(e));
        }
        nd.kind.set(AreaKind::Ioremap);
        nd.pages.set(pages);
        nd.bytes.set(size);
        nd.phys.set(range.start().as_u64());
        nd.offset.set(phys.page_offset() as u32);
        nd.align_shift.set(PAGE_SIZE.trailing_zeros() as u8);
        self.c.live_areas += 1;
        self.c.mapped_pages += pages;
        self.c.pages_mapped += pages as u64;
        Ok(node)
    }

    /// Set aside `pages` pages of address space aligned to `align` (a power of two, at
    /// least a page), with no guard page and nothing mapped: an area of kind
    /// [`AreaKind::VmapRam`] that `vfree`, `vunmap` and `iounmap` refuse, which its owner
    /// maps and unmaps itself (`vm_map_ram`'s blocks, [`vmap_block::VmapBlocks`]). It stays for the
    /// instance's life and shows in vmallocinfo as one `vm_map_ram` line.
    ///
    /// # Errors
    /// [`VmallocError::ZeroSize`], [`VmallocError::BadAlignment`], and as [`Self::vmalloc`]
    /// (never [`VmallocError::NoFrames`]); the state is unchanged.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig, VmallocError};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 64 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let region = vm.reserve(2048, 4 << 20)?;               // 8 MiB, 4 MiB aligned
    /// assert_eq!(vm.vfree(region), Err(VmallocError::WrongKind));
    /// # Ok::<(), VmallocError>(())
    /// ```
    #[track_caller]
    pub fn reserve(&mut self, pages: usize, align: usize) -> Result<VirtAddr, VmallocError> {
        self.reserve_as(pages, align, AreaKind::VmapRam)
    }

    /// [`Self::reserve`] with the kind the area is listed as: [`AreaKind::VmapRam`] or
    /// [`AreaKind::Node`] (any other kind is taken as `VmapRam`).
    ///
    /// # Errors
    /// As [`Self::reserve`].
    #[track_caller]
    pub fn reserve_as(&mut self, pages: usize, align: usize, kind: AreaKind) -> Result<VirtAddr, VmallocError> {
        let kind = if kind == AreaKind::Node { AreaKind::Node } else { AreaKind::VmapRam };
        if pages == 0 {
            return Err(VmallocError::ZeroSize);
        }
        if !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(VmallocError::BadAlignment);
        }
        let node = self.alloc_area(pages, align as u64, VmFlags::NO_GUARD, Location::caller())?;
        let nd = node.get();
        nd.kind.set(kind);
        nd.bytes.set(pages * PAGE_SIZE);
        if let Some(slot) = self.reserved.iter_mut().find(|r| r.is_none()) {
            *slot = Some((nd.start.get(), nd.end.get()));
        } else {
            // No slot to remember it by: its tables would not be protected from a purge's
            // merged span. Refuse, changing nothing.
            self.abort_area(node);
            return Err(VmallocError::NoRecords);
        }
        nd.align_shift.set(align.trailing_zeros() as u8);
        self.c.live_areas += 1;
        Ok(self.pointer(node))
    }

    // ----- freeing -----

    /// Take the live area `node` out of the busy tree (or the pending slot).
    #[inline(always)]
    fn unlink_live(&mut self, node: NodePtr) {
        if self.pending == Some(node) {
            self.pending = None;
        } else {
            self.busy.remove(node);
        }
    }

    /// The live area whose range (guard page included) contains `addr`.
    #[inline]
    pub(crate) fn live_containing(&self, addr: u64) -> Option<NodePtr> {
        if let Some(n) = self.pending {
            let nd = n.get();
            if (nd.start.get()..nd.end.get()).contains(&addr) {
                return Some(n);
            }
        }
        self.busy.find_containing(addr)
    }

    /// Every live area in address order (the busy tree with the pending area merged in).
    pub(crate) fn live_iter(&self) -> LiveIter {
        LiveIter { cur: self.busy.first(), pending: self.pending }
    }

    /// The live area whose pointer is `ptr`, or why there is none.
    fn lookup_live(&self, ptr: VirtAddr) -> Result<NodePtr, VmallocError> {
        let p = ptr.as_u64();
        if let Some(n) = self.live_containing(p) {
            let nd = n.get();
            return if nd.start.get() + u64::from(nd.offset.get()) == p { Ok(n) } else { Err(VmallocError::NotAnArea) };
        }
        // Error path only: parked ranges (a list of at most lazy_max_pages areas) and history.
        let parked = self.parked_iter().any(|n| n.get().start.get() + u64::from(n.get().offset.get()) == p);
        if parked || self.history.freed_pointer(p) {
            Err(VmallocError::DoubleFree)
        } else {
            Err(VmallocError::NotAnArea)
        }
    }

    /// Free a [`Self::vmalloc`] area: unmap it, give its frames back, park its range.
    /// `vfree(VirtAddr::new(0))` (NULL) does nothing, as in Linux; so do `vunmap` and
    /// `iounmap` of NULL.
    ///
    /// # Errors
    /// [`VmallocError::NotAnArea`] (unknown or interior pointer),
    /// [`VmallocError::DoubleFree`], [`VmallocError::WrongKind`]; the state is unchanged.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmallocError;
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(4096)?;
    /// vm.vfree(p)?;                                        // unmapped now, flushed at the next purge
    /// assert_eq!(vm.vfree(p), Err(VmallocError::DoubleFree));
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vfree(&mut self, ptr: VirtAddr) -> Result<(), VmallocError> {
        self.release(ptr, AreaKind::Vmalloc, Location::caller(), false)
    }

    /// [`Self::vfree`] for the owning handle of a [`VmFlags::OWNED`] area (plain areas too).
    ///
    /// # Errors
    /// As [`Self::vfree`].
    ///
    /// # Safety
    /// The caller owns the area (it allocated it with [`VmFlags::OWNED`]) and no reference
    /// into it outlives this call.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc_with(4096, 4096, VmFlags::OWNED)?; // a handle's area: plain vfree refuses it
    /// // SAFETY: this code is the area's owner and keeps no reference into it.
    /// unsafe { vm.vfree_owned(p) }?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub unsafe fn vfree_owned(&mut self, ptr: VirtAddr) -> Result<(), VmallocError> {
        self.release(ptr, AreaKind::Vmalloc, Location::caller(), true)
    }

    /// Unmap a [`Self::vmap`] area; its frames stay the caller's.
    ///
    /// # Errors
    /// As [`Self::vfree`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{Prot, VmBackend};
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let mut frame = [hal::PhysAddr::new(0); 1];
    /// vm.sim_mut().alloc_frames(&mut frame);
    /// // SAFETY: the frame is the example's own and outlives the mapping.
    /// let va = unsafe { vm.vmap(&frame, Prot::ReadWrite) }?;
    /// vm.vunmap(va)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vunmap(&mut self, ptr: VirtAddr) -> Result<(), VmallocError> {
        self.release(ptr, AreaKind::Vmap, Location::caller(), false)
    }

    /// Unmap an [`Self::ioremap`] area (pass the address ioremap returned).
    ///
    /// # Errors
    /// As [`Self::vfree`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::DeviceAttr;
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let uart = vm.ioremap(hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE)?;
    /// vm.iounmap(uart)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn iounmap(&mut self, ptr: VirtAddr) -> Result<(), VmallocError> {
        self.release(ptr, AreaKind::Ioremap, Location::caller(), false)
    }

    /// [`Self::iounmap`] for the owning handle of a [`VmFlags::OWNED`] mapping.
    ///
    /// # Errors
    /// As [`Self::iounmap`].
    ///
    /// # Safety
    /// The caller owns the mapping (it mapped it with [`VmFlags::OWNED`]) and no reference
    /// into it outlives this call.
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{DeviceAttr, VmFlags};
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let regs = vm.ioremap_with(hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE, VmFlags::OWNED)?;
    /// // SAFETY: this code owns the mapping and no register reference into it is left.
    /// unsafe { vm.iounmap_owned(regs) }?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub unsafe fn iounmap_owned(&mut self, ptr: VirtAddr) -> Result<(), VmallocError> {
        self.release(ptr, AreaKind::Ioremap, Location::caller(), true)
    }

    fn release(
        &mut self,
        ptr: VirtAddr,
        kind: AreaKind,
        freer: &'static Location<'static>,
        owner: bool,
    ) -> Result<(), VmallocError> {
        // NULL is never an area (`new` refuses a window holding it): `vfree(NULL)`,
        // `vunmap(NULL)` and `iounmap(NULL)` do nothing, as in Linux.
        if ptr.as_u64() == 0 {
            return Ok(());
        }
        let node = match self.lookup_live(ptr) {
            Ok(n) if VmFlags(n.get().flags.get()).contains(VmFlags::OWNED) && !owner => {
                self.c.failures += 1;
                return Err(VmallocError::Owned);
            }
            Ok(n) if n.get().kind.get() == kind => n,
            Ok(_) => {
                self.c.failures += 1;
                return Err(VmallocError::WrongKind);
            }
            Err(e) => {
                self.c.failures += 1;
                return Err(e);
            }
        };
        let nd = node.get();
        let (start, pages) = (nd.start.get(), nd.pages.get());
        if kind == AreaKind::Vmalloc {
            // Strict mode flushes at once: nothing to hold the frames for.
            let quarantine = self.config.quarantine && !self.config.strict;
            if VmFlags(nd.flags.get()).contains(VmFlags::HUGE) {
                self.unmap_free_huge(start, pages, quarantine);
            } else {
                self.unmap_free_with_q(start, pages, quarantine);
            }
            self.c.owned_frames -= pages;
        } else {
            self.backend.unmap_pages(VirtAddr::new(start), pages, |_| {});
        }
        self.c.live_areas -= 1;
        self.c.mapped_pages -= pages;
        nd.freer.set(Some(freer));
        self.history.push(node);
        self.unlink_live(node);
        if self.config.strict {
            self.flush_reclaim(start, pages, start, nd.end.get());
            self.free.give_back(node);
            self.trim_spares();
        } else {
            nd.state.set(State::Parked);
            nd.next.set(self.parked_head);
            self.parked_head = Some(node);
            self.c.parked_areas += 1;
            self.c.parked_pages += (nd.size() / PAGE) as usize;
            self.c.parked_mapped += pages;
            if self.c.parked_pages > self.config.lazy_max_pages {
                self.purge_with(Purge::Lazy);
            }
        }
        Ok(())
    }

    fn trim_spares(&mut self) {
        if self.config.refill_inline {
            self.free.pool.trim(self.spare_keep);
        }
    }

    /// Resize a [`Self::vmalloc`] area to `new_size` bytes, keeping its contents up to the
    /// smaller size. In place when the area's reserved pages suffice (shrinking unmaps and
    /// frees the tail at once) or when the hole after it can take the growth; otherwise
    /// allocate, copy, free. Returns the (possibly moved) pointer.
    ///
    /// # Errors
    /// As [`Self::vfree`] for `ptr`, [`VmallocError::ZeroSize`], and as [`Self::vmalloc`];
    /// on error the old area is untouched.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vzalloc(10_000)?;
    /// let p = vm.vrealloc(p, 20_000)?;                     // grows, contents kept
    /// vm.vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vrealloc(&mut self, ptr: VirtAddr, new_size: usize) -> Result<VirtAddr, VmallocError> {
        let caller = Location::caller();
        let r = self.vrealloc_inner(ptr, new_size, caller);
        if r.is_err() {
            self.c.failures += 1;
        }
        r
    }

    fn vrealloc_inner(
        &mut self,
        ptr: VirtAddr,
        new_size: usize,
        caller: &'static Location<'static>,
    ) -> Result<VirtAddr, VmallocError> {
        if new_size == 0 {
            return Err(VmallocError::ZeroSize);
        }
        let node = self.lookup_live(ptr)?;
        if VmFlags(node.get().flags.get()).contains(VmFlags::OWNED) {
            return Err(VmallocError::Owned);
        }
        let nd = node.get();
        if nd.kind.get() != AreaKind::Vmalloc {
            return Err(VmallocError::WrongKind);
        }
        let flags = VmFlags(nd.flags.get());
        let zero = flags.contains(VmFlags::ZERO);
        let old_bytes = nd.bytes.get();
        let new_pages = new_size.div_ceil(PAGE_SIZE);
        // In place only when the object starts the area: an end-aligned object must keep
        // ending at its guard page, so it always moves (even when its offset happens to be 0).
        // A huge area moves too: its blocks cannot be cut, and a grown one should get blocks.
        if nd.offset.get() == 0 && !flags.contains(VmFlags::END_ALIGNED) && !flags.contains(VmFlags::HUGE) {
            let reserved = (nd.size() / PAGE) as usize - flags.guard_pages();
            if new_pages <= reserved {
                self.resize_mapped(node, new_pages, new_size, zero)?;
                return Ok(ptr);
            }
            // Grow into the hole right after the area's range, if it is big enough.
            let extra = ((new_pages - reserved) * PAGE_SIZE) as u64;
            let mut hole = self.free.hole_at(nd.end.get()).filter(|h| h.get().size() >= extra);
            if hole.is_none() && self.pools.ranges() > 0 {
                // The neighbour may be a pooled range: the pools go back to the tree, and
                // the growth may take it.
                self.unpool_all();
                hole = self.free.hole_at(nd.end.get()).filter(|h| h.get().size() >= extra);
            }
            if let Some(hole) = hole {
                self.ensure_records()?;
                let old_end = nd.end.get();
                self.free.take_front(hole, extra);
                nd.end.set(old_end + extra);
                if let Err(e) = self.resize_mapped(node, new_pages, new_size, zero) {
                    // Give the growth back (the records were ensured above).
                    nd.end.set(old_end);
                    if let Some(r) = self.free.pool.pop() {
                        r.get().start.set(old_end);
                        r.get().end.set(old_end + extra);
                        self.free.give_back(r);
                    }
                    return Err(e);
                }
                return Ok(ptr);
            }
        }
        let align = 1usize << nd.align_shift.get();
        let new = self.vmalloc_inner(new_size, align, flags, caller)?;
        let new_ptr = self.pointer(new);
        self.backend.copy_mapped(new_ptr, ptr, old_bytes.min(new_size));
        self.release(ptr, AreaKind::Vmalloc, caller, true)?;
        Ok(new_ptr)
    }

    /// Map or unmap pages so that `node` (a live vmalloc area, not end-aligned, whose range
    /// has room) has `new_pages` mapped and `new_size` bytes.
    fn resize_mapped(
        &mut self,
        node: NodePtr,
        new_pages: usize,
        new_size: usize,
        zero: bool,
    ) -> Result<(), VmallocError> {
        let nd = node.get();
        let (start, old_pages, old_bytes) = (nd.start.get(), nd.pages.get(), nd.bytes.get());
        let page = PAGE_SIZE as u64;
        if new_pages > old_pages {
            self.populate(start + old_pages as u64 * page, new_pages - old_pages, zero)?;
            self.c.mapped_pages += new_pages - old_pages;
            self.c.pages_mapped += (new_pages - old_pages) as u64;
            self.c.owned_frames += new_pages - old_pages;
        } else if new_pages < old_pages {
            let tail = start + new_pages as u64 * page;
            self.unmap_free(tail, old_pages - new_pages);
            // The tail may be mapped again by a later grow: flush it now.
            // Only tables past the last page still mapped can have emptied.
            let lo = tail.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
            let hi = start + old_pages as u64 * page;
            if lo < hi {
                self.flush_reclaim(tail, old_pages - new_pages, lo, hi);
            } else {
                self.flush_now(tail, old_pages - new_pages);
            }
            self.c.mapped_pages -= old_pages - new_pages;
            self.c.owned_frames -= old_pages - new_pages;
        }
        if zero && new_size < old_bytes {
            let upto = old_bytes.min(new_pages * PAGE_SIZE);
            if upto > new_size {
                self.backend.zero_mapped(VirtAddr::new(start + new_size as u64), upto - new_size);
            }
        }
        nd.pages.set(new_pages);
        nd.bytes.set(new_size);
        Ok(())
    }

    // ----- queries -----

    /// The live area containing `addr` (guard page included).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(3 * 4096)?;
    /// let area = vm.find_area(p).unwrap();
    /// assert_eq!((area.pages, area.guard), (3, true));
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn find_area(&self, addr: VirtAddr) -> Option<AreaInfo> {
        self.live_containing(addr.as_u64()).map(Self::area_info)
    }

    /// The parked records, most recently freed first.
    fn parked_iter(&self) -> impl Iterator<Item = NodePtr> + '_ {
        core::iter::successors(self.parked_head, |n| n.get().next.get())
    }

    fn area_info(n: NodePtr) -> AreaInfo {
        let nd = n.get();
        let phys = nd.phys.get();
        AreaInfo {
            start: VirtAddr::new(nd.start.get()),
            end: VirtAddr::new(nd.end.get()),
            size: nd.size(),
            addr: VirtAddr::new(nd.start.get() + u64::from(nd.offset.get())),
            bytes: nd.bytes.get(),
            pages: nd.pages.get(),
            kind: nd.kind.get(),
            caller: nd.caller.get(),
            phys: (nd.kind.get() == AreaKind::Ioremap).then_some(PhysAddr::new(phys)),
            guard: VmFlags(nd.flags.get()).guard_pages() > 0,
        }
    }

    /// Call `f` with the range (guard page included) of every parked area: freed, not yet
    /// purged (O(parked), in no particular order).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.for_each_parked(|start, end| log::debug!("parked {start:#x}..{end:#x}"));
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn for_each_parked(&self, mut f: impl FnMut(VirtAddr, VirtAddr)) {
        let mut cur = self.parked_head;
        while let Some(n) = cur {
            let nd = n.get();
            f(VirtAddr::new(nd.start.get()), VirtAddr::new(nd.end.get()));
            cur = nd.next.get();
        }
    }

    /// Call `f` on every live area in address order (O(n)).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.for_each_area(|a| log::info!("{:#x} {} pages, by {}", a.addr, a.pages, a.caller));
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn for_each_area(&self, mut f: impl FnMut(&AreaInfo)) {
        for n in self.live_iter() {
            f(&Self::area_info(n));
        }
    }

    /// The physical address behind `addr`, walking the tables (through the backend).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let buf = vm.vzalloc(4096)?;
    /// let dma = vm.vmalloc_to_phys(buf).unwrap();         // the frame behind the page
    /// # let _ = dma;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn vmalloc_to_phys(&self, addr: VirtAddr) -> Option<PhysAddr> {
        if !self.is_vmalloc_addr(addr) {
            return None;
        }
        self.backend.translate(addr)
    }

    /// The counters.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let s = vm.stats();
    /// log::info!("{} live areas, {} pages parked", s.live_areas, s.parked_pages);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn stats(&self) -> VmallocStats {
        VmallocStats {
            live_areas: self.c.live_areas,
            mapped_pages: self.c.mapped_pages,
            owned_frames: self.c.owned_frames,
            parked_areas: self.c.parked_areas,
            parked_pages: self.c.parked_pages,
            parked_mapped_pages: self.c.parked_mapped,
            pooled_areas: self.pools.ranges(),
            pooled_pages: self.pools.pages(),
            free_holes: self.free.holes(),
            largest_hole: self.free.largest(),
            records: self.free.records(),
            spare_records: self.free.pool.len(),
            purges: self.c.purges,
            tlb_page_ops: self.c.tlb_page_ops,
            tlb_page_batches: self.c.tlb_page_batches,
            tlb_full_flushes: self.c.tlb_full,
            failures: self.c.failures,
            frames_taken: self.c.frames_taken,
            frames_returned: self.c.frames_returned,
            pages_mapped: self.c.pages_mapped,
            purge_ns_max: self.purge_hist.max(),
            purge_ns_p99: self.purge_hist.percentile(99),
            huge_blocks: self.c.huge_blocks,
            huge_fallbacks: self.c.huge_fallbacks,
            tables_freed: self.c.tables_freed,
            quarantined_frames: self.c.quarantined,
            quarantine_hits: self.c.quarantine_hits,
            quarantine_bypassed: self.c.quarantine_bypassed,
        }
    }

    /// The free-space index (read only): for tests and diagnostics.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let fs = vm.free_space();
    /// log::info!("{} holes, largest {} bytes", fs.holes(), fs.largest());
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn free_space(&self) -> &FreeSpace {
        &self.free
    }

    /// Statistics of the last free-space search.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.vmalloc(4096)?;
    /// log::debug!("lowest fit visited {} nodes", vm.last_search().visits);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn last_search(&self) -> SearchStats {
        self.free.last_search()
    }

    /// Full self-test, O(n): both trees (order, balance, recomputed augmented values), holes
    /// page aligned and never adjacent, busy and free ranges disjoint and together covering
    /// the window exactly, counters consistent with the records.
    ///
    /// # Errors
    /// A description of the first violation found.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default()).unwrap();
    /// vm.vmalloc(4096).unwrap();
    /// vm.check()?;
    /// # Ok::<(), &'static str>(())
    /// ```
    pub fn check(&self) -> Result<(), &'static str> {
        self.free.check()?;
        self.busy.check()?;
        if let Some(p) = self.pending {
            if self.busy.find_containing(p.get().start.get()).is_some() {
                return Err("the pending area is also in the busy tree");
            }
        }
        // Free holes, live areas and parked ranges must tile the window.
        let mut all: Vec<NodePtr> = Vec::new();
        if all
            .try_reserve_exact(self.free.tree.len + self.busy.len + self.c.parked_areas + self.pools.ranges() + 1)
            .is_err()
        {
            return Err("out of memory for the check");
        }
        let mut cur = self.free.tree.first();
        while let Some(n) = cur {
            all.push(n);
            cur = Tree::next(n);
        }
        let mut live_records = 0usize;
        for n in self.live_iter() {
            if n.get().state.get() != State::Busy {
                return Err("non-live record in the busy tree");
            }
            all.push(n);
            live_records += 1;
        }
        let mut parked = 0usize;
        for n in self.parked_iter() {
            if n.get().state.get() != State::Parked {
                return Err("non-parked record on the parked list");
            }
            parked += 1;
            all.push(n);
        }
        let mut pooled = 0usize;
        for n in self.pools.iter() {
            let nd = n.get();
            if nd.state.get() != State::Pooled {
                return Err("non-pooled record in a pool");
            }
            if nd.size() > (POOL_MAX_PAGES * PAGE_SIZE) as u64 {
                return Err("a pooled range larger than the pools take");
            }
            pooled += 1;
            all.push(n);
        }
        if pooled != self.pools.ranges() {
            return Err("pool counters disagree with the pools");
        }
        all.sort_unstable_by_key(|n| n.get().start.get());
        let mut at = self.start;
        let (mut live, mut parked_pages, mut mapped) = (0usize, 0usize, 0usize);
        for n in &all {
            let nd = n.get();
            if nd.start.get() != at {
                return Err("free, live and parked ranges do not tile the window");
            }
            at = nd.end.get();
            match nd.state.get() {
                State::Free | State::Pooled => {}
                State::Busy => {
                    live += 1;
                    mapped += nd.pages.get();
                }
                State::Parked => parked_pages += (nd.size() / PAGE) as usize,
                State::Spare => return Err("spare record in a tree"),
            }
            if !matches!(nd.state.get(), State::Free | State::Pooled) {
                let guard = VmFlags(nd.flags.get()).guard_pages() as u64;
                if (nd.pages.get() as u64 + guard) * PAGE > nd.size() {
                    return Err("area maps into its guard page");
                }
            }
        }
        if at != self.end {
            return Err("free, live and parked ranges do not reach the end of the window");
        }
        if live != self.c.live_areas || mapped != self.c.mapped_pages {
            return Err("live area counters disagree with the busy tree");
        }
        if parked != self.c.parked_areas || parked_pages != self.c.parked_pages {
            return Err("parked counters disagree with the parked list");
        }
        if self.free.tree.len + live_records + parked + pooled + self.free.pool.len() != self.free.records() {
            return Err("area records leaked or double counted");
        }
        Ok(())
    }
}

/// Live areas in address order: the busy tree's records with the pending one merged in.
pub(crate) struct LiveIter {
    cur: Link,
    pending: Link,
}

impl Iterator for LiveIter {
    type Item = NodePtr;

    fn next(&mut self) -> Option<NodePtr> {
        match (self.cur, self.pending) {
            (Some(c), Some(p)) if p.get().start.get() < c.get().start.get() => self.pending.take(),
            (Some(c), _) => {
                self.cur = Treap::next(c);
                Some(c)
            }
            (None, _) => self.pending.take(),
        }
    }
}

impl Vmalloc<sim::SimBackend> {
    /// The simulated backend, mutably: safe, since it only touches simulated memory (tests
    /// inject faults and check contents through it).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.sim_mut().fail_frames_after(2);               // inject a frame shortage
    /// assert!(vm.vmalloc(5 * 4096).is_err());         // fails cleanly, nothing leaks
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn sim_mut(&mut self) -> &mut sim::SimBackend {
        &mut self.backend
    }
}

impl<B: VmBackend> Drop for Vmalloc<B> {
    /// Frees the records only: live areas' mappings and frames are left as they are.
    fn drop(&mut self) {
        // Quarantined frames are the allocator's: flush and free them.
        if self.q.head != 0 {
            self.purge();
        }
        let pool = &mut self.free.pool;
        // SAFETY: `drain` hands each record over once it is unlinked from the busy tree,
        // which keeps no copy; the allocator is being dropped, so no lookup uses a record
        // again (parked records are off the busy tree, on the parked list freed below).
        self.busy.drain(|n| unsafe { pool.free_one(n) });
        if let Some(n) = self.pending.take() {
            // SAFETY: the pending record is linked nowhere else and was just taken.
            unsafe { pool.free_one(n) };
        }
        let mut cur = self.parked_head.take();
        while let Some(n) = cur {
            cur = n.get().next.get();
            // SAFETY: a parked record is on the parked list only (off the busy tree); its
            // successor was read above and the list's head was taken, so nothing uses `n`
            // again.
            unsafe { pool.free_one(n) };
        }
        for n in self.pools.iter() {
            // SAFETY: a pooled record is in its pool's list only; the iterator read its
            // successor before yielding it, and the pools are forgotten below, unread.
            unsafe { pool.free_one(n) };
        }
        self.pools.forget();
    }
}

impl<B: VmBackend> fmt::Debug for Vmalloc<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmalloc")
            .field("start", &VirtAddr::new(self.start))
            .field("end", &VirtAddr::new(self.end))
            .field("stats", &self.stats())
            .finish()
    }
}
