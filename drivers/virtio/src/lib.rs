//! # virtio — the `virtio-drivers` crate (crates.io, pinned `=0.13.0`) on our memory system
//!
//! A driver nobody on this team wrote, running on the `memory` crate: its DMA memory comes
//! from the buddy allocator, its device registers are mapped with `ioremap`, and any buffer
//! a caller hands it — heap, stack, or a scattered vmalloc area — reaches the device intact.
//!
//! ```no_run
//! // after memory::kernel::init at boot:
//! let mut disk = virtio::Blk::open_first()?;         // logs "virtio-blk: capacity N sectors"
//! let mut buf = memory::kernel::VBox::zeroed(1 << 20).unwrap(); // scattered pages are bounced
//! disk.read(0, &mut buf)?;
//! # Ok::<(), virtio::BlkError>(())
//! ```
//!
//! ## Why a separate crate
//! The adapter depends on `virtio-drivers` and on the device tree; `memory` depends on
//! neither and stays a pure memory manager that any driver links. Drivers live under
//! `drivers/`, each a client of `memory::kernel`'s public API only — this crate is the proof
//! that the API is enough.
//!
//! ## Design
//! * **DMA memory** ([`VirtioHal`]'s `dma_alloc`): virtqueues need physically contiguous,
//!   zeroed pages; they come from the buddy allocator at order `ceil(log2(pages))` and are
//!   reached through the linear map. `dma_dealloc` frees the same order.
//! * **Sharing buffers** (`share`/`unshare`): the device needs one physical address per
//!   buffer. [`dma::contiguous_phys`] decides whether the buffer's bytes are physically
//!   contiguous — at once for the linear map (heap, stack, statics), page by page through
//!   `vmalloc_to_phys` for a vmalloc address. If they are, the buffer is shared in place
//!   (zero copy). If not, `share` — which must return one address and cannot fail — bounces
//!   it through the [`DmaPool`] of the device being driven: a buddy block set up per device,
//!   carved by a bump allocator that rewinds when a request's bounces are all given back.
//!   Data is copied in on `share` (for every direction, so bytes the device does not write
//!   come back unchanged) and out on `unshare` when the device may have written it. If no
//!   pool is entered, or it is full, the bounce is a buddy block of its own; only if the
//!   buddy is out of memory too does `share` panic, with the buffer named.
//! * **Which pool**: the `Hal` functions take no device, so each wrapper ([`Blk`], [`Rng`])
//!   *enters* its pool ([`DmaPool::enter`]) around every call into its driver; `unshare`
//!   finds a bounce by its physical address alone.
//! * **Request splitting**: [`Blk`] cuts every buffer into requests one address can carry:
//!   physically contiguous stretches of 64 KiB or more go in place (up to 1 MiB a request);
//!   the rest in requests of at most the pool's size less a page, so a bounced request
//!   always fits the pool (see [`blk`]).
//! * **MMIO**: [`mmio::mmio_slots`] lists the `virtio,mmio` nodes of the device tree;
//!   [`MmioDevice::probe`] maps each with `ioremap` (Device-nGnRE), checks magic, version and
//!   device id itself (so a bad header is a clear error, and an empty slot — device id 0 —
//!   is skipped quietly) and builds virtio-drivers' `MmioTransport` over the mapping. The
//!   wrapper owns the mapping: dropping it resets the device, then `iounmap`s.
//!   `mmio_phys_to_virt` (PCI transport only) is an `ioremap` too.
//! * **Coherency**: QEMU's virtio-mmio devices, like those of most virtio platforms, are
//!   cache-coherent with the CPU (the device tree marks `dma-coherent`), so no cache
//!   maintenance is done; the driver's own barriers order the rings.
//! * **Concurrency**: one core drives devices (as the kernel does today); the entered pool is
//!   one machine-wide word, and every other piece of state is behind a lock.
//!
//! ## Boot parameters
//! `seed=N` (randomised tests and the boot job's pattern; default: from virtio-rng, else the
//! counter), `virtio.phase=write|verify` (the two-boot persistence test),
//! `virtio.require=1` (tests fail instead of skipping when devices are missing).

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod blk;
mod bump;
pub mod dma;
pub mod mmio;
pub mod pattern;
pub mod persist;
pub mod rng;

use core::fmt;

pub use blk::{Blk, BlkError};
pub use dma::{DmaPool, VirtioHal};
pub use mmio::{probe_all, probe_devices, MmioDevice, MmioSlot, ProbeError};
pub use rng::{Rng, RngError};
pub use virtio_drivers;

