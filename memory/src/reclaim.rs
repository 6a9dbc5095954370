//! Reclaim under memory pressure: shrinkers, and the one out-of-memory report.
//!
//! # Shrinkers
//! Whoever holds memory it could give back registers a [`Shrinker`] (Linux's
//! `struct shrinker`): `count` says how many frames it could free now, `scan` frees up to
//! the number asked and says how many it did. The page allocator runs them ([`shrink`])
//! when an allocation takes a zone below its `low` watermark, and once more before it gives
//! up on an allocation; never while it holds its own lock, never in interrupt context, never
//! while this CPU holds a lock that forbids reclaim (`hal::sync::reclaim_forbidden`: the
//! vmalloc instance and the kernel's tables, under which table pages are allocated), and
//! not for `GFP_ATOMIC` (no `__GFP_DIRECT_RECLAIM`) or `__GFP_NORETRY`. A per-CPU flag
//! stops a shrinker that allocates from reclaiming again. Shrinkers only try-lock: one that
//! finds its lock taken gives back nothing this time.
//!
//! The memory system registers its own in [`crate::kernel::init`]: the buddy's per-CPU
//! page lists, the slab's per-CPU magazines and empty slabs, vmalloc's quarantine and spare
//! records (a purge returns the quarantined frames; parked ranges hold no frames, vfree
//! already freed them). A driver registers its pools the same way (the virtio bounce pool).
//!
//! # Out of memory
//! When nothing can be reclaimed, the allocation fails with its typed error and one report
//! is logged ([`OomReport`]: the request, free frames per zone and order, the per-CPU
//! lists, slab, and what the registered report sections add — vmalloc, page tables,
//! quarantine), at most one per [`OOM_REPORT_INTERVAL_NS`]; [`last_oom_report`] keeps the
//! last one for tests. [`stats`] counts reclaim runs, frames reclaimed per shrinker and
//! failures (zoneinfo and meminfo show them).

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use hal::dtb::MAX_CPUS;

use crate::buddy::{self, MAX_NR_ZONES, NR_ORDERS, ZONE_NAMES};
use crate::gfp::{Gfp, __GFP_DIRECT_RECLAIM, __GFP_NORETRY};

/// Most shrinkers registered at once.
pub const MAX_SHRINKERS: usize = 16;
/// At most one out-of-memory report per this many nanoseconds (Linux's `oom_rs`
/// ratelimit is 5 s).
pub const OOM_REPORT_INTERVAL_NS: u64 = 5_000_000_000;

/// Memory someone can give back under pressure (Linux's `struct shrinker`). Build one with
/// [`Shrinker::new`] in a `static` and [`register`] it.
pub struct Shrinker {
    /// Shown in reports and statistics.
    pub name: &'static str,
    /// Frames this shrinker could give back now (0: nothing; it is then not scanned).
    pub count: fn() -> usize,
    /// Gives back up to `nr` frames' worth; returns the frames given back. Must not block:
    /// only try-locks.
    pub scan: fn(nr: usize) -> usize,
    calls: AtomicU64,
    reclaimed: AtomicU64,
}

impl Shrinker {
    /// A shrinker named `name`.
    ///
    /// # Example
    /// ```
    /// use memory::reclaim::Shrinker;
    /// fn count() -> usize { 0 }
    /// fn scan(_nr: usize) -> usize { 0 }
    /// static POOL: Shrinker = Shrinker::new("my-pool", count, scan);
    /// assert_eq!(POOL.stats().calls, 0);
    /// ```
    pub const fn new(name: &'static str, count: fn() -> usize, scan: fn(nr: usize) -> usize) -> Self {
        Shrinker { name, count, scan, calls: AtomicU64::new(0), reclaimed: AtomicU64::new(0) }
    }

    /// How often this shrinker was scanned, and the frames it gave back in all.
    pub fn stats(&self) -> ShrinkerStats {
        ShrinkerStats {
            name: self.name,
            calls: self.calls.load(Ordering::Relaxed),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
        }
    }
}

