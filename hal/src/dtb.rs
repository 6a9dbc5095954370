//! What the device tree tells us about the machine: RAM, reserved memory, the console
//! UART, the PSCI conduit, the interrupt controller and the command line.
//!
//! Parsing is done by the `flat_device_tree` crate; this module turns its answers into
//! plain typed data ([`Platform`]) that needs no heap, so it can run before any allocator.

use crate::addr::{PhysAddr, PhysRange};
use core::fmt;
use flat_device_tree::Fdt;

/// How many RAM regions or reserved ranges we keep (QEMU virt has one RAM node).
pub const MAX_RANGES: usize = 16;

/// A fixed-capacity list of ranges (no heap exists when the device tree is read).
#[derive(Clone, Copy)]
pub struct RangeList {
    items: [Option<PhysRange>; MAX_RANGES],
    len: usize,
    dropped: usize,
}

impl RangeList {
    /// An empty list.
    pub const fn new() -> Self {
        Self { items: [None; MAX_RANGES], len: 0, dropped: 0 }
    }

    /// Appends a range; past [`MAX_RANGES`] it is counted in [`Self::dropped`] instead.
    pub fn push(&mut self, r: PhysRange) {
        if self.len < MAX_RANGES {
            self.items[self.len] = Some(r);
            self.len += 1;
        } else {
            self.dropped += 1;
        }
    }

    /// The ranges in the order they were found.
    pub fn iter(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }

    /// Number of ranges kept.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ranges that did not fit.
    pub fn dropped(&self) -> usize {
        self.dropped
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
    /// The tree has no usable RAM (`device_type = "memory"`) node.
    NoMemory,
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DtbError::BadMagic => "no device tree magic (0xd00dfeed)",
            DtbError::Malformed => "device tree does not parse",
            DtbError::NoMemory => "device tree names no RAM",
        })
    }
}

/// The machine as the device tree describes it.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// Where the DTB itself lies (it must stay reserved while we read it).
    pub dtb: PhysRange,
    /// RAM: every `device_type = "memory"` node's `reg`.
    pub ram: RangeList,
    /// `/memreserve/` entries and `/reserved-memory` children.
    pub reserved: RangeList,
    /// The PL011 console (`arm,pl011`), preferring `/chosen/stdout-path`.
    pub uart: Option<PhysRange>,
    /// The GIC distributor (`arm,cortex-a15-gic` / `arm,gic-v3`), first `reg` entry.
    pub gic_distributor: Option<PhysRange>,
    /// PSCI conduit, when the tree has a `/psci` node.
    pub psci: Option<Conduit>,
    /// The board's `model` string.
    pub model: &'static str,
    /// The command line (`/chosen/bootargs`), empty when absent.
    pub bootargs: &'static str,
    /// The blob itself, as checked by `parse` (private: [`Platform::fdt`] reads it).
    blob: &'static [u8],
}

fn first_reg(node: flat_device_tree::node::FdtNode<'_, '_>) -> Option<PhysRange> {
    let r = node.reg().next()?;
    PhysRange::new(PhysAddr::new(r.starting_address as u64), r.size? as u64).ok()
}

impl Platform {
    /// Reads the device tree at `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to readable memory holding a device tree that stays unchanged
    /// and readable for the rest of the program (its strings are borrowed for `'static`).
    ///
    /// # Errors
    /// As [`Platform::parse`].
    pub unsafe fn from_ptr(ptr: *const u8) -> Result<Self, DtbError> {
        // SAFETY: the caller promises a readable header; the magic is checked before the
        // size it gives is trusted.
        let header = unsafe { core::slice::from_raw_parts(ptr, 8) };
        if header[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
            return Err(DtbError::BadMagic);
        }
        let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        // SAFETY: the header says the blob is `size` bytes long; the caller promises it is
        // readable and unchanged for the program's lifetime.
        let blob = unsafe { core::slice::from_raw_parts(ptr, size) };
        Self::parse(blob)
    }

