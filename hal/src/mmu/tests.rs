//! Host tests of the walker over heap "RAM": a fake physical window at 0x4000_0000 whose
//! pages are reached through a real [`LinearMap`], tables handed out by an arena allocator
//! that can be told to fail, and a model-based property test against a plain page array.

extern crate std;

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::BTreeSet;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::addr::{PhysRange, VirtRange, PAGE_SIZE};
use crate::linear::LinearMap;

const PG: u64 = PAGE_SIZE as u64;
const RAM_BASE: u64 = 0x4000_0000;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

/// Heap memory posing as physical RAM at `RAM_BASE`, and a table allocator over it.
struct Arena {
    buf: *mut u8,
    layout: Layout,
    linear: LinearMap,
    free: Vec<u64>,
    taken: BTreeSet<u64>,
    /// Fail every allocation once this many have succeeded (None: never).
    fail_after: Option<usize>,
    allocations: usize,
    /// Hand out this (bad) page next, once.
    bogus_next: Option<PhysAddr>,
}

impl Arena {
    fn new(pages: usize) -> Self {
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size.
        let buf = unsafe { alloc_zeroed(layout) };
        assert!(!buf.is_null());
        let phys = PhysRange::new(PhysAddr::new(RAM_BASE), layout.size() as u64).unwrap();
        // SAFETY: `buf` is ours until `drop`, reached only through raw pointers from here on.
        let linear = unsafe { LinearMap::new(phys, VirtAddr::from_ptr(buf)) };
        let free = (0..pages as u64).rev().map(|i| RAM_BASE + i * PG).collect();
        Self { buf, layout, linear, free, taken: BTreeSet::new(), fail_after: None, allocations: 0, bogus_next: None }
    }

    fn outstanding(&self) -> usize {
        self.taken.len()
    }

    /// Scribble over a page, as a recycled buddy page would arrive.
    fn dirty(&self, pa: u64) {
        let p = self.linear.ptr::<u8>(PhysAddr::new(pa));
        // SAFETY: inside the arena, not in use by anyone (it is on the free list).
        unsafe { std::ptr::write_bytes(p, 0xa5, PAGE_SIZE) };
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.buf, self.layout) };
    }
}

// SAFETY: every page handed out is removed from the free list until it comes back.
unsafe impl TableAlloc for Arena {
    fn alloc_table(&mut self) -> Option<PhysAddr> {
        if let Some(bogus) = self.bogus_next.take() {
            self.taken.insert(bogus.as_u64());
            return Some(bogus);
        }
        if self.fail_after.is_some_and(|n| self.allocations >= n) {
            return None;
        }
        let pa = self.free.pop()?;
        self.dirty(pa);
        self.allocations += 1;
        assert!(self.taken.insert(pa));
        Some(PhysAddr::new(pa))
    }

    unsafe fn free_table(&mut self, page: PhysAddr) {
        assert!(self.taken.remove(&page.as_u64()), "freed a page not taken: {page:?}");
        if self.linear.covers(page) && page.is_page_aligned() {
            self.free.push(page.as_u64());
        }
    }
}

fn vr(start: u64, size: u64) -> VirtRange {
    VirtRange::new(VirtAddr::new(start), size).unwrap()
}

fn table(arena: &mut Arena, half: VaRange) -> PageTable {
    let linear = arena.linear;
    PageTable::new(linear, half, arena).unwrap()
}

/// Free a tree and check that exactly its table pages came back.
fn release(t: PageTable, arena: &mut Arena) {
    let expected = arena.outstanding() - t.table_pages();
    // SAFETY: never installed in a TTBR; the tables came from `arena`.
    unsafe { t.free_all(arena) };
    assert_eq!(arena.outstanding(), expected, "table pages leaked or double counted");
}

/// Unmap in a test tree: nothing in a test ever uses the addresses it maps.
fn unmap(t: &mut PageTable, range: VirtRange, arena: &mut Arena) -> Result<u64, MmuError> {
    // SAFETY: test trees are never installed and nothing dereferences their addresses.
    unsafe { t.unmap(range, &HardwareTlb, arena) }
}

/// Protect in a test tree (see [`unmap`]).
fn protect(t: &mut PageTable, range: VirtRange, perms: Permissions, arena: &mut Arena) -> Result<(), MmuError> {
    // SAFETY: as in `unmap`.
    unsafe { t.protect(range, perms, &HardwareTlb, arena) }
}

