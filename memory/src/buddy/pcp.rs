//! Per-CPU page lists (Linux's `per_cpu_pages`): each CPU keeps, per zone, a list of free
//! order-0 frames in front of the zone lock, so that a page allocation or free on the
//! local CPU takes no shared lock.
//!
//! # The lists
//! A list is a `HotList` (a ring of frame numbers in metadata, used as a stack at its top
//! and drained from its bottom): the same structure a private [`BuddyAllocator`] keeps as
//! the hot list of its one CPU. The kernel's allocator (`Global`) turns its own hot lists
//! off and keeps one per CPU and zone instead, reached through [`hal::smp::PerCpu`]: an
//! interrupt handler that comes while its CPU's lists are in use finds them busy and takes
//! the locked slow path, so a handler may allocate (`GFP_ATOMIC`) and free pages, and the
//! fast path writes no `DAIF` (the zone lock masks interrupts only while held). The fast path takes no lock: an
//! allocation flips the frame's state byte from "on a per-CPU list" to "allocated" with a
//! relaxed store, a free checks it is allocated and flips it back with a load and a store,
//! and the list's length is published with a relaxed store for the statistics of other
//! CPUs. A double free is refused when the first free came before it (a frame listed twice
//! in one bulk free included); two frees of one frame at the same instant on two CPUs
//! (each caller breaking `free_pages`'s contract: both claim to own it) are not told apart.
//! A compare-exchange would tell them apart, at 12 ns a frame under QEMU (the profile's
//! "byte claims" rows) on every frame of every `vfree`: Linux's page allocator does not
//! catch that race either.
//!
//! When a list is empty, an allocation refills it with `batch` frames taken under the zone
//! lock at once; when a free takes it above `high`, `batch` of its coldest frames go back
//! to the zone (and merge). `high` and `batch` are Linux 6.12's ([`PcpLimits::linux`]):
//! `batch` from the zone's size (`zone_batchsize`), `high` the zone's low watermark shared
//! among the online CPUs, at least `4 × batch` (`zone_highsize`), recomputed when a CPU
//! goes off or comes back and when the watermarks change. A CPU going off drains its lists
//! first (the hotplug "down" hook runs [`drain_local`] on it).
//!
//! # Accounting
//! Frames on per-CPU lists are free but not counted in their zone's free pages (as Linux's
//! `NR_FREE_PAGES`), so the watermark check of an allocation sees what the zone really has;
//! [`super::stats`] adds them back (`free_pages`, and apart in `hot_pages`, per zone too).
//! The fast path checks the watermark against a lock-free copy of each zone's free count,
//! refreshed after every locked operation of the kernel's allocator. Linux keeps lists of
//! orders 1 to 3 too; here only order 0 has them (slabs of higher orders come from the
//! per-CPU object caches' refills, which are batched already).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hal::addr::{PhysAddr, PAGE_SHIFT, PAGE_SIZE};
use hal::dtb::MAX_CPUS;
use hal::linear::LinearMap;
use hal::smp::PerCpu;
use hal::sync::IrqSpinLock;

use super::{
    check_allocated, poison_intact, state_byte, BuddyAllocator, BuddyError, BuddyStats, FrameMap, RegionInfo,
    HOT_BATCH, HOT_CAPACITY, HOT_HIGH, MAX_NR_ZONES, POISON_BYTE, ST_ALLOC, ST_HOT,
};
use crate::gfp::{Gfp, __GFP_NORETRY, __GFP_ZERO};

/// The order-0 hot list: a ring of entries `pfn << 3 | region slot`, used as a stack at
/// its top (the most recently freed frame is handed out first) and drained from its
/// bottom (the coldest frames go back to the lists first).
#[derive(Clone, Copy)]
pub(crate) struct HotList {
    pub(crate) ring: [u64; HOT_CAPACITY],
    /// Ring index of the bottom (oldest) entry.
    pub(crate) bottom: usize,
    /// Entries held.
    pub(crate) len: usize,
    /// A free that takes `len` above `high` gives `batch` frames back; 0: hot list off.
    pub(crate) high: usize,
    /// Frames moved at once between the hot list and the buddy lists (`1..=high`).
    pub(crate) batch: usize,
}

impl HotList {
    const MASK: usize = HOT_CAPACITY - 1;

    pub(crate) const fn new() -> Self {
        HotList { ring: [0; HOT_CAPACITY], bottom: 0, len: 0, high: HOT_HIGH, batch: HOT_BATCH }
    }

    #[inline(always)]
    pub(crate) fn entry(pfn: u64, slot: usize) -> u64 {
        pfn << 3 | slot as u64
    }

    #[inline(always)]
    pub(crate) fn push_top(&mut self, e: u64) {
        debug_assert!(self.len < HOT_CAPACITY);
        self.ring[(self.bottom + self.len) & Self::MASK] = e;
        self.len += 1;
    }

    #[inline(always)]
    pub(crate) fn pop_top(&mut self) -> u64 {
        debug_assert!(self.len > 0);
        self.len -= 1;
        self.ring[(self.bottom + self.len) & Self::MASK]
    }

    #[inline(always)]
    pub(crate) fn push_bottom(&mut self, e: u64) {
        debug_assert!(self.len < HOT_CAPACITY);
        self.bottom = (self.bottom + Self::MASK) & Self::MASK;
        self.ring[self.bottom] = e;
        self.len += 1;
    }

