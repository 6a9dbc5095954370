//! One look at the whole memory system, and the difference between two looks: how a
//! driver's test says "nothing leaked" in one line.
//!
//! ```no_run
//! use memory::snapshot::MemSnapshot;
//! let before = MemSnapshot::settled();
//! // ... the driver's test: probe, do I/O, remove ...
//! before.check_no_leak().unwrap();        // panics with the list of what changed
//! ```
//!
//! ## What the memory system keeps on purpose, and how [`MemSnapshot::settled`] releases it
//! | kept | why | released by |
//! |---|---|---|
//! | parked vmalloc areas | their TLB entries are flushed in one batch | [`crate::kernel::purge`] |
//! | quarantined frames (`vmalloc.quarantine=1`) | held, poisoned, until that flush | [`crate::kernel::purge`] |
//! | spare area records | allocated ahead of calls (outside the vmalloc lock) | `LockedVmalloc::lock().release_spares()`, then topped up to `spare_high` |
//! | one empty slab per cache | so an alloc/free ping-pong does not reach the buddy | [`crate::slab::shrink`] |
//! | page-table pages of the vmalloc window left empty by lazy unmaps | a walk cache may still point at them until the purge's invalidation | [`crate::kernel::purge`] (those live areas use stay: counted apart, [`MemSnapshot::table_pages`]) |
//! | order-0 frames on the buddy's hot list | fast reuse | nothing to do: they count as free |
//!
//! So after `settled()` only what is really in use differs between two snapshots, and
//! [`MemDiff::is_empty`] compares exactly that: free frames *plus* table pages *plus* slab
//! pages (a table page created meanwhile is not a leak, nor is a slab page that the same
//! number of objects now spreads over), slab objects, large kmalloc objects, vmalloc areas
//! and their pages, parked areas, quarantined frames and spare records.

use core::fmt;

use crate::{buddy, kernel, slab};

/// The memory system's counts at one moment ([`MemSnapshot::take`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemSnapshot {
    /// Free page frames (buddy lists and hot list).
    pub free_frames: usize,
    /// Slab objects in use, over all caches (kmalloc classes and named caches).
    pub slab_objects: usize,
    /// Frames the caches' slabs hold (objects in use or free, the kept empty slabs too).
    pub slab_pages: usize,
    /// Large kmalloc objects (whole buddy blocks) in use.
    pub large_objects: usize,
    /// Live vmalloc, vmap and ioremap areas.
    pub vmalloc_areas: usize,
    /// Pages those areas map.
    pub vmalloc_pages: usize,
    /// Freed areas waiting for their TLB flush.
    pub parked_areas: usize,
    /// Frames of freed areas held in quarantine until that flush (`vmalloc.quarantine=1`).
    pub quarantined_frames: usize,
    /// Translation-table pages of the upper half (vmalloc, ioremap and scratch windows):
    /// those live mappings use, and until a purge those that lazy unmaps left empty.
    pub table_pages: usize,
    /// Spare vmalloc area records.
    pub spare_records: usize,
}

impl MemSnapshot {
    /// The counts now, nothing released first (zeros for what is not initialised).
    ///
    /// # Example
    /// ```no_run
    /// let s = memory::snapshot::MemSnapshot::take();
    /// log::info!("{} frames free, {} vmalloc areas, {} parked", s.free_frames, s.vmalloc_areas, s.parked_areas);
    /// ```
    pub fn take() -> Self {
        let mut s = Self::default();
        if let Some(b) = buddy::stats() {
            s.free_frames = b.free_pages;
        }
        if let Some(sl) = slab::global() {
            for c in sl.cache_stats() {
                s.slab_objects += c.active_objs;
                s.slab_pages += c.pages();
            }
            s.large_objects = sl.stats().large_allocs;
        }
        if let Some(v) = kernel::vmalloc_stats() {
            s.vmalloc_areas = v.live_areas;
            s.vmalloc_pages = v.mapped_pages;
            s.parked_areas = v.parked_areas;
            s.quarantined_frames = v.quarantined_frames;
            s.spare_records = v.spare_records;
        }
        s.table_pages = kernel::vmalloc_table_pages();
        s
    }

    /// Releases what the memory system keeps on purpose (see the [module docs](self)):
    /// purges parked areas and the quarantine, brings the spare records to exactly
    /// `spare_high`, gives kept empty slabs back; then [`Self::take`].
    ///
    /// # Example
    /// ```no_run
    /// let before = memory::snapshot::MemSnapshot::settled();
    /// # let _ = before;
    /// ```
    pub fn settled() -> Self {
        settle();
        Self::take()
    }

