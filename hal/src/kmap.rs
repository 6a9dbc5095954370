//! The kernel address space, built at boot from the device tree and `link.ld`.
//!
//! ```text
//!  TTBR0 (lower half): identity map, VA == PA
//!  0x0000_0000_0000_0000  ┌──────────────────────────────┐
//!                         │ unmapped (page 0 and up)     │
//!  uart page              ├──────────────────────────────┤ Device-nGnRE, RW, XN (early console)
//!                         │ unmapped                     │
//!  RAM start              ├──────────────────────────────┤ Normal WB, RW, XN — 1 GiB / 2 MiB blocks
//!  no-map reserved range  ├──────────────────────────────┤ unmapped (firmware's, or another master's)
//!                         ├──────────────────────────────┤ Normal WB, RW, XN
//!  image start            ├──────────────────────────────┤
//!                         │ .text          R X           │
//!                         │ .rodata        R   XN        │
//!                         │ .data .bss     RW  XN        │
//!                         │ boot tables    RW  XN        │
//!                         │ guard page     unmapped      │
//!                         │ boot stack     RW  XN        │
//!                         │ guard page     unmapped      │
//!                         │ exception stk  RW  XN        │
//!  image end              ├──────────────────────────────┤ Normal WB, RW, XN
//!  RAM end                └──────────────────────────────┘
//!
//!  TTBR1 (upper half)
//!  0xffff_0000_0000_0000  VMALLOC_START: the vmalloc / ioremap window (128 TiB), filled by `memory`
//!  0xffff_8000_0000_0000  VMALLOC_END = SCRATCH_START: windows for test and bench instances
//!  0xffff_ffff_fe00_0000  SCRATCH_END (the top 32 MiB stay unused)
//! ```
//!
//! RAM is mapped less the image (mapped section by section, below) and less every
//! `no-map` reserved range ([`crate::dtb::Reserved::no_map`]), rounded out to pages: no
//! cacheable alias of such memory exists, so the CPU never speculates into it. Each hole
//! splits blocks at its two ends, which costs table pages; the boot-table region is sized
//! for the worst case the device-tree bounds allow ([`BOOT_TABLE_PAGES`]), and boot refuses
//! a tree whose need exceeds it. Pages of the region left unused go to the frame allocator
//! ([`boot_tables_unused`]).
//!
//! The image runs from its place in the linear map (identity), so the only mapping of its
//! text is its own, read-only and executable: no writable alias of code exists anywhere.
//! Everything else is execute-never (and `SCTLR_EL1.WXN` is set).

use crate::addr::{PhysAddr, PhysRange, VirtAddr, VirtRange, PAGE_SIZE};
use crate::boot::{BootInfo, ImageLayout};
use crate::linear::LinearMap;
use crate::mmu::{Attributes, BlockPolicy, MmuError, PageTable, TableAlloc, VaRange};
use crate::sync::SpinLock;
use spin::Once;

/// First address of the vmalloc / ioremap window (upper half, `TTBR1_EL1`).
pub const VMALLOC_START: u64 = 0xffff_0000_0000_0000;
/// First address past the vmalloc / ioremap window (128 TiB, 2^47 bytes, about Linux's
/// arm64 vmalloc size: like Linux, an allocation aligned to 2^47 cannot fit).
pub const VMALLOC_END: u64 = 0xffff_8000_0000_0000;
/// Start of the scratch window: private vmalloc instances of tests and benches live here,
/// in the same TTBR1 tree, never overlapping the global window.
pub const SCRATCH_START: u64 = VMALLOC_END;
/// End of the scratch window. The top 32 MiB of the address space stay unused so that no
/// range end computation can reach 2^64.
pub const SCRATCH_END: u64 = 0xffff_ffff_fe00_0000;

