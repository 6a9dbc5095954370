//! The 4-level walker: map, unmap, protect and translate over tables reached through the
//! [`LinearMap`].
//!
//! ```text
//!  VA bits   63..48    47..39     38..30     29..21     20..12     11..0
//!           all 0/1   L0 index   L1 index   L2 index   L3 index   page offset
//!  one entry maps      512 GiB    1 GiB      2 MiB      4 KiB
//!  leaf allowed?       no         block      block      page
//! ```
//!
//! Table pages come from a [`TableAlloc`] (the buddy allocator on target, a heap arena in
//! host tests) and are reached through the linear map, so the same walker runs on both.
//!
//! ## All or nothing
//! Every mutation runs twice over the same code path: a *plan* pass reads the tree, refuses
//! the whole request if any part of it is wrong, and counts the table pages the *apply* pass
//! will need; those pages are taken before the first write. A failed call therefore changes
//! no descriptor and holds on to no page, and the apply pass cannot fail half-way.
//!
//! The common vmalloc case — pages whose last-level tables exist already, in one 2 MiB
//! region or a few — takes a shorter road to the same result: one descent per last-level
//! table, a tight loop that checks its entries, a tight loop that writes them (nothing to
//! allocate, no block to split). Each table's entries are reached from one base pointer
//! (one linear-map lookup per table, not per entry). On QEMU this cuts a one-page map +
//! unmap from about 1.1 µs to 0.3 µs.
//!
//! ## Live tables
//! Which changes to a live entry need break-before-make, and what the walker does:
//!
//! | change                                   | rule                    | walker                          |
//! |------------------------------------------|-------------------------|---------------------------------|
//! | invalid → leaf or table (`map`)          | none; publish (`dsb`)   | `map`, `map_frames`             |
//! | leaf → another leaf (new address/type)   | break-before-make       | refused: [`MmuError::AlreadyMapped`] |
//! | leaf → same leaf, other permissions      | none; TLBI after        | `protect`                       |
//! | block → table (split)                    | break-before-make       | `unmap`, `protect`              |
//! | leaf → invalid                           | TLBI after              | `unmap` (flushes), `unmap_with` (caller flushes) |
//! | table → invalid, page freed              | walk-cache TLBI, then free | `unmap_and_reclaim`, `free_empty_tables` |
//!
//! Tables are otherwise kept until [`PageTable::free_all`]: a walk cache may still hold a
//! pointer to them. vmalloc, which unmaps lazily (`unmap_with` keeps them), gives back
//! those its purge left empty with [`PageTable::free_empty_tables`]. The TLB maintenance
//! of `unmap`, `unmap_and_reclaim`, `free_empty_tables` and `protect` goes through the [`Tlb`] they are given, so
//! a [`RecordingTlb`](super::RecordingTlb) sees the whole sequence, barriers included.

use core::sync::atomic::{AtomicU64, Ordering};

use super::arch;
use super::attr::{Attributes, Permissions};
use super::descriptor::{Descriptor, Entry, OUTPUT_ADDR_MASK, PA_LIMIT};
use super::tlb::{EntryWrite, Tlb, TlbBatch, TlbOp};
use super::MmuError;
use crate::addr::{AddrError, PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use crate::linear::LinearMap;

mod leaf;
pub use leaf::LeafTable;

/// Entries in one table (4 KiB of 8-byte descriptors).
pub const ENTRIES: usize = 512;
/// Virtual address bits translated by one table tree (`T0SZ = T1SZ = 16`).
pub const VA_BITS: u32 = 48;
/// The root level; levels run 0 (root) to 3 (pages).
pub const ROOT_LEVEL: usize = 0;
/// The level whose entries map single pages.
pub const PAGE_LEVEL: usize = 3;

/// log2 of the bytes one entry at `level` (0-3) maps: 39, 30, 21, 12.
pub const fn level_shift(level: usize) -> u32 {
    12 + 9 * (PAGE_LEVEL - level) as u32
}

/// Bytes one entry at `level` (0-3) maps: 512 GiB, 1 GiB, 2 MiB, 4 KiB.
pub const fn level_size(level: usize) -> u64 {
    1 << level_shift(level)
}

const fn index_at(va: u64, level: usize) -> usize {
    ((va >> level_shift(level)) as usize) & (ENTRIES - 1)
}

/// Which half of the address space a table tree translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VaRange {
    /// `0 ..= 0x0000_ffff_ffff_ffff`, through `TTBR0_EL1`.
    Lower,
    /// `0xffff_0000_0000_0000 ..= u64::MAX`, through `TTBR1_EL1`.
    Upper,
}

impl VaRange {
    /// The first address of the half.
    pub const fn start(self) -> VirtAddr {
        match self {
            VaRange::Lower => VirtAddr::new(0),
            VaRange::Upper => VirtAddr::new(u64::MAX << VA_BITS),
        }
    }

    /// The last address of the half (inclusive: the upper half ends at `u64::MAX`).
    pub const fn last(self) -> VirtAddr {
        match self {
            VaRange::Lower => VirtAddr::new((1 << VA_BITS) - 1),
            VaRange::Upper => VirtAddr::new(u64::MAX),
        }
    }

    /// Whether `va` lies in this half.
    pub const fn contains(self, va: VirtAddr) -> bool {
        va.as_u64() >= self.start().as_u64() && va.as_u64() <= self.last().as_u64()
    }
}

/// Where table pages come from.
///
/// # Safety
/// A page returned by `alloc_table` must belong to the walker alone until it is handed back
/// through `free_table`: no reference to it, no other user writing it. The walker checks that
/// the page is 4 KiB aligned and inside its [`LinearMap`] (and refuses it otherwise); it
/// cannot check ownership.
pub unsafe trait TableAlloc {
    /// A 4 KiB page for a translation table (contents need not be zeroed), or `None` when
    /// memory is exhausted.
    fn alloc_table(&mut self) -> Option<PhysAddr>;

    /// Take back a page that `alloc_table` returned.
    ///
    /// # Safety
    /// `page` came from this allocator's `alloc_table`, has not been freed since, and no
    /// translation table (nor a walk cache) refers to it any more.
    unsafe fn free_table(&mut self, page: PhysAddr);
}

/// Whether a contiguous mapping may use 1 GiB and 2 MiB blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockPolicy {
    /// Only 4 KiB pages: every page can later be unmapped or protected on its own.
    PagesOnly,
    /// Blocks wherever virtual and physical addresses are both aligned to the block and the
    /// range covers it, and no table is already installed at that entry; pages elsewhere.
    /// A later `unmap`/`protect` of part of a block splits it (break-before-make);
    /// `unmap_with` refuses to.
    AllowBlocks,
}

/// The leaf invalidation [`PageTable::flush_and_free_empty_tables`] issues in the same
/// batch as the walk-cache invalidations of the tables it frees.
pub enum LeafFlush<'a> {
    /// No leaf.
    None,
    /// Every page of these ranges, last level only (`tlbi vaale1is` per page).
    Pages(&'a mut dyn Iterator<Item = VirtRange>),
    /// Everything (`tlbi vmalle1is`, walk caches included).
    All,
}

/// What [`PageTable::translate`] found for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address the virtual address maps to (page offset included).
    pub phys: PhysAddr,
    /// The mapping's attributes; `None` if its bits are not ones this module writes.
    pub attributes: Option<Attributes>,
    /// The level of the leaf: 1 (1 GiB block), 2 (2 MiB block) or 3 (4 KiB page).
    pub level: usize,
}

impl Translation {
    /// Bytes mapped by the leaf that holds the address.
    pub const fn leaf_size(&self) -> u64 {
        level_size(self.level)
    }
}

/// A translation table tree for one half of the address space.
///
/// Mapping is safe: creating a translation does not by itself let safe code reach anything.
/// Unmapping and changing permissions can pull memory from under a live reference, so those
/// are `unsafe`. Dropping a `PageTable` does not free its tables (it may be live in a
/// `TTBR`); [`PageTable::free_all`] does.
#[derive(Debug)]
pub struct PageTable {
    root: PhysAddr,
    linear: LinearMap,
    va_range: VaRange,
    tables: usize,
    /// The linear map's window as plain numbers, for [`PageTable::table_base`].
    window: Window,
}

/// A [`LinearMap`] window: physical `pa .. pa + len`, reached through the map's pointer
/// ([`LinearMap::ptr_at_offset`]).
#[derive(Clone, Copy, Debug)]
struct Window {
    pa: u64,
    len: u64,
}

impl Window {
    fn of(linear: &LinearMap) -> Self {
        let phys = linear.phys_range();
        match linear.phys_to_virt(phys.start()) {
            Some(_) => Self { pa: phys.start().as_u64(), len: phys.size() },
            // An empty window: every lookup goes to `LinearMap::ptr`, which refuses it.
            None => Self { pa: 0, len: 0 },
        }
    }
}

