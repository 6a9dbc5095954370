//! Allocation flags (Linux's `gfp_t`): which zone may serve a request and how hard the
//! allocator may try.
//!
//! A [`Gfp`] is a set of bits, combined with `|` as in C:
//! `alloc_pages_gfp(GFP_KERNEL | __GFP_ZERO, 0)`. The flag-less calls
//! ([`crate::buddy::alloc_pages`], [`crate::slab::kmalloc`], [`crate::kernel::vmalloc`], ...)
//! behave as [`GFP_KERNEL`].
//!
//! | flag | meaning here |
//! |---|---|
//! | [`GFP_KERNEL`] | any zone (`Normal` → `DMA32` → `DMA`); may not go below a zone's `min` watermark |
//! | [`GFP_ATOMIC`] | as `GFP_KERNEL`, but may not block, and may dip to 3/8 of `min` (Linux's `ALLOC_MIN_RESERVE \| ALLOC_NON_BLOCK`), never lower |
//! | [`GFP_NOWAIT`] | may not block; no access to the reserves |
//! | [`GFP_DMA32`] | only `DMA32` and `DMA` (frames below 4 GiB) |
//! | [`GFP_DMA`] | only `DMA` (below the device tree's `dma-ranges` limit, when there is one) |
//! | [`__GFP_ZERO`] | the memory is zeroed |
//! | [`__GFP_NOWARN`] | no warning when the allocation fails |
//! | [`__GFP_NORETRY`] | no second attempt: the buddy does not drain its hot lists to retry, vmalloc does not purge to retry |
//!
//! Zones are never taken upwards: a `GFP_DMA32` request never gets a frame at or above
//! 4 GiB. A request that may use `Normal` but falls back to a lower zone must leave that
//! zone's `lowmem_reserve` for those who can only use it (see [`crate::buddy`]).

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign};

/// A set of allocation flags (Linux's `gfp_t`). See the [module documentation](self).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gfp(u32);

/// Zone modifier: only `ZONE_DMA`.
pub const __GFP_DMA: Gfp = Gfp(0x01);
/// Zone modifier: only `ZONE_DMA32` or below.
pub const __GFP_DMA32: Gfp = Gfp(0x04);
/// Access to the reserves below `min` (with [`__GFP_DIRECT_RECLAIM`] clear: 3/8 of `min`).
pub const __GFP_HIGH: Gfp = Gfp(0x20);
/// The caller may start I/O (kept for Linux compatibility; no effect here).
pub const __GFP_IO: Gfp = Gfp(0x40);
/// The caller may call into a file system (kept for Linux compatibility; no effect here).
pub const __GFP_FS: Gfp = Gfp(0x80);
/// Zero the memory.
pub const __GFP_ZERO: Gfp = Gfp(0x100);
/// The caller may block (sleep, reclaim).
pub const __GFP_DIRECT_RECLAIM: Gfp = Gfp(0x400);
/// The caller may wake the background reclaimer (kept for Linux compatibility).
pub const __GFP_KSWAPD_RECLAIM: Gfp = Gfp(0x800);
/// No warning on failure.
pub const __GFP_NOWARN: Gfp = Gfp(0x2000);
/// Fail rather than try again.
pub const __GFP_NORETRY: Gfp = Gfp(0x10000);
/// Both reclaim bits.
pub const __GFP_RECLAIM: Gfp = Gfp(__GFP_DIRECT_RECLAIM.0 | __GFP_KSWAPD_RECLAIM.0);

/// A normal kernel allocation: may block, any zone, not below `min`.
pub const GFP_KERNEL: Gfp = Gfp(__GFP_RECLAIM.0 | __GFP_IO.0 | __GFP_FS.0);
/// An allocation that may not block (interrupt context, spinlock held), with access to
/// part of the reserves: down to 3/8 of `min`.
pub const GFP_ATOMIC: Gfp = Gfp(__GFP_HIGH.0 | __GFP_KSWAPD_RECLAIM.0);
/// An allocation that may not block and has no access to the reserves.
pub const GFP_NOWAIT: Gfp = Gfp(__GFP_KSWAPD_RECLAIM.0);
/// A kernel allocation of frames below 4 GiB, for devices that address 32 bits.
pub const GFP_DMA32: Gfp = Gfp(GFP_KERNEL.0 | __GFP_DMA32.0);
/// A kernel allocation from `ZONE_DMA` only.
pub const GFP_DMA: Gfp = Gfp(GFP_KERNEL.0 | __GFP_DMA.0);

