//! The per-CPU memory fast paths on every core: page lists and object caches under random
//! work on all CPUs at once, with frees on other CPUs and timer interrupts that allocate;
//! a CPU switched off mid-workload hands its caches back. `./x test` boots this at
//! `-smp 4` (and at `-smp 1`, where the multi-CPU tests are ignored) with a smoke size; the
//! full million operations: `PERCPU_OPS=1000000 QEMU_SMP=4 QEMU_TIMEOUT=3600 cargo test -p
//! tests --target aarch64-unknown-none --test percpu`.
#![no_std]
#![no_main]

extern crate alloc;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use hal::addr::{PhysAddr, PAGE_SIZE};
use hal::dtb::MAX_CPUS;
use hal::smp;
use hal::sync::{IrqSpinLock, LockClass};
use memory::gfp::{GFP_ATOMIC, GFP_DMA32, GFP_KERNEL};
use memory::{buddy, kernel, slab};
use tests::test;

/// Operations over all CPUs (a smoke size unless `PERCPU_OPS` says otherwise at build).
const OPS: usize = match option_env!("PERCPU_OPS") {
    Some(s) => parse(s),
    None => 40_000,
};

const fn parse(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < b.len() {
        n = n * 10 + (b[i] - b'0') as usize;
        i += 1;
    }
    n
}

/// One live allocation: an object (`order` None) or a block of pages, its fill byte.
/// What a live allocation of the random workload is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A buddy block; `size` is its order.
    Pages,
    /// A kmalloc object; `size` is its size.
    Object,
    /// A vmalloc (or vzalloc) area; `size` is its pages.
    Vmalloc,
    /// A `vm_map_ram` mapping of an order-2 block's 4 frames at `phys`; `size` is 4.
    VmapRam,
}

#[derive(Clone, Copy)]
struct Live {
    addr: usize,
    size: usize,
    kind: Kind,
    /// The block behind a `VmapRam` mapping.
    phys: u64,
    fill: u8,
}

impl Live {
    fn bytes(&self) -> usize {
        match self.kind {
            Kind::Pages => PAGE_SIZE << self.size,
            Kind::Object => self.size,
            Kind::Vmalloc | Kind::VmapRam => self.size * PAGE_SIZE,
        }
    }

    fn ptr(&self) -> *mut u8 {
        if self.kind == Kind::Pages {
            hal::kmap::linear_map().expect("MMU is on").ptr(PhysAddr::new(self.addr as u64))
        } else {
            self.addr as *mut u8
        }
    }

    fn fill_it(&self) {
        // SAFETY: the allocation is live and ours, `bytes()` long.
        unsafe { self.ptr().write_bytes(self.fill, self.bytes()) };
    }

    fn check(&self) {
        // SAFETY: as in `fill_it`.
        let b = unsafe { core::slice::from_raw_parts(self.ptr(), self.bytes()) };
        if let Some(bad) = b.iter().position(|&x| x != self.fill) {
            panic!(
                "{:#x} ({} bytes) overwritten at offset {bad}: {:#x}, not {:#x}",
                self.addr,
                self.bytes(),
                b[bad],
                self.fill
            );
        }
        if self.kind == Kind::VmapRam {
            // The frames behind the mapping hold what was written through it.
            let lin = hal::kmap::linear_map().expect("MMU is on").ptr::<u8>(PhysAddr::new(self.phys));
            // SAFETY: the block is ours, reached through the identity map of RAM.
            let through = unsafe { core::slice::from_raw_parts(lin, 4 * PAGE_SIZE) };
            assert!(through.iter().all(|&x| x == self.fill), "vm_map_ram {:#x}: the frames differ", self.addr);
        }
    }

    fn check_and_free(&self) {
        self.check();
        match self.kind {
            // SAFETY: the block is ours and no longer used.
            Kind::Pages => unsafe { buddy::free_pages(PhysAddr::new(self.addr as u64), self.size) }.unwrap(),
            // SAFETY: as above, an object.
            Kind::Object => unsafe { slab::kfree(NonNull::new(self.addr as *mut u8)) }.unwrap(),
            Kind::Vmalloc => kernel::vfree(hal::VirtAddr::new(self.addr as u64)).unwrap(),
            Kind::VmapRam => {
                kernel::vm_unmap_ram(hal::VirtAddr::new(self.addr as u64), 4).unwrap();
                // SAFETY: the block is ours, no longer mapped anywhere.
                unsafe { buddy::free_pages(PhysAddr::new(self.phys), 2) }.unwrap();
            }
        }
    }
}

/// Allocations handed from one CPU to another, which frees them.
const MAILBOX: usize = 64;
static MAIL_CLASS: LockClass = LockClass::new("test: mailbox", 14);
static MAIL: [IrqSpinLock<([Option<Live>; MAILBOX], usize)>; MAX_CPUS] =
    [const { IrqSpinLock::new(&MAIL_CLASS, ([None; MAILBOX], 0)) }; MAX_CPUS];

fn post(to: usize, l: Live) -> bool {
    let mut m = MAIL[to].lock();
    let (slots, n) = &mut *m;
    if *n == MAILBOX {
        return false;
    }
    slots[*n] = Some(l);
    *n += 1;
    true
}

