//! `test_vmalloc.profile=1`: where the time of one vmalloc + write + vfree goes, measured by
//! timing each layer on its own at steady state (the counter is read around a loop of the
//! layer's calls, never inside the allocator).

use core::sync::atomic::{AtomicU8, Ordering::Relaxed};
use hal::mmu::{Attributes, HardwareTlb, Tlb};
use hal::println;
use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::buddy::GlobalTableAlloc;
use memory::kernel;
use memory::vmalloc::{DeviceAttr, MapError, Prot, VmBackend, VmFlags, Vmalloc, VmallocConfig};

const LOOPS: u32 = 20_000;

fn time(loops: u32, mut f: impl FnMut()) -> u64 {
    let t0 = hal::cpu::counter();
    for _ in 0..loops {
        f();
    }
    hal::cpu::ticks_to_ns(hal::cpu::counter() - t0) / u64::from(loops)
}

fn row(what: &str, ns: u64) {
    println!("  {what:<58} {ns:>8} ns");
}

/// Map `frames` at `va` and unmap them again (PTE writes and table walks only), with the
/// per-page TLB invalidation vmalloc's purge would issue for them.
fn map_unmap(va: VirtAddr, frames: &[PhysAddr]) {
    let Some(space) = hal::kmap::kernel_space() else { return };
    let mut s = space.lock();
    // SAFETY: the profile maps fresh pages of a scratch-window slot no instance uses.
    if unsafe { s.upper_mut() }.map_frames(va, frames, Attributes::DATA, &mut GlobalTableAlloc).is_err() {
        println!("  profile: map_frames failed");
        return;
    }
    let Ok(range) = VirtRange::new(va, (frames.len() * PAGE_SIZE) as u64) else { return };
    // SAFETY: the scratch-window pages were mapped just above by us and nothing uses them.
    let _ = unsafe { s.upper_mut().unmap_with(range, |_, _, _| {}) };
    drop(s);
    HardwareTlb.invalidate_pages(&mut core::iter::once(range));
}

/// A backend that does nothing (fake frames, no tables, no TLB): what is left of a call is
/// vmalloc's own bookkeeping (trees, records, counters, history).
struct NullBackend {
    next: u64,
}

impl VmBackend for NullBackend {
    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize {
        for f in out.iter_mut() {
            self.next = self.next.wrapping_add(PAGE_SIZE as u64) & 0xffff_ffff_f000;
            *f = PhysAddr::new(self.next);
        }
        out.len()
    }
    fn free_frames(&mut self, _frames: &[PhysAddr]) {}
    fn zero_frames(&mut self, _frames: &[PhysAddr]) {}
    fn map_pages(&mut self, _va: VirtAddr, _frames: &[PhysAddr], _prot: Prot) -> Result<(), MapError> {
        Ok(())
    }
    fn map_device(&mut self, _va: VirtAddr, _pa: PhysAddr, _n: usize, _attr: DeviceAttr) -> Result<(), MapError> {
        Ok(())
    }
    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, _va: VirtAddr, pages: usize, mut on_frame: F) {
        for i in 0..pages {
            on_frame(PhysAddr::new((i * PAGE_SIZE) as u64));
        }
    }
    fn tlb_flush_pages(&mut self, _ranges: &[(VirtAddr, usize)]) {}
    fn tlb_flush_all(&mut self) {}
    fn translate(&self, _va: VirtAddr) -> Option<PhysAddr> {
        None
    }
    fn phys_is_ram(&self, _pa: PhysAddr, _pages: usize) -> bool {
        false
    }
    fn copy_mapped(&mut self, _dst: VirtAddr, _src: VirtAddr, _bytes: usize) {}
    fn zero_mapped(&mut self, _va: VirtAddr, _bytes: usize) {}
}

/// Zeroes one page with `DC ZVA` ([`hal::cpu::zero_page_zva`], Linux's `clear_page`).
///
/// # Safety
/// `p` is a whole, page-aligned page of RAM the caller owns.
unsafe fn zero_page_zva(p: *mut u8) {
    // SAFETY: forwarded from the caller.
    unsafe { hal::cpu::zero_page_zva(p) }
}

/// Zeroes one page with pairs of 8-byte stores of the zero register: the kernel's own
/// [`kernel::zero_page`], which vmalloc's `vzalloc` uses.
///
/// # Safety
/// `p` is a whole, page-aligned page of RAM the caller owns.
unsafe fn zero_page_stp(p: *mut u8) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::zero_page(p) }
}