/// Index of `ZONE_DMA` (frames below the `dma-ranges` limit; empty without one).
pub const ZONE_DMA: usize = 0;
/// Index of `ZONE_DMA32` (frames below 4 GiB).
pub const ZONE_DMA32: usize = 1;
/// Index of `ZONE_NORMAL` (frames at and above 4 GiB).
pub const ZONE_NORMAL: usize = 2;
/// Number of zones.
pub const MAX_NR_ZONES: usize = 3;
/// The zones' names, as Linux prints them.
pub const ZONE_NAMES: [&str; MAX_NR_ZONES] = ["DMA", "DMA32", "Normal"];

impl Gfp {
    /// No flag at all (an allocation that may not block, without reserves: as
    /// [`GFP_NOWAIT`] without waking anyone).
    pub const EMPTY: Gfp = Gfp(0);

    /// Flags from raw bits (as [`Self::bits`] gave them).
    ///
    /// # Example
    /// ```
    /// use memory::gfp::{Gfp, GFP_ATOMIC};
    /// assert_eq!(Gfp::from_bits(GFP_ATOMIC.bits()), GFP_ATOMIC);
    /// ```
    pub const fn from_bits(bits: u32) -> Gfp {
        Gfp(bits)
    }

    /// The raw bits.
    ///
    /// # Example
    /// ```
    /// use memory::gfp::{GFP_KERNEL, __GFP_ZERO};
    /// assert_ne!((GFP_KERNEL | __GFP_ZERO).bits() & __GFP_ZERO.bits(), 0);
    /// ```
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    ///
    /// # Example
    /// ```
    /// use memory::gfp::{GFP_ATOMIC, __GFP_HIGH, __GFP_DIRECT_RECLAIM};
    /// assert!(GFP_ATOMIC.contains(__GFP_HIGH));
    /// assert!(!GFP_ATOMIC.contains(__GFP_DIRECT_RECLAIM));
    /// ```
    #[inline(always)]
    pub const fn contains(self, other: Gfp) -> bool {
        self.0 & other.0 == other.0
    }

    /// The highest zone the flags allow (Linux's `gfp_zone`): [`ZONE_DMA`] with
    /// [`__GFP_DMA`], [`ZONE_DMA32`] with [`__GFP_DMA32`], else [`ZONE_NORMAL`].
    ///
    /// # Example
    /// ```
    /// use memory::gfp::{gfp_zone_name, GFP_DMA32, GFP_KERNEL, ZONE_DMA32, ZONE_NORMAL};
    /// assert_eq!(GFP_KERNEL.zone(), ZONE_NORMAL);
    /// assert_eq!(GFP_DMA32.zone(), ZONE_DMA32);
    /// assert_eq!(gfp_zone_name(GFP_DMA32), "DMA32");
    /// ```
    #[inline(always)]
    pub const fn zone(self) -> usize {
        if self.0 & __GFP_DMA.0 != 0 {
            ZONE_DMA
        } else if self.0 & __GFP_DMA32.0 != 0 {
            ZONE_DMA32
        } else {
            ZONE_NORMAL
        }
    }

    /// How far below `min` the flags may take a zone, as a divisor pair: the watermark the
    /// allocation must stay above is `min - min/2 - (min - min/2)/4` (3/8 off, rounded as
    /// Linux) with [`__GFP_HIGH`] and without [`__GFP_DIRECT_RECLAIM`], `min - min/2` with
    /// both, `min` without `__GFP_HIGH` (Linux's `__zone_watermark_ok`).
    ///
    /// # Example
    /// ```
    /// use memory::gfp::{GFP_ATOMIC, GFP_KERNEL};
    /// assert_eq!(GFP_KERNEL.min_watermark(800), 800);
    /// assert_eq!(GFP_ATOMIC.min_watermark(800), 300);      // 3/8 of min
    /// ```
    #[inline(always)]
    pub const fn min_watermark(self, min: usize) -> usize {
        let mut m = min;
        if self.0 & __GFP_HIGH.0 != 0 {
            m -= m / 2;
            if self.0 & __GFP_DIRECT_RECLAIM.0 == 0 {
                m -= m / 4;
            }
        }
        m
    }

    /// Whether the caller may block (sleep): [`__GFP_DIRECT_RECLAIM`] is set.
    ///
    /// # Example
    /// ```
    /// use memory::gfp::{GFP_ATOMIC, GFP_KERNEL};
    /// assert!(GFP_KERNEL.may_block() && !GFP_ATOMIC.may_block());
    /// ```
    pub const fn may_block(self) -> bool {
        self.0 & __GFP_DIRECT_RECLAIM.0 != 0
    }
}

