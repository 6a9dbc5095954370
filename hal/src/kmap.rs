//! The kernel address space, built at boot from the device tree and `link.ld`.
//!
//! ```text
//!  TTBR0 (lower half): identity map, VA == PA
//!  0x0000_0000_0000_0000  ┌──────────────────────────────┐
//!                         │ unmapped (page 0 and up)     │
//!  uart page              ├──────────────────────────────┤ Device-nGnRE, RW, XN (early console)
//!                         │ unmapped                     │
//!  RAM start              ├──────────────────────────────┤ Normal WB, RW, XN — 1 GiB / 2 MiB blocks
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
//! The image runs from its place in the linear map (identity), so the only mapping of its
//! text is its own, read-only and executable: no writable alias of code exists anywhere.
//! Everything else is execute-never (and `SCTLR_EL1.WXN` is set).

use crate::addr::{PhysAddr, PhysRange, VirtAddr, VirtRange, PAGE_SIZE};
use crate::boot::{BootInfo, ImageLayout};
use crate::linear::LinearMap;
use crate::mmu::{Attributes, BlockPolicy, MmuError, PageTable, TableAlloc, VaRange};
use spin::{Mutex, Once};

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

static KERNEL: Once<Mutex<KernelSpace>> = Once::new();
static LINEAR: Once<LinearMap> = Once::new();
static BOOT_TABLES_USED: Once<PhysRange> = Once::new();

/// The kernel's tables, once [`init`] has turned the MMU on.
pub fn kernel_space() -> Option<&'static Mutex<KernelSpace>> {
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
fn map_ram_around_image(
    table: &mut PageTable,
    ram: PhysRange,
    image: &ImageLayout,
    alloc: &mut BumpTableAlloc,
) -> Result<(), MmuError> {
    let (is, ie) = (image.whole.start().as_u64(), image.whole.end().as_u64());
    let (rs, re) = (ram.start().as_u64(), ram.end().as_u64());
    let pieces = [(rs, is.min(re).max(rs)), (ie.max(rs).min(re), re)];
    for (s, e) in pieces {
        if let Ok(r) = PhysRange::from_bounds(PhysAddr::new(s), PhysAddr::new(e)) {
            table.map(identity(r), r.start(), Attributes::DATA, BlockPolicy::AllowBlocks, alloc)?;
        }
    }
    Ok(())
}

/// Builds the kernel tables (see the module docs) without touching the MMU.
///
/// # Errors
/// An [`MmuError`] when a mapping is refused or the boot-table region runs out.
fn build(info: &BootInfo, linear: LinearMap, alloc: &mut BumpTableAlloc) -> Result<KernelSpace, MmuError> {
    let mut lower = PageTable::new(linear, VaRange::Lower, alloc)?;
    let upper = PageTable::new(linear, VaRange::Upper, alloc)?;
    let img = &info.image;
    for ram in info.platform.ram.iter() {
        map_ram_around_image(&mut lower, ram, img, alloc)?;
    }
    let pages = BlockPolicy::PagesOnly;
    lower.map(identity(img.text), img.text.start(), Attributes::CODE, pages, alloc)?;
    lower.map(identity(img.rodata), img.rodata.start(), Attributes::RODATA, pages, alloc)?;
    // .data, .bss and the boot tables (everything up to the boot stack's guard page).
    lower.map(identity(img.data), img.data.start(), Attributes::DATA, pages, alloc)?;
    lower.map(identity(img.boot_stack), img.boot_stack.start(), Attributes::DATA, pages, alloc)?;
    lower.map(identity(img.exception_stack), img.exception_stack.start(), Attributes::DATA, pages, alloc)?;
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
    // because `build` maps RAM at its physical address.
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
    KERNEL.call_once(|| Mutex::new(space));
    Ok(alloc.used)
}