fn collect(cpu: usize) {
    loop {
        let l = {
            let mut m = MAIL[cpu].lock();
            let (slots, n) = &mut *m;
            if *n == 0 {
                return;
            }
            *n -= 1;
            slots[*n].take()
        };
        if let Some(l) = l {
            l.check_and_free();
        }
    }
}

static GATE: AtomicUsize = AtomicUsize::new(0);
static DONE: AtomicUsize = AtomicUsize::new(0);
static IRQ_ALLOCS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static TICKING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static PERIOD: AtomicU64 = AtomicU64::new(0);
/// The object each CPU's timer handler keeps from one tick to the next (0: none).
static IRQ_OBJ: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

/// Per CPU: a vmalloc area its timer handler is to check and `vfree`.
static HANDLER_CLASS: LockClass = LockClass::new("test: the handler's area", 14);
static FOR_HANDLER: [IrqSpinLock<Option<Live>>; MAX_CPUS] =
    [const { IrqSpinLock::new(&HANDLER_CLASS, None) }; MAX_CPUS];

/// Hands `l` to this CPU's timer handler; false when it holds one already.
fn post_to_handler(cpu: usize, l: Live) -> bool {
    let mut slot = FOR_HANDLER[cpu].lock();
    if slot.is_some() {
        return false;
    }
    *slot = Some(l);
    true
}