/// The pass of a two-pass mutation.
enum Pass {
    /// Read only: validate and count the table pages the apply pass will install.
    Plan { tables: usize },
    /// Write, taking new tables from the reserve.
    Apply(Reserve),
}

/// Table pages taken before an apply pass, chained through their first word.
struct Reserve {
    head: PhysAddr,
    len: usize,
}

/// Where the output address of each page of a mapping comes from.
enum Source<'a> {
    /// Physically contiguous: `pa + (va - va0)`.
    Contiguous { va0: u64, pa0: u64 },
    /// One frame per page.
    Frames { va0: u64, frames: &'a [PhysAddr] },
}

impl Source<'_> {
    fn pa(&self, va: u64) -> Option<PhysAddr> {
        match *self {
            Source::Contiguous { va0, pa0 } => Some(PhysAddr::new(pa0 + (va - va0))),
            Source::Frames { va0, frames } => frames.get(((va - va0) / PAGE_SIZE as u64) as usize).copied(),
        }
    }

    /// Refuse frames that are misaligned or too high, the first at fault deciding the error
    /// (a contiguous source is checked whole by [`PageTable::map`]).
    fn check_frames(&self) -> Result<(), MmuError> {
        if let Source::Frames { frames, .. } = *self {
            // One OR over the frames finds whether any is misaligned or too high (a frame at
            // or above 2^48 sets a bit there); only then look for the first one at fault.
            if frame_bits_bad(frames.iter().fold(0, |acc, frame| acc | frame.as_u64())) {
                for &frame in frames {
                    if !frame.is_page_aligned() {
                        return Err(MmuError::Addr(AddrError::Misaligned));
                    }
                    if frame.as_u64() >= PA_LIMIT {
                        return Err(MmuError::PhysTooHigh(frame));
                    }
                }
            }
        }
        Ok(())
    }

    /// Write the page descriptors of `run` (within one last-level table) at `entries`, the
    /// run's first entry: `template` with each page's output address.
    ///
    /// # Safety
    /// `entries .. entries + run.pages()` are entries of one table page of the calling tree,
    /// which holds `&mut` to it; every output address of the run is page aligned and below
    /// 2^48 (`map` and `map_frames` check), and the source covers the run.
    unsafe fn fill(&self, entries: *mut u64, run: Span, template: u64) {
        let count = run.pages();
        // OR-ing an output address into the template is `with_output_address`: the template's
        // own address bits are zero.
        match *self {
            Source::Contiguous { va0, pa0 } => {
                let pa = pa0 + (run.first - va0);
                for k in 0..count {
                    // SAFETY: `k < count`: inside the run, so inside the table page (the
                    // caller's promise). Atomic: one 64-bit store, so a concurrent table walk
                    // never sees half a descriptor.
                    unsafe { store_entry(entries.add(k), template | (pa + (k * PAGE_SIZE) as u64)) };
                }
            }
            Source::Frames { va0, frames } => {
                let at = ((run.first - va0) / PAGE_SIZE as u64) as usize;
                for (k, frame) in frames[at..at + count].iter().enumerate() {
                    // SAFETY: as for the contiguous source.
                    unsafe { store_entry(entries.add(k), template | frame.as_u64()) };
                }
            }
        }
    }

    fn can_use_block(&self, va: u64, size: u64) -> bool {
        match *self {
            Source::Contiguous { va0, pa0 } => (pa0 + (va - va0)) & (size - 1) == 0,
            Source::Frames { .. } => false,
        }
    }
}

/// What an edit of existing mappings does to each leaf.
#[derive(Clone, Copy)]
enum Edit {
    /// Clear it; with `reclaim`, also free the tables left empty.
    Unmap { reclaim: bool },
    /// Give it these permissions.
    Protect(Permissions),
}

/// The pass of an edit ([`PageTable::unmap`], [`PageTable::protect`]). One lives on the
/// stack per call (no allocator to box it in), so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum EditPass<'t, T: Tlb + ?Sized> {
    /// Read only: validate and count the tables splits will take.
    Plan { tables: usize },
    /// Write.
    Apply(EditApply<'t, T>),
}

/// State of an edit's apply pass.
struct EditApply<'t, T: Tlb + ?Sized> {
    tlb: &'t T,
    /// Tables for splits, taken before the pass.
    reserve: Reserve,
    /// What to invalidate once every write is done.
    batch: TlbBatch,
    /// Emptied tables, to be freed after `batch` has completed.
    freed: Reserve,
    /// 4 KiB pages unmapped.
    pages: u64,
}

/// A live block entry about to be split.
struct Block {
    /// The table holding the entry, and its index there.
    table: PhysAddr,
    index: usize,
    level: usize,
    /// First virtual address it maps, its output address, its attributes.
    base: u64,
    phys: PhysAddr,
    attributes: Attributes,
}

/// The part of `span` inside the entry mapping `va .. va + size` (`va` aligned), when the
/// span covers some but not all of it: the entry has to be split.
fn cut(span: Span, va: u64, size: u64) -> Option<Span> {
    let last = va + (size - 1);
    let first = span.first.max(va);
    let end = span.last.min(last);
    if first > end || (first == va && end == last) {
        None
    } else {
        Some(Span { first, last: end })
    }
}

/// Tables a split of a block at `level` takes when `span` (inside the block, not covering
/// it) is edited: one, plus the subtables for the (at most two) children it cuts through.
fn split_tables(level: usize, span: Span) -> usize {
    let child = level + 1;
    if child == PAGE_LEVEL {
        return 1;
    }
    let size = level_size(child);
    let (first, last) = (span.first & !(size - 1), span.last & !(size - 1));
    let ends = if first == last { [Some(first), None] } else { [Some(first), Some(last)] };
    1 + ends
        .into_iter()
        .flatten()
        .filter_map(|va| cut(span, va, size))
        .map(|part| split_tables(child, part))
        .sum::<usize>()
}

/// An inclusive span of virtual addresses, page aligned at both ends (`last` ends a page).
#[derive(Clone, Copy)]
struct Span {
    first: u64,
    last: u64,
}

impl Span {
    /// Pages in the span.
    const fn pages(self) -> usize {
        ((self.last - self.first) / PAGE_SIZE as u64) as usize + 1
    }
}

/// One 64-bit load of a table entry, relaxed-atomic: the MMU's walker reads the same
/// memory, and [`LeafTable`] handles write some tables outside this tree's `&mut` (from
/// another CPU), so every access to an entry is a single-copy-atomic 64-bit access and,
/// in Rust's model, an atomic one (no data race with a handle's store).
///
/// # Safety
/// `p` points at an aligned entry of a table page reached through the linear map.
#[inline(always)]
unsafe fn load_entry(p: *const u64) -> u64 {
    // SAFETY: forwarded from the caller: aligned, valid for reads; only accessed atomically
    // or by the MMU while the page is a table.
    unsafe { AtomicU64::from_ptr(p.cast_mut()) }.load(Ordering::Relaxed)
}

/// One 64-bit store of a table entry (see [`load_entry`]).
///
/// # Safety
/// As [`load_entry`], and the caller may write this entry (it owns the tree, or the
/// entry through a [`LeafTable`] handle).
#[inline(always)]
unsafe fn store_entry(p: *mut u64, v: u64) {
    // SAFETY: as in `load_entry`; writing is the caller's right.
    unsafe { AtomicU64::from_ptr(p) }.store(v, Ordering::Relaxed)
}

/// `VALID | TYPE::TableOrPage`: the two low bits of a page descriptor at the last level,
/// where the test is what [`Descriptor::leaf_address`] asks (a set valid bit alone there is
/// a reserved encoding, treated as invalid).
const PAGE_BITS: u64 = 0b11;

/// Whether the OR of some frames shows one misaligned or at or above 2^48.
#[inline]
const fn frame_bits_bad(bits: u64) -> bool {
    bits & (PAGE_SIZE as u64 - 1) != 0 || bits >= PA_LIMIT
}

/// Bit 0 set when any of the `count` last-level entries at `entries` is a page. No branch
/// per entry: under QEMU's TCG every branch ends a translation block.
///
/// # Safety
/// `entries .. entries + count` are entries of one table page reached through the linear map.
#[inline]
unsafe fn pages_among(entries: *const u64, count: usize) -> u64 {
    let mut pages = 0;
    for k in 0..count {
        // SAFETY: inside the table page (the caller's promise). Atomic: the MMU reads the
        // same memory, so the access must be a single 64-bit load.
        let raw = unsafe { load_entry(entries.add(k)) };
        pages |= raw & (raw >> 1);
    }
    pages
}

/// The first of the `count` last-level entries at `entries` that is a page.
///
/// # Safety
/// As for [`pages_among`].
unsafe fn first_page(entries: *const u64, count: usize) -> Option<usize> {
    // SAFETY: inside the table page (the caller's promise); a single 64-bit load.
    (0..count).find(|&k| unsafe { load_entry(entries.add(k)) } & PAGE_BITS == PAGE_BITS)
}

