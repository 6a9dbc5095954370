//! # scullv — a RAM device in vmalloc'd quanta
//!
//! The `scullv` driver of *Linux Device Drivers* (3rd ed., ch. 8) for this unikernel: a
//! device whose contents live in memory, allocated as data is written and all given back by
//! [`ScullV::trim`]. It is the example a driver author copies: it uses nothing but the
//! `memory` crate's public API — `memory::kernel::vzalloc` and `vfree` for the data, the slab
//! (through `alloc::vec::Vec`) for the bookkeeping — and `hal` only for its address type.
//!
//! ## Layout: quanta and quantum sets
//!
//! ```text
//!   data: [ item 0 ][ item 1 ][ item 2 ] ...        one item per qset × quantum bytes (Vec)
//!             │         │ None (nothing written there yet)
//!             ▼
//!   qset array (slab):  [ q0 ][ q1 ][None][ q3 ] ... qset pointers
//!                          │     │          │
//!                          ▼     ▼          ▼
//!   quanta (vzalloc):   PAGE_SIZE << order bytes each, + an unmapped guard page
//! ```
//!
//! - A **quantum** is `PAGE_SIZE << order` bytes (default order 4: 64 KiB), one vmalloc
//!   area. Vmalloc suits it: the pages need not be physically contiguous, so a large quantum
//!   never fails for lack of a high-order buddy block, and each one is followed by a guard
//!   page.
//! - A **quantum set** ("qset") is an array of `qset` quantum pointers (default 500, as
//!   scullv), allocated from the slab when the first quantum in its range is written.
//! - The list of quantum sets is a `Vec` indexed by `offset / (quantum × qset)`; LDD's
//!   `scullv_follow` walks a linked list instead. Both allocate only what was written, so a
//!   sparse device (one byte at 0, one at 1 GiB) holds two quanta.
//!
//! An offset maps to `item = offset / (quantum × qset)`, `slot = (offset / quantum) % qset`,
//! and a byte `offset % quantum` into that quantum.
//!
//! ## Semantics, and how they differ from LDD's scullv
//!
//! | | LDD `scullv_read`/`scullv_write` | [`ScullV::read`]/[`ScullV::write`] |
//! |---|---|---|
//! | per call | at most to the end of one quantum (short counts) | the whole buffer |
//! | read of a hole (a quantum never written, below `size`) | returns 0, which a reader takes for end of file | reads zeros, like a sparse file |
//! | read at or past `size` | 0 | 0; a read crossing `size` is short |
//! | write allocation failure | `-ENOMEM`; a quantum-set array allocated for the call stays (trim frees it) | error, and the device is exactly as before: no quantum, array or byte changed |
//! | zero-length write | still allocates the quantum at the offset | does nothing |
//! | allocation on read | `scullv_follow` adds list items (unchecked `kmalloc`) | none |
//!
//! [`ScullV::read_quantum`] and [`ScullV::write_quantum`] keep LDD's per-call semantics
//! (at most one quantum, 0 at a hole) for a file interface that wants them. New quanta come
//! zero-filled (`vzalloc`), as LDD `memset`s them, so the unwritten part of a quantum
//! below `size` reads as zeros and never shows stale memory.
//!
//! ## Using it from a driver
//!
//! `ScullV` is a plain value: methods that change it take `&mut self`, so a driver shared
//! between CPUs keeps it behind a lock (`spin::Mutex<ScullV>`; LDD's device mutex). It is
//! `Send`. Dropping it trims it.
//!
//! ```no_run
//! use scullv::{ScullError, ScullV, DEFAULT_ORDER, DEFAULT_QSET};
//!
//! // At boot the firmware has run `memory::kernel::init(...)`, and the image declares the
//! // slab as its heap (`#[global_allocator] static HEAP: memory::slab::KernelAllocator`), so
//! // both vmalloc and `alloc` are up.
//! fn probe() -> Result<(), ScullError> {
//!     // Nothing is allocated until the first write.
//!     let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET)?;
//!
//!     // First write: one qset array from the slab, one 64 KiB quantum from vzalloc.
//!     dev.write(0, b"hello")?;
//!     // A sparse write: one more quantum; the hole in between costs nothing and reads as 0.
//!     dev.write(1 << 20, b"world")?;
//!     assert_eq!(dev.size(), (1 << 20) + 5);
//!
//!     let mut buf = [0u8; 5];
//!     assert_eq!(dev.read(1 << 20, &mut buf)?, 5);
//!     assert_eq!(&buf, b"world");
//!     assert_eq!(dev.stats().quanta, 2);
//!
//!     // The quanta are vmalloc areas: /proc/vmallocinfo lists them, with
//!     // `drivers/scullv/src/quantum.rs:LINE` as the caller.
//!     let mut info = String::new();
//!     memory::kernel::write_vmallocinfo(&mut info).ok();
//!
//!     // Give everything back: vfree each quantum (frames go back to the buddy allocator at
//!     // once), free the arrays to the slab.
//!     dev.trim();
//!     // Optional: flush the lazily freed virtual ranges now instead of at the next batch.
//!     memory::kernel::purge();
//!     Ok(())
//! }
//! ```
//!
//! [`demo`] does the same with a few MiB and a checksum; the firmware's boot report calls it.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod demo;
mod quantum;
#[cfg(test)]
mod tests;