/// The kernel's translation tables. The trees are live (installed in the TTBRs): reading
/// them is safe, changing them is `unsafe`, because a mapping placed over memory the
/// program relies on (a stack guard page, a range another owner has parked until its TLB
/// flush) breaks guarantees safe code depends on.
#[derive(Debug)]
pub struct KernelSpace {
    lower: PageTable,
    upper: PageTable,
    linear: LinearMap,
}

impl KernelSpace {
    /// The identity-mapped lower half (RAM, the image, early devices), for `translate`.
    pub fn lower(&self) -> &PageTable {
        &self.lower
    }

    /// The upper half (vmalloc, ioremap and scratch windows), for `translate`.
    pub fn upper(&self) -> &PageTable {
        &self.upper
    }

    /// How physical memory is reached (identity over RAM).
    pub fn linear(&self) -> LinearMap {
        self.linear
    }

    /// The upper half, to change.
    ///
    /// # Safety
    /// The caller changes only virtual ranges it owns (the window of its vmalloc instance,
    /// or a scratch range no instance uses), never maps over a range whose old translation
    /// may still sit in a TLB (unmapped but not yet flushed), and keeps the contracts of
    /// the `PageTable` methods it calls.
    pub unsafe fn upper_mut(&mut self) -> &mut PageTable {
        &mut self.upper
    }
}

static KERNEL: Once<SpinLock<KernelSpace>> = Once::new();
static LINEAR: Once<LinearMap> = Once::new();
static BOOT_TABLES_USED: Once<PhysRange> = Once::new();

/// The kernel's tables, once [`init`] has turned the MMU on.
pub fn kernel_space() -> Option<&'static SpinLock<KernelSpace>> {
    KERNEL.get()
}

/// The linear map of RAM, once [`init`] has run.
pub fn linear_map() -> Option<LinearMap> {
    LINEAR.get().copied()
}

/// The boot-table pages handed out at boot (reserved from the frame allocator).
pub fn boot_tables_used() -> Option<PhysRange> {
    BOOT_TABLES_USED.get().copied()
}

/// The pages of the boot-table region that boot did not need, once the MMU is on: the
/// frame allocator may hand them out (they lie in the image's identity-mapped data, RW and
/// XN like any RAM). `None` before [`init`] or when every page was used.
pub fn boot_tables_unused() -> Option<PhysRange> {
    let used = boot_tables_used()?;
    PhysRange::from_bounds(used.end(), boot_table_region().end()).ok()
}

/// Whether `pa` lies in the image as it stays reserved for good: the whole image less
/// [`boot_tables_unused`]. Frames there must never be mapped a second time.
pub fn is_image_frame(image: &ImageLayout, pa: PhysAddr) -> bool {
    image.whole.contains(pa) && !boot_tables_unused().is_some_and(|r| r.contains(pa))
}

/// Pages in the boot-table region (`link.ld` reserves this many): the worst case of the
/// boot tree. The lower tree's tables are one root plus, at each end of each mapped piece
/// of RAM, at most one L1, one L2 and one L3 table (a piece's inside is covered by blocks,
/// its ends split them); pieces are the RAM ranges cut by the image and the `no-map`
/// reservations, at most `MAX_RAM_RANGES + MAX_RESERVED + 1`. The image's own page-mapped
/// sections and the early console page add at most 16; the upper tree's root is one
/// more. [`worst_case_tables`] gives the figure for a given tree.
pub const BOOT_TABLE_PAGES: usize = 1024;

/// The table pages the boot tree may need for `ram` cut by `holes` pieces: see
/// [`BOOT_TABLE_PAGES`] (a piece larger than 512 GiB spans more than two L1 slots).
pub fn worst_case_tables(ram: &crate::dtb::RangeList, holes: usize) -> usize {
    let pieces = ram.len() + holes;
    let big_l1 = ram.iter().map(|r| (r.size() >> 39) as usize).sum::<usize>();
    2 + 6 * pieces + big_l1 + 16
}

