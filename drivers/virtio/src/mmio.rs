//! virtio-mmio transports: found in the device tree, mapped by us with `ioremap`, probed.
//!
//! [`MmioDevice`] owns both the mapping and virtio-drivers' `MmioTransport` over it (which
//! borrows the mapping), and is itself a `Transport` the drivers take. Dropping it resets
//! the device (the transport's drop) and then unmaps the registers (the mapping's drop), in
//! that order. A transport is claimed while an `MmioDevice` exists for it, so two drivers
//! can never drive — or reset — one device.

use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use hal::{PhysAddr, VirtAddr};
use memory::ioremap::{IoMem, IoremapError};
use spin::Mutex;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The virtio-mmio magic, "virt" little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Bytes of the register block before the config space.
pub const HEADER_SIZE: usize = 0x100;

/// One `virtio,mmio` node of the device tree: where its registers are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Physical address of the register block.
    pub phys: PhysAddr,
    /// Its size (QEMU's `virt`: 0x200).
    pub size: usize,
    /// Whether the node says `dma-coherent` (QEMU's do). The adapter does no cache
    /// maintenance, so a device that is not coherent is logged when probed.
    pub dma_coherent: bool,
}

impl fmt::Display for MmioSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtio-mmio@{:#x}", self.phys.as_u64())
    }
}

/// The `virtio,mmio` transports the device tree lists, by address.
pub fn mmio_slots() -> Vec<MmioSlot> {
    let Some(info) = hal::boot::boot_info() else { return Vec::new() };
    let fdt = info.platform.fdt();
    let mut slots: Vec<MmioSlot> = fdt
        .all_nodes()
        .filter(|n| n.compatible().is_some_and(|c| c.all().any(|s| s == "virtio,mmio")))
        .filter_map(|n| {
            let r = n.reg().next()?;
            Some(MmioSlot {
                phys: PhysAddr::new(r.starting_address as u64),
                size: r.size.unwrap_or(0x200),
                dma_coherent: n.property("dma-coherent").is_some(),
            })
        })
        .collect();
    slots.sort_by_key(|s| s.phys);
    slots
}

/// The first `reg` range of the first device-tree node compatible with `compatible` (for
/// tests that need a device that is *not* virtio, e.g. `arm,pl031`).
pub fn find_compatible(compatible: &str) -> Option<MmioSlot> {
    let fdt = hal::boot::boot_info()?.platform.fdt();
    let node = fdt.find_compatible(&[compatible])?;
    let r = node.reg().next()?;
    Some(MmioSlot {
        phys: PhysAddr::new(r.starting_address as u64),
        size: r.size.unwrap_or(0x1000),
        dma_coherent: node.property("dma-coherent").is_some(),
    })
}

/// Reads the 32-bit register at `offset` of a device mapping.
///
/// # Panics
/// When `offset` is out of the mapping or not 4-byte aligned.
pub fn read32(io: &IoMem, offset: usize) -> u32 {
    let at = io.reg_addr::<u32>(offset).unwrap_or_else(|e| panic!("register {offset:#x}: {e:?}"));
    // SAFETY: `at` lies inside the live device mapping `io` owns, aligned for a u32
    // (both checked by `reg_addr`); a volatile read of a virtio-mmio header register has
    // no side effect.
    unsafe { at.as_ptr::<u32>().read_volatile() }
}

/// The identifying registers of a virtio-mmio header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `MagicValue` (0x74726976 for a virtio device).
    pub magic: u32,
    /// `Version`: 1 legacy, 2 modern.
    pub version: u32,
    /// `DeviceID`: 0 for an empty slot.
    pub device_id: u32,
    /// `VendorID` (QEMU: 0x554d4551, "QEMU").
    pub vendor_id: u32,
}

impl Header {
    /// Reads the header from a mapping of a register block.
    pub fn read(io: &IoMem) -> Self {
        Self { magic: read32(io, 0), version: read32(io, 4), device_id: read32(io, 8), vendor_id: read32(io, 0xc) }
    }

    /// What the header says: the device type, or why it is not a device we can use.
    ///
    /// # Errors
    /// [`ProbeError::BadMagic`], [`ProbeError::UnsupportedVersion`], [`ProbeError::Empty`]
    /// (device id 0), [`ProbeError::UnknownDevice`].
    pub fn classify(&self) -> Result<DeviceType, ProbeError> {
        if self.magic != MAGIC {
            return Err(ProbeError::BadMagic(self.magic));
        }
        if !(1..=2).contains(&self.version) {
            return Err(ProbeError::UnsupportedVersion(self.version));
        }
        if self.device_id == 0 {
            return Err(ProbeError::Empty);
        }
        DeviceType::try_from(self.device_id).map_err(|_| ProbeError::UnknownDevice(self.device_id))
    }
}

