//! The workloads of Linux's `lib/test_vmalloc.c` (6.1, plus `vm_map_ram_test`,
//! `no_block_alloc_test` and `vrealloc_test` of later kernels): same sizes, counts and loop
//! structure, including the setup each case times (Linux's pointer arrays are vmalloc'd
//! here too). Every call goes through [`Ctx`], which keeps the [`Model`] of the counters the
//! workload implies and verifies the translation of every page on sampled iterations.

use alloc::vec::Vec;

use hal::linear::LinearMap;
use hal::{PhysAddr, VirtAddr, PAGE_SIZE};
use memory::kernel;
use memory::vmalloc::{VmFlags, VmallocError};

use super::check::Model;

/// Linux's `int` return: `Err(())` is its `-1`.
pub type Outcome = Result<(), ()>;

const PAGE: u64 = PAGE_SIZE as u64;

/// Verify the translation of every page on iterations `i` with `i.is_multiple_of(SAMPLE_EVERY)`.
pub const SAMPLE_EVERY: u32 = 1024;

/// Online CPUs as `full_fit_alloc_test` counts them: the bench runs on the boot CPU only.
const ONLINE_CPUS: u32 = 1;

/// `THREAD_ALIGN << 1` of `fix_align_alloc_test`: arm64 with `VMAP_STACK` aligns stacks to
/// twice `THREAD_SIZE` (16 KiB), so 64 KiB.
const FIX_ALIGN: usize = 64 * 1024;

/// SplitMix64: small, fast and deterministic for a given seed.
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Linux's `get_random_u8()`.
    #[inline]
    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Linux's `get_random_u32_inclusive(lo, hi)` (multiply-shift, bias below 2^-32).
    #[inline]
    pub fn inclusive(&mut self, lo: u32, hi: u32) -> u32 {
        let span = u64::from(hi - lo) + 1;
        lo + (((self.next_u64() >> 32) * span) >> 32) as u32
    }
}

/// A live vmalloc area as the bench tracks it (for the model).
#[derive(Clone, Copy, Debug)]
pub struct Area {
    /// The pointer.
    pub va: VirtAddr,
    /// Pages mapped.
    pub pages: usize,
    /// Pages of its range, guard included.
    pub range: usize,
}

/// The state a case runs with: parameters, generator, model, verification tallies.
pub struct Ctx {
    /// `test_loop_count`.
    pub loops: u32,
    /// `nr_pages` (0 given means 1, as Linux).
    pub nr_pages: usize,
    /// `nr_pcpu_objects` (the kmalloc stand-in of `pcpu_alloc_test`).
    pub nr_pcpu: usize,
    /// The generator of the random cases.
    pub rng: Rng,
    /// What the counters must read after the repeat.
    pub model: Model,
    /// Pages whose translation was verified.
    pub verified_pages: u64,
    /// Verification failures.
    pub bad: u64,
    /// `align_shift_alloc_test`: the first alignment shift that failed.
    pub align_fail: Option<u32>,
    /// `vrealloc_test`: resizes done in place.
    pub realloc_in_place: u64,
    /// `vrealloc_test`: resizes that moved the area.
    pub realloc_moved: u64,
    linear: Option<LinearMap>,
}

/// The `index`-th u64 from `va` (pointer arrays and checks).
#[inline(always)]
fn word(va: VirtAddr, index: usize) -> *mut u64 {
    va.as_mut_ptr::<u64>().wrapping_add(index)
}

/// Writes one byte, like the `*((__u8 *)ptr) = v` of Linux's cases.
#[inline(always)]
fn write_byte(va: VirtAddr, v: u8) {
    // SAFETY: `va` is the start of a live area with at least one mapped page that the bench
    // allocated and owns.
    unsafe { va.as_mut_ptr::<u8>().write_volatile(v) };
}

#[inline(always)]
fn read_byte(va: VirtAddr) -> u8 {
    // SAFETY: as in `write_byte`.
    unsafe { va.as_ptr::<u8>().read_volatile() }
}

/// A vmalloc'd array of addresses (Linux's `void **ptr = vmalloc(sizeof(void *) * n)`).
pub(super) struct PtrArray {
    base: VirtAddr,
    len: usize,
}

impl PtrArray {
    fn bytes(len: usize) -> usize {
        len * core::mem::size_of::<u64>()
    }

