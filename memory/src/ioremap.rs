//! # ioremap — device MMIO in the vmalloc window, with typed register access for drivers
//!
//! A device's registers live at physical addresses outside RAM. [`ioremap`] maps them into
//! the vmalloc window (the same free-space index, guard page and lazy purge as
//! [`crate::kernel::vmalloc`]) with a device memory type, allocating no frames (page-table
//! pages aside), and returns the virtual address of `phys` itself:
//!
//! ```text
//!   ioremap(PA 0x0900_0004, 4)             vmalloc window
//!   ┌──────────── PA page 0x0900_0000 ───┐   ┌─ mapped page ──┬─ guard ─┐
//!   │    ▲ +4                            │ → │    ▲ base + 4  │ unmapped│
//!   └────┴───────────────────────────────┘   └────┴───────────┴─────────┘
//! ```
//!
//! | call            | memory type          | use                                     |
//! |-----------------|----------------------|-----------------------------------------|
//! | [`ioremap`]     | Device-nGnRE         | registers: the usual choice             |
//! | [`ioremap_np`]  | Device-nGnRnE        | non-posted writes (the write is acknowledged by the device) |
//! | [`ioremap_wc`]  | Normal non-cacheable | write-combining: framebuffers, no side-effect reads |
//!
//! ## What is refused (each with its [`IoremapError`])
//! - a zero size ([`IoremapError::ZeroSize`]);
//! - a range whose end (rounded up to a page) does not fit in 64 bits
//!   ([`IoremapError::Overflow`]) or lies above the 48-bit physical address space a
//!   descriptor holds ([`IoremapError::PhysTooHigh`]);
//! - a range of which **any** page is RAM — every `device_type = "memory"` node of the
//!   device tree, reserved parts included ([`IoremapError::Ram`]). Linux checks only the
//!   first page; a range that starts below RAM and ends in it is refused here.
//!
//! [`iounmap`] takes the address ioremap returned (offset included). An address that is not
//! the start of a live mapping ([`IoremapError::NotMapped`]), the address of a vmalloc or
//! vmap area ([`IoremapError::NotIoremap`]) and a second iounmap
//! ([`IoremapError::AlreadyUnmapped`]) are refused and change nothing. The PTEs are
//! cleared at once; the virtual range is parked until the next batched TLB flush, exactly
//! as for `vfree`.
//!
//! ## Typed register access
//! Drivers should not handle raw addresses: [`IoMem`] owns a mapping (iounmap on drop) and
//! hands out `tock-registers` register blocks at checked offsets ([`IoMem::regs`]:
//! `offset + size_of::<R>() <= len`, the address aligned for `R`); [`Mmio<R>`] is the same
//! for a mapping that is one register block, dereferencing to it. A driver declares its
//! registers once with [`tock_registers::register_structs!`], promises once that the type
//! is a register block ([`RegisterBlock`], the only `unsafe` line it needs) and never does
//! pointer arithmetic:
//!
//! ```ignore
//! use hal::PhysAddr;
//! use memory::ioremap::tock_registers::interfaces::{Readable, Writeable};
//! use memory::ioremap::tock_registers::registers::{ReadOnly, ReadWrite};
//! use memory::ioremap::tock_registers::{register_bitfields, register_structs};
//! use memory::ioremap::{Mmio, RegisterBlock};
//!
//! register_bitfields![u32,
//!     FR [ RXFE OFFSET(4) NUMBITS(1) [], TXFF OFFSET(5) NUMBITS(1) [] ]
//! ];
//! register_structs! {
//!     /// The PL011 registers this driver uses.
//!     Pl011 {
//!         (0x000 => dr: ReadWrite<u32>),
//!         (0x004 => _reserved0),
//!         (0x018 => fr: ReadOnly<u32, FR::Register>),
//!         (0x01c => @END),
//!     }
//! }
//! // SAFETY: every field is a tock-registers register (volatile accesses only) or padding
//! // that is never read, and the layout is the PL011's (checked by register_structs!).
//! unsafe impl RegisterBlock for Pl011 {}
//!
//! // SAFETY: the example's device is owned by it alone and does no DMA.
//! let uart: Mmio<Pl011> = unsafe { Mmio::new(PhysAddr::new(0x0900_0000)) }?; // Device-nGnRE
//! while uart.fr.is_set(FR::TXFF) {}
//! uart.dr.set(u32::from(b'A'));
//! drop(uart); // iounmap; the range is reused after the next lazy purge
//! # Ok::<(), memory::ioremap::IoremapError>(())
//! ```
//!
//! A mapping larger than one block (a GIC distributor's 64 KiB) is an [`IoMem`] from which
//! several blocks are taken: `io.regs::<GicdCore>(0)?`, `io.regs::<[ReadWrite<u32>; 32]>(0x100)?`.
//!
//! ## Instances
//! The free functions and [`IoMem::new`] use the kernel's global vmalloc ([`KernelIo`]).
//! [`IoMem::map_in`] takes any [`IoSpace`]: a [`LockedVmalloc`] of any backend (host tests
//! use the simulated MMU of [`crate::vmalloc::sim`]); register access needs a
//! [`MappedIoSpace`], one whose addresses are real mappings.
//!
//! ## Locks
//! Every call takes vmalloc's lock (and, mapping, the kernel page tables' and the buddy's):
//! never from exception context. Register accesses take no lock.
//!
//! ## Boot devices
//! [`switch_console_to_ioremap`] moves the console to an ioremap of the device tree's
//! PL011, and [`probe_gic`] maps the GIC distributor and reads `GICD_TYPER`; both mappings
//! are kept for the program's life and show in vmallocinfo as `ioremap` with `phys=`.

use core::fmt;
use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::ops::Deref;

use hal::boot::BootInfo;
use hal::{PhysAddr, PhysRange, VirtAddr};
use spin::Once;

/// The `tock-registers` crate drivers declare their registers with (the version this
/// module's [`RegisterBlock`] impls are for).
pub use tock_registers;

use tock_registers::interfaces::Readable;
use tock_registers::registers::{Aliased, ReadOnly, ReadWrite, WriteOnly};
use tock_registers::{register_structs, RegisterLongName, UIntLike};

use crate::kernel::KernelBackend;
pub use crate::vmalloc::DeviceAttr;
use crate::vmalloc::{LockedVmalloc, MapError, VmBackend, VmallocError};

/// One past the highest physical address a translation descriptor holds (48 bits).
pub const PHYS_LIMIT: u64 = hal::mmu::descriptor::PA_LIMIT;

// ----- errors -----