impl PageTable {
    /// An empty tree for `va_range`, its root taken from `alloc`; every table is reached
    /// through `linear`.
    ///
    /// # Errors
    /// [`MmuError::OutOfMemory`] or [`MmuError::BadTablePage`] from the allocator.
    pub fn new(linear: LinearMap, va_range: VaRange, alloc: &mut impl TableAlloc) -> Result<Self, MmuError> {
        let mut table = Self { root: PhysAddr::new(0), linear, va_range, tables: 0, window: Window::of(&linear) };
        table.root = table.take_table(alloc)?;
        table.zero_table(table.root);
        table.tables = 1;
        Ok(table)
    }

    /// Physical address of the root table (for `TTBR0_EL1` / `TTBR1_EL1`).
    pub const fn root(&self) -> PhysAddr {
        self.root
    }

    /// The half of the address space this tree translates.
    pub const fn va_range(&self) -> VaRange {
        self.va_range
    }

    /// Table pages in the tree, the root included.
    pub const fn table_pages(&self) -> usize {
        self.tables
    }

    /// Map the physically contiguous `phys .. phys + virt.size()` at `virt`.
    ///
    /// # Errors
    /// - [`AddrError::Misaligned`] (as [`MmuError::Addr`]) when `virt` or `phys` is not page
    ///   aligned;
    /// - [`MmuError::OutsideVaRange`] when `virt` leaves this tree's half;
    /// - [`MmuError::PhysTooHigh`] when the physical range passes 2^48;
    /// - [`MmuError::AlreadyMapped`] when any page of `virt` is mapped already;
    /// - [`MmuError::OutOfMemory`] / [`MmuError::BadTablePage`] when a table page cannot be had.
    ///
    /// On error nothing has changed.
    pub fn map(
        &mut self,
        virt: VirtRange,
        phys: PhysAddr,
        attributes: Attributes,
        policy: BlockPolicy,
        alloc: &mut impl TableAlloc,
    ) -> Result<(), MmuError> {
        let span = self.span(virt.start(), virt.size())?;
        if !phys.is_page_aligned() {
            return Err(MmuError::Addr(AddrError::Misaligned));
        }
        match phys.checked_add(virt.size()) {
            Ok(end) if end.as_u64() <= PA_LIMIT => {}
            _ => return Err(MmuError::PhysTooHigh(phys)),
        }
        let src = Source::Contiguous { va0: span.first, pa0: phys.as_u64() };
        self.map_span(span, &src, attributes, policy, alloc)
    }

    /// Map `frames[i]` at `start + i * PAGE_SIZE`, with pages only (the frames need not be
    /// contiguous): the vmalloc path.
    ///
    /// # Errors
    /// As [`PageTable::map`], and [`AddrError::Empty`] for no frames; a misaligned frame is
    /// [`AddrError::Misaligned`]; [`AddrError::Overflow`] when the range would end at 2^64
    /// (the top page of the upper half is never mapped). On error nothing has changed.
    pub fn map_frames(
        &mut self,
        start: VirtAddr,
        frames: &[PhysAddr],
        attributes: Attributes,
        alloc: &mut impl TableAlloc,
    ) -> Result<(), MmuError> {
        let size = (frames.len() as u64).checked_mul(PAGE_SIZE as u64).ok_or(MmuError::Addr(AddrError::Overflow))?;
        let span = self.span(start, size)?;
        // The frames are checked by `map_span`, in the fast path together with the entries.
        let src = Source::Frames { va0: span.first, frames };
        self.map_span(span, &src, attributes, BlockPolicy::PagesOnly, alloc)
    }

    /// Unmap every page and block inside `virt` (holes are skipped), splitting a block that
    /// `virt` only partly covers, and invalidate the TLB entries of what was unmapped before
    /// returning. Returns the number of 4 KiB pages that were mapped (a 2 MiB block counts
    /// 512). Table pages are kept (see [`PageTable::unmap_and_reclaim`]).
    ///
    /// A block that `virt` cuts through is replaced, by break-before-make, with a table
    /// mapping the same output addresses with the same attributes (see [`PageTable::protect`]
    /// for the sequence); then the pages inside `virt` are cleared from it. The tables a split
    /// needs are taken from `alloc` before anything is written. The invalidation after the
    /// edit is one TLBI per cleared leaf (`tlbi vaale1is`, a block needing one) while there
    /// are at most [`MAX_PAGE_INVALIDATIONS`](super::tlb::MAX_PAGE_INVALIDATIONS), otherwise
    /// one `tlbi vmalle1is`.
    ///
    /// The lazy, TLB-free road for callers that batch their own flushes (vmalloc) is
    /// [`PageTable::unmap_with`].
    ///
    /// # Safety
    /// - Nothing the program still uses may live in `virt`: no reference into it, no stack,
    ///   no code, no device another driver talks to (the next access faults).
    /// - When `virt` cuts through a block, the *whole* block is unmapped for the few
    ///   instructions between the break and the make: nothing may touch any part of it in
    ///   that window — not the code running the split, the current stack, the exception
    ///   vectors and stack, `tlb` itself, nor anything another core or an interrupt handler
    ///   uses (this kernel runs EL1 with interrupts masked; the rule is about the *block*,
    ///   not only `virt`). The table page the walker must write to end the window is
    ///   checked: see [`MmuError::SplitWouldUnmapTable`].
    /// - `tlb` reaches every core that may hold translations from this tree.
    ///
    /// # Errors
    /// - [`AddrError::Misaligned`] / [`AddrError::Empty`] (as [`MmuError::Addr`]) and
    ///   [`MmuError::OutsideVaRange`] as for [`PageTable::map`];
    /// - [`MmuError::ForeignDescriptor`] when a block to split carries bits this module
    ///   never writes (it could not be copied faithfully);
    /// - [`MmuError::SplitWouldUnmapTable`];
    /// - [`MmuError::OutOfMemory`] / [`MmuError::BadTablePage`] when a table for a split
    ///   cannot be had.
    ///
    /// On error nothing has changed and no page is held.
    pub unsafe fn unmap<T: Tlb + ?Sized>(
        &mut self,
        virt: VirtRange,
        tlb: &T,
        alloc: &mut impl TableAlloc,
    ) -> Result<u64, MmuError> {
        self.edit(virt, Edit::Unmap { reclaim: false }, tlb, alloc)
    }

    /// As [`PageTable::unmap`], and give back to `alloc` every table page (never the root)
    /// that the unmapping left empty.
    ///
    /// A table page may be reused only once no walk cache can reach it: each emptied table's
    /// descriptor is cleared, then one batch invalidates the cleared leaves *and* those table
    /// entries with walk caches (`tlbi vaae1is` at the region each covered, or `tlbi
    /// vmalle1is` above [`MAX_PAGE_INVALIDATIONS`](super::tlb::MAX_PAGE_INVALIDATIONS)
    /// operations), waits for completion, and only then frees the pages.
    ///
    /// # Safety
    /// As [`PageTable::unmap`]; `alloc` is the allocator this tree's tables came from.
    ///
    /// # Errors
    /// As [`PageTable::unmap`]. On error nothing has changed and no page is held or freed.
    pub unsafe fn unmap_and_reclaim<T: Tlb + ?Sized>(
        &mut self,
        virt: VirtRange,
        tlb: &T,
        alloc: &mut impl TableAlloc,
    ) -> Result<u64, MmuError> {
        self.edit(virt, Edit::Unmap { reclaim: true }, tlb, alloc)
    }

    /// As [`PageTable::unmap`] without splitting, flushing or freeing, calling
    /// `on_leaf(va, pa, bytes)` for each page or block as it is cleared, in ascending order:
    /// how vfree learns which frames to free without a second walk. The vmalloc fast path.
    ///
    /// The old translations live on in TLBs until the caller invalidates them ([`super::tlb`]);
    /// until then the range must not be mapped again. Table pages are kept.
    ///
    /// # Safety
    /// Nothing the program still uses may live in `virt` (as for [`PageTable::unmap`]).
    ///
    /// # Errors
    /// [`AddrError::Misaligned`] / [`MmuError::OutsideVaRange`] as for [`PageTable::map`];
    /// [`MmuError::WouldSplitBlock`] when `virt` covers only part of a block. On error
    /// nothing has changed and `on_leaf` has not been called.
    pub unsafe fn unmap_with<F: FnMut(VirtAddr, PhysAddr, u64)>(
        &mut self,
        virt: VirtRange,
        mut on_leaf: F,
    ) -> Result<(), MmuError> {
        let span = self.span(virt.start(), virt.size())?;
        if let Some(first) = self.page_tables(span) {
            // Pages of existing last-level tables: nothing can be refused, one pass.
            for (table, run) in self.page_runs(span, first) {
                let (at, count) = (index_at(run.first, PAGE_LEVEL), run.pages());
                for k in 0..count {
                    // SAFETY: `table` is the base of a table page of this tree (`page_runs`), and
                    // `at + k < ENTRIES`: the run lies within that table. Atomic: the MMU
                    // reads the same memory, so each access is a single 64-bit load or store.
                    let raw = unsafe { load_entry(table.add(at + k)) };
                    if raw & PAGE_BITS == PAGE_BITS {
                        // SAFETY: as above; `&mut self` excludes other writers.
                        unsafe { store_entry(table.add(at + k), Descriptor::INVALID.raw()) };
                        let va = run.first + (k * PAGE_SIZE) as u64;
                        on_leaf(VirtAddr::new(va), PhysAddr::new(raw & OUTPUT_ADDR_MASK), PAGE_SIZE as u64);
                    }
                }
            }
        } else {
            let root = self.root;
            self.unmap_level::<F>(None, root, ROOT_LEVEL, span)?;
            self.unmap_level(Some(&mut on_leaf), root, ROOT_LEVEL, span)?;
        }
        arch::publish_descriptors();
        Ok(())
    }