/// The boot parameters this crate reads (for the firmware's unknown-parameter check).
pub const BOOT_PARAMS: &[&str] = &["seed", "virtio.phase", "virtio.require"];

/// Where a seed came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedSource {
    /// The `seed=` boot parameter.
    BootParameter,
    /// The virtio-rng device.
    VirtioRng,
    /// The system counter (no device, no parameter).
    Counter,
}

impl fmt::Display for SeedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeedSource::BootParameter => "from seed=",
            SeedSource::VirtioRng => "from virtio-rng",
            SeedSource::Counter => "from the counter",
        })
    }
}

/// The seed of a randomised run: `seed=` when given (a bad value is logged and ignored),
/// else 8 bytes of `rng`, else the counter.
pub fn seed(rng: Option<&mut Rng>) -> (u64, SeedSource) {
    if let Some(info) = hal::boot::boot_info() {
        match info.cmdline().get_u64("seed") {
            Ok(Some(s)) => return (s, SeedSource::BootParameter),
            Ok(None) => {}
            Err(_) => log::warn!("ignoring seed={:?}: not a number", info.cmdline().get("seed").unwrap_or("")),
        }
    }
    if let Some(Ok(s)) = rng.map(|r| r.next_u64()) {
        return (s, SeedSource::VirtioRng);
    }
    (pattern::mix(hal::cpu::counter()), SeedSource::Counter)
}

/// Sequential throughput of a block device (see [`bench()`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchResult {
    /// Bytes written, then read, per pass.
    pub bytes: u64,
    /// Bytes per call to [`Blk::write`]/[`Blk::read`].
    pub call_bytes: usize,
    /// Requests one pass sent to the driver.
    pub requests: u64,
    /// Of those, bounced through the pool (pieces of the buffer not physically contiguous).
    pub bounced_requests: u64,
    /// Timed passes.
    pub passes: u32,
    /// The fastest pass's time to write everything and flush, in ns.
    pub write_ns: u64,
    /// The fastest pass's time to read everything, in ns.
    pub read_ns: u64,
}

fn centi_mib_per_s(bytes: u64, ns: u64) -> u64 {
    (bytes as u128 * 100 * 1_000_000_000 / ((ns.max(1) as u128) << 20)) as u64
}

impl BenchResult {
    /// Write throughput in hundredths of MiB/s.
    pub fn write_centi_mib_s(&self) -> u64 {
        centi_mib_per_s(self.bytes, self.write_ns)
    }

    /// Read throughput in hundredths of MiB/s.
    pub fn read_centi_mib_s(&self) -> u64 {
        centi_mib_per_s(self.bytes, self.read_ns)
    }
}

impl fmt::Display for BenchResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (w, r) = (self.write_centi_mib_s(), self.read_centi_mib_s());
        write!(
            f,
            "{} MiB in {} KiB calls ({} requests, {} bounced), best of {}: write {}.{:02} MiB/s, read {}.{:02} MiB/s",
            self.bytes >> 20,
            self.call_bytes >> 10,
            self.requests,
            self.bounced_requests,
            self.passes,
            w / 100,
            w % 100,
            r / 100,
            r % 100
        )
    }
}

/// Sequential throughput: writes `bytes` from sector `start` on in calls of `buf.len()`
/// bytes (the buffer's kind decides what is bounced), flushes, and reads it all back; one
/// untimed write pass first (the host may allocate the image's blocks), then `passes` timed
/// ones, of which the fastest write and the fastest read are kept (other guests and the host
/// share the CPUs). Checks that the last call's data came back.
///
/// # Errors
/// [`BlkError`], or [`BlkError::Driver`]`(IoError)` when the data read back differs.
pub fn bench(blk: &mut Blk, start: u64, bytes: u64, buf: &mut [u8], passes: u32) -> Result<BenchResult, BlkError> {
    let call = buf.len();
    if call == 0 || !call.is_multiple_of(blk::SECTOR_SIZE) {
        return Err(BlkError::Unaligned(call));
    }
    let calls = bytes.div_ceil(call as u64).max(1);
    let step = (call / blk::SECTOR_SIZE) as u64;
    let last = start + (calls - 1) * step;
    pattern::fill(0xbe9c, last, buf);
    let write_pass = |blk: &mut Blk, buf: &[u8]| -> Result<u64, BlkError> {
        let t = hal::cpu::uptime_ns();
        for i in 0..calls {
            blk.write(start + i * step, buf)?;
        }
        blk.flush()?;
        Ok(hal::cpu::uptime_ns() - t)
    };
    let s0 = blk.stats();
    write_pass(blk, buf)?;
    let s1 = blk.stats();
    let (mut write_ns, mut read_ns) = (u64::MAX, u64::MAX);
    for _ in 0..passes.max(1) {
        write_ns = write_ns.min(write_pass(blk, buf)?);
        let t = hal::cpu::uptime_ns();
        for i in 0..calls {
            blk.read(start + i * step, buf)?;
        }
        read_ns = read_ns.min(hal::cpu::uptime_ns() - t);
    }
    if pattern::check(0xbe9c, last, buf).is_err() {
        return Err(BlkError::Driver(virtio_drivers::Error::IoError));
    }
    Ok(BenchResult {
        bytes: calls * call as u64,
        call_bytes: call,
        requests: s1.requests - s0.requests,
        bounced_requests: s1.bounced_requests - s0.bounced_requests,
        passes: passes.max(1),
        write_ns,
        read_ns,
    })
}

