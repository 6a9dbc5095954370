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
    inner: hal::sync::SpinLock<Vmalloc<B>>,
    /// The instance's window (fixed: readable without the lock).
    range: hal::VirtRange,
}

impl<B: VmBackend> LockedVmalloc<B> {
    /// Wrap `vm`, switching its inline record refill off (this wrapper refills outside the lock).
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{sim::SimBackend, LockedVmalloc, Vmalloc, VmallocConfig};
    /// let range = hal::VirtRange::new(hal::VirtAddr::new(0xffff_8000_0000_0000), 16 << 20).unwrap();
    /// let vm = Vmalloc::new(SimBackend::new(range, 1024), range, VmallocConfig::default())?;
    /// let shared = LockedVmalloc::new(vm);                  // usable through `&self`
    /// let p = shared.vmalloc(4096)?;
    /// # let _ = p;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn new(mut vm: Vmalloc<B>) -> Self {
        vm.config.refill_inline = false;
        let range = vm.range();
        Self { inner: hal::sync::SpinLock::new(&hal::sync::classes::VMALLOC, vm), range }
    }

    /// The instance's window ([`Vmalloc::range`]), without the lock.
    pub fn range(&self) -> hal::VirtRange {
        self.range
    }

    /// Lock, with enough spare records for one call (allocated while unlocked).
    ///
    /// # Errors
    /// [`VmallocError::NoRecords`] when the heap cannot give the records the call needs
    /// (a short batch that covers them is enough); nothing is kept then.
    fn ready(&self) -> Result<hal::sync::SpinLockGuard<'_, Vmalloc<B>>, VmallocError> {
        loop {
            let mut g = self.inner.lock();
            let want = g.spares_wanted();
            if want == 0 {
                return Ok(g);
            }
            drop(g);
            let spares = Spares::up_to(want + REFILL_BATCH);
            if spares.len() < want {
                // Freed here, outside the lock.
                drop(spares);
                return Err(VmallocError::NoRecords);
            }
            g = self.inner.lock();
            g.add_spares(spares);
            if g.spares_wanted() == 0 {
                return Ok(g);
            }
        }
    }

    /// [`Self::ready`], counting a refill failure as a failed call. (The call itself must be
    /// made in the `#[track_caller]` method, not in a closure, to keep the caller's location.)
    fn ready_counted(&self) -> Result<hal::sync::SpinLockGuard<'_, Vmalloc<B>>, VmallocError> {
        self.ready().inspect_err(|_| self.inner.lock().count_failure())
    }

    /// Unlock, then free surplus records.
    fn done<T>(&self, mut g: hal::sync::SpinLockGuard<'_, Vmalloc<B>>, r: T) -> T {
        let excess = g.take_excess_spares();
        drop(g);
        drop(excess);
        r
    }

    /// Runs `f` on the instance, its spare records refilled first (as every allocating call
    /// here does), and frees the surplus after unlocking: for callers that set up the
    /// backend and allocate under one lock hold (`kernel::__vmalloc`).
    ///
    /// # Errors
    /// [`VmallocError::NoRecords`] when the records cannot be refilled (`f` does not run).
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap();
    /// let p = vm.with_ready(|v| v.vmalloc(8192))??;
    /// vm.vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn with_ready<R>(&self, f: impl FnOnce(&mut Vmalloc<B>) -> R) -> Result<R, VmallocError> {
        let mut g = self.ready_counted()?;
        let r = f(&mut g);
        Ok(self.done(g, r))
    }

    /// [`Vmalloc::vmalloc`].
    ///
    /// # Errors
    /// As [`Vmalloc::vmalloc`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let p = vm.vmalloc(8192)?;
    /// vm.vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vmalloc(&self, size: usize) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
        let r = g.vmalloc(size);
        self.done(g, r)
    }

    /// [`Vmalloc::vzalloc`].
    ///
    /// # Errors
    /// As [`Vmalloc::vzalloc`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let p = vm.vzalloc(8192)?;
    /// # let _ = p;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vzalloc(&self, size: usize) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
        let r = g.vzalloc(size);
        self.done(g, r)
    }

    /// [`Vmalloc::vmalloc_with`].
    ///
    /// # Errors
    /// As [`Vmalloc::vmalloc_with`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let obj = vm.vmalloc_with(100, 8, VmFlags::END_ALIGNED)?;
    /// # let _ = obj;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vmalloc_with(&self, size: usize, align: usize, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
        let r = g.vmalloc_with(size, align, flags);
        self.done(g, r)
    }

    /// [`Vmalloc::vfree`].
    ///
    /// # Errors
    /// As [`Vmalloc::vfree`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let p = vm.vmalloc(4096)?;
    /// vm.vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
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
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let p = vm.vzalloc(4096)?;
    /// let p = vm.vrealloc(p, 4 * 4096)?;                   // grows, first page kept
    /// vm.vfree(p)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn vrealloc(&self, ptr: VirtAddr, new_size: usize) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
        let r = g.vrealloc(ptr, new_size);
        self.done(g, r)
    }

    /// [`Vmalloc::vmap_with`].
    ///
    /// # Errors
    /// As [`Vmalloc::vmap_with`].
    ///
    /// # Safety
    /// As [`Vmalloc::vmap_with`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::buddy::Frames;
    /// use memory::vmalloc::{Prot, VmFlags};
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let (a, b) = (Frames::alloc_zeroed(0).unwrap(), Frames::alloc_zeroed(0).unwrap());
    /// // SAFETY: `a` and `b` are ours and outlive the mapping.
    /// let va = unsafe { vm.vmap_with(&[a.phys(), b.phys()], Prot::ReadWrite, VmFlags::NONE) }?;
    /// vm.vunmap(va)?;                                      // the frames stay ours
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub unsafe fn vmap_with(&self, frames: &[PhysAddr], prot: Prot, flags: VmFlags) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
        // SAFETY: forwarded to our caller.
        let r = unsafe { g.vmap_with(frames, prot, flags) };
        self.done(g, r)
    }

    /// [`Vmalloc::vunmap`].
    ///
    /// # Errors
    /// As [`Vmalloc::vunmap`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::buddy::Frames;
    /// use memory::vmalloc::{Prot, VmFlags};
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let page = Frames::alloc(0).unwrap();
    /// // SAFETY: the page is the example's own and outlives the mapping.
    /// let va = unsafe { vm.vmap_with(&[page.phys()], Prot::ReadOnly, VmFlags::NONE) }?;
    /// vm.vunmap(va)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
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
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::DeviceAttr;
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let uart = vm.ioremap(hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE)?;
    /// vm.iounmap(uart)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn ioremap(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
        let r = g.ioremap(phys, size, attr);
        self.done(g, r)
    }

    /// [`Vmalloc::iounmap`].
    ///
    /// # Errors
    /// As [`Vmalloc::iounmap`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::DeviceAttr;
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let fr = vm.ioremap(hal::PhysAddr::new(0x0900_0018), 4, DeviceAttr::DeviceNGnRE)?;
    /// vm.iounmap(fr)?;                                     // the address ioremap returned
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
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
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{DeviceAttr, VmFlags};
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let fb = hal::PhysAddr::new(0x1000_0000);
    /// let fb = vm.ioremap_with(fb, 1 << 20, DeviceAttr::NormalNonCacheable, VmFlags::NONE)?;
    /// vm.iounmap(fb)?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub fn ioremap_with(
        &self,
        phys: PhysAddr,
        size: usize,
        attr: DeviceAttr,
        flags: VmFlags,
    ) -> Result<VirtAddr, VmallocError> {
        let mut g = self.ready_counted()?;
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
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::VmFlags;
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let p = vm.vmalloc_with(4096, 4096, VmFlags::OWNED)?;
    /// // SAFETY: this code owns the area and keeps no reference into it.
    /// unsafe { vm.vfree_owned(p) }?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
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
    ///
    /// # Example
    /// ```no_run
    /// use memory::vmalloc::{DeviceAttr, VmFlags};
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let regs = vm.ioremap_with(hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE, VmFlags::OWNED)?;
    /// // SAFETY: this code owns the mapping and no register reference into it is left.
    /// unsafe { vm.iounmap_owned(regs) }?;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    #[track_caller]
    pub unsafe fn iounmap_owned(&self, ptr: VirtAddr) -> Result<(), VmallocError> {
        let mut g = self.inner.lock();
        // SAFETY: forwarded to our caller.
        let r = unsafe { g.iounmap_owned(ptr) };
        self.done(g, r)
    }

    /// [`Vmalloc::purge`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// vm.purge();                                          // flush now, not at the threshold
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn purge(&self) {
        let mut g = self.inner.lock();
        g.purge();
        self.done(g, ());
    }

    /// [`Vmalloc::purge_keeping_tables`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// vm.purge_keeping_tables();                           // flushed; empty tables stay
    /// ```
    pub fn purge_keeping_tables(&self) {
        let mut g = self.inner.lock();
        g.purge_keeping_tables();
        self.done(g, ());
    }

    /// [`Vmalloc::find_area`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let p = vm.vmalloc(4096)?;
    /// if let Some(a) = vm.find_area(p) {
    ///     log::info!("{:#x}: {} bytes, allocated at {}", a.addr, a.bytes, a.caller);
    /// }
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn find_area(&self, addr: VirtAddr) -> Option<AreaInfo> {
        self.inner.lock().find_area(addr)
    }

    /// [`Vmalloc::vmalloc_to_phys`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let buf = vm.vzalloc(4096)?;
    /// let pa = vm.vmalloc_to_phys(buf);                    // for a device that needs one page
    /// # let _ = pa;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn vmalloc_to_phys(&self, addr: VirtAddr) -> Option<PhysAddr> {
        self.inner.lock().vmalloc_to_phys(addr)
    }

    /// [`Vmalloc::stats`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let s = vm.stats();
    /// log::info!("vmalloc: {} live areas, {} pages mapped", s.live_areas, s.mapped_pages);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn stats(&self) -> VmallocStats {
        self.inner.lock().stats()
    }

    /// [`Vmalloc::explain_fault`] if the lock is free; `None` (nothing written) when it is
    /// held — e.g. the fault happened inside vmalloc itself. Safe to call from an exception
    /// handler: it never spins and never allocates.
    ///
    /// # Example
    /// ```no_run
    /// // In a data-abort handler, with the faulting address from FAR_EL1:
    /// # let far = 0u64;
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let mut why = alloc::string::String::new();
    /// if let Some(class) = vm.try_explain_fault(hal::VirtAddr::new(far), &mut why) {
    ///     log::error!("{class:?}: {why}");
    /// }
    /// # extern crate alloc;
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn try_explain_fault(&self, addr: VirtAddr, out: &mut dyn Write) -> Option<FaultClass> {
        let g = self.inner.try_lock()?;
        Some(g.explain_fault(addr, out))
    }

    /// The allocator itself, locked (for vmallocinfo, stats, tests). Calls made through the
    /// guard do not get the record protocol: allocations may fail with
    /// [`VmallocError::NoRecords`].
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap(); // the kernel's, after kernel::init
    /// let vm = vm.lock();
    /// vm.for_each_area(|a| log::info!("{:#x} {} pages", a.addr, a.pages));
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn lock(&self) -> hal::sync::SpinLockGuard<'_, Vmalloc<B>> {
        self.inner.lock()
    }

    /// Runs `f` on the instance unless its lock is taken (then `None`).
    pub fn lock_if_free<R>(&self, f: impl FnOnce(&Vmalloc<B>) -> R) -> Option<R> {
        let g = self.inner.try_lock()?;
        Some(f(&g))
    }

    /// [`Vmalloc::purge`] unless the lock is taken (then `None`: for reclaim, whose
    /// shrinkers only try-lock); otherwise the quarantined frames and page-table pages it
    /// gave back.
    ///
    /// # Example
    /// ```no_run
    /// let vm = memory::kernel::vmalloc_instance().unwrap();
    /// let freed = vm.try_purge().unwrap_or(0);
    /// # let _ = freed;
    /// ```
    pub fn try_purge(&self) -> Option<usize> {
        let mut g = self.inner.try_lock()?;
        let (q0, t0) = (g.stats().quarantined_frames, g.stats().tables_freed);
        g.purge();
        let s = g.stats();
        let freed = q0.saturating_sub(s.quarantined_frames) + s.tables_freed.saturating_sub(t0) as usize;
        let surplus = g.release_spares();
        drop(g);
        drop(surplus);
        Some(freed)
    }
}

impl<B: VmBackend> core::fmt::Debug for LockedVmalloc<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("LockedVmalloc")
    }
}