/// Why an ioremap or iounmap was refused. Every refusal leaves the system as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoremapError {
    /// `ioremap` of zero bytes.
    ZeroSize,
    /// `phys + size`, rounded up to a page, does not fit in 64 bits.
    Overflow,
    /// The range reaches above [`PHYS_LIMIT`], more than a descriptor can map, or above the
    /// physical address range this CPU implements ([`hal::cpu::phys_addr_bits`]), where
    /// every access would take an address size fault.
    PhysTooHigh,
    /// Some page of the range is RAM (a memory node of the device tree, reserved parts
    /// included): RAM is reached through the linear map, never remapped as a device.
    Ram,
    /// The range (plus its guard page) is larger than the vmalloc window.
    TooLarge,
    /// No hole of the vmalloc window fits, even after a purge.
    NoVirtualSpace,
    /// The page tables could not map the range (no memory for a table page, …).
    MapFailed(MapError),
    /// `iounmap` of an address that is not the start of a live mapping (an interior
    /// address, a foreign pointer, or an address never mapped).
    NotMapped,
    /// `iounmap` of the address of a vmalloc or vmap area: free those with `vfree` /
    /// `vunmap`.
    NotIoremap,
    /// `iounmap` of a mapping already unmapped (still parked, or recently purged).
    AlreadyUnmapped,
    /// The kernel's vmalloc is used before `memory::kernel::init`.
    NotInitialized,
    /// The device tree names no such device ([`switch_console_to_ioremap`], [`probe_gic`]).
    NoDevice,
    /// A register block does not fit the mapping or is misaligned ([`Mmio`]).
    Regs(RegsError),
    /// Another vmalloc error (e.g. `NoRecords` from an instance without record refill).
    Vmalloc(VmallocError),
}

impl From<VmallocError> for IoremapError {
    fn from(e: VmallocError) -> Self {
        match e {
            VmallocError::ZeroSize => IoremapError::ZeroSize,
            VmallocError::Overflow => IoremapError::Overflow,
            VmallocError::RamRange => IoremapError::Ram,
            VmallocError::TooLarge => IoremapError::TooLarge,
            VmallocError::NoVirtualSpace => IoremapError::NoVirtualSpace,
            VmallocError::MapFailed(m) => IoremapError::MapFailed(m),
            VmallocError::NotAnArea => IoremapError::NotMapped,
            VmallocError::WrongKind => IoremapError::NotIoremap,
            VmallocError::DoubleFree => IoremapError::AlreadyUnmapped,
            VmallocError::NotInitialized => IoremapError::NotInitialized,
            other => IoremapError::Vmalloc(other),
        }
    }
}

impl From<RegsError> for IoremapError {
    fn from(e: RegsError) -> Self {
        IoremapError::Regs(e)
    }
}

impl fmt::Display for IoremapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoremapError::ZeroSize => f.write_str("ioremap of zero bytes"),
            IoremapError::Overflow => f.write_str("physical range overflows 64 bits"),
            IoremapError::PhysTooHigh => f.write_str("physical range above the 48-bit address space"),
            IoremapError::Ram => f.write_str("physical range touches RAM"),
            IoremapError::TooLarge => f.write_str("range larger than the vmalloc window"),
            IoremapError::NoVirtualSpace => f.write_str("out of vmalloc space"),
            IoremapError::MapFailed(e) => write!(f, "mapping failed: {e}"),
            IoremapError::NotMapped => f.write_str("not the address of a live ioremap mapping"),
            IoremapError::NotIoremap => f.write_str("a vmalloc/vmap area, not an ioremap mapping"),
            IoremapError::AlreadyUnmapped => f.write_str("mapping already unmapped (double iounmap)"),
            IoremapError::NotInitialized => f.write_str("vmalloc used before memory::kernel::init"),
            IoremapError::NoDevice => f.write_str("the device tree names no such device"),
            IoremapError::Regs(e) => write!(f, "register block: {e}"),
            IoremapError::Vmalloc(e) => write!(f, "vmalloc: {e}"),
        }
    }
}

impl core::error::Error for IoremapError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            IoremapError::MapFailed(e) => Some(e),
            IoremapError::Regs(e) => Some(e),
            IoremapError::Vmalloc(e) => Some(e),
            _ => None,
        }
    }
}

/// Why [`IoMem::regs`] refused a register block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegsError {
    /// `offset + size` is past the mapping's `len` bytes (or overflows).
    OutOfBounds {
        /// Offset asked for, from the mapping's address.
        offset: usize,
        /// Size of the block.
        size: usize,
        /// Bytes the mapping covers from its address.
        len: usize,
    },
    /// The block's address is not a multiple of its alignment.
    Misaligned {
        /// The address the block would have.
        addr: VirtAddr,
        /// The alignment it needs.
        align: usize,
    },
}

impl fmt::Display for RegsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RegsError::OutOfBounds { offset, size, len } => {
                write!(f, "{size} bytes at offset {offset:#x} do not fit a {len:#x}-byte mapping")
            }
            RegsError::Misaligned { addr, align } => write!(f, "address {addr:#x} is not {align}-byte aligned"),
        }
    }
}

impl core::error::Error for RegsError {}

/// The page-aligned physical range an ioremap of `size` bytes at `phys` maps, after the
/// checks every ioremap makes before looking at RAM: a size of zero, an end that overflows
/// when rounded up to a page, an end above [`PHYS_LIMIT`] or above the CPU's physical
/// address range ([`hal::cpu::phys_addr_bits`]).
///
/// # Errors
/// [`IoremapError::ZeroSize`], [`IoremapError::Overflow`], [`IoremapError::PhysTooHigh`].
///
/// # Example
/// ```no_run
/// // The PL011's flag register: 4 bytes at 0x18 into its page map that whole page.
/// let r = memory::ioremap::covering_range(hal::PhysAddr::new(0x0900_0018), 4)?;
/// assert_eq!((r.start().as_u64(), r.pages()), (0x0900_0000, 1));
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
pub fn covering_range(phys: PhysAddr, size: usize) -> Result<PhysRange, IoremapError> {
    if size == 0 {
        return Err(IoremapError::ZeroSize);
    }
    let bytes = u64::try_from(size).map_err(|_| IoremapError::Overflow)?;
    let range = PhysRange::covering_pages(phys, bytes).map_err(|_| IoremapError::Overflow)?;
    if range.end().as_u64() > PHYS_LIMIT.min(1 << hal::cpu::phys_addr_bits()) {
        return Err(IoremapError::PhysTooHigh);
    }
    Ok(range)
}

/// Where a block of `size` bytes aligned to `align` lies at `offset` in a mapping of `len`
/// bytes at `base`.
fn register_window(
    base: VirtAddr,
    len: usize,
    offset: usize,
    size: usize,
    align: usize,
) -> Result<VirtAddr, RegsError> {
    let oob = RegsError::OutOfBounds { offset, size, len };
    match offset.checked_add(size) {
        Some(end) if end <= len => {}
        _ => return Err(oob),
    }
    let addr = base.checked_add(offset as u64).map_err(|_| oob)?;
    if !addr.is_aligned(align as u64) {
        return Err(RegsError::Misaligned { addr, align });
    }
    Ok(addr)
}

// ----- where mappings come from -----

