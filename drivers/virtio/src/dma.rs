//! [`VirtioHal`]: virtio-drivers' `Hal` on our memory system, and the bounce pools behind
//! `share`.
//!
//! * `dma_alloc(pages)`: a buddy block of order `ceil(log2(pages))`, zeroed, reached through
//!   the linear map; `dma_dealloc` frees the same order.
//! * `share(buffer)`: the buffer's own physical address when its bytes are physically
//!   contiguous (anything in the linear map — heap, stack, statics, buddy frames — and a
//!   vmalloc range whose pages happen to be consecutive); otherwise a *bounce*: bytes from
//!   the [`DmaPool`] of the device being driven (the one entered with [`DmaPool::enter`]),
//!   or, when no pool is entered or it is full, a buddy block of its own. A pool that is
//!   neither entered nor holding a bounce is *idle*: under memory pressure its shrinker
//!   gives the block back, and the next [`DmaPool::enter`] takes a new one (or fails with
//!   [`PoolError::NoMemory`], a typed error for the request, never a panic in `share`). The buffer is
//!   copied in for every direction (as Linux's swiotlb does since 2022: a device that writes
//!   less than the whole buffer must not copy stale pool bytes back over the rest).
//! * `unshare(paddr, buffer)`: for a bounce, copies back to the buffer when the device may
//!   have written it (`DeviceToDriver`, `Both`) and frees the bounce.
//! * `mmio_phys_to_virt(paddr, size)`: `ioremap` (Device-nGnRE). Only the PCI transport
//!   calls it, once per capability structure, for the life of the device; the mapping is
//!   never unmapped (the trait has no counterpart to undo it).

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hal::{PhysAddr, VirtAddr, PAGE_SIZE};
use memory::buddy::{self, BuddyError, Frames};
use memory::gfp::{Gfp, __GFP_ZERO, GFP_DMA32, GFP_KERNEL};
use memory::kernel;
use spin::Mutex;
use virtio_drivers::{BufferDirection, Hal};

use crate::bump::Bump;

/// The buddy order that holds `pages` pages: `ceil(log2(pages))` (0 for 0 or 1 page).
pub const fn order_for_pages(pages: usize) -> usize {
    if pages <= 1 {
        0
    } else {
        (usize::BITS - (pages - 1).leading_zeros()) as usize
    }
}

/// The buddy order that holds `bytes` bytes.
pub const fn order_for_bytes(bytes: usize) -> usize {
    order_for_pages(bytes.div_ceil(PAGE_SIZE))
}

/// Alignment of bounces inside a pool: a cache line.
const BOUNCE_ALIGN: usize = 64;

/// Pools that can exist at once (one per driven device).
pub const MAX_POOLS: usize = 32;

/// Counters of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// The pool's size in bytes.
    pub capacity: usize,
    /// Bounces served from the pool.
    pub bounces: u64,
    /// Bytes copied into bounces (driver → device).
    pub bytes_in: u64,
    /// Bytes copied back out of bounces (device → driver).
    pub bytes_out: u64,
    /// The most bytes in use at once.
    pub high_water: usize,
    /// Bounces that did not fit while this pool was entered (served by a buddy block).
    pub overflows: u64,
    /// Bounces live now.
    pub live: usize,
    /// Whether the pool holds its block now (an idle pool's is given back under pressure).
    pub resident: bool,
    /// Times the shrinker gave the idle pool's block back.
    pub given_back: u64,
    /// Times [`DmaPool::enter`] took a new block after that.
    pub refills: u64,
}

struct PoolEntry {
    /// The block while resident; `None` once the shrinker gave it back.
    frames: Option<Frames>,
    bump: Bump,
    stats: PoolStats,
    /// [`PoolGuard`]s alive: an entered pool is never given back, so every bounce of a
    /// request finds its block.
    entered: usize,
}

impl PoolEntry {
    fn contains(&self, pa: u64) -> bool {
        let base = self.pa().as_u64();
        self.frames.is_some() && pa >= base && pa < base + self.bump.size() as u64
    }

    /// The block's physical address (0 while given back).
    fn pa(&self) -> PhysAddr {
        self.frames.as_ref().map_or(PhysAddr::new(0), Frames::phys)
    }