const _: () = assert!(
    2 + 6 * (crate::dtb::MAX_RAM_RANGES + crate::dtb::MAX_RESERVED + 1) + 16 <= BOOT_TABLE_PAGES,
    "link.ld's boot-table region must hold the worst case"
);

/// Hands out pages of the `link.ld` boot-table region, never frees them.
pub struct BumpTableAlloc {
    next: u64,
    end: u64,
    /// Pages handed out.
    pub used: usize,
}

impl BumpTableAlloc {
    /// A bump allocator over `region` (page aligned).
    ///
    /// # Safety
    /// `region` is RAM reserved for translation tables (link.ld's boot-table region) that
    /// nothing else uses: the walker zeroes and writes every page handed out.
    pub const unsafe fn new(region: PhysRange) -> Self {
        Self { next: region.start().as_u64(), end: region.end().as_u64(), used: 0 }
    }
}

// SAFETY: every page handed out is a distinct, page-aligned page of the region, which
// link.ld reserves for this purpose only, and is never handed out twice.
unsafe impl TableAlloc for BumpTableAlloc {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        if self.next + PAGE_SIZE as u64 > self.end {
            return None;
        }
        let pa = PhysAddr::new(self.next);
        self.next += PAGE_SIZE as u64;
        self.used += 1;
        Some(pa)
    }

    unsafe fn free_table(&mut self, _page: PhysAddr) {
        // Boot tables stay for the program's lifetime.
    }
}

fn boot_table_region() -> PhysRange {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        unsafe extern "C" {
            static __boot_tables_start: u8;
            static __boot_tables_end: u8;
        }
        // SAFETY: only the addresses of the linker symbols are taken.
        let (s, e) = unsafe { (&__boot_tables_start as *const u8 as u64, &__boot_tables_end as *const u8 as u64) };
        PhysRange::from_bounds(PhysAddr::new(s), PhysAddr::new(e)).expect("link.ld boot tables")
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    {
        PhysRange::new(PhysAddr::new(0x4030_0000), 64 * PAGE_SIZE as u64).expect("constant range")
    }
}

fn identity(range: PhysRange) -> VirtRange {
    VirtRange::new(VirtAddr::new(range.start().as_u64()), range.size()).expect("a PhysRange is a valid VirtRange")
}

/// Maps `ram` minus the image's extent as data, using blocks where possible.
/// Calls `f` with each piece of `ram` that no hole overlaps, in address order (holes may
/// overlap each other and need not be sorted).
pub fn for_each_piece<E>(
    ram: PhysRange,
    holes: &[PhysRange],
    mut f: impl FnMut(PhysRange) -> Result<(), E>,
) -> Result<(), E> {
    let end = ram.end().as_u64();
    let mut cursor = ram.start().as_u64();
    while cursor < end {
        // The lowest hole that still reaches past the cursor.
        let next =
            holes.iter().filter(|h| h.end().as_u64() > cursor && h.start().as_u64() < end).min_by_key(|h| h.start());
        let (stop, resume) = match next {
            Some(h) => (h.start().as_u64().max(cursor), h.end().as_u64()),
            None => (end, end),
        };
        if let Ok(piece) = PhysRange::from_bounds(PhysAddr::new(cursor), PhysAddr::new(stop)) {
            f(piece)?;
        }
        cursor = resume;
    }
    Ok(())
}

/// The holes in the linear map: the image (mapped section by section instead) and every
/// `no-map` reservation, rounded out to whole pages. Returns how many were written.
fn linear_map_holes(info: &BootInfo, out: &mut [PhysRange]) -> usize {
    let mut n = 0;
    let no_map = info.platform.reserved.no_map().filter_map(|r| PhysRange::covering_pages(r.start(), r.size()).ok());
    for hole in core::iter::once(info.image.whole).chain(no_map) {
        if let Some(slot) = out.get_mut(n) {
            *slot = hole;
            n += 1;
        }
    }
    n
}