/// The vendor id as text when it is four printable characters ("QEMU").
pub struct Vendor(pub u32);

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_le_bytes();
        write!(f, "{:#x}", self.0)?;
        if b.iter().all(|c| c.is_ascii_graphic()) {
            write!(f, " (\"{}{}{}{}\")", b[0] as char, b[1] as char, b[2] as char, b[3] as char)?;
        }
        Ok(())
    }
}

/// Why a transport was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// ioremap refused the range.
    Map(IoremapError),
    /// The range is smaller than a virtio-mmio header.
    TooSmall(usize),
    /// No virtio magic: not a virtio-mmio device.
    BadMagic(u32),
    /// A version other than 1 (legacy) or 2 (modern).
    UnsupportedVersion(u32),
    /// Device id 0: a transport with nothing plugged in.
    Empty,
    /// A device id virtio-drivers does not know.
    UnknownDevice(u32),
    /// Another `MmioDevice` drives this transport.
    Busy,
    /// The slot is not a `virtio,mmio` node of the device tree ([`mmio_slots`]).
    NotVirtioSlot,
    /// virtio-drivers refused the transport.
    Transport(MmioError),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Map(e) => write!(f, "cannot map the registers: {e}"),
            ProbeError::TooSmall(s) => write!(f, "register block of {s:#x} bytes, smaller than a header"),
            ProbeError::BadMagic(m) => {
                write!(f, "not a virtio device: bad magic {m:#010x} (expected {MAGIC:#010x})")
            }
            ProbeError::UnsupportedVersion(v) => write!(f, "unsupported virtio-mmio version {v}"),
            ProbeError::Empty => f.write_str("empty slot (device id 0)"),
            ProbeError::UnknownDevice(id) => write!(f, "unknown virtio device id {id}"),
            ProbeError::Busy => f.write_str("already driven"),
            ProbeError::NotVirtioSlot => f.write_str("not a virtio,mmio transport of the device tree"),
            ProbeError::Transport(e) => write!(f, "transport refused: {e}"),
        }
    }
}

impl core::error::Error for ProbeError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ProbeError::Map(e) => Some(e),
            ProbeError::Transport(e) => Some(e),
            _ => None,
        }
    }
}

/// Transports in use (their physical addresses).
static CLAIMED: Mutex<Vec<PhysAddr>> = Mutex::new(Vec::new());

struct Claim(PhysAddr);

impl Claim {
    fn take(phys: PhysAddr) -> Option<Self> {
        let mut c = CLAIMED.lock();
        if c.contains(&phys) {
            return None;
        }
        c.push(phys);
        Some(Self(phys))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        CLAIMED.lock().retain(|&p| p != self.0);
    }
}

/// A probed virtio-mmio transport we own: registers mapped, header checked, device type
/// known. Give it to a driver (it is a `Transport`), or drop it to reset and unmap.
pub struct MmioDevice {
    // Field order is drop order: the transport (which resets the device through the
    // mapping) goes first, then the mapping, then the claim.
    transport: MmioTransport<'static>,
    mapping: IoMem,
    _claim: Claim,
    slot: MmioSlot,
    header: Header,
    device_type: DeviceType,
}

impl fmt::Debug for MmioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioDevice")
            .field("slot", &self.slot)
            .field("header", &self.header)
            .field("device_type", &self.device_type)
            .field("mapped_at", &self.mapping.addr())
            .finish()
    }
}

impl MmioDevice {
    /// Maps and probes the transport at `slot`.
    ///
    /// # Errors
    /// A [`ProbeError`]; nothing stays mapped or claimed then.
    pub fn probe(slot: MmioSlot) -> Result<Self, ProbeError> {
        if slot.size < HEADER_SIZE {
            return Err(ProbeError::TooSmall(slot.size));
        }
        // Only a transport the device tree lists: a hand-made slot could point at the
        // GIC or the console UART.
        if !mmio_slots().iter().any(|s| s.phys == slot.phys && s.size == slot.size) {
            return Err(ProbeError::NotVirtioSlot);
        }
        let claim = Claim::take(slot.phys).ok_or(ProbeError::Busy)?;
        // SAFETY: `claim` makes this the only `MmioDevice` of the transport at
        // `slot.phys`, and the slot is one the device tree lists as `virtio,mmio` (checked
        // above), so no other driver or the console owns it. Its DMA goes only to buffers
        // this driver allocates and shares through `VirtioHal`.
        let mapping = unsafe { IoMem::new(slot.phys, slot.size) }.map_err(ProbeError::Map)?;
        let header = Header::read(&mapping);
        let device_type = header.classify()?;
        let ptr = NonNull::new(mapping.addr().as_mut_ptr::<VirtIOHeader>())
            .ok_or(ProbeError::Map(IoremapError::NotMapped))?;
        // SAFETY: `ptr` is the start of a live device mapping of `slot.size` bytes — header
        // and config space — page-offset preserved, so aligned as the registers are. The
        // mapping is owned by the value built here and outlives the transport (declared
        // after it, so dropped after it); the `'static` lifetime never leaves this struct.
        // The claim makes this the only transport over these registers.
        let transport = unsafe { MmioTransport::new(ptr, slot.size) }.map_err(ProbeError::Transport)?;
        crate::dma::note_transport(header.version);
        Ok(Self { transport, mapping, _claim: claim, slot, header, device_type })
    }