    /// Give back to `alloc` every table page (never the root) that holds no valid entry,
    /// whose span meets `virt` and lies wholly inside `within`; a table emptied by freeing
    /// its own empty subtables goes too (every level: last-level tables, then the tables
    /// above them). No leaf is touched: a table holding a page or a block stays. Returns how
    /// many table pages were freed.
    ///
    /// This is vmalloc's purge after its lazy unmaps (Linux keeps its kernel tables; arm64's
    /// memory hot-remove frees them the same way, `free_empty_tables`). Emptiness is read
    /// here, under the caller's `&mut`, so nothing can refill a table between the check and
    /// its release. For each table released, in order:
    ///
    /// ```text
    ///  parent entry = invalid                       (each emptied table, bottom up)
    ///  dsb ishst ; tlbi vaae1is <table's base> ... ; dsb ish ; isb
    ///                                               (one all-levels TLBI per table: it drops the
    ///                                                walk-cache entries that point at it; one
    ///                                                vmalle1is above MAX_PAGE_INVALIDATIONS)
    ///  free the page                                (only after the invalidation completed)
    /// ```
    ///
    /// One TLBI by VA per table is enough, as for Linux's `__flush_tlb_kernel_pgtable`: a
    /// walk-cache entry holding the cleared descriptor translates every address of the
    /// table's span, so an invalidation at one of them drops it; entries of the freed table
    /// itself were invalid (each cleared earlier with its own invalidation).
    ///
    /// # Safety
    /// `alloc` is the allocator this tree's tables came from, and `tlb` reaches every core
    /// that may hold translations from this tree.
    ///
    /// # Errors
    /// [`AddrError::Misaligned`] / [`AddrError::Empty`] and [`MmuError::OutsideVaRange`] for
    /// `virt` or `within`, as for [`PageTable::map`]. On error nothing has changed.
    pub unsafe fn free_empty_tables<T: Tlb + ?Sized>(
        &mut self,
        virt: VirtRange,
        within: VirtRange,
        tlb: &T,
        alloc: &mut impl TableAlloc,
    ) -> Result<usize, MmuError> {
        // SAFETY: forwarded from our caller.
        unsafe { self.flush_and_free_empty_tables(LeafFlush::None, &[virt], within, tlb, alloc) }
    }

    /// [`PageTable::free_empty_tables`] for every range of `spans`, with the invalidation of
    /// `leaves` in the same batch: cleared descriptors, then one `dsb ishst`, the leaves'
    /// `tlbi vaale1is` and the tables' `tlbi vaae1is` (or one `vmalle1is`, which covers
    /// both: for [`LeafFlush::All`], or above [`MAX_PAGE_INVALIDATIONS`](super::tlb::MAX_PAGE_INVALIDATIONS)
    /// tables), one `dsb ish; isb`, and only then the frees. vmalloc's purge: the tables
    /// cost no barrier of their own, and no TLBI at all when the purge flushes everything.
    ///
    /// # Safety
    /// As [`PageTable::free_empty_tables`]; the leaves are invalidated whatever they map.
    ///
    /// # Errors
    /// As [`PageTable::free_empty_tables`], for any of `spans` or `within`: then nothing has
    /// changed and nothing was invalidated.
    pub unsafe fn flush_and_free_empty_tables<T: Tlb + ?Sized>(
        &mut self,
        leaves: LeafFlush<'_>,
        spans: &[VirtRange],
        within: VirtRange,
        tlb: &T,
        alloc: &mut impl TableAlloc,
    ) -> Result<usize, MmuError> {
        let within = self.span(within.start(), within.size())?;
        for s in spans {
            self.span(s.start(), s.size())?;
        }
        let mut batch = TlbBatch::new();
        let mut freed = Reserve { head: PhysAddr::new(0), len: 0 };
        let root = self.root;
        for s in spans {
            let span = Span { first: s.start().as_u64(), last: s.end().as_u64() - 1 };
            self.free_empty_level(&mut batch, &mut freed, tlb, root, ROOT_LEVEL, span, within);
        }
        // Cleared descriptors reach memory, then every TLB and walk cache drops them; only
        // then may the pages be reused.
        match leaves {
            LeafFlush::All => tlb.invalidate_all(),
            LeafFlush::Pages(pages) => {
                batch.issue_with_leaves(tlb, pages);
            }
            LeafFlush::None => {
                batch.issue(tlb);
            }
        }
        let n = freed.len;
        self.tables -= n;
        while let Some(page) = self.reserve_pop(&mut freed) {
            // SAFETY: `page` is a table of this tree, from `alloc` (the caller's promise);
            // its descriptor was cleared and the invalidation above, complete on return,
            // covered the walk caches for the span it covered: nothing reaches it.
            unsafe { alloc.free_table(page) };
        }
        Ok(n)
    }

    /// One level of [`PageTable::free_empty_tables`]: the tables of `table` (at `level`)
    /// meeting `span`, each after its own subtables.
    #[allow(clippy::too_many_arguments)]
    fn free_empty_level<T: Tlb + ?Sized>(
        &mut self,
        batch: &mut TlbBatch,
        freed: &mut Reserve,
        tlb: &T,
        table: PhysAddr,
        level: usize,
        span: Span,
        within: Span,
    ) {
        let size = level_size(level);
        let mut va = span.first;
        loop {
            let last = (va | (size - 1)).min(span.last);
            let index = index_at(va, level);
            let base = va & !(size - 1);
            if let Some(next) = self.read(table, index).table_address(level) {
                if level + 1 < PAGE_LEVEL {
                    let sub = Span { first: va, last };
                    self.free_empty_level(batch, freed, tlb, next, level + 1, sub, within);
                }
                let inside = base >= within.first && base + (size - 1) <= within.last;
                if inside && self.table_is_empty(next) {
                    self.write(table, index, Descriptor::INVALID);
                    tlb.note_write(EntryWrite {
                        va: VirtAddr::new(base),
                        level: level as u8,
                        descriptor: Descriptor::INVALID,
                    });
                    batch.walk(VirtAddr::new(base));
                    // The chain link written into the dead table is a page-aligned address:
                    // read as a descriptor by a stale walk, it is invalid.
                    self.reserve_push(freed, next);
                }
            }
            if last == span.last {
                return;
            }
            va = last + 1;
        }
    }

    /// Give every page and block in `virt` the permissions `permissions`, keeping its output
    /// address and memory type, and invalidate the TLB entries of what changed before
    /// returning.
    ///
    /// A leaf that `virt` wholly covers is rewritten in place: a permission-only change needs
    /// no break-before-make, so the mapping never goes away (protecting live code or a live
    /// stack is allowed, within the rule below). A leaf that already has `permissions` is
    /// left alone. A block that `virt` cuts through (and whose permissions differ) is split
    /// first, by break-before-make:
    ///
    /// ```text
    ///  build the next-level table: same output addresses and attributes   (off-line)
    ///  block entry = invalid ; dsb ishst                                   break
    ///  tlbi vaae1is <block base> ; dsb ish ; isb                           (one TLBI drops
    ///  entry = table descriptor ; dsb ishst ; isb                           the whole block) make
    /// ```
    ///
    /// One `tlbi vaae1is` suffices: a TLBI by VA drops every cached entry that would
    /// translate the address, and a block translates every address inside it, however a TLB
    /// has stored it (Linux flushes a split huge page the same way, one TLBI per block).
    /// A full `tlbi vmalle1is` would also work but costs every other core's TLB contents.
    /// Nested cuts (a 1 GiB block cut inside one of its 2 MiB parts) are built off-line as
    /// a small subtree, so there is one break-before-make per block of the live tree.
    ///
    /// # Safety
    /// - No reference the program holds into `virt` may be invalidated by the change:
    ///   nothing borrowed mutably may become read-only, and no code being executed
    ///   non-executable.
    /// - When a block is split, the rule of [`PageTable::unmap`] for the break-before-make
    ///   window applies to the whole block.
    /// - `tlb` reaches every core that may hold translations from this tree.
    ///
    /// # Errors
    /// [`AddrError::Misaligned`] / [`MmuError::OutsideVaRange`] as for [`PageTable::map`];
    /// [`MmuError::NotMapped`] at the first hole; [`MmuError::ExecutableDevice`] when asking
    /// for execute on device memory; [`MmuError::ForeignDescriptor`] on a leaf whose bits
    /// this module did not write; for a split, [`MmuError::SplitWouldUnmapTable`],
    /// [`MmuError::OutOfMemory`] and [`MmuError::BadTablePage`]. On error nothing has
    /// changed and no page is held.
    pub unsafe fn protect<T: Tlb + ?Sized>(
        &mut self,
        virt: VirtRange,
        permissions: Permissions,
        tlb: &T,
        alloc: &mut impl TableAlloc,
    ) -> Result<(), MmuError> {
        self.edit(virt, Edit::Protect(permissions), tlb, alloc).map(|_| ())
    }

