//! ioremap on the simulated MMU (`LockedVmalloc<SimBackend>`, whose RAM is
//! `[FRAME_BASE, FRAME_BASE + frames pages)`): offset handling, every refusal, iounmap misuse,
//! the lazy purge, the owned handle, and register blocks at checked offsets — the last also
//! against a fake device in host memory, so register reads and writes really happen.

use core::cell::Cell;
use std::alloc::{alloc_zeroed, dealloc, Layout};

use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::ioremap::tock_registers::interfaces::{ReadWriteable, Readable, Writeable};
use memory::ioremap::tock_registers::registers::{ReadOnly, ReadWrite};
use memory::ioremap::tock_registers::{register_bitfields, register_structs};
use memory::ioremap::{
    covering_range, DeviceAttr, IoMem, IoSpace, IoremapError, MappedIoSpace, Mmio, RegisterBlock, RegsError, PHYS_LIMIT,
};
use memory::vmalloc::sim::SimBackend;
use memory::vmalloc::{AreaKind, LockedVmalloc, Prot, VmFlags, Vmalloc, VmallocConfig};

const BASE: u64 = 0xffff_8000_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;
/// Simulated RAM: `[RAM, RAM_END)`.
const RAM: u64 = SimBackend::FRAME_BASE;
const FRAMES: usize = 256;
const RAM_END: u64 = RAM + FRAMES as u64 * PAGE;
const UART: u64 = 0x0900_0000;
const NGNRE: DeviceAttr = DeviceAttr::DeviceNGnRE;

fn new_space(pages: u64) -> LockedVmalloc<SimBackend> {
    let range = VirtRange::new(VirtAddr::new(BASE), pages * PAGE).unwrap();
    LockedVmalloc::new(Vmalloc::new(SimBackend::new(range, FRAMES), range, VmallocConfig::default()).unwrap())
}

/// What a refused call must leave unchanged: areas, parked ranges, holes, PTEs, frames, the
/// vmallocinfo text.
fn state(lv: &LockedVmalloc<SimBackend>) -> (usize, usize, usize, usize, usize, usize, String) {
    let vm = lv.lock();
    let s = vm.stats();
    let c = vm.backend().counters;
    (s.live_areas, s.mapped_pages, s.parked_areas, s.free_holes, c.mapped, c.frames_in_use, vm.info().to_string())
}

fn violations(lv: &LockedVmalloc<SimBackend>) -> u64 {
    lv.lock().backend().counters.violations
}

#[test]
fn the_sub_page_offset_is_kept_and_whole_pages_are_mapped() {
    let lv = new_space(1024);
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let (io, line) = (unsafe { IoMem::map_in(&lv, PhysAddr::new(UART + 4), 4, NGNRE) }.unwrap(), line!());
    assert_eq!(io.addr().page_offset(), 4, "ioremap(0x0900_0004, 4) -> base + 4");
    assert_eq!((io.phys(), io.len(), io.attr()), (PhysAddr::new(UART + 4), 4, NGNRE));
    assert_eq!(lv.vmalloc_to_phys(io.addr()), Some(PhysAddr::new(UART + 4)));
    let a = lv.find_area(io.addr()).unwrap();
    assert_eq!(
        (a.kind, a.start, a.addr, a.pages, a.size),
        (AreaKind::Ioremap, io.addr().page_down(), io.addr(), 1, 2 * PAGE)
    );
    assert_eq!(a.phys, Some(PhysAddr::new(UART)), "phys= is the page base");
    assert_eq!((a.caller.file(), a.caller.line()), (file!(), line), "the driver's line, through IoSpace");
    assert!(lv.lock().backend().pte(io.addr()).unwrap().1, "mapped as device memory");
    assert!(lv.lock().backend().pte(a.start.add(PAGE)).is_none(), "guard page unmapped");

    // Straddling a page boundary: two pages, offset kept.
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let s = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART + 0xffc), 8, DeviceAttr::DeviceNGnRnE) }.unwrap();
    assert_eq!(s.addr().page_offset(), 0xffc);
    assert_eq!(lv.find_area(s.addr()).unwrap().pages, 2);
    assert_eq!(lv.vmalloc_to_phys(s.addr().add(4)), Some(PhysAddr::new(UART + 0x1000)));
    // Unaligned start and length: every page touched, no more.
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let u = unsafe { IoMem::map_in(&lv, PhysAddr::new(0x0a00_0123), 0x3000, DeviceAttr::NormalNonCacheable) }.unwrap();
    assert_eq!((u.addr().page_offset(), lv.find_area(u.addr()).unwrap().pages), (0x123, 4));
    assert_eq!(lv.vmalloc_to_phys(u.addr().add(0x2fff)), Some(PhysAddr::new(0x0a00_3122)));

    let info = lv.lock().info().to_string();
    assert!(info.contains("phys=0x0000000009000000 ioremap"), "{info}");
    assert!(info.contains("phys=0x000000000a000000 ioremap"), "{info}");
    assert_eq!(lv.lock().backend().counters.frames_in_use, 0, "ioremap takes no frames");
    drop((io, s, u));
    lv.purge();
    assert_eq!(lv.stats().live_areas, 0);
    assert_eq!(lv.lock().backend().counters.mapped, 0);
    lv.lock().check().unwrap();
    assert_eq!(violations(&lv), 0);
}

