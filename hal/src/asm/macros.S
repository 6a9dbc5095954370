// Address of a symbol within +-4 GiB, PC-relative (works before and after the MMU is on).
.macro adr_l reg, sym
    adrp    \reg, \sym
    add     \reg, \reg, :lo12:\sym
.endm
