//! Host micro-bench of the vmalloc core: `cargo bench -p memory --bench vmalloc`.
//!
//! 1. Scaling: fix_size-style `vmalloc(1 page)` + `vfree` loops at 10 … 100,000 live areas on
//!    a fragmented layout (live 1-page areas interleaved with 2-page holes), lazy purge on.
//!    Run twice: with a no-op backend (the allocator's own software path: trees, records,
//!    lazy list, purge) and with the simulated MMU (adds PTE and frame bookkeeping).
//! 2. Linux `lib/test_vmalloc.c`-shaped loops on the simulated MMU, for orientation.
//!
//! Pass `--quick` (or set VMALLOC_BENCH_QUICK) for a short smoke run.

use std::hint::black_box;
use std::time::Instant;

use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{DeviceAttr, MapError, Prot, VmBackend, VmFlags, Vmalloc, VmallocConfig};

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;

/// A backend that does nothing: frames from a counter, no tables, no TLB.
struct NullBackend {
    next: u64,
}

impl VmBackend for NullBackend {
    fn alloc_frames(&mut self, out: &mut [PhysAddr]) -> usize {
        for f in out.iter_mut() {
            self.next += PAGE;
            *f = PhysAddr::new(self.next);
        }
        out.len()
    }
    fn free_frames(&mut self, frames: &[PhysAddr]) {
        black_box(frames);
    }
    fn zero_frames(&mut self, _: &[PhysAddr]) {}
    fn map_pages(&mut self, va: VirtAddr, frames: &[PhysAddr], _: Prot) -> Result<(), MapError> {
        black_box((va, frames));
        Ok(())
    }
    fn map_device(&mut self, _: VirtAddr, _: PhysAddr, _: usize, _: DeviceAttr) -> Result<(), MapError> {
        Ok(())
    }
    fn unmap_pages<F: FnMut(PhysAddr)>(&mut self, va: VirtAddr, pages: usize, mut on_frame: F) {
        for i in 0..pages as u64 {
            on_frame(PhysAddr::new(va.as_u64() + i * PAGE));
        }
    }
    fn tlb_flush_pages(&mut self, ranges: &[(VirtAddr, usize)]) {
        black_box(ranges);
    }
    fn tlb_flush_all(&mut self) {}
    fn translate(&self, _: VirtAddr) -> Option<PhysAddr> {
        None
    }
    fn phys_is_ram(&self, _: PhysAddr, _: usize) -> bool {
        false
    }
    fn copy_mapped(&mut self, _: VirtAddr, _: VirtAddr, _: usize) {}
    fn zero_mapped(&mut self, _: VirtAddr, _: usize) {}
}

fn window_pages(live: usize) -> u64 {
    // 2 pages per live area and per hole, plus room for the lazily parked ranges.
    ((4 * live as u64) + 4 * 8192 + 4096).next_power_of_two()
}

/// A fragmented layout: `live` 1-page areas each followed by a 2-page hole.
fn fragment<B: VmBackend>(vm: &mut Vmalloc<B>, live: usize) -> Vec<VirtAddr> {
    let all: Vec<_> = (0..2 * live).map(|_| vm.vmalloc(PAGE_SIZE).unwrap()).collect();
    let mut keep = Vec::with_capacity(live);
    for (i, p) in all.into_iter().enumerate() {
        if i % 2 == 0 {
            keep.push(p);
        } else {
            vm.vfree(p).unwrap();
        }
    }
    vm.purge();
    keep
}

fn fix_size_loop<B: VmBackend>(vm: &mut Vmalloc<B>, iters: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        let p = vm.vmalloc(PAGE_SIZE).unwrap();
        vm.vfree(black_box(p)).unwrap();
    }
    t.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn scaling<B: VmBackend>(name: &str, make: impl Fn(VirtRange) -> B, iters: u32) {
    println!("\nfix_size alloc(1 page)+free, fragmented layout, {name} backend:");
    println!("{:>10} {:>10} {:>12} {:>8}", "live", "ns/op", "purges/op", "holes");
    let mut first = None;
    let mut last = 0.0;
    for live in [10usize, 100, 1_000, 10_000, 100_000] {
        let w = VirtRange::new(VirtAddr::new(BASE), window_pages(live) * PAGE).unwrap();
        let mut vm = Vmalloc::new(make(w), w, VmallocConfig::default()).unwrap();
        let keep = fragment(&mut vm, live);
        fix_size_loop(&mut vm, iters / 10); // warm up
        let p0 = vm.stats().purges;
        // Best of three runs: the host is shared.
        let ns = (0..3).map(|_| fix_size_loop(&mut vm, iters)).fold(f64::INFINITY, f64::min);
        let purges = (vm.stats().purges - p0) as f64 / (3.0 * f64::from(iters));
        println!("{live:>10} {ns:>10.1} {purges:>12.5} {:>8}", vm.stats().free_holes);
        first.get_or_insert(ns);
        last = ns;
        for p in keep {
            vm.vfree(p).unwrap();
        }
        vm.purge();
        vm.check().unwrap();
    }
    let first = first.unwrap_or(1.0);
    println!("ratio 100,000 / 10 live areas: {:.2} (goal <= 1.3)", last / first);
}

