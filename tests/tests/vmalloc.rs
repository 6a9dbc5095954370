//! vmalloc on target, with the real MMU: areas written and read page by page, guard pages
//! that trap and are named, use after vfree, strict mode, vmallocinfo, purge on exhaustion,
//! misuse refused, everything given back.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use hal::kmap::SCRATCH_START;
use hal::{probe, VirtAddr, VirtRange, PAGE_SIZE};
use memory::kernel::{self, KernelBackend};
use memory::vmalloc::{VmFlags, Vmalloc, VmallocConfig, VmallocError};
use tests::test;

const PAGE: usize = PAGE_SIZE;

fn explain(addr: usize) -> String {
    let mut s = String::new();
    assert!(kernel::explain_fault(addr as u64, &mut s), "no explanation for {addr:#x}");
    s
}

fn free_pages() -> usize {
    memory::buddy::stats().unwrap().free_pages
}

/// Free pages plus the table pages the vmalloc windows hold: constant across any sequence
/// of calls that gives everything back (tables of live areas, counted apart).
fn free_pages_with_tables() -> usize {
    free_pages() + kernel::vmalloc_table_pages()
}

/// A private instance over `pages` of the scratch window, `slot` picking a distinct part
/// (tables of the scratch window are shared and kept).
fn private(slot: u64, pages: usize, config: VmallocConfig) -> Vmalloc<KernelBackend> {
    let info = hal::boot::boot_info().unwrap();
    let start = VirtAddr::new(SCRATCH_START + slot * (1 << 30));
    let range = VirtRange::new(start, (pages * PAGE) as u64).unwrap();
    // SAFETY: each test uses its own 1 GiB slot of the scratch window and purges (or
    // never reuses the slot) before dropping the instance.
    Vmalloc::new(unsafe { KernelBackend::new(info) }.unwrap(), range, config).unwrap()
}

fn areas_up_to_64_mib_hold_their_data() {
    for size in [PAGE, 5 * PAGE + 123, 1 << 20, 16 << 20, 64 << 20] {
        let p = kernel::vmalloc(size).unwrap();
        let base = p.as_usize();
        let pages = size.div_ceil(PAGE);
        for i in 0..pages {
            let word = (base + i * PAGE) as *mut u64;
            // SAFETY: the area maps `pages` pages from `base`, owned by this test.
            unsafe { word.write_volatile((base + i) as u64 ^ 0x5a5a_5a5a) };
        }
        for i in 0..pages {
            let word = (base + i * PAGE) as *const u64;
            // SAFETY: as above.
            assert_eq!(unsafe { word.read_volatile() }, (base + i) as u64 ^ 0x5a5a_5a5a, "page {i} of {size}");
            let pa = kernel::vmalloc_to_phys(VirtAddr::new((base + i * PAGE) as u64)).expect("mapped");
            assert!(pa.is_page_aligned());
        }
        kernel::vfree(p).unwrap();
    }
}

/// The level of the kernel-table leaf mapping `va` (2: a 2 MiB block, 3: a page).
fn leaf_level(va: usize) -> Option<usize> {
    let space = hal::kmap::kernel_space().unwrap();
    let level = space.lock().upper().translate(VirtAddr::new(va as u64)).map(|t| t.level);
    level
}