    #[inline(always)]
    pub(crate) fn pop_bottom(&mut self) -> u64 {
        debug_assert!(self.len > 0);
        let e = self.ring[self.bottom];
        self.bottom = (self.bottom + 1) & Self::MASK;
        self.len -= 1;
        e
    }

    /// The entries, bottom to top.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len).map(|i| self.ring[(self.bottom + i) & Self::MASK])
    }
}

/// One zone's per-CPU list sizes: Linux's `pcp->high` and `pcp->batch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PcpLimits {
    /// A free that takes a list above this many frames gives `batch` back to the zone.
    pub high: usize,
    /// Frames moved at once between a list and its zone.
    pub batch: usize,
}

impl PcpLimits {
    /// Most frames a list holds at its high mark (a free pushes one more before draining).
    pub const MAX_HIGH: usize = HOT_CAPACITY - 2;

    /// Linux 6.12's sizes for a zone of `managed` frames with low watermark `low`, shared
    /// among `cpus` online CPUs: `batch` is `zone_batchsize` (a quarter of 0.1 % of the
    /// zone, at most 1 MiB's worth, times 1.5, rounded down to a power of two, minus 1);
    /// `high` is `zone_highsize` with no `percpu_pagelist_high_fraction` (`low / cpus`, at
    /// least `4 × batch`), clamped to [`Self::MAX_HIGH`].
    ///
    /// # Example
    /// ```
    /// use memory::buddy::PcpLimits;
    /// // A 1 GiB zone with Linux's default watermarks (low 1286 frames), one and four CPUs.
    /// assert_eq!(PcpLimits::linux(262_144, 1286, 1), PcpLimits { high: 1022, batch: 63 });
    /// assert_eq!(PcpLimits::linux(262_144, 1286, 4), PcpLimits { high: 321, batch: 63 });
    /// ```
    pub fn linux(managed: usize, low: usize, cpus: usize) -> Self {
        let mut batch = (managed >> 10).min((1 << 20) / PAGE_SIZE) / 4;
        batch = batch.max(1);
        let b = batch + batch / 2;
        batch = (1usize << (usize::BITS - 1 - b.leading_zeros())) - 1;
        let batch = batch.max(1);
        let high = (low / cpus.max(1)).max(batch * 4).min(Self::MAX_HIGH);
        PcpLimits { high, batch: batch.min(high.max(1)) }
    }
}

/// One CPU's lists, one per zone (in frames carved at initialisation).
pub(crate) struct CpuPages {
    cpu: usize,
    lists: [HotList; MAX_NR_ZONES],
}

/// Frames on one CPU's lists, per zone, published for the statistics of other CPUs.
#[repr(align(64))]
struct CpuCounts([AtomicUsize; MAX_NR_ZONES]);

/// What the fast path reads of a zone without its lock.
#[repr(align(64))]
struct ZoneMirror {
    /// The zone's free pages (lists and frontier; per-CPU lists not counted).
    free: AtomicUsize,
    min: AtomicUsize,
    low: AtomicUsize,
    lowmem_reserve: [AtomicUsize; MAX_NR_ZONES],
    high: AtomicUsize,
    batch: AtomicUsize,
}

/// Most frames [`Global::free_bulk`] frees in one pass (vmalloc frees in chunks of 64;
/// an undo is quadratic in it). Longer lists are checked whole first, then freed in passes
/// of this many.
const ONE_PASS_MAX: usize = 64;

/// Locked operations (refills, drains, slow paths) between two runs of the shrinkers for
/// pressure alone (about 16,000 order-0 allocations at Linux's default batch).
const RECLAIM_BACKOFF: usize = 256;

/// The kernel's frame allocator: the zones behind their lock, and the per-CPU lists in
/// front of it (see the module docs).
pub(crate) struct Global {
    pub(crate) core: IrqSpinLock<BuddyAllocator>,
    /// The core's frame map, state array and linear map (fixed after initialisation).
    map: FrameMap,
    state: *mut u8,
    pub(crate) linear: LinearMap,
    strict: bool,
    cpus: PerCpu<&'static mut CpuPages>,
    counts: [CpuCounts; MAX_CPUS],
    zones: [ZoneMirror; MAX_NR_ZONES],
    /// `Some` once a test or bench fixed the limits ([`set_pcp_limits`]).
    fixed: spin::Mutex<Option<PcpLimits>>,
    /// Poison found overwritten on frames handed out from a per-CPU list.
    corruptions: AtomicU64,
    /// Some zone is below its `low` watermark (refreshed with the free counts): the next
    /// allocation that may reclaim runs the shrinkers.
    pressure: AtomicBool,
    /// Locked operations to let pass before pressure runs the shrinkers again (so
    /// persistent pressure does not run them on every allocation).
    reclaim_backoff: AtomicUsize,
}

// SAFETY: `state` points at the core's state array, reserved RAM that lives as long as the
// allocator (forever: `Global` is only built for the kernel's `static`), and every access
// to it goes through `state_byte`, an atomic. The `CpuPages` behind `cpus` are frames the
// allocator gave to itself at initialisation, each reached only by its own CPU through
// `PerCpu` (see its `Sync` argument); the frames on the lists are free memory the
// allocator owns. Everything else is atomics, locks, or fixed after initialisation.
unsafe impl Sync for Global {}
// SAFETY: as for `Sync`: nothing in `Global` is tied to the CPU that built it.
unsafe impl Send for Global {}

