//! Every core on target: check-in at boot, work on every CPU at once, per-CPU state, faults
//! and probes per CPU, stack guards of secondaries, spurious translation faults, broadcast
//! TLB maintenance, and a hung CPU named. `./x test` boots this at `-smp 4` (and at
//! `-smp 1`, where the tests that need more CPUs are reported ignored).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use hal::dtb::MAX_CPUS;
use hal::mmu::{Attributes, BlockPolicy, HardwareTlb};
use hal::smp::{self, CpuStacks, Outcome, PerCpu};
use hal::{probe, PhysAddr, VirtAddr, VirtRange, PAGE_SIZE};
use memory::buddy::{Frames, GlobalTableAlloc};
use tests::test;

fn info() -> &'static hal::boot::BootInfo {
    hal::boot::boot_info().expect("boot info")
}

fn online() -> usize {
    smp::online_cpus()
}

fn every_listed_cpu_checked_in() {
    // link.ld's `.cpu_stacks` holds exactly one slot per secondary (hal::smp's figures).
    assert_eq!(info().image.cpu_stacks.size(), (MAX_CPUS as u64 - 1) * smp::CPU_STACK_SLOT);
    let cpus = &info().platform.cpus;
    let max = info().cmdline().get_u64("maxcpus").ok().flatten().map_or(usize::MAX, |n| n as usize);
    assert_eq!(online(), cpus.len().min(max).min(MAX_CPUS), "every listed CPU online");
    for n in 0..online() {
        let d = smp::cpu_data(n).unwrap();
        assert_eq!(d.seen_mpidr(), d.mpidr(), "CPU {n} reads the MPIDR the tree gives it");
        assert!(cpus.iter().any(|(m, _)| m == d.mpidr()), "CPU {n} is listed");
        assert_eq!(d.entry_el(), info().entry_el, "CPU {n} entered where the boot CPU did");
    }
}

static GATE_ALL: AtomicUsize = AtomicUsize::new(0);
static RAN: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static SAW_MPIDR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];

fn run_everywhere_body(cpu: usize) {
    assert_eq!(smp::this_cpu(), cpu, "TPIDR_EL1 names the CPU");
    RAN[cpu].fetch_add(1, Ordering::Relaxed);
    SAW_MPIDR[cpu].store(smp::read_mpidr(), Ordering::Relaxed);
    tests::rendezvous(&GATE_ALL);
}

/// All CPUs run the body at once (each waits for all the others inside it) and join.
fn runs_on_every_cpu_at_once() {
    GATE_ALL.store(0, Ordering::Relaxed);
    tests::on_every_cpu(run_everywhere_body);
    for (n, (ran, saw)) in RAN.iter().zip(&SAW_MPIDR).enumerate().take(online()) {
        assert_eq!(ran.load(Ordering::Relaxed), 1, "CPU {n} ran it once");
        assert_eq!(saw.load(Ordering::Relaxed), smp::cpu_data(n).unwrap().mpidr());
    }
    hal::print!("({} CPUs) ", online());
}

static PER: spin::Once<PerCpu<u64>> = spin::Once::new();
static PER_FINAL: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static GATE_PER: AtomicUsize = AtomicUsize::new(0);

fn per_cpu_body(cpu: usize) {
    let per = PER.call_once(|| PerCpu::new(|_| 0));
    tests::rendezvous(&GATE_PER);
    for i in 0..10_000u64 {
        per.with(|v| {
            assert_eq!(*v, i, "CPU {cpu}'s value changed under it");
            *v += 1;
        });
    }
    // A nested use of the same value (what an exception inside the closure would do) is
    // refused, not aliased.
    assert_eq!(per.with(|_| per.try_with(|_| ())), None);
    PER_FINAL[cpu].store(per.with(|v| *v), Ordering::Relaxed);
}

fn per_cpu_values_stay_apart() {
    tests::on_every_cpu(per_cpu_body);
    for (n, v) in PER_FINAL.iter().enumerate().take(online()) {
        assert_eq!(v.load(Ordering::Relaxed), 10_000, "CPU {n}");
    }
}

static GATE_FAULT: AtomicUsize = AtomicUsize::new(0);

fn hole(cpu: usize) -> u64 {
    0x7fff_0000_0000 + cpu as u64 * 0x1000
}

