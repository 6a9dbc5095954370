//! Reports: `/proc/vmallocinfo`, fault attribution, the history of freed areas, purge timings.

use core::fmt::{self, Write};
use core::panic::Location;

use hal::VirtAddr;

use super::node::{NodePtr, State};
use super::{AreaKind, VmBackend, VmFlags, Vmalloc, PAGE};

/// How many freed areas [`Vmalloc::explain_fault`] remembers after their purge.
pub const HISTORY_LEN: usize = 64;

#[derive(Clone, Copy)]
struct Freed {
    start: u64,
    end: u64,
    ptr: u64,
    bytes: usize,
    caller: &'static Location<'static>,
    freer: &'static Location<'static>,
}

/// A ring of the last [`HISTORY_LEN`] freed areas (copies, not records).
pub(crate) struct History {
    ring: [Option<Freed>; HISTORY_LEN],
    next: usize,
}

impl History {
    pub const fn new() -> Self {
        Self { ring: [None; HISTORY_LEN], next: 0 }
    }

    pub fn push(&mut self, n: NodePtr) {
        let nd = n.get();
        let f = Freed {
            start: nd.start.get(),
            end: nd.end.get(),
            ptr: nd.start.get() + u64::from(nd.offset.get()),
            bytes: nd.bytes.get(),
            caller: nd.caller.get(),
            freer: nd.freer.get().unwrap_or(nd.caller.get()),
        };
        if let Some(slot) = self.ring.get_mut(self.next) {
            *slot = Some(f);
        }
        self.next = (self.next + 1) % HISTORY_LEN;
    }

    /// Newest first.
    fn iter(&self) -> impl Iterator<Item = &Freed> {
        (1..=HISTORY_LEN).filter_map(move |i| {
            let idx = (self.next + HISTORY_LEN - i) % HISTORY_LEN;
            self.ring.get(idx).and_then(Option::as_ref)
        })
    }

    /// Whether `ptr` is the pointer of a remembered freed area.
    pub fn freed_pointer(&self, ptr: u64) -> bool {
        self.iter().any(|f| f.ptr == ptr)
    }

    fn containing(&self, addr: u64) -> Option<&Freed> {
        self.iter().find(|f| (f.start..f.end).contains(&addr))
    }
}

/// Purge durations in log-linear buckets: exact below 8 ns, then 8 buckets per power of two
/// (an upper bound within 12.5 %).
pub(crate) struct PurgeHistogram {
    counts: [u32; BUCKETS],
    /// The sum of `counts`, kept so a percentile need not add up every bucket.
    total: u64,
    max: u64,
}

const BUCKETS: usize = 8 + 61 * 8;

fn bucket(v: u64) -> usize {
    if v < 8 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros() as usize;
    let sub = ((v >> (msb - 3)) & 7) as usize;
    8 + (msb - 3) * 8 + sub
}

fn bucket_upper(b: usize) -> u64 {
    if b < 8 {
        return b as u64;
    }
    let msb = (b - 8) / 8 + 3;
    let sub = ((b - 8) % 8) as u64;
    let lower = (1u64 << msb) | (sub << (msb - 3));
    lower.saturating_add((1u64 << (msb - 3)) - 1)
}

impl PurgeHistogram {
    pub const fn new() -> Self {
        Self { counts: [0; BUCKETS], total: 0, max: 0 }
    }

    pub fn record(&mut self, ns: u64) {
        if let Some(c) = self.counts.get_mut(bucket(ns)) {
            if *c < u32::MAX {
                *c += 1;
                self.total += 1;
            }
        }
        self.max = self.max.max(ns);
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The `p`-th percentile (bucket upper bound, capped at the maximum), 0 when empty: the
    /// lowest bucket whose count, with every bucket below it, reaches `p` % of the total.
    /// Found walking down from the maximum's bucket (`stats` asks for the 99th at every
    /// call, and purge times sit in a few buckets near the top), not up from zero.
    pub fn percentile(&self, p: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let target = (self.total * p.min(100)).div_ceil(100).max(1);
        let mut b = bucket(self.max).min(BUCKETS - 1);
        // `upto`: the count in buckets 0..=b.
        let mut upto = self.total;
        while b > 0 && upto - u64::from(self.counts[b]) >= target {
            upto -= u64::from(self.counts[b]);
            b -= 1;
        }
        bucket_upper(b).min(self.max)
    }
}

/// What [`Vmalloc::explain_fault`] made of an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// Outside the vmalloc window: not ours to explain (nothing written).
    NotVmalloc,
    /// In a guard page (or the unmapped tail of a shrunk area).
    GuardPage,
    /// In a parked range or a recently freed area.
    UseAfterFree,
    /// Inside the mapped pages of a live area (a permission fault, e.g. a write to a
    /// read-only vmap).
    LiveArea,
    /// In vmalloc space that no live or remembered area covers.
    Unallocated,
}