fn huge_areas_map_2mib_blocks_and_keep_their_guard() {
    const MIB2: usize = 2 << 20;
    // The window's first megabytes already hold page tables from earlier areas (ioremaps,
    // the 64 MiB areas above, freed and purged): a block must replace an empty one.
    kernel::purge();
    let before = snapshot();
    let size = 3 * MIB2 + 5 * PAGE + 100;
    let tables = kernel::vmalloc_table_pages();
    let p = kernel::vmalloc_huge(size).unwrap();
    hal::print!("(table pages {tables} -> {}) ", kernel::vmalloc_table_pages());
    let base = p.as_usize();
    assert_eq!(base % MIB2, 0, "a huge area starts at a 2 MiB boundary");
    assert_eq!(kernel::vmalloc_stats().unwrap().huge_blocks, 3);
    for b in 0..3 {
        assert_eq!(leaf_level(base + b * MIB2 + 0x1234), Some(2), "block {b}");
        let pa0 = kernel::vmalloc_to_phys(VirtAddr::new((base + b * MIB2) as u64)).unwrap();
        assert_eq!(pa0.as_u64() % MIB2 as u64, 0);
        let last = kernel::vmalloc_to_phys(VirtAddr::new((base + (b + 1) * MIB2 - 1) as u64)).unwrap();
        assert_eq!(last.as_u64(), pa0.as_u64() + MIB2 as u64 - 1, "one contiguous block");
    }
    assert_eq!(leaf_level(base + 3 * MIB2), Some(3), "the tail is mapped with pages");
    let pages = size.div_ceil(PAGE);
    for i in 0..pages {
        // SAFETY: the area maps `pages` pages from `base`, owned by this test.
        unsafe { ((base + i * PAGE) as *mut u64).write_volatile(i as u64 ^ 0xb10c) };
    }
    for i in 0..pages {
        // SAFETY: as above.
        assert_eq!(unsafe { ((base + i * PAGE) as *const u64).read_volatile() }, i as u64 ^ 0xb10c);
    }
    let end = base + pages * PAGE;
    // SAFETY: expected to fault: the page after the area is its guard page.
    let f = unsafe { probe::write_u8(end, 1) }.expect_err("the guard page after a huge area must trap");
    assert_eq!(f.far as usize, end);
    let text = explain(end);
    assert!(text.contains("guard page hit") && text.contains(&alloc::format!("area {base:#x}-")), "{text}");
    kernel::vfree(p).unwrap();
    kernel::purge();
    assert_eq!(kernel::vmalloc_stats().unwrap().huge_blocks, 0);
    // SAFETY: expected to fault: the area is gone and flushed.
    probe::read_u8(base).expect_err("a freed huge area faults");
    drop(text);
    assert_eq!(snapshot(), before, "every block, frame and table page given back");
}

fn one_past_a_page_sized_area_traps_and_is_named() {
    let p = kernel::vmalloc(4096).unwrap().as_usize();
    // SAFETY: the last byte of the area is ours.
    unsafe { probe::write_u8(p + 4095, 1) }.expect("last byte is writable");
    // SAFETY: expected to fault: one byte past the area is its guard page.
    let f = unsafe { probe::write_u8(p + 4096, 1) }.expect_err("one past the end must trap");
    assert_eq!(f.far as usize, p + 4096);
    let text = explain(p + 4096);
    assert!(text.contains(&alloc::format!("guard page hit at {:#x}, 1 bytes past area {p:#x}-", p + 4096)), "{text}");
    assert!(text.contains("allocated at tests/tests/vmalloc.rs"), "{text}");
    kernel::vfree(VirtAddr::new(p as u64)).unwrap();
}

fn one_past_100_bytes_traps_at_the_page_end_or_at_once_end_aligned() {
    let p = kernel::vmalloc(100).unwrap().as_usize();
    // The rest of the page is mapped (a page is the unit); the next page is the guard.
    // SAFETY: byte 100 lies in the area's only mapped page, which this test owns.
    unsafe { probe::write_u8(p + 100, 1) }.expect("same page");
    // SAFETY: expected to fault (guard page).
    unsafe { probe::write_u8(p + PAGE, 1) }.expect_err("first byte past the page traps");
    kernel::vfree(VirtAddr::new(p as u64)).unwrap();

    // End-aligned (like KFENCE): the object ends where the page ends.
    let q = kernel::vmalloc_with(100, 1, VmFlags::END_ALIGNED).unwrap().as_usize();
    assert_eq!((q + 100) % PAGE, 0, "end-aligned object ends at a page end");
    // SAFETY: the object's bytes are ours.
    unsafe { probe::write_u8(q + 99, 1) }.expect("last byte");
    // SAFETY: expected to fault (guard page right after byte 99).
    let f = unsafe { probe::write_u8(q + 100, 1) }.expect_err("one byte past traps");
    assert_eq!(f.far as usize, q + 100);
    let text = explain(q + 100);
    assert!(text.contains("1 bytes past area"), "{text}");
    kernel::vfree(VirtAddr::new(q as u64)).unwrap();
}