#[test]
fn every_refusal_is_typed_and_changes_nothing() {
    let lv = new_space(1024);
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let keep = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x1000, NGNRE) }.unwrap();
    let before = state(&lv);
    let s = &lv;
    let refused = [
        (UART, 0, IoremapError::ZeroSize, "zero size"),
        (u64::MAX - 8, 100, IoremapError::Overflow, "end past 2^64"),
        (u64::MAX - 0xfff, 1, IoremapError::Overflow, "end rounds up to 2^64"),
        (UART, usize::MAX, IoremapError::Overflow, "size of usize::MAX"),
        (PHYS_LIMIT - 0x800, 0x1000, IoremapError::PhysTooHigh, "last page above 48 bits"),
        (PHYS_LIMIT, 4, IoremapError::PhysTooHigh, "above 48 bits"),
        (RAM, 4, IoremapError::Ram, "first page of RAM"),
        (RAM + 17 * PAGE + 8, 64, IoremapError::Ram, "inside RAM"),
        (RAM_END - PAGE, PAGE_SIZE, IoremapError::Ram, "last page of RAM"),
        (RAM - PAGE, 2 * PAGE_SIZE, IoremapError::Ram, "last page is RAM (Linux checks only the first)"),
        (RAM - 0x10, 0x20, IoremapError::Ram, "a few bytes below RAM and into it"),
        (RAM - 0x10_0000, 0x10_0001, IoremapError::Ram, "1 MiB below RAM, one byte into it"),
        (RAM_END - 4, 8, IoremapError::Ram, "first page RAM, last page not"),
        (RAM - PAGE, (RAM_END - RAM + 2 * PAGE) as usize, IoremapError::Ram, "around the whole of RAM"),
        (0x1_0000_0000, 8 << 20, IoremapError::TooLarge, "larger than the window"),
    ];
    for (phys, size, err, why) in refused {
        assert_eq!(
            // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
            unsafe { IoMem::map_in(s, PhysAddr::new(phys), size, NGNRE) }.map(|io| io.addr()),
            Err(err),
            "{why}"
        );
        assert_eq!(s.map_io(PhysAddr::new(phys), size, NGNRE), Err(err), "{why} (map_io)");
        assert_eq!(state(&lv), before, "{why}: refused, but something changed");
    }
    assert_eq!(covering_range(PhysAddr::new(RAM - 0x10), 0x20).unwrap().pages(), 2);
    // Right next to RAM on either side is not RAM.
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let below = unsafe { IoMem::map_in(s, PhysAddr::new(RAM - PAGE), PAGE_SIZE, NGNRE) }.unwrap();
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let above = unsafe { IoMem::map_in(s, PhysAddr::new(RAM_END), PAGE_SIZE, NGNRE) }.unwrap();
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let top = unsafe { IoMem::map_in(s, PhysAddr::new(PHYS_LIMIT - 4), 4, NGNRE) }.unwrap();
    assert_eq!(top.addr().page_offset(), 0xffc, "the last bytes below 2^48 are mappable");
    drop((below, above, top, keep));
    lv.purge();
    lv.lock().check().unwrap();
    assert_eq!(violations(&lv), 0);
}