/// `/proc/vmallocinfo` for a [`Vmalloc`]: [`Vmalloc::info`].
pub struct VmallocInfo<'a, B: VmBackend>(&'a Vmalloc<B>);

impl<B: VmBackend> fmt::Display for VmallocInfo<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.write_info(f)
    }
}

impl<B: VmBackend> Vmalloc<B> {
    /// `/proc/vmallocinfo`, as Linux's `s_show` prints it: for each live area in address
    /// order `0xSTART-0xEND SIZE CALLER [pages=N] [phys=0x…] vmalloc|vmap|ioremap`, SIZE with
    /// the guard page (`pages=` is omitted for ioremap, `phys=` printed only for it); then,
    /// as Linux's `show_purge_info`, each parked range as `0xSTART-0xEND SIZE unpurged
    /// vm_area` (most recently freed first). O(n): not for exception context.
    ///
    /// # Errors
    /// Whatever `out` returns.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(3 * 4096)?;
    /// let mut text = String::new();
    /// vm.write_info(&mut text).unwrap();   // "0x…-0x…   16384 src/x.rs:4:12 pages=3 vmalloc"
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn write_info(&self, out: &mut dyn Write) -> fmt::Result {
        self.write_busy(out, 0, u64::MAX, false)?;
        self.write_parked(out)
    }

    /// The live areas of [`Self::write_info`] that start in `[lo, hi)`, in address order;
    /// with `skip_nodes`, without the [`AreaKind::Node`] reservations (whose own areas the
    /// caller lists in their place).
    ///
    /// # Errors
    /// A formatter error from `out`.
    pub fn write_busy(&self, out: &mut dyn Write, lo: u64, hi: u64, skip_nodes: bool) -> fmt::Result {
        for n in self.live_iter() {
            let nd = n.get();
            let kind = nd.kind.get();
            if nd.start.get() < lo || nd.start.get() >= hi || (skip_nodes && kind == AreaKind::Node) {
                continue;
            }
            write!(out, "0x{:016x}-0x{:016x} {:>7} {}", nd.start.get(), nd.end.get(), nd.size(), nd.caller.get())?;
            if kind != AreaKind::Ioremap && nd.pages.get() > 0 {
                write!(out, " pages={}", nd.pages.get())?;
            }
            if kind == AreaKind::Ioremap {
                write!(out, " phys=0x{:016x}", nd.phys.get())?;
            }
            write!(out, " {kind}")?;
            if kind == AreaKind::Vmalloc
                && VmFlags(nd.flags.get()).contains(VmFlags::HUGE)
                && nd.pages.get() >= super::BLOCK_PAGES
            {
                // Ours: Linux prints no marker for huge mappings.
                out.write_str(" huge")?;
            }
            writeln!(out)?;
        }
        Ok(())
    }

    /// The parked ranges of [`Self::write_info`] (after the busy ones, like Linux's
    /// `show_purge_info`).
    ///
    /// # Errors
    /// A formatter error from `out`.
    pub fn write_parked(&self, out: &mut dyn Write) -> fmt::Result {
        for n in self.parked_iter() {
            let nd = n.get();
            writeln!(out, "0x{:016x}-0x{:016x} {:>7} unpurged vm_area", nd.start.get(), nd.end.get(), nd.size())?;
        }
        Ok(())
    }