use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use memory::vmalloc::VmallocError;

pub use demo::{demo, demo_on, expected_checksum, DemoReport};
pub use quantum::{QuantumAlloc, VmallocQuanta};

/// The page size quanta are counted in (`hal::PAGE_SIZE`).
pub const PAGE_SIZE: usize = hal::PAGE_SIZE;

/// Default quantum order, as LDD's `SCULLV_ORDER`: 16 pages (64 KiB) per quantum.
pub const DEFAULT_ORDER: u32 = 4;

/// Default quantum-set length, as LDD's `SCULLV_QSET`.
pub const DEFAULT_QSET: usize = 500;

/// Largest accepted order: 1 GiB quanta.
pub const MAX_ORDER: u32 = 18;

/// Largest accepted quantum-set length (a 512 KiB array of pointers).
pub const MAX_QSET: usize = 1 << 16;

/// Largest device size for any geometry (1 TiB): writes ending beyond a device's
/// [`max_size`](ScullV::max_size) are refused with [`ScullError::TooLarge`].
pub const MAX_SIZE: usize = 1 << 40;

/// Most quantum sets a device holds: it bounds the list of sets a far sparse write must
/// grow (one `Option<Vec>` per set, written or not, as LDD's list items), so a device's
/// [`max_size`](ScullV::max_size) is `min(MAX_SIZE, quantum × qset × MAX_SETS)` — 1000 GiB
/// with the defaults.
pub const MAX_SETS: usize = 1 << 15;

/// Why a device operation failed. Every failing operation leaves the device as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScullError {
    /// The quantum allocator (vmalloc) refused a quantum: no frames, no virtual space, or
    /// vmalloc not initialised. Every quantum taken for the write was given back.
    Quantum(VmallocError),
    /// The slab refused a quantum-set array or the list of sets (LDD's `-ENOMEM`).
    NoMemory,
    /// `offset + len` does not fit in a `usize`.
    Overflow,
    /// The write would end beyond the device's [`max_size`](ScullV::max_size).
    TooLarge,
    /// `order` above [`MAX_ORDER`], or `qset` zero or above [`MAX_QSET`].
    BadGeometry,
    /// [`demo`] read back a byte that differs from what it wrote, at this offset.
    Mismatch {
        /// The first differing offset.
        offset: usize,
    },
}

impl fmt::Display for ScullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScullError::Quantum(e) => write!(f, "no quantum: {e}"),
            ScullError::NoMemory => f.write_str("no memory for a quantum-set array"),
            ScullError::Overflow => f.write_str("offset + length overflows"),
            ScullError::TooLarge => f.write_str("write would end beyond the device's maximum size"),
            ScullError::BadGeometry => {
                write!(f, "order must be at most {MAX_ORDER} and qset between 1 and {MAX_QSET}")
            }
            ScullError::Mismatch { offset } => write!(f, "data read back differs at offset {offset}"),
        }
    }
}

