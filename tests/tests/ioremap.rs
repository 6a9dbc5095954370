//! ioremap on target, with the real MMU and QEMU virt's devices: the console moved to an
//! ioremap'd PL011 and printing through it, the GIC distributor's GICD_TYPER read through a
//! tock-registers block, the PL011's PrimeCell ID read through each memory type, every
//! refusal (RAM on any page, zero size, overflow), iounmap misuse, the lazy purge and guard
//! page, and a thousand ioremap/iounmap cycles that leave no trace.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use hal::mmu::MemoryType;
use hal::{probe, PhysAddr, PhysRange, VirtAddr, PAGE_SIZE};
use memory::ioremap::tock_registers::interfaces::Readable;
use memory::ioremap::tock_registers::register_structs;
use memory::ioremap::tock_registers::registers::ReadOnly;
use memory::ioremap::{self, DeviceAttr, IoMem, IoremapError, Mmio, RegisterBlock, PHYS_LIMIT};
use memory::kernel;
use memory::vmalloc::AreaKind;
use tests::test;

const PAGE: u64 = PAGE_SIZE as u64;

register_structs! {
    /// PrimeCell identification registers (offset 0xfe0 of a PL011).
    PrimeCellId {
        (0x00 => periph: [ReadOnly<u32>; 4]),
        (0x10 => cell: [ReadOnly<u32>; 4]),
        (0x20 => @END),
    }
}

// SAFETY: only tock-registers registers, at the PrimeCell offsets (checked by the macro).
unsafe impl RegisterBlock for PrimeCellId {}

register_structs! {
    /// The PL011 flag register block (DR..FR).
    Pl011Flags {
        (0x00 => _data),
        (0x18 => fr: ReadOnly<u32>),
        (0x1c => @END),
    }
}

// SAFETY: as for `PrimeCellId`; the padding is never read.
unsafe impl RegisterBlock for Pl011Flags {}

fn info() -> &'static hal::boot::BootInfo {
    hal::boot::boot_info().expect("booted")
}

fn uart() -> PhysRange {
    info().platform.uart.expect("QEMU virt has a PL011")
}

fn vmallocinfo() -> String {
    let mut s = String::new();
    kernel::write_vmallocinfo(&mut s).unwrap();
    s
}

fn memory_type(va: VirtAddr) -> MemoryType {
    let space = hal::kmap::kernel_space().unwrap();
    let t = space.lock().upper().translate(va).expect("mapped");
    t.attributes.expect("attributes this module writes").memory_type()
}

fn primecell_id(id: &PrimeCellId) -> (u32, u32) {
    let pack =
        |regs: &[ReadOnly<u32>; 4]| regs.iter().enumerate().fold(0u32, |a, (i, r)| a | (r.get() & 0xff) << (8 * i));
    (pack(&id.periph), pack(&id.cell))
}

fn live_areas() -> usize {
    kernel::vmalloc_stats().unwrap().live_areas
}

fn console_switches_to_an_ioremap_mapping() {
    // The runner's init may have switched already (then the call returns that mapping).
    let (old, switched) = (hal::console::base(), ioremap::console_mapping());
    let va = ioremap::switch_console_to_ioremap(info()).unwrap();
    assert!(kernel::is_vmalloc_addr(va), "{va:#x}");
    match switched {
        None => assert_ne!(va.as_usize(), old, "moved off the boot mapping"),
        Some(s) => assert_eq!((s.as_usize(), old), (va.as_usize(), va.as_usize())),
    }
    assert_eq!(hal::console::base(), va.as_usize(), "the console writes through the ioremap");
    assert_eq!(va.page_offset(), uart().start().page_offset());
    hal::print!("(printed through the ioremap'd PL011 at {va:#x}) ");
    log::info!("logger line through the ioremap'd console");
    let a = kernel::find_area(va).unwrap();
    assert_eq!((a.kind, a.phys), (AreaKind::Ioremap, Some(uart().start().page_down())));
    assert_eq!(memory_type(va), MemoryType::DeviceNGnRE);
    let text = vmallocinfo();
    let line = text.lines().find(|l| l.starts_with(&alloc::format!("0x{:016x}-", a.start.as_u64()))).unwrap();
    assert!(line.ends_with("phys=0x0000000009000000 ioremap"), "{line}");
    let live = live_areas();
    assert_eq!(ioremap::switch_console_to_ioremap(info()), Ok(va), "second call: same mapping");
    assert_eq!(live_areas(), live, "nothing mapped again");
    assert_eq!(ioremap::console_mapping(), Some(va));
}

