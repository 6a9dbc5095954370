//! Address types: physical and virtual addresses, page frame numbers and ranges.
//!
//! Every conversion that could wrap or lose bits is checked: arithmetic that would
//! overflow, or an alignment that is not a power of two, is an [`AddrError`], never a
//! silent wrap-around. Physical and virtual addresses are different types, so mixing
//! them up is a compile error.

use core::fmt;

/// log2 of the translation granule (4 KiB).
pub const PAGE_SHIFT: usize = 12;
/// The translation granule and the size of one page frame: 4 KiB.
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

/// Why an address computation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrError {
    /// The result would not fit in 64 bits.
    Overflow,
    /// An address or size was not aligned as required.
    Misaligned,
    /// An alignment that is not a power of two.
    BadAlignment,
    /// A range of zero bytes.
    Empty,
}

impl fmt::Display for AddrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrError::Overflow => "address arithmetic overflows",
            AddrError::Misaligned => "address or size is misaligned",
            AddrError::BadAlignment => "alignment is not a power of two",
            AddrError::Empty => "empty range",
        })
    }
}

impl core::error::Error for AddrError {}

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The address `raw`.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// The raw address as a `usize` (64-bit targets only).
            pub const fn as_usize(self) -> usize {
                self.0 as usize
            }

            /// Whether the address is a multiple of `align` (which must be a power of two;
            /// any other value answers `false`).
            pub const fn is_aligned(self, align: u64) -> bool {
                align.is_power_of_two() && self.0 & (align - 1) == 0
            }

            /// Whether the address is page aligned.
            pub const fn is_page_aligned(self) -> bool {
                self.0 & (PAGE_SIZE as u64 - 1) == 0
            }

            /// The offset of the address inside its page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE as u64 - 1)
            }

            /// Rounded down to a multiple of `align`.
            ///
            /// # Errors
            /// [`AddrError::BadAlignment`] when `align` is not a power of two.
            pub const fn align_down(self, align: u64) -> Result<Self, AddrError> {
                if !align.is_power_of_two() {
                    return Err(AddrError::BadAlignment);
                }
                Ok(Self(self.0 & !(align - 1)))
            }

            /// Rounded up to a multiple of `align`.
            ///
            /// # Errors
            /// [`AddrError::BadAlignment`] when `align` is not a power of two,
            /// [`AddrError::Overflow`] when the result does not fit in 64 bits.
            pub const fn align_up(self, align: u64) -> Result<Self, AddrError> {
                if !align.is_power_of_two() {
                    return Err(AddrError::BadAlignment);
                }
                match self.0.checked_add(align - 1) {
                    Some(v) => Ok(Self(v & !(align - 1))),
                    None => Err(AddrError::Overflow),
                }
            }

            /// Rounded down to its page.
            pub const fn page_down(self) -> Self {
                Self(self.0 & !(PAGE_SIZE as u64 - 1))
            }

            /// `self + bytes`.
            ///
            /// # Errors
            /// [`AddrError::Overflow`] when the sum does not fit in 64 bits.
            pub const fn checked_add(self, bytes: u64) -> Result<Self, AddrError> {
                match self.0.checked_add(bytes) {
                    Some(v) => Ok(Self(v)),
                    None => Err(AddrError::Overflow),
                }
            }

            /// `self - bytes`.
            ///
            /// # Errors
            /// [`AddrError::Overflow`] when the result would be below zero.
            pub const fn checked_sub(self, bytes: u64) -> Result<Self, AddrError> {
                match self.0.checked_sub(bytes) {
                    Some(v) => Ok(Self(v)),
                    None => Err(AddrError::Overflow),
                }
            }

            /// `self + bytes` where the caller knows it cannot overflow
            /// (checked with a debug assertion).
            pub const fn add(self, bytes: u64) -> Self {
                debug_assert!(self.0.checked_add(bytes).is_some());
                Self(self.0.wrapping_add(bytes))
            }

            /// The distance in bytes from `lower` up to `self`, or `None` if `lower > self`.
            pub const fn offset_from(self, lower: Self) -> Option<u64> {
                self.0.checked_sub(lower.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A physical (output) address.
    PhysAddr,
    "PA"
);
address_type!(
    /// A virtual (input) address, as translated by the MMU.
    VirtAddr,
    "VA"
);

impl VirtAddr {
    /// The address as a raw pointer.
    pub const fn as_ptr<T>(self) -> *const T {
        self.0 as usize as *const T
    }

    /// The address as a raw mutable pointer.
    pub const fn as_mut_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }

    /// The virtual address of a pointer.
    pub fn from_ptr<T: ?Sized>(ptr: *const T) -> Self {
        Self(ptr.cast::<u8>() as usize as u64)
    }
}

/// A physical page frame number: a physical address divided by [`PAGE_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame holding `pa` (rounded down).
    pub const fn containing(pa: PhysAddr) -> Self {
        Self(pa.as_u64() >> PAGE_SHIFT)
    }

    /// The physical address of the frame's first byte.
    pub const fn addr(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }
}

