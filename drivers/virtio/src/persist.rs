//! Data that survives a reboot: a boot writes patterned extents across the disk and a
//! [`Stamp`] in sector 0; the next boot reads the stamp, regenerates the pattern and checks
//! every extent ("nothing lost").

use alloc::vec;
use core::fmt;

use crate::blk::{Blk, BlkError, SECTOR_SIZE};
use crate::pattern::{self, Mismatch, Spread, Stamp, StampError};

/// Why the previous boot's data could not be confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistError {
    /// I/O failed.
    Blk(BlkError),
    /// Sector 0 holds no valid stamp.
    Stamp(StampError),
    /// The stamp is from a disk of another size.
    OtherDisk {
        /// Capacity in the stamp.
        stamped: u64,
        /// This disk's.
        capacity: u64,
    },
    /// Data differs from what the stamp says was written.
    Lost(Mismatch),
    /// The disk is too small for any layout.
    TooSmall(u64),
}

impl fmt::Display for PersistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersistError::Blk(e) => write!(f, "{e}"),
            PersistError::Stamp(e) => write!(f, "{e}"),
            PersistError::OtherDisk { stamped, capacity } => {
                write!(f, "stamp is for a disk of {stamped} sectors, this one has {capacity}")
            }
            PersistError::Lost(m) => write!(f, "DATA LOST: {m}"),
            PersistError::TooSmall(c) => write!(f, "disk of {c} sectors too small for the test layout"),
        }
    }
}

impl core::error::Error for PersistError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            PersistError::Blk(e) => Some(e),
            PersistError::Stamp(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BlkError> for PersistError {
    fn from(e: BlkError) -> Self {
        PersistError::Blk(e)
    }
}

/// The extents a boot stamps on a disk of `capacity` sectors: 64 × 64 KiB (4 MiB) when it
/// fits, fewer or smaller on a small disk. `lane` as in [`Spread`].
pub fn layout(capacity: u64, lane: u64) -> Option<Spread> {
    [(64, 128), (64, 16), (16, 8), (4, 1), (1, 1)].iter().find_map(|&(n, len)| Spread::new(capacity, n, len, lane))
}

/// Writes the pattern of `seed` to every extent of `spread`, reads it back and checks it,
/// then stamps sector 0 (last, so a stamp never describes data not yet written) and flushes.
///
/// # Errors
/// [`PersistError::Blk`], or [`PersistError::Lost`] when the read-back differs.
pub fn write_stamped(blk: &mut Blk, seed: u64, generation: u64, spread: Spread) -> Result<Stamp, PersistError> {
    let mut buf = vec![0u8; spread.len as usize * SECTOR_SIZE];
    let mut back = vec![0u8; buf.len()];
    for start in spread.starts() {
        pattern::fill(seed, start, &mut buf);
        blk.write(start, &buf)?;
        blk.read(start, &mut back)?;
        pattern::check(seed, start, &back).map_err(PersistError::Lost)?;
    }
    let stamp = Stamp { seed, capacity: blk.capacity(), generation, spread };
    blk.write(0, &stamp.encode())?;
    blk.flush()?;
    Ok(stamp)
}

/// Reads the stamp in sector 0 and checks every extent it names.
///
/// # Errors
/// [`PersistError`]: no stamp, another disk, I/O, or data lost.
pub fn verify_stamped(blk: &mut Blk) -> Result<Stamp, PersistError> {
    let mut s = [0u8; SECTOR_SIZE];
    blk.read(0, &mut s)?;
    let stamp = Stamp::decode(&s).map_err(PersistError::Stamp)?;
    if stamp.capacity != blk.capacity() {
        return Err(PersistError::OtherDisk { stamped: stamp.capacity, capacity: blk.capacity() });
    }
    let mut buf = vec![0u8; stamp.spread.len as usize * SECTOR_SIZE];
    for start in stamp.spread.starts() {
        blk.read(start, &mut buf)?;
        pattern::check(stamp.seed, start, &buf).map_err(PersistError::Lost)?;
    }
    Ok(stamp)
}
