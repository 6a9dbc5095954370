// The EL2 stub: what stays at EL2 once boot has dropped to EL1 (entered at EL2, as with
// QEMU's virtualization=on). VBAR_EL2 points here. It answers two HVC calls, in the SMCCC
// vendor-specific hypervisor range, and nothing else:
//   0xc6000001  inject a virtual SError into EL1 (HCR_EL2.VSE, routed by HCR_EL2.AMO)
//   0xc6000002  end the routing again (HCR_EL2.AMO and VSE cleared)
// Any other HVC returns SMCCC NOT_SUPPORTED (-1) in x0. Only x0 and x1 are changed.
// Asynchronous exceptions routed here (only a physical SError while AMO is set) return at
// once. The stub runs with EL2's MMU off and uses no memory.

.equ HCR_AMO, (1 << 5)
.equ HCR_VSE, (1 << 8)
.equ EC_HVC64, 0x16

.macro EL2_RETURN
    .balign 0x80
    eret
.endm

.section .text.el2, "ax"
.balign 0x800
.global hal_el2_vectors
hal_el2_vectors:
    EL2_RETURN              // current EL with SP0: never used at EL2
    EL2_RETURN
    EL2_RETURN
    EL2_RETURN
    EL2_RETURN              // current EL with SPx
    EL2_RETURN
    EL2_RETURN
    EL2_RETURN
    .balign 0x80            // lower EL, AArch64: synchronous
    b       hal_el2_sync
    EL2_RETURN              //                    IRQ
    EL2_RETURN              //                    FIQ
    EL2_RETURN              //                    SError (physical, while AMO is set)
    EL2_RETURN              // lower EL, AArch32
    EL2_RETURN
    EL2_RETURN
    EL2_RETURN

hal_el2_sync:
    mrs     x1, esr_el2
    lsr     x1, x1, #26
    cmp     x1, #EC_HVC64
    b.ne    3f
    movz    x1, #0xc600, lsl #16
    add     x1, x1, #1
    cmp     x0, x1
    b.ne    1f
    mrs     x1, hcr_el2
    orr     x1, x1, #HCR_AMO
    orr     x1, x1, #HCR_VSE
    msr     hcr_el2, x1
    isb
    mov     x0, #0
    eret
1:  add     x1, x1, #1
    cmp     x0, x1
    b.ne    2f
    mrs     x1, hcr_el2
    bic     x1, x1, #HCR_AMO
    bic     x1, x1, #HCR_VSE
    msr     hcr_el2, x1
    isb
    mov     x0, #0
    eret
2:  mov     x0, #-1
    eret
3:  // Not an HVC (a trapped instruction we never enable): skip it.
    mrs     x1, elr_el2
    add     x1, x1, #4
    msr     elr_el2, x1
    mov     x0, #-1
    eret
