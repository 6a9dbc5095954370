//! virtio-rng (entropy source) through virtio-drivers' `VirtIORng`.

use core::fmt;

use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::{DeviceType, Transport};

use crate::dma::{contiguous_phys, DmaPool, PoolError, VirtioHal};
use crate::mmio::{probe_devices, MmioDevice, MmioSlot};

/// Order of an entropy device's bounce pool: one page.
pub const POOL_ORDER: usize = 0;

/// Why an entropy request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngError {
    /// No virtio-rng device in the device tree.
    NoDevice,
    /// The transport is another kind of device.
    NotRng(DeviceType),
    /// No bounce pool.
    Pool(PoolError),
    /// The driver or the device failed.
    Driver(virtio_drivers::Error),
    /// The device returned no bytes.
    Dry,
}

impl fmt::Display for RngError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RngError::NoDevice => f.write_str("no virtio-rng device"),
            RngError::NotRng(t) => write!(f, "not an entropy source but {t:?}"),
            RngError::Pool(e) => write!(f, "{e}"),
            RngError::Driver(e) => write!(f, "driver: {e}"),
            RngError::Dry => f.write_str("the device returned no bytes"),
        }
    }
}

impl core::error::Error for RngError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            RngError::Pool(e) => Some(e),
            RngError::Driver(e) => Some(e),
            _ => None,
        }
    }
}

impl From<virtio_drivers::Error> for RngError {
    fn from(e: virtio_drivers::Error) -> Self {
        RngError::Driver(e)
    }
}

/// A virtio-rng device. Dropping it resets the device and releases everything it holds.
pub struct Rng {
    dev: VirtIORng<VirtioHal, MmioDevice>,
    pool: DmaPool,
    slot: MmioSlot,
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rng").field("slot", &self.slot).finish()
    }
}

impl Rng {
    /// Starts the driver on a probed transport.
    ///
    /// # Errors
    /// [`RngError::NotRng`], [`RngError::Pool`], [`RngError::Driver`].
    pub fn new(dev: MmioDevice) -> Result<Self, RngError> {
        let t = dev.device_type();
        if t != DeviceType::EntropySource {
            return Err(RngError::NotRng(t));
        }
        let slot = dev.slot();
        let pool = DmaPool::new(POOL_ORDER).map_err(RngError::Pool)?;
        let dev = {
            let _in = pool.enter().map_err(RngError::Pool)?;
            VirtIORng::<VirtioHal, MmioDevice>::new(dev)?
        };
        Ok(Self { dev, pool, slot })
    }

    /// Probes the device tree and starts the first entropy device found.
    ///
    /// # Errors
    /// [`RngError::NoDevice`], or as [`Rng::new`].
    pub fn open_first() -> Result<Self, RngError> {
        let dev = probe_devices(false)
            .into_iter()
            .find(|d| d.device_type() == DeviceType::EntropySource)
            .ok_or(RngError::NoDevice)?;
        Self::new(dev)
    }

    /// The transport.
    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// Fills `buf` with random bytes from the device (as many requests as it takes; a
    /// buffer that must be bounced goes in pieces that fit the pool).
    ///
    /// # Errors
    /// [`RngError::Pool`] (the bounce pool was given back under memory pressure and no new
    /// block could be had), [`RngError::Driver`], [`RngError::Dry`].
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        let _in = self.pool.enter().map_err(RngError::Pool)?;
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let n = if contiguous_phys(hal::VirtAddr::from_ptr(rest.as_ptr()), rest.len()).is_some() {
                rest.len()
            } else {
                rest.len().min(self.pool.max_bounce())
            };
            let got = self.dev.request_entropy(&mut rest[..n])?;
            if got == 0 {
                return Err(RngError::Dry);
            }
            done += got.min(n);
        }
        Ok(())
    }

    /// A random 64-bit number.
    ///
    /// # Errors
    /// As [`Rng::fill`].
    pub fn next_u64(&mut self) -> Result<u64, RngError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
