//! The quarantine (`VmallocConfig::quarantine`): the frames of freed areas, poisoned and
//! held until the purge that flushes their TLB entries, then checked for writes after
//! `vfree` and freed.

use super::*;

/// Entries of the quarantine's index: frames taken from the backend, each holding the
/// physical address of the next (older) one, then up to [`Q_ENTRIES`] `(va, pa)` pairs; a
/// pair's `pa` has [`Q_BLOCK`] set for a 2 MiB block. Only the newest frame is partly used.
#[derive(Clone, Copy)]
pub(super) struct Quarantine {
    /// Physical address of the newest index frame, 0 when empty.
    pub(super) head: u64,
    /// Pairs in the newest index frame.
    pub(super) used: usize,
}

impl Quarantine {
    pub(super) const EMPTY: Self = Self { head: 0, used: 0 };
}

/// `(va, pa)` pairs per quarantine index frame (after the link word).
const Q_ENTRIES: usize = (PAGE_SIZE / 8 - 1) / 2;
/// Marks a quarantined 2 MiB block in the index.
const Q_BLOCK: u64 = 1;
/// Reports logged in full per purge; the rest are counted.
const Q_REPORTS_PER_PURGE: usize = 4;

/// The byte quarantined frames are filled with (Linux's `POISON_FREE`).
pub const QUARANTINE_POISON: u8 = 0x6b;

/// A write after `vfree` caught by the quarantine: a quarantined frame's poison changed
/// before the purge flushed the area's TLB entries (see [`VmallocConfig::quarantine`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UseAfterVfree {
    /// The first changed byte, as the freed area's address.
    pub addr: VirtAddr,
    /// The freed area's range (guard page included).
    pub area_start: VirtAddr,
    /// End of that range.
    pub area_end: VirtAddr,
    /// `addr - area_start`.
    pub offset: u64,
    /// The byte found there (instead of [`QUARANTINE_POISON`]).
    pub value: u8,
    /// Who allocated the area.
    pub caller: Option<&'static Location<'static>>,
    /// Who freed it.
    pub freer: Option<&'static Location<'static>>,
}

impl fmt::Display for UseAfterVfree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vmalloc: use after vfree caught by the quarantine: {:#x} (offset {:#x} of area {:#x}-{:#x}) written ({:#04x}) after vfree",
            self.addr, self.offset, self.area_start, self.area_end, self.value
        )?;
        if let Some(c) = self.caller {
            write!(f, "; allocated at {c}")?;
        }
        if let Some(fr) = self.freer {
            write!(f, ", freed at {fr}")?;
        }
        Ok(())
    }
}

impl<B: VmBackend> Vmalloc<B> {
    /// Poison `frames` (mapped from `va` on) and hold them until the purge; returns how
    /// many were taken in, from the front (fewer when no index frame could be had: the
    /// caller frees the rest at once).
    pub(super) fn quarantine_frames(&mut self, va: u64, frames: &[PhysAddr]) -> usize {
        self.backend.poison_frames(frames, QUARANTINE_POISON);
        for (i, pa) in frames.iter().enumerate() {
            if !self.quarantine_push(va + (i * PAGE_SIZE) as u64, pa.as_u64()) {
                self.c.quarantine_bypassed += 1;
                return i;
            }
            self.c.quarantined += 1;
        }
        frames.len()
    }

    /// Poison a 2 MiB block mapped at `va` and hold it until the purge; `false` when no
    /// index frame could be had (the caller frees it at once).
    pub(super) fn quarantine_block(&mut self, va: u64, pa: PhysAddr) -> bool {
        let mut frames = [PhysAddr::new(0); CHUNK];
        for chunk in 0..BLOCK_PAGES / CHUNK {
            for (i, f) in frames.iter_mut().enumerate() {
                *f = pa.add(((chunk * CHUNK + i) * PAGE_SIZE) as u64);
            }
            self.backend.poison_frames(&frames, QUARANTINE_POISON);
        }
        if !self.quarantine_push(va, pa.as_u64() | Q_BLOCK) {
            self.c.quarantine_bypassed += 1;
            return false;
        }
        self.c.quarantined += BLOCK_PAGES;
        true
    }

    /// Append `(va, pa)` to the quarantine's index, taking a new index frame when the newest
    /// is full. `false` (nothing changed) when no frame could be had.
    pub(super) fn quarantine_push(&mut self, va: u64, pa: u64) -> bool {
        if self.q.head == 0 || self.q.used == Q_ENTRIES {
            let mut f = [PhysAddr::new(0)];
            if self.backend.alloc_frames(&mut f) != 1 {
                return false;
            }
            if !self.backend.write_words(f[0], 0, &[self.q.head]) {
                self.backend.free_frames(&f);
                return false;
            }
            // Index frames are not counted in frames_taken/returned (area frames only).
            self.c.quarantined += 1;
            self.q.head = f[0].as_u64();
            self.q.used = 0;
        }
        let at = 1 + 2 * self.q.used;
        if !self.backend.write_words(PhysAddr::new(self.q.head), at, &[va, pa]) {
            return false;
        }
        self.q.used += 1;
        true
    }