/// A vmalloc instance that makes and removes device mappings: the kernel's ([`KernelIo`])
/// or any [`LockedVmalloc`] (`&LockedVmalloc<B>`).
pub trait IoSpace {
    /// Maps `size` bytes of device memory at `phys` with `attr`; returns the address of
    /// `phys` (sub-page offset kept).
    ///
    /// # Errors
    /// As [`ioremap`].
    #[track_caller]
    fn map_io(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError>;

    /// Removes a mapping made by [`Self::map_io`] (pass the address it returned).
    ///
    /// # Errors
    /// As [`iounmap`].
    #[track_caller]
    fn unmap_io(&self, addr: VirtAddr) -> Result<(), IoremapError>;

    /// A pointer to `addr`, an address [`Self::map_io`] returned. The default makes it with
    /// exposed provenance: the kernel's device mappings are made by the MMU, not by a Rust
    /// allocation. A space over host memory (a test's fake device) derives it from that
    /// memory instead, so no integer-to-pointer cast is needed (Miri's strict provenance).
    fn io_ptr(&self, addr: VirtAddr) -> *mut u8 {
        core::ptr::with_exposed_provenance_mut(addr.as_u64() as usize)
    }

    /// [`Self::map_io`] for an owning handle: the mapping is marked
    /// [`VmFlags::OWNED`](crate::vmalloc::VmFlags::OWNED), so a plain `iounmap` of its
    /// address is refused while the handle lives. Defaults to [`Self::map_io`].
    ///
    /// # Errors
    /// As [`ioremap`].
    #[track_caller]
    fn map_io_owned(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
        self.map_io(phys, size, attr)
    }

    /// Removes a mapping made by [`Self::map_io_owned`]. Defaults to [`Self::unmap_io`].
    ///
    /// # Errors
    /// As [`iounmap`].
    ///
    /// # Safety
    /// The caller is the handle that owns the mapping and no reference into it outlives the
    /// call.
    #[track_caller]
    unsafe fn unmap_io_owned(&self, addr: VirtAddr) -> Result<(), IoremapError> {
        self.unmap_io(addr)
    }
}

/// An [`IoSpace`] whose addresses are real mappings of the device in the current address
/// space, so that [`IoMem::regs`] may hand out references to them.
///
/// # Safety
/// Every address [`IoSpace::map_io`] returns for `(phys, size)` must be readable and
/// writable memory of the device at `phys`, `size` bytes long from that address, mapped
/// with the requested attribute, until the matching [`IoSpace::unmap_io`], which [`IoMem`]
/// calls only when it is dropped or consumed. (Unmapping a handle's address through another
/// path is the misuse [`IoMem`]'s documentation forbids.) [`IoSpace::io_ptr`] of such an
/// address must return a pointer to it, valid for those accesses.
pub unsafe trait MappedIoSpace: IoSpace {}

impl<B: VmBackend> IoSpace for &LockedVmalloc<B> {
    #[track_caller]
    fn map_io(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
        covering_range(phys, size)?;
        LockedVmalloc::ioremap(self, phys, size, attr).map_err(IoremapError::from)
    }

    #[track_caller]
    fn unmap_io(&self, addr: VirtAddr) -> Result<(), IoremapError> {
        LockedVmalloc::iounmap(self, addr).map_err(IoremapError::from)
    }

    #[track_caller]
    fn map_io_owned(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
        covering_range(phys, size)?;
        LockedVmalloc::ioremap_with(self, phys, size, attr, crate::vmalloc::VmFlags::OWNED).map_err(IoremapError::from)
    }

    #[track_caller]
    unsafe fn unmap_io_owned(&self, addr: VirtAddr) -> Result<(), IoremapError> {
        // SAFETY: forwarded to our caller (the owning handle).
        unsafe { LockedVmalloc::iounmap_owned(self, addr) }.map_err(IoremapError::from)
    }
}

// SAFETY: `KernelBackend::map_device` maps the device's pages in the kernel's live TTBR1
// tables (shared by every core; the descriptors are written and a DSB completes before
// vmalloc returns the address) and only `iounmap` of that area clears them, which an owned
// handle's mapping refuses (`VmFlags::OWNED`) but from the handle itself.
unsafe impl MappedIoSpace for &LockedVmalloc<KernelBackend> {}

/// The kernel's global vmalloc instance (`memory::kernel::init` must have run).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelIo;

impl KernelIo {
    fn instance() -> Result<&'static LockedVmalloc<KernelBackend>, IoremapError> {
        crate::kernel::vmalloc_instance().ok_or(IoremapError::NotInitialized)
    }
}

impl IoSpace for KernelIo {
    #[track_caller]
    fn map_io(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
        Self::instance()?.map_io(phys, size, attr)
    }

    #[track_caller]
    fn unmap_io(&self, addr: VirtAddr) -> Result<(), IoremapError> {
        Self::instance()?.unmap_io(addr)
    }

    #[track_caller]
    fn map_io_owned(&self, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
        Self::instance()?.map_io_owned(phys, size, attr)
    }

    #[track_caller]
    unsafe fn unmap_io_owned(&self, addr: VirtAddr) -> Result<(), IoremapError> {
        // SAFETY: forwarded to our caller (the owning handle).
        unsafe { Self::instance()?.unmap_io_owned(addr) }
    }
}

// SAFETY: forwards to `&LockedVmalloc<KernelBackend>`, a `MappedIoSpace`.
unsafe impl MappedIoSpace for KernelIo {}

// ----- the free functions -----

/// Maps `size` bytes of device registers at `phys` as Device-nGnRE into the vmalloc window
/// (whole pages and a guard page; no frames allocated) and returns the address of `phys`
/// itself: `ioremap(0x0900_0004, 4)` gives `base + 4`. Undo with [`iounmap`]; prefer
/// [`IoMem`], which does it on drop and gives typed register access.
///
/// # Errors
/// [`IoremapError::ZeroSize`], [`IoremapError::Overflow`], [`IoremapError::PhysTooHigh`],
/// [`IoremapError::Ram`] (any page of the range is RAM), [`IoremapError::TooLarge`],
/// [`IoremapError::NoVirtualSpace`], [`IoremapError::MapFailed`],
/// [`IoremapError::NotInitialized`].
///
/// # Example
/// ```no_run
/// use memory::ioremap::{ioremap, iounmap};
/// let fr = ioremap(hal::PhysAddr::new(0x0900_0018), 4)?; // PL011 UARTFR, offset kept
/// // SAFETY: a mapped device register, read as the device expects (32-bit, volatile).
/// let flags = unsafe { fr.as_ptr::<u32>().read_volatile() };
/// iounmap(fr)?;
/// # let _ = flags;
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
#[track_caller]
pub fn ioremap(phys: PhysAddr, size: usize) -> Result<VirtAddr, IoremapError> {
    KernelIo.map_io(phys, size, DeviceAttr::DeviceNGnRE)
}

/// [`ioremap`] as Device-nGnRnE ("non-posted": no early write acknowledgement).
///
/// # Errors
/// As [`ioremap`].
///
/// # Example
/// ```no_run
/// // A doorbell whose write must reach the device before the next instruction goes on.
/// let bell = memory::ioremap::ioremap_np(hal::PhysAddr::new(0x0a00_0050), 4)?;
/// // SAFETY: a mapped 32-bit device register; writing it rings the doorbell.
/// unsafe { bell.as_mut_ptr::<u32>().write_volatile(1) };
/// memory::ioremap::iounmap(bell)?;
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
#[track_caller]
pub fn ioremap_np(phys: PhysAddr, size: usize) -> Result<VirtAddr, IoremapError> {
    KernelIo.map_io(phys, size, DeviceAttr::DeviceNGnRnE)
}