/// The timer handler: frees the object of the previous tick (checking it), allocates a
/// new one and a page, all from interrupt context (`GFP_ATOMIC`).
fn timer_handler(_intid: u32) {
    let cpu = smp::this_cpu();
    if !hal::timer::fired() {
        return;
    }
    let old = IRQ_OBJ[cpu].swap(0, Ordering::Relaxed);
    if old != 0 {
        // SAFETY: the object was allocated by this handler on this CPU and filled below.
        let b = unsafe { core::slice::from_raw_parts(old as *const u8, 96) };
        assert!(b.iter().all(|&x| x == 0xa0 | cpu as u8), "CPU {cpu}: the handler's object changed");
        // SAFETY: ours, no longer used.
        unsafe { slab::kfree(NonNull::new(old as *mut u8)) }.unwrap();
    }
    if let Ok(p) = slab::kmalloc_gfp(96, 8, GFP_ATOMIC) {
        // SAFETY: 96 bytes were just allocated at `p`.
        unsafe { p.as_ptr().write_bytes(0xa0 | cpu as u8, 96) };
        IRQ_OBJ[cpu].store(p.as_ptr() as usize, Ordering::Relaxed);
        IRQ_ALLOCS[cpu].fetch_add(1, Ordering::Relaxed);
    }
    if let Some(mut slot) = FOR_HANDLER[cpu].try_lock() {
        if let Some(l) = slot.take() {
            // A vmalloc area: checked, then `vfree`d here (queued, completed by this
            // CPU's next vmalloc call).
            l.check_and_free();
            IRQ_ALLOCS[cpu].fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Ok(pa) = buddy::alloc_pages_gfp(GFP_ATOMIC, 0) {
        // SAFETY: the frame was just allocated here.
        unsafe { buddy::free_pages(pa, 0) }.unwrap();
        IRQ_ALLOCS[cpu].fetch_add(1, Ordering::Relaxed);
    }
    if TICKING[cpu].load(Ordering::Relaxed) {
        hal::timer::arm_at(hal::timer::deadline() + PERIOD.load(Ordering::Relaxed));
    } else {
        hal::timer::stop();
    }
}

const SIZES: [usize; 9] = [8, 16, 40, 64, 96, 200, 512, 1500, 2048];

fn work(cpu: usize) {
    let ncpus = smp::online_cpus();
    let intid = hal::boot::boot_info().unwrap().platform.timer_intid.unwrap();
    hal::irq::controller().unwrap().enable(intid);
    tests::rendezvous(&GATE);
    TICKING[cpu].store(true, Ordering::Relaxed);
    hal::timer::arm_at(hal::timer::now() + PERIOD.load(Ordering::Relaxed));
    let mut held: [Option<Live>; 128] = [None; 128];
    let mut n = 0usize;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (cpu as u64 + 1) << 40;
    let ops = OPS / ncpus;
    for i in 0..ops {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if i % 16 == 0 {
            collect(cpu);
        }
        if n < held.len() && (seed.is_multiple_of(2) || n == 0) {
            let fill = (i as u8) ^ (cpu as u8) << 5;
            let l = match seed % 8 {
                0 | 1 => {
                    let (order, gfp) = match (seed >> 8) % 4 {
                        0 => (0, GFP_DMA32),
                        1 => (1, GFP_KERNEL),
                        2 => (3, GFP_KERNEL),
                        _ => (0, GFP_KERNEL),
                    };
                    let pa = buddy::alloc_pages_gfp(gfp, order).unwrap();
                    if gfp == GFP_DMA32 {
                        assert!(pa.as_u64() + (PAGE_SIZE << order) as u64 <= 1 << 32, "GFP_DMA32 above 4 GiB");
                    }
                    Live { addr: pa.as_u64() as usize, size: order, kind: Kind::Pages, phys: 0, fill }
                }
                2 => {
                    // vmalloc or vzalloc of 1..4 pages (a vzalloc'd area reads zero first).
                    let pages = 1 + (seed >> 9) as usize % 4;
                    let va = if (seed >> 14).is_multiple_of(2) {
                        kernel::vmalloc(pages * PAGE_SIZE).unwrap()
                    } else {
                        let va = kernel::vzalloc(pages * PAGE_SIZE).unwrap();
                        // SAFETY: just mapped, ours, `pages` pages long.
                        let b = unsafe { core::slice::from_raw_parts(va.as_ptr::<u8>(), pages * PAGE_SIZE) };
                        assert!(b.iter().all(|&x| x == 0), "vzalloc'd area not zero");
                        va
                    };
                    Live { addr: va.as_usize(), size: pages, kind: Kind::Vmalloc, phys: 0, fill }
                }
                3 if (seed >> 16).is_multiple_of(2) => {
                    let pa = buddy::alloc_pages(2).unwrap();
                    let frames: [PhysAddr; 4] = core::array::from_fn(|i| pa.add((i * PAGE_SIZE) as u64));
                    // SAFETY: the block is ours until it is unmapped and freed.
                    let va = unsafe { kernel::vm_map_ram(&frames) }.unwrap();
                    Live { addr: va.as_usize(), size: 4, kind: Kind::VmapRam, phys: pa.as_u64(), fill }
                }
                _ => {
                    let size = SIZES[(seed >> 12) as usize % SIZES.len()];
                    let p = slab::kmalloc(size, 8).unwrap();
                    Live { addr: p.as_ptr() as usize, size, kind: Kind::Object, phys: 0, fill }
                }
            };
            l.fill_it();
            held[n] = Some(l);
            n += 1;
        } else {
            let k = (seed >> 20) as usize % n;
            let mut l = held[k].take().unwrap();
            n -= 1;
            held[k] = held[n].take();
            if l.kind == Kind::Vmalloc && (seed >> 40).is_multiple_of(4) {
                // vrealloc to 1..4 pages: the common part kept, the rest filled anew.
                l.check();
                let pages = 1 + (seed >> 42) as usize % 4;
                let va = kernel::vrealloc(hal::VirtAddr::new(l.addr as u64), pages * PAGE_SIZE).unwrap();
                l = Live { addr: va.as_usize(), size: pages, ..l };
                l.fill_it();
            }
            if l.kind == Kind::Vmalloc && (seed >> 44).is_multiple_of(4) && post_to_handler(cpu, l) {
                // Freed by this CPU's timer handler (deferred: no vmalloc lock there).
                continue;
            }
            // A third of the frees on another CPU.
            if ncpus > 1 && seed.is_multiple_of(3) && post((cpu + 1 + (seed >> 30) as usize % (ncpus - 1)) % ncpus, l) {
                continue;
            }
            l.check_and_free();
        }
    }
    for l in held[..n].iter().flatten() {
        l.check_and_free();
    }
    TICKING[cpu].store(false, Ordering::Relaxed);
    DONE.fetch_add(1, Ordering::AcqRel);
    // Keep collecting until every CPU is done posting.
    while DONE.load(Ordering::Acquire) < ncpus {
        collect(cpu);
        core::hint::spin_loop();
    }
    collect(cpu);
    // Let the last tick pass, then free the handler's object.
    let t0 = hal::timer::now();
    while hal::timer::now() < t0 + 3 * PERIOD.load(Ordering::Relaxed) {
        core::hint::spin_loop();
    }
    hal::irq::controller().unwrap().disable(intid);
    hal::timer::stop();
    let old = IRQ_OBJ[cpu].swap(0, Ordering::Relaxed);
    if old != 0 {
        // SAFETY: the handler's last object; the handler no longer runs here.
        unsafe { slab::kfree(NonNull::new(old as *mut u8)) }.unwrap();
    }
    let left = FOR_HANDLER[cpu].lock().take();
    if let Some(l) = left {
        l.check_and_free();
    }
}

/// A few of the workload's vmalloc and vm_map_ram calls on this CPU.
fn warm_up(_cpu: usize) {
    let mut areas = [None; 32];
    for (i, a) in areas.iter_mut().enumerate() {
        *a = Some(kernel::vmalloc((1 + i % 4) * PAGE_SIZE).unwrap());
    }
    for a in areas.into_iter().flatten() {
        kernel::vfree(a).unwrap();
    }
    let pa = buddy::alloc_pages(2).unwrap();
    let frames: [PhysAddr; 4] = core::array::from_fn(|i| pa.add((i * PAGE_SIZE) as u64));
    // SAFETY: the block is ours; unmapped before it is freed.
    let va = unsafe { kernel::vm_map_ram(&frames) }.unwrap();
    kernel::vm_unmap_ram(va, 4).unwrap();
    // SAFETY: ours, no longer mapped.
    unsafe { buddy::free_pages(pa, 2) }.unwrap();
}

/// Frees everything cached on every CPU; returns (free pages, slab pages).
fn settle() -> (usize, usize) {
    // Deferred frees completed, parked ranges and vm_map_ram blocks flushed, their empty
    // page tables given back, vmalloc's spare records at their floor, empty slabs freed.
    memory::snapshot::settle();
    buddy::drain_hot();
    (buddy::stats().unwrap().free_pages + kernel::vmalloc_table_pages(), slab::stats().unwrap().slab_pages)
}

/// Random kmalloc/kfree, alloc_pages/free_pages (orders 0, 1, 3; Normal and DMA32),
/// vmalloc/vzalloc/vrealloc/vfree and vm_map_ram/vm_unmap_ram on every CPU at once, a third
/// of the frees on another CPU, timer interrupts that allocate and `vfree` in their handler;
/// every byte checked; frames (page tables included), slabs, lists, caches, vmalloc areas
/// and vm_map_ram blocks back at baseline.
fn random_work_on_every_cpu_ends_at_baseline() {
    let reports = hal::sync::take_reports();
    assert_eq!(reports, 0);
    let intid = hal::boot::boot_info().unwrap().platform.timer_intid.unwrap();
    hal::irq::unregister(intid);
    hal::irq::register(intid, timer_handler).unwrap();
    PERIOD.store(hal::timer::frequency() / 2_000, Ordering::Relaxed);
    // A first round on every CPU grows what stays (each CPU's magazines of the caches
    // vmalloc's records come from); from then on the workload must leave no trace.
    tests::on_every_cpu(warm_up);
    let snap0 = memory::snapshot::MemSnapshot::settled();
    let (free0, slabs0) = settle();
    let (tables0, live0) = (kernel::vmalloc_table_pages(), kernel::vmalloc_stats().unwrap().live_areas);
    let info0 = buddy::stats().unwrap().buddyinfo();
    tests::on_every_cpu(work);
    let (free1, slabs1) = settle();
    let d = snap0.diff(&memory::snapshot::MemSnapshot::settled());
    // Nothing lost: free frames + page tables + slab pages, and the live slab objects, as
    // before. vmalloc's records churned on four CPUs may sit spread over more slab pages
    // than before (the same objects): then free frames and buddyinfo move by those pages.
    assert_eq!((d.frames, d.slab_objects, d.table_pages, d.vmalloc_areas), (0, 0, 0, 0), "{d:?}");
    assert_eq!(kernel::vmalloc_table_pages(), tables0, "page tables at baseline");
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live0, "every vmalloc area freed");
    assert_eq!(kernel::deferred_vfree_stats().0, 0, "no deferred free left");
    assert_eq!(kernel::vmap_block_stats().unwrap().mapped, 0, "every vm_map_ram unmapped");
    let irq: u64 = IRQ_ALLOCS.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    hal::print!("({OPS} ops over {} CPUs, {irq} allocations in interrupt handlers) ", smp::online_cpus());
    assert!(irq > 0, "the timer handlers allocated");
    assert_eq!(free1 as i64 + slabs1 as i64, free0 as i64 + slabs0 as i64, "every frame came back");
    if slabs1 == slabs0 {
        assert_eq!(buddy::stats().unwrap().buddyinfo(), info0, "buddyinfo at baseline");
    } else {
        hal::print!("(slab pages {slabs0} -> {slabs1}, the same objects) ");
    }
    assert_eq!(buddy::stats().unwrap().hot_pages, 0);
    buddy::check_consistency().unwrap();
    assert_eq!(slab::stats().unwrap().invalid_frees, 0);
    assert_eq!(hal::sync::take_reports(), 0, "lock checks silent");
}

static STOP: AtomicBool = AtomicBool::new(false);
static CACHED_BEFORE_DOWN: AtomicUsize = AtomicUsize::new(0);
static CPU1_MAPPED: AtomicBool = AtomicBool::new(false);
static QUEUED_ON_1: AtomicUsize = AtomicUsize::new(0);

fn offline_body(cpu: usize) {
    match cpu {
        0 => {
            // CPU 1 fills its page lists and object caches, then idles.
            smp::on_cpu(1, &|| {
                let mut pages = [PhysAddr::new(0); 32];
                let mut objs = [None; 12];
                for p in &mut pages {
                    *p = buddy::alloc_pages(0).unwrap();
                }
                for o in &mut objs {
                    *o = Some(slab::kmalloc(64, 8).unwrap());
                }
                for p in pages {
                    // SAFETY: allocated just above, unused.
                    unsafe { buddy::free_pages(p, 0) }.unwrap();
                }
                for o in objs {
                    // SAFETY: as above.
                    unsafe { slab::kfree(o) }.unwrap();
                }
            })
            .unwrap();
            // CPU 1 has used a vm_map_ram block (in thread context, in its body below).
            while !CPU1_MAPPED.load(Ordering::Acquire) {
                core::hint::spin_loop();
            }
            assert!(smp::wait_idle(1, 5_000_000_000));
            // An interrupt handler on CPU 1 frees one of its areas: queued on its ring,
            // which nothing on CPU 1 completes before it goes off.
            smp::on_cpu(1, &|| {
                let a = hal::VirtAddr::new(QUEUED_ON_1.load(Ordering::Relaxed) as u64);
                kernel::vfree(a).unwrap();
            })
            .unwrap();
            let dirty0 = kernel::vmap_block_stats().unwrap().dirty;
            let slab = slab::global().unwrap();
            let hot = buddy::pcp::pcp_pages_on(1);
            let node = kernel::vmalloc_instances().nth(1).unwrap();
            let n0 = node.lock().stats();
            CACHED_BEFORE_DOWN.store(slab.cpu_cached_objects_on(1), Ordering::Relaxed);
            assert!(hot >= 32, "CPU 1's lists hold its frames ({hot})");
            assert!(n0.pooled_areas > 4000 && n0.parked_areas >= 3, "CPU 1's node pools and parks ranges: {n0:?}");
            assert_eq!(kernel::deferred_vfree_stats().0, 1, "a free waits on CPU 1's ring");
            smp::cpu_down(1).unwrap();
            assert_eq!(buddy::pcp::pcp_pages_on(1), 0, "CPU 1 gave its page lists back as it went off");
            assert_eq!(slab.cpu_cached_objects_on(1), 0, "and its magazines");
            assert_eq!(kernel::vmap_block_stats().unwrap().dirty, dirty0 + 1, "and its vm_map_ram block, retired");
            assert_eq!(kernel::deferred_vfree_stats().0, 0, "and the free its handler queued, done");
            let n1 = node.lock().stats();
            assert_eq!((n1.pooled_areas, n1.parked_areas), (0, 0), "and its node's pooled and parked ranges");
            assert_eq!(n1.live_areas, n0.live_areas - 1);
            // The dead hook ran here: what its purge freed sits in CPU 0's caches.
            buddy::drain_local();
            slab::drain_local();
            STOP.store(true, Ordering::Release);
            smp::cpu_up(1).unwrap();
        }
        1 => {
            // A piece of a block of its own, unmapped: the block stays CPU 1's until it
            // goes off.
            let pa = buddy::alloc_pages(0).unwrap();
            // SAFETY: the frame is ours; unmapped before it is freed.
            let va = unsafe { kernel::vm_map_ram(&[pa]) }.unwrap();
            kernel::vm_unmap_ram(va, 1).unwrap();
            // SAFETY: ours, no longer mapped.
            unsafe { buddy::free_pages(pa, 0) }.unwrap();
            // Its node pools what a lazy purge flushed (aligned areas past the threshold),
            // then parks three more ranges; one area is left for a handler to free.
            fill_a_pool();
            for _ in 0..3 {
                kernel::vfree(kernel::vmalloc(PAGE_SIZE).unwrap()).unwrap();
            }
            QUEUED_ON_1.store(kernel::vmalloc(2 * PAGE_SIZE).unwrap().as_usize(), Ordering::Relaxed);
            CPU1_MAPPED.store(true, Ordering::Release);
        }
        n => {
            while !STOP.load(Ordering::Acquire) {
                let p = slab::kmalloc(128, 8).unwrap();
                // SAFETY: allocated just above, unused.
                unsafe { slab::kfree(p) }.unwrap();
                let _ = n;
            }
            buddy::drain_local();
            slab::drain_local();
        }
    }
}

/// Aligned areas allocated and freed past the purge threshold: the lazy purge pools them.
/// 5 pages + the guard, 64 KiB aligned (fix_align_alloc_test's areas): one more than fills
/// the threshold of 24,576 parked pages, so the last free purges lazily.
fn fill_a_pool() {
    for _ in 0..memory::vmalloc::lazy_max_pages(4) / 6 + 1 {
        let p = kernel::vmalloc_aligned(5 * PAGE_SIZE, 64 << 10).unwrap();
        kernel::vfree(p).unwrap();
    }
}

/// CPU 1, with frames on its page lists, objects in its caches, a vm_map_ram block of its
/// own, pooled and parked ranges in its vmalloc node and a free queued by a handler on its
/// ring, is switched off by CPU 0 while CPUs 2 and 3 keep allocating: its "down" hook
/// hands back the caches and the block (retired: dirty, flushed by the next purge), the
/// "dead" hook on CPU 0 the queued free and the node's ranges; buddyinfo, slabinfo and
/// vmallocinfo end at baseline.
fn a_cpu_switched_off_hands_back_its_caches() {
    // A first round grows what stays: CPU 1's node's spare records, at their floor.
    tests::on_every_cpu(|cpu| {
        if cpu == 1 {
            fill_a_pool();
        }
    });
    // The reports' text lives through both snapshots (one slab object each).
    let (mut vinfo0, mut vinfo1) = (alloc::string::String::new(), alloc::string::String::new());
    kernel::write_vmallocinfo(&mut vinfo0).unwrap();
    vinfo1.reserve(vinfo0.len() + 4096);
    let snap0 = memory::snapshot::MemSnapshot::settled();
    let (free0, slabs0) = settle();
    let info0 = buddy::stats().unwrap().buddyinfo();
    let out = tests::on_every_cpu_within(offline_body, tests::CPU_TIMEOUT_NS);
    assert_eq!(out[0], smp::Outcome::Returned, "{out:?}");
    assert!(CACHED_BEFORE_DOWN.load(Ordering::Relaxed) >= 12, "CPU 1's magazines held its 12 objects");
    assert_eq!(slab::global().unwrap().cpu_cached_objects(), 0, "no object left in a magazine");
    let (free1, slabs1) = settle();
    let d = snap0.diff(&memory::snapshot::MemSnapshot::settled());
    // Nothing lost: frames, live slab objects, page tables and areas as before. The 4,000
    // records CPU 1's node churned may leave the same objects spread over one more slab
    // page; then free frames and buddyinfo move by that page.
    assert_eq!((d.frames, d.slab_objects, d.table_pages, d.vmalloc_areas), (0, 0, 0, 0), "{d:?}");
    assert_eq!(free1 + slabs1, free0 + slabs0, "every frame came back");
    if slabs1 == slabs0 {
        assert_eq!(buddy::stats().unwrap().buddyinfo(), info0);
    }
    kernel::write_vmallocinfo(&mut vinfo1).unwrap();
    assert_eq!(vinfo1, vinfo0, "vmallocinfo at baseline");
    assert_eq!(smp::cpu_state(1), smp::state::IDLE, "back in its idle loop");
}

/// Prints what the per-CPU object caches cost and save on this CPU (a figure, not a
/// check): kmalloc/kfree of 64 bytes, ping-pong and 10,000 then 10,000, through the global
/// allocator's magazines and through a private allocator on the same buddy (the cache lock
/// every call).
fn figure_kmalloc_with_and_without_cpu_caches() {
    const N: usize = 10_000;
    let private = slab::SlabAllocator::new(buddy::global().unwrap(), false).unwrap();
    let global = slab::global().unwrap();
    let mut v = alloc::vec![NonNull::<u8>::dangling(); N];
    let mut time = |s: &slab::SlabAllocator<'_>| {
        let t0 = hal::cpu::uptime_ns();
        for _ in 0..N {
            let p = s.kmalloc(64, 8).unwrap();
            // SAFETY: allocated just above, unused.
            unsafe { s.kfree(p) }.unwrap();
        }
        let t1 = hal::cpu::uptime_ns();
        for p in v.iter_mut() {
            *p = s.kmalloc(64, 8).unwrap();
        }
        for &p in v.iter() {
            // SAFETY: allocated just above, unused.
            unsafe { s.kfree(p) }.unwrap();
        }
        let t2 = hal::cpu::uptime_ns();
        ((t1 - t0) / N as u64 / 2, (t2 - t1) / N as u64 / 2)
    };
    // test_vmalloc's pcpu_alloc_test pattern: 35,000 objects of 1..1024 bytes aligned on
    // 2..2048, then all freed.
    let mut big = alloc::vec![NonNull::<u8>::dangling(); 35_000];
    let mut pcpu = |s: &slab::SlabAllocator<'_>| {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let t0 = hal::cpu::uptime_ns();
        for p in big.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *p = s.kmalloc(1 + (seed % 1024) as usize, 2 << ((seed >> 12) % 11)).unwrap();
        }
        let t1 = hal::cpu::uptime_ns();
        for &p in big.iter() {
            // SAFETY: allocated just above, unused.
            unsafe { s.kfree(p) }.unwrap();
        }
        let t2 = hal::cpu::uptime_ns();
        ((t1 - t0) / 35_000, (t2 - t1) / 35_000)
    };
    let t0 = hal::cpu::uptime_ns();
    for _ in 0..10_000 {
        let saved = hal::cpu::mask_interrupts();
        hal::cpu::restore_interrupts(core::hint::black_box(saved));
    }
    let t1 = hal::cpu::uptime_ns();
    let lk = IrqSpinLock::new(&MAIL_CLASS, 0u64);
    for _ in 0..10_000 {
        *lk.lock() += 1;
    }
    let t2 = hal::cpu::uptime_ns();
    let sl = hal::sync::SpinLock::new(&MAIL_CLASS, 0u64);
    for _ in 0..10_000 {
        *sl.lock() += 1;
    }
    let t3 = hal::cpu::uptime_ns();
    hal::print!(
        "(mask+restore {} ns, IrqSpinLock {} ns, SpinLock {} ns) ",
        (t1 - t0) / 10_000,
        (t2 - t1) / 10_000,
        (t3 - t2) / 10_000
    );
    let (ga, gf) = pcpu(global);
    let (pa, pf) = pcpu(&private);
    hal::print!("(pcpu pattern ns: magazines alloc {ga} free {gf}; lock alloc {pa} free {pf}) ");
    let _ = time(global);
    let _ = time(&private);
    let (gp, gb) = time(global);
    let (pp, pb) = time(&private);
    private.shrink();
    slab::shrink();
    hal::print!(
        "(ns per call: magazines ping-pong {gp}, bulk {gb}; cache lock ping-pong {pp}, bulk {pb}; global strict {} caches {}) ",
        global.is_strict(),
        global.has_cpu_caches()
    );
}