impl Global {
    /// Takes over `core`: turns its own hot lists off and carves the per-CPU lists from it.
    ///
    /// # Errors
    /// [`BuddyError::OutOfMemory`] when the lists' frames cannot be had (`core` is then
    /// dropped: nothing but its metadata was written).
    pub(crate) fn new(mut core: BuddyAllocator) -> Result<Self, BuddyError> {
        core.drain_hot();
        core.set_hot_limits(0, 1);
        let each = core::mem::size_of::<CpuPages>().next_multiple_of(64);
        let pages = (each * MAX_CPUS).div_ceil(PAGE_SIZE);
        let order = pages.next_power_of_two().trailing_zeros() as usize;
        let pa = core.alloc(order)?;
        let base = core.linear.ptr::<u8>(pa);
        for cpu in 0..MAX_CPUS {
            let p = base.wrapping_add(cpu * each).cast::<CpuPages>();
            // SAFETY: `p` is inside the block just allocated (MAX_CPUS slots of `each`
            // bytes, `each` a multiple of the alignment, the block page aligned), ours for
            // good; each field is written in place (a list is 8 KiB: no big temporary).
            unsafe {
                core::ptr::addr_of_mut!((*p).cpu).write(cpu);
                for z in 0..MAX_NR_ZONES {
                    core::ptr::addr_of_mut!((*p).lists[z]).write(HotList::new());
                }
            }
        }
        let cpus = PerCpu::new(|cpu| {
            // SAFETY: slot `cpu` was initialised above; each slot gets one `&mut`, given to
            // the `PerCpu` that hands it to its CPU alone; the block is never freed.
            unsafe { &mut *base.wrapping_add(cpu * each).cast::<CpuPages>() }
        });
        let g = Global {
            map: core.map,
            state: core.state,
            linear: core.linear,
            strict: core.strict,
            core: IrqSpinLock::new(&hal::sync::classes::BUDDY, core),
            cpus,
            counts: core::array::from_fn(|_| CpuCounts(Default::default())),
            zones: core::array::from_fn(|_| ZoneMirror {
                free: AtomicUsize::new(0),
                min: AtomicUsize::new(0),
                low: AtomicUsize::new(0),
                lowmem_reserve: Default::default(),
                high: AtomicUsize::new(0),
                batch: AtomicUsize::new(1),
            }),
            fixed: spin::Mutex::new(None),
            corruptions: AtomicU64::new(0),
            pressure: AtomicBool::new(false),
            reclaim_backoff: AtomicUsize::new(0),
        };
        g.locked(|a| g.sync_marks(a));
        Ok(g)
    }

    /// Runs `f` on the zones under their lock, then refreshes the fast path's copy of the
    /// zones' free counts.
    #[inline]
    pub(crate) fn locked<R>(&self, f: impl FnOnce(&mut BuddyAllocator) -> R) -> R {
        let mut a = self.core.lock();
        let r = f(&mut a);
        self.sync_free(&a);
        r
    }

    #[inline(always)]
    fn sync_free(&self, a: &BuddyAllocator) {
        let mut pressure = false;
        for (m, z) in self.zones.iter().zip(&a.zones) {
            m.free.store(z.free_pages, Ordering::Relaxed);
            pressure |= z.managed != 0 && z.free_pages < z.wmark[1];
        }
        if pressure != self.pressure.load(Ordering::Relaxed) {
            self.pressure.store(pressure, Ordering::Relaxed);
        }
        let b = self.reclaim_backoff.load(Ordering::Relaxed);
        if b != 0 {
            self.reclaim_backoff.store(b - 1, Ordering::Relaxed);
        }
    }

    /// Some zone went below `low`: runs the shrinkers when `gfp` may (see
    /// [`crate::reclaim::may_reclaim`]) and no run came back empty-handed lately.
    #[cold]
    fn reclaim_for_pressure(&self, gfp: Gfp) {
        if self.reclaim_backoff.load(Ordering::Relaxed) != 0 || !crate::reclaim::may_reclaim(gfp) {
            return;
        }
        // Up to the high watermark of the zone furthest below it.
        let want = self
            .zones
            .iter()
            .map(|m| m.free.load(Ordering::Relaxed))
            .zip(self.core_marks_high())
            .map(|(free, high)| high.saturating_sub(free))
            .max()
            .unwrap_or(0)
            .max(1);
        crate::reclaim::shrink(want);
        // Not again for a while: what the shrinkers could give is given, and the per-CPU
        // lists would otherwise be drained and refilled on every allocation under
        // pressure. An allocation that fails still runs them (`alloc_slow`).
        self.reclaim_backoff.store(RECLAIM_BACKOFF, Ordering::Relaxed);
    }

    /// Each zone's `high` watermark (from the lock-free copy of `min` and `low`:
    /// `high = low + (low - min)`).
    fn core_marks_high(&self) -> [usize; MAX_NR_ZONES] {
        core::array::from_fn(|z| {
            let m = &self.zones[z];
            let (min, low) = (m.min.load(Ordering::Relaxed), m.low.load(Ordering::Relaxed));
            low + low.saturating_sub(min)
        })
    }

