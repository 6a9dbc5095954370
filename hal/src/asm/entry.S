// Entry point shared by every image (firmware and on-target tests).
//
// Two ways in:
//  - as an arm64 Linux `Image` (QEMU -kernel Image, U-Boot booti): x0 holds the DTB;
//  - as an ELF (QEMU -kernel elf): no register is set; QEMU put the DTB at RAM base.
// Either way we may be at EL2 (virtualization=on) or EL1. We leave EL2, set up stacks,
// clear BSS, enable FP/SIMD, install the exception vectors, and call Rust.
// The MMU is off: every data access is Device memory, so this code does nothing unaligned.

.section .text.head, "ax"
.global _start
_start:
    // --- arm64 Image header (Documentation/arch/arm64/booting.rst) ---
    b       primary_entry           // code0: jump over the header
    .long   0                       // code1
    .quad   0x200000                // text_offset: load us at a 2 MiB aligned base + 2 MiB
    .quad   __image_size            // image_size: the whole image, BSS and stacks included
    .quad   0x2                     // flags: little endian, 4 KiB pages, base close to DRAM start
    .quad   0                       // res2
    .quad   0                       // res3
    .quad   0                       // res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5 (PE header offset: none)

.section .text.boot, "ax"
primary_entry:
    // Whatever the loader left, nothing asynchronous is taken until the vectors and the
    // console are up: Rust unmasks SError then (IRQ and FIQ stay masked).
    msr     daifset, #0xf
    mov     x19, x0                 // x19 = DTB pointer from the loader (0 for an ELF boot)

    mrs     x9, CurrentEL
    lsr     x20, x9, #2             // x20 = entry exception level, reported by Rust
    LEAVE_EL2
    // FP/SIMD on (CPACR_EL1.FPEN = 0b11): Rust emits SIMD for copies.
    mov     x9, #(3 << 20)
    msr     cpacr_el1, x9
    isb

    // Exception vectors before any Rust code can fault.
    adr_l   x9, hal_exception_vectors
    msr     vbar_el1, x9

    // Exceptions run on SP_EL1 (their own stack); thread code runs on SP_EL0, so a
    // thread-stack overflow is taken on a good stack and reported.
    adr_l   x9, __exception_stack_top
    mov     sp, x9
    msr     spsel, #0
    adr_l   x9, __boot_stack_top
    mov     sp, x9
    isb

    // Clear BSS (16-byte aligned bounds from link.ld; aligned stores only).
    adr_l   x9, __bss_start
    adr_l   x10, __bss_end
2:  cmp     x9, x10
    b.hs    3f
    stp     xzr, xzr, [x9], #16
    b       2b
3:
    // CPU 0's per-CPU data (BSS is clear now): TPIDR_EL1 and its exception-stack top.
    adr_l   x9, HAL_CPUS
    adr_l   x10, __exception_stack_top
    str     x10, [x9]
    msr     tpidr_el1, x9
    mov     x0, x19
    mov     x1, x20
    mov     x29, xzr
    mov     x30, xzr
    bl      hal_boot_rust           // never returns
4:  wfe
    b       4b

// A secondary CPU, started by PSCI CPU_ON (hal::smp): MMU off, x0 = its CpuData, whose
// first 64 bytes are its boot record (stack tops, then MAIR, TCR, TTBR0, TTBR1, SCTLR of
// the boot CPU), cleaned to the point of coherency before CPU_ON. Nothing touches the
// stack, a lock or an atomic before the MMU and caches are on.
.global hal_secondary_entry
hal_secondary_entry:
    msr     daifset, #0xf
    mov     x19, x0
    mrs     x9, CurrentEL
    lsr     x20, x9, #2
    LEAVE_EL2
    mov     x9, #(3 << 20)
    msr     cpacr_el1, x9
    isb
    // The boot CPU's translation regime; a local TLB flush drops whatever this CPU cached
    // before (nothing should be there, but reset values are not promised).
    ldp     x9, x10, [x19, #16]     // MAIR, TCR
    msr     mair_el1, x9
    msr     tcr_el1, x10
    ldp     x9, x10, [x19, #32]     // TTBR0, TTBR1
    msr     ttbr0_el1, x9
    msr     ttbr1_el1, x10
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x9, [x19, #48]          // SCTLR: M, C, I, WXN as the boot CPU has them
    msr     sctlr_el1, x9
    isb
    // MMU and caches on: vectors, per-CPU data, stacks.
    adr_l   x9, hal_exception_vectors
    msr     vbar_el1, x9
    msr     tpidr_el1, x19
    ldr     x9, [x19, #0]           // exception stack top: SP_EL1
    mov     sp, x9
    msr     spsel, #0
    ldr     x9, [x19, #8]           // thread stack top: SP_EL0
    mov     sp, x9
    isb
    mov     x0, x19
    mov     x1, x20
    mov     x29, xzr
    mov     x30, xzr
    bl      hal_secondary_rust      // never returns
5:  wfe
    b       5b