/// Areas each CPU's timer handler frees, one per tick (0: taken).
const DEFERRED_AREAS: usize = 32;
static TO_FREE: [[AtomicUsize; DEFERRED_AREAS]; MAX_CPUS] =
    [const { [const { AtomicUsize::new(0) }; DEFERRED_AREAS] }; MAX_CPUS];
/// Per CPU: areas its handler freed, and vmalloc-family calls the handler saw refused.
static FREED_IN_IRQ: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static REFUSED_IN_IRQ: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

/// The timer handler of the deferred-free test: writes into the next area (still live),
/// `vfree`s it (queued, since no vmalloc lock is taken here), and checks that allocating
/// calls are refused in interrupt context.
fn vfree_handler(_intid: u32) {
    let cpu = smp::this_cpu();
    if !hal::timer::fired() {
        return;
    }
    if let Some(slot) = TO_FREE[cpu].iter().find(|s| s.load(Ordering::Relaxed) != 0) {
        let va = slot.swap(0, Ordering::Relaxed);
        // SAFETY: a live one-page area this test allocated for this handler alone.
        unsafe { (va as *mut u8).write_volatile(0x5a) };
        kernel::vfree(hal::VirtAddr::new(va as u64)).unwrap();
        FREED_IN_IRQ[cpu].fetch_add(1, Ordering::Relaxed);
    }
    if kernel::vmalloc(PAGE_SIZE) == Err(memory::vmalloc::VmallocError::InInterrupt) {
        REFUSED_IN_IRQ[cpu].fetch_add(1, Ordering::Relaxed);
    }
    let frame = [hal::PhysAddr::new(0x4000_0000)];
    // SAFETY: refused before anything is mapped (what is checked).
    if unsafe { kernel::vm_map_ram(&frame) } == Err(memory::vmalloc::VmallocError::InInterrupt) {
        REFUSED_IN_IRQ[cpu].fetch_add(1, Ordering::Relaxed);
    }
    if FREED_IN_IRQ[cpu].load(Ordering::Relaxed) < DEFERRED_AREAS {
        hal::timer::arm_at(hal::timer::deadline() + PERIOD.load(Ordering::Relaxed));
    } else {
        hal::timer::stop();
    }
}