    /// Refreshes the copy of the watermarks and recomputes the lists' limits (the online
    /// CPUs or the watermarks changed).
    pub(crate) fn sync_marks(&self, a: &BuddyAllocator) {
        let fixed = *self.fixed.lock();
        let cpus = online_now();
        for (m, z) in self.zones.iter().zip(&a.zones) {
            m.min.store(z.wmark[0], Ordering::Relaxed);
            m.low.store(z.wmark[1], Ordering::Relaxed);
            for (r, v) in m.lowmem_reserve.iter().zip(z.lowmem_reserve) {
                r.store(v, Ordering::Relaxed);
            }
            let l = fixed.unwrap_or_else(|| PcpLimits::linux(z.managed, z.wmark[1], cpus));
            m.high.store(l.high, Ordering::Relaxed);
            m.batch.store(l.batch, Ordering::Relaxed);
        }
        self.sync_free(a);
    }

    /// Fixes every zone's limits (`Some`), or goes back to Linux's (`None`).
    pub(crate) fn set_limits(&self, limits: Option<PcpLimits>) {
        *self.fixed.lock() = limits.map(|l| {
            let high = l.high.min(PcpLimits::MAX_HIGH);
            PcpLimits { high, batch: l.batch.clamp(1, high.max(1)) }
        });
        self.locked(|a| self.sync_marks(a));
    }

    /// The limits of zone `z` now.
    pub(crate) fn limits(&self, z: usize) -> PcpLimits {
        let m = &self.zones[z];
        PcpLimits { high: m.high.load(Ordering::Relaxed), batch: m.batch.load(Ordering::Relaxed) }
    }

    /// Frames zone `z` can give to `gfp` (highest zone `high`) before it reaches its
    /// watermark, on the lock-free copy of its counts. A refill takes no more than this,
    /// so the per-CPU lists never take a zone below its watermark (Linux's `rmqueue_bulk`
    /// may overshoot by a batch).
    #[inline(always)]
    fn headroom(&self, z: usize, gfp: Gfp, high: usize) -> usize {
        let m = &self.zones[z];
        let min = gfp.min_watermark(m.min.load(Ordering::Relaxed));
        m.free.load(Ordering::Relaxed).saturating_sub(min + m.lowmem_reserve[high].load(Ordering::Relaxed))
    }

    #[inline(always)]
    fn ptr(&self, pfn: u64) -> *mut u8 {
        self.linear.ptr(PhysAddr::new(pfn << PAGE_SHIFT))
    }

    // ----- allocation -----

    /// Allocates `2^order` frames with `gfp`: order 0 from this CPU's lists when the zone
    /// is above its watermark, else (and for every other order) under the zone lock.
    #[inline]
    pub(crate) fn alloc(&self, order: usize, gfp: Gfp) -> Result<PhysAddr, BuddyError> {
        let r = match order {
            0 => match self.alloc_pcp(gfp) {
                Some(pa) => Ok(pa),
                None => self.alloc_locked(0, gfp),
            },
            _ => self.alloc_locked(order, gfp),
        };
        if self.pressure.load(Ordering::Relaxed) {
            self.reclaim_for_pressure(gfp);
        }
        r
    }

    #[inline]
    fn alloc_locked(&self, order: usize, gfp: Gfp) -> Result<PhysAddr, BuddyError> {
        match self.locked(|a| a.alloc_gfp(order, gfp)) {
            Err(e @ (BuddyError::OutOfMemory | BuddyError::BelowMin)) => self.alloc_slow(order, gfp, e),
            r => r,
        }
    }

    /// The zones could not serve `order`. First, when per-CPU lists hold frames (which
    /// count for no zone and may complete a block), drains them and tries once more, as
    /// Linux's `drain_all_pages`: this CPU's lists always, the other CPUs' too (through a
    /// cross-CPU call) when `gfp` may reclaim. Then, when it may, runs the shrinkers and
    /// tries once more; failing that, it is out of memory ([`crate::reclaim::out_of_memory`]:
    /// counted, one report per interval). `__GFP_NORETRY` retries nothing. A retried failure
    /// counts once.
    #[cold]
    fn alloc_slow(&self, order: usize, gfp: Gfp, err: BuddyError) -> Result<PhysAddr, BuddyError> {
        if gfp.contains(__GFP_NORETRY) {
            return Err(err);
        }
        let reclaim = crate::reclaim::may_reclaim(gfp);
        let retry = |e: BuddyError| {
            self.locked(|a| {
                a.forget_failure(e);
                a.alloc_gfp(order, gfp)
            })
        };
        let mut err = err;
        if self.pcp_pages().iter().sum::<usize>() != 0 {
            self.drain_local();
            if reclaim {
                let _ = hal::smp::on_each_cpu(&|| {
                    self.drain_local();
                });
            }
            match retry(err) {
                Err(e @ (BuddyError::OutOfMemory | BuddyError::BelowMin)) => err = e,
                r => return r,
            }
        }
        if !reclaim {
            return Err(err);
        }
        if crate::reclaim::shrink(1 << order) != 0 {
            match retry(err) {
                Err(e @ (BuddyError::OutOfMemory | BuddyError::BelowMin)) => err = e,
                r => return r,
            }
        }
        crate::reclaim::out_of_memory(order, gfp);
        Err(err)
    }

