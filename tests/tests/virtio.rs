//! virtio-drivers (crates.io) on target, over our memory system: transports found in the
//! device tree and ioremapped, bad transports refused with a clear error, DMA from the
//! buddy, buffers shared in place or bounced, virtio-blk round trips across the disk (heap,
//! vmalloc'd and deliberately scattered buffers), persistence across two boots, virtio-rng,
//! a throughput bench, and everything given back.
//!
//! Devices come from `QEMU_EXTRA` (see `tools/test-virtio`, which also makes the disk):
//! `-drive file=IMG,if=none,format=raw,id=d -device virtio-blk-device,drive=d
//! -device virtio-rng-device`. Without them the device tests are skipped (and say so),
//! unless `virtio.require=1`. Boot parameters: `seed=N` replays a run,
//! `virtio.phase=write|verify` splits the persistence test over two boots.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};

use hal::{PhysAddr, VirtAddr, PAGE_SIZE};
use memory::kernel::{self, VBox};
use memory::vmalloc::{Prot, VmFlags};
use spin::Once;
use tests::{test, Test};
use virtio::blk::SECTOR_SIZE;
use virtio::dma::{self, contiguous_phys, DmaPool};
use virtio::mmio::{self, Header, MmioDevice, ProbeError};
use virtio::pattern::{self, SplitMix64, Spread};
use virtio::persist::{self, PersistError};
use virtio::virtio_drivers::transport::{DeviceType, Transport};
use virtio::virtio_drivers::{BufferDirection, Hal};
use virtio::{Blk, BlkError, Rng, VirtioHal};

const MIB: usize = 1 << 20;

static SEED: Once<u64> = Once::new();

fn seed() -> u64 {
    *SEED.get().expect("seed set in main")
}

/// A per-test generator: the run's seed mixed with the test's own number.
fn rng_for(test: u64) -> SplitMix64 {
    SplitMix64::new(pattern::mix(seed() ^ test.wrapping_mul(0x9e37_79b9)))
}

fn blk() -> Blk {
    Blk::open_first().unwrap_or_else(|e| panic!("virtio-blk: {e}"))
}

fn free_pages() -> usize {
    memory::buddy::stats().unwrap().free_pages
}

/// Every page accounted for: buddy free pages + the table pages the vmalloc windows keep +
/// slab pages after a shrink.
fn accounted_pages() -> usize {
    memory::slab::shrink();
    free_pages() + kernel::vmalloc_table_pages() + memory::slab::stats().unwrap().slab_pages
}

/// A buffer of `pages` pages mapped in the vmalloc window over frames in *descending*
/// physical order: no two neighbouring pages are physically contiguous, so every request
/// that spans a page boundary must be bounced.
struct Scattered {
    va: VirtAddr,
    frames: Vec<PhysAddr>,
}

impl Scattered {
    fn new(pages: usize) -> Self {
        let mut frames: Vec<PhysAddr> = (0..pages).map(|_| memory::buddy::alloc_pages(0).unwrap()).collect();
        frames.sort_unstable_by(|a, b| b.cmp(a));
        // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
        let va = unsafe { kernel::vmap(&frames, Prot::ReadWrite, VmFlags::NONE) }.unwrap();
        let s = Self { va, frames };
        assert!(contiguous_phys(s.va, 2 * PAGE_SIZE).is_none(), "scattered by construction");
        s
    }
}

impl Deref for Scattered {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `frames.len()` pages are mapped read-write at `va` and owned by `self`.
        unsafe { core::slice::from_raw_parts(self.va.as_ptr(), self.frames.len() * PAGE_SIZE) }
    }
}

impl DerefMut for Scattered {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the access unique.
        unsafe { core::slice::from_raw_parts_mut(self.va.as_mut_ptr(), self.frames.len() * PAGE_SIZE) }
    }
}

impl Drop for Scattered {
    fn drop(&mut self) {
        kernel::vunmap(self.va).unwrap();
        // SAFETY: the frames were allocated above, one page each, and are unmapped now.
        unsafe { memory::buddy::free_pages_bulk(&self.frames) }.unwrap();
    }
}

