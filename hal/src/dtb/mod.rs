//! What the device tree tells us about the machine: RAM, reserved memory, the console
//! UART, the PSCI conduit, the interrupt controller and the command line.
//!
//! Parsing is done by the `flat_device_tree` crate; this module turns its answers into
//! plain typed data ([`Platform`]) that needs no heap, so it can run before any allocator.

mod cpus;
mod dma;
mod gic;
mod nops;
mod ranges;
mod reserved;

pub use cpus::{CpuList, MAX_CPUS, MPIDR_AFFINITY_MASK};
pub use gic::{GicNode, GicVersion};
pub use nops::{count_nops, strip_nops, Malformed};
pub use ranges::{Full, RangeList, MAX_RAM_RANGES};
pub use reserved::{Reserved, ReservedKind, ReservedList, MAX_DYNAMIC, MAX_RESERVED};

use crate::addr::{PhysAddr, PhysRange};
use core::fmt;
use flat_device_tree::Fdt;

/// The instruction PSCI calls go through (`/psci` `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// `hvc #0`: firmware at EL2 (QEMU's PSCI without virtualization).
    Hvc,
    /// `smc #0`: firmware at EL3 (or QEMU's PSCI when we own EL2).
    Smc,
}

/// Why the device tree could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtbError {
    /// No FDT magic at the address given.
    BadMagic,
    /// The blob did not parse.
    Malformed,
    /// The structure block still holds `FDT_NOP` tokens, which `flat_device_tree` misreads
    /// (nodes after them are not found): remove them first with [`strip_nops`].
    NopTokens(usize),
    /// The tree has no usable RAM (`device_type = "memory"`) node.
    NoMemory,
    /// More entries of one kind than boot keeps: the tree is refused, never cut.
    TooMany {
        /// What there were too many of.
        what: &'static str,
        /// How many the tree names.
        found: usize,
        /// The bound ([`MAX_RAM_RANGES`], [`MAX_RESERVED`], [`MAX_DYNAMIC`]).
        max: usize,
    },
    /// A reserved-memory entry (named) that cannot be read: bad cells, a zero or
    /// overflowing size, no `reg` and no `size`, a non-power-of-two alignment.
    BadReserved(&'static str),
    /// A `size`-only reserved-memory child (named) for which no free place was found.
    CannotPlace(&'static str),
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtbError::BadMagic => f.write_str("no device tree magic (0xd00dfeed)"),
            DtbError::Malformed => f.write_str("device tree does not parse"),
            DtbError::NopTokens(n) => write!(f, "device tree holds {n} FDT_NOP tokens (strip them before parsing)"),
            DtbError::NoMemory => f.write_str("device tree names no RAM"),
            DtbError::TooMany { what, found, max } => {
                write!(f, "device tree names {found} {what}; at most {max} are supported")
            }
            DtbError::BadReserved(name) => write!(f, "reserved memory \"{name}\" cannot be read"),
            DtbError::CannotPlace(name) => {
                write!(f, "reserved memory \"{name}\" (size only) finds no free place in RAM")
            }
        }
    }
}

impl core::error::Error for DtbError {}

/// The machine as the device tree describes it.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// Where the DTB itself lies (it must stay reserved while we read it).
    pub dtb: PhysRange,
    /// RAM: every `device_type = "memory"` node's `reg`.
    pub ram: RangeList,
    /// `/memreserve/` entries and `/reserved-memory` children, dynamic ones placed.
    pub reserved: ReservedList,
    /// The CPUs `/cpus` lists.
    pub cpus: CpuList,
    /// The PL011 console (`arm,pl011`), preferring `/chosen/stdout-path`.
    pub uart: Option<PhysRange>,
    /// The GIC distributor (`arm,cortex-a15-gic` / `arm,gic-v3`), first `reg` entry.
    pub gic_distributor: Option<PhysRange>,
    /// The GIC node (version and every `reg` range), when there is one.
    pub gic: Option<GicNode>,
    /// The virtual timer's INTID (a PPI), from the `arm,armv8-timer` node.
    pub timer_intid: Option<u32>,
    /// PSCI conduit, when the tree has a `/psci` node.
    pub psci: Option<Conduit>,
    /// The end (exclusive) of the memory every bus master can reach, from the tree's
    /// `dma-ranges` (the lowest reach over all buses, Linux's
    /// `of_dma_get_max_cpu_address`); `None` when no bus limits it (QEMU virt). The memory
    /// system puts a `DMA` zone below it when it lies under 4 GiB.
    pub dma_limit: Option<PhysAddr>,
    /// The board's `model` string.
    pub model: &'static str,
    /// The command line (`/chosen/bootargs`), empty when absent.
    pub bootargs: &'static str,
    /// The blob itself, as checked by `parse` (private: [`Platform::fdt`] reads it).
    blob: &'static [u8],
}