fn gic_distributor_typer_is_plausible() {
    let gic = ioremap::probe_gic(info()).unwrap();
    hal::print!("({gic}) ");
    let dist = info().platform.gic_distributor.unwrap();
    assert_eq!(gic.phys, dist.start());
    assert!(gic.lines >= 64 && gic.lines <= 1024, "{gic}");
    assert_eq!(gic.lines % 32, 0);
    assert!((1..=8).contains(&gic.cpus), "{gic}");
    assert_eq!(gic.lines, 32 * ((gic.typer & 0x1f) + 1));
    assert!(kernel::is_vmalloc_addr(gic.base));
    assert_eq!(memory_type(gic.base), MemoryType::DeviceNGnRE);
    let a = kernel::find_area(gic.base).unwrap();
    assert_eq!((a.kind, a.phys, a.bytes), (AreaKind::Ioremap, Some(dist.start()), gic.size));
    let text = vmallocinfo();
    let line = text.lines().find(|l| l.starts_with(&alloc::format!("0x{:016x}-", a.start.as_u64()))).unwrap();
    assert!(line.ends_with("phys=0x0000000008000000 ioremap"), "{line}");
    let live = live_areas();
    assert_eq!(ioremap::probe_gic(info()), Ok(gic), "second call: same answer");
    assert_eq!(live_areas(), live);
    assert_eq!(ioremap::gic_info(), Some(gic));
}

fn uart_id_reads_through_each_memory_type() {
    let base = uart().start();
    for (attr, ty) in [
        (DeviceAttr::DeviceNGnRE, MemoryType::DeviceNGnRE),
        (DeviceAttr::DeviceNGnRnE, MemoryType::DeviceNGnRnE),
        (DeviceAttr::NormalNonCacheable, MemoryType::NormalNonCacheable),
    ] {
        // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
        let io = unsafe { IoMem::with_attr(base, 0x1000, attr) }.unwrap();
        assert_eq!(memory_type(io.addr()), ty);
        let (periph, cell) = primecell_id(io.regs::<PrimeCellId>(0xfe0).unwrap());
        assert_eq!(cell, 0xb105_f00d, "PrimeCell ID through {attr:?}");
        assert_eq!(periph & 0x000f_ffff, 0x0004_1011, "PL011 part 0x011 by Arm through {attr:?}");
        let fr = io.regs::<Pl011Flags>(0).unwrap().fr.get();
        assert_eq!(fr & (1 << 5), 0, "TX FIFO not full: the console is draining");
    }
    // The free functions and the typed handle keep the sub-page offset.
    for (va, ty) in [
        (ioremap::ioremap(base.add(0xfe0), 0x20).unwrap(), MemoryType::DeviceNGnRE),
        (ioremap::ioremap_np(base.add(0xfe0), 0x20).unwrap(), MemoryType::DeviceNGnRnE),
        (ioremap::ioremap_wc(base.add(0xfe0), 0x20).unwrap(), MemoryType::NormalNonCacheable),
    ] {
        assert_eq!(va.page_offset(), 0xfe0);
        assert_eq!(memory_type(va), ty);
        assert_eq!(kernel::vmalloc_to_phys(va), Some(base.add(0xfe0)));
        // SAFETY: `va` maps the PL011's 32 bytes of ID registers; a volatile read has no side effect.
        assert_eq!(unsafe { va.add(0x1c).as_ptr::<u32>().read_volatile() }, 0xb1);
        ioremap::iounmap(va).unwrap();
    }
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let id: Mmio<PrimeCellId> = unsafe { Mmio::new(base.add(0xfe0)) }.unwrap();
    assert_eq!(id.io().addr().page_offset(), 0xfe0);
    assert_eq!(primecell_id(&id).1, 0xb105_f00d);
    assert!(id.io().regs::<PrimeCellId>(4).is_err(), "past the 32 bytes mapped");
}