    #[inline(always)]
    pub(super) fn set(&self, i: usize, va: Option<VirtAddr>) {
        assert!(i < self.len);
        // SAFETY: `base` is a live area of at least `len` u64 the bench owns, and `i < len`.
        unsafe { word(self.base, i).write(va.map_or(0, VirtAddr::as_u64)) };
    }

    #[inline(always)]
    pub(super) fn get(&self, i: usize) -> Option<VirtAddr> {
        assert!(i < self.len);
        // SAFETY: as in `set`.
        let raw = unsafe { word(self.base, i).read() };
        (raw != 0).then_some(VirtAddr::new(raw))
    }
}

impl Ctx {
    /// A context for one repeat of a case.
    pub fn new(loops: u32, nr_pages: usize, nr_pcpu: usize, rng: Rng) -> Self {
        Self {
            loops,
            nr_pages,
            nr_pcpu,
            rng,
            model: Model::new(),
            verified_pages: 0,
            bad: 0,
            align_fail: None,
            realloc_in_place: 0,
            realloc_moved: 0,
            linear: hal::kmap::linear_map(),
        }
    }

    fn model_alloc_error(&mut self, e: VmallocError) {
        if e == VmallocError::NoVirtualSpace {
            self.model.no_space();
        } else {
            self.model.failures += 1;
        }
    }

    /// `vmalloc(size)`.
    #[inline(always)]
    #[track_caller]
    pub fn vmalloc(&mut self, size: usize) -> Option<Area> {
        let r = kernel::vmalloc(size);
        self.allocated(size, r)
    }

    /// `__vmalloc_node(size, align, GFP_KERNEL | __GFP_ZERO)`.
    #[inline(always)]
    #[track_caller]
    pub fn vzalloc_aligned(&mut self, size: usize, align: usize) -> Option<Area> {
        let r = kernel::vmalloc_with(size, align, VmFlags::ZERO);
        self.allocated(size, r)
    }

    /// Books the outcome of a vmalloc of `size` bytes (one guard page) in the model.
    #[inline(always)]
    fn allocated(&mut self, size: usize, r: Result<VirtAddr, VmallocError>) -> Option<Area> {
        match r {
            Ok(va) => {
                let pages = size.div_ceil(PAGE_SIZE);
                self.model.mapped(pages, pages);
                Some(Area { va, pages, range: pages + 1 })
            }
            Err(e) => {
                self.model_alloc_error(e);
                None
            }
        }
    }

    /// `vfree(area)`.
    #[inline(always)]
    #[track_caller]
    pub fn vfree(&mut self, a: Area) -> Outcome {
        match kernel::vfree(a.va) {
            Ok(()) => {
                self.model.freed(a.range, a.pages, a.pages);
                Ok(())
            }
            Err(_) => {
                self.model.failures += 1;
                Err(())
            }
        }
    }

    /// `vrealloc(area, new_size)`, following where the area went (in place or moved).
    #[track_caller]
    pub fn vrealloc(&mut self, a: &mut Area, new_size: usize) -> Outcome {
        let nv = match kernel::vrealloc(a.va, new_size) {
            Ok(v) => v,
            Err(_) => {
                self.model.failures += 1;
                return Err(());
            }
        };
        let new_pages = new_size.div_ceil(PAGE_SIZE);
        let reserved = a.range - 1;
        if nv == a.va {
            self.realloc_in_place += 1;
            if new_pages > reserved {
                // Grown into the hole after the range.
                a.range += new_pages - reserved;
            }
            if new_pages > a.pages {
                self.model.mapped(new_pages - a.pages, new_pages - a.pages);
            } else if new_pages < a.pages {
                self.model.frames_returned += (a.pages - new_pages) as u64;
                self.model.flush_now(a.pages - new_pages);
            }
        } else {
            self.realloc_moved += 1;
            self.model.mapped(new_pages, new_pages);
            self.model.freed(a.range, a.pages, a.pages);
            a.range = new_pages + 1;
        }
        a.va = nv;
        a.pages = new_pages;
        Ok(())
    }

    /// Purge now (accounted in the model).
    pub fn purge(&mut self) {
        self.model.purge();
        super::check::settle();
    }

    /// [`Self::purge`], keeping the empty page tables the parked ranges met, as an
    /// automatic purge would (between repeats; see `run_case`).
    pub fn purge_keeping_tables(&mut self) {
        self.model.purge();
        memory::snapshot::settle_keeping_tables();
    }