/// The blob at `ptr`, its length taken from its header.
///
/// # Safety
/// `ptr` must point to readable memory holding a device tree, unchanged and readable for
/// the rest of the program.
unsafe fn blob_at(ptr: *const u8) -> Result<&'static [u8], DtbError> {
    // SAFETY: the caller promises a readable header; the magic is checked before the size
    // it gives is trusted.
    let header = unsafe { core::slice::from_raw_parts(ptr, 8) };
    if header[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
        return Err(DtbError::BadMagic);
    }
    let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    // SAFETY: the header says the blob is `size` bytes long; the caller promises it is
    // readable and unchanged for the program's lifetime.
    Ok(unsafe { core::slice::from_raw_parts(ptr, size) })
}

/// Removes the `FDT_NOP` tokens of the device tree at `ptr` in place (see [`strip_nops`]);
/// returns how many there were.
///
/// # Safety
/// `ptr` must point to a device tree in writable memory that nothing else reads or
/// writes meanwhile (boot calls this once, before anything has parsed the tree).
///
/// # Errors
/// [`DtbError::BadMagic`] or [`DtbError::Malformed`]; the tree is then unchanged.
pub unsafe fn strip_nops_at(ptr: *mut u8) -> Result<usize, DtbError> {
    // SAFETY: forwarded: a readable device tree header at `ptr`.
    let len = unsafe { blob_at(ptr) }?.len();
    // SAFETY: the caller promises `len` bytes of writable memory that nothing else uses.
    let blob = unsafe { core::slice::from_raw_parts_mut(ptr, len) };
    strip_nops(blob).map_err(|Malformed| DtbError::Malformed)
}

/// The console PL011: `/chosen/stdout-path`'s node when it is one, else the first
/// `arm,pl011` node.
fn find_uart(fdt: &Fdt<'_>) -> Option<PhysRange> {
    let stdout_uart = fdt
        .chosen()
        .ok()
        .and_then(|c| c.stdout())
        .map(|s| s.node())
        .filter(|n| n.compatible().is_some_and(|c| c.all().any(|s| s == "arm,pl011")));
    stdout_uart.or_else(|| fdt.find_compatible(&["arm,pl011"])).and_then(first_reg)
}

/// The console UART of the tree at `ptr`, however the rest of it reads: for the one
/// message boot prints before refusing a tree it cannot use.
///
/// # Safety
/// As [`Platform::from_ptr`].
pub unsafe fn console_uart_at(ptr: *const u8) -> Option<PhysAddr> {
    // SAFETY: forwarded from our caller.
    let blob = unsafe { blob_at(ptr) }.ok()?;
    let fdt = Fdt::new(blob).ok()?;
    find_uart(&fdt).map(|r| r.start())
}

pub(super) fn is_disabled(node: flat_device_tree::node::FdtNode<'_, '_>) -> bool {
    status_disabled(node.property("status"))
}

/// Whether a `status` property says the node is not in use (anything but "okay"/"ok").
pub(super) fn status_disabled(status: Option<flat_device_tree::node::NodeProperty<'_>>) -> bool {
    status.and_then(|p| p.as_str()).is_some_and(|s| s != "okay" && s != "ok")
}

fn first_reg(node: flat_device_tree::node::FdtNode<'_, '_>) -> Option<PhysRange> {
    let r = node.reg().next()?;
    PhysRange::new(PhysAddr::new(r.starting_address as u64), r.size? as u64).ok()
}

impl Platform {
    /// Reads the device tree at `ptr`, placing `size`-only reserved-memory children clear
    /// of `avoid` (the image).
    ///
    /// # Safety
    /// `ptr` must point to readable memory holding a device tree that stays unchanged
    /// and readable for the rest of the program (its strings are borrowed for `'static`).
    ///
    /// # Errors
    /// As [`Platform::parse`].
    pub unsafe fn from_ptr(ptr: *const u8, avoid: &[PhysRange]) -> Result<Self, DtbError> {
        // SAFETY: the caller promises a readable header; the magic is checked before the
        // size it gives is trusted.
        let blob = unsafe { blob_at(ptr) }?;
        Self::parse_avoiding(blob, avoid)
    }