fn fault_body(cpu: usize) {
    tests::rendezvous(&GATE_FAULT);
    // SAFETY: deliberately reads an address with nothing behind it: each CPU's own catch
    // recovers the fault.
    core::hint::black_box(unsafe { core::ptr::read_volatile(hole(cpu) as *const u64) });
}

/// Four CPUs fault at the same moment: each report names its CPU, each CPU's catch
/// recovers its own fault, and every run goes on.
fn faults_on_every_cpu_at_once_are_each_caught() {
    let out = tests::on_every_cpu_within(fault_body, tests::CPU_TIMEOUT_NS);
    for (n, o) in out.iter().enumerate().take(online()) {
        match o {
            Outcome::Faulted(f) => assert_eq!(f.far, hole(n), "CPU {n} got another CPU's fault"),
            other => panic!("CPU {n}: {other:?}"),
        }
    }
    // Every CPU can run again.
    GATE_ALL.store(0, Ordering::Relaxed);
    for r in &RAN {
        r.store(0, Ordering::Relaxed);
    }
    tests::on_every_cpu(run_everywhere_body);
}

static GATE_PROBE: AtomicUsize = AtomicUsize::new(0);

fn probe_body(cpu: usize) {
    tests::rendezvous(&GATE_PROBE);
    for _ in 0..2_000 {
        let f = probe::read_u64(hole(cpu) as usize).expect_err("unmapped");
        assert_eq!(f.far, hole(cpu), "CPU {cpu} sees its own probe's fault");
        assert_eq!(hal::exception::last_probe_fault().far, hole(cpu));
    }
}

/// Probes on all CPUs at once each see their own fault (the record is per CPU).
fn probes_are_per_cpu() {
    tests::on_every_cpu(probe_body);
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let pad = core::hint::black_box([depth; 64]);
    recurse(depth + 1) + pad[0]
}

fn overflow_body(cpu: usize) {
    if cpu == 1 {
        core::hint::black_box(recurse(0));
    }
}

/// CPU 1 runs into its stack's guard page: reported (as CPU 1's thread stack) and caught
/// on CPU 1, on its own exception stack.
fn secondary_stack_overflow_hits_its_guard_page() {
    let out = tests::on_every_cpu_within(overflow_body, tests::CPU_TIMEOUT_NS);
    let guard = CpuStacks::of(&info().image, 1).unwrap().stack_guard;
    match out[1] {
        Outcome::Faulted(f) => assert!(guard.contains(PhysAddr::new(f.far)), "fault at {:#x}, guard {guard:?}", f.far),
        other => panic!("CPU 1: {other:?}"),
    }
    assert_eq!(out[0], Outcome::Returned);
}

/// A page of the scratch window for the spurious-fault test (far from other tests').
const SPURIOUS_VA: u64 = 0xffff_ffe0_0000_0000;
static SPURIOUS_FRAME: AtomicU64 = AtomicU64::new(0);
static PUBLISH: AtomicBool = AtomicBool::new(false);

fn vr(va: u64) -> VirtRange {
    VirtRange::new(VirtAddr::new(va), PAGE_SIZE as u64).unwrap()
}

/// The abort hook: when armed, maps the page at the fault address — as if another CPU had
/// just published it, between our walk and the handler's look. Its tables exist already,
/// so no allocation; the kernel-table lock is free (the test holds nothing).
fn publish_now(far: u64) {
    if far & !(PAGE_SIZE as u64 - 1) != SPURIOUS_VA || !PUBLISH.swap(false, Ordering::AcqRel) {
        return;
    }
    let Some(mut k) = hal::kmap::kernel_space().unwrap().try_lock() else { return };
    let pa = PhysAddr::new(SPURIOUS_FRAME.load(Ordering::Acquire));
    // SAFETY: the scratch page belongs to this test; the frame is the test's own.
    let _ = unsafe { k.upper_mut() }.map(
        vr(SPURIOUS_VA),
        pa,
        Attributes::DATA,
        BlockPolicy::PagesOnly,
        &mut GlobalTableAlloc,
    );
}

fn unmap_spurious_page() {
    let mut k = hal::kmap::kernel_space().unwrap().lock();
    // SAFETY: the scratch page belongs to this test; nothing refers into it any more.
    unsafe { k.upper_mut().unmap(vr(SPURIOUS_VA), &HardwareTlb, &mut GlobalTableAlloc) }.unwrap();
}