    /// The per-CPU path of an order-0 allocation; `None` sends it to the locked path
    /// (every zone `gfp` allows is at its watermark or empty, or the lists are in use
    /// further up this CPU's stack), which decides the error.
    #[inline(always)]
    fn alloc_pcp(&self, gfp: Gfp) -> Option<PhysAddr> {
        let high = gfp.zone();
        let mut z = high + 1;
        while z > 0 {
            z -= 1;
            let room = self.headroom(z, gfp, high);
            if room == 0 {
                continue;
            }
            if let Some(pa) = self.cpus.try_with(|cpu| self.pop(cpu, z, room, gfp, high))? {
                if gfp.contains(__GFP_ZERO) {
                    // SAFETY: the frame was just allocated (page aligned, reached through
                    // the linear map): ours until we return it.
                    unsafe { super::zero_frames(self.ptr(pa.as_u64() >> PAGE_SHIFT), 1) };
                }
                return Some(pa);
            }
        }
        None
    }

    /// Takes the top frame of this CPU's list of zone `z`, refilling the list first when
    /// it is empty (with at most `room` frames); `None` when the zone has no frame left.
    #[inline(always)]
    fn pop(&self, cpu: &mut CpuPages, z: usize, room: usize, gfp: Gfp, high: usize) -> Option<PhysAddr> {
        let l = &mut cpu.lists[z];
        if l.len == 0 {
            let batch = self.zones[z].batch.load(Ordering::Relaxed).min(room);
            if self.locked(|a| a.pcp_refill(z, l, batch, gfp, high)) == 0 {
                return None;
            }
        }
        let e = l.pop_top();
        self.counts[cpu.cpu].0[z].store(l.len, Ordering::Relaxed);
        let (pfn, idx) = self.entry(e);
        state_byte(self.state, &self.map, idx).store(ST_ALLOC, Ordering::Relaxed);
        if self.strict {
            self.check_poison(pfn);
        }
        Some(PhysAddr::new(pfn << PAGE_SHIFT))
    }

    /// Order-0 frames into `out` (as [`BuddyAllocator::alloc_bulk_gfp`]): from this CPU's
    /// lists, refilled in batches of at least what is still wanted; what they cannot give
    /// comes from the locked path.
    ///
    /// One frame takes [`Self::alloc`]'s path (under TCG the bulk loop's set-up costs as
    /// much as the allocation, and 1-page `vmalloc`s are the common case).
    #[inline]
    pub(crate) fn alloc_bulk(&self, out: &mut [PhysAddr], gfp: Gfp) -> usize {
        if let [slot] = out {
            return self.alloc(0, gfp).map_or(0, |pa| {
                *slot = pa;
                1
            });
        }
        self.alloc_bulk_many(out, gfp)
    }

    #[cfg_attr(target_os = "none", unsafe(link_section = ".text.hot.alloc_bulk"))]
    fn alloc_bulk_many(&self, out: &mut [PhysAddr], gfp: Gfp) -> usize {
        let high = gfp.zone();
        let mut n = 0;
        for z in (0..=high).rev() {
            loop {
                let room = self.headroom(z, gfp, high);
                if n == out.len() || room == 0 {
                    break;
                }
                let got = self.cpus.try_with(|cpu| self.pop_many(cpu, z, &mut out[n..], room, gfp, high));
                match got {
                    Some(0) | None => break,
                    Some(k) => n += k,
                }
            }
        }
        if gfp.contains(__GFP_ZERO) {
            for pa in &out[..n] {
                // SAFETY: the frames were just allocated (page aligned, reached through the
                // linear map): ours until we return them.
                unsafe { super::zero_frames(self.ptr(pa.as_u64() >> PAGE_SHIFT), 1) };
            }
        }
        if n < out.len() {
            n += self.locked(|a| a.alloc_bulk_gfp(&mut out[n..], gfp));
        }
        if n < out.len() && !gfp.contains(__GFP_NORETRY) && self.drain_local() > 0 {
            n += self.locked(|a| {
                a.forget_failure(BuddyError::OutOfMemory);
                a.alloc_bulk_gfp(&mut out[n..], gfp)
            });
        }
        if n < out.len() && crate::reclaim::may_reclaim(gfp) {
            if crate::reclaim::shrink(out.len() - n) != 0 {
                n += self.locked(|a| {
                    a.forget_failure(BuddyError::OutOfMemory);
                    a.alloc_bulk_gfp(&mut out[n..], gfp)
                });
            }
            if n < out.len() {
                crate::reclaim::out_of_memory(0, gfp);
            }
        }
        if self.pressure.load(Ordering::Relaxed) {
            self.reclaim_for_pressure(gfp);
        }
        n
    }