    /// Reads a device tree blob.
    ///
    /// # Errors
    /// [`DtbError::BadMagic`] / [`DtbError::Malformed`] for a blob that is not a device
    /// tree, [`DtbError::NoMemory`] when it names no RAM.
    pub fn parse(blob: &'static [u8]) -> Result<Self, DtbError> {
        if blob.len() < 8 || blob[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
            return Err(DtbError::BadMagic);
        }
        let fdt = Fdt::new(blob).map_err(|_| DtbError::Malformed)?;
        let dtb = PhysRange::new(PhysAddr::new(blob.as_ptr() as u64), fdt.total_size() as u64)
            .map_err(|_| DtbError::Malformed)?;

        let mut ram = RangeList::new();
        for node in fdt.all_nodes() {
            let is_memory = node.property("device_type").and_then(|p| p.as_str()).is_some_and(|s| s == "memory");
            if !is_memory {
                continue;
            }
            for r in node.reg() {
                if let Some(size) = r.size {
                    if let Ok(range) = PhysRange::new(PhysAddr::new(r.starting_address as u64), size as u64) {
                        ram.push(range);
                    }
                }
            }
        }
        if ram.is_empty() {
            return Err(DtbError::NoMemory);
        }

        let mut reserved = RangeList::new();
        for res in fdt.memory_reservations() {
            if let Ok(r) = PhysRange::new(PhysAddr::new(res.address() as u64), res.size() as u64) {
                reserved.push(r);
            }
        }
        if let Some(node) = fdt.find_node("/reserved-memory") {
            for child in node.children() {
                for r in child.reg() {
                    if let Some(size) = r.size {
                        if let Ok(range) = PhysRange::new(PhysAddr::new(r.starting_address as u64), size as u64) {
                            reserved.push(range);
                        }
                    }
                }
            }
        }

        let stdout_uart = fdt
            .chosen()
            .ok()
            .and_then(|c| c.stdout())
            .map(|s| s.node())
            .filter(|n| n.compatible().is_some_and(|c| c.all().any(|s| s == "arm,pl011")));
        let uart = stdout_uart.or_else(|| fdt.find_compatible(&["arm,pl011"])).and_then(first_reg);

        let gic_distributor =
            fdt.find_compatible(&["arm,cortex-a15-gic", "arm,gic-400", "arm,gic-v3"]).and_then(first_reg);

        let psci = fdt.find_node("/psci").and_then(|n| match n.property("method").and_then(|p| p.as_str()) {
            Some("hvc") => Some(Conduit::Hvc),
            Some("smc") => Some(Conduit::Smc),
            _ => None,
        });

        let model = fdt.root().ok().map(|r| r.model()).unwrap_or("unknown");
        let bootargs = fdt.chosen().ok().and_then(|c| c.bootargs()).unwrap_or("");

        Ok(Self { dtb, ram, reserved, uart, gic_distributor, psci, model, bootargs, blob })
    }

    /// The device tree itself, for drivers that look up their own nodes.
    ///
    /// # Panics
    /// Never for a `Platform` built by [`Platform::parse`], which checked the blob.
    pub fn fdt(&self) -> Fdt<'static> {
        Fdt::new(self.blob).expect("device tree checked at boot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `qemu-system-aarch64 -machine virt -m 1G -append "a=1 shell" -machine dumpdtb=...`
    static VIRT_DTB: &[u8] = include_bytes!("../testdata/qemu-virt-1g.dtb");

    #[test]
    fn reads_qemu_virt() {
        let p = Platform::parse(VIRT_DTB).unwrap();
        assert_eq!(p.ram.len(), 1);
        let ram = p.ram.iter().next().unwrap();
        assert_eq!((ram.start().as_u64(), ram.size()), (0x4000_0000, 1 << 30));
        assert_eq!(p.uart.unwrap().start().as_u64(), 0x0900_0000);
        assert_eq!(p.gic_distributor.unwrap().start().as_u64(), 0x0800_0000);
        assert_eq!(p.psci, Some(Conduit::Hvc));
        assert_eq!(p.bootargs, "a=1 shell");
        assert!(p.model.contains("virt"));
    }

    #[test]
    fn refuses_garbage() {
        static GARBAGE: [u8; 16] = [0; 16];
        assert_eq!(Platform::parse(&GARBAGE).unwrap_err(), DtbError::BadMagic);
    }
}