fn freed_area_faults_once_purged_and_is_named() {
    let p = kernel::vmalloc(2 * PAGE).unwrap().as_usize();
    // SAFETY: the area is ours.
    unsafe { probe::write_u8(p, 7) }.unwrap();
    kernel::vfree(VirtAddr::new(p as u64)).unwrap();
    let parked = explain(p);
    assert!(parked.contains("use after vfree"), "{parked}");
    assert!(parked.contains("freed at tests/tests/vmalloc.rs"), "{parked}");
    kernel::purge();
    let f = probe::read_u8(p).expect_err("a purged area must fault");
    assert_eq!(f.far as usize, p);
    let purged = explain(p);
    assert!(purged.contains("use after vfree"), "{purged}");
}

fn strict_mode_faults_at_once_lazy_mode_may_not() {
    // Strict: vfree flushes at once, so even a TLB entry cached by the write is gone.
    let mut vm = private(0, 64, VmallocConfig { strict: true, ..VmallocConfig::default() });
    let p = vm.vmalloc(PAGE).unwrap().as_usize();
    // SAFETY: the area is ours; the write caches its translation in the TLB.
    unsafe { probe::write_u8(p, 1) }.unwrap();
    vm.vfree(VirtAddr::new(p as u64)).unwrap();
    probe::read_u8(p).expect_err("strict: freed at once");
    assert_eq!(vm.stats().parked_areas, 0);
    drop(vm);
    // Lazy: the range is parked; the PTE is gone but the TLB may still translate it until
    // the purge (QEMU keeps the entry): reported, not asserted.
    let mut vm = private(1, 64, VmallocConfig::default());
    let q = vm.vmalloc(PAGE).unwrap().as_usize();
    // SAFETY: as above.
    unsafe { probe::write_u8(q, 1) }.unwrap();
    vm.vfree(VirtAddr::new(q as u64)).unwrap();
    let stale = probe::read_u8(q).is_ok();
    hal::print!("(lazy: stale TLB entry {}) ", if stale { "still translated" } else { "gone" });
    vm.purge();
    probe::read_u8(q).expect_err("after the purge the TLB entry is gone");
}

/// The kernel backend's `map_block` refuses a 2 MiB range that still has a live page:
/// before, it tore the page down (leaking its frame, leaving its owner's pointer dangling)
/// and mapped the block over it.
fn map_block_refuses_a_range_with_live_leaves() {
    use memory::vmalloc::{MapError, Prot, VmBackend, BLOCK_SIZE};
    let info = hal::boot::boot_info().unwrap();
    // SAFETY: slot 3 of the scratch window is this test's alone; everything it maps is
    // unmapped and flushed before it returns.
    let mut be = unsafe { KernelBackend::new(info) }.unwrap();
    let base = SCRATCH_START + 3 * (1 << 30);
    let page = VirtAddr::new(base + 5 * PAGE as u64);
    let mut frame = [hal::PhysAddr::new(0)];
    assert_eq!(be.alloc_frames(&mut frame), 1);
    be.map_pages(page, &frame, Prot::ReadWrite).unwrap();
    // SAFETY: the page was just mapped to a frame this test owns.
    unsafe { page.as_mut_ptr::<u64>().write_volatile(0x1ead) };
    let block = be.alloc_block().expect("a free 2 MiB block");
    assert_eq!(be.map_block(VirtAddr::new(base), block), Err(MapError::AlreadyMapped));
    assert_eq!(be.translate(page), Some(frame[0]), "the live page is kept");
    // SAFETY: as above: still mapped, still ours.
    assert_eq!(unsafe { page.as_ptr::<u64>().read_volatile() }, 0x1ead);
    let mut freed = [hal::PhysAddr::new(0)];
    be.unmap_pages(page, 1, |pa| freed[0] = pa);
    be.tlb_flush_pages(&[(page, 1)]);
    assert_eq!(freed, frame);
    be.free_frames(&frame);
    // With the page gone the block goes in (the kept, empty table is reclaimed).
    be.map_block(VirtAddr::new(base), block).unwrap();
    assert_eq!(be.translate(VirtAddr::new(base + 0x1234)), Some(block.add(0x1234)));
    assert_eq!(be.unmap_block(VirtAddr::new(base)), Some(block));
    be.tlb_flush_pages(&[(VirtAddr::new(base), BLOCK_SIZE / PAGE)]);
    be.free_block(block);
}