    /// Up to `out.len()` frames from this CPU's list of zone `z` (refilled once when empty,
    /// with up to half the list's capacity, at most `room`).
    fn pop_many(
        &self,
        cpu: &mut CpuPages,
        z: usize,
        out: &mut [PhysAddr],
        room: usize,
        gfp: Gfp,
        high: usize,
    ) -> usize {
        let l = &mut cpu.lists[z];
        if l.len == 0 {
            let want = out.len().max(self.zones[z].batch.load(Ordering::Relaxed)).min(HOT_CAPACITY / 2).min(room);
            if self.locked(|a| a.pcp_refill(z, l, want, gfp, high)) == 0 {
                return 0;
            }
        }
        // The top `k` entries, topmost first, with the list shortened once (the state
        // stores are atomics: a length kept in the list would be written back each time).
        let k = out.len().min(l.len);
        let top = l.len;
        l.len = top - k;
        let l = &*l;
        for (i, slot) in out[..k].iter_mut().enumerate() {
            let e = l.ring[(l.bottom + top - 1 - i) & (HOT_CAPACITY - 1)];
            let (pfn, idx) = self.entry(e);
            state_byte(self.state, &self.map, idx).store(ST_ALLOC, Ordering::Relaxed);
            *slot = PhysAddr::new(pfn << PAGE_SHIFT);
        }
        if self.strict {
            for pa in &out[..k] {
                self.check_poison(pa.as_u64() >> PAGE_SHIFT);
            }
        }
        self.counts[cpu.cpu].0[z].store(l.len, Ordering::Relaxed);
        k
    }