fn deferred_body(cpu: usize) {
    for slot in &TO_FREE[cpu] {
        slot.store(kernel::vmalloc(PAGE_SIZE).unwrap().as_usize(), Ordering::Relaxed);
    }
    let intid = hal::boot::boot_info().unwrap().platform.timer_intid.unwrap();
    hal::irq::controller().unwrap().enable(intid);
    hal::timer::arm_at(hal::timer::now() + PERIOD.load(Ordering::Relaxed));
    // No vmalloc-family call here until the handler has freed every area.
    let t0 = hal::timer::now();
    while FREED_IN_IRQ[cpu].load(Ordering::Relaxed) < DEFERRED_AREAS {
        assert!(hal::timer::now() < t0 + 4000 * PERIOD.load(Ordering::Relaxed), "CPU {cpu}: the handler stopped");
        core::hint::spin_loop();
    }
    hal::irq::controller().unwrap().disable(intid);
    hal::timer::stop();
    // The areas are queued, not yet freed: the next call on this CPU completes them.
    let p = kernel::vmalloc(PAGE_SIZE).unwrap();
    kernel::vfree(p).unwrap();
}

/// `vfree` from interrupt handlers on every CPU is deferred (Linux's `vfree_atomic`) and
/// completed by that CPU's next vmalloc call; vmalloc and `vm_map_ram` in a handler are
/// refused with `InInterrupt`; the vmalloc lock is never taken in interrupt context.
fn vfree_in_a_handler_is_deferred_and_completed_by_the_next_call() {
    let reports = hal::sync::take_reports();
    assert_eq!(reports, 0);
    let intid = hal::boot::boot_info().unwrap().platform.timer_intid.unwrap();
    hal::irq::unregister(intid);
    hal::irq::register(intid, vfree_handler).unwrap();
    PERIOD.store(hal::timer::frequency() / 2_000, Ordering::Relaxed);
    kernel::purge();
    let live0 = kernel::vmalloc_stats().unwrap().live_areas;
    let (_, done0, refused0) = kernel::deferred_vfree_stats();
    tests::on_every_cpu(deferred_body);
    hal::irq::unregister(intid);
    let ncpus = smp::online_cpus();
    let (waiting, done, refused) = kernel::deferred_vfree_stats();
    hal::print!("({} areas freed by handlers on {ncpus} CPUs) ", done - done0);
    assert_eq!((waiting, done - done0, refused - refused0), (0, (ncpus * DEFERRED_AREAS) as u64, 0));
    for (cpu, refused) in REFUSED_IN_IRQ.iter().enumerate().take(ncpus) {
        let refused = refused.load(Ordering::Relaxed);
        assert_eq!(refused, 2 * DEFERRED_AREAS, "CPU {cpu}: vmalloc and vm_map_ram refused in the handler");
    }
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live0, "every area freed");
    assert_eq!(hal::sync::take_reports(), 0, "lock checks silent: no vmalloc lock in interrupt context");
}