/// Quarantine mode: 1,000 writes at random offsets into vfree'd, not yet purged areas.
/// Under QEMU's software TLB a page whose translation was cached before `vfree` (touched)
/// keeps translating until the purge's TLBI: that write lands in the quarantined frame and
/// the purge's poison check reports it. A page never touched has no cached translation:
/// that write faults and is explained as a use after vfree. Both happen, every write is one
/// of the two, and no write reaches the frames allocated meanwhile (which, without the
/// quarantine, are the very frames the hot list just got back).
fn use_after_vfree_is_caught_by_the_quarantine_or_faults() {
    use memory::vmalloc::{FaultClass, QUARANTINE_POISON};
    const WRITES: usize = 1000;
    const AREAS: usize = 25; // per round, two pages each: one touched, one not
    let cfg = VmallocConfig { quarantine: true, lazy_max_pages: 1 << 20, ..VmallocConfig::default() };
    let mut vm = private(4, 4096, cfg);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut stale, mut faulted, mut explained) = (0usize, 0usize, 0usize);
    let hits0 = vm.stats().quarantine_hits;
    while stale + faulted < WRITES {
        let areas: alloc::vec::Vec<usize> = (0..AREAS).map(|_| vm.vmalloc(2 * PAGE).unwrap().as_usize()).collect();
        for &a in &areas {
            // SAFETY: the area is ours and mapped; the write caches page 0's translation.
            unsafe { (a as *mut u8).write_volatile(1) };
        }
        for &a in &areas {
            vm.vfree(VirtAddr::new(a as u64)).unwrap();
        }
        // Someone else allocates as many frames right away (from the global instance).
        let reuse = kernel::vzalloc(2 * AREAS * PAGE).unwrap();
        let round_hits = vm.stats().quarantine_hits;
        let mut round_stale = 0;
        for &a in &areas {
            for page in 0..2 {
                if stale + faulted == WRITES {
                    break;
                }
                let addr = a + page * PAGE + (rand() as usize % PAGE);
                let value = (rand() as u8) | 1;
                let value = if value == QUARANTINE_POISON { 0x11 } else { value };
                // SAFETY: a freed area's page: either the write faults (nothing written) or
                // it lands, through a stale TLB entry, in a frame the quarantine holds.
                match unsafe { probe::write_u8(addr, value) } {
                    Ok(()) => {
                        stale += 1;
                        round_stale += 1;
                    }
                    Err(_) => {
                        faulted += 1;
                        let mut why = String::new();
                        if vm.explain_fault(VirtAddr::new(addr as u64), &mut why) == FaultClass::UseAfterFree {
                            explained += 1;
                        }
                    }
                }
            }
        }
        vm.purge();
        // One report per page written through a stale entry (each page is written once).
        assert_eq!(vm.stats().quarantine_hits - round_hits, round_stale as u64, "stale writes not all caught");
        // None reached the frames handed out meanwhile.
        let words = 2 * AREAS * PAGE / 8;
        for w in 0..words {
            // SAFETY: the area is mapped, ours, and `words` words long.
            let v = unsafe { reuse.as_ptr::<u64>().add(w).read_volatile() };
            assert_eq!(v, 0, "a write after vfree reached a reused frame (word {w})");
        }
        kernel::vfree(reuse).unwrap();
    }
    hal::print!("({stale} through stale TLB entries caught at the purge, {faulted} faulted) ");
    assert_eq!(stale + faulted, WRITES);
    assert!(stale > 0 && faulted > 0, "both outcomes must happen: {stale} stale, {faulted} faulted");
    assert_eq!(explained, faulted, "every fault explained as a use after vfree");
    assert_eq!(vm.stats().quarantine_hits - hits0, stale as u64);
    let r = vm.last_use_after_vfree().unwrap();
    assert!(r.caller.unwrap().file().ends_with("vmalloc.rs") && r.freer.is_some(), "{r}");
    assert_eq!(vm.stats().quarantined_frames, 0);
}