// ----- without devices -----

fn transports_are_found_and_empty_slots_skipped_quietly() {
    let slots = mmio::mmio_slots();
    assert!(!slots.is_empty(), "QEMU virt always lists virtio-mmio transports");
    let live = kernel::vmalloc_stats().unwrap().live_areas;
    let devices = virtio::probe_all();
    let mut empty = 0;
    for s in &slots {
        match MmioDevice::probe(*s) {
            Err(ProbeError::Empty) => empty += 1,
            Err(ProbeError::Busy) => assert!(devices.iter().any(|d| d.slot() == *s), "busy only if we hold it"),
            other => panic!("{s}: {other:?}"),
        }
    }
    assert_eq!(empty + devices.len(), slots.len());
    for d in &devices {
        assert!(d.slot().dma_coherent, "QEMU's virtio-mmio nodes are dma-coherent");
        assert_eq!(d.header().magic, mmio::MAGIC);
        assert!(d.header().version == 1 || d.header().version == 2);
    }
    hal::print!("({} transports, {} devices, {empty} empty) ", slots.len(), devices.len());
    drop(devices);
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live, "every mapping of the probe is gone");
}

fn a_transport_with_a_bad_header_is_refused_clearly() {
    let live = kernel::vmalloc_stats().unwrap().live_areas;
    // The PL031 RTC: MMIO, readable, not virtio (offset 0 is its data register).
    let rtc = mmio::find_compatible("arm,pl031").expect("QEMU virt has a PL031");
    // A hand-made slot over a device the tree does not list as virtio is refused before
    // anything is mapped (before issue 12 it was mapped and its data register read).
    let e = MmioDevice::probe(virtio::MmioSlot { size: 0x200, ..rtc }).unwrap_err();
    assert_eq!(e, ProbeError::NotVirtioSlot);
    let text = e.to_string();
    assert!(text.contains("not a virtio,mmio transport"), "{text}");
    log::warn!("virtio-mmio@{:#x} (pl031): {text}; skipped", rtc.phys);
    let e = MmioDevice::probe(virtio::MmioSlot { size: 0x10, ..rtc }).unwrap_err();
    assert_eq!(e, ProbeError::TooSmall(0x10));
    // RAM is never mapped as a device.
    let ram = hal::boot::boot_info().unwrap().platform.ram.iter().next().unwrap().start();
    assert_eq!(MmioDevice::probe(virtio::MmioSlot { phys: ram, ..rtc }).unwrap_err(), ProbeError::NotVirtioSlot);
    let h = Header { magic: 0x1234, version: 2, device_id: 2, vendor_id: 0 };
    assert!(matches!(h.classify(), Err(ProbeError::BadMagic(0x1234))));
    assert!(ProbeError::BadMagic(0x1234).to_string().contains("not a virtio device: bad magic"));
    let h = Header { magic: mmio::MAGIC, version: 7, device_id: 2, vendor_id: 0 };
    assert_eq!(h.classify(), Err(ProbeError::UnsupportedVersion(7)));
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live, "nothing stays mapped");
}

fn a_missing_device_is_a_clear_error_and_the_boot_job_carries_on() {
    let has_blk = virtio::probe_devices(false).iter().any(|d| d.device_type() == DeviceType::Block);
    if !has_blk {
        let e = Blk::open_first().unwrap_err();
        assert_eq!(e, BlkError::NoDevice);
        assert!(e.to_string().contains("no disk attached"), "{e}");
    }
    // With or without devices, the firmware's job logs and returns.
    let r = virtio::boot_job();
    assert_eq!(r.capacity.is_some(), has_blk);
    if has_blk {
        assert!(r.written, "{r:?}");
    }
}