fn ram_on_any_page_is_refused() {
    let before = kernel::vmalloc_stats().unwrap();
    let p = &info().platform;
    let mut checked = 0;
    for ram in p.ram.iter() {
        let (start, end) = (ram.start().as_u64(), ram.end().as_u64());
        let mid = start + (end - start) / 2;
        for (phys, size, why) in [
            (start, 4, "first page of RAM"),
            (mid + 12, 64, "middle of RAM"),
            (end - PAGE, PAGE_SIZE, "last page of RAM"),
            (end - 4, 8, "first page RAM, second not"),
            (start - PAGE, 2 * PAGE_SIZE, "last page is RAM"),
            (start - 0x10, 0x20, "16 bytes below RAM, 16 into it"),
            (start - (1 << 20), (1 << 20) + 1, "1 MiB below RAM, one byte into it"),
            (start - PAGE, (end - start + 2 * PAGE) as usize, "around the whole node"),
        ] {
            assert_eq!(
                ioremap::ioremap(PhysAddr::new(phys), size),
                Err(IoremapError::Ram),
                "{why}: {phys:#x}+{size:#x}"
            );
            checked += 1;
        }
    }
    // Reserved parts of RAM: the device tree, the image, /memreserve/ and /reserved-memory
    // (but `no-map` ranges, which the kernel never maps: those a driver may ioremap).
    for r in p.reserved.iter().filter(|r| !r.no_map).map(|r| r.range).chain([p.dtb, info().image.whole]) {
        assert_eq!(ioremap::ioremap(r.start(), 8), Err(IoremapError::Ram), "reserved {r:?}");
        assert_eq!(ioremap::ioremap_wc(r.start(), r.size() as usize), Err(IoremapError::Ram), "reserved {r:?}");
        checked += 2;
    }
    let after = kernel::vmalloc_stats().unwrap();
    assert_eq!((after.live_areas, after.mapped_pages), (before.live_areas, before.mapped_pages));
    assert_eq!(after.failures, before.failures + checked, "every refusal counted");
    // The page right below RAM is not RAM (mapped, never touched).
    let below = ioremap::ioremap(p.ram.iter().next().unwrap().start().checked_sub(PAGE).unwrap(), PAGE_SIZE).unwrap();
    ioremap::iounmap(below).unwrap();
}

fn zero_size_and_overflow_are_refused() {
    let before = kernel::vmalloc_stats().unwrap();
    let u = uart().start();
    assert_eq!(ioremap::ioremap(u, 0), Err(IoremapError::ZeroSize));
    assert_eq!(ioremap::ioremap_np(u, 0), Err(IoremapError::ZeroSize));
    assert_eq!(ioremap::ioremap(PhysAddr::new(u64::MAX - 8), 100), Err(IoremapError::Overflow));
    assert_eq!(ioremap::ioremap(PhysAddr::new(u64::MAX - 0xfff), 1), Err(IoremapError::Overflow), "rounds to 2^64");
    assert_eq!(ioremap::ioremap(u, usize::MAX), Err(IoremapError::Overflow));
    assert_eq!(ioremap::ioremap_wc(PhysAddr::new(PHYS_LIMIT), 4), Err(IoremapError::PhysTooHigh));
    assert_eq!(ioremap::ioremap(PhysAddr::new(PHYS_LIMIT - 8), 16), Err(IoremapError::PhysTooHigh));
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    assert_eq!(unsafe { IoMem::new(u, 0) }.err(), Some(IoremapError::ZeroSize));
    // Above what this CPU implements (cortex-a72: 44 bits), though a descriptor could hold it.
    let bits = hal::cpu::phys_addr_bits();
    hal::print!("(CPU physical range: {bits} bits) ");
    let cpu_limit = 1u64 << bits;
    assert!(cpu_limit <= PHYS_LIMIT);
    assert_eq!(ioremap::ioremap(PhysAddr::new(cpu_limit), 4), Err(IoremapError::PhysTooHigh));
    assert_eq!(ioremap::ioremap(PhysAddr::new(cpu_limit - 8), 16), Err(IoremapError::PhysTooHigh));
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    assert_eq!(unsafe { IoMem::new(PhysAddr::new(cpu_limit - 8), 16) }.err(), Some(IoremapError::PhysTooHigh));
    assert!(kernel::ioremap_attr(PhysAddr::new(cpu_limit), 4, DeviceAttr::DeviceNGnRE).is_err());
    let after = kernel::vmalloc_stats().unwrap();
    assert_eq!((after.live_areas, after.mapped_pages), (before.live_areas, before.mapped_pages));
}

