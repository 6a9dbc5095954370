//! The linear map: how code reaches physical memory through virtual addresses.
//!
//! On target, RAM is mapped once at boot with a fixed offset (see `docs/ARCHITECTURE.md`);
//! on the host, tests build a [`LinearMap`] over a heap buffer that plays the part of RAM, so
//! the page-table walker and every allocator run unchanged over "physical memory".

use crate::addr::{PhysAddr, PhysRange, VirtAddr};

/// A window of physical memory reachable at `phys + offset` in the current address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearMap {
    phys: PhysRange,
    virt_start: u64,
}

impl LinearMap {
    /// A linear map of `phys` whose first byte is reached at `virt_start`.
    ///
    /// # Safety
    /// For as long as this value (or a copy) is used, every byte of `phys` must be mapped
    /// readable and writable at `virt_start + (pa - phys.start())`, and must not be memory
    /// that Rust code owns through a reference (the users of the map write through it).
    pub const unsafe fn new(phys: PhysRange, virt_start: VirtAddr) -> Self {
        Self { phys, virt_start: virt_start.as_u64() }
    }

    /// The physical range this map covers.
    pub const fn phys_range(&self) -> PhysRange {
        self.phys
    }

    /// Whether `pa` lies in the mapped window.
    pub const fn covers(&self, pa: PhysAddr) -> bool {
        self.phys.contains(pa)
    }

    /// The virtual address of `pa`, or `None` when `pa` is outside the window.
    pub fn phys_to_virt(&self, pa: PhysAddr) -> Option<VirtAddr> {
        let off = pa.offset_from(self.phys.start())?;
        if off >= self.phys.size() {
            return None;
        }
        Some(VirtAddr::new(self.virt_start + off))
    }

    /// A pointer to `pa` through the map.
    ///
    /// # Panics
    /// When `pa` is outside the window: a caller handing out such an address is a bug in
    /// an allocator, not bad input.
    pub fn ptr<T>(&self, pa: PhysAddr) -> *mut T {
        match self.phys_to_virt(pa) {
            Some(va) => va.as_mut_ptr(),
            None => panic!("physical address {pa:?} is outside the linear map {:?}", self.phys),
        }
    }

    /// The physical address behind a virtual address of the window, or `None`.
    pub fn virt_to_phys(&self, va: VirtAddr) -> Option<PhysAddr> {
        let off = va.as_u64().checked_sub(self.virt_start)?;
        if off >= self.phys.size() {
            return None;
        }
        Some(self.phys.start().add(off))
    }
}