    /// Checks every page of `a`: mapped to a RAM frame (the expected one when given), all
    /// frames distinct, zero-filled when `zeroed` (past the first byte the case wrote), a
    /// word written through the area reads back through the linear map, and the guard page
    /// (when `guard`) unmapped.
    pub fn verify(&mut self, a: &Area, guard: bool, zeroed: bool, expect: Option<&[PhysAddr]>) {
        const DISTINCT_MAX: usize = 128;
        let mut seen = [PhysAddr::new(0); DISTINCT_MAX];
        let mut bad = 0u64;
        for i in 0..a.pages {
            let va = a.va.add(i as u64 * PAGE);
            let Some(pa) = kernel::vmalloc_to_phys(va) else {
                hal::println!("  verify: page {i} of {:#x} ({} pages) not mapped", a.va, a.pages);
                bad += 1;
                continue;
            };
            if expect.and_then(|e| e.get(i)).is_some_and(|&e| e != pa) {
                hal::println!("  verify: page {i} of {:#x} maps {pa:#x}, not the frame given", a.va);
                bad += 1;
            }
            if a.pages <= DISTINCT_MAX {
                if seen[..i].contains(&pa) {
                    hal::println!("  verify: page {i} of {:#x} maps {pa:#x} twice", a.va);
                    bad += 1;
                }
                seen[i] = pa;
            }
            let Some(lin) = self.linear.filter(|l| l.covers(pa)) else {
                hal::println!("  verify: page {i} of {:#x} maps {pa:#x}, outside RAM", a.va);
                bad += 1;
                continue;
            };
            let mine = word(va, 1);
            let theirs = lin.ptr::<u64>(pa).wrapping_add(1);
            // SAFETY: `va` is a mapped page of a live area the bench owns, and `theirs` the
            // same frame through the identity map of RAM; the words at offsets 8 and 4088
            // are inside the page, and no other code uses the area meanwhile.
            unsafe {
                if zeroed && (mine.read_volatile() != 0 || word(va, 511).read_volatile() != 0) {
                    hal::println!("  verify: page {i} of {:#x} is not zeroed", a.va);
                    bad += 1;
                }
                let marker = va.as_u64() ^ 0x5a5a_5a5a_5a5a_5a5a;
                mine.write_volatile(marker);
                if theirs.read_volatile() != marker {
                    hal::println!("  verify: page {i} of {:#x}: write not seen at {pa:#x}", a.va);
                    bad += 1;
                }
                mine.write_volatile(0);
            }
        }
        if guard && kernel::vmalloc_to_phys(a.va.add(a.pages as u64 * PAGE)).is_some() {
            hal::println!("  verify: guard page of {:#x} ({} pages) is mapped", a.va, a.pages);
            bad += 1;
        }
        self.verified_pages += a.pages as u64;
        self.bad += bad;
    }

    /// A vmalloc'd pointer array of `len` entries (Linux's setup of two cases).
    #[track_caller]
    pub(super) fn ptr_array(&mut self, len: usize) -> Option<(Area, PtrArray)> {
        let a = self.vmalloc(PtrArray::bytes(len))?;
        Some((a, PtrArray { base: a.va, len }))
    }
}

#[inline(always)]
fn sampled(i: u32) -> bool {
    i.is_multiple_of(SAMPLE_EVERY)
}

/// What the plain cases do with an area: write `byte` at its start (as Linux's
/// `*((__u8 *)ptr) = 0`), verify it on sampled iterations, vfree it.
#[inline(always)]
fn write_verify_free(c: &mut Ctx, a: Area, i: u32, byte: u8) -> Outcome {
    write_byte(a.va, byte);
    if sampled(i) {
        c.verify(&a, true, false, None);
    }
    c.vfree(a)
}

/// `fix_size_alloc_test`: vmalloc `nr_pages` pages, write a byte, vfree.
pub fn fix_size_alloc_test(c: &mut Ctx) -> Outcome {
    let size = c.nr_pages * PAGE_SIZE;
    for i in 0..c.loops {
        let a = c.vmalloc(size).ok_or(())?;
        write_verify_free(c, a, i, 0)?;
    }
    Ok(())
}