/// `unmap_with` in a test tree, counting pages (see [`unmap`]).
fn unmap_lazily(t: &mut PageTable, range: VirtRange) -> Result<u64, MmuError> {
    let mut pages = 0;
    // SAFETY: as in `unmap`.
    unsafe { t.unmap_with(range, |_, _, bytes| pages += bytes / PG) }?;
    Ok(pages)
}

fn pa_of(t: &PageTable, va: u64) -> Option<u64> {
    t.translate(VirtAddr::new(va)).map(|tr| tr.phys.as_u64())
}

#[test]
fn one_page_maps_translates_and_unmaps() {
    let mut arena = Arena::new(16);
    let mut t = table(&mut arena, VaRange::Lower);
    t.map(vr(0x1234_5000, PG), PhysAddr::new(0x8000_0000), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena)
        .unwrap();
    // Root + L1 + L2 + L3.
    assert_eq!(t.table_pages(), 4);
    assert_eq!(arena.outstanding(), 4);
    let tr = t.translate(VirtAddr::new(0x1234_5abc)).unwrap();
    assert_eq!(tr.phys, PhysAddr::new(0x8000_0abc));
    assert_eq!(tr.attributes, Some(Attributes::DATA));
    assert_eq!(tr.leaf_size(), PG);
    assert_eq!(pa_of(&t, 0x1234_4fff), None);
    assert_eq!(pa_of(&t, 0x1234_6000), None);
    assert_eq!(unmap(&mut t, vr(0x1234_5000, PG), &mut arena), Ok(1));
    assert_eq!(pa_of(&t, 0x1234_5000), None);
    // Tables are kept (a walk cache may still point at them) and reused.
    assert_eq!(t.table_pages(), 4);
    t.map(vr(0x1234_6000, PG), PhysAddr::new(0x8000_0000), Attributes::RODATA, BlockPolicy::PagesOnly, &mut arena)
        .unwrap();
    assert_eq!(t.table_pages(), 4);
    release(t, &mut arena);
}

#[test]
fn blocks_are_used_where_both_sides_align() {
    let mut arena = Arena::new(16);
    let mut t = table(&mut arena, VaRange::Lower);
    // 1 GiB of RAM at 1 GiB: one L1 block, nothing below the L1 table.
    t.map(vr(GIB, GIB), PhysAddr::new(GIB), Attributes::DATA, BlockPolicy::AllowBlocks, &mut arena).unwrap();
    assert_eq!(t.table_pages(), 2);
    let tr = t.translate(VirtAddr::new(GIB + 0x1234_5678)).unwrap();
    assert_eq!((tr.phys.as_u64(), tr.level), (GIB + 0x1234_5678, 1));

    // [2 MiB - 4 KiB, 6 MiB + 8 KiB) at a PA congruent mod 2 MiB: page, two 2 MiB blocks, pages.
    let start = 4 * GIB + MIB2 - PG;
    t.map(
        vr(start, 2 * MIB2 + 3 * PG),
        PhysAddr::new(0x9000_0000 - PG),
        Attributes::CODE,
        BlockPolicy::AllowBlocks,
        &mut arena,
    )
    .unwrap();
    let sizes: Vec<usize> = [start, start + PG, start + PG + MIB2, start + PG + 2 * MIB2, start + 2 * MIB2 + 2 * PG]
        .iter()
        .map(|&va| t.translate(VirtAddr::new(va)).unwrap().level)
        .collect();
    assert_eq!(sizes, [3, 2, 2, 3, 3]);
    assert_eq!(pa_of(&t, start + PG + 0x1_2345), Some(0x9000_0000 + 0x1_2345));

    // The same range with a PA off by one page cannot use blocks.
    let mut u = table(&mut arena, VaRange::Lower);
    u.map(
        vr(start, 2 * MIB2 + 3 * PG),
        PhysAddr::new(0x9000_0000),
        Attributes::CODE,
        BlockPolicy::AllowBlocks,
        &mut arena,
    )
    .unwrap();
    assert_eq!(u.translate(VirtAddr::new(start + PG)).unwrap().level, 3);
    release(u, &mut arena);

    // Whole blocks unmap; the lazy path refuses a cut through one without touching anything.
    assert_eq!(
        unmap_lazily(&mut t, vr(start + PG, MIB2 + PG)),
        Err(MmuError::WouldSplitBlock(VirtAddr::new(start + PG + MIB2)))
    );
    assert_eq!(pa_of(&t, start + PG), Some(0x9000_0000));
    assert_eq!(unmap(&mut t, vr(start, MIB2 + PG), &mut arena), Ok(513));
    assert_eq!(pa_of(&t, start + MIB2), None);
    assert_eq!(unmap(&mut t, vr(GIB, GIB), &mut arena), Ok(GIB / PG));
    release(t, &mut arena);
}