/// What [`boot_job`] found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootReport {
    /// Devices probed (empty slots and bad transports not counted).
    pub devices: usize,
    /// The disk's capacity, if a disk was found.
    pub capacity: Option<u64>,
    /// A previous boot's data was found and verified.
    pub previous_verified: bool,
    /// This boot's data was written and read back.
    pub written: bool,
    /// Random bytes were read from virtio-rng.
    pub rng: bool,
}

/// The firmware's virtio job: probes the device tree (logging every device), reads random
/// bytes from virtio-rng, and on the first virtio-blk disk verifies the previous boot's data
/// ("nothing lost") and writes this boot's. Every failure — a bad transport, no disk, a
/// device error — is logged and the job carries on; it never panics on device trouble.
pub fn boot_job() -> BootReport {
    let mut report = BootReport::default();
    let mut devices = probe_all();
    report.devices = devices.len();
    let take = |devs: &mut alloc::vec::Vec<MmioDevice>, t| {
        use virtio_drivers::transport::Transport;
        devs.iter().position(|d| d.device_type() == t).map(|i| devs.remove(i))
    };
    let blk_dev = take(&mut devices, virtio_drivers::transport::DeviceType::Block);
    let rng_dev = take(&mut devices, virtio_drivers::transport::DeviceType::EntropySource);
    drop(devices);

    let mut rng = rng_dev.and_then(|d| Rng::new(d).map_err(|e| log::error!("virtio-rng: {e}; carrying on")).ok());
    if let Some(r) = rng.as_mut() {
        let mut bytes = [0u8; 16];
        match r.fill(&mut bytes) {
            Ok(()) => {
                report.rng = true;
                log::info!("virtio-rng: 16 random bytes: {}", Hex(&bytes));
            }
            Err(e) => log::error!("virtio-rng: {e}; carrying on"),
        }
    } else {
        log::info!("virtio-rng: no device");
    }
    let (seed, source) = seed(rng.as_mut());
    drop(rng);

    let Some(dev) = blk_dev else {
        log::warn!("virtio-blk: {}; carrying on", BlkError::NoDevice);
        return report;
    };
    let mut blk = match Blk::new(dev) {
        Ok(b) => b,
        Err(e) => {
            log::error!("virtio-blk: {e}; carrying on");
            return report;
        }
    };
    report.capacity = Some(blk.capacity());
    let generation = match persist::verify_stamped(&mut blk) {
        Ok(st) => {
            report.previous_verified = true;
            log::info!(
                "virtio-blk: data of boot {} found and verified (seed {:#x}, {} extents of {} KiB across the disk): nothing lost",
                st.generation,
                st.seed,
                st.spread.count,
                (st.spread.len * blk::SECTOR_SIZE as u64) >> 10
            );
            st.generation + 1
        }
        Err(persist::PersistError::Stamp(pattern::StampError::NoStamp)) => {
            log::info!("virtio-blk: no data from a previous boot (fresh disk)");
            1
        }
        Err(e) => {
            log::error!("virtio-blk: previous boot's data: {e}");
            1
        }
    };
    if blk.readonly() {
        log::warn!("virtio-blk: read-only disk, not writing");
        return report;
    }
    let Some(spread) = persist::layout(blk.capacity(), 0) else {
        log::warn!("virtio-blk: {}", persist::PersistError::TooSmall(blk.capacity()));
        return report;
    };
    match persist::write_stamped(&mut blk, seed, generation, spread) {
        Ok(_) => {
            report.written = true;
            log::info!(
                "virtio-blk: boot {generation} wrote {} KiB in {} extents across the disk (seed {seed:#x}, {source}), read back and verified",
                spread.bytes() >> 10,
                spread.count
            );
        }
        Err(e) => log::error!("virtio-blk: writing this boot's data: {e}"),
    }
    report
}

/// Bytes as lowercase hex.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