impl core::error::Error for ScullError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            ScullError::Quantum(e) => Some(e),
            _ => None,
        }
    }
}

/// A snapshot of a device's allocations and counters ([`ScullV::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScullStats {
    /// Bytes of data: one past the highest byte written since the last trim.
    pub size: usize,
    /// Bytes per quantum (`PAGE_SIZE << order`).
    pub quantum_size: usize,
    /// Quanta allocated now.
    pub quanta: usize,
    /// `quanta × quantum_size`: the vmalloc'd bytes (each area also has a guard page).
    pub quantum_bytes: usize,
    /// Quantum-set arrays allocated now.
    pub qset_arrays: usize,
    /// Slab bytes of those arrays (`qset_arrays × qset × 8`).
    pub array_bytes: usize,
    /// Quanta allocated since the device was created (trims included).
    pub total_quantum_allocs: u64,
    /// Quantum allocations that failed.
    pub failed_quantum_allocs: u64,
    /// Quanta the allocator refused to take back (a bug; should stay 0).
    pub free_errors: u64,
}

/// One quantum set: `qset` pointers, `None` where nothing was written.
type QSet = Vec<Option<NonNull<u8>>>;

/// Where an offset lives.
#[derive(Clone, Copy, Debug)]
struct Pos {
    /// Index of the quantum set.
    item: usize,
    /// Index of the quantum in its set.
    slot: usize,
    /// Byte offset in the quantum.
    off: usize,
}

/// A scullv device: a RAM file of quanta allocated on first write. See the crate docs.
///
/// `A` is where quanta come from: [`VmallocQuanta`] (vzalloc/vfree) in the kernel, a
/// counting mock in host tests.
///
/// Not `Sync` (one core at a time; share it behind a lock):
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<scullv::ScullV>();
/// ```
pub struct ScullV<A: QuantumAlloc = VmallocQuanta> {
    alloc: A,
    order: u32,
    qset: usize,
    quantum: usize,
    max_size: usize,
    /// The list of quantum sets; `None` for an item nothing was written to.
    data: Vec<Option<QSet>>,
    size: usize,
    quanta: usize,
    arrays: usize,
    total_allocs: u64,
    failed_allocs: u64,
    free_errors: u64,
    /// Host tests: quantum-set arrays that may still be allocated before the slab "fails".
    #[cfg(test)]
    arrays_before_failure: Option<usize>,
}

// SAFETY: the device owns its quanta exclusively (the `QuantumAlloc` contract) and they stay
// valid on any CPU (kernel memory in the mappings every core shares), and its arrays are
// ordinary heap memory; moving the device moves that ownership with it, and every access
// takes `&self`/`&mut self` of the one owner. Not `Sync`: cores share a device only behind
// a lock. The allocator moves along too, hence `A: Send`.
unsafe impl<A: QuantumAlloc + Send> Send for ScullV<A> {}

impl ScullV<VmallocQuanta> {
    /// An empty device whose quanta are `PAGE_SIZE << order` bytes of vmalloc memory, in sets
    /// of `qset`. Allocates nothing.
    ///
    /// # Errors
    /// [`ScullError::BadGeometry`] for an order above [`MAX_ORDER`] or a `qset` of zero or
    /// above [`MAX_QSET`].
    pub fn new(order: u32, qset: usize) -> Result<Self, ScullError> {
        Self::with_alloc(order, qset, VmallocQuanta)
    }
}

impl<A: QuantumAlloc> ScullV<A> {
    /// An empty device taking its quanta from `alloc`.
    ///
    /// # Errors
    /// As [`ScullV::new`].
    pub fn with_alloc(order: u32, qset: usize, alloc: A) -> Result<Self, ScullError> {
        if order > MAX_ORDER || qset == 0 || qset > MAX_QSET {
            return Err(ScullError::BadGeometry);
        }
        Ok(Self {
            alloc,
            order,
            qset,
            quantum: PAGE_SIZE << order,
            max_size: MAX_SIZE.min((PAGE_SIZE << order) * qset * MAX_SETS),
            data: Vec::new(),
            size: 0,
            quanta: 0,
            arrays: 0,
            total_allocs: 0,
            failed_allocs: 0,
            free_errors: 0,
            #[cfg(test)]
            arrays_before_failure: None,
        })
    }