/// `full_fit_alloc_test`: `fls(cpus) * 32 MiB / PAGE_SIZE` live 1-page areas interleaved
/// with as many freed ones; loop a 1-page vmalloc into the holes.
pub fn full_fit_alloc_test(c: &mut Ctx) -> Outcome {
    let junk_length = (u32::BITS - ONLINE_CPUS.leading_zeros()) as usize * (32 * 1024 * 1024 / PAGE_SIZE);
    let (pa, ptr) = c.ptr_array(junk_length).ok_or(())?;
    let Some((ja, junk)) = c.ptr_array(junk_length) else {
        c.vfree(pa)?;
        return Err(());
    };
    // Like Linux, an allocation failure in the setup leaves a NULL that vfree ignores.
    for i in 0..junk_length {
        let keep = c.vmalloc(PAGE_SIZE);
        let gone = c.vmalloc(PAGE_SIZE);
        ptr.set(i, keep.map(|a| a.va));
        junk.set(i, gone.map(|a| a.va));
    }
    let one = |va: VirtAddr| Area { va, pages: 1, range: 2 };
    for i in 0..junk_length {
        if let Some(va) = junk.get(i) {
            c.vfree(one(va))?;
        }
    }
    let mut rv = Ok(());
    for i in 0..c.loops {
        let Some(a) = c.vmalloc(PAGE_SIZE) else {
            rv = Err(());
            break;
        };
        write_byte(a.va, 1);
        if sampled(i) {
            c.verify(&a, true, false, None);
        }
        if c.vfree(a).is_err() {
            rv = Err(());
            break;
        }
    }
    for i in 0..junk_length {
        if let Some(va) = ptr.get(i) {
            c.vfree(one(va))?;
        }
    }
    c.vfree(pa)?;
    c.vfree(ja)?;
    rv
}

/// `long_busy_list_alloc_test`: 15,000 live 1-page areas; loop vmalloc 100 pages and 1
/// page, write both, free both.
pub fn long_busy_list_alloc_test(c: &mut Ctx) -> Outcome {
    const BUSY: usize = 15_000;
    let (pa, ptr) = c.ptr_array(BUSY).ok_or(())?;
    for i in 0..BUSY {
        let a = c.vmalloc(PAGE_SIZE);
        ptr.set(i, a.map(|a| a.va));
    }
    let mut rv = Ok(());
    for i in 0..c.loops {
        let Some(a1) = c.vmalloc(100 * PAGE_SIZE) else {
            rv = Err(());
            break;
        };
        let Some(a2) = c.vmalloc(PAGE_SIZE) else {
            c.vfree(a1)?;
            rv = Err(());
            break;
        };
        write_byte(a1.va, 0);
        write_byte(a2.va, 1);
        if sampled(i) {
            c.verify(&a1, true, false, None);
            c.verify(&a2, true, false, None);
        }
        c.vfree(a1)?;
        c.vfree(a2)?;
    }
    for i in 0..BUSY {
        if let Some(va) = ptr.get(i) {
            c.vfree(Area { va, pages: 1, range: 2 })?;
        }
    }
    c.vfree(pa)?;
    rv
}

/// `random_size_alloc_test`: vmalloc 1..=100 pages (uniform), write a byte, vfree.
pub fn random_size_alloc_test(c: &mut Ctx) -> Outcome {
    for i in 0..c.loops {
        let n = c.rng.inclusive(1, 100) as usize;
        let a = c.vmalloc(n * PAGE_SIZE).ok_or(())?;
        write_verify_free(c, a, i, 1)?;
    }
    Ok(())
}

/// `fix_align_alloc_test`: 5 pages, 64 KiB aligned, zeroed, vfree.
pub fn fix_align_alloc_test(c: &mut Ctx) -> Outcome {
    for i in 0..c.loops {
        let a = c.vzalloc_aligned(5 * PAGE_SIZE, FIX_ALIGN).ok_or(())?;
        if sampled(i) {
            if !a.va.as_u64().is_multiple_of(FIX_ALIGN as u64) {
                hal::println!("  verify: {:#x} not aligned to {FIX_ALIGN:#x}", a.va);
                c.bad += 1;
            }
            c.verify(&a, true, true, None);
        }
        c.vfree(a)?;
    }
    Ok(())
}