#[test]
fn running_out_of_virtual_space_is_typed() {
    // 8 pages: three 1-page mappings (+ guard) fit, the fourth does not, even after a purge.
    let lv = new_space(8);
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let io: Vec<_> =
        (0..3).map(|i| unsafe { IoMem::map_in(&lv, PhysAddr::new(UART + i * PAGE), 8, NGNRE) }.unwrap()).collect();
    let before = state(&lv);
    assert_eq!(
        // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
        unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 2 * PAGE_SIZE, NGNRE) }.err(),
        Some(IoremapError::NoVirtualSpace)
    );
    assert_eq!(state(&lv), before);
    drop(io);
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    assert!(unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 2 * PAGE_SIZE, NGNRE) }.is_ok(), "purged on exhaustion");
}

#[test]
fn iounmap_misuse_is_refused_and_changes_nothing() {
    let lv = new_space(1024);
    let s = &lv;
    let io = s.map_io(PhysAddr::new(UART + 8), 4, NGNRE).unwrap();
    let v = lv.vmalloc(PAGE_SIZE).unwrap();
    // SAFETY: the frames are the test's own (allocated to it) and outlive the mapping.
    let m = unsafe { lv.vmap_with(&[PhysAddr::new(RAM + 5 * PAGE)], Prot::ReadWrite, VmFlags::NONE) }.unwrap();
    let before = state(&lv);
    assert_eq!(s.unmap_io(v), Err(IoremapError::NotIoremap), "a vmalloc pointer");
    assert_eq!(s.unmap_io(m), Err(IoremapError::NotIoremap), "a vmap pointer");
    assert_eq!(s.unmap_io(io.page_down()), Err(IoremapError::NotMapped), "the page base, not the address given");
    assert_eq!(s.unmap_io(io.add(4)), Err(IoremapError::NotMapped), "interior address");
    assert_eq!(s.unmap_io(VirtAddr::new(BASE + 700 * PAGE)), Err(IoremapError::NotMapped), "never mapped");
    assert_eq!(s.unmap_io(VirtAddr::new(0x4000_0000)), Err(IoremapError::NotMapped), "outside the window");
    assert_eq!(state(&lv), before);
    s.unmap_io(io).unwrap();
    let parked = state(&lv);
    assert_eq!(s.unmap_io(io), Err(IoremapError::AlreadyUnmapped), "twice (parked)");
    assert_eq!(state(&lv), parked);
    lv.purge();
    assert_eq!(s.unmap_io(io), Err(IoremapError::AlreadyUnmapped), "twice (purged, still remembered)");
    // The other kinds' free calls refuse an ioremap pointer too.
    let io2 = s.map_io(PhysAddr::new(UART), 4, NGNRE).unwrap();
    assert!(lv.vfree(io2).is_err() && lv.vunmap(io2).is_err());
    s.unmap_io(io2).unwrap();
    lv.vfree(v).unwrap();
    lv.vunmap(m).unwrap();
    assert_eq!(violations(&lv), 0);
}