fn mmio_phys_to_virt_maps_device_registers() {
    let live = kernel::vmalloc_stats().unwrap().live_areas;
    let rtc = mmio::find_compatible("arm,pl031").expect("QEMU virt has a PL031");
    // SAFETY: the PL031's 4 KiB register block is a valid MMIO region.
    let va = unsafe { VirtioHal::mmio_phys_to_virt(rtc.phys.as_u64(), 0x1000) };
    assert!(kernel::is_vmalloc_addr(VirtAddr::from_ptr(va.as_ptr())), "mapped by ioremap");
    // SAFETY: 0xff0 is the PrimeCell id register 0 of the mapped block: a plain read.
    let cid0 = unsafe { va.as_ptr().cast::<u32>().byte_add(0xff0).read_volatile() };
    assert_eq!(cid0 & 0xff, 0x0d, "PrimeCell id");
    memory::ioremap::iounmap(VirtAddr::from_ptr(va.as_ptr())).unwrap();
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live);
}

fn dma_alloc_gives_zeroed_contiguous_blocks_of_the_right_order() {
    let free = free_pages();
    let (pa, va) = VirtioHal::dma_alloc(3, BufferDirection::Both);
    assert_ne!(pa, 0);
    assert_eq!(pa % (4 * PAGE_SIZE as u64), 0, "order 2: aligned to 4 pages");
    assert_eq!(free_pages(), free - 4, "3 pages take an order-2 block");
    // SAFETY: dma_alloc returned 3 (really 4) pages at `va`, ours until dma_dealloc.
    let bytes = unsafe { core::slice::from_raw_parts_mut(va.as_ptr(), 3 * PAGE_SIZE) };
    assert!(bytes.iter().all(|&b| b == 0), "zeroed");
    bytes.fill(0x5a);
    assert_eq!(contiguous_phys(VirtAddr::from_ptr(va.as_ptr()), 3 * PAGE_SIZE), Some(PhysAddr::new(pa)));
    // SAFETY: the block came from dma_alloc(3) just above and nothing uses it any more.
    assert_eq!(unsafe { VirtioHal::dma_dealloc(pa, va, 3) }, 0);
    assert_eq!(free_pages(), free);
    // Too large for the buddy: address 0, which virtio-drivers turns into DmaError.
    let (pa, _) = VirtioHal::dma_alloc(1 << 20, BufferDirection::Both);
    assert_eq!(pa, 0);
    assert_eq!(free_pages(), free);
}

