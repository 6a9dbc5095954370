// Address of a symbol within +-4 GiB, PC-relative (works before and after the MMU is on).
.macro adr_l reg, sym
    adrp    \reg, \sym
    add     \reg, \reg, :lo12:\sym
.endm

// Leaves EL2 for EL1h if running at EL2 (the boot CPU and, with virtualization=on, every
// secondary too), leaving the EL2 stub of asm/el2.S behind; then, at EL1, a known
// SCTLR_EL1 whatever the loader left: MMU, caches and alignment checks off, little endian,
// RES1 bits set (Linux's INIT_SCTLR_EL1_MMU_OFF). Clobbers x9.
.macro LEAVE_EL2
    mrs     x9, CurrentEL
    lsr     x9, x9, #2
    cmp     x9, #2
    b.ne    .Lat_el1\@
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
    adr_l   x9, hal_el2_vectors
    msr     vbar_el2, x9
    // A GICv3 CPU interface: let EL1 use its system registers (ICC_SRE_EL2.Enable | SRE),
    // no virtual interrupts (ICH_HCR_EL2 = 0).
    mrs     x9, id_aa64pfr0_el1
    ubfx    x9, x9, #24, #4
    cbz     x9, .Lno_gicv3\@
    mrs     x9, S3_4_C12_C9_5
    orr     x9, x9, #0x1            // SRE
    orr     x9, x9, #0x8            // Enable: EL1 may use its own ICC_SRE_EL1
    msr     S3_4_C12_C9_5, x9
    isb
    msr     S3_4_C12_C11_0, xzr
.Lno_gicv3\@:
    mov     x9, #0x3c5              // SPSR_EL2: EL1h, DAIF masked
    msr     spsr_el2, x9
    adr     x9, .Lat_el1\@
    msr     elr_el2, x9
    eret
.Lat_el1\@:
    mov     x9, #0x0800
    movk    x9, #0x30d0, lsl #16
    msr     sctlr_el1, x9
    isb
.endm