/// One shrinker's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShrinkerStats {
    /// The shrinker's name.
    pub name: &'static str,
    /// Scans.
    pub calls: u64,
    /// Frames given back.
    pub reclaimed: u64,
}

/// Why a shrinker could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReclaimError {
    /// [`MAX_SHRINKERS`] are registered already.
    TooManyShrinkers,
    /// This shrinker is registered already.
    AlreadyRegistered,
}

impl fmt::Display for ReclaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReclaimError::TooManyShrinkers => write!(f, "{MAX_SHRINKERS} shrinkers are registered already"),
            ReclaimError::AlreadyRegistered => f.write_str("shrinker registered twice"),
        }
    }
}

impl core::error::Error for ReclaimError {}

static SHRINKERS: [AtomicPtr<Shrinker>; MAX_SHRINKERS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_SHRINKERS];
static IN_RECLAIM: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static RUNS: AtomicU64 = AtomicU64::new(0);
static RECLAIMED: AtomicU64 = AtomicU64::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Registers `s`; it is run from then on.
///
/// # Errors
/// [`ReclaimError::AlreadyRegistered`], [`ReclaimError::TooManyShrinkers`].
///
/// # Example
/// ```no_run
/// use memory::reclaim::{register, Shrinker};
/// fn count() -> usize { 0 }
/// fn scan(_nr: usize) -> usize { 0 }
/// static POOL: Shrinker = Shrinker::new("my-pool", count, scan);
/// register(&POOL)?;
/// # Ok::<(), memory::reclaim::ReclaimError>(())
/// ```
pub fn register(s: &'static Shrinker) -> Result<(), ReclaimError> {
    let p = s as *const Shrinker as *mut Shrinker;
    if SHRINKERS.iter().any(|slot| slot.load(Ordering::Acquire) == p) {
        return Err(ReclaimError::AlreadyRegistered);
    }
    for slot in &SHRINKERS {
        if slot.compare_exchange(core::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return Ok(());
        }
    }
    Err(ReclaimError::TooManyShrinkers)
}

/// The registered shrinkers, in registration order.
fn shrinkers() -> impl Iterator<Item = &'static Shrinker> {
    SHRINKERS.iter().filter_map(|slot| {
        let p = slot.load(Ordering::Acquire);
        // SAFETY: only `&'static Shrinker`s are ever stored (`register`), never removed.
        (!p.is_null()).then(|| unsafe { &*p })
    })
}

/// Whether an allocation with `gfp` may run the shrinkers here and now: it may block
/// (`__GFP_DIRECT_RECLAIM`), does not ask `__GFP_NORETRY`, runs in thread context with
/// interrupts on (so it holds no IRQ-safe lock: not the zones', not a slab cache's), holds
/// no lock that forbids reclaim, and this CPU is not reclaiming already.
#[inline]
pub fn may_reclaim(gfp: Gfp) -> bool {
    gfp.contains(__GFP_DIRECT_RECLAIM)
        && !gfp.contains(__GFP_NORETRY)
        && !hal::irq::in_interrupt()
        && hal::irq::irqs_enabled()
        && !hal::sync::reclaim_forbidden()
        && !IN_RECLAIM[hal::smp::this_cpu()].load(Ordering::Relaxed)
}

/// Runs every shrinker with something to give, asking for `nr` frames in all (each is
/// asked for what is still wanted, at least 1); returns the frames given back. Does
/// nothing (returns 0) when this CPU is reclaiming already. The caller checked
/// [`may_reclaim`].
///
/// # Example
/// ```no_run
/// let got = memory::reclaim::shrink(256);
/// log::info!("reclaim gave back {got} frames");
/// ```
pub fn shrink(nr: usize) -> usize {
    let flag = &IN_RECLAIM[hal::smp::this_cpu()];
    if flag.swap(true, Ordering::Acquire) {
        return 0;
    }
    RUNS.fetch_add(1, Ordering::Relaxed);
    let mut got = 0;
    for s in shrinkers() {
        if (s.count)() == 0 {
            continue;
        }
        let n = (s.scan)(nr.saturating_sub(got).max(1));
        s.calls.fetch_add(1, Ordering::Relaxed);
        s.reclaimed.fetch_add(n as u64, Ordering::Relaxed);
        got += n;
    }
    RECLAIMED.fetch_add(got as u64, Ordering::Relaxed);
    flag.store(false, Ordering::Release);
    got
}