fn iounmap_misuse_is_refused() {
    let io = ioremap::ioremap(uart().start().add(8), 4).unwrap();
    let v = kernel::vmalloc(PAGE_SIZE).unwrap();
    let before = kernel::vmalloc_stats().unwrap();
    assert_eq!(ioremap::iounmap(v), Err(IoremapError::NotIoremap), "a vmalloc pointer");
    assert_eq!(ioremap::iounmap(io.page_down()), Err(IoremapError::NotMapped), "not the address ioremap gave");
    assert_eq!(ioremap::iounmap(io.add(4)), Err(IoremapError::NotMapped), "interior");
    assert_eq!(ioremap::iounmap(VirtAddr::new(0x4000_0000)), Err(IoremapError::NotMapped), "a RAM address");
    let after = kernel::vmalloc_stats().unwrap();
    assert_eq!((after.live_areas, after.mapped_pages), (before.live_areas, before.mapped_pages));
    assert!(kernel::vfree(io).is_err(), "vfree refuses an ioremap pointer");
    ioremap::iounmap(io).unwrap();
    assert_eq!(ioremap::iounmap(io), Err(IoremapError::AlreadyUnmapped), "twice, parked");
    kernel::purge();
    assert_eq!(ioremap::iounmap(io), Err(IoremapError::AlreadyUnmapped), "twice, purged");
    kernel::vfree(v).unwrap();
}

fn iounmap_parks_the_range_until_the_purge() {
    kernel::purge();
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let io = unsafe { IoMem::new(uart().start(), 0x1000) }.unwrap();
    let va = io.addr();
    let a = kernel::find_area(va).unwrap();
    io.regs::<Pl011Flags>(0).unwrap().fr.get();
    let s0 = kernel::vmalloc_stats().unwrap();
    io.unmap().unwrap();
    let s1 = kernel::vmalloc_stats().unwrap();
    assert_eq!(s1.parked_areas, s0.parked_areas + 1);
    assert_eq!(s1.purges, s0.purges, "no flush at iounmap");
    assert_eq!(kernel::vmalloc_to_phys(va), None, "PTE cleared at once");
    let unpurged = alloc::format!("0x{:016x}-0x{:016x}    8192 unpurged vm_area", a.start.as_u64(), a.end.as_u64());
    assert!(vmallocinfo().contains(&unpurged), "{}", vmallocinfo());
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let next = unsafe { IoMem::new(uart().start(), 0x1000) }.unwrap();
    assert_ne!(next.addr(), va, "not reused before the flush");
    drop(next);
    kernel::purge();
    assert!(!vmallocinfo().contains("unpurged"));
    let f = probe::read_u64(va.page_down().as_usize()).expect_err("unmapped and flushed: must fault");
    assert_eq!(f.far, va.page_down().as_u64());
}

fn the_guard_page_after_a_mapping_traps() {
    // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
    let io = unsafe { IoMem::new(uart().start(), 0x1000) }.unwrap();
    let guard = io.addr().add(0x1000).as_usize();
    let f = probe::read_u64(guard).expect_err("guard page");
    assert_eq!(f.far as usize, guard);
    let mut s = String::new();
    assert!(kernel::explain_fault(guard as u64, &mut s));
    assert!(s.contains("guard page hit"), "{s}");
}

/// vmallocinfo, buddy free pages + table pages, after a purge with vmalloc's spare records
/// released and the slab shrunk (so the record cache holds no page the cycles grew).
fn snapshot() -> (String, usize, usize) {
    kernel::purge();
    let spares = kernel::vmalloc_instance().unwrap().lock().release_spares();
    drop(spares);
    memory::slab::shrink();
    let free = memory::buddy::stats().unwrap().free_pages;
    let slab = memory::slab::stats().unwrap();
    (vmallocinfo(), free + kernel::vmalloc_table_pages(), slab.slab_pages)
}

fn thousand_cycles() {
    let base = uart().start();
    for i in 0..1000u64 {
        match i % 4 {
            0 => {
                // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
                let io = unsafe { IoMem::new(base, 0x1000) }.unwrap();
                assert_eq!(io.regs::<Pl011Flags>(0).unwrap().fr.get() & (1 << 5), 0);
            }
            1 => {
                // SAFETY: the test owns this device (QEMU's or the simulated bus's) alone; it does no DMA.
                let id: Mmio<PrimeCellId> =
                    unsafe { Mmio::with_attr(base.add(0xfe0), DeviceAttr::DeviceNGnRnE) }.unwrap();
                assert_eq!(id.cell[3].get(), 0xb1);
            }
            2 => {
                let va = ioremap::ioremap_wc(base.add((i % 0x1000) & !3), 4).unwrap();
                ioremap::iounmap(va).unwrap();
            }
            _ => {
                let va = ioremap::ioremap_np(base, 0x3000).unwrap();
                ioremap::iounmap(va).unwrap();
            }
        }
    }
}

