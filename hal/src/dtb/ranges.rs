//! [`RangeList`]: a fixed-capacity list of physical ranges (no heap exists when the
//! device tree is read), used for the RAM the memory nodes name.

use crate::addr::{PhysAddr, PhysRange};
use core::fmt;

/// How many RAM ranges (`reg` entries of `device_type = "memory"` nodes) boot accepts. A
/// tree with more is refused by name and count ([`super::DtbError::TooMany`]), never cut.
pub const MAX_RAM_RANGES: usize = 32;

/// The list is full: the range was not added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// A fixed-capacity list of ranges, in the order they were found.
#[derive(Clone, Copy)]
pub struct RangeList {
    items: [PhysRange; MAX_RAM_RANGES],
    len: usize,
}

const EMPTY: PhysRange = match PhysRange::new(PhysAddr::new(0), 1) {
    Ok(r) => r,
    Err(_) => panic!("one byte at 0 is a range"),
};

impl RangeList {
    /// An empty list.
    pub const fn new() -> Self {
        Self { items: [EMPTY; MAX_RAM_RANGES], len: 0 }
    }

    /// Appends a range.
    ///
    /// # Errors
    /// [`Full`] past [`MAX_RAM_RANGES`]; the list is unchanged.
    pub fn push(&mut self, r: PhysRange) -> Result<(), Full> {
        let slot = self.items.get_mut(self.len).ok_or(Full)?;
        *slot = r;
        self.len += 1;
        Ok(())
    }

    /// The ranges in the order they were found.
    pub fn iter(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.items[..self.len].iter().copied()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.iter().map(|r| r.size()).sum()
    }

    /// Whether `pa` lies in one of the ranges.
    pub fn contains(&self, pa: PhysAddr) -> bool {
        self.iter().any(|r| r.contains(pa))
    }

    /// Whether any range overlaps `range`.
    pub fn overlaps(&self, range: &PhysRange) -> bool {
        self.iter().any(|r| r.overlaps(range))
    }

    /// Whether `range` lies wholly inside one of the ranges.
    pub fn covers(&self, range: &PhysRange) -> bool {
        self.iter().any(|r| r.start() <= range.start() && range.end() <= r.end())
    }
}

impl Default for RangeList {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RangeList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}