#[test]
fn a_kept_table_takes_precedence_over_a_block() {
    let mut arena = Arena::new(16);
    let mut t = table(&mut arena, VaRange::Lower);
    let base = 8 * MIB2;
    t.map(vr(base, PG), PhysAddr::new(base), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena).unwrap();
    assert_eq!(unmap(&mut t, vr(base, PG), &mut arena), Ok(1));
    let before = t.table_pages();
    // The L2 entry still points at the (now empty) L3 table: map through it with pages.
    t.map(vr(base, MIB2), PhysAddr::new(base), Attributes::DATA, BlockPolicy::AllowBlocks, &mut arena).unwrap();
    assert_eq!(t.table_pages(), before);
    assert_eq!(t.translate(VirtAddr::new(base + 0x1000)).unwrap().level, 3);
    release(t, &mut arena);
}

#[test]
fn frames_need_not_be_contiguous() {
    let mut arena = Arena::new(16);
    let mut t = table(&mut arena, VaRange::Upper);
    let start = 0xffff_0000_0800_0000;
    let frames = [0x4100_0000, 0x4000_5000, 0x7fff_f000].map(PhysAddr::new);
    t.map_frames(VirtAddr::new(start), &frames, Attributes::DATA, &mut arena).unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(pa_of(&t, start + i as u64 * PG + 8), Some(f.as_u64() + 8));
    }
    assert_eq!(
        t.map_frames(VirtAddr::new(start + 3 * PG), &[PhysAddr::new(0x123)], Attributes::DATA, &mut arena),
        Err(MmuError::Addr(AddrError::Misaligned))
    );
    assert_eq!(
        t.map_frames(VirtAddr::new(start + 3 * PG), &[], Attributes::DATA, &mut arena),
        Err(MmuError::Addr(AddrError::Empty))
    );
    assert_eq!(
        t.map_frames(VirtAddr::new(start + 3 * PG), &[PhysAddr::new(1 << 48)], Attributes::DATA, &mut arena),
        Err(MmuError::PhysTooHigh(PhysAddr::new(1 << 48)))
    );
    release(t, &mut arena);
}