/// The kernel-table leaf level mapping `va` (1: a 1 GiB block, 2: a 2 MiB block, 3: a page).
fn leaf_level(va: VirtAddr) -> Option<usize> {
    let space = hal::kmap::kernel_space().unwrap();
    let level = space.lock().upper().translate(va).map(|t| t.level);
    level
}

fn a_64_gib_ioremap_maps_blocks_and_gives_its_tables_back() {
    const GIB: u64 = 1 << 30;
    // 64 GiB from PA 64 GiB: above any RAM these boots have, below QEMU virt's high MMIO;
    // never accessed.
    let pa = 64 * GIB;
    assert!(pa + 64 * GIB <= 1 << hal::cpu::phys_addr_bits());
    kernel::purge();
    let tables = kernel::vmalloc_table_pages();
    // The sub-page offset is kept; the virtual range is 1 GiB aligned like the physical.
    let va = ioremap::ioremap(PhysAddr::new(pa + 0x18), (64 * GIB) as usize).unwrap();
    let grown = kernel::vmalloc_table_pages() - tables;
    hal::print!("(64 GiB: {grown} table pages) ");
    assert_eq!(va.as_u64() % GIB, 0x18);
    assert!(grown <= 4, "1 GiB blocks and one tail page: {grown} table pages");
    for g in [0, 1, 37, 63] {
        let at = va.add(g * GIB);
        assert_eq!(leaf_level(at), Some(1), "GiB {g}");
        assert_eq!(kernel::vmalloc_to_phys(at), Some(PhysAddr::new(pa + g * GIB + 0x18)));
    }
    assert_eq!(leaf_level(va.add(64 * GIB)), Some(3), "the page the offset spills into");
    ioremap::iounmap(va).unwrap();
    kernel::purge();
    assert_eq!(kernel::vmalloc_table_pages(), tables, "iounmap + purge: table pages back at baseline");
    // 2 MiB aligned only: 2 MiB blocks, one level-2 table per GiB.
    let va = ioremap::ioremap(PhysAddr::new(pa + (2 << 20)), (2 * GIB) as usize).unwrap();
    let grown = kernel::vmalloc_table_pages() - tables;
    assert_eq!(va.as_u64() % (2 << 20), 0);
    assert_eq!(leaf_level(va), Some(2));
    assert!(grown <= 4, "2 MiB blocks: {grown} table pages");
    ioremap::iounmap(va).unwrap();
    kernel::purge();
    assert_eq!(kernel::vmalloc_table_pages(), tables);
}

fn a_thousand_cycles_leave_no_trace() {
    // A first round may move pages into the slab (vmalloc keeps `spare_high` spare area
    // records, which can hold several partly used slabs after the 1000 records of a round
    // were freed); the measured round must leave no trace at all.
    let first = snapshot();
    thousand_cycles();
    let before = snapshot();
    let tables = kernel::vmalloc_table_pages();
    let purges = kernel::vmalloc_stats().unwrap().purges;
    thousand_cycles();
    let after = snapshot();
    hal::print!(
        "(first round: {} pages into the slab; measured round: {} purges, {} table pages kept, slab {} -> {} pages) ",
        first.1 as isize - before.1 as isize,
        kernel::vmalloc_stats().unwrap().purges - purges,
        kernel::vmalloc_table_pages() - tables,
        before.2,
        after.2
    );
    assert_eq!(first.0, before.0, "vmallocinfo after the first round");
    assert_eq!(first.1 + first.2, before.1 + before.2, "first round: every page is free, a table or a slab page");
    assert_eq!(after.0, before.0, "vmallocinfo");
    assert_eq!(after.1, before.1, "buddy free pages + the growth of vmalloc_table_pages()");
    assert_eq!(after.2, before.2, "slab pages");
}

tests::main!(
    test!(console_switches_to_an_ioremap_mapping),
    test!(gic_distributor_typer_is_plausible),
    test!(uart_id_reads_through_each_memory_type),
    test!(ram_on_any_page_is_refused),
    test!(zero_size_and_overflow_are_refused),
    test!(iounmap_misuse_is_refused),
    test!(iounmap_parks_the_range_until_the_purge),
    test!(the_guard_page_after_a_mapping_traps),
    test!(a_thousand_cycles_leave_no_trace),
    test!(a_64_gib_ioremap_maps_blocks_and_gives_its_tables_back),
);