/// [`ioremap`] as Normal non-cacheable memory (write-combining: framebuffers and other
/// memory-like device ranges; reads may be speculative, so never for registers with read
/// side effects).
///
/// # Errors
/// As [`ioremap`].
///
/// # Example
/// ```no_run
/// // A 1024×768×32 framebuffer: writes may combine, no register has read side effects.
/// let fb = memory::ioremap::ioremap_wc(hal::PhysAddr::new(0x1000_0000), 1024 * 768 * 4)?;
/// // SAFETY: the whole framebuffer is mapped from `fb` and belongs to this driver.
/// unsafe { core::ptr::write_bytes(fb.as_mut_ptr::<u8>(), 0, 1024 * 768 * 4) };
/// memory::ioremap::iounmap(fb)?;
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
#[track_caller]
pub fn ioremap_wc(phys: PhysAddr, size: usize) -> Result<VirtAddr, IoremapError> {
    KernelIo.map_io(phys, size, DeviceAttr::NormalNonCacheable)
}

/// [`ioremap`] with the memory type given.
///
/// # Errors
/// As [`ioremap`].
///
/// # Example
/// ```no_run
/// use memory::ioremap::DeviceAttr;
/// let regs = memory::ioremap::ioremap_attr(hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRnE)?;
/// memory::ioremap::iounmap(regs)?;
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
#[track_caller]
pub fn ioremap_attr(phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<VirtAddr, IoremapError> {
    KernelIo.map_io(phys, size, attr)
}

/// Unmaps what [`ioremap`] (or a variant) mapped: pass the address it returned, offset
/// included. The PTEs are cleared now; the virtual range is reused after the next batched
/// TLB flush (the lazy purge `vfree` uses).
///
/// # Errors
/// [`IoremapError::NotMapped`] (not the start of a live mapping: an interior or foreign
/// address), [`IoremapError::NotIoremap`] (a vmalloc or vmap area),
/// [`IoremapError::AlreadyUnmapped`] (a second iounmap), [`IoremapError::NotInitialized`];
/// nothing changes then.
///
/// # Example
/// ```no_run
/// use memory::ioremap::{ioremap, iounmap, IoremapError};
/// let uart = ioremap(hal::PhysAddr::new(0x0900_0000), 0x1000)?;
/// iounmap(uart)?;
/// assert_eq!(iounmap(uart), Err(IoremapError::AlreadyUnmapped));
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
#[track_caller]
pub fn iounmap(addr: VirtAddr) -> Result<(), IoremapError> {
    KernelIo.unmap_io(addr)
}

// ----- register blocks -----

/// A type that describes device registers, so that [`IoMem::regs`] may hand out a
/// reference to it placed over MMIO.
///
/// Implemented for `tock-registers`' [`ReadOnly`], [`ReadWrite`], [`WriteOnly`] and
/// [`Aliased`] registers and for arrays of register blocks; a driver implements it for its
/// [`register_structs!`] types.
///
/// # Safety
/// Implement it only for a type that is a faithful description of device registers:
/// - every byte of it is reached only through volatile accesses: each field is a
///   `tock-registers` register type, an array of them, another `RegisterBlock`, or
///   padding that is never read (the `_reserved` fields `register_structs!` makes);
/// - no field is a plain integer, `Cell`, reference or anything else the compiler may
///   read, write or cache as ordinary memory;
/// - its layout is the device's (`#[repr(C)]`, offsets as the datasheet gives them:
///   `register_structs!` checks them at compile time).
///
/// A wrong offset or access width is a driver bug the device may punish, but with these
/// rules no Rust code reads or writes the MMIO range other than through volatile register
/// accesses.
pub unsafe trait RegisterBlock {}

// SAFETY: a tock-registers register is a `repr(transparent)` `UnsafeCell` accessed only by
// `read_volatile` / `write_volatile`.
unsafe impl<T: UIntLike, R: RegisterLongName> RegisterBlock for ReadOnly<T, R> {}
// SAFETY: as for `ReadOnly`.
unsafe impl<T: UIntLike, R: RegisterLongName> RegisterBlock for ReadWrite<T, R> {}
// SAFETY: as for `ReadOnly`.
unsafe impl<T: UIntLike, R: RegisterLongName> RegisterBlock for WriteOnly<T, R> {}
// SAFETY: as for `ReadOnly` (one cell, read and written with different meanings).
unsafe impl<T: UIntLike, R: RegisterLongName, W: RegisterLongName> RegisterBlock for Aliased<T, R, W> {}
// SAFETY: an array of register blocks is laid out element after element, each accessed
// only as its own type allows.
unsafe impl<B: RegisterBlock, const N: usize> RegisterBlock for [B; N] {}

// ----- the owned mapping -----

/// An owned device mapping: `len` bytes of MMIO from [`Self::addr`]. Unmapped on drop
/// (errors logged); register blocks are taken from it with [`Self::regs`].
///
/// `Send` (a mapping can move to another core) but not `Sync`: register types are not
/// `Sync`, so two cores never share a block through one handle.
///
/// The handle owns its mapping, marked [`VmFlags::OWNED`](crate::vmalloc::VmFlags::OWNED):
/// [`iounmap`] (or `memory::kernel::iounmap`, or a [`LockedVmalloc`]'s `iounmap`) of
/// [`Self::addr`] is refused with `VmallocError::Owned`, so safe code cannot pull the
/// device from under the register blocks borrowed from the handle — the same rule as for
/// `vfree` of a `VBox`'s address. Only dropping (or [`Self::unmap`]) unmaps it.
///
/// Making one is `unsafe` ([`Self::new`], [`Self::map_in`], …): a mapping of a device is
/// its registers and its DMA engine, and safe code must not reach a device another driver
/// (or the console) owns, nor point a device at memory it does not own. Safe code cannot
/// map a device:
///
/// ```compile_fail,E0133
/// // The virtio-mmio slot the virtio driver claims: mapping it needs `unsafe`.
/// let io = memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0a00_0000), 0x200)?;
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
///
/// ```compile_fail,E0133
/// use memory::ioremap::{GicDistributorRegs, Mmio};
/// let gicd: Mmio<GicDistributorRegs> = Mmio::new(hal::PhysAddr::new(0x0800_0000))?;
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
///
/// Not `Sync` (one core at a time; share it behind a lock):
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<memory::ioremap::IoMem>();
/// ```
pub struct IoMem<S: IoSpace = KernelIo> {
    space: S,
    addr: VirtAddr,
    phys: PhysAddr,
    len: usize,
    attr: DeviceAttr,
    /// False once unmapped or leaked: `Drop` then does nothing.
    live: bool,
    _not_sync: PhantomData<*const ()>,
}

// SAFETY: the handle owns its mapping outright; moving it to another core moves that
// ownership. The mapping is in the kernel's TTBR1 tables (or the space's), which every core
// uses, made visible before `map_io` returned, so the address is valid on the new core;
// register accesses are volatile and need no per-core state. `S` itself must be `Send`.
// Not `Sync`: two cores never share a register block through one handle.
unsafe impl<S: IoSpace + Send> Send for IoMem<S> {}

impl IoMem<KernelIo> {
    /// [`ioremap`] of `size` bytes at `phys` (Device-nGnRE), owned.
    ///
    /// # Errors
    /// As [`ioremap`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::tock_registers::interfaces::Readable;
    /// use memory::ioremap::{GicDistributorRegs, IoMem};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { IoMem::new(hal::PhysAddr::new(0x0800_0000), 0x1_0000) }?; // a GIC distributor, 64 KiB
    /// let typer = io.regs::<GicDistributorRegs>(0)?.typer.get();
    /// # let _ = typer;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn new(phys: PhysAddr, size: usize) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::map_in(KernelIo, phys, size, DeviceAttr::DeviceNGnRE) }
    }

    /// [`ioremap_np`], owned.
    ///
    /// # Errors
    /// As [`ioremap`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new_np(hal::PhysAddr::new(0x0900_0000), 0x1000) }?;
    /// # let _ = io;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn new_np(phys: PhysAddr, size: usize) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::map_in(KernelIo, phys, size, DeviceAttr::DeviceNGnRnE) }
    }

    /// [`ioremap_wc`], owned.
    ///
    /// # Errors
    /// As [`ioremap`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let fb = unsafe { memory::ioremap::IoMem::new_wc(hal::PhysAddr::new(0x1000_0000), 1024 * 768 * 4) }?;
    /// // SAFETY: the framebuffer is mapped from `fb.addr()`, `fb.len()` bytes, and is ours.
    /// unsafe { core::ptr::write_bytes(fb.addr().as_mut_ptr::<u8>(), 0, fb.len()) };
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn new_wc(phys: PhysAddr, size: usize) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::map_in(KernelIo, phys, size, DeviceAttr::NormalNonCacheable) }
    }

    /// [`ioremap_attr`], owned.
    ///
    /// # Errors
    /// As [`ioremap`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{DeviceAttr, IoMem};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { IoMem::with_attr(hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE) }?;
    /// # let _ = io;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn with_attr(phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::map_in(KernelIo, phys, size, attr) }
    }
}

