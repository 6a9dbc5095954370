//! [`LeafTable`]: one last-level table of a [`PageTable`], pinned by a caller that maps and
//! unmaps pages of its 2 MiB itself, without the tree's lock and without a walk from the
//! root: `memory`'s `vm_map_ram` blocks, and vmalloc's hot table (the last-level table its
//! last call used). A PTE store per page, as Linux's `vmap_pages_range` ends in, with the
//! table found once instead of once per call.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{
    arch, frame_bits_bad, index_at, level_size, pages_among, Descriptor, Entry, MmuError, PageTable, OUTPUT_ADDR_MASK,
    PAGE_BITS, PAGE_LEVEL, ROOT_LEVEL,
};
use crate::addr::{PhysAddr, VirtAddr, PAGE_SIZE};
use crate::mmu::attr::Attributes;
use crate::mmu::table::ENTRIES;

/// The 512 entries of one last-level table, from [`PageTable::leaf_table`]. Copying the
/// handle is safe; every use of the entries is `unsafe`: the caller keeps the table in its
/// tree (it frees no table of the 2 MiB while a handle is used) and owns the entries it
/// writes.
#[derive(Clone, Copy, Debug)]
pub struct LeafTable {
    entries: NonNull<u64>,
    base: u64,
}

// SAFETY: a handle is an address; what may be done through it is bounded by the `unsafe`
// methods' contracts (each entry written by its one owner, with single-copy-atomic
// stores), whichever CPU does it.
unsafe impl Send for LeafTable {}
// SAFETY: as above: `&LeafTable` only gives the same `unsafe` methods.
unsafe impl Sync for LeafTable {}

impl LeafTable {
    /// The address of the entries, for a caller that keeps handles in atomics
    /// ([`Self::from_raw`] makes the handle again).
    pub fn as_ptr(&self) -> NonNull<u64> {
        self.entries
    }

    /// The handle whose [`Self::as_ptr`] and [`Self::base`] these are.
    ///
    /// # Safety
    /// `entries` and `base` come from one handle's [`Self::as_ptr`] and [`Self::base`].
    #[inline]
    pub unsafe fn from_raw(entries: NonNull<u64>, base: VirtAddr) -> Self {
        Self { entries, base: base.as_u64() }
    }

    /// The first virtual address the table translates (2 MiB aligned).
    pub fn base(&self) -> VirtAddr {
        VirtAddr::new(self.base)
    }

    /// Writes page descriptors for `frames` into entries `first ..`, with `attributes`, then
    /// publishes them (`dsb ishst; isb`): the pages are usable on return.
    ///
    /// # Errors
    /// [`MmuError::Addr`] for a frame that is not page aligned or at or above 2^48, and
    /// [`MmuError::AlreadyMapped`] when one of the entries is a page already; nothing is
    /// written then.
    ///
    /// # Safety
    /// - The table is still in its tree: no table of its 2 MiB was freed since
    ///   [`PageTable::leaf_table`] gave the handle.
    /// - `first + frames.len() <= 512`; those entries are invalid and their pages' TLB
    ///   entries invalidated since they were last cleared; no one else writes them until
    ///   the caller clears them.
    #[inline]
    pub unsafe fn map_pages(&self, first: usize, frames: &[PhysAddr], attributes: Attributes) -> Result<(), MmuError> {
        debug_assert!(first + frames.len() <= ENTRIES);
        if frame_bits_bad(frames.iter().fold(0, |b, f| b | f.as_u64())) {
            return Err(MmuError::Addr(crate::addr::AddrError::Misaligned));
        }
        // SAFETY: entries `first ..` of the table page (caller's promise on the range).
        if unsafe { pages_among(self.entries.as_ptr().add(first), frames.len()) } & 1 != 0 {
            return Err(MmuError::AlreadyMapped(VirtAddr::new(self.base + (first * PAGE_SIZE) as u64)));
        }
        let template = Descriptor::new_leaf(PAGE_LEVEL, PhysAddr::new(0), attributes).raw();
        for (k, f) in frames.iter().enumerate() {
            // SAFETY: `first + k < 512`: an entry of the table page, which is in the linear
            // map and still in the tree (caller's promise). Atomic: one 64-bit store, so a
            // table walk or another CPU's read never sees half a descriptor.
            unsafe { AtomicU64::from_ptr(self.entries.as_ptr().add(first + k)) }
                .store(template | f.as_u64(), Ordering::Relaxed);
        }
        arch::publish_descriptors();
        Ok(())
    }

    /// Whether any of entries `first .. first + count` is a page (a map there would be
    /// refused): for a caller that checks every table of a range before writing any.
    ///
    /// # Safety
    /// As [`Self::map_pages`] for the table; `first + count <= 512`.
    #[inline]
    pub unsafe fn any_page(&self, first: usize, count: usize) -> bool {
        debug_assert!(first + count <= ENTRIES);
        // SAFETY: entries of the table page (caller's promise).
        let pages = unsafe { pages_among(self.entries.as_ptr().add(first), count) };
        pages & 1 != 0
    }