#[test]
fn iounmap_goes_through_the_lazy_purge() {
    let lv = new_space(1024);
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let io = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x1000, NGNRE) }.unwrap();
    let start = io.addr();
    let (tlbis, fulls) = {
        let c = lv.lock().backend().counters;
        (c.page_tlbis, c.full_flushes)
    };
    io.unmap().unwrap();
    let s = lv.stats();
    assert_eq!((s.live_areas, s.parked_areas, s.parked_pages, s.parked_mapped_pages), (0, 1, 2, 1));
    {
        let vm = lv.lock();
        let c = vm.backend().counters;
        assert_eq!((c.mapped, c.page_tlbis, c.full_flushes), (0, tlbis, fulls), "PTE cleared, no TLBI yet");
        let info = vm.info().to_string();
        assert!(info.ends_with("    8192 unpurged vm_area\n"), "{info}");
    }
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let next = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x1000, NGNRE) }.unwrap();
    assert_ne!(next.addr(), start, "a parked range is not reused before its flush");
    drop(next);
    lv.purge();
    let c = lv.lock().backend().counters;
    assert_eq!(c.page_tlbis + c.full_flushes, tlbis + fulls + 2, "one flush of the 2 mapped pages");
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let again = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x1000, NGNRE) }.unwrap();
    assert_eq!(again.addr(), start, "after the purge the lowest hole is the first range");
    drop(again);
    assert_eq!(violations(&lv), 0);
}

#[test]
fn the_handle_unmaps_on_drop_and_leaks_on_request() {
    let lv = new_space(1024);
    {
        // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
        let _io = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x1000, NGNRE) }.unwrap();
        assert_eq!(lv.stats().live_areas, 1);
    }
    assert_eq!((lv.stats().live_areas, lv.stats().parked_areas), (0, 1), "dropped: unmapped, parked");
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let leaked = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x1000, NGNRE) }.unwrap().leak();
    assert_eq!(lv.stats().live_areas, 1, "leaked: kept");
    assert_eq!(lv.find_area(leaked).unwrap().kind, AreaKind::Ioremap);
    // Still the handle's (OWNED): a plain iounmap is refused; only the owner's path frees it.
    assert_eq!((&lv).unmap_io(leaked), Err(IoremapError::Vmalloc(memory::vmalloc::VmallocError::Owned)));
    // SAFETY: the leaked handle is gone and nothing refers into the mapping.
    unsafe { (&lv).unmap_io_owned(leaked) }.unwrap();
    // A typed handle refuses a misaligned block and undoes its mapping.
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let e = unsafe { Mmio::<ReadWrite<u32>, _>::map_in(&lv, PhysAddr::new(UART + 2), NGNRE) }.unwrap_err();
    assert!(matches!(e, IoremapError::Regs(RegsError::Misaligned { align: 4, .. })), "{e:?}");
    assert_eq!(lv.stats().live_areas, 0, "the refused Mmio was unmapped");
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let m = unsafe { Mmio::<[ReadOnly<u32>; 4], _>::map_in(&lv, PhysAddr::new(UART + 0xfe0), NGNRE) }.unwrap();
    assert_eq!((m.io().len(), m.io().addr().page_offset()), (16, 0xfe0));
    let io = m.into_io();
    assert_eq!(lv.stats().live_areas, 1);
    drop(io);
    assert_eq!(lv.stats().live_areas, 0);
    assert_eq!(violations(&lv), 0);
}