fn share_is_in_place_when_contiguous_and_bounces_otherwise() {
    let free = accounted_pages();
    let before = dma::stats();
    // Heap and stack: in the linear map, shared in place.
    let mut heap = vec![7u8; 3000];
    let ptr = core::ptr::NonNull::from(&mut heap[..]);
    // SAFETY: `heap` is valid and unused during the calls.
    let pa = unsafe { VirtioHal::share(ptr, BufferDirection::DriverToDevice) };
    assert_eq!(
        Some(PhysAddr::new(pa)),
        hal::kmap::linear_map().unwrap().virt_to_phys(VirtAddr::from_ptr(heap.as_ptr()))
    );
    // SAFETY: as above, `pa` is what share returned.
    unsafe { VirtioHal::unshare(pa, ptr, BufferDirection::DriverToDevice) };

    // Scattered, no pool entered: a bounce of its own from the buddy.
    let mut s = Scattered::new(2);
    s.fill(1);
    let buf = &mut s[PAGE_SIZE - 100..PAGE_SIZE + 100];
    buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    let ptr = core::ptr::NonNull::from(&mut *buf);
    // SAFETY: `buf` is valid and unused during the calls.
    let pa = unsafe { VirtioHal::share(ptr, BufferDirection::Both) };
    assert_eq!(dma::stats().loose_live, before.loose_live + 1);
    let bounce = hal::kmap::linear_map().unwrap().ptr::<u8>(PhysAddr::new(pa));
    // SAFETY: the bounce holds 200 bytes in the linear map; we play the device.
    let dev = unsafe { core::slice::from_raw_parts_mut(bounce, 200) };
    assert!(dev.iter().enumerate().all(|(i, &b)| b == i as u8), "copied in");
    dev.fill(0xee);
    // SAFETY: as above.
    unsafe { VirtioHal::unshare(pa, ptr, BufferDirection::Both) };
    assert!(s[PAGE_SIZE - 100..PAGE_SIZE + 100].iter().all(|&b| b == 0xee), "copied back");
    assert_eq!(s[PAGE_SIZE - 101], 1, "not a byte more");
    assert_eq!(dma::stats().loose_live, before.loose_live);

    // With a pool entered: bounces come from it; one too large for it overflows to the buddy;
    // a driver-to-device bounce is not copied back.
    let pool = DmaPool::new(1).unwrap();
    let _in = pool.enter().unwrap();
    let small = core::ptr::NonNull::from(&mut s[PAGE_SIZE - 8..PAGE_SIZE + 8]);
    // SAFETY: valid, unused during the calls.
    let pa1 = unsafe { VirtioHal::share(small, BufferDirection::DriverToDevice) };
    assert!(pa1 >= pool.phys().as_u64() && pa1 < pool.phys().as_u64() + pool.capacity() as u64);
    let mut big = Scattered::new(4);
    let bigp = core::ptr::NonNull::from(&mut big[..3 * PAGE_SIZE]);
    // SAFETY: valid, unused during the calls.
    let pa2 = unsafe { VirtioHal::share(bigp, BufferDirection::DeviceToDriver) };
    assert!(pa2 < pool.phys().as_u64() || pa2 >= pool.phys().as_u64() + pool.capacity() as u64, "overflowed");
    let ps = pool.stats();
    assert_eq!((ps.bounces, ps.overflows, ps.live), (1, 1, 1), "{ps:?}");
    let bounce = hal::kmap::linear_map().unwrap().ptr::<u8>(PhysAddr::new(pa1));
    // SAFETY: 16 bytes of the pool bounce; we play the device (which must not write a
    // driver-to-device buffer: the write must not come back).
    unsafe { bounce.write_bytes(0x11, 16) };
    // SAFETY: as above.
    unsafe {
        VirtioHal::unshare(pa1, small, BufferDirection::DriverToDevice);
        VirtioHal::unshare(pa2, bigp, BufferDirection::DeviceToDriver);
    }
    assert!(s[PAGE_SIZE - 8..PAGE_SIZE + 8].iter().all(|&b| b == 0xee), "driver-to-device: not copied back");
    assert_eq!(pool.stats().live, 0);
    drop(_in);
    drop((pool, s, big, heap));
    kernel::purge();
    assert_eq!(accounted_pages(), free, "pool, bounces and buffers all given back");
}

/// Under memory pressure an idle pool gives its block back (its shrinker), an entered or
/// busy one never does, and the next `enter` takes a new block that bounces as before.
fn an_idle_pool_is_given_back_under_pressure_and_taken_again_on_enter() {
    let free = accounted_pages();
    // The buffer first: an allocation after the pool could itself reclaim the idle pool.
    let mut buf = Scattered::new(2);
    let pool = DmaPool::new(2).unwrap();
    let part = core::ptr::NonNull::from(&mut buf[PAGE_SIZE - 8..PAGE_SIZE + 8]);
    {
        let _in = pool.enter().unwrap();
        let s0 = pool.stats();
        memory::reclaim::shrink(usize::MAX);
        assert!(pool.stats().resident, "an entered pool was given back");
        drop(_in);
        // Idle now, but a bounce live (a request in flight): kept too.
        let _in = pool.enter().unwrap();
        // SAFETY: `part` is valid and unused during the calls.
        let pa = unsafe { VirtioHal::share(part, BufferDirection::Both) };
        drop(_in);
        memory::reclaim::shrink(usize::MAX);
        assert!(pool.stats().resident, "a pool with a bounce live was given back");
        assert_eq!(pool.stats().given_back, s0.given_back);
        // SAFETY: as above; `pa` is what share returned.
        unsafe { VirtioHal::unshare(pa, part, BufferDirection::Both) };
    }
    let before = accounted_pages();
    let s0 = pool.stats();
    let got = memory::reclaim::shrink(usize::MAX);
    let s = pool.stats();
    assert!(!s.resident && s.given_back == s0.given_back + 1, "{s:?}");
    assert!(got >= 4);
    assert_eq!(pool.phys().as_u64(), 0);
    assert!(accounted_pages() >= before + 4, "the pool's 4 frames are free");
    let reclaim = memory::reclaim::stats();
    let ours = reclaim.shrinkers[..reclaim.nr_shrinkers].iter().find(|sh| sh.name.starts_with("virtio DMA"));
    assert!(ours.is_some_and(|sh| sh.reclaimed >= 4), "{ours:?}");
    // Entered again: a new block, and bounces come from it.
    let _in = pool.enter().unwrap();
    let s = pool.stats();
    assert!(s.resident && s.refills == s0.refills + 1, "{s:?}");
    // SAFETY: as above.
    let pa = unsafe { VirtioHal::share(part, BufferDirection::Both) };
    let base = pool.phys().as_u64();
    assert!(pa >= base && pa < base + pool.capacity() as u64, "bounced from the new block");
    // SAFETY: as above.
    unsafe { VirtioHal::unshare(pa, part, BufferDirection::Both) };
    drop(_in);
    drop((pool, buf));
    kernel::purge();
    assert_eq!(accounted_pages(), free, "pool and buffer all given back");
}