/// Both ways: a translation fault at an address that is mapped by the time the handler
/// looks is retried and counted (the read returns the page's value); one at an address
/// still unmapped is reported (the probe gets the fault) and not counted.
fn spurious_translation_faults_are_retried_real_ones_reported() {
    let frame = Frames::alloc_zeroed(0).unwrap();
    let linear = hal::kmap::linear_map().unwrap();
    // SAFETY: a frame we own, reached through the linear map.
    unsafe { linear.ptr::<u64>(frame.phys()).write(0x5eed) };
    SPURIOUS_FRAME.store(frame.phys().as_u64(), Ordering::Release);
    // Map once and unmap, so the page's tables exist (the hook must not allocate).
    {
        let mut k = hal::kmap::kernel_space().unwrap().lock();
        // SAFETY: the scratch page belongs to this test.
        unsafe { k.upper_mut() }
            .map(vr(SPURIOUS_VA), frame.phys(), Attributes::DATA, BlockPolicy::PagesOnly, &mut GlobalTableAlloc)
            .unwrap();
    }
    unmap_spurious_page();
    // SAFETY: the hook takes only a try-lock and writes only this test's scratch page.
    unsafe { hal::exception::set_abort_hook(Some(publish_now)) };
    let before = hal::exception::spurious_faults();
    // Real: nothing publishes the page, the probe reports the fault.
    let f = probe::read_u64(SPURIOUS_VA as usize).expect_err("still unmapped");
    assert_eq!(f.far, SPURIOUS_VA);
    assert_eq!(hal::exception::spurious_faults(), before, "a real fault is not spurious");
    // Spurious: the page appears between the walk and the handler's look.
    PUBLISH.store(true, Ordering::Release);
    let v = probe::read_u64(SPURIOUS_VA as usize).expect("retried once the entry is valid");
    assert_eq!(v, 0x5eed);
    assert_eq!(hal::exception::spurious_faults(), before + 1, "counted");
    // SAFETY: removes the hook.
    unsafe { hal::exception::set_abort_hook(None) };
    unmap_spurious_page();
    drop(frame);
}

static TLB_VA: AtomicU64 = AtomicU64::new(0);
static B_READY: AtomicBool = AtomicBool::new(false);
static FLUSHED: AtomicBool = AtomicBool::new(false);
static READS_AFTER_FLUSH: AtomicU64 = AtomicU64::new(0);
static B_FAULTED: AtomicBool = AtomicBool::new(false);