impl<S: IoSpace> IoMem<S> {
    /// Maps `size` bytes at `phys` with `attr` in `space`, owned.
    ///
    /// # Errors
    /// As [`ioremap`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{DeviceAttr, IoMem, KernelIo};
    /// // Any `IoSpace`: the kernel's (`KernelIo`), or a `&LockedVmalloc` of another instance.
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { IoMem::map_in(KernelIo, hal::PhysAddr::new(0x0900_0000), 0x1000, DeviceAttr::DeviceNGnRE) }?;
    /// # let _ = io;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn map_in(space: S, phys: PhysAddr, size: usize, attr: DeviceAttr) -> Result<Self, IoremapError> {
        let addr = space.map_io_owned(phys, size, attr)?;
        Ok(Self { space, addr, phys, len: size, attr, live: true, _not_sync: PhantomData })
    }

    /// The address of the physical address mapped (offset inside its page included).
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0018), 4) }?;
    /// assert_eq!(io.addr().as_u64() % 4096, 0x18);        // the sub-page offset is kept
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn addr(&self) -> VirtAddr {
        self.addr
    }

    /// The physical address mapped.
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x1000) }?;
    /// log::info!("PL011 at PA {:#x} mapped at {:#x}", io.phys(), io.addr());
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn phys(&self) -> PhysAddr {
        self.phys
    }

    /// Bytes mapped from [`Self::addr`] (as asked; the mapping covers whole pages).
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x48) }?;
    /// assert_eq!(io.len(), 0x48);                          // as asked, though a page is mapped
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one byte.
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x1000) }?;
    /// assert!(!io.is_empty());
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory type.
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{DeviceAttr, IoMem};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x1000) }?;
    /// assert_eq!(io.attr(), DeviceAttr::DeviceNGnRE);
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn attr(&self) -> DeviceAttr {
        self.attr
    }

    /// Where a block of type `R` at `offset` would lie, after the checks [`Self::regs`]
    /// makes. Needs no [`MappedIoSpace`]: nothing is dereferenced.
    ///
    /// # Errors
    /// [`RegsError::OutOfBounds`] when `offset + size_of::<R>() > len` (or overflows),
    /// [`RegsError::Misaligned`] when `addr + offset` is not a multiple of `align_of::<R>()`.
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::tock_registers::registers::ReadOnly;
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x1000) }?;
    /// let fr = io.reg_addr::<ReadOnly<u32>>(0x18)?;        // where UARTFR is, nothing read
    /// assert_eq!(fr.as_u64(), io.addr().as_u64() + 0x18);
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn reg_addr<R>(&self, offset: usize) -> Result<VirtAddr, RegsError> {
        register_window(self.addr, self.len, offset, size_of::<R>(), align_of::<R>())
    }

    /// Unmaps now, reporting an error instead of logging it as `drop` does.
    ///
    /// # Errors
    /// As [`iounmap`] (never expected: the handle owns a live mapping).
    ///
    /// # Example
    /// ```no_run
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0900_0000), 0x1000) }?;
    /// io.unmap()?;                                         // an error is returned, not logged
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub fn unmap(mut self) -> Result<(), IoremapError> {
        self.live = false;
        // SAFETY: `self` owns the mapping and is consumed: no register reference it handed
        // out (all borrow `self`) can outlive this call.
        unsafe { self.space.unmap_io_owned(self.addr) }
    }

    /// Keeps the mapping for the rest of the program and returns its address (for
    /// devices the kernel never gives back: the console, the interrupt controller).
    ///
    /// # Example
    /// ```no_run
    /// // The interrupt controller is never given back.
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let gicd = unsafe { memory::ioremap::IoMem::new(hal::PhysAddr::new(0x0800_0000), 0x1_0000) }?.leak();
    /// # let _ = gicd;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn leak(mut self) -> VirtAddr {
        self.live = false;
        self.addr
    }
}

impl<S: MappedIoSpace> IoMem<S> {
    /// The register block `R` at `offset` bytes from [`Self::addr`], borrowed from the
    /// handle (so the mapping outlives it). `R` is a [`RegisterBlock`]: every access is a
    /// volatile register access.
    ///
    /// This is `tock-registers`' model — a reference to a struct of `UnsafeCell` registers —
    /// which drivers expect. Rust treats such a reference as dereferenceable, so in principle
    /// the compiler may add loads of its own (unsafe-code-guidelines #411); for registers
    /// whose reads have side effects (FIFOs, interrupt acknowledge), [`Self::reg_addr`] gives
    /// the address for a pointer-based accessor such as `safe-mmio` instead.
    ///
    /// # Errors
    /// As [`Self::reg_addr`].
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::tock_registers::interfaces::{Readable, Writeable};
    /// use memory::ioremap::tock_registers::registers::ReadWrite;
    /// use memory::ioremap::{GicDistributorRegs, IoMem};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { IoMem::new(hal::PhysAddr::new(0x0800_0000), 0x1_0000) }?;
    /// let gicd = io.regs::<GicDistributorRegs>(0)?;
    /// let lines = 32 * (gicd.typer.get() & 0x1f) + 32;
    /// // GICD_ISENABLER<n>: 32 set-enable registers from 0x100.
    /// let isenabler = io.regs::<[ReadWrite<u32>; 32]>(0x100)?;
    /// isenabler[1].set(1 << 1);                            // enable INTID 33
    /// # let _ = lines;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn regs<R: RegisterBlock>(&self, offset: usize) -> Result<&R, RegsError> {
        let at = self.reg_addr::<R>(offset)?;
        // SAFETY: `[at, at + size_of::<R>())` lies inside the `len` bytes mapped from
        // `addr` (checked above), which `S: MappedIoSpace` guarantees are the device's
        // memory, mapped until `unmap_io` — which only `drop`/`unmap` of this handle call,
        // and the borrow of `self` keeps them from running while the reference lives. The
        // address is aligned for `R` (checked), and `R: RegisterBlock` means the memory is
        // only ever accessed through volatile register operations, so placing `&R` over
        // MMIO neither reads it nor lets it be cached.
        Ok(unsafe { &*self.space.io_ptr(at).cast::<R>() })
    }
}