impl PhysAddr {
    /// The frame number of this address (rounded down).
    pub const fn pfn(self) -> Pfn {
        Pfn::containing(self)
    }
}

macro_rules! range_type {
    ($(#[$doc:meta])* $name:ident, $addr:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name {
            start: $addr,
            end: $addr,
        }

        impl $name {
            /// The range `[start, start + size)`.
            ///
            /// # Errors
            /// [`AddrError::Empty`] for a zero size, [`AddrError::Overflow`] when the end
            /// does not fit in 64 bits.
            pub const fn new(start: $addr, size: u64) -> Result<Self, AddrError> {
                if size == 0 {
                    return Err(AddrError::Empty);
                }
                match start.checked_add(size) {
                    Ok(end) => Ok(Self { start, end }),
                    Err(e) => Err(e),
                }
            }

            /// The range `[start, end)`.
            ///
            /// # Errors
            /// [`AddrError::Empty`] when `end <= start`.
            pub const fn from_bounds(start: $addr, end: $addr) -> Result<Self, AddrError> {
                if end.as_u64() <= start.as_u64() {
                    return Err(AddrError::Empty);
                }
                Ok(Self { start, end })
            }

            /// The smallest page-aligned range that covers `[start, start + size)`.
            ///
            /// # Errors
            /// As [`Self::new`], and [`AddrError::Overflow`] when rounding the end up overflows.
            pub const fn covering_pages(start: $addr, size: u64) -> Result<Self, AddrError> {
                let r = match Self::new(start, size) {
                    Ok(r) => r,
                    Err(e) => return Err(e),
                };
                match r.end.align_up(PAGE_SIZE as u64) {
                    Ok(end) => Ok(Self { start: start.page_down(), end }),
                    Err(e) => Err(e),
                }
            }

            /// First address in the range.
            pub const fn start(&self) -> $addr {
                self.start
            }

            /// First address past the range.
            pub const fn end(&self) -> $addr {
                self.end
            }

            /// Size in bytes.
            pub const fn size(&self) -> u64 {
                self.end.as_u64() - self.start.as_u64()
            }

            /// Whether both ends are page aligned.
            pub const fn is_page_aligned(&self) -> bool {
                self.start.is_page_aligned() && self.end.is_page_aligned()
            }

            /// Number of pages (meaningful for page-aligned ranges).
            pub const fn pages(&self) -> u64 {
                self.size() >> PAGE_SHIFT
            }

            /// Whether `addr` lies inside the range.
            pub const fn contains(&self, addr: $addr) -> bool {
                addr.as_u64() >= self.start.as_u64() && addr.as_u64() < self.end.as_u64()
            }

            /// Whether the two ranges share at least one byte.
            pub const fn overlaps(&self, other: &Self) -> bool {
                self.start.as_u64() < other.end.as_u64() && other.start.as_u64() < self.end.as_u64()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}-{:#x}", self.start.as_u64(), self.end.as_u64())
            }
        }
    };
}

range_type!(
    /// A non-empty range of physical addresses, end exclusive.
    PhysRange,
    PhysAddr
);
range_type!(
    /// A non-empty range of virtual addresses, end exclusive.
    VirtRange,
    VirtAddr
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_checked() {
        let a = PhysAddr::new(0x1234);
        assert_eq!(a.align_down(0x1000), Ok(PhysAddr::new(0x1000)));
        assert_eq!(a.align_up(0x1000), Ok(PhysAddr::new(0x2000)));
        assert_eq!(a.align_up(3), Err(AddrError::BadAlignment));
        assert_eq!(PhysAddr::new(u64::MAX).align_up(0x1000), Err(AddrError::Overflow));
        assert!(!a.is_aligned(0));
        assert_eq!(a.page_offset(), 0x234);
    }

    #[test]
    fn ranges_refuse_overflow_and_empty() {
        assert_eq!(VirtRange::new(VirtAddr::new(0x1000), 0), Err(AddrError::Empty));
        assert_eq!(VirtRange::new(VirtAddr::new(u64::MAX - 1), 2), Err(AddrError::Overflow));
        assert_eq!(PhysRange::covering_pages(PhysAddr::new(u64::MAX - 0x10), 4), Err(AddrError::Overflow));
        let r = PhysRange::covering_pages(PhysAddr::new(0x0900_0004), 4).unwrap();
        assert_eq!((r.start().as_u64(), r.end().as_u64()), (0x0900_0000, 0x0900_1000));
        assert_eq!(r.pages(), 1);
        let r = PhysRange::covering_pages(PhysAddr::new(0xffc), 8).unwrap();
        assert_eq!(r.pages(), 2);
    }

    #[test]
    fn pfn_round_trip() {
        let pa = PhysAddr::new(0x4020_1000);
        assert_eq!(pa.pfn().addr(), pa);
        assert_eq!(Pfn::containing(PhysAddr::new(0x4020_1fff)), pa.pfn());
    }
}