    /// The quantum order.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Quantum pointers per quantum set.
    pub fn qset(&self) -> usize {
        self.qset
    }

    /// Bytes per quantum: `PAGE_SIZE << order`.
    pub fn quantum_size(&self) -> usize {
        self.quantum
    }

    /// The largest size the device can grow to: `min(MAX_SIZE, quantum × qset × MAX_SETS)`.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Bytes of data: one past the highest byte written since the last trim.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Allocations and counters.
    pub fn stats(&self) -> ScullStats {
        ScullStats {
            size: self.size,
            quantum_size: self.quantum,
            quanta: self.quanta,
            quantum_bytes: self.quanta * self.quantum,
            qset_arrays: self.arrays,
            array_bytes: self.arrays * self.qset * core::mem::size_of::<Option<NonNull<u8>>>(),
            total_quantum_allocs: self.total_allocs,
            failed_quantum_allocs: self.failed_allocs,
            free_errors: self.free_errors,
        }
    }

    /// Whether the quantum holding `offset` is allocated (a write touched it since the last
    /// trim).
    pub fn is_allocated(&self, offset: usize) -> bool {
        self.quantum_ptr(self.pos(offset)).is_some()
    }

    /// Where the byte at `offset` is stored — inside a vmalloc area with [`VmallocQuanta`] —
    /// or `None` in a hole. For debugging (`memory::kernel::find_area`, `vmalloc_to_phys`)
    /// or for mapping the quantum elsewhere, as LDD's scullv `mmap` does with
    /// `vmalloc_to_page`. The pointer stays valid until the next [`trim`](Self::trim) or
    /// drop; dereferencing it is `unsafe`, and must not race with a write to the device.
    pub fn addr_of(&self, offset: usize) -> Option<NonNull<u8>> {
        let at = self.pos(offset);
        let q = self.quantum_ptr(at)?;
        // `off < quantum`: the result stays inside the quantum's allocation.
        NonNull::new(q.as_ptr().wrapping_add(at.off))
    }

    /// Writes all of `data` at `offset`, allocating the quanta (and quantum sets) it lands
    /// in that do not exist yet, and grows [`size`](Self::size) to cover it. Returns
    /// `data.len()`.
    ///
    /// All or nothing: every allocation the write needs is made before a byte is copied, so
    /// on error the device is unchanged — contents, size, quanta and arrays — and whatever
    /// was allocated for it has been freed. An empty `data` does nothing.
    ///
    /// # Errors
    /// [`ScullError::Overflow`] when `offset + data.len()` overflows,
    /// [`ScullError::TooLarge`] when it exceeds [`max_size`](Self::max_size),
    /// [`ScullError::Quantum`] when
    /// the allocator refuses a quantum, [`ScullError::NoMemory`] when the slab refuses an
    /// array.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<usize, ScullError> {
        let end = offset.checked_add(data.len()).ok_or(ScullError::Overflow)?;
        if data.is_empty() {
            return Ok(0);
        }
        if end > self.max_size {
            return Err(ScullError::TooLarge);
        }
        self.populate(offset, end)?;
        let mut done = 0;
        while done < data.len() {
            let at = self.pos(offset + done);
            let n = (self.quantum - at.off).min(data.len() - done);
            let quantum = self.quantum_mut(at).expect("populate allocated every quantum of the range");
            quantum[at.off..at.off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.size = self.size.max(end);
        Ok(data.len())
    }

    /// Reads up to `buf.len()` bytes at `offset`: fewer when the data ends first, 0 at or
    /// past [`size`](Self::size). Parts never written (holes, and the unwritten parts of a
    /// quantum) read as zeros. Allocates nothing.
    ///
    /// # Errors
    /// None today; the `Result` keeps the shape of a file operation's read.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<usize, ScullError> {
        if offset >= self.size {
            return Ok(0);
        }
        let len = buf.len().min(self.size - offset);
        let mut done = 0;
        while done < len {
            let at = self.pos(offset + done);
            let n = (self.quantum - at.off).min(len - done);
            let out = &mut buf[done..done + n];
            match self.quantum_ref(at) {
                Some(q) => out.copy_from_slice(&q[at.off..at.off + n]),
                None => out.fill(0),
            }
            done += n;
        }
        Ok(len)
    }

