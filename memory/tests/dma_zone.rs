//! A `DMA` zone below the device tree's `dma-ranges` limit, where the tree names one: the
//! fixture `hal/testdata/dma-ranges.dtb` (RAM 0x4000_0000 + 2 GiB; the lowest bus reach
//! ends at 0x7000_0000) against QEMU virt's own tree (none).

use std::alloc::{alloc_zeroed, Layout};

use hal::dtb::Platform;
use hal::linear::LinearMap;
use hal::{PhysAddr, VirtAddr, PAGE_SIZE};
use memory::buddy::BuddyAllocator;
use memory::gfp::{GFP_DMA, GFP_DMA32, GFP_KERNEL, ZONE_DMA, ZONE_DMA32};

static DMA_DTB: &[u8] = include_bytes!("../../hal/testdata/dma-ranges.dtb");
static VIRT_DTB: &[u8] = include_bytes!("../../hal/testdata/qemu-virt-1g.dtb");

// Not under Miri with strict provenance: `flat_device_tree` casts every `reg` address to a
// pointer (as for hal's device-tree tests), and the 2 GiB of simulated RAM is reached through
// `LinearMap::new` (exposed provenance). The zone itself runs under Miri in the buddy's
// `a_dma_zone_below_the_dma_limit`.
#[test]
#[cfg_attr(miri, ignore = "flat_device_tree casts reg addresses to pointers (strict provenance)")]
fn a_dma_zone_below_the_device_trees_dma_ranges() {
    let p = Platform::parse(DMA_DTB).unwrap();
    let limit = memory::kernel::dma_zone_limit(&p);
    assert_eq!(limit, Some(PhysAddr::new(0x7000_0000)));
    assert_eq!(memory::kernel::dma_zone_limit(&Platform::parse(VIRT_DTB).unwrap()), None, "QEMU virt: none");
    // The tree's RAM, simulated: 2 GiB of address space that only its metadata touches.
    let ram = p.ram.iter().next().unwrap();
    assert_eq!((ram.start().as_u64(), ram.size()), (0x4000_0000, 2 << 30));
    let layout = Layout::from_size_align(ram.size() as usize, 4 << 20).unwrap();
    // SAFETY: non-zero size.
    let buf = unsafe { alloc_zeroed(layout) };
    assert!(!buf.is_null());
    // SAFETY: the buffer is leaked, reached only through this map.
    let linear = unsafe { LinearMap::new(ram, VirtAddr::new(buf as u64)) };
    // SAFETY: the simulated RAM is used by nothing else for the rest of the process.
    let mut a = unsafe { BuddyAllocator::new_zoned(&[ram], &[], linear, false, limit) }.unwrap();
    let s = a.stats();
    let below = ((0x7000_0000 - 0x4000_0000) / PAGE_SIZE as u64) as usize;
    assert_eq!(s.zones[ZONE_DMA].present, below);
    assert_eq!(s.zones[ZONE_DMA32].present, (ram.size() / PAGE_SIZE as u64) as usize - below);
    assert!(s.buddyinfo().to_string().contains("zone      DMA"), "{}", s.buddyinfo());
    for _ in 0..1000 {
        assert!(a.alloc_gfp(0, GFP_DMA).unwrap().as_u64() < 0x7000_0000);
        let f = a.alloc_gfp(0, GFP_DMA32).unwrap().as_u64();
        assert!((0x7000_0000..1 << 32).contains(&f), "DMA32 first, above the DMA zone: {f:#x}");
    }
    assert!(a.alloc_gfp(0, GFP_KERNEL).unwrap().as_u64() >= 0x7000_0000);
    a.check_consistency().unwrap();
}