/// `random_size_align_alloc_test`: one random byte r: `r % 10 + 1` pages aligned to
/// `1 << (r % 23)` bytes, zeroed, vfree.
pub fn random_size_align_alloc_test(c: &mut Ctx) -> Outcome {
    for i in 0..c.loops {
        let rnd = c.rng.u8();
        let align = 1usize << (rnd % 23);
        let size = (usize::from(rnd % 10) + 1) * PAGE_SIZE;
        let a = c.vzalloc_aligned(size, align).ok_or(())?;
        if sampled(i) {
            if !a.va.as_u64().is_multiple_of(align as u64) {
                hal::println!("  verify: {:#x} not aligned to {align:#x}", a.va);
                c.bad += 1;
            }
            c.verify(&a, true, true, None);
        }
        c.vfree(a)?;
    }
    Ok(())
}

/// Whether no place aligned to `align` for `size` bytes in the vmalloc window is clear of
/// the `busy` ranges (`(start, end)`): then vmalloc's lowest fit finds no hole.
fn no_fit(busy: &[(u64, u64)], align: u64, size: u64) -> bool {
    let (start, end) = (hal::kmap::VMALLOC_START, hal::kmap::VMALLOC_END);
    let Some(mut x) = start.checked_next_multiple_of(align) else { return true };
    // From the lowest candidate, each blocked one moves past the range that blocks it to
    // the next aligned address: no range blocks twice, so this ends within `busy.len() + 1`
    // steps (a walk by `align` alone took 65,536 steps for small alignments, the bulk of
    // this case's time).
    for _ in 0..=busy.len() {
        if x.checked_add(size).is_none_or(|e| e > end) {
            return true;
        }
        match busy.iter().find(|&&(s, e)| s < x + size && x < e) {
            None => return false,
            Some(&(_, e)) => match e.checked_next_multiple_of(align) {
                Some(next) => x = next,
                None => return true,
            },
        }
    }
    true
}

/// `align_shift_alloc_test`: one page aligned to `1 << i` for i in 0..64, stopping at the
/// first failure (expected). The model needs the geometry here: when every place with the
/// alignment is taken by a live area (the boot's ioremaps) or a range this case parked,
/// vmalloc purges before it succeeds or fails.
pub fn align_shift_alloc_test(c: &mut Ctx) -> Outcome {
    const MAX_LIVE: usize = 64;
    let mut busy = [(0u64, 0u64); MAX_LIVE + u64::BITS as usize];
    let mut live = 0;
    if let Some(v) = kernel::vmalloc_instance() {
        v.lock().for_each_area(|a| {
            if let Some(slot) = busy.get_mut(live).filter(|_| live < MAX_LIVE) {
                *slot = (a.start.as_u64(), a.end.as_u64());
                live += 1;
            }
        });
    }
    let mut np = 0;
    for i in 0..u64::BITS {
        let align = 1usize << i;
        let size = 2 * PAGE;
        if np > 0 && no_fit(&busy[..live + np], align.max(PAGE_SIZE) as u64, size) {
            c.model.purge();
            np = 0;
        }
        let Some(a) = c.vzalloc_aligned(PAGE_SIZE, align) else {
            c.align_fail = Some(i);
            return Err(());
        };
        if !a.va.as_u64().is_multiple_of(align as u64) {
            hal::println!("  verify: {:#x} not aligned to 2^{i}", a.va);
            c.bad += 1;
        }
        c.verify(&a, true, true, None);
        c.vfree(a)?;
        busy[live + np] = (a.va.as_u64(), a.va.as_u64() + size);
        np += 1;
    }
    Ok(())
}

/// `pcpu_alloc_test` with kmalloc standing in for the per-cpu allocator:
/// `nr_pcpu_objects` objects of 1..=PAGE_SIZE/4 bytes aligned to 2^(1..=11), then freed.
pub fn pcpu_alloc_test(c: &mut Ctx) -> Outcome {
    let (pa, pcpu) = c.ptr_array(c.nr_pcpu).ok_or(())?;
    let mut rv = Ok(());
    for i in 0..c.nr_pcpu {
        let size = c.rng.inclusive(1, PAGE_SIZE as u32 / 4) as usize;
        let align = 1usize << c.rng.inclusive(1, 11);
        match memory::slab::kmalloc(size, align) {
            Ok(p) if (p.as_ptr() as usize).is_multiple_of(align) => pcpu.set(i, Some(VirtAddr::from_ptr(p.as_ptr()))),
            Ok(p) => {
                hal::println!("  verify: kmalloc({size}, {align}) = {:p} misaligned", p.as_ptr());
                c.bad += 1;
                pcpu.set(i, Some(VirtAddr::from_ptr(p.as_ptr())));
            }
            Err(_) => {
                pcpu.set(i, None);
                rv = Err(());
            }
        }
    }
    for i in 0..c.nr_pcpu {
        if let Some(p) = pcpu.get(i).and_then(|va| core::ptr::NonNull::new(va.as_mut_ptr::<u8>())) {
            // SAFETY: `p` came from kmalloc above and is freed once.
            if unsafe { memory::slab::kfree(p) }.is_err() {
                rv = Err(());
            }
        }
    }
    c.vfree(pa)?;
    rv
}

