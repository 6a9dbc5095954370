//! Which frames `vmap` and `vm_map_ram` may map as normal memory: RAM less everything kept
//! for good (the image as it stays reserved, `/reserved-memory` and `/memreserve/`, the
//! device tree), worked out once at start-up into a few ranges, so the check made on every
//! call is one comparison per range instead of a walk of every reservation (measured: that
//! walk was a quarter of a `vm_map_ram` + `vm_unmap_ram` under QEMU).

use hal::dtb::{MAX_RAM_RANGES, MAX_RESERVED};
use hal::{PhysAddr, PhysRange};
use spin::Once;

use crate::vmalloc::VmallocError;

/// At most: each RAM range, and each cut splitting one range in two.
const MAX: usize = MAX_RAM_RANGES + MAX_RESERVED + 4;

struct Mappable {
    ranges: [PhysRange; MAX],
    len: usize,
}

static MAPPABLE: Once<Mappable> = Once::new();

/// A placeholder for unused slots.
const UNUSED: PhysRange = match PhysRange::new(PhysAddr::new(0), hal::PAGE_SIZE as u64) {
    Ok(r) => r,
    Err(_) => panic!("one page is a range"),
};

/// Records `ram` less `kept` (from `kernel::init`).
pub(super) fn init(ram: &[PhysRange], kept: &[PhysRange]) {
    MAPPABLE.call_once(|| {
        let mut m = Mappable { ranges: [UNUSED; MAX], len: 0 };
        for &r in ram {
            m.push(r);
        }
        for k in kept {
            m.cut(k);
        }
        m
    });
}

impl Mappable {
    fn push(&mut self, r: PhysRange) {
        if r.size() > 0 && self.len < MAX {
            self.ranges[self.len] = r;
            self.len += 1;
        }
    }

    /// Takes `k` out of every range it meets.
    fn cut(&mut self, k: &PhysRange) {
        let mut i = 0;
        while i < self.len {
            let r = self.ranges[i];
            if r.end() <= k.start() || k.end() <= r.start() {
                i += 1;
                continue;
            }
            let below = PhysRange::from_bounds(r.start(), k.start()).ok().filter(|_| r.start() < k.start());
            let above = PhysRange::from_bounds(k.end(), r.end()).ok().filter(|_| k.end() < r.end());
            // Remove range i, then add what is left of it.
            self.ranges[i] = self.ranges[self.len - 1];
            self.len -= 1;
            for piece in [below, above].into_iter().flatten() {
                self.push(piece);
            }
            // Pieces pushed at the end are re-examined; they cannot meet `k` again.
        }
    }
}

/// Whether caller-owned `frames` may be mapped as normal memory: RAM the kernel does not
/// run from, not reserved and not the device tree. Device memory mapped Normal would allow
/// speculative reads of registers, and a writable alias of the image would undo W^X.
///
/// # Errors
/// [`VmallocError::NotRam`] for the first frame that may not be mapped;
/// [`VmallocError::NotInitialized`] before `kernel::init`.
#[inline]
pub(super) fn check(frames: &[PhysAddr]) -> Result<(), VmallocError> {
    let m = MAPPABLE.get().ok_or(VmallocError::NotInitialized)?;
    let ranges = &m.ranges[..m.len];
    if ranges.is_empty() {
        return if frames.is_empty() { Ok(()) } else { Err(VmallocError::NotRam) };
    }
    let mut last = 0;
    for &pa in frames {
        if !ranges[last].contains(pa) {
            last = ranges.iter().position(|r| r.contains(pa)).ok_or(VmallocError::NotRam)?;
        }
    }
    Ok(())
}