static AREA: AtomicUsize = AtomicUsize::new(0);
static BIG: AtomicUsize = AtomicUsize::new(0);

fn node_body(cpu: usize) {
    if cpu == 1 {
        AREA.store(kernel::vmalloc(3 * PAGE_SIZE).unwrap().as_usize(), Ordering::Relaxed);
        // Aligned to 2 TiB: no such address inside a 1 TiB node.
        BIG.store(kernel::vmalloc_aligned(PAGE_SIZE, 2 << 40).unwrap().as_usize(), Ordering::Relaxed);
    }
}

/// Each secondary CPU allocates from its own vmalloc node (an instance of its own, in a
/// 1 TiB part of the window): an area made on CPU 1 lies in CPU 1's node, is freed from
/// CPU 0, is listed by vmallocinfo and named by the fault explainer; what the node cannot
/// place (aligned beyond its window) comes from the global instance.
fn secondary_cpus_allocate_from_their_own_nodes() {
    kernel::purge();
    let live0 = kernel::vmalloc_stats().unwrap().live_areas;
    let instances: alloc::vec::Vec<_> = kernel::vmalloc_instances().collect();
    assert_eq!(instances.len(), smp::online_cpus(), "the global instance and a node per secondary CPU");
    // In thread context on CPU 1 (`on_cpu` would run it in a handler, where vmalloc refuses).
    tests::on_every_cpu(node_body);
    let a = hal::VirtAddr::new(AREA.load(Ordering::Relaxed) as u64);
    let big = hal::VirtAddr::new(BIG.load(Ordering::Relaxed) as u64);
    assert!(instances[1].range().contains(a), "{a:#x} not in CPU 1's node {:?}", instances[1].range());
    assert!(!instances.iter().skip(1).any(|n| n.range().contains(big)), "{big:#x}: the global instance's");
    assert_eq!(kernel::find_area(a).map(|i| (i.addr, i.pages)), Some((a, 3)));
    let mut info = alloc::string::String::new();
    kernel::write_vmallocinfo(&mut info).unwrap();
    let line = info.lines().find(|l| l.starts_with(&alloc::format!("{:#x}-", a.as_u64()))).expect("listed");
    assert!(line.contains("tests/tests/percpu.rs") && line.ends_with("pages=3 vmalloc"), "{line}");
    let mut why = alloc::string::String::new();
    assert!(kernel::explain_fault(a.as_u64() + 3 * PAGE_SIZE as u64, &mut why));
    assert!(why.contains("guard page"), "{why}");
    // Freed from CPU 0, in the node's instance.
    kernel::vfree(a).unwrap();
    assert_eq!(kernel::vfree(a), Err(memory::vmalloc::VmallocError::DoubleFree));
    kernel::vfree(big).unwrap();
    kernel::purge();
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live0);
}

