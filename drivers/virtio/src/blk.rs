//! virtio-blk through virtio-drivers' `VirtIOBlk`, with our checks and request splitting.
//!
//! [`Blk::read`]/[`Blk::write`] take any buffer and cut it into requests, each of which one
//! physical address can carry:
//! * a physically contiguous stretch of at least [`MIN_DIRECT_RUN`] bytes (or the whole
//!   rest) goes to the device in place, up to [`MAX_DIRECT_REQUEST`] bytes — all of a heap
//!   or stack buffer, and the long runs of consecutive frames a vmalloc area often has;
//! * anything else (pages scattered in physical memory) goes in requests of at most
//!   [`DmaPool::max_bounce`] bytes, so that `share` can always bounce a whole request through
//!   this device's pool, with room left for the request header and status byte.

use core::fmt;

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{DeviceType, Transport};

use crate::dma::{contiguous_run, DmaPool, PoolError, PoolStats, VirtioHal};
use crate::mmio::{probe_devices, MmioDevice, MmioSlot};

/// Bytes per sector.
pub const SECTOR_SIZE: usize = virtio_drivers::device::blk::SECTOR_SIZE;

/// The largest request sent for a physically contiguous buffer.
pub const MAX_DIRECT_REQUEST: usize = 1 << 20;

/// The shortest physically contiguous stretch sent in place rather than bounced: below it,
/// one bounced request of up to the pool's size is cheaper than several small ones.
pub const MIN_DIRECT_RUN: usize = 64 << 10;

/// Order of a block device's bounce pool: 1 MiB, so a bounced request (1020 KiB) is about
/// as large as a direct one: on QEMU a request costs tens of microseconds whatever its size.
pub const POOL_ORDER: usize = 8;

/// Why a block operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// No virtio-blk transport in the device tree has a device (no disk attached).
    NoDevice,
    /// The transport is another kind of device.
    NotBlock(DeviceType),
    /// No bounce pool.
    Pool(PoolError),
    /// The driver or the device failed.
    Driver(virtio_drivers::Error),
    /// The buffer is not a whole number of sectors.
    Unaligned(usize),
    /// The range runs past the end of the disk.
    OutOfRange {
        /// First sector asked for.
        sector: u64,
        /// Sectors asked for.
        sectors: u64,
        /// The disk's sectors.
        capacity: u64,
    },
    /// The device is read-only.
    ReadOnly,
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::NoDevice => f.write_str("no disk attached (no virtio-blk device on any virtio-mmio transport)"),
            BlkError::NotBlock(t) => write!(f, "not a block device but {t:?}"),
            BlkError::Pool(e) => write!(f, "{e}"),
            BlkError::Driver(e) => write!(f, "driver: {e}"),
            BlkError::Unaligned(n) => write!(f, "{n} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"),
            BlkError::OutOfRange { sector, sectors, capacity } => {
                write!(f, "sectors {sector}..{} beyond the end of the disk ({capacity} sectors)", sector + sectors)
            }
            BlkError::ReadOnly => f.write_str("read-only device"),
        }
    }
}

impl core::error::Error for BlkError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            BlkError::Pool(e) => Some(e),
            BlkError::Driver(e) => Some(e),
            _ => None,
        }
    }
}

impl From<virtio_drivers::Error> for BlkError {
    fn from(e: virtio_drivers::Error) -> Self {
        BlkError::Driver(e)
    }
}

/// Counters of one block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests sent to the driver.
    pub requests: u64,
    /// Of those, for buffers that were not physically contiguous (bounced).
    pub bounced_requests: u64,
    /// The largest request sent.
    pub largest_request: usize,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// A virtio-blk disk. Dropping it resets the device, unmaps its registers and frees its
/// queue and pool.
pub struct Blk {
    // Drop order: the driver (queue unset, then its transport resets the device and is
    // unmapped), then the pool the device might otherwise still write.
    dev: VirtIOBlk<VirtioHal, MmioDevice>,
    pool: DmaPool,
    slot: MmioSlot,
    capacity: u64,
    readonly: bool,
    stats: BlkStats,
}

impl fmt::Debug for Blk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blk").field("slot", &self.slot).field("capacity", &self.capacity).finish()
    }
}

/// Which way a transfer goes.
enum Dir<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Blk {
    /// Starts the driver on a probed transport and logs `virtio-blk: capacity N sectors`.
    ///
    /// # Errors
    /// [`BlkError::NotBlock`], [`BlkError::Pool`], [`BlkError::Driver`] (the transport is
    /// reset and unmapped then).
    pub fn new(dev: MmioDevice) -> Result<Self, BlkError> {
        let t = dev.device_type();
        if t != DeviceType::Block {
            return Err(BlkError::NotBlock(t));
        }
        let slot = dev.slot();
        let pool = DmaPool::new(POOL_ORDER).map_err(BlkError::Pool)?;
        let dev = {
            let _in = pool.enter().map_err(BlkError::Pool)?;
            VirtIOBlk::<VirtioHal, MmioDevice>::new(dev)?
        };
        let capacity = dev.capacity();
        let readonly = dev.readonly();
        log::info!(
            "virtio-blk: capacity {capacity} sectors ({} MiB){} at {slot}",
            (capacity * SECTOR_SIZE as u64) >> 20,
            if readonly { ", read-only" } else { "" }
        );
        Ok(Self { dev, pool, slot, capacity, readonly, stats: BlkStats::default() })
    }