/// The name of the highest zone `gfp` allows.
///
/// # Example
/// ```
/// assert_eq!(memory::gfp::gfp_zone_name(memory::gfp::GFP_KERNEL), "Normal");
/// ```
pub fn gfp_zone_name(gfp: Gfp) -> &'static str {
    ZONE_NAMES[gfp.zone()]
}

impl BitOr for Gfp {
    type Output = Gfp;
    #[inline(always)]
    fn bitor(self, rhs: Gfp) -> Gfp {
        Gfp(self.0 | rhs.0)
    }
}

impl BitOrAssign for Gfp {
    #[inline(always)]
    fn bitor_assign(&mut self, rhs: Gfp) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Gfp {
    type Output = Gfp;
    #[inline(always)]
    fn bitand(self, rhs: Gfp) -> Gfp {
        Gfp(self.0 & rhs.0)
    }
}

impl fmt::Debug for Gfp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Gfp, &str); 11] = [
            (__GFP_DMA, "DMA"),
            (__GFP_DMA32, "DMA32"),
            (__GFP_HIGH, "HIGH"),
            (__GFP_IO, "IO"),
            (__GFP_FS, "FS"),
            (__GFP_ZERO, "ZERO"),
            (__GFP_DIRECT_RECLAIM, "DIRECT_RECLAIM"),
            (__GFP_KSWAPD_RECLAIM, "KSWAPD_RECLAIM"),
            (__GFP_NOWARN, "NOWARN"),
            (__GFP_NORETRY, "NORETRY"),
            (Gfp(0), ""),
        ];
        write!(f, "Gfp({:#x}", self.0)?;
        let mut sep = ": ";
        for (g, n) in NAMES {
            if g.0 != 0 && self.contains(g) {
                write!(f, "{sep}__GFP_{n}")?;
                sep = "|";
            }
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_reserve_is_three_eighths_as_linux() {
        // Linux: min -= min / 2; then min -= min / 4 (on the halved value).
        for min in [0usize, 1, 7, 8, 100, 1023, 4096, 65_536] {
            let half = min - min / 2;
            assert_eq!(GFP_ATOMIC.min_watermark(min), half - half / 4);
            assert_eq!(GFP_KERNEL.min_watermark(min), min);
            assert_eq!(GFP_NOWAIT.min_watermark(min), min);
            assert_eq!((GFP_KERNEL | __GFP_HIGH).min_watermark(min), half);
        }
        assert_eq!(GFP_ATOMIC.min_watermark(8000), 3000);
    }

    #[test]
    fn kmalloc_with_a_zone_modifier_is_a_typed_error() {
        let _g = crate::buddy::testram::global_lock();
        let slab = crate::slab::global().unwrap();
        let before = slab.stats();
        assert_eq!(crate::slab::kmalloc_gfp(64, 8, GFP_DMA32), Err(crate::slab::SlabError::ZoneModifier));
        assert_eq!(crate::slab::kmalloc_gfp(5000, 8, GFP_DMA), Err(crate::slab::SlabError::ZoneModifier));
        let after = slab.stats();
        assert_eq!(after.alloc_failures, before.alloc_failures + 2);
        assert_eq!((after.slab_pages, after.large_allocs), (before.slab_pages, before.large_allocs));
        for size in [24usize, 3000, 9000] {
            let p = crate::slab::kmalloc(size, 8).unwrap();
            // SAFETY: `size` bytes were just allocated at `p`.
            unsafe { p.as_ptr().write_bytes(0x77, size) };
            // SAFETY: from kmalloc, not used after.
            unsafe { crate::slab::kfree(p) }.unwrap();
            let q = crate::slab::kmalloc_gfp(size, 8, GFP_ATOMIC | __GFP_ZERO).unwrap();
            // SAFETY: `size` bytes were just allocated at `q`.
            assert!(unsafe { core::slice::from_raw_parts(q.as_ptr(), size) }.iter().all(|&b| b == 0));
            // SAFETY: from kmalloc_gfp, not used after.
            unsafe { crate::slab::kfree(q) }.unwrap();
        }
    }

    #[test]
    fn zones_and_names() {
        assert_eq!(GFP_KERNEL.zone(), ZONE_NORMAL);
        assert_eq!(GFP_ATOMIC.zone(), ZONE_NORMAL);
        assert_eq!((GFP_ATOMIC | __GFP_DMA32).zone(), ZONE_DMA32);
        assert_eq!(GFP_DMA.zone(), ZONE_DMA);
        assert_eq!(
            format!("{:?}", GFP_DMA32 | __GFP_ZERO),
            "Gfp(0xdc4: __GFP_DMA32|__GFP_IO|__GFP_FS|__GFP_ZERO|__GFP_DIRECT_RECLAIM|__GFP_KSWAPD_RECLAIM)"
        );
    }
}