#[test]
fn register_offsets_are_bounded_and_aligned() {
    let lv = new_space(1024);
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let io = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART), 0x20, NGNRE) }.unwrap();
    let base = io.addr();
    assert_eq!(io.reg_addr::<ReadWrite<u32>>(0), Ok(base));
    assert_eq!(io.reg_addr::<ReadWrite<u32>>(0x1c), Ok(base.add(0x1c)), "last register");
    assert_eq!(io.reg_addr::<ReadWrite<u32>>(0x1d), Err(RegsError::OutOfBounds { offset: 0x1d, size: 4, len: 0x20 }));
    assert_eq!(io.reg_addr::<ReadWrite<u32>>(0x20), Err(RegsError::OutOfBounds { offset: 0x20, size: 4, len: 0x20 }));
    assert!(matches!(io.reg_addr::<ReadWrite<u32>>(usize::MAX - 1), Err(RegsError::OutOfBounds { .. })));
    assert_eq!(io.reg_addr::<ReadWrite<u32>>(2), Err(RegsError::Misaligned { addr: base.add(2), align: 4 }));
    assert_eq!(io.reg_addr::<[ReadOnly<u32>; 8]>(0), Ok(base), "the whole mapping");
    assert!(matches!(io.reg_addr::<[ReadOnly<u32>; 8]>(4), Err(RegsError::OutOfBounds { .. })));
    // The check is against the bytes asked for, not the page mapped.
    assert!(matches!(io.reg_addr::<ReadOnly<u32>>(0x100), Err(RegsError::OutOfBounds { len: 0x20, .. })));

    // With a sub-page offset, alignment is that of the real address.
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let off = unsafe { IoMem::map_in(&lv, PhysAddr::new(UART + 4), 0x10, NGNRE) }.unwrap();
    assert_eq!(off.reg_addr::<ReadWrite<u64>>(0), Err(RegsError::Misaligned { addr: off.addr(), align: 8 }));
    assert_eq!(off.reg_addr::<ReadWrite<u64>>(4), Ok(off.addr().add(4)));
    assert_eq!(off.reg_addr::<ReadWrite<u8>>(0xf), Ok(off.addr().add(0xf)));
}

// ----- a fake device in host memory: registers really read and written -----

/// One page of "device registers" in host memory, handed out by [`FakeBus`] at
/// `DEV..DEV + PAGE`.
#[repr(C, align(4096))]
struct DevicePage([u32; 1024]);

const DEV: u64 = 0x0c00_0000;

struct FakeBus {
    page: *mut DevicePage,
    maps: Cell<usize>,
    unmaps: Cell<usize>,
}

impl FakeBus {
    fn new() -> Self {
        let layout = Layout::new::<DevicePage>();
        // SAFETY: the layout is non-zero-sized.
        let page = unsafe { alloc_zeroed(layout) }.cast::<DevicePage>();
        assert!(!page.is_null());
        Self { page, maps: Cell::new(0), unmaps: Cell::new(0) }
    }

    fn word(&self, offset: usize) -> u32 {
        // SAFETY: `offset` is a word inside the page we own; registers are written with
        // volatile stores, so read them the same way.
        unsafe { self.page.cast::<u32>().add(offset / 4).read_volatile() }
    }

    fn set_word(&self, offset: usize, v: u32) {
        // SAFETY: as in `word`.
        unsafe { self.page.cast::<u32>().add(offset / 4).write_volatile(v) }
    }
}

impl Drop for FakeBus {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every IoMem borrowing the bus is gone.
        unsafe { dealloc(self.page.cast(), Layout::new::<DevicePage>()) }
    }
}

impl IoSpace for &FakeBus {
    fn map_io(&self, phys: PhysAddr, size: usize, _attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
        let range = covering_range(phys, size)?;
        if range.start().as_u64() < DEV || range.end().as_u64() > DEV + PAGE {
            return Err(IoremapError::NoDevice);
        }
        self.maps.set(self.maps.get() + 1);
        Ok(VirtAddr::from_ptr(self.page).add(phys.as_u64() - DEV))
    }

    fn unmap_io(&self, _addr: VirtAddr) -> Result<(), IoremapError> {
        self.unmaps.set(self.unmaps.get() + 1);
        Ok(())
    }

    fn io_ptr(&self, addr: VirtAddr) -> *mut u8 {
        // Derived from the page's pointer (provenance kept), not cast from the address.
        let off = addr.as_u64() - VirtAddr::from_ptr(self.page).as_u64();
        self.page.cast::<u8>().wrapping_add(off as usize)
    }
}