    /// What changed from `self` to `later`.
    ///
    /// # Example
    /// ```no_run
    /// use memory::snapshot::MemSnapshot;
    /// let before = MemSnapshot::settled();
    /// let p = memory::kernel::vmalloc(4096)?;
    /// let d = before.diff(&MemSnapshot::settled());
    /// assert_eq!(d.vmalloc_areas, 1);
    /// memory::kernel::vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn diff(&self, later: &Self) -> MemDiff {
        let d = |a: usize, b: usize| b as i64 - a as i64;
        MemDiff {
            frames: d(
                self.free_frames + self.table_pages + self.slab_pages,
                later.free_frames + later.table_pages + later.slab_pages,
            ),
            slab_objects: d(self.slab_objects, later.slab_objects),
            slab_pages: d(self.slab_pages, later.slab_pages),
            large_objects: d(self.large_objects, later.large_objects),
            vmalloc_areas: d(self.vmalloc_areas, later.vmalloc_areas),
            vmalloc_pages: d(self.vmalloc_pages, later.vmalloc_pages),
            parked_areas: d(self.parked_areas, later.parked_areas),
            quarantined_frames: d(self.quarantined_frames, later.quarantined_frames),
            spare_records: d(self.spare_records, later.spare_records),
            table_pages: d(self.table_pages, later.table_pages),
        }
    }

    /// Settles, snapshots, and compares with `self` (itself best taken with
    /// [`Self::settled`]): `Ok` when nothing leaked.
    ///
    /// # Errors
    /// The [`MemDiff`] when anything other than the table pages changed.
    ///
    /// # Example
    /// ```no_run
    /// let before = memory::snapshot::MemSnapshot::settled();
    /// let p = memory::kernel::vzalloc(8192)?;
    /// memory::kernel::vfree(p)?;
    /// before.check_no_leak().unwrap();
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn check_no_leak(&self) -> Result<(), MemDiff> {
        let d = self.diff(&Self::settled());
        if d.is_empty() {
            Ok(())
        } else {
            Err(d)
        }
    }
}

/// Releases what the memory system keeps on purpose (see the [module docs](self)): purges
/// parked vmalloc areas and the quarantine, brings the spare area records to exactly
/// `spare_high` (allocated and freed outside the vmalloc lock), and gives every cache's
/// kept empty slab back to the buddy allocator. Does nothing before `kernel::init`.
///
/// # Example
/// ```no_run
/// memory::snapshot::settle();          // e.g. before printing meminfo for a comparison
/// ```
pub fn settle() {
    settle_with(kernel::purge);
}

/// [`settle`], but keeping the empty page tables the parked ranges met
/// ([`kernel::purge_keeping_tables`]): free frames and table pages then differ from a
/// settled snapshot by those tables, and everything else compares.
///
/// # Example
/// ```no_run
/// memory::snapshot::settle_keeping_tables();   // between two repeats of a workload
/// ```
pub fn settle_keeping_tables() {
    settle_with(kernel::purge_keeping_tables);
}

fn settle_with(purge: fn()) {
    // Deferred frees, parked ranges, the quarantine, vm_map_ram's blocks and their tables.
    purge();
    for v in kernel::vmalloc_instances() {
        let surplus = v.lock().release_spares();
        drop(surplus);
        let (have, want) = {
            let g = v.lock();
            (g.stats().spare_records, g.config().spare_high)
        };
        if have < want {
            // Out of memory the snapshot simply shows fewer spares.
            if let Ok(spares) = crate::vmalloc::Spares::new(want - have) {
                v.lock().add_spares(spares);
            }
        }
    }
    slab::shrink();
}

/// The change between two snapshots ([`MemSnapshot::diff`]): later minus earlier.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct MemDiff {
    /// Free frames plus table pages plus slab pages: negative when frames went missing
    /// outside the slabs (a leaked slab object shows in `slab_objects`).
    pub frames: i64,
    /// Slab objects in use.
    pub slab_objects: i64,
    /// Frames held by slabs (not a leak by itself: the same objects may sit in more
    /// partly used slabs than before; shown for information).
    pub slab_pages: i64,
    /// Large kmalloc objects in use.
    pub large_objects: i64,
    /// Live vmalloc/vmap/ioremap areas.
    pub vmalloc_areas: i64,
    /// Pages mapped by live areas.
    pub vmalloc_pages: i64,
    /// Parked areas.
    pub parked_areas: i64,
    /// Quarantined frames.
    pub quarantined_frames: i64,
    /// Spare area records.
    pub spare_records: i64,
    /// Table pages (not a leak: kept by design; shown for information).
    pub table_pages: i64,
}

impl MemDiff {
    /// Whether nothing but the table pages and slab pages changed: no leak.
    ///
    /// # Example
    /// ```
    /// assert!(memory::snapshot::MemDiff::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        Self { table_pages: 0, slab_pages: 0, ..*self } == Self::default()
    }

    fn fields(&self) -> [(&'static str, i64); 10] {
        [
            ("frames", self.frames),
            ("slab_objects", self.slab_objects),
            ("slab_pages", self.slab_pages),
            ("large_objects", self.large_objects),
            ("vmalloc_areas", self.vmalloc_areas),
            ("vmalloc_pages", self.vmalloc_pages),
            ("parked_areas", self.parked_areas),
            ("quarantined_frames", self.quarantined_frames),
            ("spare_records", self.spare_records),
            ("table_pages", self.table_pages),
        ]
    }
}

impl fmt::Display for MemDiff {
    /// The counts that changed, e.g. `vmalloc_areas +1, frames -2`; `no change` when none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, v) in self.fields() {
            if v != 0 {
                if !first {
                    f.write_str(", ")?;
                }
                write!(f, "{name} {v:+}")?;
                first = false;
            }
        }
        if first {
            f.write_str("no change")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MemDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemDiff({self})")
    }
}