    /// The linear-map address of `off` bytes into the block (resident).
    fn ptr(&self, off: usize) -> *mut u8 {
        self.frames.as_ref().map_or(core::ptr::null_mut(), |f| f.virt().as_mut_ptr::<u8>().wrapping_add(off))
    }

    /// Neither entered nor holding a bounce, with a block to give back.
    fn idle(&self) -> bool {
        self.frames.is_some() && self.entered == 0 && self.bump.live() == 0
    }
}

static POOLS: Mutex<[Option<PoolEntry>; MAX_POOLS]> = Mutex::new([const { None }; MAX_POOLS]);

/// The pool entered on this core, as slot + 1 (0: none).
///
/// The `Hal` functions have no device argument, so the device being driven is named here by
/// its wrapper ([`DmaPool::enter`]) around each call into the driver. It is one word for the
/// whole machine: the kernel drives devices from one core today. With several cores it
/// becomes per-core (indexed by `MPIDR_EL1`) — a wrong value is still safe, as it only picks
/// which pool a bounce comes from, and every bounce is found again by its physical address.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

static SHARED_DIRECT: AtomicU64 = AtomicU64::new(0);
static LOOSE_BOUNCES: AtomicU64 = AtomicU64::new(0);
static LOOSE_LIVE: AtomicU64 = AtomicU64::new(0);
static DMA_BLOCKS_LIVE: AtomicU64 = AtomicU64::new(0);
static DMA_ALLOC_FAILURES: AtomicU64 = AtomicU64::new(0);

/// The gfp flags `dma_alloc` takes queue memory with (see [`transport_gfp`]).
static DMA_GFP: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(GFP_KERNEL.bits());

/// What a virtio-mmio transport of `version` needs of the memory its queues live in:
/// - version 1 (legacy): the queue is given to the device as a 32-bit page frame number
///   (`QueuePFN`), so it must lie below 2^44; we have no zone for that, and `DMA32` (below
///   4 GiB) is the nearest that satisfies it: [`GFP_DMA32`];
/// - version 2 (modern): 64-bit queue addresses (`QueueDescLow/High`...): [`GFP_KERNEL`].
///
/// Buffers are named by 64-bit descriptors in both, so bounces and shared buffers need no
/// zone.
///
/// # Example
/// ```
/// use memory::gfp::{GFP_DMA32, GFP_KERNEL};
/// assert_eq!(virtio::dma::transport_gfp(1), GFP_DMA32);
/// assert_eq!(virtio::dma::transport_gfp(2), GFP_KERNEL);
/// ```
pub fn transport_gfp(version: u32) -> Gfp {
    if version == 1 {
        GFP_DMA32
    } else {
        GFP_KERNEL
    }
}

/// Records that a transport of `version` was probed: from then on every queue is
/// allocated as the strictest transport seen needs (the `Hal` trait's `dma_alloc` does not
/// say which device asks).
pub fn note_transport(version: u32) {
    if transport_gfp(version).zone() < GFP_KERNEL.zone() {
        DMA_GFP.store(GFP_DMA32.bits(), Ordering::Relaxed);
    }
}

/// The gfp flags queue memory is allocated with now (see [`note_transport`]).
pub fn dma_gfp() -> Gfp {
    Gfp::from_bits(DMA_GFP.load(Ordering::Relaxed))
}

/// Machine-wide counters of the adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Buffers shared in place (physically contiguous).
    pub shared_direct: u64,
    /// Bounces served by a buddy block of their own (no pool entered, or it was full).
    pub loose_bounces: u64,
    /// Of those, still live.
    pub loose_live: u64,
    /// `dma_alloc` blocks live (queues).
    pub dma_blocks_live: u64,
    /// `dma_alloc` calls the buddy could not serve.
    pub dma_alloc_failures: u64,
    /// Pools registered now.
    pub pools: usize,
}