    /// Reads a device tree blob.
    ///
    /// # Errors
    /// [`DtbError::BadMagic`] / [`DtbError::Malformed`] for a blob that is not a device
    /// tree, [`DtbError::NopTokens`] for one that still has NOPs, [`DtbError::NoMemory`]
    /// when it names no RAM, [`DtbError::TooMany`] past a bound, and the reserved-memory
    /// errors of [`DtbError`].
    pub fn parse(blob: &'static [u8]) -> Result<Self, DtbError> {
        Self::parse_avoiding(blob, &[])
    }

    /// [`Platform::parse`], placing `size`-only reserved-memory children clear of `avoid`
    /// as well as of the blob itself and every other reservation.
    ///
    /// # Errors
    /// As [`Platform::parse`].
    pub fn parse_avoiding(blob: &'static [u8], avoid: &[PhysRange]) -> Result<Self, DtbError> {
        if blob.len() < 8 || blob[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
            return Err(DtbError::BadMagic);
        }
        match count_nops(blob) {
            Ok(0) => {}
            Ok(n) => return Err(DtbError::NopTokens(n)),
            Err(Malformed) => return Err(DtbError::Malformed),
        }
        let fdt = Fdt::new(blob).map_err(|_| DtbError::Malformed)?;
        let dtb = PhysRange::new(PhysAddr::new(blob.as_ptr() as u64), fdt.total_size() as u64)
            .map_err(|_| DtbError::Malformed)?;

        let mut ram = RangeList::new();
        let mut found = 0;
        for node in fdt.all_nodes() {
            let is_memory = node.property("device_type").and_then(|p| p.as_str()).is_some_and(|s| s == "memory");
            if !is_memory || is_disabled(node) {
                continue;
            }
            for r in node.reg() {
                if let Some(size) = r.size {
                    if let Ok(range) = PhysRange::new(PhysAddr::new(r.starting_address as u64), size as u64) {
                        found += 1;
                        let _ = ram.push(range);
                    }
                }
            }
        }
        if found > MAX_RAM_RANGES {
            return Err(DtbError::TooMany { what: "RAM ranges", found, max: MAX_RAM_RANGES });
        }
        if ram.is_empty() {
            return Err(DtbError::NoMemory);
        }

        let mut reserved = ReservedList::new();
        let mut keep_clear = [dtb; 8];
        let n = avoid.len().min(keep_clear.len() - 1);
        keep_clear[1..=n].copy_from_slice(&avoid[..n]);
        reserved::parse(&fdt, &ram, &keep_clear[..=n], &mut reserved)?;

        let uart = find_uart(&fdt);
        let gic_distributor =
            fdt.find_compatible(&["arm,cortex-a15-gic", "arm,gic-400", "arm,gic-v3"]).and_then(first_reg);

        let psci = fdt.find_node("/psci").and_then(|n| match n.property("method").and_then(|p| p.as_str()) {
            Some("hvc") => Some(Conduit::Hvc),
            Some("smc") => Some(Conduit::Smc),
            _ => None,
        });

        let model = fdt.root().ok().map(|r| r.model()).unwrap_or("unknown");
        let bootargs = fdt.chosen().ok().and_then(|c| c.bootargs()).unwrap_or("");

        let cpus = CpuList::parse(&fdt);
        let gic = GicNode::parse(&fdt);
        let timer_intid = gic::virtual_timer_intid(&fdt);
        let dma_limit = dma::dma_limit(&fdt);
        Ok(Self {
            dtb,
            ram,
            reserved,
            cpus,
            uart,
            gic_distributor,
            gic,
            timer_intid,
            psci,
            dma_limit,
            model,
            bootargs,
            blob,
        })
    }

    /// The device tree itself, for drivers that look up their own nodes.
    ///
    /// # Panics
    /// Never for a `Platform` built by [`Platform::parse`], which checked the blob.
    pub fn fdt(&self) -> Fdt<'static> {
        Fdt::new(self.blob).expect("device tree checked at boot")
    }
}

// Not under Miri with strict provenance: `flat_device_tree` turns every `reg` address
// into a `*const u8` with an integer-to-pointer cast (addresses of the device tree are
// physical, not Rust allocations), which that mode refuses by design.
#[cfg(all(test, not(miri)))]
mod tests;