// ----- virtio-blk -----

fn blk_reports_capacity_and_refuses_bad_requests() {
    let mut d = blk();
    let cap = d.capacity();
    assert!(cap > 0);
    hal::print!("(capacity {cap} sectors) ");
    let mut s = [0u8; SECTOR_SIZE];
    assert!(matches!(d.read(cap, &mut s), Err(BlkError::OutOfRange { .. })));
    assert!(matches!(d.read(u64::MAX, &mut s), Err(BlkError::OutOfRange { .. })));
    assert_eq!(d.read(0, &mut s[..100]), Err(BlkError::Unaligned(100)));
    // The very last sector round-trips.
    pattern::fill(seed(), cap - 1, &mut s);
    d.write(cap - 1, &s).unwrap();
    let mut back = [0u8; SECTOR_SIZE];
    d.read(cap - 1, &mut back).unwrap();
    assert_eq!(pattern::check(seed(), cap - 1, &back), Ok(()));
    let mut id = [0u8; 20];
    match d.device_id(&mut id) {
        Ok(n) => hal::print!("(id {:?}) ", core::str::from_utf8(&id[..n]).unwrap_or("?")),
        Err(e) => hal::print!("(no id: {e}) "),
    }
}

/// Writes every extent of `spread` from `src`'s matching slice and reads them back into
/// `dst`, in a random order, then checks `dst` against the pattern.
fn round_trip(d: &mut Blk, spread: Spread, src: &mut [u8], dst: &mut [u8], g: &mut SplitMix64) {
    let ext = spread.len as usize * SECTOR_SIZE;
    let mut order: Vec<u64> = (0..spread.count).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, g.below(i as u64 + 1) as usize);
    }
    for &i in &order {
        let part = &mut src[i as usize * ext..][..ext];
        pattern::fill(seed(), spread.start(i), part);
        d.write(spread.start(i), part).unwrap();
    }
    for &i in order.iter().rev() {
        d.read(spread.start(i), &mut dst[i as usize * ext..][..ext]).unwrap();
    }
    for i in 0..spread.count {
        if let Err(m) = pattern::check(seed(), spread.start(i), &dst[i as usize * ext..][..ext]) {
            panic!("extent {i}: {m}");
        }
    }
}

fn blk_round_trip_4_mib_across_the_disk_from_the_heap() {
    let mut d = blk();
    let spread = Spread::new(d.capacity(), 64, 128, 1).expect("disk of 64 MiB or more");
    assert!(spread.bytes() >= 4 << 20);
    let (mut src, mut dst) = (vec![0u8; spread.bytes() as usize], vec![0u8; spread.bytes() as usize]);
    round_trip(&mut d, spread, &mut src, &mut dst, &mut rng_for(1));
    hal::print!("({:?}) ", d.stats());
}