impl<S: IoSpace> Drop for IoMem<S> {
    fn drop(&mut self) {
        if self.live {
            self.live = false;
            // SAFETY: `self` owns the mapping and is being dropped: every register reference
            // it handed out borrowed it and is gone.
            if let Err(e) = unsafe { self.space.unmap_io_owned(self.addr) } {
                log::error!("IoMem drop: iounmap({:#x}) of PA {:#x}: {e}", self.addr, self.phys);
            }
        }
    }
}

impl<S: IoSpace> fmt::Debug for IoMem<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoMem")
            .field("addr", &self.addr)
            .field("phys", &self.phys)
            .field("len", &self.len)
            .field("attr", &self.attr)
            .finish()
    }
}

/// An owned mapping that is one register block `R` (of `size_of::<R>()` bytes), which it
/// dereferences to. Unmapped on drop.
///
/// ```ignore
/// // SAFETY: the example's device is owned by it alone and does no DMA.
/// let gicd: Mmio<GicDistributor> = unsafe { Mmio::new(PhysAddr::new(0x0800_0000)) }?;
/// let lines = 32 * (gicd.typer.read(GICD_TYPER::ITLinesNumber) + 1);
/// ```
pub struct Mmio<R: RegisterBlock, S: IoSpace = KernelIo> {
    io: IoMem<S>,
    _regs: PhantomData<R>,
}

impl<R: RegisterBlock> Mmio<R, KernelIo> {
    /// Maps `R` at `phys` as Device-nGnRE.
    ///
    /// # Errors
    /// As [`ioremap`], and [`IoremapError::Regs`] when `phys` is not aligned for `R` (the
    /// mapping is undone then).
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// use hal::PhysAddr;
    /// use memory::ioremap::tock_registers::interfaces::{Readable, Writeable};
    /// use memory::ioremap::tock_registers::registers::{ReadOnly, ReadWrite};
    /// use memory::ioremap::tock_registers::{register_bitfields, register_structs};
    /// use memory::ioremap::{Mmio, RegisterBlock};
    ///
    /// register_bitfields![u32,
    ///     FR [ RXFE OFFSET(4) NUMBITS(1) [], TXFF OFFSET(5) NUMBITS(1) [] ]
    /// ];
    /// register_structs! {
    ///     /// The PL011 registers this driver uses.
    ///     Pl011 {
    ///         (0x000 => dr: ReadWrite<u32>),
    ///         (0x004 => _reserved0),
    ///         (0x018 => fr: ReadOnly<u32, FR::Register>),
    ///         (0x01c => @END),
    ///     }
    /// }
    /// // SAFETY: every field is a tock-registers register (volatile accesses only) or padding
    /// // that is never read, and the layout is the PL011's (checked by register_structs!).
    /// unsafe impl RegisterBlock for Pl011 {}
    ///
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let uart: Mmio<Pl011> = unsafe { Mmio::new(PhysAddr::new(0x0900_0000)) }?; // Device-nGnRE
    /// while uart.fr.is_set(FR::TXFF) {}
    /// uart.dr.set(u32::from(b'A'));
    /// drop(uart); // iounmap; the range is reused after the next lazy purge
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn new(phys: PhysAddr) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::map_in(KernelIo, phys, DeviceAttr::DeviceNGnRE) }
    }

    /// Maps `R` at `phys` with `attr`.
    ///
    /// # Errors
    /// As [`Self::new`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{DeviceAttr, GicDistributorRegs, Mmio};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let gicd = unsafe { Mmio::<GicDistributorRegs>::with_attr(hal::PhysAddr::new(0x0800_0000), DeviceAttr::DeviceNGnRnE) }?;
    /// # let _ = gicd;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn with_attr(phys: PhysAddr, attr: DeviceAttr) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        unsafe { Self::map_in(KernelIo, phys, attr) }
    }
}

impl<R: RegisterBlock, S: IoSpace> Mmio<R, S> {
    /// Maps `R` at `phys` with `attr` in `space`.
    ///
    /// # Errors
    /// As [`Mmio::new`].
    ///
    /// # Safety
    /// The caller must own the device at `phys` exclusively while the handle lives (no
    /// other driver, console or handle programs it), or coordinate every access with whoever
    /// else does. A mapped device's DMA engine is the caller's too: it must not program it
    /// to read or write memory the caller does not own (page tables, `.data`, another
    /// driver's buffers).
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{DeviceAttr, GicDistributorRegs, KernelIo, Mmio};
    /// let gicd: Mmio<GicDistributorRegs> =
    ///     // SAFETY: the example's device is owned by it alone and does no DMA.
    ///     unsafe { Mmio::map_in(KernelIo, hal::PhysAddr::new(0x0800_0000), DeviceAttr::DeviceNGnRE) }?;
    /// # let _ = gicd;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    #[track_caller]
    pub unsafe fn map_in(space: S, phys: PhysAddr, attr: DeviceAttr) -> Result<Self, IoremapError> {
        // SAFETY: forwarded to our caller.
        Self::from_io(unsafe { IoMem::map_in(space, phys, size_of::<R>(), attr) }?)
    }

    /// Takes a mapping whose first bytes are `R`.
    ///
    /// # Errors
    /// [`IoremapError::Regs`] when `R` does not fit at offset 0 (the mapping is dropped,
    /// so unmapped, then).
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::tock_registers::interfaces::Readable;
    /// use memory::ioremap::{GicDistributorRegs, IoMem, Mmio};
    /// // Map the whole 64 KiB distributor, but use it typed as its first registers.
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let io = unsafe { IoMem::new(hal::PhysAddr::new(0x0800_0000), 0x1_0000) }?;
    /// let gicd = Mmio::<GicDistributorRegs>::from_io(io)?;
    /// let iidr = gicd.iidr.get();
    /// # let _ = iidr;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn from_io(io: IoMem<S>) -> Result<Self, IoremapError> {
        io.reg_addr::<R>(0)?;
        Ok(Self { io, _regs: PhantomData })
    }

    /// The mapping.
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{GicDistributorRegs, Mmio};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let gicd: Mmio<GicDistributorRegs> = unsafe { Mmio::new(hal::PhysAddr::new(0x0800_0000)) }?;
    /// log::info!("GICD at {:#x}", gicd.io().addr());
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn io(&self) -> &IoMem<S> {
        &self.io
    }

    /// The mapping, no longer typed.
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{GicDistributorRegs, Mmio};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let gicd: Mmio<GicDistributorRegs> = unsafe { Mmio::new(hal::PhysAddr::new(0x0800_0000)) }?;
    /// let io = gicd.into_io();                             // still mapped, untyped
    /// io.unmap()?;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn into_io(self) -> IoMem<S> {
        self.io
    }

    /// Keeps the mapping for the rest of the program; returns its address.
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::{GicDistributorRegs, Mmio};
    /// // SAFETY: the example's device is owned by it alone and does no DMA.
    /// let gicd: Mmio<GicDistributorRegs> = unsafe { Mmio::new(hal::PhysAddr::new(0x0800_0000)) }?;
    /// let base = gicd.leak();                              // mapped for the program's life
    /// # let _ = base;
    /// # Ok::<(), memory::ioremap::IoremapError>(())
    /// ```
    pub fn leak(self) -> VirtAddr {
        self.io.leak()
    }
}