#[test]
fn each_half_refuses_the_other_and_the_top_page() {
    let mut arena = Arena::new(16);
    let mut lo = table(&mut arena, VaRange::Lower);
    let mut hi = table(&mut arena, VaRange::Upper);
    let pa = PhysAddr::new(RAM_BASE);
    let upper = 0xffff_8000_0000_0000;
    assert_eq!(
        lo.map(vr(upper, PG), pa, Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::OutsideVaRange(VirtAddr::new(upper)))
    );
    // Straddling the end of the lower half.
    let edge = (1 << 48) - PG;
    assert_eq!(
        lo.map(vr(edge, 2 * PG), pa, Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::OutsideVaRange(VirtAddr::new(edge)))
    );
    lo.map(vr(edge, PG), pa, Attributes::DATA, BlockPolicy::PagesOnly, &mut arena).unwrap();
    assert_eq!(pa_of(&lo, edge), Some(RAM_BASE));
    assert_eq!(
        hi.map(vr(0x1000, PG), pa, Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::OutsideVaRange(VirtAddr::new(0x1000)))
    );
    assert!(hi.translate(VirtAddr::new(0x1000)).is_none());
    assert!(lo.translate(VirtAddr::new(upper)).is_none());
    // The upper half's first and second-to-last pages work; the last page cannot be expressed.
    hi.map(vr(0xffff_0000_0000_0000, PG), pa, Attributes::DATA, BlockPolicy::PagesOnly, &mut arena).unwrap();
    let top = u64::MAX - (PG - 1);
    hi.map_frames(VirtAddr::new(top - PG), &[pa], Attributes::DATA, &mut arena).unwrap();
    assert_eq!(pa_of(&hi, top - 1), Some(RAM_BASE + PG - 1));
    assert_eq!(
        hi.map_frames(VirtAddr::new(top), &[pa], Attributes::DATA, &mut arena),
        Err(MmuError::Addr(AddrError::Overflow))
    );
    assert_eq!(
        lo.map(vr(0x1000, PG), PhysAddr::new((1 << 48) - PG), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Ok(())
    );
    assert_eq!(
        lo.map(vr(0x2000, 2 * PG), PhysAddr::new((1 << 48) - PG), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::PhysTooHigh(PhysAddr::new((1 << 48) - PG)))
    );
    assert_eq!(
        lo.map(vr(0x2001, PG), pa, Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::Addr(AddrError::Misaligned))
    );
    release(lo, &mut arena);
    release(hi, &mut arena);
}

#[test]
fn mapping_over_a_mapped_page_changes_nothing() {
    let mut arena = Arena::new(32);
    let mut t = table(&mut arena, VaRange::Lower);
    // One page mapped at the far end of a range that needs new tables at its start.
    let start = 0x7f_ffe0_0000; // crosses the 512 GiB (L0) boundary at 0x80_0000_0000
    t.map(vr(start + 4 * MIB2, PG), PhysAddr::new(0x1000), Attributes::RODATA, BlockPolicy::PagesOnly, &mut arena)
        .unwrap();
    let tables = t.table_pages();
    let taken = arena.outstanding();
    assert_eq!(
        t.map(vr(start, 4 * MIB2 + PG), PhysAddr::new(0), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::AlreadyMapped(VirtAddr::new(start + 4 * MIB2)))
    );
    assert_eq!((t.table_pages(), arena.outstanding()), (tables, taken));
    for va in (start..start + 4 * MIB2).step_by(PG as usize) {
        assert_eq!(pa_of(&t, va), None);
    }
    assert_eq!(t.translate(VirtAddr::new(start + 4 * MIB2)).unwrap().attributes, Some(Attributes::RODATA));
    release(t, &mut arena);
}

#[test]
fn running_out_of_table_pages_gives_everything_back() {
    let mut arena = Arena::new(64);
    let mut t = table(&mut arena, VaRange::Lower);
    // 8 MiB across an L0 boundary: needs 2 L1, 2 L2, 4 L3 tables = 8.
    let start = 0x80_0000_0000 - 2 * MIB2;
    let range = vr(start, 4 * MIB2);
    for allowed in 0..8 {
        arena.fail_after = Some(arena.allocations + allowed);
        assert_eq!(
            t.map(range, PhysAddr::new(0), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
            Err(MmuError::OutOfMemory),
            "{allowed} tables allowed"
        );
        assert_eq!((t.table_pages(), arena.outstanding()), (1, 1));
        assert_eq!(pa_of(&t, start), None);
    }
    arena.fail_after = Some(arena.allocations + 8);
    t.map(range, PhysAddr::new(0), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena).unwrap();
    assert_eq!(t.table_pages(), 9);
    assert_eq!(pa_of(&t, start + 4 * MIB2 - 1), Some(4 * MIB2 - 1));
    assert_eq!(arena.outstanding(), 9);
    arena.fail_after = None;
    release(t, &mut arena);
}

#[test]
fn a_bad_table_page_is_refused_and_returned() {
    let mut arena = Arena::new(16);
    for bogus in [RAM_BASE + 8, 0x1000, RAM_BASE + 16 * PG] {
        arena.bogus_next = Some(PhysAddr::new(bogus));
        let linear = arena.linear;
        assert_eq!(
            PageTable::new(linear, VaRange::Lower, &mut arena).map(|_| ()),
            Err(MmuError::BadTablePage(PhysAddr::new(bogus)))
        );
        assert_eq!(arena.outstanding(), 0);
    }
    let mut t = table(&mut arena, VaRange::Lower);
    arena.bogus_next = Some(PhysAddr::new(RAM_BASE + 1));
    assert_eq!(
        t.map(vr(0x1000, PG), PhysAddr::new(0), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena),
        Err(MmuError::BadTablePage(PhysAddr::new(RAM_BASE + 1)))
    );
    assert_eq!((t.table_pages(), arena.outstanding()), (1, 1));
    release(t, &mut arena);
}

#[test]
fn protect_changes_permissions_only_and_all_or_nothing() {
    let mut arena = Arena::new(16);
    let mut t = table(&mut arena, VaRange::Lower);
    let base = 0x4000_0000;
    t.map(vr(base, 4 * PG), PhysAddr::new(0x8000_0000), Attributes::DATA, BlockPolicy::PagesOnly, &mut arena).unwrap();
    t.map(vr(base + 5 * PG, PG), PhysAddr::new(0x0900_0000), Attributes::DEVICE, BlockPolicy::PagesOnly, &mut arena)
        .unwrap();
    protect(&mut t, vr(base + PG, 2 * PG), Permissions::ReadExecute, &mut arena).unwrap();
    let attrs: Vec<_> =
        (0..4).map(|i| t.translate(VirtAddr::new(base + i * PG)).unwrap().attributes.unwrap()).collect();
    assert_eq!(attrs, [Attributes::DATA, Attributes::CODE, Attributes::CODE, Attributes::DATA]);
    assert_eq!(pa_of(&t, base + PG), Some(0x8000_1000));

    // A hole at page 4: nothing changes, page 0-3 keep their permissions.
    assert_eq!(
        protect(&mut t, vr(base, 6 * PG), Permissions::ReadOnly, &mut arena),
        Err(MmuError::NotMapped(VirtAddr::new(base + 4 * PG)))
    );
    assert_eq!(t.translate(VirtAddr::new(base)).unwrap().attributes, Some(Attributes::DATA));
    // Device memory never becomes executable.
    assert_eq!(
        protect(&mut t, vr(base + 5 * PG, PG), Permissions::ReadExecute, &mut arena),
        Err(MmuError::ExecutableDevice)
    );
    protect(&mut t, vr(base + 5 * PG, PG), Permissions::ReadOnly, &mut arena).unwrap();
    let dev_ro = Attributes::new(MemoryType::DeviceNGnRE, Permissions::ReadOnly).unwrap();
    assert_eq!(t.translate(VirtAddr::new(base + 5 * PG)).unwrap().attributes, Some(dev_ro));
    release(t, &mut arena);
}

#[test]
fn enable_checks_which_half_each_tree_is_for() {
    let mut arena = Arena::new(16);
    let lo = table(&mut arena, VaRange::Lower);
    let hi = table(&mut arena, VaRange::Upper);
    // SAFETY: on the host `enable` executes no instruction.
    unsafe {
        assert_eq!(arch::enable(&hi, None), Err(MmuError::WrongVaRange));
        assert_eq!(arch::enable(&lo, Some(&lo)), Err(MmuError::WrongVaRange));
        assert_eq!(arch::enable(&lo, Some(&hi)), Ok(()));
    }
    release(lo, &mut arena);
    release(hi, &mut arena);
}

#[test]
fn errors_display() {
    let e = MmuError::AlreadyMapped(VirtAddr::new(0x1000));
    assert_eq!(std::format!("{e}"), "0x1000 is already mapped");
    assert_eq!(std::format!("{}", MmuError::from(AddrError::Empty)), "empty range");
}

// ---- model-based property test --------------------------------------------------------------

/// Pages in the model window: 8 MiB.
const WINDOW_PAGES: u64 = 2048;

#[derive(Clone, Debug)]
enum Op {
    Map { page: u64, pages: u64, pa: u64, attrs: Attributes, blocks: bool },
    MapFrames { page: u64, frames: Vec<u64>, attrs: Attributes },
    Unmap { page: u64, pages: u64 },
    Protect { page: u64, pages: u64, perms: Permissions },
}

fn attrs_strategy() -> impl Strategy<Value = Attributes> {
    prop_oneof![
        Just(Attributes::DATA),
        Just(Attributes::RODATA),
        Just(Attributes::CODE),
        Just(Attributes::DEVICE),
        Just(Attributes::new(MemoryType::NormalNonCacheable, Permissions::ReadWrite).unwrap()),
    ]
}

fn perms_strategy() -> impl Strategy<Value = Permissions> {
    prop_oneof![Just(Permissions::ReadOnly), Just(Permissions::ReadWrite), Just(Permissions::ReadExecute)]
}

/// A page index and a length that stays in the window; lengths up to 1,100 pages so that
/// 2 MiB blocks happen.
fn extent() -> impl Strategy<Value = (u64, u64)> {
    (0..WINDOW_PAGES, prop_oneof![1..8u64, 1..1100u64]).prop_map(|(page, pages)| (page, pages.min(WINDOW_PAGES - page)))
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (extent(), 0..4096u64, any::<bool>(), attrs_strategy(), any::<bool>()).prop_map(
            |((page, pages), pa_page, congruent, attrs, blocks)| {
                // A PA congruent to the VA modulo 2 MiB (so blocks are possible), or any page.
                let pa = if congruent { (pa_page * 512 + page % 512) * PG } else { pa_page * PG };
                Op::Map { page, pages, pa, attrs, blocks }
            }
        ),
        2 => (0..WINDOW_PAGES, proptest::collection::vec(0..(1u64 << 36), 1..40), attrs_strategy())
            .prop_map(|(page, frames, attrs)| {
                let n = frames.len().min((WINDOW_PAGES - page) as usize);
                Op::MapFrames { page, frames: frames[..n].iter().map(|f| f * PG).collect(), attrs }
            }),
        // Whole 2 MiB blocks at a congruent PA: the block paths (and block/page mixes).
        2 => (0..4u64, 1..4u64, 0..64u64, attrs_strategy()).prop_map(|(block, n, pa_block, attrs)| {
            let n = n.min(4 - block);
            Op::Map { page: block * 512, pages: n * 512, pa: pa_block * MIB2, attrs, blocks: true }
        }),
        3 => extent().prop_map(|(page, pages)| Op::Unmap { page, pages }),
        1 => (extent(), perms_strategy()).prop_map(|((page, pages), perms)| Op::Protect { page, pages, perms }),
    ]
}

type Model = Vec<Option<(u64, Attributes)>>;

fn check_matches(t: &PageTable, base: u64, model: &Model) -> Result<(), TestCaseError> {
    for (i, want) in model.iter().enumerate() {
        let va = base + i as u64 * PG;
        let got = t.translate(VirtAddr::new(va)).map(|tr| (tr.phys.as_u64(), tr.attributes.unwrap()));
        prop_assert_eq!(got, *want, "page {} ({:#x})", i, va);
    }
    Ok(())
}

fn run_model(base: u64, half: VaRange, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut arena = Arena::new(64);
    let mut t = table(&mut arena, half);
    let mut model: Model = std::vec![None; WINDOW_PAGES as usize];
    let va = |page: u64| base + page * PG;
    for op in ops {
        let before = model.clone();
        let tables_before = t.table_pages();
        match op {
            Op::Map { page, pages, pa, attrs, blocks } => {
                let policy = if *blocks { BlockPolicy::AllowBlocks } else { BlockPolicy::PagesOnly };
                let r = t.map(vr(va(*page), pages * PG), PhysAddr::new(*pa), *attrs, policy, &mut arena);
                let clash = (*page..page + pages).find(|&p| model[p as usize].is_some());
                match clash {
                    Some(p) => {
                        prop_assert_eq!(r, Err(MmuError::AlreadyMapped(VirtAddr::new(va(p)))))
                    }
                    None => {
                        prop_assert_eq!(r, Ok(()));
                        for i in 0..*pages {
                            model[(page + i) as usize] = Some((pa + i * PG, *attrs));
                        }
                    }
                }
            }
            Op::MapFrames { page, frames, attrs } => {
                let pas: Vec<PhysAddr> = frames.iter().map(|&f| PhysAddr::new(f)).collect();
                let r = t.map_frames(VirtAddr::new(va(*page)), &pas, *attrs, &mut arena);
                let n = frames.len() as u64;
                match (*page..page + n).find(|&p| model[p as usize].is_some()) {
                    Some(p) => {
                        prop_assert_eq!(r, Err(MmuError::AlreadyMapped(VirtAddr::new(va(p)))))
                    }
                    None => {
                        prop_assert_eq!(r, Ok(()));
                        for (i, f) in frames.iter().enumerate() {
                            model[*page as usize + i] = Some((*f, *attrs));
                        }
                    }
                }
            }
            Op::Unmap { page, pages } => {
                let range = *page as usize..(page + pages) as usize;
                let mut leaves = Vec::new();
                // SAFETY: test trees are never installed; nothing uses the window.
                let r = unsafe { t.unmap_with(vr(va(*page), pages * PG), |v, p, n| leaves.push((v, p, n))) };
                match r {
                    Ok(()) => {
                        // Every mapped page reported once, with its frame, in ascending order.
                        let mut reported = Vec::new();
                        for (v, p, n) in leaves {
                            for off in (0..n).step_by(PG as usize) {
                                let i = (v.as_u64() + off - base) / PG;
                                reported.push((i, p.as_u64() + off));
                            }
                        }
                        let expected: Vec<(u64, u64)> =
                            range.clone().filter_map(|i| model[i].map(|(pa, _)| (i as u64, pa))).collect();
                        prop_assert_eq!(reported, expected);
                        model[range].fill(None);
                    }
                    Err(MmuError::WouldSplitBlock(at)) => {
                        prop_assert!(leaves.is_empty());
                        let tr = t.translate(at).unwrap();
                        prop_assert!(tr.level < 3, "split reported on a page at {:?}", at);
                    }
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
            }
            Op::Protect { page, pages, perms } => {
                let range = *page as usize..(page + pages) as usize;
                match protect(&mut t, vr(va(*page), pages * PG), *perms, &mut arena) {
                    Ok(()) => {
                        for m in model[range].iter_mut() {
                            let (pa, a) = m.unwrap();
                            *m = Some((pa, a.with_permissions(*perms).unwrap()));
                        }
                    }
                    Err(MmuError::NotMapped(at)) => {
                        let p = (at.as_u64() - base) / PG;
                        prop_assert!(range.contains(&(p as usize)) && model[p as usize].is_none());
                    }
                    Err(MmuError::ExecutableDevice) => prop_assert!(
                        *perms == Permissions::ReadExecute
                            && model[range].iter().any(|m| m.is_some_and(|(_, a)| a.memory_type().is_device()))
                    ),
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
            }
        }
        if model == before {
            // Failed (or a no-op): not a single table may have been added.
            prop_assert_eq!(t.table_pages(), tables_before);
        }
        prop_assert_eq!(t.table_pages(), arena.outstanding(), "table pages leaked or lost");
        check_matches(&t, base, &model)?;
    }
    release(t, &mut arena);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A window that crosses an L0, an L1 and L2 boundaries in the lower half.
    #[test]
    fn walker_matches_a_page_array_lower(ops in proptest::collection::vec(op_strategy(), 1..64)) {
        run_model(0x80_0000_0000 - 4 * (1 << 20), VaRange::Lower, &ops)?;
    }

    /// The same in the upper half, just below its last L0 entry.
    #[test]
    fn walker_matches_a_page_array_upper(ops in proptest::collection::vec(op_strategy(), 1..64)) {
        run_model(0xffff_ff80_0000_0000 - 4 * (1 << 20), VaRange::Upper, &ops)?;
    }
}

/// Host cost of the vmalloc-shaped path: map `n` frames, translate one, unmap them.
/// `cargo test -p hal --release -- --ignored --nocapture mmu::tests::host_timing`
#[test]
#[ignore]
fn host_timing() {
    let mut arena = Arena::new(64);
    let mut t = table(&mut arena, VaRange::Upper);
    let base = 0xffff_8000_1000_0000;
    for n in [1usize, 8, 64, 256] {
        let frames: Vec<PhysAddr> = (0..n as u64).map(|i| PhysAddr::new(RAM_BASE + i * 3 * PG)).collect();
        let rounds = 200_000 / n.max(1) + 1000;
        let start = std::time::Instant::now();
        for r in 0..rounds {
            let va = base + (r as u64 % 64) * 0x10_0000;
            t.map_frames(VirtAddr::new(va), &frames, Attributes::DATA, &mut arena).unwrap();
            assert!(t.translate(VirtAddr::new(va)).is_some());
            let pages = unmap_lazily(&mut t, vr(va, n as u64 * PG)).unwrap();
            assert_eq!(pages, n as u64);
        }
        let per = start.elapsed().as_nanos() as f64 / rounds as f64;
        std::println!("{n:4} pages: {per:8.0} ns per map+translate+unmap, {:.1} ns/page", per / n as f64);
    }
    release(t, &mut arena);
}
