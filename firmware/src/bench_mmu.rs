//! On-target bench of the translation-table walker (`hal::mmu`): the time to map and unmap
//! 1 GiB as 4 KiB pages, as 2 MiB blocks and as one 1 GiB block, and as 4 KiB frames the way
//! vmalloc does (`map_frames`, 2 MiB per call), each in a fresh `PageTable` for the upper
//! half. The tree is never installed in `TTBR1`: nothing is ever accessed through it, so no
//! TLB maintenance is needed but one final flush, and the walker's own cost is what is
//! measured. Unmapping uses `unmap_with` (vmalloc's TLB-free path).
//!
//! Times are whole batches read from `CNTVCT_EL0` (62.5 MHz on QEMU, so 16 ns a tick), the
//! best of [`REPS`] runs. Table pages come from the buddy allocator and are all given back:
//! the free-page count is printed before and after.

use hal::linear::LinearMap;
use hal::mmu::{Attributes, BlockPolicy, HardwareTlb, MmuError, PageTable, Tlb, VaRange};
use hal::{PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::buddy::GlobalTableAlloc;

/// Where the bench trees map (upper half; never installed, never accessed).
const BASE: u64 = 0xffff_8000_0000_0000;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const PG: u64 = PAGE_SIZE as u64;
/// Runs of each case; the best is reported.
pub const REPS: usize = 3;

/// How a case lays out its gigabyte.
#[derive(Clone, Copy)]
enum Layout {
    /// `map(.., PagesOnly)`: 262,144 page descriptors, 513 tables.
    Pages,
    /// `map(.., AllowBlocks)` at a VA 2 MiB- but not 1 GiB-aligned: 512 block descriptors.
    Blocks2M,
    /// `map(.., AllowBlocks)` with both sides 1 GiB aligned: one descriptor.
    Block1G,
    /// `map_frames` of 512 frames per call (vmalloc's path).
    Frames,
}

/// One line of the table.
struct Row {
    name: &'static str,
    leaves: u64,
    tables: usize,
    map_ns: u64,
    unmap_ns: u64,
}

fn elapsed_ns(start: u64) -> u64 {
    hal::cpu::ticks_to_ns(hal::cpu::counter() - start)
}

/// Map and unmap 1 GiB once in a fresh tree; returns (map ns, unmap ns, leaves, tables).
fn once(layout: Layout, ram: PhysAddr, linear: LinearMap) -> Result<(u64, u64, u64, usize), MmuError> {
    let mut alloc = GlobalTableAlloc;
    let mut table = PageTable::new(linear, VaRange::Upper, &mut alloc)?;
    let va = match layout {
        Layout::Blocks2M => BASE + MIB2,
        _ => BASE,
    };
    let range = VirtRange::new(VirtAddr::new(va), GIB)?;
    let t0 = hal::cpu::counter();
    let mapped = match layout {
        Layout::Pages => table.map(range, ram, Attributes::DATA, BlockPolicy::PagesOnly, &mut alloc),
        Layout::Blocks2M | Layout::Block1G => {
            table.map(range, ram, Attributes::DATA, BlockPolicy::AllowBlocks, &mut alloc)
        }
        Layout::Frames => {
            let mut frames = [PhysAddr::new(0); 512];
            let mut result = Ok(());
            for chunk in 0..GIB / MIB2 {
                for (i, f) in frames.iter_mut().enumerate() {
                    *f = ram.add(chunk * MIB2 + i as u64 * PG);
                }
                result = table.map_frames(VirtAddr::new(va + chunk * MIB2), &frames, Attributes::DATA, &mut alloc);
                if result.is_err() {
                    break;
                }
            }
            result
        }
    };
    let map_ns = elapsed_ns(t0);
    let tables = table.table_pages();
    let mut leaves = 0;
    let t1 = hal::cpu::counter();
    // SAFETY: the tree was never installed in a TTBR; nothing can use what it maps.
    let unmapped = unsafe { table.unmap_with(range, |_, _, _| leaves += 1) };
    let unmap_ns = elapsed_ns(t1);
    // Not needed for a tree no core ever walked, but what a live tree would take.
    HardwareTlb.invalidate_all();
    // SAFETY: never installed, so no TLB or walk cache holds its entries; its tables came
    // from `alloc`.
    unsafe { table.free_all(&mut alloc) };
    mapped?;
    unmapped?;
    Ok((map_ns, unmap_ns, leaves, tables))
}

fn case(name: &'static str, layout: Layout, ram: PhysAddr, linear: LinearMap) -> Option<Row> {
    let mut best: Option<Row> = None;
    for _ in 0..REPS {
        match once(layout, ram, linear) {
            Ok((map_ns, unmap_ns, leaves, tables)) => {
                let b = best.get_or_insert(Row { name, leaves, tables, map_ns, unmap_ns });
                b.map_ns = b.map_ns.min(map_ns);
                b.unmap_ns = b.unmap_ns.min(unmap_ns);
            }
            Err(e) => {
                hal::println!("  {name}: {e}");
                return None;
            }
        }
    }
    best
}

/// Blocks split by [`splits`].
const SPLITS: u64 = 64;

/// Average ns of one split of a 2 MiB block by `unmap` of one of its pages: a table from
/// the buddy allocator, 512 descriptors written, break-before-make with real `tlbi`s and
/// barriers, and the page's own invalidation.
fn splits(ram: PhysAddr, linear: LinearMap) -> Result<u64, MmuError> {
    let mut alloc = GlobalTableAlloc;
    let mut table = PageTable::new(linear, VaRange::Upper, &mut alloc)?;
    let range = VirtRange::new(VirtAddr::new(BASE + MIB2), SPLITS * MIB2)?;
    let mut result = table.map(range, ram, Attributes::DATA, BlockPolicy::AllowBlocks, &mut alloc);
    let t0 = hal::cpu::counter();
    for i in 0..SPLITS {
        if result.is_err() {
            break;
        }
        let page = VirtRange::new(VirtAddr::new(BASE + MIB2 + i * MIB2 + 17 * PG), PG)?;
        // SAFETY: the tree was never installed in a TTBR; nothing can use what it maps.
        result = unsafe { table.unmap(page, &HardwareTlb, &mut alloc) }.map(|_| ());
    }
    let ns = elapsed_ns(t0) / SPLITS;
    // SAFETY: never installed, so no TLB or walk cache holds its entries; its tables came
    // from `alloc`.
    unsafe { table.free_all(&mut alloc) };
    result.map(|()| ns)
}

/// `a / b` with one decimal, as (whole, tenth).
fn per(a: u64, b: u64) -> (u64, u64) {
    let tenths = (a * 10 + b / 2) / b.max(1);
    (tenths / 10, tenths % 10)
}

/// Run the bench and print its table. Needs the MMU on (`hal::kmap`) and the global buddy
/// allocator initialised. Every table page is given back: the buddy's free-page count is
/// printed before and after and must match.
pub fn run() {
    let Some(info) = hal::boot::boot_info() else {
        hal::println!("bench_mmu: no boot info");
        return;
    };
    let Some(ram) = info.platform.ram.iter().next() else {
        hal::println!("bench_mmu: no RAM");
        return;
    };
    let Some(linear) = hal::kmap::linear_map() else {
        hal::println!("bench_mmu: MMU not on");
        return;
    };
    // Output addresses: RAM from its first 1 GiB boundary (QEMU virt: 0x4000_0000). Nothing
    // is accessed, so the gigabyte need not all be RAM.
    let pa = PhysAddr::new(ram.start().as_u64().next_multiple_of(GIB));
    let free_before = memory::buddy::stats().map(|s| s.free_pages);
    hal::println!("mmu bench: map + unmap 1 GiB in a fresh upper-half tree, best of {REPS} (CNTVCT, whole batches)");
    hal::println!("  layout             leaves  tables      map us    unmap us   map ns/page  unmap ns/page");
    let cases = [
        ("4 KiB pages", Layout::Pages),
        ("2 MiB blocks", Layout::Blocks2M),
        ("1 GiB block", Layout::Block1G),
        ("4 KiB map_frames", Layout::Frames),
    ];
    let pages = GIB / PG;
    for (name, layout) in cases {
        let Some(r) = case(name, layout, pa, linear) else { continue };
        let (mm, mt) = per(r.map_ns, 1000);
        let (um, ut) = per(r.unmap_ns, 1000);
        let (mp, mpt) = per(r.map_ns, pages);
        let (up, upt) = per(r.unmap_ns, pages);
        hal::println!(
            "  {:<16} {:>8} {:>7} {:>9}.{} {:>9}.{} {:>11}.{} {:>12}.{}",
            r.name,
            r.leaves,
            r.tables,
            mm,
            mt,
            um,
            ut,
            mp,
            mpt,
            up,
            upt
        );
    }
    match splits(pa, linear) {
        Ok(ns) => hal::println!("  split of a 2 MiB block by unmap of one page (break-before-make): {ns} ns each"),
        Err(e) => hal::println!("  splits: {e}"),
    }
    huge_vs_pages();
    let free_after = memory::buddy::stats().map(|s| s.free_pages);
    match (free_before, free_after) {
        (Some(b), Some(a)) => hal::println!(
            "  buddy free pages before {b}, after {a}: {}",
            if a == b { "all table pages given back" } else { "MISMATCH" }
        ),
        _ => hal::println!("  buddy allocator not initialised"),
    }
}

/// Runs of each huge-vmalloc measurement; the median is reported.
const HUGE_REPS: usize = 5;

/// One run of `vmalloc` (or `vmalloc_huge`) of `size`, one write per page, `vfree` and a
/// purge: (alloc, touch, free) in ns, and the 2 MiB blocks the area got.
fn huge_once(size: usize, huge: bool) -> Option<(u64, u64, u64, usize)> {
    use memory::kernel;
    let t0 = hal::cpu::counter();
    let p = if huge { kernel::vmalloc_huge(size) } else { kernel::vmalloc(size) }.ok()?;
    let alloc = elapsed_ns(t0);
    let blocks = kernel::vmalloc_stats().map_or(0, |s| s.huge_blocks);
    let t1 = hal::cpu::counter();
    for i in 0..size / PAGE_SIZE {
        // SAFETY: the area maps `size` bytes from `p`, ours until the vfree below.
        unsafe { p.as_mut_ptr::<u64>().byte_add(i * PAGE_SIZE).write_volatile(i as u64) };
    }
    let touch = elapsed_ns(t1);
    let t2 = hal::cpu::counter();
    kernel::vfree(p).ok()?;
    kernel::purge();
    Some((alloc, touch, elapsed_ns(t2), blocks))
}

fn median(mut v: [u64; HUGE_REPS]) -> u64 {
    v.sort_unstable();
    v[HUGE_REPS / 2]
}

/// `vmalloc` against `vmalloc_huge` (Linux's `vmalloc_huge`: 2 MiB blocks) on the kernel's
/// own window and tables: what the huge mapping saves per call, and per first touch of each
/// page (a TLB miss walks three levels instead of four).
fn huge_vs_pages() {
    hal::println!(
        "vmalloc vs vmalloc_huge (2 MiB blocks), kernel window, median of {HUGE_REPS} (CNTVCT): alloc = vmalloc call; touch = one write per 4 KiB page; free = vfree + purge"
    );
    hal::println!(
        "  size     blocks   alloc us pages/huge (ratio)   touch us pages/huge (ratio)   free us pages/huge (ratio)"
    );
    for mib in [2usize, 8, 32, 128] {
        let size = mib << 20;
        // runs[k][rep] = [alloc, touch, free] ns; k = 0 pages, 1 huge.
        let mut runs = [[[0u64; 3]; HUGE_REPS]; 2];
        let mut blocks = 0;
        // All page-mapped runs first, then the huge ones: the first huge run pays, once per
        // 2 MiB slot, for releasing the empty page table the page-mapped runs left there (a
        // walk-cache TLBI, tens of microseconds under QEMU); the median shows the steady state.
        for (k, huge) in [false, true].into_iter().enumerate() {
            for slot in runs[k].iter_mut() {
                let Some((a, t, f, b)) = huge_once(size, huge) else {
                    hal::println!("  {mib} MiB: allocation failed");
                    return;
                };
                *slot = [a, t, f];
                if huge {
                    blocks = b;
                }
            }
        }
        let col = |m: usize| {
            let (p, h) = (median(runs[0].map(|r| r[m])), median(runs[1].map(|r| r[m])));
            (p / 1000, h / 1000, p as f64 / h.max(1) as f64)
        };
        let (a, t, f) = (col(0), col(1), col(2));
        hal::println!(
            "  {:>3} MiB {:>7}   {:>7} / {:<6} ({:>5.1}x)    {:>7} / {:<6} ({:>5.1}x)    {:>6} / {:<6} ({:>5.1}x)",
            mib,
            blocks,
            a.0,
            a.1,
            a.2,
            t.0,
            t.1,
            t.2,
            f.0,
            f.1,
            f.2
        );
    }
}