fn sim(w: VirtRange) -> SimBackend {
    SimBackend::new(w, 1 << 19)
}

fn linux_cases(iters: u32) {
    println!("\ntest_vmalloc.c-shaped loops, simulated MMU ({iters} loops each):");
    let w = VirtRange::new(VirtAddr::new(BASE), (1u64 << 20) * PAGE).unwrap();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let report = |name: &str, f: &mut dyn FnMut(&mut Vmalloc<SimBackend>)| {
        let mut vm = Vmalloc::new(sim(w), w, VmallocConfig::default()).unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            f(&mut vm);
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
        let s = vm.stats();
        println!(
            "{name:<28} {ns:>9.1} ns/loop   purges {:>5}  full flushes {:>5}  page TLBIs {:>7}",
            s.purges, s.tlb_full_flushes, s.tlb_page_ops
        );
    };
    report("fix_size_alloc_test", &mut |vm| {
        let p = vm.vmalloc(PAGE_SIZE).unwrap();
        vm.vfree(p).unwrap();
    });
    report("random_size_alloc_test", &mut |vm| {
        let n = (rnd() % 100 + 1) as usize;
        let p = vm.vmalloc(n * PAGE_SIZE).unwrap();
        vm.vfree(p).unwrap();
    });
    report("fix_align_alloc_test", &mut |vm| {
        let p = vm.vmalloc_with(5 * PAGE_SIZE, 1 << 16, VmFlags::ZERO).unwrap();
        vm.vfree(p).unwrap();
    });
    report("random_size_align_alloc", &mut |vm| {
        let r = rnd() as u8;
        let size = (usize::from(r) % 10 + 1) * PAGE_SIZE;
        let align = 1usize << (r % 23);
        let p = vm.vmalloc_with(size, align, VmFlags::ZERO).unwrap();
        vm.vfree(p).unwrap();
    });
    report("vrealloc_test", &mut |vm| {
        let p = vm.vmalloc(PAGE_SIZE).unwrap();
        let p = vm.vrealloc(p, 4 * PAGE_SIZE).unwrap();
        let p = vm.vrealloc(p, PAGE_SIZE).unwrap();
        let p = vm.vrealloc(p, PAGE_SIZE / 2).unwrap();
        let p = vm.vrealloc(p, 4 * PAGE_SIZE).unwrap();
        vm.vfree(p).unwrap();
    });
    // long_busy_list: 15,000 live 1-page areas, then 100-page + 1-page pairs.
    let mut vm = Vmalloc::new(sim(w), w, VmallocConfig::default()).unwrap();
    let busy: Vec<_> = (0..15_000).map(|_| vm.vmalloc(PAGE_SIZE).unwrap()).collect();
    let t = Instant::now();
    for _ in 0..iters {
        let a = vm.vmalloc(100 * PAGE_SIZE).unwrap();
        let b = vm.vmalloc(PAGE_SIZE).unwrap();
        vm.vfree(a).unwrap();
        vm.vfree(b).unwrap();
    }
    println!("{:<28} {:>9.1} ns/loop", "long_busy_list_alloc_test", t.elapsed().as_nanos() as f64 / f64::from(iters));
    drop(busy);
    // full_fit: 8,192 live 1-page areas interleaved with 8,192 holes.
    let mut vm = Vmalloc::new(sim(w), w, VmallocConfig::default()).unwrap();
    let _keep = fragment(&mut vm, 8192);
    let t = Instant::now();
    for _ in 0..iters {
        let p = vm.vmalloc(PAGE_SIZE).unwrap();
        vm.vfree(p).unwrap();
    }
    println!("{:<28} {:>9.1} ns/loop", "full_fit_alloc_test", t.elapsed().as_nanos() as f64 / f64::from(iters));
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("VMALLOC_BENCH_QUICK").is_some();
    let iters = if quick { 20_000 } else { 1_000_000 };
    scaling("no-op", |_| NullBackend { next: 0x4000_0000 }, iters);
    scaling("simulated MMU", sim, iters);
    linux_cases(if quick { 5_000 } else { 200_000 });
}