impl<R: RegisterBlock, S: MappedIoSpace> Deref for Mmio<R, S> {
    type Target = R;

    fn deref(&self) -> &R {
        // SAFETY: `from_io` checked that `R` fits at offset 0 and is aligned; the rest is
        // `IoMem::regs`'s argument: `S: MappedIoSpace` keeps the device mapped while `self`
        // (borrowed by the result) owns the mapping, and `R: RegisterBlock` is only ever
        // accessed through volatile register operations.
        unsafe { &*self.io.space.io_ptr(self.io.addr).cast::<R>() }
    }
}

impl<R: RegisterBlock, S: IoSpace> fmt::Debug for Mmio<R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Mmio").field(&self.io).finish()
    }
}

// ----- boot devices: the console and the GIC distributor -----

static CONSOLE: Once<VirtAddr> = Once::new();

/// Moves the console (and with it the logger) to an ioremap of the device tree's PL011
/// (Device-nGnRE), and returns the new address. Call once the memory system is up; later
/// calls return the same address without mapping again.
///
/// The mapping is kept for the program's life on purpose (its [`IoMem`] is leaked): the
/// console writes to it from any context, panics and faults included, so it must never
/// go away. It shows in vmallocinfo as `ioremap` with `phys=` the UART's page.
///
/// # Errors
/// [`IoremapError::NoDevice`] when the device tree names no PL011, or as [`ioremap`]; the
/// console then stays where it was.
///
/// # Example
/// ```no_run
/// // after memory::kernel::init(info):
/// let info = hal::boot::boot_info().unwrap();
/// let uart = memory::ioremap::switch_console_to_ioremap(info)?;
/// log::info!("console now at {uart:#x}");
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
pub fn switch_console_to_ioremap(info: &BootInfo) -> Result<VirtAddr, IoremapError> {
    let &va = CONSOLE.try_call_once(|| {
        let uart = info.platform.uart.ok_or(IoremapError::NoDevice)?;
        let size = usize::try_from(uart.size()).map_err(|_| IoremapError::TooLarge)?;
        // SAFETY: the device tree's console UART belongs to the console; this runs once
        // (`CONSOLE`) and hands the mapping to the console alone (`rebase` below), which
        // drives no DMA.
        let io = unsafe { IoMem::new(uart.start(), size) }?;
        let va = io.leak();
        // SAFETY: `va` maps the device tree's console PL011 as Device-nGnRE, leaked above so
        // it stays mapped for the rest of the program; the console driver is the only
        // user of that UART and `rebase` replaces its previous instance (whose identity
        // mapping stays valid meanwhile).
        unsafe { hal::console::rebase(va) };
        log::info!("console: PL011 at PA {:#x} now reached through ioremap at {va:#x}", uart.start());
        Ok::<_, IoremapError>(va)
    })?;
    Ok(va)
}

/// The console's ioremap address, once [`switch_console_to_ioremap`] has succeeded.
///
/// # Example
/// ```no_run
/// if let Some(uart) = memory::ioremap::console_mapping() {
///     log::info!("console reached through ioremap at {uart:#x}");
/// }
/// ```
pub fn console_mapping() -> Option<VirtAddr> {
    CONSOLE.get().copied()
}

/// The GIC distributor registers [`probe_gic`] reads (their layout is the same in GICv2
/// and GICv3).
#[allow(missing_docs)] // generated by tock-registers: constants named by the field list
pub mod gicd {
    use tock_registers::register_bitfields;

    register_bitfields![u32,
        /// `GICD_TYPER`, offset 0x004.
        pub GICD_TYPER [
            /// Interrupt lines: 32 × (N + 1).
            ITLinesNumber OFFSET(0) NUMBITS(5) [],
            /// Implemented CPU interfaces minus one (GICv2; zero with affinity routing).
            CPUNumber OFFSET(5) NUMBITS(3) [],
            /// Whether the GIC implements the Security Extensions.
            SecurityExtn OFFSET(10) NUMBITS(1) [],
            /// Lockable shared peripheral interrupts (GICv2).
            LSPI OFFSET(11) NUMBITS(5) []
        ],
        /// `GICD_IIDR`, offset 0x008.
        pub GICD_IIDR [
            /// JEP106 code of the implementer (0x43b: Arm).
            Implementer OFFSET(0) NUMBITS(12) [],
            /// Revision.
            Revision OFFSET(12) NUMBITS(4) [],
            /// Variant.
            Variant OFFSET(16) NUMBITS(4) [],
            /// Product identifier.
            ProductID OFFSET(24) NUMBITS(8) []
        ]
    ];
}

register_structs! {
    /// The first registers of a GIC distributor.
    pub GicDistributorRegs {
        /// `GICD_CTLR`: distributor control.
        (0x000 => pub ctlr: ReadWrite<u32>),
        /// `GICD_TYPER`: what the distributor implements.
        (0x004 => pub typer: ReadOnly<u32, gicd::GICD_TYPER::Register>),
        /// `GICD_IIDR`: implementer identification.
        (0x008 => pub iidr: ReadOnly<u32, gicd::GICD_IIDR::Register>),
        (0x00c => @END),
    }
}

// SAFETY: every field is a tock-registers register, laid out as the GIC architecture
// specification gives (`register_structs!` checks the offsets).
unsafe impl RegisterBlock for GicDistributorRegs {}

/// What [`probe_gic`] read from the GIC distributor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicInfo {
    /// The distributor's physical base (device tree).
    pub phys: PhysAddr,
    /// Its ioremap address (kept for the program's life).
    pub base: VirtAddr,
    /// Bytes mapped (the device tree's `reg` size).
    pub size: usize,
    /// `GICD_TYPER` as read.
    pub typer: u32,
    /// `GICD_IIDR` as read.
    pub iidr: u32,
    /// Interrupt lines, 32 × (ITLinesNumber + 1) (INTIDs 1020–1023 are special even when
    /// this says 1024).
    pub lines: u32,
    /// CPU interfaces, CPUNumber + 1.
    pub cpus: u32,
}

impl GicInfo {
    /// Decodes `GICD_TYPER` and `GICD_IIDR` of the distributor at `phys`, mapped at `base`.
    ///
    /// # Example
    /// ```no_run
    /// use memory::ioremap::GicInfo;
    /// // GICD_TYPER of QEMU's virt GICv2: ITLinesNumber 9 (320 lines), CPUNumber 7.
    /// let gic = GicInfo::decode(hal::PhysAddr::new(0x0800_0000), hal::VirtAddr::new(0), 0x1_0000, 0xe9, 0x43b);
    /// assert_eq!((gic.lines, gic.cpus), (320, 8));
    /// ```
    pub fn decode(phys: PhysAddr, base: VirtAddr, size: usize, typer: u32, iidr: u32) -> Self {
        let t = tock_registers::LocalRegisterCopy::<u32, gicd::GICD_TYPER::Register>::new(typer);
        let lines = 32 * (t.read(gicd::GICD_TYPER::ITLinesNumber) + 1);
        let cpus = t.read(gicd::GICD_TYPER::CPUNumber) + 1;
        Self { phys, base, size, typer, iidr, lines, cpus }
    }
}

