//! Per-CPU object caches: each CPU keeps, per cache, a small stack ("magazine") of free
//! objects in front of the cache lock, so that `kmalloc`/`kfree` on the local CPU take no
//! shared lock and no atomic read-modify-write.
//!
//! # How it works
//! An allocation pops the local magazine; an empty one is refilled with
//! [`CPU_CACHE_OBJECTS`]` / 2` objects taken under the cache lock at once. A free checks
//! what needs no lock (the frame tag names the cache, the slab header's magic and brand are
//! ours, the pointer is an object start, computed from a lock-free copy of the cache's
//! geometry, and it is not the object freed last, SLUB's hardening check) and pushes it; a full magazine
//! first gives its older half back to the slabs under the lock, where the slab header and
//! the bitmap are checked (the bitmap's check of a double free is exact), a run of objects
//! of one slab at a time (`SlabAllocator::free_batch_in`). An object freed on another
//! CPU than the one that allocated it simply goes to the freeing CPU's magazine: a
//! magazine holds objects of its cache, whatever slab and CPU they came from.
//!
//! The magazines are reached through [`hal::smp::PerCpu`]: an interrupt handler that
//! comes while its CPU's magazines are in use finds them busy and takes the locked path,
//! so a handler may `kmalloc` and `kfree`, and the fast path writes no `DAIF`. The cache
//! locks are `IrqSpinLock`s (interrupts masked while held) for the same reason.
//!
//! Objects in magazines are free for their users and allocated for their slabs: the
//! cache's `active` count includes them, and [`super::SlabAllocator::cache_stats`] (so
//! slabinfo) subtracts them, from per-CPU counts each CPU publishes with a relaxed store.
//! Any other double free is caught when its magazine is flushed (as with SLUB's per-CPU
//! free lists without debugging), logged and counted, after the object may have been
//! handed out twice; strict mode turns the per-CPU caches
//! off, as SLUB's debug caches take the slow path, so every free is checked exactly.
//!
//! A CPU going off drains its magazines (the hotplug "down" hook runs [`drain_local`]);
//! [`drain_all`] drains every CPU's (through a cross-CPU call), which
//! [`super::shrink`] and [`super::KmemCache::destroy`] do first.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use hal::addr::{PhysAddr, PAGE_SIZE};
use hal::dtb::MAX_CPUS;
use hal::smp::PerCpu;
use hal::sync::IrqSpinLock;

use super::{Geometry, SlabAllocator, SlabError, SlabHeader, MAX_CACHES};
use crate::buddy::BuddyAllocator;
use crate::gfp::Gfp;

/// Objects a CPU keeps per cache at most (Linux 6.18's sheaves hold 32 or so; SLUB's
/// per-CPU free lists a slab's worth).
pub const CPU_CACHE_OBJECTS: usize = 32;
/// Objects moved at once between a magazine and its cache.
const BATCH: usize = CPU_CACHE_OBJECTS / 2;

/// One CPU's free objects of one cache, as a stack.
pub(super) struct Magazine {
    len: usize,
    objs: [*mut u8; CPU_CACHE_OBJECTS],
}

/// One CPU's magazines, one per cache slot (in frames the allocator took for them).
pub(super) struct CpuCaches {
    cpu: usize,
    mags: [Magazine; MAX_CACHES],
}

// SAFETY: the pointers are free objects of the slab allocator's own caches, in RAM every
// core reaches through the linear map; a `CpuCaches` is only used by one CPU at a time
// (through `PerCpu`), so moving it between cores moves ownership of those objects.
unsafe impl Send for CpuCaches {}

/// A CPU's `CpuCaches`, in the layer's block: a raw pointer, not a `&mut`, since the block
/// is freed while the allocator (and so this) is being dropped — a reference would be
/// asserted live for the whole drop.
pub(super) struct CachesPtr(core::ptr::NonNull<CpuCaches>);

// SAFETY: as for `CpuCaches`: the pointee is used by one CPU at a time (through `PerCpu`).
unsafe impl Send for CachesPtr {}