/// The adapter's counters.
pub fn stats() -> DmaStats {
    DmaStats {
        shared_direct: SHARED_DIRECT.load(Ordering::Relaxed),
        loose_bounces: LOOSE_BOUNCES.load(Ordering::Relaxed),
        loose_live: LOOSE_LIVE.load(Ordering::Relaxed),
        dma_blocks_live: DMA_BLOCKS_LIVE.load(Ordering::Relaxed),
        dma_alloc_failures: DMA_ALLOC_FAILURES.load(Ordering::Relaxed),
        pools: POOLS.lock().iter().filter(|p| p.is_some()).count(),
    }
}

/// Why a pool could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// The buddy allocator could not give the block.
    NoMemory(BuddyError),
    /// [`MAX_POOLS`] pools exist already.
    TooManyPools,
}

impl core::fmt::Display for PoolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PoolError::NoMemory(e) => write!(f, "no memory for a DMA bounce pool: {e}"),
            PoolError::TooManyPools => write!(f, "all {MAX_POOLS} DMA bounce pool slots in use"),
        }
    }
}

impl core::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PoolError::NoMemory(e) => Some(e),
            _ => None,
        }
    }
}

/// A device's DMA bounce pool: one physically contiguous buddy block that `share` copies
/// non-contiguous buffers into while the pool is entered. Freed on drop; while idle, given
/// back under memory pressure and taken anew by the next [`DmaPool::enter`].
#[derive(Debug)]
pub struct DmaPool {
    slot: usize,
    order: usize,
}

/// Gives idle pools' blocks back under memory pressure (registered with the first pool).
static POOL_SHRINKER: memory::reclaim::Shrinker =
    memory::reclaim::Shrinker::new("virtio DMA bounce pools (idle)", pool_count, pool_scan);

/// Frames the idle pools hold.
fn pool_count() -> usize {
    POOLS
        .try_lock()
        .map_or(0, |pools| pools.iter().flatten().filter(|e| e.idle()).map(|e| e.bump.size() / PAGE_SIZE).sum())
}

/// Gives back idle pools' blocks until `nr` frames or more went; returns how many.
fn pool_scan(nr: usize) -> usize {
    let mut taken: [Option<Frames>; MAX_POOLS] = [const { None }; MAX_POOLS];
    let mut n = 0;
    if let Some(mut pools) = POOLS.try_lock() {
        for (slot, e) in pools.iter_mut().enumerate() {
            let Some(e) = e.as_mut().filter(|e| e.idle()) else { continue };
            if n >= nr {
                break;
            }
            taken[slot] = e.frames.take();
            e.stats.given_back += 1;
            n += e.bump.size() / PAGE_SIZE;
        }
    }
    // Freed with the pool table unlocked.
    drop(taken);
    n
}

impl DmaPool {
    /// A pool of `PAGE_SIZE << order` bytes.
    ///
    /// # Errors
    /// [`PoolError`].
    pub fn new(order: usize) -> Result<Self, PoolError> {
        let frames = Frames::alloc_zeroed(order).map_err(PoolError::NoMemory)?;
        let mut pools = POOLS.lock();
        let slot = pools.iter().position(Option::is_none).ok_or(PoolError::TooManyPools)?;
        let size = frames.size();
        pools[slot] = Some(PoolEntry {
            frames: Some(frames),
            bump: Bump::new(size),
            stats: PoolStats { capacity: size, ..PoolStats::default() },
            entered: 0,
        });
        drop(pools);
        match memory::reclaim::register(&POOL_SHRINKER) {
            Ok(()) | Err(memory::reclaim::ReclaimError::AlreadyRegistered) => {}
            Err(e) => log::warn!("virtio: DMA pools not reclaimable: {e}"),
        }
        Ok(Self { slot, order })
    }

    /// The pool's size in bytes.
    pub fn capacity(&self) -> usize {
        PAGE_SIZE << self.order
    }

    /// The largest single bounce the pool is sure to hold while a request also bounces a few
    /// small buffers (a request header, a status byte): the capacity less a page.
    pub fn max_bounce(&self) -> usize {
        self.capacity().saturating_sub(PAGE_SIZE).max(PAGE_SIZE / 2)
    }

    /// The pool's physical address now (0 while its block is given back: see
    /// [`DmaPool::enter`]).
    pub fn phys(&self) -> PhysAddr {
        POOLS.lock()[self.slot].as_ref().map_or(PhysAddr::new(0), PoolEntry::pa)
    }