/// Reclaim's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Times the shrinkers were run.
    pub runs: u64,
    /// Frames they gave back in all.
    pub reclaimed: u64,
    /// Allocations that failed after reclaim (each one out-of-memory event).
    pub failures: u64,
    /// Out-of-memory reports printed (the others were rate-limited).
    pub reports: u64,
    /// Each registered shrinker's counters, in registration order.
    pub shrinkers: [ShrinkerStats; MAX_SHRINKERS],
    /// How many entries of `shrinkers` are used.
    pub nr_shrinkers: usize,
}

/// Reclaim's counters now.
///
/// # Example
/// ```no_run
/// let s = memory::reclaim::stats();
/// for sh in &s.shrinkers[..s.nr_shrinkers] {
///     log::info!("{}: {} frames in {} scans", sh.name, sh.reclaimed, sh.calls);
/// }
/// ```
pub fn stats() -> ReclaimStats {
    let mut s = ReclaimStats {
        runs: RUNS.load(Ordering::Relaxed),
        reclaimed: RECLAIMED.load(Ordering::Relaxed),
        failures: FAILURES.load(Ordering::Relaxed),
        reports: REPORTS.load(Ordering::Relaxed),
        ..Default::default()
    };
    for (slot, sh) in s.shrinkers.iter_mut().zip(shrinkers()) {
        *slot = sh.stats();
        s.nr_shrinkers += 1;
    }
    s
}

impl fmt::Display for ReclaimStats {
    /// meminfo-style lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Reclaim:        {:>8}     runs, {} frames given back, {} failures ({} reported)",
            self.runs, self.reclaimed, self.failures, self.reports
        )?;
        for sh in &self.shrinkers[..self.nr_shrinkers] {
            writeln!(f, "  shrinker {:<22} {:>8} frames in {} scans", sh.name, sh.reclaimed, sh.calls)?;
        }
        Ok(())
    }
}

// ----- the out-of-memory report -----

/// What an out-of-memory report says (Linux's `warn_alloc` + `show_mem`, in spirit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomReport {
    /// The request: order, flags, the CPU it came from.
    pub order: usize,
    /// The request's flags.
    pub gfp: Gfp,
    /// The CPU that asked.
    pub cpu: usize,
    /// Free frames per zone (on the zone's lists and frontier, per-CPU lists apart).
    pub zone_free: [usize; MAX_NR_ZONES],
    /// Each zone's `min` watermark.
    pub zone_min: [usize; MAX_NR_ZONES],
    /// Frames each zone manages (0: the zone is empty).
    pub zone_managed: [usize; MAX_NR_ZONES],
    /// Free blocks per zone and order.
    pub zone_blocks: [[usize; NR_ORDERS]; MAX_NR_ZONES],
    /// Frames on per-CPU lists.
    pub pcp_pages: usize,
    /// All free frames (`Σ zone_free + pcp_pages`).
    pub free_pages: usize,
    /// Frames managed.
    pub total_pages: usize,
    /// Frames in slabs.
    pub slab_pages: usize,
    /// Frames of large kmalloc objects.
    pub large_pages: usize,
    /// What the registered sections count (vmalloc's pages, table pages, quarantine...).
    pub sections: [(&'static str, usize); 4],
    /// Reclaim runs so far.
    pub reclaim_runs: u64,
}

impl fmt::Display for OomReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "out of memory: CPU {} asked order {} ({} KiB), mode {:?}; nothing left to reclaim ({} reclaim runs so far)",
            self.cpu,
            self.order,
            4usize << self.order,
            self.gfp,
            self.reclaim_runs
        )?;
        for (z, name) in ZONE_NAMES.iter().enumerate() {
            if self.zone_managed[z] == 0 {
                continue;
            }
            write!(
                f,
                "  Node 0, zone {name:>8}: free {} of {} (min {}); free blocks per order",
                self.zone_free[z], self.zone_managed[z], self.zone_min[z]
            )?;
            for b in &self.zone_blocks[z] {
                write!(f, " {b}")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "  free {} of {} frames ({} on per-CPU lists); slab {} frames, large kmalloc {} frames",
            self.free_pages, self.total_pages, self.pcp_pages, self.slab_pages, self.large_pages
        )?;
        for (name, n) in self.sections.iter().filter(|(name, _)| !name.is_empty()) {
            writeln!(f, "  {name}: {n}")?;
        }
        Ok(())
    }
}