fn vmallocinfo_lists_areas_like_linux() {
    let a = kernel::vmalloc(3 * PAGE).unwrap();
    let b = kernel::vmalloc(100).unwrap();
    let mut s = String::new();
    kernel::write_vmallocinfo(&mut s).unwrap();
    let line_a = s.lines().find(|l| l.starts_with(&alloc::format!("{:#x}-", a.as_u64()))).expect("area a listed");
    assert!(line_a.contains(" 16384 tests/tests/vmalloc.rs:"), "{line_a}");
    assert!(line_a.ends_with("pages=3 vmalloc"), "{line_a}");
    kernel::vfree(b).unwrap();
    let mut s = String::new();
    kernel::write_vmallocinfo(&mut s).unwrap();
    let line_b = s.lines().find(|l| l.starts_with(&alloc::format!("{:#x}-", b.as_u64()))).expect("parked b listed");
    assert!(line_b.ends_with("8192 unpurged vm_area"), "{line_b}");
    kernel::vfree(a).unwrap();
    kernel::purge();
}

fn a_window_full_of_parked_ranges_purges_and_succeeds() {
    // 256 pages, 1-page areas + guard = 2 pages each: 128 fit. The lazy threshold is far
    // away, so only exhaustion can trigger the purge.
    let mut vm = private(2, 256, VmallocConfig { lazy_max_pages: 1 << 20, ..VmallocConfig::default() });
    for _ in 0..128 {
        let p = vm.vmalloc(PAGE).unwrap();
        vm.vfree(p).unwrap();
    }
    let s = vm.stats();
    assert_eq!((s.parked_areas, s.purges, s.free_holes), (128, 0, 0), "{s:?}");
    let p = vm.vmalloc(PAGE).expect("purge, then retry, succeeds");
    let s = vm.stats();
    assert_eq!((s.purges, s.parked_areas, s.live_areas), (1, 0, 1), "{s:?}");
    assert_eq!(s.tlb_page_batches + s.tlb_full_flushes, 1, "one flush for 128 parked ranges");
    vm.vfree(p).unwrap();
    vm.purge();
}

fn misuse_is_refused_and_changes_nothing() {
    let p = kernel::vmalloc(2 * PAGE).unwrap();
    let before = kernel::vmalloc_stats().unwrap();
    let free = free_pages();
    assert_eq!(kernel::vmalloc(0), Err(VmallocError::ZeroSize));
    assert_eq!(kernel::vmalloc(usize::MAX), Err(VmallocError::TooLarge));
    assert_eq!(kernel::vmalloc_aligned(PAGE, 3 * PAGE), Err(VmallocError::BadAlignment));
    assert_eq!(kernel::vfree(p.add(8)), Err(VmallocError::NotAnArea), "interior pointer");
    assert_eq!(kernel::vfree(VirtAddr::new(0x4000_0000)), Err(VmallocError::NotAnArea), "foreign pointer");
    assert_eq!(kernel::iounmap(p), Err(VmallocError::WrongKind));
    let after = kernel::vmalloc_stats().unwrap();
    assert_eq!(
        (after.live_areas, after.mapped_pages, after.parked_areas),
        (before.live_areas, before.mapped_pages, before.parked_areas)
    );
    assert_eq!(free_pages(), free);
    kernel::vfree(p).unwrap();
    assert_eq!(kernel::vfree(p), Err(VmallocError::DoubleFree));
    kernel::purge();
    assert_eq!(kernel::vfree(p), Err(VmallocError::DoubleFree), "recently purged: still known");
}