    /// Makes this the pool `share` bounces from until the guard drops (the previous one is
    /// restored then). Wrap every call into the device's driver in it. An entered pool keeps
    /// its block; one given back while idle is taken anew here.
    ///
    /// # Errors
    /// [`PoolError::NoMemory`] when the pool's block was given back and no new one can be
    /// had: the request fails before any bounce is needed.
    pub fn enter(&self) -> Result<PoolGuard<'_>, PoolError> {
        let mut pools = POOLS.lock();
        let resident = pools[self.slot].as_ref().is_some_and(|e| e.frames.is_some());
        let mut spare = None;
        if !resident {
            // With no lock held: the allocation may run the shrinkers, ours among them.
            drop(pools);
            let frames = Frames::alloc_zeroed(self.order).map_err(PoolError::NoMemory)?;
            pools = POOLS.lock();
            match pools[self.slot].as_mut() {
                Some(e) if e.frames.is_none() => {
                    e.frames = Some(frames);
                    e.stats.refills += 1;
                }
                _ => spare = Some(frames),
            }
        }
        if let Some(e) = pools[self.slot].as_mut() {
            e.entered += 1;
        }
        drop(pools);
        drop(spare);
        let previous = ACTIVE.swap(self.slot + 1, Ordering::AcqRel);
        Ok(PoolGuard { pool: self, previous })
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        POOLS.lock()[self.slot].as_ref().map_or_else(PoolStats::default, |e| PoolStats {
            live: e.bump.live(),
            high_water: e.bump.high_water(),
            resident: e.frames.is_some(),
            ..e.stats
        })
    }
}

impl Drop for DmaPool {
    fn drop(&mut self) {
        let _ = ACTIVE.compare_exchange(self.slot + 1, 0, Ordering::AcqRel, Ordering::Relaxed);
        let mut pools = POOLS.lock();
        let live = pools[self.slot].as_ref().map_or(0, |e| e.bump.live());
        if live == 0 {
            let entry = pools[self.slot].take();
            drop(pools);
            drop(entry);
            return;
        }
        // A device may still write there, and `unshare` must still recognise its bounces:
        // the entry stays in its slot, which is never reused. A pool with bounces live is
        // not idle; once the last is unshared, the shrinker may give its block back.
        let pa = pools[self.slot].as_ref().map_or(PhysAddr::new(0), PoolEntry::pa);
        log::error!("virtio: DMA pool at {pa:#x} dropped with {live} bounces live; its slot is lost");
    }
}

/// [`DmaPool::enter`]'s guard.
#[derive(Debug)]
pub struct PoolGuard<'a> {
    pool: &'a DmaPool,
    previous: usize,
}

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        ACTIVE.store(self.previous, Ordering::Release);
        if let Some(e) = POOLS.lock()[self.pool.slot].as_mut() {
            e.entered -= 1;
        }
    }
}

fn translate(va: VirtAddr) -> Option<PhysAddr> {
    if kernel::is_vmalloc_addr(va) {
        return kernel::vmalloc_to_phys(va);
    }
    let space = hal::kmap::kernel_space()?.lock();
    space.upper().translate(va).or_else(|| space.lower().translate(va)).map(|t| t.phys)
}

/// The physical address of the `len` bytes at `va` when they are physically contiguous (a
/// device can reach them with one address), else `None` — also when a page is unmapped.
pub fn contiguous_phys(va: VirtAddr, len: usize) -> Option<PhysAddr> {
    match contiguous_run(va, len) {
        Some((pa, run)) if run == len && len > 0 => Some(pa),
        _ => None,
    }
}