/// A section of the out-of-memory report that a layer above the buddy fills in (name,
/// figure): vmalloc's pages, its page tables, the quarantine.
pub type ReportSection = fn() -> [(&'static str, usize); 4];

static SECTION: spin::Mutex<Option<ReportSection>> = spin::Mutex::new(None);
static LAST_REPORT_NS: AtomicU64 = AtomicU64::new(0);
static REPORTS: AtomicU64 = AtomicU64::new(0);
static LAST: spin::Mutex<Option<OomReport>> = spin::Mutex::new(None);

/// Sets the report's upper section (the kernel sets vmalloc's).
pub fn set_report_section(f: ReportSection) {
    *SECTION.lock() = Some(f);
}

/// The last out-of-memory report printed, if any.
///
/// # Example
/// ```no_run
/// if let Some(r) = memory::reclaim::last_oom_report() {
///     log::info!("last OOM: order {} with {} frames free", r.order, r.free_pages);
/// }
/// ```
pub fn last_oom_report() -> Option<OomReport> {
    *LAST.lock()
}

/// An allocation of `order` with `gfp` failed after reclaim: counts it, and logs one
/// report unless one was logged within [`OOM_REPORT_INTERVAL_NS`] or `gfp` says
/// `__GFP_NOWARN`. Thread context only (called where [`may_reclaim`] held).
#[cold]
pub fn out_of_memory(order: usize, gfp: Gfp) {
    FAILURES.fetch_add(1, Ordering::Relaxed);
    if gfp.contains(crate::gfp::__GFP_NOWARN) {
        return;
    }
    let now = hal::cpu::uptime_ns();
    let last = LAST_REPORT_NS.load(Ordering::Relaxed);
    if REPORTS.load(Ordering::Relaxed) != 0 && now.saturating_sub(last) < OOM_REPORT_INTERVAL_NS {
        return;
    }
    if LAST_REPORT_NS.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return; // another CPU reports this window
    }
    REPORTS.fetch_add(1, Ordering::Relaxed);
    let r = report(order, gfp);
    log::error!("{r}");
    *LAST.lock() = Some(r);
}

fn report(order: usize, gfp: Gfp) -> OomReport {
    let mut r = OomReport {
        order,
        gfp,
        cpu: hal::smp::this_cpu(),
        reclaim_runs: RUNS.load(Ordering::Relaxed),
        ..Default::default()
    };
    if let Some(s) = buddy::stats() {
        for (z, zs) in s.zones.iter().enumerate() {
            r.zone_free[z] = zs.free_pages - zs.hot_pages;
            r.zone_min[z] = zs.min;
            r.zone_managed[z] = zs.managed;
            r.zone_blocks[z] = zs.free_blocks;
        }
        r.pcp_pages = s.hot_pages;
        r.free_pages = s.free_pages;
        r.total_pages = s.total_pages;
    }
    if let Some(s) = crate::slab::stats() {
        r.slab_pages = s.slab_pages;
        r.large_pages = s.large_pages;
    }
    let section = *SECTION.lock();
    if let Some(f) = section {
        r.sections = f();
    }
    r
}
