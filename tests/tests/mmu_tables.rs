//! Edits of the live kernel tables on target, MMU on: a second mapping of a frame aliases
//! it, `protect` to read-only makes writes fault, `unmap` flushes so the next read faults,
//! a block split at runtime (break-before-make) keeps the rest of the block mapped, and
//! `unmap_and_reclaim` gives every table page back.
//!
//! Everything happens in the upper half (TTBR1), in a corner of `hal::kmap`'s scratch window
//! that no other user of this binary touches; table pages come from the buddy allocator.
#![no_std]
#![no_main]

use hal::exception::{ExceptionClass, Fault};
use hal::mmu::descriptor::{Descriptor, Entry};
use hal::mmu::{Attributes, BlockPolicy, EntryWrite, HardwareTlb, Permissions, RecordingTlb, TlbEvent, TlbOp};
use hal::{probe, VirtAddr, VirtRange, PAGE_SIZE};
use memory::buddy::{Frames, GlobalTableAlloc};
use tests::test;

const PG: u64 = PAGE_SIZE as u64;
const MIB2: u64 = 2 << 20;
/// 64 GiB below the top of the address space: inside `hal::kmap`'s scratch window
/// (`SCRATCH_START..SCRATCH_END`), far from the slots vmalloc's private test instances use.
const WINDOW: u64 = 0xffff_fff0_0000_0000;

static TLB: RecordingTlb = RecordingTlb::new();

fn kernel() -> hal::sync::SpinLockGuard<'static, hal::kmap::KernelSpace> {
    hal::kmap::kernel_space().expect("MMU is on").lock()
}

fn free_pages() -> usize {
    memory::buddy::stats().expect("buddy is up").free_pages
}

fn vr(start: u64, size: u64) -> VirtRange {
    VirtRange::new(VirtAddr::new(start), size).unwrap()
}

fn map(va: u64, frames: &Frames, size: u64, attrs: Attributes, policy: BlockPolicy) {
    // SAFETY: the test maps fresh pages of the scratch window, which no vmalloc instance uses.
    unsafe { kernel().upper_mut().map(vr(va, size), frames.phys(), attrs, policy, &mut GlobalTableAlloc) }
        .expect("map");
}

/// Unmap `va .. va + size` from the live upper tree, flushing, and free emptied tables.
fn reclaim(va: u64, size: u64) -> u64 {
    // SAFETY: the range belongs to this test; nothing refers into it any more (every access
    // to it went through probes or volatile reads that are over).
    unsafe { kernel().upper_mut().unmap_and_reclaim(vr(va, size), &HardwareTlb, &mut GlobalTableAlloc) }.expect("unmap")
}

/// DFSC (`ESR_EL1[5:0]`) kinds: 0b0001xx translation fault, 0b0011xx permission fault.
fn is_translation_fault(f: &Fault) -> bool {
    f.esr & 0b11_1100 == 0b00_0100
}

fn is_permission_fault(f: &Fault) -> bool {
    f.esr & 0b11_1100 == 0b00_1100
}

fn read(va: u64) -> u64 {
    probe::read_u64(va as usize).unwrap_or_else(|f| panic!("read of {va:#x} faulted: {f}"))
}

fn second_mapping_aliases_the_frame() {
    let free = free_pages();
    let frame = Frames::alloc_zeroed(0).unwrap();
    let lin = frame.virt().as_u64();
    let va = WINDOW;
    map(va, &frame, PG, Attributes::DATA, BlockPolicy::PagesOnly);
    // SAFETY: `va` maps the frame this test owns, writable.
    unsafe { probe::write_u64(va as usize + 8, 0x1234_5678_9abc_def0) }.unwrap();
    // SAFETY: the linear-map address of the same frame, ours.
    assert_eq!(unsafe { core::ptr::read_volatile((lin + 8) as *const u64) }, 0x1234_5678_9abc_def0);
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile((lin + 0xff8) as *mut u64, 0x0bad_cafe) };
    assert_eq!(read(va + 0xff8), 0x0bad_cafe);
    assert_eq!(kernel().upper().translate(VirtAddr::new(va + 8)).unwrap().phys, frame.phys().add(8));
    assert_eq!(reclaim(va, PG), 1);
    drop(frame);
    assert_eq!(free_pages(), free, "frame and table pages all back");
}