fn build(info: &BootInfo, linear: LinearMap, alloc: &mut BumpTableAlloc) -> Result<KernelSpace, MmuError> {
    let mut lower = PageTable::new(linear, VaRange::Lower, alloc)?;
    let upper = PageTable::new(linear, VaRange::Upper, alloc)?;
    let img = &info.image;
    let mut holes = [img.whole; crate::dtb::MAX_RESERVED + 1];
    let nholes = linear_map_holes(info, &mut holes);
    for ram in info.platform.ram.iter() {
        for_each_piece(ram, &holes[..nholes], |piece| {
            lower.map(identity(piece), piece.start(), Attributes::DATA, BlockPolicy::AllowBlocks, alloc)
        })?;
    }
    let pages = BlockPolicy::PagesOnly;
    lower.map(identity(img.text), img.text.start(), Attributes::CODE, pages, alloc)?;
    lower.map(identity(img.rodata), img.rodata.start(), Attributes::RODATA, pages, alloc)?;
    // .data, .bss and the boot tables (everything up to the boot stack's guard page).
    lower.map(identity(img.data), img.data.start(), Attributes::DATA, pages, alloc)?;
    lower.map(identity(img.boot_stack), img.boot_stack.start(), Attributes::DATA, pages, alloc)?;
    lower.map(identity(img.exception_stack), img.exception_stack.start(), Attributes::DATA, pages, alloc)?;
    // The other CPUs' stacks; their guard pages stay unmapped.
    for stacks in (1..crate::dtb::MAX_CPUS).filter_map(|cpu| crate::smp::CpuStacks::of(img, cpu)) {
        for r in [stacks.stack, stacks.exception_stack] {
            lower.map(identity(r), r.start(), Attributes::DATA, pages, alloc)?;
        }
    }
    if let Some(uart) = info.platform.uart {
        let page = PhysRange::covering_pages(uart.start(), uart.size())?;
        lower.map(identity(page), page.start(), Attributes::DEVICE, pages, alloc)?;
    }
    Ok(KernelSpace { lower, upper, linear })
}

/// Invalidates the data cache lines of `range` (to the point of coherency), so that reads
/// through the caches see what was written to memory with the MMU off.
fn invalidate_dcache(range: PhysRange) {
    #[cfg(all(target_arch = "aarch64", target_os = "none"))]
    {
        let ctr: u64;
        // SAFETY: reading CTR_EL0 has no side effect.
        unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
        let line = 4u64 << ((ctr >> 16) & 0xf);
        let mut a = range.start().as_u64() & !(line - 1);
        while a < range.end().as_u64() {
            // SAFETY: `dc ivac` of lines written (if at all) with the caches off, so memory
            // holds their data and no dirty line of ours can be lost; the boot protocol
            // leaves the rest of the image clean to the point of coherency.
            unsafe { core::arch::asm!("dc ivac, {}", in(reg) a, options(nostack)) };
            a += line;
        }
        // SAFETY: a barrier only.
        unsafe { core::arch::asm!("dsb sy", options(nostack)) };
    }
    #[cfg(not(all(target_arch = "aarch64", target_os = "none")))]
    let _ = range;
}