    /// Where `va` translates to, or `None` when it is unmapped or outside this tree's half.
    pub fn translate(&self, va: VirtAddr) -> Option<Translation> {
        if !self.va_range.contains(va) {
            return None;
        }
        let raw = va.as_u64();
        let mut table = self.root;
        for level in ROOT_LEVEL..=PAGE_LEVEL {
            match self.read(table, index_at(raw, level)).decode(level) {
                Entry::Invalid => return None,
                Entry::Table(next) => table = next,
                Entry::Leaf { phys, attributes } => {
                    let offset = raw & (level_size(level) - 1);
                    return Some(Translation { phys: phys.add(offset), attributes, level });
                }
            }
        }
        None
    }

    /// The lowest address of `virt` that a page or block maps, or `None` when nothing in
    /// `virt` is mapped (or `virt` lies outside this tree's half). One descent per table the
    /// range touches, empty entries skipped: checking a 2 MiB range reads at most one page
    /// table, not 512 walks.
    pub fn first_mapped(&self, virt: VirtRange) -> Option<VirtAddr> {
        let (s, e) = (virt.start().as_u64(), virt.end().as_u64());
        if !self.va_range.contains(virt.start()) || !self.va_range.contains(VirtAddr::new(e - 1)) {
            return None;
        }
        self.first_mapped_level(self.root, ROOT_LEVEL, self.va_range.start().as_u64(), s, e).map(VirtAddr::new)
    }

    /// [`Self::first_mapped`] in the table at `level` whose first entry translates `base`,
    /// for `[s, e)` (inside that table's span).
    fn first_mapped_level(&self, table: PhysAddr, level: usize, base: u64, s: u64, e: u64) -> Option<u64> {
        let size = level_size(level);
        let first = ((s.max(base) - base) / size) as usize;
        let last = (((e - 1 - base) / size) as usize).min(ENTRIES - 1);
        for i in first..=last {
            let va = base + i as u64 * size;
            match self.read(table, i).decode(level) {
                Entry::Invalid => {}
                Entry::Table(next) => {
                    if let Some(at) = self.first_mapped_level(next, level + 1, va, s, e) {
                        return Some(at);
                    }
                }
                Entry::Leaf { .. } => return Some(va.max(s)),
            }
        }
        None
    }

    /// Calls `f(va, level, translation)` for every leaf of the tree (blocks and pages) in
    /// address order: introspection for tests, audits (W^X, nothing mapped in a guard page)
    /// and dumps. O(mapped entries + tables).
    pub fn walk(&self, f: &mut dyn FnMut(VirtAddr, usize, Translation)) {
        let base = self.va_range.start().as_u64();
        self.walk_level(self.root, ROOT_LEVEL, base, f);
    }

    fn walk_level(&self, table: PhysAddr, level: usize, base: u64, f: &mut dyn FnMut(VirtAddr, usize, Translation)) {
        for i in 0..ENTRIES {
            let va = base + (i as u64) * level_size(level);
            match self.read(table, i).decode(level) {
                Entry::Invalid => {}
                Entry::Table(next) => self.walk_level(next, level + 1, va, f),
                Entry::Leaf { phys, attributes } => {
                    f(VirtAddr::new(va), level, Translation { phys, attributes, level })
                }
            }
        }
    }

    /// Give every table page of the tree, the root included, back to `alloc`. Pages that
    /// leaves map are not touched: they belong to whoever mapped them.
    ///
    /// # Safety
    /// The tree is in no `TTBR` of any core and no TLB or walk cache holds entries from it
    /// (after the last `TTBR` change a full invalidation has completed); `alloc` is the
    /// allocator its tables came from.
    pub unsafe fn free_all(self, alloc: &mut impl TableAlloc) {
        self.free_level(self.root, ROOT_LEVEL, alloc);
        // SAFETY: the root came from `alloc` (caller's promise) and, by the caller's promise,
        // nothing refers to the tree any more.
        unsafe { alloc.free_table(self.root) };
    }

    // ---- the walks -----------------------------------------------------------------------