fn protect_to_read_only_then_write_faults() {
    let frame = Frames::alloc_zeroed(0).unwrap();
    let va = WINDOW + PG;
    map(va, &frame, PG, Attributes::DATA, BlockPolicy::PagesOnly);
    // SAFETY: writable, ours.
    unsafe { probe::write_u64(va as usize, 7) }.unwrap();
    TLB.clear_log();
    // SAFETY: nothing holds a mutable reference into the page.
    unsafe { kernel().upper_mut().protect(vr(va, PG), Permissions::ReadOnly, &TLB, &mut GlobalTableAlloc) }.unwrap();
    // In place (no break), then the stale writable entry is dropped.
    let log = TLB.take_log();
    let expected = [TlbOp::DsbIshst, TlbOp::LastLevel(VirtAddr::new(va)), TlbOp::DsbIsh, TlbOp::Isb];
    assert!(log.events().iter().copied().eq(expected.map(TlbEvent::Op)), "{:?}", log.events());
    // SAFETY: expected to fault; were the page still writable, it is ours anyway.
    let f = unsafe { probe::write_u64(va as usize, 8) }.expect_err("read-only page must not be writable");
    assert!(f.is_write() && is_permission_fault(&f), "{f}");
    assert_eq!(f.far, va);
    assert_eq!(read(va), 7, "still readable, unchanged");
    // SAFETY: as above.
    unsafe { kernel().upper_mut().protect(vr(va, PG), Permissions::ReadWrite, &HardwareTlb, &mut GlobalTableAlloc) }
        .unwrap();
    // SAFETY: writable again, ours.
    unsafe { probe::write_u64(va as usize, 9) }.unwrap();
    assert_eq!(read(va), 9);
    reclaim(va, PG);
}

fn unmap_and_flush_then_read_faults() {
    let frame = Frames::alloc_zeroed(0).unwrap();
    let va = WINDOW + 2 * PG;
    map(va, &frame, PG, Attributes::DATA, BlockPolicy::PagesOnly);
    // Touch it: its translation is now in the TLB.
    assert_eq!(read(va), 0);
    TLB.clear_log();
    // SAFETY: nothing refers into the page any more.
    assert_eq!(unsafe { kernel().upper_mut().unmap(vr(va, PG), &TLB, &mut GlobalTableAlloc) }, Ok(1));
    assert!(TLB.log().ops().any(|op| op == TlbOp::LastLevel(VirtAddr::new(va))), "unmap flushed the page");
    let f = probe::read_u64(va as usize).expect_err("unmapped page must fault");
    assert_eq!(f.class(), ExceptionClass::DataAbort);
    assert!(is_translation_fault(&f), "{f}");
    assert_eq!(f.far, va);
    reclaim(va, PG);
}

/// The first word of each page of a 2 MiB frame block: a marker derived from its index.
fn marker(i: u64) -> u64 {
    0x5117_0000_0000 | i
}