/// Builds the kernel address space and turns the MMU on with caches. Called once by boot,
/// with the MMU off; it takes no lock until the MMU is on. Returns the boot-table pages used.
///
/// # Errors
/// An [`MmuError`] when the tables cannot be built or the CPU lacks the 4 KiB granule
/// (the MMU then stays off).
pub fn init(info: &BootInfo) -> Result<usize, MmuError> {
    let Some(ram0) = info.platform.ram.iter().next() else { return Err(MmuError::OutOfMemory) };
    // One window over every RAM region: from the lowest start to the highest end. On a
    // machine with holes between RAM regions the window spans them unmapped: that is sound
    // only because its users (the walker, the frame allocator) reach RAM pages alone, never
    // an address of a hole (QEMU virt has one region; several windows would lift the rule).
    let lo = info.platform.ram.iter().map(|r| r.start().as_u64()).min().unwrap_or(ram0.start().as_u64());
    let hi = info.platform.ram.iter().map(|r| r.end().as_u64()).max().unwrap_or(ram0.end().as_u64());
    let window = PhysRange::from_bounds(PhysAddr::new(lo), PhysAddr::new(hi))?;
    // SAFETY: VA == PA for all of RAM: with the MMU off by construction, and after `enable`
    // because `build` maps RAM at its physical address — all but the `no-map` holes, which
    // are reserved, so the window's users (the walker, the frame allocator) never reach them.
    let linear = unsafe { LinearMap::new(window, VirtAddr::new(lo)) };
    let region = boot_table_region();
    // SAFETY: link.ld reserves this region for boot tables, and only this call uses it.
    let mut alloc = unsafe { BumpTableAlloc::new(region) };
    let space = build(info, linear, &mut alloc)?;
    let used = PhysRange::new(region.start(), (alloc.used.max(1) * PAGE_SIZE) as u64)?;
    // Everything written with the caches off and read through them afterwards: the tables
    // (walked cacheable), and the whole image — .data, the BSS cleared by entry.S, the
    // stack this code runs on — plus the DTB. Invalidating drops stale clean lines; memory
    // already holds the data (the boot protocol leaves the image clean to the PoC).
    invalidate_dcache(used);
    invalidate_dcache(info.image.whole);
    invalidate_dcache(info.platform.dtb);
    // SAFETY: `build` maps the code, stacks, data and console at their current (physical)
    // addresses with fitting permissions, so every access after the switch translates to
    // what it did before; the tables live in the reserved boot-table region for good, and
    // no stale cache line covers them (invalidated just above).
    unsafe { crate::mmu::arch::enable(&space.lower, Some(&space.upper)) }?;
    BOOT_TABLES_USED.call_once(|| used);
    LINEAR.call_once(|| linear);
    KERNEL.call_once(|| SpinLock::new(&crate::sync::classes::KERNEL_TABLES, space));
    Ok(alloc.used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange::from_bounds(PhysAddr::new(start), PhysAddr::new(end)).unwrap()
    }

    fn pieces(ram: PhysRange, holes: &[PhysRange]) -> Vec<PhysRange> {
        let mut out = Vec::new();
        for_each_piece::<()>(ram, holes, |p| {
            out.push(p);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn ram_less_holes_in_any_order_and_overlapping() {
        let ram = r(0x4000_0000, 0x8000_0000);
        assert_eq!(pieces(ram, &[]), [ram]);
        let holes = [r(0x6000_0000, 0x6010_0000), r(0x4020_0000, 0x4060_0000), r(0x4050_0000, 0x4070_0000)];
        assert_eq!(
            pieces(ram, &holes),
            [r(0x4000_0000, 0x4020_0000), r(0x4070_0000, 0x6000_0000), r(0x6010_0000, 0x8000_0000)]
        );
        // Holes at the edges, outside RAM, and covering all of it.
        assert_eq!(
            pieces(ram, &[r(0x3000_0000, 0x4000_1000), r(0x7fff_f000, 0x9000_0000)]),
            [r(0x4000_1000, 0x7fff_f000)]
        );
        assert_eq!(pieces(ram, &[r(0x1000, 0x2000)]), [ram]);
        assert!(pieces(ram, &[r(0x3000_0000, 0x9000_0000)]).is_empty());
    }

    #[test]
    fn the_boot_table_region_holds_the_worst_case_of_the_bounds() {
        let mut ram = crate::dtb::RangeList::new();
        for i in 0..crate::dtb::MAX_RAM_RANGES as u64 {
            ram.push(r(i << 33, (i << 33) + (1 << 32))).unwrap();
        }
        assert!(worst_case_tables(&ram, crate::dtb::MAX_RESERVED + 1) <= BOOT_TABLE_PAGES);
    }
}