fn blk_round_trip_4_mib_across_the_disk_from_vmalloc() {
    let mut d = blk();
    let spread = Spread::new(d.capacity(), 64, 128, 2).expect("disk of 64 MiB or more");
    let mut src = VBox::zeroed(spread.bytes() as usize).unwrap();
    let mut dst = VBox::zeroed(spread.bytes() as usize).unwrap();
    round_trip(&mut d, spread, &mut src, &mut dst, &mut rng_for(2));
    let s = d.stats();
    hal::print!("({} of {} requests bounced) ", s.bounced_requests, s.requests);
}

fn blk_scattered_buffers_bounce_in_requests_that_fit_the_pool() {
    let mut d = blk();
    let loose = dma::stats().loose_bounces;
    let mut g = rng_for(3);
    let mut src = Scattered::new(1024);
    let mut dst = Scattered::new(1024);
    // One 4 MiB call somewhere on the disk: split into pool-sized requests.
    let sectors = (4 * MIB / SECTOR_SIZE) as u64;
    let at = 1 + g.below(d.capacity() - sectors - 1);
    pattern::fill(seed(), at, &mut src);
    d.write(at, &src).unwrap();
    d.read(at, &mut dst).unwrap();
    assert_eq!(pattern::check(seed(), at, &dst), Ok(()), "4 MiB at sector {at}");
    // Random sizes at random sub-page offsets of the buffer, random places on the disk.
    for _ in 0..64 {
        let n = 1 + g.below(600) as usize;
        let off = g.below((src.len() - n * SECTOR_SIZE) as u64) as usize;
        let sector = g.below(d.capacity() - n as u64);
        let (a, b) = (&mut src[off..off + n * SECTOR_SIZE], &mut dst[off..off + n * SECTOR_SIZE]);
        pattern::fill(seed() ^ 1, sector, a);
        d.write(sector, a).unwrap();
        b.fill(0);
        d.read(sector, b).unwrap();
        if let Err(m) = pattern::check(seed() ^ 1, sector, b) {
            panic!("{n} sectors at {sector} from buffer offset {off}: {m}");
        }
    }
    let (s, p) = (d.stats(), d.pool_stats());
    assert!(s.bounced_requests >= (4 * MIB / d.max_bounced_request()) as u64, "{s:?}");
    assert!(s.largest_request <= virtio::blk::MAX_DIRECT_REQUEST);
    assert!(p.high_water <= p.capacity, "{p:?}");
    assert_eq!(p.overflows, 0, "no request outgrew the pool: {p:?}");
    assert_eq!(dma::stats().loose_bounces, loose, "nothing bounced outside the pool");
    assert_eq!(p.live, 0);
    hal::print!(
        "({} of {} requests bounced, pool high water {} of {} KiB, {} MiB copied in, {} MiB out) ",
        s.bounced_requests,
        s.requests,
        p.high_water >> 10,
        p.capacity >> 10,
        p.bytes_in >> 20,
        p.bytes_out >> 20
    );
}

// ----- virtio-rng -----

fn rng_bytes_are_not_all_equal() {
    let mut r = Rng::open_first().unwrap_or_else(|e| panic!("virtio-rng: {e}"));
    let mut a = vec![0u8; 4096];
    r.fill(&mut a).unwrap();
    assert!(a.iter().any(|&b| b != a[0]), "4096 equal bytes");
    let mut s = Scattered::new(3);
    let b = &mut s[100..100 + 2 * PAGE_SIZE];
    r.fill(b).unwrap();
    assert!(b.iter().any(|&x| x != b[0]), "scattered buffer: all equal");
    assert_ne!(&a[..64], &b[..64], "two reads gave the same bytes");
    hal::print!("({}) ", virtio::Hex(&a[..8]));
}

// ----- bench -----

