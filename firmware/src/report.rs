//! The boot report: what a newcomer reads to understand the memory system.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::vec::Vec;
use hal::boot::BootInfo;
use hal::println;
use memory::kernel;

fn section(title: &str) {
    println!("\n=== {title}");
}

/// Prints the report, exercising each allocator on the way.
pub fn run(info: &BootInfo) {
    let img = &info.image;
    section("kernel image (identity mapped; W^X)");
    let rows = [
        ("text", img.text, "R X"),
        ("rodata", img.rodata, "R   XN"),
        ("data+bss+tables", img.data, "RW  XN"),
        ("guard", img.boot_stack_guard, "unmapped"),
        ("boot stack", img.boot_stack, "RW  XN"),
        ("guard", img.exception_stack_guard, "unmapped"),
        ("exception stack", img.exception_stack, "RW  XN"),
        ("CPU 1-7 stacks", img.cpu_stacks, "RW  XN, each stack below a guard page"),
    ];
    for (name, r, perm) in rows {
        println!("  {name:<16} {:#012x}-{:#012x} {:>5} KiB  {perm}", r.start(), r.end().as_u64(), r.size() >> 10);
    }
    if let Some(used) = hal::kmap::boot_tables_used() {
        let unused = hal::kmap::boot_tables_unused().map_or(0, |r| r.pages());
        println!(
            "  boot tables: {} of {} pages used (sized for the device tree's worst case); {unused} given to the frame allocator",
            used.pages(),
            hal::kmap::BOOT_TABLE_PAGES
        );
    }
    let p = &info.platform;
    if !p.reserved.is_empty() {
        println!(
            "  reserved memory: {} ranges, {} of them no-map (left out of the linear map)",
            p.reserved.len(),
            p.reserved.no_map().count()
        );
    }

    section("page frames (buddy allocator)");
    if let Some(s) = memory::buddy::stats() {
        println!(
            "  {} of {} pages free ({} MiB of {} MiB), orders 0..={}",
            s.free_pages,
            s.total_pages,
            s.free_pages >> 8,
            s.total_pages >> 8,
            memory::buddy::MAX_ORDER
        );
        println!(
            "  /proc/buddyinfo (free blocks per order 0..=10; {} more order-0 frames sit on the hot list):",
            s.hot_pages
        );
        for line in s.buddyinfo().to_string().lines() {
            println!("  {line}");
        }
        println!("  /proc/zoneinfo (in pages; min_free_kbytes {}, lowmem_reserve ratio 256):", s.min_free_kbytes);
        for line in s.zoneinfo().to_string().lines() {
            println!("  {line}");
        }
    }

    // The heap at work: Box, Vec, BTreeMap from the slab.
    let boxed = Box::new([7u64; 16]);
    let v: Vec<u32> = (0..10_000).collect();
    let mut map = BTreeMap::new();
    for i in 0..1000u32 {
        map.insert(i, i * 2);
    }
    println!(
        "\n  heap check: Box {} B, Vec of {} u32, BTreeMap of {} entries (sum {})",
        core::mem::size_of_val(&*boxed),
        v.len(),
        map.len(),
        map.values().map(|&x| x as u64).sum::<u64>()
    );
    section("slabinfo (small objects)");
    if let Some(si) = memory::slab::slabinfo() {
        hal::print!("{si}");
    }
    drop((boxed, v, map));

    section("scullv: a RAM device in vmalloc'd quanta (drivers/scullv)");
    match scullv::demo(4) {
        Ok(r) => println!(
            "  wrote and read back {} KiB in {} quanta of {} KiB ({} qset array), checksum {:#018x} (expected {:#018x}), trimmed",
            r.bytes >> 10,
            r.quanta,
            r.quantum_size >> 10,
            r.qset_arrays,
            r.checksum,
            scullv::expected_checksum(r.bytes)
        ),
        Err(e) => println!("  scullv demo failed: {e}"),
    }
    let parked = kernel::vmalloc_stats().map_or(0, |s| s.parked_areas);
    kernel::purge();
    println!("  its {parked} freed quanta were parked (no TLB flush yet); one purge flushed and recycled them");

    section("vmalloc at work");
    let a = kernel::vzalloc(3 * 4096).expect("vzalloc");
    let b = kernel::vmalloc(100).expect("vmalloc");
    let c = kernel::vmalloc_aligned(16 * 4096, 64 * 1024).expect("vmalloc_aligned");
    let phys = kernel::vmalloc_to_phys(a).map(|p| p.as_u64()).unwrap_or(0);
    println!("  vzalloc(12 KiB) = {a:#x} (first page at PA {phys:#x}); vmalloc(100) = {b:#x}; 64 KiB-aligned = {c:#x}");
    let uart =
        info.platform.uart.map(|u| kernel::ioremap_attr(u.start(), 0x1000, memory::vmalloc::DeviceAttr::DeviceNGnRE));
    let mut out = hal::console::Console;
    println!("  /proc/vmallocinfo:");
    let _ = kernel::write_vmallocinfo(&mut out);
    let _ = kernel::write_vmalloc_map(&mut out, 64);
    kernel::vfree(b).expect("vfree");
    println!("  after vfree({b:#x}) — parked until the next purge:");
    let _ = kernel::write_vmallocinfo(&mut out);
    let _ = kernel::write_vmalloc_map(&mut out, 64);
    kernel::vfree(a).expect("vfree");
    kernel::vfree(c).expect("vfree");
    if let Some(Ok(u)) = uart {
        kernel::iounmap(u).expect("iounmap");
    }
    kernel::purge();
    if let Some(s) = kernel::vmalloc_stats() {
        println!(
            "  after purge: {} live areas, {} parked; {} purges, {} TLB page ops in {} batches, {} full flushes",
            s.live_areas, s.parked_areas, s.purges, s.tlb_page_ops, s.tlb_page_batches, s.tlb_full_flushes
        );
    }
    match kernel::vmalloc_huge((4 << 20) + 4096) {
        Ok(h) => {
            let blocks = kernel::vmalloc_stats().map_or(0, |s| s.huge_blocks);
            let pa = kernel::vmalloc_to_phys(h).map_or(0, |p| p.as_u64());
            println!(
                "  vmalloc_huge(4 MiB + 4 KiB) = {h:#x}, 2 MiB aligned: {blocks} blocks of 2 MiB (each one order-9 buddy block, one level-2 descriptor; the first at PA {pa:#x}) + 1 page + the guard page:"
            );
            let _ = kernel::write_vmallocinfo(&mut out);
            kernel::vfree(h).expect("vfree");
            kernel::purge();
        }
        Err(e) => println!("  vmalloc_huge(4 MiB + 4 KiB): {e}"),
    }
}