static POOL_HIT: AtomicUsize = AtomicUsize::new(0);

fn pool_body(cpu: usize) {
    if cpu != 1 {
        return;
    }
    fill_a_pool();
    let node = kernel::vmalloc_instances().nth(1).unwrap();
    let before = node.lock().stats().pooled_areas;
    let p = kernel::vmalloc_aligned(5 * PAGE_SIZE, 64 << 10).unwrap();
    let after = node.lock().stats().pooled_areas;
    kernel::vfree(p).unwrap();
    POOL_HIT.store(before * 1_000_000 + after, Ordering::Relaxed);
}

/// The purge threshold is Linux's for four CPUs (32 MiB x fls(4), per instance), and a
/// CPU's node pools the aligned ranges its lazy purge flushed: the next aligned
/// allocation of that size takes one; an explicit purge empties every pool.
fn nodes_pool_what_their_lazy_purges_flushed() {
    kernel::purge();
    for v in kernel::vmalloc_instances() {
        assert_eq!(v.lock().config().lazy_max_pages, 3 * 8192);
    }
    tests::on_every_cpu(pool_body);
    let hit = POOL_HIT.load(Ordering::Relaxed);
    let (before, after) = (hit / 1_000_000, hit % 1_000_000);
    assert!(before > 4000, "the lazy purge pooled its 4,097 ranges: {before}");
    assert_eq!(after, before - 1, "the next aligned allocation of that size came from the pool");
    kernel::purge();
    let s = kernel::vmalloc_stats().unwrap();
    assert_eq!((s.pooled_areas, s.pooled_pages), (0, 0), "an explicit purge empties every pool");
}

tests::main!(
    test!(figure_kmalloc_with_and_without_cpu_caches),
    test!(random_work_on_every_cpu_ends_at_baseline),
    test!(vfree_in_a_handler_is_deferred_and_completed_by_the_next_call),
    test!(secondary_cpus_allocate_from_their_own_nodes).needing(tests::four_cpus, "-smp 4"),
    test!(a_cpu_switched_off_hands_back_its_caches).needing(tests::four_cpus, "-smp 4"),
    test!(nodes_pool_what_their_lazy_purges_flushed).needing(tests::four_cpus, "-smp 4"),
);
