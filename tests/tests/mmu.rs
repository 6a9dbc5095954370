//! The kernel address space on target, MMU on: linear map, W^X, guard pages, devices.
#![no_std]
#![no_main]

use hal::exception::{Caught, ExceptionClass};
use hal::mmu::{MemoryType, Permissions};
use hal::{probe, VirtAddr, PAGE_SIZE};
use tests::test;

fn kernel() -> hal::sync::SpinLockGuard<'static, hal::kmap::KernelSpace> {
    hal::kmap::kernel_space().expect("MMU is on").lock()
}

fn every_ram_page_is_reachable() {
    let info = hal::boot::boot_info().unwrap();
    let linear = hal::kmap::linear_map().unwrap();
    let image = info.image;
    let mut pages = 0u64;
    for ram in info.platform.ram.iter() {
        let mut pa = ram.start();
        while pa < ram.end() {
            // Unmapped on purpose: every CPU's stack guard pages and the no-map reservations.
            let guard = hal::smp::stack_guard_name(&image, pa.as_u64()).is_some()
                || info.platform.reserved.no_map().any(|r| r.contains(pa));
            let va = linear.phys_to_virt(pa).unwrap();
            let r = probe::read_u8(va.as_usize());
            assert_eq!(r.is_err(), guard, "RAM page {pa:?} reachable: {r:?}");
            pages += 1;
            pa = pa.add(PAGE_SIZE as u64);
        }
    }
    hal::println!("({pages} pages probed) ");
}

fn null_read_faults() {
    let f = probe::read_u64(0).expect_err("page 0 must not be mapped");
    assert_eq!(f.class(), ExceptionClass::DataAbort);
    assert_eq!(f.far, 0);
}

fn text_address() -> usize {
    text_address as *const () as usize
}

fn write_to_text_faults() {
    let addr = text_address();
    // SAFETY: the write is expected to fault (text is read-only); if it did not, one byte
    // of this function's code would change — the assertion below then fails the test.
    let r = unsafe { probe::write_u8(addr, 0) };
    let f = r.expect_err("kernel text must not be writable");
    assert!(f.is_write());
    // The only mapping of text is the linear map itself (VA == PA): the same address.
    let linear = hal::kmap::linear_map().unwrap();
    let alias = linear.phys_to_virt(hal::PhysAddr::new(addr as u64)).unwrap();
    assert_eq!(alias.as_usize(), addr, "no second (writable) alias of text exists");
}

static RODATA_WORD: u64 = 0x1234_5678;

fn write_to_rodata_faults() {
    let addr = &RODATA_WORD as *const u64 as usize;
    // SAFETY: expected to fault: rodata is read-only.
    let r = unsafe { probe::write_u64(addr, 0) };
    r.expect_err("rodata must not be writable");
    assert_eq!(core::hint::black_box(RODATA_WORD), 0x1234_5678);
}

static DATA_WORD: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0xd65f_03c0); // `ret`

fn jump_into_data_faults() {
    let addr = &DATA_WORD as *const _ as usize;
    // SAFETY: expected to fault (data is execute-never); were it executable, the word is a
    // lone `ret`, which returns harmlessly — and the assertion fails.
    let r = unsafe { probe::exec(addr) };
    let f = r.expect_err("data must not be executable");
    assert_eq!(f.class(), ExceptionClass::InstructionAbort);
}

/// Recurses until the stack runs into its guard page (the depth bound is never reached:
/// 2^40 frames of 512+ bytes are far more than the 512 KiB stack).
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let buf = [depth; 64];
    core::hint::black_box(&buf);
    if depth > 1 << 40 {
        return buf[3];
    }
    recurse(depth + 1) + buf[3]
}

fn stack_overflow() {
    core::hint::black_box(recurse(0));
}

fn stack_overflow_hit_the_guard_page() {
    let info = hal::boot::boot_info().unwrap();
    match tests::last_caught() {
        Some(Caught::Fault(f)) => {
            assert!(
                info.image.boot_stack_guard.contains(hal::PhysAddr::new(f.far)),
                "fault at {:#x} is not in the boot stack's guard page",
                f.far
            );
        }
        other => panic!("previous test did not fault: {other:?}"),
    }
}

fn no_mapping_is_writable_and_executable() {
    let info = hal::boot::boot_info().unwrap();
    let k = kernel();
    let mut pa = info.image.whole.start();
    while pa < info.image.whole.end() {
        if let Some(t) = k.lower().translate(VirtAddr::new(pa.as_u64())) {
            let a = t.attributes.expect("our own attributes");
            assert!(!(a.permissions().writable() && a.permissions().executable()), "W+X at {pa:?}");
            if info.image.text.contains(pa) {
                assert_eq!(a.permissions(), Permissions::ReadExecute);
            } else {
                assert!(!a.permissions().executable(), "executable outside text at {pa:?}");
            }
        }
        pa = pa.add(PAGE_SIZE as u64);
    }
    // RAM outside the image is mapped with blocks where possible.
    let ram = info.platform.ram.iter().next().unwrap();
    let t = k.lower().translate(VirtAddr::new(ram.end().as_u64() - 1)).unwrap();
    assert!(t.level < 3, "end of RAM mapped by a block");
}

fn uart_is_device_memory() {
    let info = hal::boot::boot_info().unwrap();
    let uart = info.platform.uart.unwrap();
    // The early identity mapping (used before the memory system was up)...
    let t = kernel().lower().translate(VirtAddr::new(uart.start().as_u64())).unwrap();
    assert_eq!(t.attributes.unwrap().memory_type(), MemoryType::DeviceNGnRE);
    // ...and the ioremap mapping the console writes through now.
    let console = memory::ioremap::console_mapping().expect("console switched to ioremap");
    assert_eq!(hal::console::base(), console.as_usize(), "console writes through the ioremap");
    let t = kernel().upper().translate(console).unwrap();
    assert_eq!(t.attributes.unwrap().memory_type(), MemoryType::DeviceNGnRE);
    assert_eq!(t.phys, uart.start());
    hal::print!("(printed through it) ");
}

/// No page of either half is writable and executable, and only the image's text is
/// executable at all: every leaf of both live trees is checked.
fn no_leaf_anywhere_is_writable_and_executable() {
    let info = hal::boot::boot_info().unwrap();
    let k = kernel();
    let mut leaves = 0u64;
    for table in [k.lower(), k.upper()] {
        table.walk(&mut |va, level, t| {
            leaves += 1;
            let a = t.attributes.expect("our own attributes");
            assert!(!(a.permissions().writable() && a.permissions().executable()), "W+X at {va:?} (level {level})");
            if a.permissions().executable() {
                assert!(info.image.text.contains(hal::PhysAddr::new(va.as_u64())), "executable outside text: {va:?}");
            }
            assert!(!info.image.boot_stack_guard.contains(t.phys) || level < 3, "stack guard page mapped at {va:?}");
        });
    }
    hal::print!("({leaves} leaves) ");
}

tests::main!(
    test!(every_ram_page_is_reachable),
    test!(null_read_faults),
    test!(write_to_text_faults),
    test!(write_to_rodata_faults),
    test!(jump_into_data_faults),
    test!(stack_overflow, fault),
    test!(stack_overflow_hit_the_guard_page),
    test!(no_mapping_is_writable_and_executable),
    test!(uart_is_device_memory),
    test!(no_leaf_anywhere_is_writable_and_executable),
);