// SAFETY: the addresses handed out are inside the bus's page, which lives as long as the
// bus, and every `IoMem` over `&FakeBus` borrows it.
unsafe impl MappedIoSpace for &FakeBus {}

register_bitfields![u32,
    FR [
        RXFE OFFSET(4) NUMBITS(1) [],
        TXFF OFFSET(5) NUMBITS(1) []
    ],
    CR [
        UARTEN OFFSET(0) NUMBITS(1) [],
        TXE OFFSET(8) NUMBITS(1) []
    ]
];

register_structs! {
    /// The PL011 registers a minimal driver uses.
    Pl011 {
        (0x000 => dr: ReadWrite<u32>),
        (0x004 => _reserved0),
        (0x018 => fr: ReadOnly<u32, FR::Register>),
        (0x01c => _reserved1),
        (0x030 => cr: ReadWrite<u32, CR::Register>),
        (0x034 => @END),
    }
}

// SAFETY: every field is a tock-registers register or padding never read, at the PL011's
// offsets (checked by register_structs!).
unsafe impl RegisterBlock for Pl011 {}

register_structs! {
    /// PrimeCell identification registers.
    PrimeCellId {
        (0x00 => periph: [ReadOnly<u32>; 4]),
        (0x10 => cell: [ReadOnly<u32>; 4]),
        (0x20 => @END),
    }
}

// SAFETY: as for `Pl011`.
unsafe impl RegisterBlock for PrimeCellId {}

#[test]
fn register_blocks_read_and_write_the_device() {
    let bus = FakeBus::new();
    bus.set_word(0x18, 1 << 4); // FR: RX FIFO empty
    for (i, b) in [0x11u32, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1].into_iter().enumerate() {
        bus.set_word(0xfe0 + 4 * i, b);
    }
    {
        // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
        let io = unsafe { IoMem::map_in(&bus, PhysAddr::new(DEV), 0x1000, NGNRE) }.unwrap();
        let uart = io.regs::<Pl011>(0).unwrap();
        assert!(uart.fr.is_set(FR::RXFE) && !uart.fr.is_set(FR::TXFF));
        uart.dr.set(u32::from(b'A'));
        uart.cr.modify(CR::UARTEN::SET + CR::TXE::SET);
        assert_eq!((bus.word(0), bus.word(0x30)), (u32::from(b'A'), 0x101));
        let id = io.regs::<PrimeCellId>(0xfe0).unwrap();
        let cell = id.cell.iter().enumerate().fold(0u32, |a, (i, r)| a | (r.get() & 0xff) << (8 * i));
        assert_eq!(cell, 0xb105_f00d, "PrimeCell ID");
        assert_eq!(id.periph[0].get(), 0x11);
        assert!(matches!(io.regs::<PrimeCellId>(0xfe4), Err(RegsError::OutOfBounds { .. })));
        assert!(matches!(io.regs::<Pl011>(2), Err(RegsError::Misaligned { .. })));
        let one = io.regs::<ReadWrite<u32>>(0x30).unwrap();
        one.set(0);
        assert_eq!(bus.word(0x30), 0);
    }
    assert_eq!((bus.maps.get(), bus.unmaps.get()), (1, 1), "unmapped on drop");

    // Mmio: one block, dereferenced; the offset inside the page kept.
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let id: Mmio<PrimeCellId, _> = unsafe { Mmio::map_in(&bus, PhysAddr::new(DEV + 0xfe0), NGNRE) }.unwrap();
    assert_eq!(id.io().addr(), VirtAddr::from_ptr(bus.page).add(0xfe0));
    assert_eq!(id.cell[3].get(), 0xb1);
    drop(id);
    assert_eq!(bus.unmaps.get(), 2);
    assert_eq!(
        // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
        unsafe { Mmio::<PrimeCellId, _>::map_in(&bus, PhysAddr::new(DEV + 0xff0), NGNRE) }.map(|_| ()),
        Err(IoremapError::NoDevice),
        "the bus refuses a block past its page"
    );
}