/// `vm_map_ram_test`: `nr_pages` frames bulk-allocated once; loop `vm_map_ram` them, write
/// a byte, `vm_unmap_ram`. Up to 64 pages come from this CPU's block (no vmalloc lock, no
/// vmalloc counter moves); larger ones are vmap areas without a guard page, as in Linux.
pub fn vm_map_ram_test(c: &mut Ctx) -> Outcome {
    let n = c.nr_pages;
    let mut pages: Vec<PhysAddr> = alloc::vec![PhysAddr::new(0); n];
    let got = memory::buddy::alloc_pages_bulk(&mut pages);
    let mut rv = if got == n { Ok(()) } else { Err(()) };
    let region = kernel::vm_map_ram_region();
    if rv.is_ok() {
        for i in 0..c.loops {
            // SAFETY: the frames were just allocated to this benchmark and outlive the mapping.
            let va = match unsafe { kernel::vm_map_ram(&pages) } {
                Ok(va) => va,
                Err(e) => {
                    c.model_alloc_error(e);
                    rv = Err(());
                    break;
                }
            };
            let in_block = region.is_some_and(|r| r.contains(va));
            c.model.mapped(n, 0);
            let a = Area { va, pages: n, range: n };
            write_byte(va, b'a');
            if sampled(i) {
                c.verify(&a, false, false, Some(&pages));
            }
            if kernel::vm_unmap_ram(va, n).is_err() {
                c.model.failures += 1;
                rv = Err(());
                break;
            }
            if !in_block {
                // Through the vmalloc tree: parked there as any vunmap.
                c.model.freed(n, n, 0);
            }
        }
    }
    // SAFETY: the frames came from alloc_pages_bulk above and are no longer mapped (each
    // vm_unmap_ram cleared its PTEs; the purge after the case flushes them before reuse).
    if got > 0 && unsafe { memory::buddy::free_pages_bulk(&pages[..got]) }.is_err() {
        rv = Err(());
    }
    rv
}

/// `no_block_alloc_test`: `nr_pages` pages with GFP_ATOMIC or GFP_NOWAIT (a random bit),
/// preemption off. Our vmalloc never sleeps (spin locks, records taken before the lock),
/// so both are the plain call; Linux marks the case xfail (it may legitimately fail).
pub fn no_block_alloc_test(c: &mut Ctx) -> Outcome {
    let size = c.nr_pages * PAGE_SIZE;
    for i in 0..c.loops {
        let _atomic = c.rng.u8() % 2 == 1;
        let a = c.vmalloc(size).ok_or(())?;
        write_verify_free(c, a, i, 0)?;
    }
    Ok(())
}

/// `vrealloc_test` (Linux 6.15+): vmalloc a page, write 'a'; grow to 4 pages, shrink to 1,
/// to half a page, grow back to a page, checking the byte after each step; vfree.
pub fn vrealloc_test(c: &mut Ctx) -> Outcome {
    for i in 0..c.loops {
        let mut a = c.vmalloc(PAGE_SIZE).ok_or(())?;
        write_byte(a.va, b'a');
        let mut err = Ok(());
        for size in [4 * PAGE_SIZE, PAGE_SIZE, PAGE_SIZE / 2, PAGE_SIZE] {
            if c.vrealloc(&mut a, size).is_err() || read_byte(a.va) != b'a' {
                err = Err(());
                break;
            }
            if sampled(i) {
                c.verify(&a, true, false, None);
            }
        }
        c.vfree(a)?;
        err?;
    }
    Ok(())
}