    /// Validate `start .. start + size` and turn it into an inclusive span.
    fn span(&self, start: VirtAddr, size: u64) -> Result<Span, MmuError> {
        if size == 0 {
            return Err(MmuError::Addr(AddrError::Empty));
        }
        if !start.is_page_aligned() || !size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MmuError::Addr(AddrError::Misaligned));
        }
        // The end must be representable: a `VirtRange` cannot end at 2^64, so the last page
        // of the upper half is never mapped (it could never be unmapped).
        let end = start.checked_add(size)?;
        let last = end.as_u64() - 1;
        if !self.va_range.contains(start) || !self.va_range.contains(VirtAddr::new(last)) {
            return Err(MmuError::OutsideVaRange(start));
        }
        Ok(Span { first: start.as_u64(), last })
    }

    fn map_span(
        &mut self,
        span: Span,
        src: &Source<'_>,
        attributes: Attributes,
        policy: BlockPolicy,
        alloc: &mut impl TableAlloc,
    ) -> Result<(), MmuError> {
        if let Some(first) = self.page_tables(span) {
            return self.map_pages(span, first, src, attributes);
        }

        src.check_frames()?;
        let root = Some(self.root);
        let mut plan = Pass::Plan { tables: 0 };
        self.map_level(&mut plan, root, ROOT_LEVEL, span, src, attributes, policy)?;
        let needed = match plan {
            Pass::Plan { tables } => tables,
            Pass::Apply(_) => 0,
        };

        let reserve = self.reserve(needed, alloc)?;
        let mut apply = Pass::Apply(reserve);
        let result = self.map_level(&mut apply, root, ROOT_LEVEL, span, src, attributes, policy);
        if let Pass::Apply(mut left) = apply {
            // The plan counted exactly what apply takes; anything left is given back.
            debug_assert_eq!(left.len, 0);
            self.tables += needed - left.len;
            self.reserve_release(&mut left, alloc);
        }
        arch::publish_descriptors();
        result
    }

    /// [`PageTable::map_span`] when every last-level table of `span` exists (the vmalloc
    /// case), `first` being the first one: check every entry (and frame), then write. The
    /// general walk would decide exactly the same, at several times the cost. Checking first
    /// keeps a refused call from writing anything: a page written and taken back could
    /// already sit in a TLB, with nobody to invalidate it.
    fn map_pages(
        &mut self,
        span: Span,
        first: *mut u64,
        src: &Source<'_>,
        attributes: Attributes,
    ) -> Result<(), MmuError> {
        // Spans are built from the source's own length, so every page has an address; the
        // last one is checked before any access all the same, so a slip could never half-map.
        src.pa(span.last & !(PAGE_SIZE as u64 - 1)).ok_or(MmuError::Addr(AddrError::Overflow))?;
        // One pass over entries and frames, no branch per page: ORs, looked at afterwards.
        let (mut pages, mut bits) = (0, 0);
        for (table, run) in self.page_runs(span, first) {
            // SAFETY: `table` is the base of a table page of this tree (`page_runs`); the run's
            // entries lie within it.
            let entries = unsafe { table.add(index_at(run.first, PAGE_LEVEL)) };
            match *src {
                // SAFETY: as above.
                Source::Contiguous { .. } => pages |= unsafe { pages_among(entries, run.pages()) },
                Source::Frames { va0, frames } => {
                    let at = ((run.first - va0) / PAGE_SIZE as u64) as usize;
                    for (k, frame) in frames[at..at + run.pages()].iter().enumerate() {
                        // SAFETY: `k < run.pages()`: inside the run. Atomic: one 64-bit load.
                        let raw = unsafe { load_entry(entries.add(k)) };
                        pages |= raw & (raw >> 1);
                        bits |= frame.as_u64();
                    }
                }
            }
        }
        if frame_bits_bad(bits) {
            // The rescan names the first bad frame; it cannot pass when the OR of the same
            // frames had a bad bit, but never report success with nothing mapped.
            src.check_frames()?;
            return Err(MmuError::Addr(AddrError::Misaligned));
        }
        if pages & 1 != 0 {
            for (table, run) in self.page_runs(span, first) {
                // SAFETY: as above.
                if let Some(k) = unsafe { first_page(table.add(index_at(run.first, PAGE_LEVEL)), run.pages()) } {
                    return Err(MmuError::AlreadyMapped(VirtAddr::new(run.first + (k * PAGE_SIZE) as u64)));
                }
            }
        }
        let template = Descriptor::new_leaf(PAGE_LEVEL, PhysAddr::new(0), attributes).raw();
        for (table, run) in self.page_runs(span, first) {
            // SAFETY: the run's entries lie in the table page at `table` (`page_runs`), which
            // this tree owns (`&mut self`); the frames were checked above, a contiguous source
            // by `map`; the source covers the span.
            unsafe { src.fill(table.add(index_at(run.first, PAGE_LEVEL)), run, template) };
        }
        arch::publish_descriptors();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn map_level(
        &mut self,
        pass: &mut Pass,
        table: Option<PhysAddr>,
        level: usize,
        span: Span,
        src: &Source<'_>,
        attributes: Attributes,
        policy: BlockPolicy,
    ) -> Result<(), MmuError> {
        if let (Pass::Plan { .. }, None, PAGE_LEVEL) = (&*pass, table, level) {
            // A last-level table still to be made: every entry will be a new page, nothing can
            // be refused but a source too short, and sources only grow (check the last page).
            src.pa(span.last & !(PAGE_SIZE as u64 - 1)).ok_or(MmuError::Addr(AddrError::Overflow))?;
            return Ok(());
        }
        if let (PAGE_LEVEL, Some(t)) = (level, table) {
            // A last-level table: the plan checks its entries in one tight loop (a page there
            // refuses the call), the apply pass writes them in another.
            // SAFETY: `t` is a table page of this tree and the span lies within its 2 MiB.
            let entries = unsafe { self.table_base(t).add(index_at(span.first, PAGE_LEVEL)) };
            src.pa(span.last & !(PAGE_SIZE as u64 - 1)).ok_or(MmuError::Addr(AddrError::Overflow))?;
            match pass {
                Pass::Plan { .. } => {
                    // SAFETY: as above.
                    if unsafe { pages_among(entries, span.pages()) } & 1 != 0 {
                        // SAFETY: as above.
                        let k = unsafe { first_page(entries, span.pages()) }.unwrap_or(0);
                        return Err(MmuError::AlreadyMapped(VirtAddr::new(span.first + (k * PAGE_SIZE) as u64)));
                    }
                }
                Pass::Apply(_) => {
                    let template = Descriptor::new_leaf(PAGE_LEVEL, PhysAddr::new(0), attributes).raw();
                    // SAFETY: the entries lie in a table page this tree owns (`&mut self`), found
                    // free by the plan (or zeroed just now); output addresses were checked by
                    // `map` / `check_frames`; the source covers the span (checked above).
                    unsafe { src.fill(entries, span, template) };
                }
            }
            return Ok(());
        }
        let size = level_size(level);
        // Every leaf of this level is stamped from one template.
        let template = (level >= 1).then(|| Descriptor::new_leaf(level, PhysAddr::new(0), attributes));
        let mut va = span.first;
        loop {
            let last = (va | (size - 1)).min(span.last);
            let index = index_at(va, level);
            let whole = va & (size - 1) == 0 && last - va == size - 1;
            let leaf_here = level == PAGE_LEVEL
                || (level >= 1 && whole && policy == BlockPolicy::AllowBlocks && src.can_use_block(va, size));
            let current = match table {
                Some(t) => self.read(t, index).decode(level),
                None => Entry::Invalid,
            };
            let sub = Span { first: va, last };
            match current {
                Entry::Leaf { .. } => return Err(MmuError::AlreadyMapped(VirtAddr::new(va))),
                Entry::Table(next) => {
                    self.map_level(pass, Some(next), level + 1, sub, src, attributes, policy)?;
                }
                Entry::Invalid if leaf_here => {
                    let pa = src.pa(va).ok_or(MmuError::Addr(AddrError::Overflow))?;
                    if let (Pass::Apply(_), Some(t), Some(template)) = (&*pass, table, template) {
                        self.write(t, index, template.with_output_address(pa));
                    }
                }
                Entry::Invalid => {
                    let next = match (&mut *pass, table) {
                        (Pass::Plan { tables }, _) => {
                            *tables += 1;
                            None
                        }
                        (Pass::Apply(reserve), Some(t)) => {
                            let new = self.reserve_pop(reserve).ok_or(MmuError::OutOfMemory)?;
                            self.zero_table(new);
                            // The zeroes must reach memory before the pointer to them does.
                            arch::publish_new_table();
                            self.write(t, index, Descriptor::new_table(new));
                            Some(new)
                        }
                        (Pass::Apply(_), None) => return Err(MmuError::OutOfMemory),
                    };
                    self.map_level(pass, next, level + 1, sub, src, attributes, policy)?;
                }
            }
            if last == span.last {
                return Ok(());
            }
            va = last + 1;
        }
    }

    /// Plan (`apply` is `None`: only check) or apply (clear, then report to `apply`).
    fn unmap_level<F: FnMut(VirtAddr, PhysAddr, u64)>(
        &mut self,
        mut apply: Option<&mut F>,
        table: PhysAddr,
        level: usize,
        span: Span,
    ) -> Result<(), MmuError> {
        let size = level_size(level);
        let mut va = span.first;
        loop {
            let last = (va | (size - 1)).min(span.last);
            let index = index_at(va, level);
            let descriptor = self.read(table, index);
            if let Some(phys) = descriptor.leaf_address(level) {
                if va & (size - 1) != 0 || last - va != size - 1 {
                    return Err(MmuError::WouldSplitBlock(VirtAddr::new(va)));
                }
                if let Some(on_leaf) = apply.as_deref_mut() {
                    self.write(table, index, Descriptor::INVALID);
                    on_leaf(VirtAddr::new(va), phys, size);
                }
            } else if let Some(next) = descriptor.table_address(level) {
                // Pages cannot be cut: the plan need not look into a last-level table.
                if apply.is_some() || level + 1 < PAGE_LEVEL {
                    let sub = Span { first: va, last };
                    self.unmap_level(apply.as_deref_mut(), next, level + 1, sub)?;
                }
            }
            if last == span.last {
                return Ok(());
            }
            va = last + 1;
        }
    }

    /// Unmap or protect `virt` (see [`PageTable::unmap`] and [`PageTable::protect`]): plan,
    /// take the split tables, apply, invalidate, free emptied tables.
    fn edit<T: Tlb + ?Sized>(
        &mut self,
        virt: VirtRange,
        edit: Edit,
        tlb: &T,
        alloc: &mut impl TableAlloc,
    ) -> Result<u64, MmuError> {
        let span = self.span(virt.start(), virt.size())?;
        let root = self.root;
        let mut plan: EditPass<'_, T> = EditPass::Plan { tables: 0 };
        self.edit_level(&mut plan, edit, root, ROOT_LEVEL, span)?;
        let needed = match plan {
            EditPass::Plan { tables } => tables,
            EditPass::Apply(_) => 0,
        };
        let reserve = self.reserve(needed, alloc)?;

        let empty = Reserve { head: PhysAddr::new(0), len: 0 };
        let mut pass = EditPass::Apply(EditApply { tlb, reserve, batch: TlbBatch::new(), freed: empty, pages: 0 });
        // The plan checked everything the apply pass could refuse, so this cannot fail; were
        // it to, what was written is still invalidated and accounted for below.
        let result = self.edit_level(&mut pass, edit, root, ROOT_LEVEL, span);
        debug_assert!(result.is_ok(), "apply refused what the plan accepted: {result:?}");
        let EditPass::Apply(mut done) = pass else { unreachable!("the apply pass stays an apply pass") };
        debug_assert_eq!(done.reserve.len, 0, "the plan counts exactly the tables a split takes");
        self.tables += needed - done.reserve.len;
        self.reserve_release(&mut done.reserve, alloc);

        // Writes reach memory, every changed leaf and cleared table entry is dropped from
        // every TLB and walk cache, and only then may emptied tables be reused.
        done.batch.issue(tlb);
        self.tables -= done.freed.len;
        while let Some(page) = self.reserve_pop(&mut done.freed) {
            // SAFETY: `page` is a table of this tree, from `alloc` (the caller's promise for
            // `unmap_and_reclaim`, the only edit that frees); its descriptor was cleared and the
            // batch above, complete on return, invalidated the walk caches for the region it
            // covered: nothing can reach it any more.
            unsafe { alloc.free_table(page) };
        }
        result.map(|()| done.pages)
    }

    /// One level of [`PageTable::edit`]. In the plan pass it only reads: it checks the whole
    /// request and counts the tables splits will take; in the apply pass it writes.
    fn edit_level<T: Tlb + ?Sized>(
        &mut self,
        pass: &mut EditPass<'_, T>,
        edit: Edit,
        table: PhysAddr,
        level: usize,
        span: Span,
    ) -> Result<(), MmuError> {
        let size = level_size(level);
        let mut va = span.first;
        loop {
            let last = (va | (size - 1)).min(span.last);
            let index = index_at(va, level);
            let base = va & !(size - 1);
            let whole = va == base && last - va == size - 1;
            let sub = Span { first: va, last };
            let descriptor = self.read(table, index);
            let entry = match (edit, descriptor.leaf_address(level)) {
                // A whole leaf to unmap: its attributes (the costly part of decoding) are not needed.
                (Edit::Unmap { .. }, Some(phys)) if whole => Entry::Leaf { phys, attributes: None },
                _ => descriptor.decode(level),
            };
            match entry {
                Entry::Invalid => {
                    if let Edit::Protect(_) = edit {
                        return Err(MmuError::NotMapped(VirtAddr::new(va)));
                    }
                }
                Entry::Table(next) => {
                    // Nothing in a last-level table can refuse an unmap: the plan need not look.
                    let plan = matches!(pass, EditPass::Plan { .. });
                    if !(plan && matches!(edit, Edit::Unmap { .. }) && level + 1 == PAGE_LEVEL) {
                        self.edit_level(pass, edit, next, level + 1, sub)?;
                    }
                    if let (Edit::Unmap { reclaim: true }, EditPass::Apply(apply)) = (edit, &mut *pass) {
                        if self.table_is_empty(next) {
                            self.write(table, index, Descriptor::INVALID);
                            let write = EntryWrite {
                                va: VirtAddr::new(base),
                                level: level as u8,
                                descriptor: Descriptor::INVALID,
                            };
                            apply.tlb.note_write(write);
                            apply.batch.walk(VirtAddr::new(base));
                            // The chain link written into the dead table is a page-aligned
                            // address: read as a descriptor by a stale walk, it is invalid.
                            self.reserve_push(&mut apply.freed, next);
                        }
                    }
                }
                Entry::Leaf { phys, attributes } => {
                    let new = match edit {
                        Edit::Unmap { .. } => Descriptor::INVALID,
                        Edit::Protect(permissions) => {
                            let current = attributes.ok_or(MmuError::ForeignDescriptor(VirtAddr::new(va)))?;
                            current.with_permissions(permissions)?;
                            if current.permissions() == permissions {
                                // Nothing to change: no write, no invalidation, no split.
                                if last == span.last {
                                    return Ok(());
                                }
                                va = last + 1;
                                continue;
                            }
                            descriptor.with_permissions(permissions)
                        }
                    };
                    if whole {
                        if let EditPass::Apply(apply) = pass {
                            self.write(table, index, new);
                            apply.batch.leaf(VirtAddr::new(base));
                            if let Edit::Unmap { .. } = edit {
                                apply.pages += size / PAGE_SIZE as u64;
                            }
                        }
                    } else {
                        let attributes = attributes.ok_or(MmuError::ForeignDescriptor(VirtAddr::new(base)))?;
                        match pass {
                            EditPass::Plan { tables } => {
                                self.check_split_window(table, base, size)?;
                                *tables += split_tables(level, sub);
                            }
                            EditPass::Apply(apply) => {
                                let block = Block { table, index, level, base, phys, attributes };
                                let next = self.split(apply, block, sub)?;
                                self.edit_level(pass, edit, next, level + 1, sub)?;
                            }
                        }
                    }
                }
            }
            if last == span.last {
                return Ok(());
            }
            va = last + 1;
        }
    }

    /// Refuse to split the block at `base` (`size` bytes) when the table holding its entry,
    /// `table`, is itself reached through that block in the linear map: the walker would
    /// fault on its own write ending the break-before-make window.
    fn check_split_window(&self, table: PhysAddr, base: u64, size: u64) -> Result<(), MmuError> {
        match self.linear.phys_to_virt(table) {
            Some(va) if self.va_range.contains(va) && va.as_u64() >= base && va.as_u64() - base < size => {
                Err(MmuError::SplitWouldUnmapTable(VirtAddr::new(base)))
            }
            _ => Ok(()),
        }
    }

    /// Replace a live block by a table mapping the same addresses with the same attributes,
    /// by break-before-make (see [`PageTable::protect`]). Parts of it that `span` cuts
    /// through are split further, off-line. Returns the new table.
    fn split<T: Tlb + ?Sized>(
        &mut self,
        apply: &mut EditApply<'_, T>,
        block: Block,
        span: Span,
    ) -> Result<PhysAddr, MmuError> {
        let new = self.build_split(&mut apply.reserve, block.level, block.base, block.phys, block.attributes, span)?;
        let (tlb, level, va) = (apply.tlb, block.level as u8, VirtAddr::new(block.base));
        // Break: after `dsb ish` no core holds the block in a TLB, and none can load it again.
        self.write(block.table, block.index, Descriptor::INVALID);
        tlb.note_write(EntryWrite { va, level, descriptor: Descriptor::INVALID });
        tlb.issue(TlbOp::DsbIshst);
        tlb.issue(TlbOp::AllLevels(va));
        tlb.issue(TlbOp::DsbIsh);
        tlb.issue(TlbOp::Isb);
        // Make. The new table's contents were written before the `dsb ishst` above.
        let table = Descriptor::new_table(new);
        self.write(block.table, block.index, table);
        tlb.note_write(EntryWrite { va, level, descriptor: table });
        tlb.publish();
        Ok(new)
    }

    /// A table for level `level + 1` holding what the block at `level` (`base`, `phys`,
    /// `attributes`) maps, entry by entry; a child that `span` cuts through (not a page) is
    /// itself built as a subtable. Not reachable from the tree yet: no barrier needed here.
    fn build_split(
        &mut self,
        reserve: &mut Reserve,
        level: usize,
        base: u64,
        phys: PhysAddr,
        attributes: Attributes,
        span: Span,
    ) -> Result<PhysAddr, MmuError> {
        let new = self.reserve_pop(reserve).ok_or(MmuError::OutOfMemory)?;
        let child = level + 1;
        let child_size = level_size(child);
        let template = Descriptor::new_leaf(child, PhysAddr::new(0), attributes).raw();
        let entries = self.entry(new, 0);
        for index in 0..ENTRIES {
            let pa = phys.as_u64() + index as u64 * child_size;
            // SAFETY: `entries` points at the first of the 512 aligned words of a table page
            // this tree owns (see `entry`), not reachable from the tree yet: plain stores, which
            // the `dsb` of the break-before-make that installs it orders before the table
            // descriptor.
            unsafe { entries.add(index).write(template | pa) };
        }
        // Only the children holding the span's ends can be cut through: subtables for them.
        let ends = [span.first & !(child_size - 1), span.last & !(child_size - 1)];
        for (i, &va) in ends.iter().enumerate() {
            if child == PAGE_LEVEL || (i == 1 && va == ends[0]) {
                continue;
            }
            if let Some(part) = cut(span, va, child_size) {
                let index = ((va - base) / child_size) as usize;
                let pa = phys.add(va - base);
                let sub = self.build_split(reserve, child, va, pa, attributes, part)?;
                self.write(new, index, Descriptor::new_table(sub));
            }
        }
        Ok(new)
    }

    /// Whether no entry of the table at `table` is valid. A few samples first (a table in
    /// use nearly always has one of them valid), then the whole table in chunks of 64
    /// entries OR-ed together, stopping at the first chunk with a valid entry. The loads
    /// are plain (not volatile), so the compiler may use vector loads: under QEMU's TCG
    /// each load instruction costs a software TLB lookup, so proving a table empty takes
    /// a fraction of 512 of them.
    fn table_is_empty(&self, table: PhysAddr) -> bool {
        let entries = self.table_base(table);
        // SAFETY: `entries` is the base of a table page of this tree: 512 aligned words
        // inside the linear map, valid for reads. Nothing writes them while this shared
        // borrow lives: the walker writes only through `&mut self`, and the MMU never
        // writes our descriptors (no hardware access-flag or dirty-state updates: TCR_EL1's
        // HA and HD stay clear). So a shared reference to the page is sound.
        let words: &[u64; ENTRIES] = unsafe { &*entries.cast::<[u64; ENTRIES]>() };
        let samples = [0, ENTRIES - 1, ENTRIES / 2, ENTRIES / 4, 3 * ENTRIES / 4];
        if samples.iter().fold(0, |acc, &k| acc | words[k]) & 1 != 0 {
            return false;
        }
        words.chunks_exact(64).all(|chunk| chunk.iter().fold(0, |acc, &e| acc | e) & 1 == 0)
    }

    /// Frees the tables below the table at `table` (of `level`), children first. Runs of
    /// 64 zero entries, most of a sparse tree, are skipped by one comparison each; the
    /// other entries are read as table descriptors only (a leaf has nothing to free).
    fn free_level(&self, table: PhysAddr, level: usize, alloc: &mut impl TableAlloc) {
        const ZERO_RUN: [u64; 64] = [0; 64];
        if level == PAGE_LEVEL {
            return;
        }
        // SAFETY: `table` is a table page of this tree: 512 aligned words inside the linear
        // map, valid for reads. Nothing writes it while this borrow lives: `free_all` owns
        // the tree (no walker), its caller promises no core's MMU uses it, and `alloc` is
        // given back only the tables below this one (it may write those), never this one
        // before the loop over it has ended.
        let words: &[u64; ENTRIES] = unsafe { &*self.table_base(table).cast::<[u64; ENTRIES]>() };
        for run in words.chunks_exact(ZERO_RUN.len()).filter(|run| *run != ZERO_RUN) {
            for &raw in run {
                if let Some(next) = Descriptor::from_raw(raw).table_address(level) {
                    self.free_level(next, level + 1, alloc);
                    // SAFETY: `next` is a table this tree took from `alloc` (`free_all`'s
                    // caller promises it is the same allocator) and `free_all`'s caller
                    // promises nothing refers to the tree any more; it is freed once, after
                    // its children.
                    unsafe { alloc.free_table(next) };
                }
            }
        }
    }

    /// The base of the last-level table holding the entry of `va`, when tables exist down
    /// to it. One linear-map lookup per table on the way.
    fn page_table_at(&self, va: u64) -> Option<*mut u64> {
        let mut table = self.table_base(self.root);
        for level in ROOT_LEVEL..PAGE_LEVEL {
            // SAFETY: `table` is the base of a table page of this tree (`table_base`) and the
            // index is below `ENTRIES`. Atomic: the MMU reads the same memory.
            let raw = unsafe { load_entry(table.add(index_at(va, level))) };
            // `table_address` and `table_base` in one test: a table descriptor (levels 0-2)
            // has both low bits set, and its table lies in the window.
            let off = (raw & OUTPUT_ADDR_MASK).wrapping_sub(self.window.pa);
            table = if (raw & PAGE_BITS == PAGE_BITS) & (off < self.window.len) {
                self.linear.ptr_at_offset(off)
            } else {
                self.table_base(Descriptor::from_raw(raw).table_address(level)?)
            };
        }
        Some(table)
    }

    /// The base of the last-level table holding the first entry of `span`, when every entry
    /// of `span` lies in a last-level table that exists already. Mapping or unmapping pages
    /// there allocates no table and splits no block, so it can be done in one pass over each
    /// table (see [`PageTable::page_runs`]).
    fn page_tables(&self, span: Span) -> Option<*mut u64> {
        let first = self.page_table_at(span.first)?;
        let region = level_size(PAGE_LEVEL - 1);
        let mut last = span.first | (region - 1);
        while last < span.last {
            // `last < span.last <= u64::MAX`: no overflow.
            self.page_table_at(last + 1)?;
            last = (last + 1) | (region - 1);
        }
        Some(first)
    }

    /// The pieces of `span` in each 2 MiB region, in ascending order, with the base of the
    /// last-level table holding their entries; `first` is that of the first piece, from
    /// [`PageTable::page_tables`], which has found that the others exist too (the tree
    /// cannot have changed since: both borrow `self`).
    fn page_runs(&self, span: Span, first: *mut u64) -> impl Iterator<Item = (*mut u64, Span)> + '_ {
        let region = level_size(PAGE_LEVEL - 1);
        let mut next = Some(span.first);
        core::iter::from_fn(move || {
            let va = next?;
            let last = (va | (region - 1)).min(span.last);
            next = (last != span.last).then_some(last + 1);
            let table = if va == span.first { Some(first) } else { self.page_table_at(va) };
            debug_assert!(table.is_some(), "page_tables found every last-level table");
            Some((table?, Span { first: va, last }))
        })
    }

    // ---- table memory ----------------------------------------------------------------------

    /// A page from `alloc`, checked usable as a table: 4 KiB aligned, below 2^48, inside the
    /// linear map at a 4 KiB aligned virtual address.
    fn take_table(&self, alloc: &mut impl TableAlloc) -> Result<PhysAddr, MmuError> {
        let page = alloc.alloc_table().ok_or(MmuError::OutOfMemory)?;
        let last = page.checked_add(PAGE_SIZE as u64 - 1);
        let usable = page.is_page_aligned()
            && page.as_u64() < PA_LIMIT
            && last.is_ok_and(|l| self.linear.covers(l))
            && self.linear.phys_to_virt(page).is_some_and(|va| va.is_page_aligned());
        if usable {
            Ok(page)
        } else {
            // SAFETY: the page came from this allocator a moment ago and was never used.
            unsafe { alloc.free_table(page) };
            Err(MmuError::BadTablePage(page))
        }
    }

    /// A pointer to entry `index` of the table at `table`.
    ///
    /// Every `table` passed here is the root or a page installed by this tree: each went
    /// through `take_table`, so it lies wholly inside the linear map at a 4 KiB aligned
    /// virtual address, and `index < ENTRIES` keeps the pointer inside that page.
    fn entry(&self, table: PhysAddr, index: usize) -> *mut u64 {
        debug_assert!(index < ENTRIES);
        self.table_base(table).wrapping_add(index)
    }

    /// A pointer to the first entry of the table at `table`, which is the root or a page
    /// installed by this tree (see [`PageTable::entry`]): `add(index)` with `index <
    /// ENTRIES` stays inside the page. Loops over a table take it once.
    fn table_base(&self, table: PhysAddr) -> *mut u64 {
        // `LinearMap::ptr` with one comparison: below the window the difference wraps above
        // `len` (the window ends by 2^64).
        let off = table.as_u64().wrapping_sub(self.window.pa);
        if off < self.window.len {
            self.linear.ptr_at_offset(off)
        } else {
            self.linear.ptr::<u64>(table)
        }
    }

    fn read(&self, table: PhysAddr, index: usize) -> Descriptor {
        // SAFETY: `entry` points at an aligned u64 inside a table page this tree owns (see
        // `entry`), readable through the linear map (`LinearMap::new`'s contract). Atomic:
        // the MMU reads the same memory, so the access must be a single 64-bit load.
        Descriptor::from_raw(unsafe { load_entry(self.entry(table, index)) })
    }

    fn write(&mut self, table: PhysAddr, index: usize, descriptor: Descriptor) {
        // SAFETY: as in `read`; the page is owned by this tree alone (`TableAlloc`'s contract)
        // and `&mut self` excludes other writers. Atomic: one 64-bit store, so a concurrent
        // table walk never sees half a descriptor.
        unsafe { store_entry(self.entry(table, index), descriptor.raw()) }
    }

    fn zero_table(&mut self, table: PhysAddr) {
        // SAFETY: a page from `take_table` (page aligned, whole inside the linear map, ours
        // alone by `TableAlloc`'s contract) not yet reachable from the tree. The store-pair
        // loop, not `write_bytes`: under QEMU TCG less than half a memset's time.
        unsafe { crate::cpu::zero_page(self.linear.ptr::<u8>(table)) }
    }

    /// `needed` table pages from `alloc`, all or none.
    fn reserve(&mut self, needed: usize, alloc: &mut impl TableAlloc) -> Result<Reserve, MmuError> {
        let mut reserve = Reserve { head: PhysAddr::new(0), len: 0 };
        while reserve.len < needed {
            match self.take_table(alloc) {
                Ok(page) => self.reserve_push(&mut reserve, page),
                Err(e) => {
                    self.reserve_release(&mut reserve, alloc);
                    return Err(e);
                }
            }
        }
        Ok(reserve)
    }

    fn reserve_push(&mut self, reserve: &mut Reserve, page: PhysAddr) {
        // The first word of each reserved page holds the next one; `len` says how many.
        self.write(page, 0, Descriptor::from_raw(reserve.head.as_u64()));
        reserve.head = page;
        reserve.len += 1;
    }

    fn reserve_pop(&mut self, reserve: &mut Reserve) -> Option<PhysAddr> {
        if reserve.len == 0 {
            return None;
        }
        let page = reserve.head;
        reserve.head = PhysAddr::new(self.read(page, 0).raw());
        reserve.len -= 1;
        Some(page)
    }

    fn reserve_release(&mut self, reserve: &mut Reserve, alloc: &mut impl TableAlloc) {
        while let Some(page) = self.reserve_pop(reserve) {
            // SAFETY: taken from `alloc` by this call and never installed in the tree.
            unsafe { alloc.free_table(page) };
        }
    }
}