impl CachesPtr {
    /// The CPU's caches, for as long as the `PerCpu` claim (or `&mut` of the layer) lasts.
    #[inline(always)]
    pub(super) fn get(&mut self) -> &mut CpuCaches {
        // SAFETY: the pointer names this CPU's `CpuCaches` inside the layer's block, which
        // lives as long as the layer; `&mut self` comes from `PerCpu` (one user at a time)
        // or from `&mut` of the layer, so no other reference to it exists meanwhile.
        unsafe { self.0.as_mut() }
    }
}

/// Objects in one CPU's magazines, per cache, for the statistics of other CPUs.
#[repr(align(64))]
struct CachedCounts([AtomicU32; MAX_CACHES]);

/// The per-CPU layer of a slab allocator.
pub(super) struct CpuLayer {
    pub(super) cpus: PerCpu<CachesPtr>,
    counts: [CachedCounts; MAX_CPUS],
    /// The block holding every CPU's `CpuCaches`.
    block: PhysAddr,
    order: usize,
}

impl CpuLayer {
    /// Takes the magazines' frames from `buddy`; `None` when memory is short.
    pub(super) fn new(buddy: &IrqSpinLock<BuddyAllocator>) -> Option<Self> {
        let each = core::mem::size_of::<CpuCaches>().next_multiple_of(64);
        let pages = (each * MAX_CPUS).div_ceil(PAGE_SIZE);
        let order = pages.next_power_of_two().trailing_zeros() as usize;
        let (block, base) = {
            let mut b = buddy.lock();
            let pa = b.alloc(order).ok()?;
            (pa, b.linear_map().ptr::<u8>(pa))
        };
        // SAFETY: the block was just allocated to us (`PAGE_SIZE << order` bytes); zero is
        // a valid `CpuCaches` (empty magazines, null pointers, CPU 0).
        unsafe { base.write_bytes(0, PAGE_SIZE << order) };
        let cpus = PerCpu::new(|cpu| {
            let p = base.wrapping_add(cpu * each).cast::<CpuCaches>();
            // SAFETY: slot `cpu` lies inside the block (MAX_CPUS slots of `each` bytes,
            // each aligned), initialised above and ours; nothing else refers to it.
            unsafe { (*p).cpu = cpu };
            // `p` is inside a block of managed RAM, never at address 0.
            CachesPtr(core::ptr::NonNull::new(p).expect("a block in the linear map"))
        });
        Some(CpuLayer { cpus, counts: core::array::from_fn(|_| CachedCounts(Default::default())), block, order })
    }

    /// Objects of cache `id` in every CPU's magazine (as last published).
    pub(super) fn cached(&self, id: usize) -> usize {
        self.counts.iter().map(|c| c.0[id].load(Ordering::Relaxed) as usize).sum()
    }

    #[inline(always)]
    fn publish(&self, cpu: usize, id: usize, len: usize) {
        self.counts[cpu].0[id].store(len as u32, Ordering::Relaxed);
    }
}

/// A cache's geometry, readable without the cache lock: what the per-CPU free path needs
/// to check an object start. Written when the cache is made, before any of its slabs
/// exists (so before any frame tag names it: the tag's release/acquire orders it).
#[derive(Default)]
pub(super) struct GeoMirror {
    /// `first | stride << 16 | objs << 32 | order << 48`.
    packed: AtomicU64,
    recip: AtomicU64,
}

impl GeoMirror {
    pub(super) fn set(&self, g: &Geometry) {
        let packed = g.first as u64 | (g.stride as u64) << 16 | (g.objs as u64) << 32 | (g.order as u64) << 48;
        self.packed.store(packed, Ordering::Relaxed);
        self.recip.store(g.recip, Ordering::Relaxed);
    }

    /// `(first, stride, objs, slab bytes, recip)`.
    #[inline(always)]
    fn get(&self) -> (usize, usize, usize, usize, u64) {
        let p = self.packed.load(Ordering::Relaxed);
        let m = |s: u32| ((p >> s) & 0xffff) as usize;
        (m(0), m(16), m(32), PAGE_SIZE << m(48), self.recip.load(Ordering::Relaxed))
    }
}