fn tlb_body(cpu: usize) {
    let va = TLB_VA.load(Ordering::Acquire);
    match cpu {
        // B: reads the page in a loop; a read that completes after it saw A's flag is one
        // a stale TLB entry served.
        1 => {
            probe::read_u64(va as usize).expect("mapped at first");
            B_READY.store(true, Ordering::Release);
            for _ in 0..50_000_000u64 {
                let flushed = FLUSHED.load(Ordering::Acquire);
                match probe::read_u64(va as usize) {
                    Ok(_) if flushed => {
                        if READS_AFTER_FLUSH.fetch_add(1, Ordering::Relaxed) >= 1000 {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        B_FAULTED.store(true, Ordering::Release);
                        return;
                    }
                }
            }
        }
        // A: once B reads, unmaps the page and flushes (vfree, then the purge's TLBIs), then
        // raises the flag.
        0 => {
            while !B_READY.load(Ordering::Acquire) {
                core::hint::spin_loop();
            }
            for _ in 0..10_000 {
                core::hint::spin_loop();
            }
            memory::kernel::vfree(VirtAddr::new(va)).unwrap();
            memory::kernel::purge();
            FLUSHED.store(true, Ordering::Release);
        }
        _ => {}
    }
}

/// One round of the broadcast test: `(reads B completed after the flag, B faulted)`.
fn tlb_round() -> (u64, bool) {
    let va = memory::kernel::vmalloc(PAGE_SIZE).unwrap();
    // SAFETY: a fresh vmalloc page of ours.
    unsafe { va.as_mut_ptr::<u64>().write(7) };
    TLB_VA.store(va.as_u64(), Ordering::Release);
    B_READY.store(false, Ordering::Relaxed);
    FLUSHED.store(false, Ordering::Relaxed);
    READS_AFTER_FLUSH.store(0, Ordering::Relaxed);
    B_FAULTED.store(false, Ordering::Relaxed);
    tests::on_every_cpu(tlb_body);
    (READS_AFTER_FLUSH.load(Ordering::Relaxed), B_FAULTED.load(Ordering::Relaxed))
}

/// CPU B never completes a read after it has seen CPU A's flush-done flag: A's TLBIs reach
/// B's TLB. With the test-only switch that makes them local, B goes on reading through its
/// stale entry — the test can fail.
fn broadcast_tlb_maintenance_reaches_other_cpus() {
    let (after, faulted) = tlb_round();
    assert_eq!((after, faulted), (0, true), "B read through a stale entry after A's broadcast flush");
    // SAFETY: only this test's own page is unmapped while the switch is on; CPU 1's stale
    // entry dies with its next start (a local `tlbi vmalle1` before its MMU goes on).
    unsafe { hal::mmu::arch::set_local_tlbi_for_test(true) };
    let (after_local, faulted_local) = tlb_round();
    // SAFETY: back to broadcast.
    unsafe { hal::mmu::arch::set_local_tlbi_for_test(false) };
    assert!(
        after_local > 0 && !faulted_local,
        "with local TLBIs B kept its stale entry ({after_local}, {faulted_local})"
    );
    hal::print!("(local form: {after_local} stale reads after the flag) ");
}

static WAKES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn wake_body(cpu: usize) {
    WAKES[cpu].fetch_add(1, Ordering::Relaxed);
}

/// Work posted the moment a CPU turns idle wakes it every time: 20,000 rounds, each posted
/// as soon as the last one is done, so the post often lands between the idle loop's last
/// look at its mailbox and its `wfi`. (With interrupts open there, the wake-up SGI was
/// taken before the `wfi` and the CPU slept through its work: the hotplug test's rare
/// "CPU 1 not off within 2 s".)
fn work_posted_as_a_cpu_goes_idle_wakes_it() {
    const ROUNDS: u64 = 20_000;
    let before: [u64; MAX_CPUS] = core::array::from_fn(|n| WAKES[n].load(Ordering::Relaxed));
    for round in 0..ROUNDS {
        let out = tests::on_every_cpu_within(wake_body, 1_000_000_000);
        for (n, o) in out.iter().enumerate().take(online()) {
            assert_eq!(*o, Outcome::Returned, "round {round}: CPU {n} slept through its wake-up");
        }
    }
    for (n, (w, b)) in WAKES.iter().zip(before).enumerate().take(online()) {
        assert_eq!(w.load(Ordering::Relaxed) - b, ROUNDS, "CPU {n} ran every round");
    }
}

static RELEASE: AtomicBool = AtomicBool::new(false);

fn hang_body(cpu: usize) {
    if cpu == 1 {
        let t0 = hal::cpu::uptime_ns();
        while !RELEASE.load(Ordering::Acquire) && hal::cpu::uptime_ns() - t0 < 30_000_000_000 {
            core::hint::spin_loop();
        }
    }
}

/// A CPU that does not finish is named as hung, with the test; released, it can work again.
fn a_hung_cpu_is_named() {
    RELEASE.store(false, Ordering::Release);
    let out = tests::on_every_cpu_within(hang_body, 300_000_000);
    assert_eq!(out[1], Outcome::Hung);
    assert_eq!(out[0], Outcome::Returned);
    RELEASE.store(true, Ordering::Release);
    assert!(smp::wait_idle(1, 5_000_000_000), "CPU 1 finished once released");
    GATE_ALL.store(0, Ordering::Relaxed);
    for r in &RAN {
        r.store(0, Ordering::Relaxed);
    }
    tests::on_every_cpu(run_everywhere_body);
}

tests::main!(
    test!(every_listed_cpu_checked_in),
    test!(runs_on_every_cpu_at_once),
    test!(per_cpu_values_stay_apart),
    test!(faults_on_every_cpu_at_once_are_each_caught).needing(tests::four_cpus, "-smp 4"),
    test!(probes_are_per_cpu),
    test!(secondary_stack_overflow_hits_its_guard_page).needing(tests::two_cpus, "-smp 2"),
    test!(spurious_translation_faults_are_retried_real_ones_reported),
    test!(broadcast_tlb_maintenance_reaches_other_cpus).needing(tests::two_cpus, "-smp 2"),
    test!(work_posted_as_a_cpu_goes_idle_wakes_it).needing(tests::two_cpus, "-smp 2"),
    test!(a_hung_cpu_is_named).needing(tests::two_cpus, "-smp 2"),
);
