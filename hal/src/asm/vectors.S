// EL1 exception vectors.
//
// Thread code runs on SP_EL0, so exceptions from it arrive in the "current EL with SP0"
// group and run on SP_EL1, the exception stack. The handler saves a full TrapFrame,
// calls Rust (which may change ELR/SPSR/x0 for a fixup or a recovery) and returns.
// Anything arriving in the "current EL with SPx" group is a fault inside a handler:
// the exception stack is reset and a fatal report is printed, never re-faulted.

.equ FRAME_SIZE, 288          // x0-x30, sp_el0, elr, spsr, esr, far (36 * 8)

.macro SAVE_FRAME
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x9, sp_el0
    stp     x30, x9, [sp, #240]
    mrs     x10, elr_el1
    mrs     x11, spsr_el1
    stp     x10, x11, [sp, #256]
    mrs     x12, esr_el1
    mrs     x13, far_el1
    stp     x12, x13, [sp, #272]
.endm

.macro RESTORE_FRAME
    ldp     x10, x11, [sp, #256]
    msr     elr_el1, x10
    msr     spsr_el1, x11
    ldp     x30, x9, [sp, #240]
    msr     sp_el0, x9
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    add     sp, sp, #FRAME_SIZE
.endm

// Entry from thread context (SP_EL0 in use): a normal trap.
.macro VECTOR_SP0 kind
    .balign 0x80
    SAVE_FRAME
    mov     x0, sp
    mov     x1, #\kind
    b       hal_trap_common
.endm

// Entry while already on SP_EL1: a fault in a handler. Start again at the top of this
// CPU's exception stack (CpuData offset 0, through TPIDR_EL1; the boot CPU's link.ld stack
// if TPIDR_EL1 is not set yet) so a handler stack overflow is reported instead of faulting
// forever. x9 is needed to compute that address: its value is parked in TPIDR_EL0 (there
// is no EL0) and put back into the frame by hal_nested_entry.
.macro VECTOR_SPX kind
    .balign 0x80
    msr     tpidr_el0, x9
    mrs     x9, tpidr_el1
    cbz     x9, 1f
    ldr     x9, [x9]
    cbnz    x9, 2f
1:  adrp    x9, __exception_stack_top
    add     x9, x9, :lo12:__exception_stack_top
2:  mov     sp, x9
    mov     x9, #\kind
    b       hal_nested_entry
.endm

.section .text.vectors, "ax"
.balign 0x800
.global hal_exception_vectors
hal_exception_vectors:
    VECTOR_SP0 0        // current EL, SP_EL0: synchronous
    VECTOR_SP0 1        //                     IRQ
    VECTOR_SP0 2        //                     FIQ
    VECTOR_SP0 3        //                     SError
    VECTOR_SPX 0        // current EL, SP_ELx: synchronous
    VECTOR_SPX 1
    VECTOR_SPX 2
    VECTOR_SPX 3
    VECTOR_SPX 4        // lower EL, AArch64 (we never run EL0)
    VECTOR_SPX 4
    VECTOR_SPX 4
    VECTOR_SPX 4
    VECTOR_SPX 5        // lower EL, AArch32
    VECTOR_SPX 5
    VECTOR_SPX 5
    VECTOR_SPX 5

hal_trap_common:
    bl      hal_trap                  // Rust: may edit the frame
    RESTORE_FRAME
    eret

// x9 = kind, the interrupted x9 in TPIDR_EL0, sp = top of the exception stack.
hal_nested_entry:
    SAVE_FRAME
    ldr     x1, [sp, #72]             // the kind, saved in x9's slot
    mrs     x9, tpidr_el0
    str     x9, [sp, #72]             // the interrupted x9, for the report
    mov     x0, sp
    bl      hal_trap_nested           // never returns