impl SlabAllocator<'_> {
    /// The per-CPU path of an allocation from cache `id`: an object off this CPU's
    /// magazine (refilled first when empty), or null when there is nothing to refill it
    /// with (memory short, or a failure injected).
    #[inline(always)]
    pub(super) fn alloc_cached(&self, layer: &CpuLayer, cc: &mut CpuCaches, id: usize, gfp: Gfp) -> *mut u8 {
        let m = &mut cc.mags[id];
        if m.len == 0 && self.refill(id, m, gfp) == 0 {
            return core::ptr::null_mut();
        }
        m.len -= 1;
        let p = m.objs[m.len];
        layer.publish(cc.cpu, id, m.len);
        p
    }

    /// Fills an empty magazine with up to [`BATCH`] objects under the cache lock (growing
    /// the cache when it has no usable partial slab); returns how many.
    #[cold]
    fn refill(&self, id: usize, m: &mut Magazine, gfp: Gfp) -> usize {
        m.len = self.take_or_grow(&mut self.caches[id].lock(), id, gfp, &mut m.objs[..BATCH]).unwrap_or(0);
        m.len
    }

    /// The per-CPU path of a free of `ptr` (its frame tag said cache `id`).
    #[inline(always)]
    pub(super) fn free_cached(
        &self,
        layer: &CpuLayer,
        cc: &mut CpuCaches,
        id: usize,
        ptr: *mut u8,
        pa: PhysAddr,
    ) -> Result<(), SlabError> {
        let (first, stride, objs, slab_bytes, recip) = self.geos[id].get();
        let off = pa.as_u64() as usize & (slab_bytes - 1);
        if !self.slab_is_ours(ptr.wrapping_sub(off).cast::<SlabHeader>(), id) {
            return Err(SlabError::NotOwned);
        }
        if super::object_index(off, first, stride, objs, recip).is_none() {
            return Err(SlabError::NotObjectStart);
        }
        let m = &mut cc.mags[id];
        // SLUB's hardening check: the object freed last is freed again (the common double
        // free, caught at once). Any other is caught when the magazine is flushed.
        if m.len > 0 && m.objs[m.len - 1] == ptr {
            return Err(SlabError::DoubleFree);
        }
        if m.len == CPU_CACHE_OBJECTS {
            self.flush(id, m, BATCH);
        }
        m.objs[m.len] = ptr;
        m.len += 1;
        layer.publish(cc.cpu, id, m.len);
        Ok(())
    }

    /// Gives the `n` oldest objects of a magazine of cache `id` back to their slabs, under
    /// the cache lock, with every check; a refused one is logged and counted (it was a
    /// double free caught late, or memory written over).
    #[cold]
    fn flush(&self, id: usize, m: &mut Magazine, n: usize) {
        self.flush_with(id, m, n, false);
    }

    /// [`Self::flush`]; with `try_only`, nothing when the cache lock is taken (returns
    /// false then).
    fn flush_with(&self, id: usize, m: &mut Magazine, n: usize, try_only: bool) -> bool {
        let n = n.min(m.len);
        if n == 0 {
            return true;
        }
        {
            let mut guard = if try_only {
                match self.caches[id].try_lock() {
                    Some(g) => g,
                    None => return false,
                }
            } else {
                self.caches[id].lock()
            };
            // Every check again: a late double free may name a slab given back since.
            self.free_batch_in(&mut guard, id, &m.objs[..n]);
        }
        m.objs.copy_within(n..m.len, 0);
        m.len -= n;
        true
    }

    /// Gives this CPU's magazines back to their caches; returns the objects moved.
    pub fn drain_local(&self) -> usize {
        self.drain_local_with(false)
    }

    /// [`Self::drain_local`], skipping caches whose lock is taken (for reclaim).
    pub fn try_drain_local(&self) -> usize {
        self.drain_local_with(true)
    }

    fn drain_local_with(&self, try_only: bool) -> usize {
        let Some(layer) = &self.cpu else { return 0 };
        layer
            .cpus
            .try_with(|p| {
                let cc = p.get();
                let mut moved = 0;
                for id in 0..MAX_CACHES {
                    let m = &mut cc.mags[id];
                    let len = m.len;
                    if self.flush_with(id, m, len, try_only) {
                        moved += len;
                    }
                    layer.publish(cc.cpu, id, m.len);
                }
                moved
            })
            .unwrap_or(0)
    }

    /// Objects of cache slot `id` sitting in per-CPU magazines.
    pub(super) fn cpu_cached(&self, id: usize) -> usize {
        self.cpu.as_ref().map_or(0, |l| l.cached(id))
    }

    /// Objects sitting in every CPU's magazines now (as last published by each CPU).
    ///
    /// # Example
    /// ```no_run
    /// let hidden = memory::slab::global().unwrap().cpu_cached_objects();
    /// # let _ = hidden;
    /// ```
    pub fn cpu_cached_objects(&self) -> usize {
        (0..MAX_CACHES).map(|id| self.cpu_cached(id)).sum()
    }

    /// Objects sitting in CPU `cpu`'s magazines now (as it last published).
    ///
    /// # Example
    /// ```no_run
    /// let on_cpu1 = memory::slab::global().unwrap().cpu_cached_objects_on(1);
    /// # let _ = on_cpu1;
    /// ```
    pub fn cpu_cached_objects_on(&self, cpu: usize) -> usize {
        self.cpu
            .as_ref()
            .and_then(|l| l.counts.get(cpu))
            .map_or(0, |c| c.0.iter().map(|n| n.load(Ordering::Relaxed) as usize).sum())
    }

    /// Whether this allocator has per-CPU object caches.
    ///
    /// # Example
    /// ```no_run
    /// assert!(memory::slab::global().unwrap().has_cpu_caches());
    /// ```
    pub fn has_cpu_caches(&self) -> bool {
        self.cpu.is_some()
    }

    /// Gives every CPU's magazines back and the layer's frames to the buddy (`&mut self`:
    /// no CPU is inside a magazine).
    pub(super) fn drop_cpu_layer(&mut self) {
        let (block, order) = {
            let Some(mut layer) = self.cpu.take() else { return };
            for cpu in 0..MAX_CPUS {
                if let Some(cc) = layer.cpus.get_mut(cpu).map(CachesPtr::get) {
                    for id in 0..MAX_CACHES {
                        let m = &mut cc.mags[id];
                        self.flush(id, m, m.len);
                    }
                }
            }
            (layer.block, layer.order)
        };
        // SAFETY: the block was allocated by `CpuLayer::new` and nothing refers to it
        // any more (the layer and its references are gone).
        if let Err(e) = unsafe { self.buddy.lock().free(block, order) } {
            log::error!("slab: per-CPU cache block {block:#x} refused by the buddy: {e}");
        }
    }
}