fn running_out_of_frames_part_way_gives_everything_back() {
    kernel::purge();
    let free = free_pages_with_tables();
    let tables = kernel::vmalloc_table_pages();
    let slab = memory::slab::stats().unwrap();
    let before = kernel::vmalloc_stats().unwrap();
    let free_frames = free_pages();
    // More than RAM (at least 2 GiB): fails part-way, hundreds of table pages made by then.
    let too_big = ((free + 1024) * PAGE).max(2 << 30);
    let r = kernel::vmalloc(too_big);
    assert!(matches!(r, Err(VmallocError::NoFrames | VmallocError::MapFailed(_))), "{r:?}");
    // At once, before any purge: the tables the failed call made went back with its frames.
    assert_eq!(kernel::vmalloc_table_pages(), tables, "table pages at baseline after the failure");
    assert_eq!(free_pages(), free_frames, "every frame and table page given back");
    kernel::purge();
    let after = kernel::vmalloc_stats().unwrap();
    assert_eq!(free_pages_with_tables(), free, "every frame taken was given back");
    assert_eq!(kernel::vmalloc_table_pages(), tables);
    assert!(
        after.tables_freed - before.tables_freed >= 500,
        "{} tables freed",
        after.tables_freed - before.tables_freed
    );
    assert_eq!((after.live_areas, after.owned_frames), (before.live_areas, before.owned_frames));
    assert_eq!(after.failures, before.failures + 1);
    let slab_after = memory::slab::stats().unwrap();
    assert_eq!((slab_after.slab_pages, slab_after.large_allocs), (slab.slab_pages, slab.large_allocs));
}

fn workload() {
    let mut ptrs = alloc::vec::Vec::with_capacity(200);
    for i in 1..=200 {
        ptrs.push(kernel::vmalloc(i * 1000).unwrap());
    }
    for p in ptrs.drain(..) {
        kernel::vfree(p).unwrap();
    }
    kernel::purge();
}

/// Every page accounted for — buddy free pages + vmalloc's kept table pages + slab pages
/// (after shrinking; vmalloc's pool of spare records, kept between `2` and `spare_high`,
/// lives there) — and the vmallocinfo text.
fn snapshot() -> (usize, String) {
    memory::slab::shrink();
    let mut info = String::new();
    kernel::write_vmallocinfo(&mut info).unwrap();
    (free_pages_with_tables() + memory::slab::stats().unwrap().slab_pages, info)
}

fn everything_returns_to_baseline() {
    // The first round may grow caches that stay (vmalloc's spare records, up to
    // `spare_high`); from then on a round must leave no trace at all.
    workload();
    let before = snapshot();
    workload();
    assert_eq!(snapshot(), before);
}

fn handles_own_their_areas() {
    let mut b = kernel::VBox::zeroed(3 * PAGE).unwrap();
    b[0] = 1;
    // Safe code cannot free the memory from under the box: the area is OWNED.
    assert_eq!(kernel::vfree(b.addr()), Err(VmallocError::Owned));
    assert_eq!(kernel::vrealloc(b.addr(), PAGE), Err(VmallocError::Owned));
    assert_eq!(b[0], 1);
    let addr = b.addr();
    drop(b);
    assert_eq!(kernel::vfree(addr), Err(VmallocError::DoubleFree), "dropping the box freed it");
    let uart = hal::boot::boot_info().unwrap().platform.uart.unwrap();
    // SAFETY: the console owns the UART, but this handle touches none of its registers:
    // it is only mapped and dropped, to see a plain iounmap of it refused.
    let io = unsafe { memory::ioremap::IoMem::new(uart.start(), 0x1000) }.unwrap();
    assert_eq!(kernel::iounmap(io.addr()), Err(VmallocError::Owned));
    drop(io);
}