/// Lays out `holes` live one-page areas each followed by a one-page-area hole (full_fit's
/// layout) in `vm`; returns the live areas (to free afterwards).
fn holes_layout<B: VmBackend>(vm: &mut Vmalloc<B>, holes: usize) -> alloc::vec::Vec<VirtAddr> {
    let mut live = alloc::vec::Vec::with_capacity(holes);
    let mut junk = alloc::vec::Vec::with_capacity(holes);
    for _ in 0..holes {
        live.extend(vm.vmalloc(PAGE_SIZE).ok());
        junk.extend(vm.vmalloc(PAGE_SIZE).ok());
    }
    for v in junk {
        let _ = vm.vfree(v);
    }
    vm.purge();
    live
}

fn bookkeeping(n: usize, holes: usize) {
    let Ok(range) = VirtRange::new(VirtAddr::new(hal::kmap::SCRATCH_START), 1 << 40) else { return };
    let Ok(mut vm) = Vmalloc::new(NullBackend { next: 0 }, range, VmallocConfig::default()) else { return };
    let live = holes_layout(&mut vm, holes);
    row(
        "vmalloc + vfree, bookkeeping only (null backend, no lock)",
        time(LOOPS, || {
            if let Ok(v) = vm.vmalloc(n * PAGE_SIZE) {
                let _ = vm.vfree(v);
            }
        }),
    );
    row("vmalloc only, bookkeeping (then vfree untimed)", {
        let mut ns = 0;
        for _ in 0..LOOPS / 8 {
            let t0 = hal::cpu::counter();
            let v = vm.vmalloc(n * PAGE_SIZE);
            ns += hal::cpu::counter() - t0;
            if let Ok(v) = v {
                let _ = vm.vfree(v);
            }
        }
        hal::cpu::ticks_to_ns(ns) / u64::from(LOOPS / 8)
    });
    for v in live {
        let _ = vm.vfree(v);
    }
}

/// The kernel backend with the time of each call counted (counter read around each call;
/// the cost of a counter pair is measured and subtracted).
struct Timed {
    inner: kernel::KernelBackend,
    ticks: [u64; 5],
    calls: [u64; 5],
}

const T_ALLOC: usize = 0;
const T_FREE: usize = 1;
const T_MAP: usize = 2;
const T_UNMAP: usize = 3;
const T_TLB: usize = 4;
const T_NAMES: [&str; 5] = [
    "alloc_frames (buddy bulk)",
    "free_frames (buddy bulk)",
    "map_pages (kernel tables)",
    "unmap_pages (kernel tables)",
    "tlb_flush_* (purges)",
];

impl Timed {
    #[inline(always)]
    fn timed<R>(&mut self, k: usize, f: impl FnOnce(&mut kernel::KernelBackend) -> R) -> R {
        let t0 = hal::cpu::counter();
        let r = f(&mut self.inner);
        self.ticks[k] += hal::cpu::counter() - t0;
        self.calls[k] += 1;
        r
    }
}

impl VmBackend for Timed {
    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize {
        self.timed(T_ALLOC, |b| b.alloc_frames(out))
    }
    fn free_frames(&mut self, frames: &[PhysAddr]) {
        self.timed(T_FREE, |b| b.free_frames(frames))
    }
    fn zero_frames(&mut self, frames: &[PhysAddr]) {
        self.inner.zero_frames(frames)
    }
    fn map_pages(&mut self, va: VirtAddr, frames: &[PhysAddr], prot: Prot) -> Result<(), MapError> {
        self.timed(T_MAP, |b| b.map_pages(va, frames, prot))
    }
    fn map_device(&mut self, va: VirtAddr, pa: PhysAddr, n: usize, attr: DeviceAttr) -> Result<(), MapError> {
        self.inner.map_device(va, pa, n, attr)
    }
    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, on_frame: F) {
        self.timed(T_UNMAP, |b| b.unmap_pages(va, pages, on_frame))
    }
    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]) {
        self.timed(T_TLB, |b| b.tlb_flush_pages(ranges))
    }
    fn tlb_flush_all(&mut self) {
        self.timed(T_TLB, |b| b.tlb_flush_all())
    }
    fn translate(&self, va: VirtAddr) -> Option<PhysAddr> {
        self.inner.translate(va)
    }
    fn phys_is_ram(&self, pa: PhysAddr, pages: usize) -> bool {
        self.inner.phys_is_ram(pa, pages)
    }
    fn copy_mapped(&mut self, dst: VirtAddr, src: VirtAddr, bytes: usize) {
        self.inner.copy_mapped(dst, src, bytes)
    }
    fn zero_mapped(&mut self, va: VirtAddr, bytes: usize) {
        self.inner.zero_mapped(va, bytes)
    }
}