/// How many of the `len` bytes at `va` are physically contiguous from the first one on, and
/// where they are: `None` when `len` is 0 or the first byte is unmapped. One step for the
/// linear map; page by page through the tables elsewhere (vmalloc, vmap).
pub fn contiguous_run(va: VirtAddr, len: usize) -> Option<(PhysAddr, usize)> {
    if len == 0 {
        return None;
    }
    let last = va.checked_add(len as u64 - 1).ok()?;
    if let Some(linear) = hal::kmap::linear_map() {
        if let (Some(pa), Some(_)) = (linear.virt_to_phys(va), linear.virt_to_phys(last)) {
            return Some((pa, len));
        }
    }
    let first = translate(va)?;
    let mut page = va.page_down().add(PAGE_SIZE as u64);
    while page <= last {
        let run = (page.as_u64() - va.as_u64()) as usize;
        if translate(page) != Some(first.add(run as u64)) {
            return Some((first, run));
        }
        page = page.add(PAGE_SIZE as u64);
    }
    Some((first, len))
}

fn linear_ptr(pa: PhysAddr) -> *mut u8 {
    hal::kmap::linear_map().expect("virtio: DMA before the MMU is on").ptr(pa)
}

/// A bounce from the entered pool: (physical address, linear address).
fn pool_bounce(len: usize) -> Option<(u64, *mut u8)> {
    let slot = ACTIVE.load(Ordering::Acquire).checked_sub(1)?;
    let mut pools = POOLS.lock();
    let e = pools.get_mut(slot)?.as_mut().filter(|e| e.frames.is_some())?;
    match e.bump.alloc(len, BOUNCE_ALIGN) {
        Some(off) => {
            e.stats.bounces += 1;
            e.stats.bytes_in += len as u64;
            Some((e.pa().as_u64() + off as u64, e.ptr(off)))
        }
        None => {
            e.stats.overflows += 1;
            None
        }
    }
}

/// Shares `buffer` with a device; see the module docs.
///
/// # Safety
/// `buffer` is valid for reads and writes of its length for the duration of the call.
///
/// # Panics
/// When a bounce is needed and neither the pool nor the buddy allocator has room: the trait
/// gives `share` no way to fail.
unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> u64 {
    let len = buffer.len();
    let src = buffer.as_ptr() as *mut u8;
    if let Some(pa) = contiguous_phys(VirtAddr::from_ptr(src), len) {
        SHARED_DIRECT.fetch_add(1, Ordering::Relaxed);
        return pa.as_u64();
    }
    let (pa, dst) = match pool_bounce(len) {
        Some(b) => b,
        None => {
            let pa = buddy::alloc_pages(order_for_bytes(len)).unwrap_or_else(|e| {
                panic!("virtio: cannot bounce a {len}-byte {direction:?} buffer at {src:p}: pool full and {e}")
            });
            LOOSE_BOUNCES.fetch_add(1, Ordering::Relaxed);
            LOOSE_LIVE.fetch_add(1, Ordering::Relaxed);
            (pa.as_u64(), linear_ptr(pa))
        }
    };
    // SAFETY: `src` is valid for `len` bytes (our caller's promise); `dst` is `len` bytes of
    // a bounce just reserved for this buffer alone, in RAM reached through the linear map.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, len) };
    pa
}

/// Undoes [`share`]; see the module docs.
///
/// # Safety
/// As [`share`], and `paddr` is what `share` returned for this buffer.
unsafe fn unshare(paddr: u64, buffer: NonNull<[u8]>, direction: BufferDirection) {
    let len = buffer.len();
    let dst = buffer.as_ptr() as *mut u8;
    let copy_back = direction != BufferDirection::DriverToDevice;
    // A pool bounce? Found by its address, whichever pool is entered now.
    {
        let mut pools = POOLS.lock();
        if let Some(e) = pools.iter_mut().flatten().find(|e| e.contains(paddr)) {
            let off = (paddr - e.pa().as_u64()) as usize;
            if copy_back {
                // SAFETY: the bounce holds `len` bytes the device has finished with; `dst`
                // is valid for `len` bytes (our caller's promise) and disjoint from the pool.
                unsafe { core::ptr::copy_nonoverlapping(e.ptr(off), dst, len) };
                e.stats.bytes_out += len as u64;
            }
            e.bump.free(off, len);
            return;
        }
    }
    // Shared in place? (The same test `share` made: the mapping cannot have changed while
    // the buffer was lent.)
    if contiguous_phys(VirtAddr::from_ptr(dst), len).map(PhysAddr::as_u64) == Some(paddr) {
        return;
    }
    // A bounce of its own.
    let pa = PhysAddr::new(paddr);
    if copy_back {
        // SAFETY: as for the pool case; the block is `len` bytes or more of RAM in the
        // linear map, taken by `share` for this buffer.
        unsafe { core::ptr::copy_nonoverlapping(linear_ptr(pa), dst, len) };
    }
    LOOSE_LIVE.fetch_sub(1, Ordering::Relaxed);
    // SAFETY: `share` took this block of this order for this buffer; the device is done.
    if let Err(e) = unsafe { buddy::free_pages(pa, order_for_bytes(len)) } {
        log::error!("virtio: freeing the bounce at {pa:#x} ({len} bytes): {e}");
    }
}