/// Gives the calling CPU's magazines of the global slab allocator back to their caches
/// (the hotplug "down" hook runs it on a CPU going off); returns the objects moved.
///
/// # Example
/// ```no_run
/// let moved = memory::slab::drain_local();
/// # let _ = moved;
/// ```
pub fn drain_local() -> usize {
    super::global().map_or(0, SlabAllocator::drain_local)
}

/// Drains every CPU's magazines of the global slab allocator: the local ones, and the
/// others' through a cross-CPU call (none where no interrupt controller runs: then no
/// other CPU allocates). Returns the objects moved.
///
/// # Example
/// ```no_run
/// memory::slab::drain_all();
/// log::info!("{}", memory::slab::slabinfo().unwrap());   // no object hidden in a magazine
/// ```
pub fn drain_all() -> usize {
    let moved = AtomicUsize::new(drain_local());
    let _ = hal::smp::on_each_cpu(&|| {
        moved.fetch_add(drain_local(), Ordering::Relaxed);
    });
    moved.into_inner()
}

/// The slab allocator as a shrinker: its per-CPU magazines and kept empty slabs.
pub(crate) static SLAB_SHRINKER: crate::reclaim::Shrinker =
    crate::reclaim::Shrinker::new("slab (magazines, empty slabs)", slab_count, slab_scan);

fn slab_count() -> usize {
    super::global().map_or(0, |s| s.reclaimable_pages() + usize::from(s.cpu_cached_objects() != 0))
}

fn slab_scan(_nr: usize) -> usize {
    let Some(s) = super::global() else { return 0 };
    // This CPU's magazines with try-locks; the other CPUs' in their interrupt handlers.
    s.try_drain_local();
    let _ = hal::smp::on_each_cpu(&|| {
        drain_local();
    });
    s.try_shrink()
}
