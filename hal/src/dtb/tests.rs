//! Host tests of the device-tree reader against `dtc`-built and QEMU-dumped fixtures
//! (`hal/testdata/make-fixtures` rebuilds them from `hal/testdata/dts/`).

use super::*;
use crate::addr::PAGE_SIZE;

// `qemu-system-aarch64 -machine virt -m 1G -append "a=1 shell" -machine dumpdtb=...`
static VIRT_DTB: &[u8] = include_bytes!("../../testdata/qemu-virt-1g.dtb");
// QEMU's tree after its `-dtb` fixups: the old memory node is 54 NOP tokens, and
// /reserved-memory (three 1 MiB carve-outs) and /chosen (bootargs) come after them.
static FIXUPS_DTB: &[u8] = include_bytes!("../../testdata/qemu-virt-fixups.dtb");
static RESERVED_1CELL: &[u8] = include_bytes!("../../testdata/reserved-1cell.dtb");
static RESERVED_2CELL: &[u8] = include_bytes!("../../testdata/reserved-2cell.dtb");
static RESERVED_128: &[u8] = include_bytes!("../../testdata/reserved-128.dtb");
static RESERVED_200: &[u8] = include_bytes!("../../testdata/reserved-200.dtb");
static TRANSLATED: &[u8] = include_bytes!("../../testdata/reserved-translated.dtb");
static UNPLACEABLE: &[u8] = include_bytes!("../../testdata/reserved-unplaceable.dtb");

fn range(start: u64, size: u64) -> PhysRange {
    PhysRange::new(PhysAddr::new(start), size).unwrap()
}

/// A `'static` copy of `blob` with its NOPs removed, as boot leaves the tree.
fn stripped(blob: &[u8]) -> &'static [u8] {
    let copy: &'static mut [u8] = Box::leak(blob.to_vec().into_boxed_slice());
    strip_nops(copy).unwrap();
    copy
}

#[test]
fn reads_qemu_virt() {
    let p = Platform::parse(VIRT_DTB).unwrap();
    assert_eq!(p.ram.len(), 1);
    let ram = p.ram.iter().next().unwrap();
    assert_eq!((ram.start().as_u64(), ram.size()), (0x4000_0000, 1 << 30));
    assert_eq!(p.uart.unwrap().start().as_u64(), 0x0900_0000);
    assert_eq!(p.gic_distributor.unwrap().start().as_u64(), 0x0800_0000);
    assert_eq!(p.psci, Some(Conduit::Hvc));
    assert_eq!(p.bootargs, "a=1 shell");
    assert!(p.model.contains("virt"));
    assert!(p.reserved.is_empty());
    // At -smp 1 QEMU gives the one CPU no enable-method.
    assert_eq!(p.cpus.iter().collect::<Vec<_>>(), [(0, false)]);
}

#[test]
fn lists_every_cpu_with_its_mpidr_and_enable_method() {
    static SMP4: &[u8] = include_bytes!("../../testdata/qemu-virt-smp4.dtb");
    let p = Platform::parse(SMP4).unwrap();
    assert_eq!(p.cpus.iter().collect::<Vec<_>>(), [(0, true), (1, true), (2, true), (3, true)]);
    let gic = p.gic.unwrap();
    assert_eq!(gic.version, GicVersion::V2);
    assert_eq!(gic.regs[0], Some(range(0x0800_0000, 0x1_0000)));
    assert_eq!(gic.regs[1], Some(range(0x0801_0000, 0x1_0000)));
    assert_eq!(p.timer_intid, Some(27));
    assert_eq!(p.cpus.beyond, 0);
}

#[test]
fn reads_a_gicv3_and_its_redistributors() {
    static GICV3: &[u8] = include_bytes!("../../testdata/qemu-virt-gicv3-smp4.dtb");
    let p = Platform::parse(GICV3).unwrap();
    let gic = p.gic.unwrap();
    assert_eq!(gic.version, GicVersion::V3);
    assert_eq!(gic.distributor(), Some(range(0x0800_0000, 0x1_0000)));
    assert_eq!(gic.regs[1], Some(range(0x080a_0000, 0xf6_0000)), "one redistributor region");
    assert_eq!(p.timer_intid, Some(27));
}