/// virtio-drivers' [`Hal`] on the kernel's memory system (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioHal;

// SAFETY: each method meets its "implementation safety" contract:
// * `dma_alloc` returns a block fresh from the buddy allocator — zeroed by it, page aligned
//   (every block is), reached through the linear map (valid for reads and writes), and owned
//   by nobody else until `dma_dealloc` frees it with the same order (`pages` is the same);
//   a failure returns physical address 0, which `Dma::new` turns into `DmaError`.
// * `mmio_phys_to_virt` returns a fresh ioremap mapping of exactly the requested range with
//   device attributes: valid, and aliasing no Rust allocation (ioremap refuses RAM).
// * `share` returns an address at which the device sees exactly the buffer's bytes: its own
//   when physically contiguous, else a bounce reserved for it alone and filled with its
//   contents; `unshare` copies device-written bytes back before releasing the bounce. A
//   pool's block is never given back while a bounce in it is live or the pool is entered
//   (`PoolEntry::idle`, checked under the pool table's lock, where bounces are taken).
unsafe impl Hal for VirtioHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (virtio_drivers::PhysAddr, NonNull<u8>) {
        match buddy::alloc_pages_gfp(dma_gfp() | __GFP_ZERO, order_for_pages(pages)) {
            Ok(pa) => {
                DMA_BLOCKS_LIVE.fetch_add(1, Ordering::Relaxed);
                let va = NonNull::new(linear_ptr(pa)).expect("linear map is never at 0");
                (pa.as_u64(), va)
            }
            Err(e) => {
                DMA_ALLOC_FAILURES.fetch_add(1, Ordering::Relaxed);
                log::error!("virtio: dma_alloc of {pages} pages: {e}");
                (0, NonNull::dangling())
            }
        }
    }

    unsafe fn dma_dealloc(paddr: virtio_drivers::PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the trait's contract: `paddr` came from `dma_alloc` with this many pages
        // (so this order) and the device no longer uses it.
        match unsafe { buddy::free_pages(PhysAddr::new(paddr), order_for_pages(pages)) } {
            Ok(()) => {
                DMA_BLOCKS_LIVE.fetch_sub(1, Ordering::Relaxed);
                0
            }
            Err(e) => {
                log::error!("virtio: dma_dealloc of {pages} pages at {paddr:#x}: {e}");
                -1
            }
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: virtio_drivers::PhysAddr, size: usize) -> NonNull<u8> {
        match memory::ioremap::ioremap(PhysAddr::new(paddr), size) {
            Ok(va) => NonNull::new(va.as_mut_ptr()).expect("ioremap never returns 0"),
            Err(e) => panic!("virtio: ioremap of BAR range {paddr:#x}+{size:#x}: {e}"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> virtio_drivers::PhysAddr {
        // SAFETY: the trait's contract is `share`'s.
        unsafe { share(buffer, direction) }
    }

    unsafe fn unshare(paddr: virtio_drivers::PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        // SAFETY: the trait's contract is `unshare`'s.
        unsafe { unshare(paddr, buffer, direction) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_round_up_to_powers_of_two() {
        let cases = [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (1024, 10), (1025, 11)];
        for (pages, order) in cases {
            assert_eq!(order_for_pages(pages), order, "{pages} pages");
        }
        assert_eq!(order_for_bytes(1), 0);
        assert_eq!(order_for_bytes(PAGE_SIZE + 1), 1);
        assert_eq!(order_for_bytes(256 * 1024), 6);
    }
}