    /// LDD's `scullv_read`: reads at most to the end of the quantum holding `offset` (and
    /// of the data), and returns 0 — like end of file — when that quantum was never written
    /// ("don't fill holes"). Loop on it as a file reader would.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_quantum(&self, offset: usize, buf: &mut [u8]) -> Result<usize, ScullError> {
        if offset >= self.size {
            return Ok(0);
        }
        let at = self.pos(offset);
        let Some(q) = self.quantum_ref(at) else { return Ok(0) };
        let n = buf.len().min(self.size - offset).min(self.quantum - at.off);
        buf[..n].copy_from_slice(&q[at.off..at.off + n]);
        Ok(n)
    }

    /// LDD's `scullv_write`: writes at most to the end of the quantum holding `offset`, so it
    /// allocates at most one quantum (and its set), and returns how much it wrote.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub fn write_quantum(&mut self, offset: usize, data: &[u8]) -> Result<usize, ScullError> {
        let n = data.len().min(self.quantum - offset % self.quantum);
        self.write(offset, &data[..n])
    }

    /// LDD's `scullv_trim`: frees every quantum (vfree) and every quantum-set array (slab)
    /// and empties the device. Allocation counters are kept.
    pub fn trim(&mut self) {
        let data = core::mem::take(&mut self.data);
        for set in data.into_iter().flatten() {
            for quantum in set.into_iter().flatten() {
                self.free_quantum(quantum);
            }
        }
        self.size = 0;
        self.quanta = 0;
        self.arrays = 0;
    }

    fn pos(&self, offset: usize) -> Pos {
        let q = offset / self.quantum;
        Pos { item: q / self.qset, slot: q % self.qset, off: offset % self.quantum }
    }

    fn quantum_ptr(&self, at: Pos) -> Option<NonNull<u8>> {
        *self.data.get(at.item)?.as_ref()?.get(at.slot)?
    }

    fn quantum_ref(&self, at: Pos) -> Option<&[u8]> {
        let q = self.quantum_ptr(at)?;
        // SAFETY: a quantum in the table is `self.quantum` bytes from the allocator, owned by
        // this device until trim (the `QuantumAlloc` contract); the shared borrow of `self`
        // keeps every writer out for the slice's life.
        Some(unsafe { core::slice::from_raw_parts(q.as_ptr(), self.quantum) })
    }

    fn quantum_mut(&mut self, at: Pos) -> Option<&mut [u8]> {
        let q = self.quantum_ptr(at)?;
        // SAFETY: as in `quantum_ref`, and the exclusive borrow of `self` makes this the only
        // access to the quantum for the slice's life.
        Some(unsafe { core::slice::from_raw_parts_mut(q.as_ptr(), self.quantum) })
    }

    fn free_quantum(&mut self, quantum: NonNull<u8>) {
        // SAFETY: every pointer the device frees came from `self.alloc.alloc(self.quantum)`
        // and was taken out of the table (or never put in it) first, so it is freed once
        // and never used again.
        if unsafe { self.alloc.free(quantum, self.quantum) }.is_err() {
            self.free_errors += 1;
        }
    }

    /// A new quantum-set array, all `None`, from the slab.
    fn new_array(&mut self) -> Result<QSet, ScullError> {
        #[cfg(test)]
        if let Some(n) = self.arrays_before_failure.as_mut() {
            if *n == 0 {
                return Err(ScullError::NoMemory);
            }
            *n -= 1;
        }
        let mut set = Vec::new();
        set.try_reserve_exact(self.qset).map_err(|_| ScullError::NoMemory)?;
        set.resize(self.qset, None);
        Ok(set)
    }

    /// The slots of item `item` that the byte range `[first, last]` of quanta covers.
    fn slots(&self, item: usize, first: usize, last: usize) -> core::ops::RangeInclusive<usize> {
        let lo = if item == first / self.qset { first % self.qset } else { 0 };
        let hi = if item == last / self.qset { last % self.qset } else { self.qset - 1 };
        lo..=hi
    }

    /// Makes every quantum of `[start, end)` exist, all or nothing: first every allocation
    /// (arrays, quanta, room in the list), then — only when all succeeded — installs them,
    /// which cannot fail. On error everything allocated here is freed and the device is
    /// untouched.
    fn populate(&mut self, start: usize, end: usize) -> Result<(), ScullError> {
        let (first, last) = (start / self.quantum, (end - 1) / self.quantum);
        let items = first / self.qset..=last / self.qset;

        // 1. What is missing.
        let (mut missing_arrays, mut missing_quanta) = (0, 0);
        for item in items.clone() {
            let slots = self.slots(item, first, last);
            match self.data.get(item).and_then(Option::as_ref) {
                None => {
                    missing_arrays += 1;
                    missing_quanta += slots.count();
                }
                Some(set) => missing_quanta += set[slots].iter().filter(|q| q.is_none()).count(),
            }
        }
        let list_growth = (last / self.qset + 1).saturating_sub(self.data.len());
        if missing_arrays == 0 && missing_quanta == 0 && list_growth == 0 {
            return Ok(());
        }

        // 2. Allocate, installing nothing yet. Dropping `arrays` gives them back to the slab.
        let mut arrays = Vec::new();
        arrays.try_reserve_exact(missing_arrays).map_err(|_| ScullError::NoMemory)?;
        for _ in 0..missing_arrays {
            arrays.push(self.new_array()?);
        }
        let mut quanta = Vec::new();
        quanta.try_reserve_exact(missing_quanta).map_err(|_| ScullError::NoMemory)?;
        let mut failure = None;
        for _ in 0..missing_quanta {
            match self.alloc.alloc(self.quantum) {
                Ok(q) => quanta.push(q),
                Err(e) => {
                    failure = Some(ScullError::Quantum(e));
                    break;
                }
            }
        }
        self.total_allocs += quanta.len() as u64;
        if failure.is_none() && self.data.try_reserve(list_growth).is_err() {
            failure = Some(ScullError::NoMemory);
        }
        if let Some(e) = failure {
            if matches!(e, ScullError::Quantum(_)) {
                self.failed_allocs += 1;
            }
            for q in quanta {
                self.free_quantum(q);
            }
            return Err(e);
        }

        // 3. Install: no allocation below (the list has room reserved).
        if list_growth > 0 {
            self.data.resize_with(last / self.qset + 1, || None);
        }
        self.arrays += arrays.len();
        self.quanta += quanta.len();
        // In allocation order, so quanta at higher offsets usually sit at higher addresses.
        let (mut arrays, mut quanta) = (arrays.into_iter(), quanta.into_iter());
        for item in items {
            let slots = self.slots(item, first, last);
            let set = self.data[item].get_or_insert_with(|| arrays.next().expect("one array per missing item"));
            for slot in &mut set[slots] {
                if slot.is_none() {
                    *slot = Some(quanta.next().expect("one quantum per missing slot"));
                }
            }
        }
        debug_assert!(arrays.next().is_none() && quanta.next().is_none());
        Ok(())
    }
}

impl<A: QuantumAlloc> Drop for ScullV<A> {
    fn drop(&mut self) {
        self.trim();
    }
}

impl<A: QuantumAlloc> fmt::Debug for ScullV<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScullV")
            .field("order", &self.order)
            .field("qset", &self.qset)
            .field("stats", &self.stats())
            .finish()
    }
}