/// vmalloc + write + vfree on a private instance (scratch window, no lock) whose backend
/// calls are timed: the split between vmalloc's bookkeeping and each backend call.
fn split(info: &hal::boot::BootInfo, n: usize, holes: usize) {
    // SAFETY: the profile's instance alone uses this 1 TiB slot of the scratch window (4 GiB
    // up, clear of the tests' slots), and purges before it is dropped.
    let Ok(inner) = (unsafe { kernel::KernelBackend::new(info) }) else { return };
    let Ok(range) = VirtRange::new(VirtAddr::new(hal::kmap::SCRATCH_START + (4 << 30)), 1 << 40) else { return };
    let b = Timed { inner, ticks: [0; 5], calls: [0; 5] };
    let Ok(mut vm) = Vmalloc::new(b, range, VmallocConfig::default()) else { return };
    let pair = {
        let t0 = hal::cpu::counter();
        for _ in 0..LOOPS {
            let _ = hal::cpu::counter();
        }
        (hal::cpu::counter() - t0) / u64::from(LOOPS)
    };
    let live = holes_layout(&mut vm, holes);
    // Warm the tables of the range once.
    for _ in 0..2 * LOOPS {
        if let Ok(v) = vm.vmalloc(n * PAGE_SIZE) {
            let _ = vm.vfree(v);
        }
    }
    // SAFETY: only the timing counters of the wrapper are reset; no backend call is made.
    let b = unsafe { vm.backend_mut() };
    b.ticks = [0; 5];
    b.calls = [0; 5];
    let t0 = hal::cpu::counter();
    for _ in 0..LOOPS {
        if let Ok(v) = vm.vmalloc(n * PAGE_SIZE) {
            // SAFETY: a live area of ours with a mapped first page.
            unsafe { v.as_mut_ptr::<u8>().write_volatile(0) };
            let _ = vm.vfree(v);
        }
    }
    let total = hal::cpu::counter() - t0;
    for v in live {
        let _ = vm.vfree(v);
    }
    vm.purge();
    let b = vm.backend();
    let mut backend = 0;
    println!(
        "  private instance, timed backend (counter pair {} ns subtracted per call):",
        hal::cpu::ticks_to_ns(pair)
    );
    for (k, name) in T_NAMES.iter().enumerate() {
        let t = b.ticks[k].saturating_sub(b.calls[k] * pair);
        backend += t;
        println!(
            "    {:<40} {:>6} calls/loop x {:>6} ns = {:>8} ns/loop",
            name,
            b.calls[k] as f64 / f64::from(LOOPS),
            hal::cpu::ticks_to_ns(t) / b.calls[k].max(1),
            hal::cpu::ticks_to_ns(t) / u64::from(LOOPS)
        );
    }
    let calls: u64 = b.calls.iter().sum();
    let rest = total.saturating_sub(backend + calls * pair);
    println!(
        "    {:<40} {:>37} ns/loop",
        "vmalloc bookkeeping + write (rest)",
        hal::cpu::ticks_to_ns(rest) / u64::from(LOOPS)
    );
    println!("    {:<40} {:>37} ns/loop", "total", hal::cpu::ticks_to_ns(total - calls * pair) / u64::from(LOOPS));
}