fn block_split_at_runtime_keeps_the_rest_of_the_block_readable() {
    let free = free_pages();
    // Order 9: 512 frames, 2 MiB aligned (buddy blocks are naturally aligned).
    let frames = Frames::alloc_zeroed(9).unwrap();
    let lin = frames.virt().as_u64();
    for i in 0..512 {
        // SAFETY: the linear-map address of frames this test owns.
        unsafe { core::ptr::write_volatile((lin + i * PG) as *mut u64, marker(i)) };
    }
    let block = WINDOW + MIB2;
    map(block, &frames, MIB2, Attributes::DATA, BlockPolicy::AllowBlocks);
    assert_eq!(kernel().upper().translate(VirtAddr::new(block)).unwrap().level, 2, "mapped as a block");
    // Every page through the block: the block entry is in the TLB now.
    for i in 0..512 {
        assert_eq!(read(block + i * PG), marker(i));
    }

    let hole = block + 100 * PG;
    TLB.clear_log();
    // SAFETY: nothing refers into the hole; nothing this code uses (code, stack, `TLB`, the
    // tables) lies in the block, which only aliases frames of this test.
    assert_eq!(unsafe { kernel().upper_mut().unmap(vr(hole, PG), &TLB, &mut GlobalTableAlloc) }, Ok(1));
    let log = TLB.take_log();
    let e = log.events();
    let TlbEvent::Write(make) = e[5] else { panic!("{e:?}") };
    assert!(matches!(make.descriptor.decode(2), Entry::Table(_)));
    let invalid = EntryWrite { va: VirtAddr::new(block), level: 2, descriptor: Descriptor::INVALID };
    let expected = [
        TlbEvent::Write(invalid),
        TlbEvent::Op(TlbOp::DsbIshst),
        TlbEvent::Op(TlbOp::AllLevels(VirtAddr::new(block))),
        TlbEvent::Op(TlbOp::DsbIsh),
        TlbEvent::Op(TlbOp::Isb),
        TlbEvent::Write(make),
        TlbEvent::Op(TlbOp::DsbIshst),
        TlbEvent::Op(TlbOp::Isb),
        TlbEvent::Op(TlbOp::DsbIshst),
        TlbEvent::Op(TlbOp::LastLevel(VirtAddr::new(hole))),
        TlbEvent::Op(TlbOp::DsbIsh),
        TlbEvent::Op(TlbOp::Isb),
    ];
    assert_eq!(e, expected, "break-before-make, then the page's flush");

    // The hole faults (translation); every other page still reads its marker, now via pages.
    let f = probe::read_u64(hole as usize).expect_err("the unmapped page faults");
    assert!(is_translation_fault(&f) && f.far == hole, "{f}");
    for i in (0..512).filter(|&i| i != 100) {
        assert_eq!(read(block + i * PG), marker(i), "page {i} after the split");
    }
    assert_eq!(kernel().upper().translate(VirtAddr::new(block)).unwrap().level, 3);
    // Still an alias: a write through it shows in the linear map.
    // SAFETY: writable, ours.
    unsafe { probe::write_u64((block + 5 * PG + 16) as usize, 0xfeed) }.unwrap();
    // SAFETY: the linear-map address of our frames.
    assert_eq!(unsafe { core::ptr::read_volatile((lin + 5 * PG + 16) as *const u64) }, 0xfeed);

    // A second block over the same frames; protect one page of it read-only: a split too.
    let second = WINDOW + 2 * MIB2;
    map(second, &frames, MIB2, Attributes::DATA, BlockPolicy::AllowBlocks);
    assert_eq!(read(second + 7 * PG), marker(7));
    TLB.clear_log();
    // SAFETY: nothing borrows the page; the block holds nothing this code uses.
    unsafe {
        kernel().upper_mut().protect(vr(second + 7 * PG, PG), Permissions::ReadOnly, &TLB, &mut GlobalTableAlloc)
    }
    .unwrap();
    assert!(TLB.log().ops().any(|op| op == TlbOp::AllLevels(VirtAddr::new(second))), "the block was broken");
    // SAFETY: expected to fault (read-only now).
    let f = unsafe { probe::write_u64((second + 7 * PG) as usize, 1) }.expect_err("read-only after protect");
    assert!(is_permission_fault(&f), "{f}");
    // SAFETY: the neighbour stayed writable; our frames.
    unsafe { probe::write_u64((second + 8 * PG + 8) as usize, 0xabcd) }.unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { core::ptr::read_volatile((lin + 8 * PG + 8) as *const u64) }, 0xabcd);
    for i in 0..512 {
        assert_eq!(read(second + i * PG), marker(i), "page {i} of the protected block");
    }

    assert_eq!(reclaim(block, MIB2), 511);
    assert_eq!(reclaim(second, MIB2), 512);
    drop(frames);
    assert_eq!(free_pages(), free, "split tables reclaimed, frames back");
}

fn reclaim_gives_every_table_back() {
    let free = free_pages();
    let tables = kernel().upper().table_pages();
    let frame = Frames::alloc_zeroed(0).unwrap();
    // Pages far apart: each needs its own L1, L2 and L3 tables below the root.
    let spots = [WINDOW + 3 * (1 << 30), WINDOW + 5 * (1 << 30) + 7 * MIB2, WINDOW + 9 * (1 << 30) + 123 * PG];
    for va in spots {
        map(va, &frame, PG, Attributes::RODATA, BlockPolicy::PagesOnly);
        assert_eq!(read(va), 0);
    }
    assert!(kernel().upper().table_pages() >= tables + 6);
    assert_eq!(reclaim(WINDOW, 16 << 30), 3);
    assert_eq!(kernel().upper().table_pages(), tables);
    drop(frame);
    assert_eq!(free_pages(), free);
    for va in spots {
        assert!(probe::read_u64(va as usize).is_err());
    }
}

tests::main!(
    test!(second_mapping_aliases_the_frame),
    test!(protect_to_read_only_then_write_faults),
    test!(unmap_and_flush_then_read_faults),
    test!(block_split_at_runtime_keeps_the_rest_of_the_block_readable),
    test!(reclaim_gives_every_table_back),
);