    /// Clears the pages among entries `first .. first + count`, with no TLB maintenance,
    /// calling `on_frame` with the frame each pointed at, in order (vmalloc's `vfree`).
    ///
    /// # Safety
    /// As [`Self::clear_pages`].
    #[inline]
    pub unsafe fn take_pages(&self, first: usize, count: usize, mut on_frame: impl FnMut(PhysAddr)) {
        debug_assert!(first + count <= ENTRIES);
        for k in 0..count {
            // SAFETY: as in `map_pages`.
            let e = unsafe { AtomicU64::from_ptr(self.entries.as_ptr().add(first + k)) };
            let raw = e.load(Ordering::Relaxed);
            if raw & PAGE_BITS == PAGE_BITS {
                e.store(0, Ordering::Relaxed);
                on_frame(PhysAddr::new(raw & OUTPUT_ADDR_MASK));
            }
        }
        arch::dsb_ishst();
    }

    /// Clears entries `first .. first + count`, with no TLB maintenance and no barrier (the
    /// caller invalidates, through a flush that begins with `dsb ishst`, before the pages
    /// are mapped again).
    ///
    /// # Safety
    /// As [`Self::map_pages`] for the table; the entries are the caller's, mapped by it, and
    /// nothing the program still uses lives in their pages.
    #[inline]
    pub unsafe fn clear_pages(&self, first: usize, count: usize) {
        debug_assert!(first + count <= ENTRIES);
        for k in 0..count {
            // SAFETY: as in `map_pages`.
            unsafe { AtomicU64::from_ptr(self.entries.as_ptr().add(first + k)) }.store(0, Ordering::Relaxed);
        }
        // No barrier, as Linux's `__set_pte` for an invalid entry: the flush that must come
        // before the pages are mapped again starts with `dsb ishst` on the core that
        // issues it, and that core orders itself after this one through the caller's
        // synchronisation (an acquire that observed these stores; ARMv8 is other-multi-copy
        // atomic, so the table walkers observe them too). An invalid entry needs no `isb`.
    }
}

impl PageTable {
    /// The last-level table that translates `va` if there is one (never makes one: a
    /// caller about to unmap finds nothing to unmap where there is none, and a block or an
    /// unmapped upper level gives `None`).
    pub fn find_leaf_table(&self, va: VirtAddr) -> Option<LeafTable> {
        let page = va.as_u64() & !(PAGE_SIZE as u64 - 1);
        let span = self.span(VirtAddr::new(page), PAGE_SIZE as u64).ok()?;
        let base = span.first & !(level_size(PAGE_LEVEL - 1) - 1);
        let t = self.page_table_at(span.first)?;
        Some(LeafTable { entries: NonNull::new(t)?, base })
    }

    /// The last-level table that translates `va`, made now if there is none (one page from
    /// `alloc` per missing level, all or none): for a caller that maps and unmaps pages of
    /// that 2 MiB through the handle ([`LeafTable`]). The table counts in
    /// [`PageTable::table_pages`] as any other and is freed like any other once empty (which
    /// the handle's user must prevent while it uses the handle).
    ///
    /// # Errors
    /// [`MmuError::OutsideVaRange`]; [`MmuError::AlreadyMapped`] when a block maps `va`;
    /// [`MmuError::OutOfMemory`] / [`MmuError::BadTablePage`] (then nothing changed).
    pub fn leaf_table(&mut self, va: VirtAddr, alloc: &mut impl super::TableAlloc) -> Result<LeafTable, MmuError> {
        let page = va.as_u64() & !(PAGE_SIZE as u64 - 1);
        let span = self.span(VirtAddr::new(page), PAGE_SIZE as u64)?;
        let base = span.first & !(level_size(PAGE_LEVEL - 1) - 1);
        if let Some(t) = self.page_table_at(span.first) {
            return Ok(LeafTable { entries: NonNull::new(t).ok_or(MmuError::OutOfMemory)?, base });
        }
        // Plan: how many levels are missing (a block refuses).
        let mut table = self.root;
        let mut missing = 0;
        for level in ROOT_LEVEL..PAGE_LEVEL {
            match self.read(table, index_at(span.first, level)).decode(level) {
                Entry::Table(next) => table = next,
                Entry::Leaf { .. } => return Err(MmuError::AlreadyMapped(va)),
                Entry::Invalid => {
                    missing = PAGE_LEVEL - level;
                    break;
                }
            }
        }
        let mut reserve = self.reserve(missing, alloc)?;
        for level in PAGE_LEVEL - missing..PAGE_LEVEL {
            let new = self.reserve_pop(&mut reserve).ok_or(MmuError::OutOfMemory)?;
            self.zero_table(new);
            // The zeroes must reach memory before the pointer to them does.
            arch::publish_new_table();
            self.write(table, index_at(span.first, level), Descriptor::new_table(new));
            self.tables += 1;
            table = new;
        }
        arch::publish_descriptors();
        Ok(LeafTable { entries: NonNull::new(self.table_base(table)).ok_or(MmuError::OutOfMemory)?, base })
    }
}