#[test]
fn refuses_garbage() {
    static GARBAGE: [u8; 16] = [0; 16];
    assert_eq!(Platform::parse(&GARBAGE).unwrap_err(), DtbError::BadMagic);
}

/// The root cause of "/reserved-memory has no effect": QEMU's `-dtb` fixups leave NOP
/// tokens, after which `flat_device_tree` finds no sibling node. Parsing such a blob is
/// refused rather than misread.
#[test]
fn qemu_fixups_leave_nops_that_hide_later_nodes() {
    assert_eq!(count_nops(FIXUPS_DTB), Ok(54));
    assert_eq!(Platform::parse(FIXUPS_DTB).unwrap_err(), DtbError::NopTokens(54));
    // What the crate alone makes of it: the nodes after the NOPs are not found.
    let fdt = Fdt::new(FIXUPS_DTB).unwrap();
    assert!(fdt.find_node("/reserved-memory").is_none());
    assert!(fdt.chosen().is_err());
}

#[test]
fn stripped_qemu_fixups_show_reserved_memory_and_bootargs() {
    let blob = stripped(FIXUPS_DTB);
    assert_eq!(count_nops(blob), Ok(0));
    assert_eq!(blob.len(), FIXUPS_DTB.len(), "the blob keeps its size");
    let p = Platform::parse(blob).unwrap();
    let got: Vec<_> = p.reserved.iter().map(|r| (r.range, r.name, r.no_map, r.kind)).collect();
    assert_eq!(
        got,
        [
            (range(0x4800_0000, 1 << 20), "carveout@48000000", false, ReservedKind::Static),
            (range(0x4820_0000, 1 << 20), "carveout@48200000", false, ReservedKind::Static),
            (range(0x4840_0000, 1 << 20), "carveout@48400000", false, ReservedKind::Static),
        ]
    );
    assert_eq!(p.bootargs, "from=cmdline");
    assert_eq!(p.ram.iter().next().unwrap(), range(0x4000_0000, 1 << 30));
    assert_eq!(p.uart.unwrap().start().as_u64(), 0x0900_0000);
}

#[test]
fn strip_nops_is_idempotent_and_refuses_garbage_unchanged() {
    let blob = stripped(FIXUPS_DTB);
    let mut again = blob.to_vec();
    assert_eq!(strip_nops(&mut again), Ok(0));
    assert_eq!(&again[..], blob);
    // A token the walk does not know: refused, nothing written.
    let mut bad = FIXUPS_DTB.to_vec();
    let off = u32::from_be_bytes(bad[8..12].try_into().unwrap()) as usize;
    let end = off + u32::from_be_bytes(bad[36..40].try_into().unwrap()) as usize;
    bad[end - 4..end].copy_from_slice(&7u32.to_be_bytes());
    let before = bad.clone();
    assert_eq!(strip_nops(&mut bad), Err(Malformed));
    assert_eq!(bad, before);
    // Truncated blobs never panic.
    for cut in [0, 8, 39, 40, 100, FIXUPS_DTB.len() / 2] {
        let mut short = FIXUPS_DTB[..cut].to_vec();
        assert_eq!(strip_nops(&mut short), Err(Malformed));
    }
}

