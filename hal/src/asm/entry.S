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

    // Leave EL2 if we were started there.
    mrs     x9, CurrentEL
    lsr     x9, x9, #2
    mov     x20, x9                 // x20 = entry exception level, reported by Rust
    cmp     x9, #2
    b.ne    1f
    // EL1 is AArch64; no trapping of EL1 timer, FP/SIMD or system registers to EL2.
    mov     x9, #(1 << 31)          // HCR_EL2.RW
    msr     hcr_el2, x9
    mov     x9, #3                  // CNTHCTL_EL2.EL1PCTEN | EL1PCEN
    msr     cnthctl_el2, x9
    msr     cntvoff_el2, xzr
    mov     x9, #0x33ff             // CPTR_EL2: no FP/SIMD traps (TFP = 0)
    msr     cptr_el2, x9
    msr     hstr_el2, xzr
    msr     vttbr_el2, xzr
    // What stays at EL2: the stub of asm/el2.S (it can inject a virtual SError for tests).
    adr_l   x9, hal_el2_vectors
    msr     vbar_el2, x9
    mov     x9, #0x3c5              // SPSR_EL2: EL1h, DAIF masked
    msr     spsr_el2, x9
    adr     x9, 1f
    msr     elr_el2, x9
    eret
1:
    // At EL1. A known SCTLR_EL1 whatever the loader left: MMU, caches and alignment checks
    // off, little endian, RES1 bits set (Linux's INIT_SCTLR_EL1_MMU_OFF).
    mov     x9, #0x0800
    movk    x9, #0x30d0, lsl #16
    msr     sctlr_el1, x9
    isb
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
    mov     x0, x19
    mov     x1, x20
    mov     x29, xzr
    mov     x30, xzr
    bl      hal_boot_rust           // never returns
4:  wfe
    b       4b
