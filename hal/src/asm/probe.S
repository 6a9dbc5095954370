// Probes: touch an address and get a status back instead of dying.
// Each access instruction has an entry in __ex_table (instruction, fixup); the
// synchronous-exception handler sends a fault at a listed instruction to its fixup,
// which returns 1. Like Linux's get_kernel_nofault.

.macro EX_ENTRY insn, fixup
    .pushsection __ex_table, "a"
    .balign 8
    .quad   \insn, \fixup
    .popsection
.endm

.section .text.probe, "ax"

// u32 hal_probe_read_u8(addr: *const u8, out: *mut u8)
.global hal_probe_read_u8
hal_probe_read_u8:
1:  ldrb    w2, [x0]
    strb    w2, [x1]
    mov     w0, #0
    ret
2:  mov     w0, #1
    ret
    EX_ENTRY 1b, 2b

// u32 hal_probe_read_u64(addr: *const u64, out: *mut u64)
.global hal_probe_read_u64
hal_probe_read_u64:
1:  ldr     x2, [x0]
    str     x2, [x1]
    mov     w0, #0
    ret
2:  mov     w0, #1
    ret
    EX_ENTRY 1b, 2b

// u32 hal_probe_write_u8(addr: *mut u8, value: u8)
.global hal_probe_write_u8
hal_probe_write_u8:
1:  strb    w1, [x0]
    mov     w0, #0
    ret
2:  mov     w0, #1
    ret
    EX_ENTRY 1b, 2b

// u32 hal_probe_write_u64(addr: *mut u64, value: u64)
.global hal_probe_write_u64
hal_probe_write_u64:
1:  str     x1, [x0]
    mov     w0, #0
    ret
2:  mov     w0, #1
    ret
    EX_ENTRY 1b, 2b

// u32 hal_probe_exec(addr): branch to addr. An instruction abort there, while
// HAL_EXEC_PROBE is armed, resumes at hal_probe_exec_fixup. The target is expected
// to fault at once (a probe of a non-executable page), or to be a plain `ret`.
.global hal_probe_exec
hal_probe_exec:
    stp     x29, x30, [sp, #-16]!
    mov     x29, sp
    blr     x0
    mov     w0, #0
    ldp     x29, x30, [sp], #16
    ret
.global hal_probe_exec_fixup
hal_probe_exec_fixup:
    mov     w0, #1
    ldp     x29, x30, [sp], #16
    ret

// u32 hal_semihosting_call(op: u32, arg: usize, out: *mut usize): AArch64 semihosting
// (hlt #0xf000). Without -semihosting, hlt is an undefined instruction: the fixup
// returns 1 so the caller can fall back (PSCI SYSTEM_OFF).
.global hal_semihosting_call
hal_semihosting_call:
    mov     x9, x2
1:  hlt     #0xf000
    str     x0, [x9]
    mov     w0, #0
    ret
2:  mov     w0, #1
    ret
    EX_ENTRY 1b, 2b

// Recovery points for the test runner: run a function and come back here if it
// panics or takes a fatal exception (a setjmp/longjmp pair for one level).
//
// u64 hal_catch_call(ctx: *mut CatchContext, f: extern "C" fn(*mut u8), arg: *mut u8)
// returns 0 when f returned, 1 when hal_catch_longjmp(ctx) was called.
.global hal_catch_call
hal_catch_call:
    stp     x29, x30, [sp, #-16]!
    mov     x29, sp
    stp     x19, x20, [x0, #0]
    stp     x21, x22, [x0, #16]
    stp     x23, x24, [x0, #32]
    stp     x25, x26, [x0, #48]
    stp     x27, x28, [x0, #64]
    stp     d8, d9, [x0, #80]
    stp     d10, d11, [x0, #96]
    stp     d12, d13, [x0, #112]
    stp     d14, d15, [x0, #128]
    mov     x9, sp
    str     x9, [x0, #144]
    mrs     x9, daif
    str     x9, [x0, #152]          // the catch point's interrupt masks, for the recovery
    mov     x9, x1
    mov     x0, x2
    blr     x9
    mov     x0, #0
    ldp     x29, x30, [sp], #16
    ret

// ! hal_catch_longjmp(ctx: *const CatchContext)
.global hal_catch_longjmp
hal_catch_longjmp:
    ldp     x19, x20, [x0, #0]
    ldp     x21, x22, [x0, #16]
    ldp     x23, x24, [x0, #32]
    ldp     x25, x26, [x0, #48]
    ldp     x27, x28, [x0, #64]
    ldp     d8, d9, [x0, #80]
    ldp     d10, d11, [x0, #96]
    ldp     d12, d13, [x0, #112]
    ldp     d14, d15, [x0, #128]
    ldr     x9, [x0, #144]
    mov     sp, x9
    mov     x0, #1
    ldp     x29, x30, [sp], #16
    ret