    /// After the purge's TLB flush: check every quarantined frame's poison (reporting each
    /// page written after `vfree`, with its area from the `parked` list), then free them and
    /// the index frames.
    pub(super) fn drain_quarantine(&mut self, parked: Link) {
        let (mut idx, mut used) = (self.q.head, self.q.used);
        self.q = Quarantine::EMPTY;
        self.q_reported = 0;
        let mut entries = [0u64; 2 * 32];
        let mut to_free = [PhysAddr::new(0); CHUNK];
        let mut nfree = 0usize;
        while idx != 0 {
            let index = PhysAddr::new(idx);
            let mut next = [0u64];
            self.backend.read_words(index, 0, &mut next);
            let mut e = 0usize;
            while e < used {
                let n = (used - e).min(32);
                let words = &mut entries[..2 * n];
                self.backend.read_words(index, 1 + 2 * e, words);
                for pair in words.chunks_exact(2) {
                    let (va, pa) = (pair[0], pair[1]);
                    if pa & Q_BLOCK != 0 {
                        let base = pa & !Q_BLOCK;
                        for p in 0..BLOCK_PAGES as u64 {
                            self.quarantine_check(parked, va + p * PAGE, PhysAddr::new(base + p * PAGE));
                        }
                        self.backend.free_block(PhysAddr::new(base));
                        self.c.frames_returned += BLOCK_PAGES as u64;
                        self.c.quarantined -= BLOCK_PAGES;
                    } else {
                        self.quarantine_check(parked, va, PhysAddr::new(pa));
                        to_free[nfree] = PhysAddr::new(pa);
                        nfree += 1;
                        if nfree == CHUNK {
                            self.backend.free_frames(&to_free);
                            self.c.frames_returned += CHUNK as u64;
                            self.c.quarantined -= CHUNK;
                            nfree = 0;
                        }
                    }
                }
                e += n;
            }
            self.backend.free_frames(&[index]);
            self.c.quarantined -= 1;
            idx = next[0];
            used = Q_ENTRIES;
        }
        self.backend.free_frames(&to_free[..nfree]);
        self.c.frames_returned += nfree as u64;
        self.c.quarantined -= nfree;
        if self.q_reported > Q_REPORTS_PER_PURGE {
            log::error!(
                "vmalloc: quarantine: {} more pages written after vfree in this purge (see quarantine_hits)",
                self.q_reported - Q_REPORTS_PER_PURGE
            );
        }
    }

    /// Report the page at `va` (frame `pa`) if its poison changed.
    pub(super) fn quarantine_check(&mut self, parked: Link, va: u64, pa: PhysAddr) {
        let Some((off, value)) = self.backend.find_unpoisoned(pa, QUARANTINE_POISON) else { return };
        self.c.quarantine_hits += 1;
        let addr = va + off as u64;
        let area = core::iter::successors(parked, |n| n.get().next.get()).find(|n| {
            let nd = n.get();
            (nd.start.get()..nd.end.get()).contains(&addr)
        });
        let report = match area {
            Some(n) => {
                let nd = n.get();
                UseAfterVfree {
                    addr: VirtAddr::new(addr),
                    area_start: VirtAddr::new(nd.start.get()),
                    area_end: VirtAddr::new(nd.end.get()),
                    offset: addr - nd.start.get(),
                    value,
                    caller: Some(nd.caller.get()),
                    freer: nd.freer.get(),
                }
            }
            None => UseAfterVfree {
                addr: VirtAddr::new(addr),
                area_start: VirtAddr::new(va),
                area_end: VirtAddr::new(va + PAGE),
                offset: off as u64,
                value,
                caller: None,
                freer: None,
            },
        };
        // Rate-limited (as Linux's reports): the first few of a purge in full.
        if self.q_reported < Q_REPORTS_PER_PURGE {
            log::error!("{report}");
        }
        self.q_reported += 1;
        self.last_use_after_vfree = Some(report);
    }

    /// The last write after `vfree` the quarantine caught (see [`VmallocConfig::quarantine`]).
    ///
    /// # Example
    /// ```no_run
    /// # use memory::vmalloc::{sim::SimBackend, Vmalloc, VmallocConfig};
    /// # let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// # let mut vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// vm.purge();
    /// if let Some(r) = vm.last_use_after_vfree() {
    ///     log::error!("{r}");
    /// }
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn last_use_after_vfree(&self) -> Option<UseAfterVfree> {
        self.last_use_after_vfree
    }
}
