//! [`LockedVmalloc`]: a [`Vmalloc`] behind a spin lock, following the record protocol —
//! spare records are allocated before the lock is taken and surplus ones freed after it is
//! released, so nothing allocates (or could re-enter vmalloc) while the lock is held.

use core::fmt::Write;

use hal::{PhysAddr, VirtAddr};

use super::{
    AreaInfo, DeviceAttr, FaultClass, Prot, Spares, VmBackend, VmFlags, Vmalloc, VmallocError, VmallocStats,
    REFILL_BATCH,
};

/// A [`Vmalloc`] shared behind a lock (for a global instance). Every method takes the lock
/// except [`Self::try_explain_fault`], which only tries it.
pub struct LockedVmalloc<B: VmBackend> {
    inner: spin::Mutex<Vmalloc<B>>,
}

impl<B: VmBackend> LockedVmalloc<B> {
    /// Wrap `vm`, switching its inline record refill off (this wrapper refills outside the lock).
    pub fn new(mut vm: Vmalloc<B>) -> Self {
        vm.config.refill_inline = false;
        Self { inner: spin::Mutex::new(vm) }
    }

    /// Lock, with enough spare records for one call (allocated while unlocked).
    fn ready(&self) -> spin::MutexGuard<'_, Vmalloc<B>> {
        loop {
            let mut g = self.inner.lock();
            let want = g.spares_wanted();
            if want == 0 {
                return g;
            }
            drop(g);
            let spares = Spares::new(want + REFILL_BATCH);
            g = self.inner.lock();
            g.add_spares(spares);
            if g.spares_wanted() == 0 {
                return g;
            }
        }
    }

    /// Unlock, then free surplus records.
    fn done<T>(&self, mut g: spin::MutexGuard<'_, Vmalloc<B>>, r: T) -> T {
        let excess = g.take_excess_spares();
        drop(g);
        drop(excess);
        r
    }

    /// [`Vmalloc::vmalloc`].
    ///
    /// # Errors
    /// As [`Vmalloc::vmalloc`].
    #[track_caller]
    pub fn vmalloc(&self, size: usize) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.vmalloc(size);
        self.done(g, r)
    }

    /// [`Vmalloc::vzalloc`].
    ///
    /// # Errors
    /// As [`Vmalloc::vzalloc`].
    #[track_caller]
    pub fn vzalloc(&self, size: usize) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.vzalloc(size);
        self.done(g, r)
    }

    /// [`Vmalloc::vmalloc_with`].
    ///
    /// # Errors
    /// As [`Vmalloc::vmalloc_with`].
    #[track_caller]
    pub fn vmalloc_with(&self, size: usize, align: usize, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.vmalloc_with(size, align, flags);
        self.done(g, r)
    }

    /// [`Vmalloc::vfree`].
    ///
    /// # Errors
    /// As [`Vmalloc::vfree`].
    #[track_caller]
    pub fn vfree(&self, ptr: VirtAddr) -> Result<(), VmallocError> {
        let mut g = self.inner.lock();
        let r = g.vfree(ptr);
        self.done(g, r)
    }

    /// [`Vmalloc::vrealloc`].
    ///
    /// # Errors
    /// As [`Vmalloc::vrealloc`].
    #[track_caller]
    pub fn vrealloc(&self, ptr: VirtAddr, new_size: usize) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.vrealloc(ptr, new_size);
        self.done(g, r)
    }

    /// [`Vmalloc::vmap_with`].
    ///
    /// # Errors
    /// As [`Vmalloc::vmap_with`].
    #[track_caller]
    pub fn vmap_with(&self, frames: &[PhysAddr], prot: Prot, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.vmap_with(frames, prot, flags);
        self.done(g, r)
    }

    /// [`Vmalloc::vunmap`].
    ///
    /// # Errors
    /// As [`Vmalloc::vunmap`].
    #[track_caller]
    pub fn vunmap(&self, ptr: VirtAddr) -> Result<(), VmallocError> {
        let mut g = self.inner.lock();
        let r = g.vunmap(ptr);
        self.done(g, r)
    }

    /// [`Vmalloc::ioremap`].
    ///
    /// # Errors
    /// As [`Vmalloc::ioremap`].
    #[track_caller]
    pub fn ioremap(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.ioremap(phys, size, attr);
        self.done(g, r)
    }

    /// [`Vmalloc::iounmap`].
    ///
    /// # Errors
    /// As [`Vmalloc::iounmap`].
    #[track_caller]
    pub fn iounmap(&self, ptr: VirtAddr) -> Result<(), VmallocError> {
        let mut g = self.inner.lock();
        let r = g.iounmap(ptr);
        self.done(g, r)
    }

    /// [`Vmalloc::ioremap_with`].
    ///
    /// # Errors
    /// As [`Vmalloc::ioremap`].
    #[track_caller]
    pub fn ioremap_with(
        &self,
        phys: PhysAddr,
        size: usize,
        attr: DeviceAttr,
        flags: VmFlags,
    ) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready();
        let r = g.ioremap_with(phys, size, attr, flags);
        self.done(g, r)
    }

    /// [`Vmalloc::vfree_owned`].
    ///
    /// # Errors
    /// As [`Vmalloc::vfree`].
    ///
    /// # Safety
    /// As [`Vmalloc::vfree_owned`].
    #[track_caller]
    pub unsafe fn vfree_owned(&self, ptr: VirtAddr) -> Result<(), VmallocError> {
        let mut g = self.inner.lock();
        // SAFETY: forwarded to our caller.
        let r = unsafe { g.vfree_owned(ptr) };
        self.done(g, r)
    }

    /// [`Vmalloc::iounmap_owned`].
    ///
    /// # Errors
    /// As [`Vmalloc::iounmap`].
    ///
    /// # Safety
    /// As [`Vmalloc::iounmap_owned`].
    #[track_caller]
    pub unsafe fn iounmap_owned(&self, ptr: VirtAddr) -> Result<(), VmallocError> {
        let mut g = self.inner.lock();
        // SAFETY: forwarded to our caller.
        let r = unsafe { g.iounmap_owned(ptr) };
        self.done(g, r)
    }

    /// [`Vmalloc::purge`].
    pub fn purge(&self) {
        let mut g = self.inner.lock();
        g.purge();
        self.done(g, ());
    }

    /// [`Vmalloc::find_area`].
    pub fn find_area(&self, addr: VirtAddr) -> Option<AreaInfo> {
        self.inner.lock().find_area(addr)
    }

    /// [`Vmalloc::vmalloc_to_phys`].
    pub fn vmalloc_to_phys(&self, addr: VirtAddr) -> Option<PhysAddr> {
        self.inner.lock().vmalloc_to_phys(addr)
    }

    /// [`Vmalloc::stats`].
    pub fn stats(&self) -> VmallocStats {
        self.inner.lock().stats()
    }

    /// [`Vmalloc::explain_fault`] if the lock is free; `None` (nothing written) when it is
    /// held — e.g. the fault happened inside vmalloc itself. Safe to call from an exception
    /// handler: it never spins and never allocates.
    pub fn try_explain_fault(&self, addr: VirtAddr, out: &mut dyn Write) -> Option<FaultClass> {
        let g = self.inner.try_lock()?;
        Some(g.explain_fault(addr, out))
    }

    /// The allocator itself, locked (for vmallocinfo, stats, tests). Calls made through the
    /// guard do not get the record protocol: allocations may fail with
    /// [`VmallocError::NoRecords`].
    pub fn lock(&self) -> spin::MutexGuard<'_, Vmalloc<B>> {
        self.inner.lock()
    }
}

impl<B: VmBackend> core::fmt::Debug for LockedVmalloc<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("LockedVmalloc")
    }
}