fn bench_sequential_throughput() {
    let mut d = blk();
    let cap_bytes = d.capacity() * SECTOR_SIZE as u64;
    let total = (32 * MIB as u64).min(cap_bytes / 2);
    // A contiguous 1 MiB buffer (one buddy block) in 1 MiB and 64 KiB calls, a vmalloc'd
    // one (shared in place where its frames are consecutive), and a scattered one (every
    // request bounced).
    let frames = memory::buddy::Frames::alloc(8).unwrap();
    // SAFETY: the block is 1 MiB of RAM in the linear map, owned by `frames` for this scope.
    let contiguous = unsafe { core::slice::from_raw_parts_mut(frames.virt().as_mut_ptr::<u8>(), MIB) };
    let mut v = VBox::zeroed(MIB).unwrap();
    let mut s = Scattered::new(256);
    hal::println!();
    let mut run = |what: &str, buf: &mut [u8]| {
        let r = virtio::bench(&mut d, 1, total, buf, 3).unwrap();
        hal::println!("  virtio-blk bench: {what}: {r}");
    };
    run("contiguous (buddy block)", contiguous);
    run("contiguous (buddy block)", &mut contiguous[..64 << 10]);
    run("vmalloc'd (VBox)", &mut v);
    run("scattered (vmap, frames in reverse)", &mut s);
    hal::print!("  ");
}

// ----- persistence -----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Write, then verify in the same boot.
    Both,
    Write,
    Verify,
}

fn phase() -> Phase {
    match hal::boot::boot_info().and_then(|i| i.cmdline().get("virtio.phase")) {
        Some("write") => Phase::Write,
        Some("verify") => Phase::Verify,
        None => Phase::Both,
        Some(other) => panic!("virtio.phase={other}: expected write or verify"),
    }
}