    /// Where the transport is.
    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// The header read at probe time.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The virtual address of the registers.
    pub fn mapped_at(&self) -> VirtAddr {
        self.mapping.addr()
    }
}

/// Probes every `virtio,mmio` transport of the device tree and logs what is there; empty
/// slots are skipped quietly (counted at debug level). A transport that fails to probe is
/// logged and skipped: this never stops the caller.
pub fn probe_all() -> Vec<MmioDevice> {
    probe_devices(true)
}

/// [`probe_all`], except that found devices are logged at debug level unless `log_found`
/// (failures are logged either way; transports we already drive are skipped quietly).
pub fn probe_devices(log_found: bool) -> Vec<MmioDevice> {
    let slots = mmio_slots();
    let mut devices = Vec::new();
    let mut empty = 0;
    for slot in &slots {
        match MmioDevice::probe(*slot) {
            Ok(d) => {
                let h = d.header();
                let level = if log_found { log::Level::Info } else { log::Level::Debug };
                log::log!(
                    level,
                    "{slot}: {:?} device (id {}), virtio-mmio version {} ({}), vendor {}",
                    d.device_type,
                    h.device_id,
                    h.version,
                    if h.version == 1 { "legacy" } else { "modern" },
                    Vendor(h.vendor_id)
                );
                if !slot.dma_coherent {
                    log::warn!("{slot}: not marked dma-coherent, and this adapter does no cache maintenance");
                }
                devices.push(d);
            }
            Err(ProbeError::Empty) => empty += 1,
            Err(ProbeError::Busy) => log::debug!("{slot}: already driven"),
            Err(e) => log::warn!("{slot}: {e}; skipped"),
        }
    }
    log::debug!("virtio-mmio: {} transports in the device tree, {} devices, {empty} empty", slots.len(), devices.len());
    devices
}

impl Transport for MmioDevice {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }
    fn read_device_features(&mut self) -> u64 {
        self.transport.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.transport.write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.transport.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.transport.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.transport.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.transport.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.transport.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.transport.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: virtio_drivers::PhysAddr,
        driver_area: virtio_drivers::PhysAddr,
        device_area: virtio_drivers::PhysAddr,
    ) {
        self.transport.queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.transport.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.transport.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.transport.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.transport.read_config_generation()
    }
    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        self.transport.read_config_space(offset)
    }
    fn write_config_space<T: IntoBytes + Immutable>(&mut self, offset: usize, value: T) -> virtio_drivers::Result<()> {
        self.transport.write_config_space(offset, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(magic: u32, version: u32, device_id: u32) -> Header {
        Header { magic, version, device_id, vendor_id: 0x554d_4551 }
    }

    #[test]
    fn headers_are_classified() {
        assert_eq!(h(MAGIC, 1, 2).classify(), Ok(DeviceType::Block));
        assert_eq!(h(MAGIC, 2, 4).classify(), Ok(DeviceType::EntropySource));
        assert_eq!(h(0, 1, 2).classify(), Err(ProbeError::BadMagic(0)));
        assert_eq!(h(MAGIC, 3, 2).classify(), Err(ProbeError::UnsupportedVersion(3)));
        assert_eq!(h(MAGIC, 1, 0).classify(), Err(ProbeError::Empty));
        assert_eq!(h(MAGIC, 2, 99).classify(), Err(ProbeError::UnknownDevice(99)));
    }

    #[test]
    fn messages_are_clear() {
        use alloc::string::ToString;
        assert_eq!(
            ProbeError::BadMagic(0x1234).to_string(),
            "not a virtio device: bad magic 0x00001234 (expected 0x74726976)"
        );
        assert_eq!(Vendor(0x554d_4551).to_string(), "0x554d4551 (\"QEMU\")");
        assert_eq!(Vendor(0).to_string(), "0x0");
    }
}