    /// Probes the device tree and starts the first block device found; other devices are
    /// released.
    ///
    /// # Errors
    /// [`BlkError::NoDevice`], or as [`Blk::new`].
    pub fn open_first() -> Result<Self, BlkError> {
        let dev = probe_devices(false)
            .into_iter()
            .find(|d| d.device_type() == DeviceType::Block)
            .ok_or(BlkError::NoDevice)?;
        Self::new(dev)
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The transport.
    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// The largest request sent for a buffer that must be bounced.
    pub fn max_bounced_request(&self) -> usize {
        self.pool.max_bounce() / SECTOR_SIZE * SECTOR_SIZE
    }

    /// The bounce pool's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// This device's counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlkError::Unaligned(len));
        }
        let sectors = (len / SECTOR_SIZE) as u64;
        if sector.checked_add(sectors).is_none_or(|end| end > self.capacity) {
            return Err(BlkError::OutOfRange { sector, sectors, capacity: self.capacity });
        }
        Ok(())
    }

    /// The next request's size for `rest` bytes at `ptr`, and whether it will be bounced.
    fn chunk(&self, ptr: *const u8, rest: usize) -> (usize, bool) {
        let want = rest.min(MAX_DIRECT_REQUEST);
        let run = contiguous_run(hal::VirtAddr::from_ptr(ptr), want).map_or(0, |(_, n)| n);
        let run = run / SECTOR_SIZE * SECTOR_SIZE;
        if run > 0 && (run == want || run >= MIN_DIRECT_RUN) {
            (run, false)
        } else {
            (rest.min(self.max_bounced_request()), true)
        }
    }

    fn transfer(&mut self, sector: u64, mut dir: Dir<'_>) -> Result<(), BlkError> {
        let len = match &dir {
            Dir::Read(b) => b.len(),
            Dir::Write(b) => b.len(),
        };
        self.check(sector, len)?;
        let _in = self.pool.enter().map_err(BlkError::Pool)?;
        let mut done = 0;
        while done < len {
            let ptr = match &dir {
                Dir::Read(b) => b[done..].as_ptr(),
                Dir::Write(b) => b[done..].as_ptr(),
            };
            let (n, bounced) = self.chunk(ptr, len - done);
            let block = (sector + (done / SECTOR_SIZE) as u64) as usize;
            match &mut dir {
                Dir::Read(b) => self.dev.read_blocks(block, &mut b[done..done + n])?,
                Dir::Write(b) => self.dev.write_blocks(block, &b[done..done + n])?,
            }
            self.stats.requests += 1;
            self.stats.bounced_requests += bounced as u64;
            self.stats.largest_request = self.stats.largest_request.max(n);
            done += n;
        }
        match dir {
            Dir::Read(_) => self.stats.bytes_read += len as u64,
            Dir::Write(_) => self.stats.bytes_written += len as u64,
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector` on. Any buffer: see the module
    /// docs for how it is split.
    ///
    /// # Errors
    /// [`BlkError::Unaligned`], [`BlkError::OutOfRange`], [`BlkError::Pool`] (the bounce
    /// pool was given back under memory pressure and no new block could be had; nothing is
    /// read then), or [`BlkError::Driver`] (part may have been read).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.transfer(sector, Dir::Read(buf))
    }

    /// Writes `buf` (whole sectors) from `sector` on.
    ///
    /// # Errors
    /// As [`Blk::read`], and [`BlkError::ReadOnly`].
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        if self.readonly {
            return Err(BlkError::ReadOnly);
        }
        self.transfer(sector, Dir::Write(buf))
    }

    /// Asks the device to make written data durable (a no-op without `VIRTIO_BLK_F_FLUSH`).
    ///
    /// # Errors
    /// [`BlkError::Pool`] (as for [`Blk::read`]), [`BlkError::Driver`].
    pub fn flush(&mut self) -> Result<(), BlkError> {
        let _in = self.pool.enter().map_err(BlkError::Pool)?;
        Ok(self.dev.flush()?)
    }

    /// The device's id string (up to 20 bytes), as the driver returns it.
    ///
    /// # Errors
    /// [`BlkError::Pool`] (as for [`Blk::read`]), [`BlkError::Driver`] (e.g. `Unsupported`).
    pub fn device_id(&mut self, id: &mut [u8; 20]) -> Result<usize, BlkError> {
        let _in = self.pool.enter().map_err(BlkError::Pool)?;
        Ok(self.dev.device_id(id)?)
    }
}