/// Prints the breakdown for 1 and 100 pages.
pub fn run(info: &hal::boot::BootInfo) {
    println!("\ntest_vmalloc profile: ns per call at steady state ({LOOPS} calls each)");
    let va = VirtAddr::new(hal::kmap::SCRATCH_START + (1 << 30));
    let mut frames = [PhysAddr::new(0); 100];
    for n in [1usize, 100] {
        let f = &mut frames[..n];
        println!(" {n} page(s):");
        row(
            "buddy alloc_pages_bulk + free_pages_bulk",
            time(LOOPS, || {
                let got = memory::buddy::alloc_pages_bulk(f);
                // SAFETY: the frames were just allocated and are not used.
                let _ = unsafe { memory::buddy::free_pages_bulk(&f[..got]) };
            }),
        );
        if memory::buddy::alloc_pages_bulk(f) != n {
            println!("  profile: out of frames");
            return;
        }
        row("hal map_frames + unmap_with + TLBI per page (scratch VA)", time(LOOPS, || map_unmap(va, f)));
        row(
            "vmap + vunmap, no guard (vmalloc bookkeeping + PTEs)",
            time(LOOPS, || {
                // SAFETY: the frames were just allocated to this benchmark and outlive the mapping.
                if let Ok(v) = unsafe { kernel::vmap(f, Prot::ReadWrite, VmFlags::NO_GUARD) } {
                    let _ = kernel::vunmap(v);
                }
            }),
        );
        row(
            "vm_map_ram + vm_unmap_ram (per-CPU block)",
            time(LOOPS, || {
                // SAFETY: as for vmap above.
                if let Ok(v) = unsafe { kernel::vm_map_ram(f) } {
                    let _ = kernel::vm_unmap_ram(v, n);
                }
            }),
        );
        row(
            "vm_map_ram + write 1 byte + vm_unmap_ram",
            time(LOOPS, || {
                // SAFETY: as for vmap above.
                if let Ok(v) = unsafe { kernel::vm_map_ram(f) } {
                    // SAFETY: `n` pages were just mapped at `v`, frames of this profile.
                    unsafe { v.as_mut_ptr::<u8>().write_volatile(1) };
                    let _ = kernel::vm_unmap_ram(v, n);
                }
            }),
        );
        kernel::purge();
        // SAFETY: the frames came from alloc_pages_bulk above; every mapping of them is gone
        // (map_unmap flushed its own, and the purge just above flushed vmap's).
        let _ = unsafe { memory::buddy::free_pages_bulk(f) };
        row(
            "vmalloc + vfree (no write)",
            time(LOOPS, || {
                if let Ok(v) = kernel::vmalloc(n * PAGE_SIZE) {
                    let _ = kernel::vfree(v);
                }
            }),
        );
        bookkeeping(n, 0);
        split(info, n, 0);
        row(
            "vmalloc + write 1 byte + vfree",
            time(LOOPS, || {
                if let Ok(v) = kernel::vmalloc(n * PAGE_SIZE) {
                    // SAFETY: a live area of ours with a mapped first page.
                    unsafe { v.as_mut_ptr::<u8>().write_volatile(0) };
                    let _ = kernel::vfree(v);
                }
            }),
        );
        kernel::purge();
    }
    println!(" 1 page into holes: 8192 live areas each followed by a hole (full_fit_alloc_test's layout):");
    bookkeeping(1, 8192);
    split(info, 1, 8192);
    let Some(space) = hal::kmap::kernel_space() else { return };
    if memory::buddy::alloc_pages_bulk(&mut frames) == frames.len() {
        let region = 512 * PAGE_SIZE as u64;
        let base = hal::kmap::SCRATCH_START + (8 << 30);
        for (what, va) in [
            ("hal map_frames + unmap_with, 100 pages inside one 2 MiB table", base),
            ("hal map_frames + unmap_with, 100 pages across a 2 MiB boundary", base + region - 50 * PAGE_SIZE as u64),
        ] {
            let va = VirtAddr::new(va);
            let Ok(r) = VirtRange::new(va, (frames.len() * PAGE_SIZE) as u64) else { break };
            row(
                what,
                time(LOOPS / 4, || {
                    let mut s = space.lock();
                    // SAFETY: fresh pages of the profile's own scratch slot.
                    let _ = unsafe { s.upper_mut() }.map_frames(va, &frames, Attributes::DATA, &mut GlobalTableAlloc);
                    // SAFETY: scratch pages mapped just above by us, never accessed.
                    let _ = unsafe { s.upper_mut().unmap_with(r, |_, _, _| {}) };
                }),
            );
        }
        HardwareTlb.invalidate_all();
        // SAFETY: allocated above; their scratch mappings are gone and flushed.
        let _ = unsafe { memory::buddy::free_pages_bulk(&frames) };
    }
    println!(" one page, layer by layer ({LOOPS} distinct pages mapped, then unmapped, then one full flush):");
    let base = hal::kmap::SCRATCH_START + (2 << 30);
    if memory::buddy::alloc_pages_bulk(&mut frames[..1]) != 1 {
        return;
    }
    let frame = [frames[0]];
    let Some(space) = hal::kmap::kernel_space() else { return };
    row("kernel_space lock + unlock", time(LOOPS, || drop(space.lock())));
    let mut i = 0u64;
    row(
        "map_frames, 1 page (lock included)",
        time(LOOPS, || {
            let va = VirtAddr::new(base + i * PAGE_SIZE as u64);
            i += 1;
            // SAFETY: fresh pages of the profile's own scratch slot.
            let _ = unsafe { space.lock().upper_mut().map_frames(va, &frame, Attributes::DATA, &mut GlobalTableAlloc) };
        }),
    );
    i = 0;
    row(
        "unmap_with, 1 page (lock included)",
        time(LOOPS, || {
            let Ok(r) = VirtRange::new(VirtAddr::new(base + i * PAGE_SIZE as u64), PAGE_SIZE as u64) else { return };
            i += 1;
            // SAFETY: scratch pages mapped above by us; nothing uses them.
            let _ = unsafe { space.lock().upper_mut().unmap_with(r, |_, _, _| {}) };
        }),
    );
    HardwareTlb.invalidate_all();
    i = 0;
    row(
        "TLBI VALE1IS, 1 page + barriers",
        time(LOOPS, || {
            let Ok(r) = VirtRange::new(VirtAddr::new(base + i * PAGE_SIZE as u64), PAGE_SIZE as u64) else { return };
            i += 1;
            HardwareTlb.invalidate_pages(&mut core::iter::once(r));
        }),
    );
    row(
        "translate (walk, lock included)",
        time(LOOPS, || {
            let _ = space.lock().upper().translate(VirtAddr::new(base));
        }),
    );
    let mut one = [PhysAddr::new(0)];
    row(
        "buddy: alloc_pages_bulk(1) + free_pages_bulk(1)",
        time(LOOPS, || {
            let got = memory::buddy::alloc_pages_bulk(&mut one);
            // SAFETY: just allocated, unused.
            let _ = unsafe { memory::buddy::free_pages_bulk(&one[..got]) };
        }),
    );
    row(
        "buddy: alloc_pages(0) + free_pages(0)",
        time(LOOPS, || {
            if let Ok(pa) = memory::buddy::alloc_pages(0) {
                // SAFETY: just allocated, unused.
                let _ = unsafe { memory::buddy::free_pages(pa, 0) };
            }
        }),
    );
    // SAFETY: allocated above; its scratch mappings are all unmapped and flushed.
    let _ = unsafe { memory::buddy::free_pages_bulk(&frame) };
    if let Ok(pa) = memory::buddy::alloc_pages(0) {
        let p = hal::kmap::linear_map().map_or(core::ptr::null_mut(), |l| l.ptr::<u8>(pa));
        // SAFETY: a page just allocated, through the identity map; ours until freed below.
        row(
            "zero a page: write_bytes",
            time(LOOPS, || {
                let q = core::hint::black_box(p);
                // SAFETY: as above.
                unsafe { core::ptr::write_bytes(q, 0, PAGE_SIZE) };
                core::hint::black_box(q);
            }),
        );
        row(
            "zero a page: STP XZR pairs, 64 B per iteration (zero_frames now)",
            // SAFETY: as above: the page is ours until freed below.
            time(LOOPS, || unsafe { zero_page_stp(core::hint::black_box(p)) }),
        );
        // SAFETY: as above: the page is ours until freed below.
        row("zero a page: DC ZVA (Linux clear_page)", time(LOOPS, || unsafe { zero_page_zva(p) }));
        // SAFETY: allocated above, not used any more.
        let _ = unsafe { memory::buddy::free_pages(pa, 0) };
    }
    println!(" other:");
    row(
        "vmalloc_stats() (vmalloc lock + stats, incl. purge percentile)",
        time(LOOPS, || {
            let _ = kernel::vmalloc_stats();
        }),
    );
    row("TLBI VMALLE1IS + barriers", time(LOOPS, || HardwareTlb.invalidate_all()));
    // What a per-frame state claim costs under emulation: 100 bytes claimed and released
    // with a compare-exchange each, against a load and a store each.
    let bytes: [AtomicU8; 100] = [const { AtomicU8::new(1) }; 100];
    let cas = |b: &AtomicU8, from, to| b.compare_exchange(from, to, Relaxed, Relaxed).is_ok();
    row(
        "100 byte claims: compare-exchange there and back",
        time(LOOPS, || {
            for b in core::hint::black_box(&bytes) {
                let _ = cas(b, 1, 2) && cas(b, 2, 1);
            }
        }),
    );
    row(
        "100 byte claims: load + store there and back",
        time(LOOPS, || {
            for b in core::hint::black_box(&bytes) {
                for (from, to) in [(1, 2), (2, 1)] {
                    if b.load(Relaxed) == from {
                        b.store(to, Relaxed);
                    }
                }
            }
        }),
    );
    let before = kernel::vmalloc_stats().unwrap_or_default();
    let n = time(LOOPS, || {
        if let Ok(v) = kernel::vmalloc(PAGE_SIZE) {
            let _ = kernel::vfree(v);
        }
    });
    let after = kernel::vmalloc_stats().unwrap_or_default();
    let purges = after.purges - before.purges;
    row("(1-page vmalloc + vfree again, for reference)", n);
    println!("  lazy purges in that loop: {purges} ({} frees per purge)", u64::from(LOOPS) / purges.max(1));
    kernel::purge();
}