/// Issue 12: the RAM / image / DTB check of `kernel::vmap` lived only in that wrapper, so
/// `vmalloc_instance().vmap_with(..)` mapped GIC registers as Normal RW, aliased `.text`
/// writable or mapped the device tree (each `Ok` before the fix). It is now vmalloc's own.
fn vmap_refuses_what_is_not_free_standing_ram_on_every_path() {
    use memory::vmalloc::Prot;
    let info = hal::boot::boot_info().unwrap();
    let vm = kernel::vmalloc_instance().unwrap();
    let live = kernel::vmalloc_stats().unwrap().live_areas;
    let page = |pa: hal::PhysAddr| hal::PhysAddr::new(pa.as_u64() & !(PAGE as u64 - 1));
    let gic = info.platform.gic_distributor.unwrap().start();
    let dtb = page(info.platform.dtb.start());
    let text = page(info.image.text.start());
    let data = page(info.image.data.start());
    for (what, pa) in [("GIC distributor", gic), ("device tree", dtb), (".text", text), (".data", data)] {
        // SAFETY: refused before anything is mapped (that is what is tested); were it not,
        // the area would be unmapped at once below, never touched.
        let r = unsafe { vm.vmap_with(&[pa], Prot::ReadWrite, VmFlags::NONE) };
        if let Ok(va) = r {
            vm.vunmap(va).unwrap();
        }
        assert_eq!(r, Err(VmallocError::NotRam), "{what} at {pa:#x} through vmalloc_instance().vmap_with");
        // SAFETY: as above.
        let r = unsafe { kernel::vmap(&[pa], Prot::ReadWrite, VmFlags::NONE) };
        assert_eq!(r, Err(VmallocError::NotRam), "{what} at {pa:#x} through kernel::vmap");
    }
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live, "nothing stays mapped");
}