fn persistence_across_boots() {
    let mut d = blk();
    let spread = persist::layout(d.capacity(), 0).unwrap();
    if phase() != Phase::Verify {
        let st = persist::write_stamped(&mut d, seed(), 1, spread).unwrap();
        log::info!(
            "virtio-blk: wrote {} KiB in {} extents across the disk (seed {:#x}) for the next boot",
            spread.bytes() >> 10,
            spread.count,
            st.seed
        );
    }
    if phase() != Phase::Write {
        // A fresh driver on the device, as after a reboot.
        drop(d);
        d = blk();
        let when =
            if phase() == Phase::Verify { "of the previous boot" } else { "written above, read by a new driver," };
        match persist::verify_stamped(&mut d) {
            Ok(st) => log::info!(
                "virtio-blk: data {when} verified (seed {:#x}, {} KiB in {} extents): nothing lost",
                st.seed,
                st.spread.bytes() >> 10,
                st.spread.count
            ),
            Err(e @ PersistError::Stamp(_)) => panic!("no data from a previous boot: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}

// ----- baseline -----

fn workload() {
    let mut d = blk();
    let mut r = Rng::open_first().unwrap();
    let mut s = Scattered::new(64);
    r.fill(&mut s[..1000]).unwrap();
    let mut v = VBox::zeroed(300 * 1024).unwrap();
    pattern::fill(seed(), 100, &mut v);
    d.write(100, &v).unwrap();
    d.read(100, &mut s[8..8 + 200 * 1024]).unwrap();
    assert_eq!(pattern::check(seed(), 100, &s[8..8 + 200 * 1024]), Ok(()));
    let mut h = vec![0u8; 64 * 1024];
    d.read(100, &mut h).unwrap();
    drop((d, r, s, v, h));
    kernel::purge();
}

/// Buddy free pages + the table pages the vmalloc windows keep + slab pages (after a
/// shrink), and the vmallocinfo text.
fn snapshot() -> (usize, usize, alloc::string::String) {
    memory::slab::shrink();
    let mut info = alloc::string::String::new();
    kernel::write_vmallocinfo(&mut info).unwrap();
    let free = free_pages() + kernel::vmalloc_table_pages();
    (free, memory::slab::stats().unwrap().slab_pages, info)
}

fn devices_dropped_and_purged_leave_no_trace() {
    // The first round may grow what stays (the claim list, vmalloc's spare records).
    workload();
    let before = snapshot();
    let dma_before = dma::stats();
    workload();
    let after = snapshot();
    // Pages may move between the slab and the buddy (vmalloc trims its spare records, kept
    // in the slab, adaptively), so the two are summed.
    assert_eq!(
        after.0 + after.1,
        before.0 + before.1,
        "buddy free pages + kept table pages + slab pages: before {:?}, after {:?}",
        (before.0, before.1),
        (after.0, after.1)
    );
    assert_eq!(after.2, before.2, "vmallocinfo");
    let s = dma::stats();
    assert_eq!((s.pools, s.loose_live, s.dma_blocks_live), (0, 0, 0), "{s:?}");
    assert_eq!(s.dma_alloc_failures, dma_before.dma_alloc_failures);
    hal::print!(
        "({} free pages, {} table pages kept) ",
        after.0 - kernel::vmalloc_table_pages(),
        kernel::vmalloc_table_pages()
    );
}

// ----- main -----

hal::entry!(main);

fn main(info: &'static hal::boot::BootInfo) -> ! {
    tests::init_memory(info);
    let require = info.cmdline().get_bool("virtio.require").ok().flatten().unwrap_or(false);
    let (mut has_blk, mut has_rng) = (false, false);
    let mut rng = None;
    for d in virtio::probe_devices(false) {
        match d.device_type() {
            DeviceType::Block => has_blk = true,
            DeviceType::EntropySource if rng.is_none() => {
                has_rng = true;
                rng = Rng::new(d).ok();
            }
            _ => {}
        }
    }
    let (seed, source) = virtio::seed(rng.as_mut());
    drop(rng);
    SEED.call_once(|| seed);
    hal::println!("virtio tests: seed {seed} ({source}); replay with seed={seed}");

    let always = [
        test!(transports_are_found_and_empty_slots_skipped_quietly),
        test!(a_transport_with_a_bad_header_is_refused_clearly),
        test!(mmio_phys_to_virt_maps_device_registers),
        test!(dma_alloc_gives_zeroed_contiguous_blocks_of_the_right_order),
        test!(share_is_in_place_when_contiguous_and_bounces_otherwise),
        test!(an_idle_pool_is_given_back_under_pressure_and_taken_again_on_enter),
        test!(a_missing_device_is_a_clear_error_and_the_boot_job_carries_on),
    ];
    let blk_tests = [
        test!(blk_reports_capacity_and_refuses_bad_requests),
        test!(blk_round_trip_4_mib_across_the_disk_from_the_heap),
        test!(blk_round_trip_4_mib_across_the_disk_from_vmalloc),
        test!(blk_scattered_buffers_bounce_in_requests_that_fit_the_pool),
        test!(bench_sequential_throughput),
    ];
    let rng_tests = [test!(rng_bytes_are_not_all_equal)];
    let both = [test!(devices_dropped_and_purged_leave_no_trace)];
    let persistence = test!(persistence_across_boots);

    let mut list: Vec<Test> = Vec::new();
    let mut skipped = 0;
    let phase = phase();
    let want_blk = has_blk || require;
    // The persistence data must outlive this boot's other writes: verified first, written last.
    if want_blk && phase == Phase::Verify {
        list.push(persistence);
    }
    list.extend(always);
    for (want, tests) in
        [(want_blk, &blk_tests[..]), (has_rng || require, &rng_tests), ((has_blk && has_rng) || require, &both)]
    {
        if want {
            list.extend_from_slice(tests);
        } else {
            skipped += tests.len();
        }
    }
    if want_blk && phase != Phase::Verify {
        list.push(persistence);
    } else if !want_blk {
        skipped += 1;
    }
    if skipped > 0 {
        hal::println!(
            "({skipped} tests need -device virtio-blk-device / virtio-rng-device and are skipped: tools/test-virtio runs them)"
        );
    }
    tests::run(&list)
}
