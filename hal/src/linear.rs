//! The linear map: how code reaches physical memory through virtual addresses.
//!
//! On target, RAM is mapped once at boot with a fixed offset (see `docs/ARCHITECTURE.md`);
//! on the host, tests build a [`LinearMap`] over a heap buffer that plays the part of RAM, so
//! the page-table walker and every allocator run unchanged over "physical memory".

use crate::addr::{PhysAddr, PhysRange, VirtAddr};

/// A window of physical memory reachable at `phys + offset` in the current address space.
///
/// The map keeps a *pointer* to the window's first byte, and every address it hands out
/// ([`Self::ptr`]) is derived from it (`wrapping_add`), so it keeps that pointer's
/// provenance. On the host, tests build it with [`Self::from_ptr`] over a heap buffer, and
/// no integer-to-pointer cast is needed (Miri's `-Zmiri-strict-provenance` holds). On
/// target, [`Self::new`] makes the pointer from the address with exposed provenance: the
/// linear map is set up by the MMU, not by a Rust allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearMap {
    phys: PhysRange,
    virt_start: u64,
    base: *mut u8,
}

// SAFETY: a `LinearMap` is a description of a window (its pointer only carries the
// window's provenance; the map itself never dereferences it). Whoever dereferences what
// `ptr` returns does so under its own contract, and the window is mapped the same way on
// every core (one set of kernel tables; on the host, one process), so the description is
// valid on any core and from several at once.
unsafe impl Send for LinearMap {}
// SAFETY: as for `Send`: `&LinearMap` only reads `Copy` fields.
unsafe impl Sync for LinearMap {}

impl LinearMap {
    /// A linear map of `phys` whose first byte is reached at `virt_start` (the pointer is
    /// made with exposed provenance: for the kernel's own linear map, set up by the MMU).
    ///
    /// # Safety
    /// For as long as this value (or a copy) is used, every byte of `phys` must be mapped
    /// readable and writable at `virt_start + (pa - phys.start())`, and must not be memory
    /// that Rust code owns through a reference (the users of the map write through it).
    pub unsafe fn new(phys: PhysRange, virt_start: VirtAddr) -> Self {
        let base = core::ptr::with_exposed_provenance_mut(virt_start.as_u64() as usize);
        Self { phys, virt_start: virt_start.as_u64(), base }
    }

    /// A linear map of `phys` whose first byte is at `base`; every pointer the map gives
    /// is derived from `base` (host tests: a heap buffer playing RAM).
    ///
    /// # Safety
    /// As for [`Self::new`], with `base` valid for reads and writes of `phys.size()` bytes.
    pub unsafe fn from_ptr(phys: PhysRange, base: *mut u8) -> Self {
        Self { phys, virt_start: base.addr() as u64, base }
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
        match pa.offset_from(self.phys.start()) {
            Some(off) if off < self.phys.size() => self.base.wrapping_add(off as usize).cast(),
            _ => panic!("physical address {pa:?} is outside the linear map {:?}", self.phys),
        }
    }

    /// The pointer `off` bytes into the window, derived from the map's pointer
    /// (`wrapping_add`: no bounds check; the caller checks `off < phys_range().size()`
    /// before dereferencing it). For hot paths that have already made that comparison.
    #[inline(always)]
    pub fn ptr_at_offset<T>(&self, off: u64) -> *mut T {
        self.base.wrapping_add(off as usize).cast()
    }

    /// The map as a pointer offset ([`LinearOffset`]): for hot paths that turn physical
    /// addresses they already know to be inside the window into pointers, with one add.
    #[inline(always)]
    pub fn offset(&self) -> LinearOffset {
        LinearOffset { origin: self.base.wrapping_sub(self.phys.start().as_u64() as usize) }
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

/// A [`LinearMap`] reduced to its offset, as a pointer: `ptr(pa)` is the origin pointer
/// advanced by `pa` bytes (`wrapping_add`), so every pointer it makes carries the map's
/// provenance: no integer-to-pointer cast, on the host (Miri's strict provenance) or on
/// target. No bounds are checked: callers pass physical addresses inside the window they
/// took the offset from (an allocator's own frames), and only those may be dereferenced.
///
/// ```
/// use hal::linear::LinearMap;
/// use hal::{PhysAddr, PhysRange};
/// let mut ram = vec![0u64; 512];
/// let phys = PhysRange::new(PhysAddr::new(0x4000_0000), 4096).unwrap();
/// // SAFETY: the buffer is ours and only reached through the map below.
/// let map = unsafe { LinearMap::from_ptr(phys, ram.as_mut_ptr().cast()) };
/// let off = map.offset();
/// let p = off.ptr::<u64>(0x4000_0008);
/// // SAFETY: inside the buffer, which nothing else borrows now.
/// unsafe { p.write(7) };
/// assert_eq!(off.phys(p), 0x4000_0008);
/// assert_eq!(ram[1], 7);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearOffset {
    /// Where physical address 0 would be (wrapping; never dereferenced).
    origin: *mut u8,
}

// SAFETY: as for `LinearMap`: a description of the window (the pointer carries provenance
// only and is never dereferenced by this type), valid on every core.
unsafe impl Send for LinearOffset {}
// SAFETY: as for `Send`: `&LinearOffset` only reads a `Copy` field.
unsafe impl Sync for LinearOffset {}

impl LinearOffset {
    /// The pointer to physical address `pa` (no bounds check; see the type's docs).
    #[inline(always)]
    pub fn ptr<T>(self, pa: u64) -> *mut T {
        self.origin.wrapping_add(pa as usize).cast()
    }

    /// The physical address of a pointer into the window (the inverse of [`Self::ptr`]).
    #[inline(always)]
    pub fn phys<T>(self, p: *const T) -> u64 {
        p.addr().wrapping_sub(self.origin.addr()) as u64
    }

    /// `virtual - physical` as an integer (wrapping), for alignment checks.
    #[inline(always)]
    pub fn delta(self) -> u64 {
        self.origin.addr() as u64
    }
}