/// `vm_map_ram`: small mappings come from this CPU's block (no vmalloc area), show the
/// frames given, and a freed piece is not handed out again before the flush; the purge
/// flushes, after which the old address faults, and gives the region's tables back.
fn vm_map_ram_maps_from_the_cpus_block_and_flushes_before_reuse() {
    use memory::buddy::Frames;
    kernel::purge();
    let base = free_pages_with_tables();
    let region = kernel::vm_map_ram_region().expect("blocks set aside at init");
    let live = kernel::vmalloc_stats().unwrap().live_areas;
    let frames: alloc::vec::Vec<Frames> = (0..3).map(|_| Frames::alloc_zeroed(0).unwrap()).collect();
    let pas: alloc::vec::Vec<hal::PhysAddr> = frames.iter().map(Frames::phys).collect();
    // SAFETY: the frames are this test's and outlive every mapping below.
    let a = unsafe { kernel::vm_map_ram(&pas) }.unwrap();
    assert!(region.contains(a), "{a:#x} outside the blocks' region {region:?}");
    assert_eq!(kernel::vmalloc_stats().unwrap().live_areas, live, "no vmalloc area for a block piece");
    for (i, &pa) in pas.iter().enumerate() {
        let va = a.as_usize() + i * PAGE;
        assert_eq!(kernel::vmalloc_to_phys(VirtAddr::new(va as u64)), Some(pa));
        // SAFETY: a page of our mapping.
        unsafe { probe::write_u8(va + 5, i as u8 + 1) }.unwrap();
        let lin = hal::kmap::linear_map().unwrap().ptr::<u8>(pa);
        // SAFETY: the frame is ours, reached through the identity map of RAM.
        let seen = unsafe { lin.add(5).read_volatile() };
        assert_eq!(seen, i as u8 + 1, "written through the mapping, read through the frame");
    }
    assert_eq!(kernel::vm_unmap_ram(a, 2), Err(VmallocError::NotAnArea), "another count");
    assert_eq!(kernel::vm_unmap_ram(a.add(PAGE as u64), 2), Err(VmallocError::NotAnArea), "interior");
    kernel::vm_unmap_ram(a, 3).unwrap();
    assert_eq!(kernel::vm_unmap_ram(a, 3), Err(VmallocError::NotAnArea), "twice");
    assert_eq!(kernel::vmalloc_to_phys(a), None, "PTEs cleared at once");
    // Not reused before a flush: the next piece is further up the block.
    // SAFETY: as above.
    let b = unsafe { kernel::vm_map_ram(&pas[..1]) }.unwrap();
    assert!(b.as_u64() >= a.as_u64() + 4 * PAGE as u64, "{b:#x} reuses the unflushed {a:#x}");
    kernel::vm_unmap_ram(b, 1).unwrap();
    let flushes = kernel::vmap_block_stats().unwrap().flushes;
    kernel::purge();
    let s = kernel::vmap_block_stats().unwrap();
    assert_eq!((s.flushes, s.clean, s.dirty, s.mapped), (flushes + 1, s.blocks, 0, 0), "{s:?}");
    let f = probe::read_u8(a.as_usize()).expect_err("an unmapped, flushed piece must fault");
    assert_eq!(f.far, a.as_u64());
    // More than 64 pages: a vmap area without a guard page, through the tree.
    let many: alloc::vec::Vec<Frames> = (0..65).map(|_| Frames::alloc_zeroed(0).unwrap()).collect();
    let pas: alloc::vec::Vec<hal::PhysAddr> = many.iter().map(Frames::phys).collect();
    // SAFETY: as above.
    let big = unsafe { kernel::vm_map_ram(&pas) }.unwrap();
    assert!(!region.contains(big));
    let area = kernel::find_area(big).unwrap();
    assert_eq!((area.kind, area.pages, area.size), (memory::vmalloc::AreaKind::Vmap, 65, 65 * PAGE as u64));
    assert_eq!(kernel::vm_unmap_ram(big, 64), Err(VmallocError::NotAnArea));
    kernel::vm_unmap_ram(big, 65).unwrap();
    // Frames that are not free-standing RAM are refused on the block path too.
    let text = hal::PhysAddr::new(hal::boot::boot_info().unwrap().image.text.start().as_u64() & !(PAGE as u64 - 1));
    // SAFETY: refused before anything is mapped (what is tested).
    assert_eq!(unsafe { kernel::vm_map_ram(&[text]) }, Err(VmallocError::NotRam));
    // SAFETY: as above.
    assert_eq!(unsafe { kernel::vm_map_ram(&[]) }, Err(VmallocError::ZeroSize));
    let mut info = String::new();
    kernel::write_vmallocinfo(&mut info).unwrap();
    assert!(info.lines().any(|l| l.ends_with(" vm_map_ram")), "the region is listed:\n{info}");
    drop((frames, many));
    kernel::purge();
    assert_eq!(free_pages_with_tables(), base, "frames and the region's page tables back");
}

tests::main!(
    test!(vmap_refuses_what_is_not_free_standing_ram_on_every_path),
    test!(areas_up_to_64_mib_hold_their_data),
    test!(huge_areas_map_2mib_blocks_and_keep_their_guard),
    test!(one_past_a_page_sized_area_traps_and_is_named),
    test!(one_past_100_bytes_traps_at_the_page_end_or_at_once_end_aligned),
    test!(freed_area_faults_once_purged_and_is_named),
    test!(strict_mode_faults_at_once_lazy_mode_may_not),
    test!(map_block_refuses_a_range_with_live_leaves),
    test!(use_after_vfree_is_caught_by_the_quarantine_or_faults),
    test!(vmallocinfo_lists_areas_like_linux),
    test!(a_window_full_of_parked_ranges_purges_and_succeeds),
    test!(misuse_is_refused_and_changes_nothing),
    test!(running_out_of_frames_part_way_gives_everything_back),
    test!(handles_own_their_areas),
    test!(vm_map_ram_maps_from_the_cpus_block_and_flushes_before_reuse),
    test!(everything_returns_to_baseline),
);