impl fmt::Display for GicInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GIC distributor at PA {:#x} (ioremap {:#x}): GICD_TYPER={:#010x}: {} interrupt lines, {} CPU interface(s); GICD_IIDR={:#010x}",
            self.phys, self.base, self.typer, self.lines, self.cpus, self.iidr
        )
    }
}

static GIC: Once<GicInfo> = Once::new();

/// Maps the GIC distributor the device tree names (Device-nGnRE) and reads `GICD_TYPER`
/// (and `GICD_IIDR`) through [`GicDistributorRegs`]; logs and returns what it found. Call
/// once the memory system is up; later calls return the same answer without mapping (or
/// logging) again.
///
/// The mapping is kept for the program's life (its [`IoMem`] is leaked deliberately: the
/// interrupt controller is never given back; an interrupt driver takes its address from
/// [`GicInfo::base`]). It shows in vmallocinfo as `ioremap` with `phys=` the distributor.
///
/// # Errors
/// [`IoremapError::NoDevice`] when the device tree names no GIC, as [`ioremap`], or
/// [`IoremapError::Regs`] when its `reg` is too small for the registers read.
///
/// # Example
/// ```no_run
/// let gic = memory::ioremap::probe_gic(hal::boot::boot_info().unwrap())?;
/// log::info!("{} interrupt lines; distributor mapped at {:#x}", gic.lines, gic.base);
/// # Ok::<(), memory::ioremap::IoremapError>(())
/// ```
pub fn probe_gic(info: &BootInfo) -> Result<GicInfo, IoremapError> {
    let gic = *GIC.try_call_once(|| {
        let dist = info.platform.gic_distributor.ok_or(IoremapError::NoDevice)?;
        let size = usize::try_from(dist.size()).map_err(|_| IoremapError::TooLarge)?;
        // SAFETY: runs once (`GIC`) and only reads `GICD_TYPER` and `GICD_IIDR`, read-only
        // identification registers without side effects, so it cannot disturb the GIC
        // driver that owns the distributor; a GIC does no DMA.
        let io = unsafe { IoMem::new(dist.start(), size) }?;
        let regs = io.regs::<GicDistributorRegs>(0)?;
        let (typer, iidr) = (regs.typer.get(), regs.iidr.get());
        let gic = GicInfo::decode(dist.start(), io.addr(), size, typer, iidr);
        io.leak();
        log::info!("{gic}");
        Ok::<_, IoremapError>(gic)
    })?;
    Ok(gic)
}

/// What [`probe_gic`] found, once it has succeeded.
///
/// # Example
/// ```no_run
/// if let Some(gic) = memory::ioremap::gic_info() {
///     log::info!("{gic}");
/// }
/// ```
pub fn gic_info() -> Option<GicInfo> {
    GIC.get().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_range_rounds_to_pages_and_refuses() {
        let r = covering_range(PhysAddr::new(0x0900_0004), 4).unwrap();
        assert_eq!((r.start().as_u64(), r.end().as_u64()), (0x0900_0000, 0x0900_1000));
        let r = covering_range(PhysAddr::new(0x0900_0ffc), 8).unwrap();
        assert_eq!((r.start().as_u64(), r.pages()), (0x0900_0000, 2));
        assert_eq!(covering_range(PhysAddr::new(0x0900_0000), 0), Err(IoremapError::ZeroSize));
        assert_eq!(covering_range(PhysAddr::new(u64::MAX - 8), 100), Err(IoremapError::Overflow));
        assert_eq!(
            covering_range(PhysAddr::new(u64::MAX - 0xfff), 1),
            Err(IoremapError::Overflow),
            "end rounds to 2^64"
        );
        assert_eq!(covering_range(PhysAddr::new(1), usize::MAX), Err(IoremapError::Overflow));
        assert_eq!(covering_range(PhysAddr::new(PHYS_LIMIT - 0x1000), 0x1000).map(|r| r.pages()), Ok(1));
        assert_eq!(covering_range(PhysAddr::new(PHYS_LIMIT - 0x1000), 0x1001), Err(IoremapError::PhysTooHigh));
        assert_eq!(covering_range(PhysAddr::new(PHYS_LIMIT), 4), Err(IoremapError::PhysTooHigh));
    }

    #[test]
    fn register_window_checks_bounds_and_alignment() {
        let base = VirtAddr::new(0xffff_0000_0000_0004);
        assert_eq!(register_window(base, 0x20, 0, 4, 4), Ok(base));
        assert_eq!(register_window(base, 0x20, 0x1c, 4, 4), Ok(base.add(0x1c)), "last word");
        assert_eq!(
            register_window(base, 0x20, 0x1d, 4, 4),
            Err(RegsError::OutOfBounds { offset: 0x1d, size: 4, len: 0x20 })
        );
        assert_eq!(
            register_window(base, 0x20, 0x20, 4, 4),
            Err(RegsError::OutOfBounds { offset: 0x20, size: 4, len: 0x20 })
        );
        assert_eq!(register_window(base, 0x20, 0x20, 0, 1), Ok(base.add(0x20)), "empty block at the end");
        assert!(matches!(register_window(base, 0x20, usize::MAX, 4, 4), Err(RegsError::OutOfBounds { .. })));
        assert_eq!(register_window(base, 0x20, 2, 4, 4), Err(RegsError::Misaligned { addr: base.add(2), align: 4 }));
        assert_eq!(register_window(base, 0x20, 4, 8, 8), Ok(base.add(4)), "base + 4 is 8-aligned");
        assert_eq!(register_window(base, 0x20, 0, 8, 8), Err(RegsError::Misaligned { addr: base, align: 8 }));
        let top = VirtAddr::new(u64::MAX - 3);
        assert!(matches!(register_window(top, usize::MAX, 8, 4, 4), Err(RegsError::OutOfBounds { .. })));
    }

    #[test]
    fn vmalloc_errors_map_to_ioremap_errors() {
        assert_eq!(IoremapError::from(VmallocError::RamRange), IoremapError::Ram);
        assert_eq!(IoremapError::from(VmallocError::NotAnArea), IoremapError::NotMapped);
        assert_eq!(IoremapError::from(VmallocError::WrongKind), IoremapError::NotIoremap);
        assert_eq!(IoremapError::from(VmallocError::DoubleFree), IoremapError::AlreadyUnmapped);
        assert_eq!(IoremapError::from(VmallocError::NoRecords), IoremapError::Vmalloc(VmallocError::NoRecords));
    }

    #[test]
    fn gic_typer_decodes() {
        // QEMU virt, GICv2, 288 lines, 1 CPU: ITLinesNumber 8, CPUNumber 0.
        let g =
            GicInfo::decode(PhysAddr::new(0x0800_0000), VirtAddr::new(0xffff_0000_0000_0000), 0x1_0000, 0x0000_fc08, 0);
        assert_eq!((g.lines, g.cpus), (288, 1));
        let g = GicInfo::decode(PhysAddr::new(0), VirtAddr::new(0), 0, 0x1f | (7 << 5), 0);
        assert_eq!((g.lines, g.cpus), (1024, 8));
        assert!(alloc_free_format(&g).contains("1024 interrupt lines, 8 CPU interface(s)"));
    }

    fn alloc_free_format(g: &GicInfo) -> std::string::String {
        std::format!("{g}")
    }
}