fn check_reserved_fixture(blob: &'static [u8]) {
    let p = Platform::parse(blob).unwrap();
    let all: Vec<_> = p.reserved.iter().copied().collect();
    let find = |name: &str| all.iter().filter(|r| r.name == name).copied().collect::<Vec<_>>();
    assert_eq!(find("/memreserve/").iter().map(|r| r.range).collect::<Vec<_>>(), [range(0x4f00_0000, 0x2000)]);
    assert_eq!(
        find("fw@48000000").iter().map(|r| (r.range, r.no_map)).collect::<Vec<_>>(),
        [(range(0x4800_0000, 1 << 20), false)]
    );
    assert_eq!(
        find("shm@48100000").iter().map(|r| (r.range, r.no_map)).collect::<Vec<_>>(),
        [(range(0x4810_0000, 0x1_0000), true)]
    );
    assert_eq!(
        find("two@49000000").iter().map(|r| r.range).collect::<Vec<_>>(),
        [range(0x4900_0000, 0x1000), range(0x4910_0000, 0x2000)]
    );
    assert!(find("off@4a000000").is_empty(), "disabled children are skipped");
    // size-only children are placed top-down inside their alloc-ranges, aligned, clear of
    // everything else.
    let pool = find("pool");
    assert_eq!(pool.len(), 1);
    let pool = pool[0];
    assert_eq!(pool.kind, ReservedKind::Dynamic);
    assert_eq!(pool.range.size(), 0x40_0000);
    assert_eq!(pool.range.start().as_u64() % 0x20_0000, 0);
    assert_eq!(pool.range.end().as_u64(), 0x5000_0000, "highest place inside alloc-ranges 0x40000000+256M");
    let anywhere = find("anywhere")[0];
    assert!(anywhere.no_map && anywhere.kind == ReservedKind::Dynamic);
    assert_eq!(anywhere.range.end().as_u64(), 0x8000_0000, "top of RAM");
    assert_eq!(anywhere.range.start().as_u64() % PAGE_SIZE as u64, 0);
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.kind == ReservedKind::Dynamic || b.kind == ReservedKind::Dynamic {
                assert!(!a.range.overlaps(&b.range), "{a} overlaps {b}");
            }
        }
    }
    assert_eq!(p.reserved.no_map().count(), 2);
}

#[test]
fn reserved_memory_with_one_cell() {
    check_reserved_fixture(RESERVED_1CELL);
}

#[test]
fn reserved_memory_with_two_cells() {
    check_reserved_fixture(RESERVED_2CELL);
}

#[test]
fn dynamic_placement_avoids_what_boot_names() {
    // The image at the top of RAM: "anywhere" goes below it.
    let image = range(0x7fe0_0000, 0x20_0000);
    let p = Platform::parse_avoiding(RESERVED_2CELL, &[image]).unwrap();
    let anywhere = p.reserved.iter().find(|r| r.name == "anywhere").unwrap();
    assert_eq!(anywhere.range.end(), image.start());
}

#[test]
fn more_ranges_than_any_fixed_array_are_kept_up_to_the_bound() {
    let p = Platform::parse(RESERVED_128).unwrap();
    assert_eq!(p.reserved.len(), MAX_RESERVED);
    for (i, r) in p.reserved.iter().enumerate() {
        assert_eq!(r.range, range(0x5000_0000 + i as u64 * 0x1_0000, 0x1000));
    }
}

#[test]
fn past_the_bound_the_tree_is_refused_with_its_count() {
    let e = Platform::parse(RESERVED_200).unwrap_err();
    assert_eq!(e, DtbError::TooMany { what: "reserved ranges", found: 200, max: MAX_RESERVED });
    assert_eq!(e.to_string(), "device tree names 200 reserved ranges; at most 128 are supported");
}

#[test]
fn translated_reserved_memory_is_refused() {
    assert!(matches!(Platform::parse(TRANSLATED), Err(DtbError::BadReserved(_))));
}

#[test]
fn unplaceable_dynamic_child_is_refused_by_name() {
    assert_eq!(Platform::parse(UNPLACEABLE).unwrap_err(), DtbError::CannotPlace("huge"));
}

#[test]
fn range_list_refuses_past_capacity() {
    let mut l = RangeList::new();
    for i in 0..MAX_RAM_RANGES as u64 {
        l.push(range(i << 20, 4096)).unwrap();
    }
    assert_eq!(l.push(range(1 << 40, 4096)), Err(Full));
    assert_eq!(l.len(), MAX_RAM_RANGES);
}

#[test]
fn dma_ranges_give_the_lowest_reach_translated_to_cpu_addresses() {
    static DMA: &[u8] = include_bytes!("../../testdata/dma-ranges.dtb");
    let p = Platform::parse(DMA).unwrap();
    // soc: 0x8000_0000; its subbus, through soc's ranges: 0x7000_0000; PCI: 0x7800_0000;
    // an empty dma-ranges and a disabled bus set none.
    assert_eq!(p.dma_limit, Some(PhysAddr::new(0x7000_0000)));
    // QEMU virt has no dma-ranges: no limit.
    assert_eq!(Platform::parse(VIRT_DTB).unwrap().dma_limit, None);
}