    /// A `Display` of [`Self::write_info`].
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let p = vm.vmalloc(4096)?;
    /// log::info!("vmallocinfo:\n{}", vm.info());
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn info(&self) -> VmallocInfo<'_, B> {
        VmallocInfo(self)
    }

    /// Explain a fault at `addr` in one line on `out`:
    /// - guard page: `vmalloc: guard page hit at VA, N bytes past area START-END (SIZE)
    ///   allocated at CALLER`, where START-END is the object (`[pointer, pointer + size)`),
    ///   SIZE its byte count and N counts from its end (1 = the first byte after it);
    /// - parked range or remembered freed area: `vmalloc: use after vfree at VA: area
    ///   START-END (SIZE) allocated at CALLER, freed at CALLER`;
    /// - otherwise a line saying the address is in a live area or unallocated space.
    ///
    /// Nothing is written for an address outside the window. O(log n), no allocation, takes
    /// `&self`: callable from an exception handler holding only a try-lock.
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// use memory::vmalloc::FaultClass;
    /// let p = vm.vmalloc(4096)?;
    /// let mut why = String::new();
    /// assert_eq!(vm.explain_fault(p.add(4096), &mut why), FaultClass::GuardPage);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn explain_fault(&self, addr: VirtAddr, out: &mut dyn Write) -> FaultClass {
        let a = addr.as_u64();
        if !self.is_vmalloc_addr(addr) {
            return FaultClass::NotVmalloc;
        }
        // Live areas first, then parked ranges (a short list: a fault is a slow path anyway).
        let found = self
            .live_containing(a)
            .or_else(|| self.parked_iter().find(|n| (n.get().start.get()..n.get().end.get()).contains(&a)));
        if let Some(n) = found {
            let nd = n.get();
            let ptr = nd.start.get() + u64::from(nd.offset.get());
            let data_end = ptr + nd.bytes.get() as u64;
            let mapped_end = nd.start.get() + nd.pages.get() as u64 * PAGE;
            let caller = nd.caller.get();
            let bytes = nd.bytes.get();
            if nd.state.get() == State::Parked {
                let freer = nd.freer.get().unwrap_or(caller);
                let _ = writeln!(
                    out,
                    "vmalloc: use after vfree at {a:#x}: area {ptr:#x}-{data_end:#x} ({bytes}) allocated at {caller}, freed at {freer}"
                );
                return FaultClass::UseAfterFree;
            }
            if a >= mapped_end {
                let past = a - data_end + 1;
                let _ = writeln!(
                    out,
                    "vmalloc: guard page hit at {a:#x}, {past} bytes past area {ptr:#x}-{data_end:#x} ({bytes}) allocated at {caller}"
                );
                return FaultClass::GuardPage;
            }
            let _ = writeln!(
                out,
                "vmalloc: fault at {a:#x} inside live {} area {ptr:#x}-{data_end:#x} ({bytes}) allocated at {caller}",
                nd.kind.get()
            );
            return FaultClass::LiveArea;
        }
        if let Some(f) = self.history.containing(a) {
            let _ = writeln!(
                out,
                "vmalloc: use after vfree at {a:#x}: area {:#x}-{:#x} ({}) allocated at {}, freed at {}",
                f.ptr,
                f.ptr + f.bytes as u64,
                f.bytes,
                f.caller,
                f.freer
            );
            return FaultClass::UseAfterFree;
        }
        let _ = writeln!(out, "vmalloc: fault at {a:#x} in unallocated vmalloc space");
        FaultClass::Unallocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_bound_values() {
        for v in [0u64, 1, 7, 8, 9, 15, 16, 100, 1000, 123_456, u64::MAX / 3, u64::MAX] {
            let b = bucket(v);
            assert!(b < BUCKETS);
            assert!(bucket_upper(b) >= v, "{v}");
            assert!(bucket_upper(b) - v <= v / 8 + 1, "{v}");
        }
        let mut h = PurgeHistogram::new();
        for v in 1..=100u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.max(), 100_000);
        let p99 = h.percentile(99);
        assert!((99_000..=100_000).contains(&p99), "{p99}");
    }

    /// The walk down from the maximum finds the bucket a walk up from zero does.
    #[test]
    fn percentile_walking_down_agrees_with_a_walk_up() {
        fn walk_up(h: &PurgeHistogram, p: u64) -> u64 {
            let total: u64 = h.counts.iter().map(|&c| u64::from(c)).sum();
            if total == 0 {
                return 0;
            }
            let target = (total * p).div_ceil(100).max(1);
            let mut seen = 0;
            for (b, &c) in h.counts.iter().enumerate() {
                seen += u64::from(c);
                if seen >= target {
                    return bucket_upper(b).min(h.max);
                }
            }
            h.max
        }
        let mut h = PurgeHistogram::new();
        assert_eq!(h.percentile(99), 0);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        // Size knob: 200 records under Miri (20 s on its clock for 2,000).
        let records = if cfg!(miri) { 200 } else { 2_000 };
        for i in 0..records {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly short purges, a few long ones, some of 0 ns.
            h.record(if i % 50 == 0 { x % 10_000_000 } else { x % 3 * (x >> 40) % 5_000 });
            if i % 29 == 0 || i < 10 {
                for p in [0, 1, 50, 90, 99, 100] {
                    assert_eq!(h.percentile(p), walk_up(&h, p), "p{p} after {i}");
                }
            }
        }
    }
}