    /// Strict mode: the whole frame must hold the poison (it was poisoned when freed).
    #[cold]
    fn check_poison(&self, pfn: u64) {
        // SAFETY: the frame was just taken off a per-CPU list: ours until handed out.
        let bytes = unsafe { core::slice::from_raw_parts(self.ptr(pfn), PAGE_SIZE) };
        if !poison_intact(bytes, pfn, 0) {
            self.corruptions.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[inline(always)]
    fn entry(&self, e: u64) -> (u64, usize) {
        let r = &self.map.regions[(e & 7) as usize];
        let pfn = e >> 3;
        (pfn, r.index + (pfn - r.start_pfn) as usize)
    }

    // ----- freeing -----

    /// Frees `2^order` frames at `pa`: order 0 onto this CPU's list of its zone, every
    /// other order (or when the lists are in use further up the stack) under the lock.
    ///
    /// # Safety
    /// As [`BuddyAllocator::free`].
    #[inline]
    pub(crate) unsafe fn free(&self, pa: PhysAddr, order: usize) -> Result<(), BuddyError> {
        if order == 0 {
            let (r, idx) = check_allocated(&self.map, self.state, pa, 0)?;
            let pfn = pa.as_u64() >> PAGE_SHIFT;
            if let Some(r) = self.cpus.try_with(|cpu| self.push(cpu, r, idx, pfn)) {
                return r;
            }
        }
        // SAFETY: forwarded to our caller.
        self.locked(|a| unsafe { a.free(pa, order) })
    }

    /// Order-0 frames, all checked first (as [`BuddyAllocator::free_bulk`]); one frame
    /// takes [`Self::free`]'s path (the same checks, without the bulk loop's set-up).
    ///
    /// # Safety
    /// As [`BuddyAllocator::free_bulk`].
    #[inline]
    pub(crate) unsafe fn free_bulk(&self, frames: &[PhysAddr]) -> Result<(), BuddyError> {
        if let [pa] = frames {
            // SAFETY: forwarded to our caller.
            return unsafe { self.free(*pa, 0) };
        }
        // SAFETY: forwarded to our caller.
        unsafe { self.free_bulk_many(frames) }
    }

    /// [`Self::free_bulk`] of more than one frame.
    ///
    /// # Safety
    /// As [`BuddyAllocator::free_bulk`].
    #[cfg_attr(target_os = "none", unsafe(link_section = ".text.hot.free_bulk"))]
    unsafe fn free_bulk_many(&self, frames: &[PhysAddr]) -> Result<(), BuddyError> {
        if frames.len() > ONE_PASS_MAX {
            // Every frame checked before any is freed; then chunks of one pass each.
            for &pa in frames {
                check_allocated(&self.map, self.state, pa, 0)?;
            }
        }
        let done = self.cpus.try_with(|cpu| {
            let mut r = Ok(());
            for from in (0..frames.len()).step_by(ONE_PASS_MAX) {
                let to = (from + ONE_PASS_MAX).min(frames.len());
                if let Err(e) = self.push_all(cpu, &frames[..to], from) {
                    if r.is_ok() {
                        r = Err(e);
                    }
                }
            }
            r
        });
        match done {
            Some(r) => r,
            // SAFETY: forwarded to our caller.
            None => self.locked(|a| unsafe { a.free_bulk(frames) }),
        }
    }

    /// Frees `frames[from..]` (at most [`ONE_PASS_MAX`]) onto this CPU's lists in one pass,
    /// `frames[..from]` being freed already: each frame is checked and pushed in turn, and
    /// a bad one undoes the pass (nothing of it freed). A frame listed twice is refused the
    /// second time and the others are freed, as [`BuddyAllocator::free_bulk`] does. Nothing
    /// is drained until the pass is over (a drain cannot be undone): lists too full to take
    /// every frame give their coldest back first.
    fn push_all(&self, cpu: &mut CpuPages, frames: &[PhysAddr], from: usize) -> Result<(), BuddyError> {
        let n = frames.len() - from;
        for (z, l) in cpu.lists.iter_mut().enumerate() {
            if l.len + n > HOT_CAPACITY {
                self.locked(|a| a.pcp_drain(z, l, l.len + n - HOT_CAPACITY));
                self.counts[cpu.cpu].0[z].store(l.len, Ordering::Relaxed);
            }
        }
        let mut touched = [false; MAX_NR_ZONES];
        let mut listed_twice = false;
        for (i, &pa) in frames.iter().enumerate().skip(from) {
            match check_allocated(&self.map, self.state, pa, 0) {
                Ok((r, idx)) => {
                    state_byte(self.state, &self.map, idx).store(ST_HOT, Ordering::Relaxed);
                    cpu.lists[r.zone].push_top(HotList::entry(pa.as_u64() >> PAGE_SHIFT, r.slot));
                    touched[r.zone] = true;
                }
                Err(BuddyError::NotAllocated) if frames[..i].contains(&pa) => listed_twice = true,
                Err(e) => {
                    self.unpush(cpu, &frames[..i], from);
                    return Err(e);
                }
            }
        }
        if self.strict {
            for &pa in &frames[from..] {
                // SAFETY: each frame was allocated and its owner gave it back (this pass
                // put it on our list; a copy listed twice is the same frame).
                unsafe { self.ptr(pa.as_u64() >> PAGE_SHIFT).write_bytes(POISON_BYTE, PAGE_SIZE) };
            }
        }
        for (z, _) in touched.iter().enumerate().filter(|(_, &t)| t) {
            self.trim(cpu, z);
        }
        if listed_twice {
            Err(BuddyError::NotAllocated)
        } else {
            Ok(())
        }
    }

    /// Takes `frames[from..]`, just pushed by [`Self::push_all`] in this order (a copy
    /// listed twice was not), back off this CPU's lists: allocated again, as they were.
    #[cold]
    fn unpush(&self, cpu: &mut CpuPages, frames: &[PhysAddr], from: usize) {
        for (j, &pa) in frames.iter().enumerate().skip(from).rev() {
            if frames[..j].contains(&pa) {
                continue;
            }
            let pfn = pa.as_u64() >> PAGE_SHIFT;
            let Some(&r) = self.map.region_of(pfn) else { continue };
            let e = cpu.lists[r.zone].pop_top();
            debug_assert_eq!(e, HotList::entry(pfn, r.slot));
            let idx = r.index + (pfn - r.start_pfn) as usize;
            state_byte(self.state, &self.map, idx).store(ST_ALLOC, Ordering::Relaxed);
        }
    }

    /// Puts a checked, allocated frame on top of this CPU's list of its zone; a list above
    /// `high` gives `batch` (or what is above `high`, if more) back to the zone. While some
    /// zone is below `low`, `high` counts as 0: the whole list goes back.
    #[inline(always)]
    fn push(&self, cpu: &mut CpuPages, r: RegionInfo, idx: usize, pfn: u64) -> Result<(), BuddyError> {
        // A load and a store (see the module docs): only this CPU's fast path writes the
        // state of a frame its owner is freeing, unless two owners free it at once.
        let st = state_byte(self.state, &self.map, idx);
        if st.load(Ordering::Relaxed) != ST_ALLOC {
            return Err(BuddyError::NotAllocated);
        }
        st.store(ST_HOT, Ordering::Relaxed);
        if self.strict {
            // SAFETY: the frame was allocated, and its owner gave it back (its only free now).
            unsafe { self.ptr(pfn).write_bytes(POISON_BYTE, PAGE_SIZE) };
        }
        cpu.lists[r.zone].push_top(HotList::entry(pfn, r.slot));
        self.trim(cpu, r.zone);
        Ok(())
    }

    /// After frees onto this CPU's list of zone `z`: a list above `high` gives `batch` (or
    /// what is above `high`, if more) back to the zone; then its length is published.
    /// Under pressure a freed frame goes back to its zone at once, where the watermark
    /// check sees it (as Linux lowers `pcp->high` when a zone is below its marks).
    #[inline(always)]
    fn trim(&self, cpu: &mut CpuPages, z: usize) {
        let (l, m) = (&mut cpu.lists[z], &self.zones[z]);
        let high = if self.pressure.load(Ordering::Relaxed) { 0 } else { m.high.load(Ordering::Relaxed) };
        if l.len > high {
            let n = m.batch.load(Ordering::Relaxed).max(l.len - high);
            self.locked(|a| a.pcp_drain(z, l, n));
        }
        self.counts[cpu.cpu].0[z].store(l.len, Ordering::Relaxed);
    }

    // ----- draining and statistics -----

    /// Gives this CPU's lists back to the zones; returns the frames moved (0 when the
    /// lists are in use further up the stack).
    pub(crate) fn drain_local(&self) -> usize {
        self.drain_local_with(false)
    }

    /// [`Self::drain_local`] if the zone lock is free (0 otherwise): for reclaim, whose
    /// shrinkers only try-lock.
    fn try_drain_local(&self) -> usize {
        self.drain_local_with(true)
    }

    fn drain_local_with(&self, try_only: bool) -> usize {
        self.cpus
            .try_with(|cpu| {
                let mut a = if try_only {
                    match self.core.try_lock() {
                        Some(a) => a,
                        None => return 0,
                    }
                } else {
                    self.core.lock()
                };
                let mut n = 0;
                for z in 0..MAX_NR_ZONES {
                    n += a.pcp_drain(z, &mut cpu.lists[z], usize::MAX);
                    self.counts[cpu.cpu].0[z].store(0, Ordering::Relaxed);
                }
                self.sync_free(&a);
                n
            })
            .unwrap_or(0)
    }

    /// Frames on the per-CPU lists now, per zone (as last published by each CPU).
    pub(crate) fn pcp_pages(&self) -> [usize; MAX_NR_ZONES] {
        let mut n = [0; MAX_NR_ZONES];
        for c in &self.counts {
            for (t, v) in n.iter_mut().zip(&c.0) {
                *t += v.load(Ordering::Relaxed);
            }
        }
        n
    }

    /// The core's counters with the per-CPU lists' frames added back.
    pub(crate) fn stats(&self) -> BuddyStats {
        let mut s = self.locked(|a| a.stats());
        let pcp = self.pcp_pages();
        for (z, (zs, n)) in s.zones.iter_mut().zip(pcp).enumerate() {
            zs.free_pages += n;
            zs.hot_pages += n;
            if zs.present != 0 {
                zs.pcp = self.limits(z);
            }
        }
        let total: usize = pcp.iter().sum();
        s.free_pages += total;
        s.hot_pages += total;
        s.corruptions += self.corruptions.load(Ordering::Relaxed);
        s
    }

    /// [`BuddyAllocator::check_consistency`] with the per-CPU lists' frames (for tests, on
    /// a quiet system).
    pub(crate) fn check_consistency(&self) -> Result<(), &'static str> {
        let pcp = self.pcp_pages();
        self.core.lock().check_consistency_with(pcp)
    }
}

/// The per-CPU page lists as a shrinker: what they hold, drained on every CPU (this one
/// only if the zone lock is free: shrinkers only try-lock; the others in their interrupt
/// handler, where no lock of theirs can be held).
pub(crate) static PCP_SHRINKER: crate::reclaim::Shrinker =
    crate::reclaim::Shrinker::new("buddy per-CPU lists", pcp_count, pcp_scan);

fn pcp_count() -> usize {
    super::BUDDY.get().map_or(0, |g| g.pcp_pages().iter().sum())
}

fn pcp_scan(_nr: usize) -> usize {
    let Some(g) = super::BUDDY.get() else { return 0 };
    let moved = AtomicUsize::new(g.try_drain_local());
    let _ = hal::smp::on_each_cpu(&|| {
        moved.fetch_add(g.drain_local(), Ordering::Relaxed);
    });
    moved.into_inner()
}

/// CPUs online now (not switched off), at least 1.
fn online_now() -> usize {
    (0..hal::smp::online_cpus().max(1))
        .filter(|&c| c == 0 || !matches!(hal::smp::cpu_state(c), hal::smp::state::OFF | hal::smp::state::GOING_DOWN))
        .count()
        .max(1)
}

/// Gives the calling CPU's per-CPU page lists back to the zones (the hotplug "down" hook
/// runs it on a CPU going off); returns the frames moved (0 before [`super::init`]).
///
/// # Example
/// ```no_run
/// let moved = memory::buddy::drain_local();
/// # let _ = moved;
/// ```
pub fn drain_local() -> usize {
    super::BUDDY.get().map_or(0, Global::drain_local)
}

/// Fixes the per-CPU lists' `high` and `batch` for every zone (`Some`; `high` 0 turns them
/// off), or goes back to Linux's (`None`); nothing before [`super::init`]. For tests and
/// benches; frames above a lower `high` go back on the next free.
///
/// # Example
/// ```no_run
/// use memory::buddy::{set_pcp_limits, PcpLimits};
/// set_pcp_limits(Some(PcpLimits { high: 0, batch: 1 }));  // every free merges at once
/// set_pcp_limits(None);                                   // Linux's again
/// ```
pub fn set_pcp_limits(limits: Option<PcpLimits>) {
    if let Some(g) = super::BUDDY.get() {
        g.set_limits(limits);
    }
}

/// Frames on CPU `cpu`'s page lists now, all zones (as it last published; 0 before
/// [`super::init`] or for a CPU out of range).
///
/// # Example
/// ```no_run
/// let held = memory::buddy::pcp::pcp_pages_on(1);
/// # let _ = held;
/// ```
pub fn pcp_pages_on(cpu: usize) -> usize {
    super::BUDDY
        .get()
        .and_then(|g| g.counts.get(cpu))
        .map_or(0, |c| c.0.iter().map(|n| n.load(Ordering::Relaxed)).sum())
}

/// The per-CPU lists' limits of each zone now (zeros before [`super::init`]).
///
/// # Example
/// ```no_run
/// let l = memory::buddy::pcp_limits()[memory::gfp::ZONE_DMA32];
/// log::info!("pcp: high {} batch {}", l.high, l.batch);
/// ```
pub fn pcp_limits() -> [PcpLimits; MAX_NR_ZONES] {
    super::BUDDY.get().map_or([PcpLimits::default(); MAX_NR_ZONES], |g| core::array::from_fn(|z| g.limits(z)))
}

/// Recomputes the per-CPU lists' limits from the CPUs online now (the hotplug hooks call
/// it after a CPU went off or came back).
pub fn pcp_update_cpus() {
    if let Some(g) = super::BUDDY.get() {
        g.locked(|a| g.sync_marks(a));
    }
}
