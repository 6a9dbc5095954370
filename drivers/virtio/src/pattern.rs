//! Test data for the disk: a reproducible pattern per sector, extents spread across the
//! disk, and the stamp a boot leaves in sector 0 so the next boot can find and verify its
//! data.
//!
//! Every sector's contents depend on the seed and on the sector number (its first word *is*
//! the sector number), so a verify failure tells a lost write (old data), a misplaced one
//! (another sector's number) and corruption apart.

use core::fmt;

use crate::blk::SECTOR_SIZE;

/// A fast, seedable generator (splitmix64): the tests' only source of randomness, so a run
/// is replayed exactly by giving its seed back (`seed=` boot parameter).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `0..bound` (`bound > 0`; the modulo bias is irrelevant for tests).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// splitmix64's finaliser: a bijective 64-bit hash.
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` (whole sectors) with the pattern of `seed` for the sectors from `first`.
///
/// # Panics
/// When `buf` is not a whole number of sectors.
pub fn fill(seed: u64, first: u64, buf: &mut [u8]) {
    assert_eq!(buf.len() % SECTOR_SIZE, 0, "pattern: not whole sectors");
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let n = first + i as u64;
        let mut g = SplitMix64::new(mix(seed ^ n.rotate_left(32)));
        for (w, word) in sector.chunks_exact_mut(8).enumerate() {
            let v = match w {
                0 => n,
                1 => seed,
                _ => g.next_u64(),
            };
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Where a buffer differs from the pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The sector that differs.
    pub sector: u64,
    /// The first differing byte in it.
    pub offset: usize,
    /// The sector number the data claims to be (its first word): the sector itself for a
    /// corrupted sector, another one for a misplaced write, anything for one never written.
    pub claims: u64,
    /// The seed the data claims to be from (its second word).
    pub claims_seed: u64,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sector {} differs at byte {} (it holds sector {} of seed {:#x})",
            self.sector, self.offset, self.claims, self.claims_seed
        )
    }
}

/// Checks `buf` (whole sectors) against the pattern of `seed` from sector `first`.
///
/// # Errors
/// The first sector that differs.
pub fn check(seed: u64, first: u64, buf: &[u8]) -> Result<(), Mismatch> {
    let mut want = [0u8; SECTOR_SIZE];
    for (i, sector) in buf.chunks_exact(SECTOR_SIZE).enumerate() {
        let n = first + i as u64;
        fill(seed, n, &mut want);
        if let Some(offset) = sector.iter().zip(want.iter()).position(|(a, b)| a != b) {
            let word = |k: usize| u64::from_le_bytes(sector[k * 8..k * 8 + 8].try_into().unwrap_or([0; 8]));
            return Err(Mismatch { sector: n, offset, claims: word(0), claims_seed: word(1) });
        }
    }
    Ok(())
}

/// `count` extents of `len` sectors spread evenly across a disk of `capacity` sectors,
/// sector 0 left out (the stamp's). `lane` picks one of several disjoint sets: extent `i`
/// of lane `l` starts at `1 + i * stride + l * len`, `stride = (capacity - 1) / count`.
/// The last extent ends within the last stride, so the set reaches the end of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    /// Extents in the set.
    pub count: u64,
    /// Sectors per extent.
    pub len: u64,
    /// Distance between the starts of two extents of one lane.
    pub stride: u64,
    /// Which lane.
    pub lane: u64,
}

impl Spread {
    /// The set, or `None` when the disk is too small for `lane + 1` lanes of `count` extents.
    pub fn new(capacity: u64, count: u64, len: u64, lane: u64) -> Option<Self> {
        if count == 0 || len == 0 {
            return None;
        }
        let stride = capacity.checked_sub(1)? / count;
        if (lane + 1).checked_mul(len)? > stride {
            return None;
        }
        Some(Self { count, len, stride, lane })
    }

    /// The first sector of extent `i`.
    pub fn start(&self, i: u64) -> u64 {
        1 + i * self.stride + self.lane * self.len
    }

    /// The first sectors of all extents.
    pub fn starts(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).map(|i| self.start(i))
    }

    /// Bytes in all extents.
    pub fn bytes(&self) -> u64 {
        self.count * self.len * SECTOR_SIZE as u64
    }
}

/// What a boot leaves in sector 0: enough for the next boot to regenerate and verify the
/// extents it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The pattern's seed.
    pub seed: u64,
    /// The capacity of the disk when written (a different disk is not "our data").
    pub capacity: u64,
    /// Which boot wrote it (counts up across boots on one image).
    pub generation: u64,
    /// The extents.
    pub spread: Spread,
}

/// Sector 0's magic for a [`Stamp`].
pub const STAMP_MAGIC: [u8; 8] = *b"VIRTIOst";
const STAMP_VERSION: u32 = 1;

/// Why sector 0 holds no valid stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampError {
    /// No magic: nothing was ever stamped (a fresh image).
    NoStamp,
    /// Magic but an unknown layout version.
    Version(u32),
    /// Magic but a bad checksum: sector 0 was damaged.
    Checksum,
    /// An impossible extent layout.
    Layout,
}

impl fmt::Display for StampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StampError::NoStamp => f.write_str("no stamp in sector 0 (fresh disk)"),
            StampError::Version(v) => write!(f, "stamp of unknown version {v}"),
            StampError::Checksum => f.write_str("stamp checksum mismatch (sector 0 damaged)"),
            StampError::Layout => f.write_str("stamp describes an impossible layout"),
        }
    }
}

impl core::error::Error for StampError {}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Stamp {
    /// Sector 0's contents.
    pub fn encode(&self) -> [u8; SECTOR_SIZE] {
        let mut s = [0u8; SECTOR_SIZE];
        s[..8].copy_from_slice(&STAMP_MAGIC);
        s[8..12].copy_from_slice(&STAMP_VERSION.to_le_bytes());
        let words = [
            self.seed,
            self.capacity,
            self.generation,
            self.spread.count,
            self.spread.len,
            self.spread.stride,
            self.spread.lane,
        ];
        for (i, w) in words.iter().enumerate() {
            s[16 + i * 8..24 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        let sum = fnv1a(&s[..SECTOR_SIZE - 8]);
        s[SECTOR_SIZE - 8..].copy_from_slice(&sum.to_le_bytes());
        s
    }

    /// Reads sector 0's contents.
    ///
    /// # Errors
    /// A [`StampError`] saying why they are not a valid stamp.
    pub fn decode(s: &[u8; SECTOR_SIZE]) -> Result<Self, StampError> {
        if s[..8] != STAMP_MAGIC {
            return Err(StampError::NoStamp);
        }
        let word = |i: usize| u64::from_le_bytes(s[16 + i * 8..24 + i * 8].try_into().unwrap_or([0; 8]));
        let version = u32::from_le_bytes(s[8..12].try_into().unwrap_or([0; 4]));
        if version != STAMP_VERSION {
            return Err(StampError::Version(version));
        }
        let sum = u64::from_le_bytes(s[SECTOR_SIZE - 8..].try_into().unwrap_or([0; 8]));
        if sum != fnv1a(&s[..SECTOR_SIZE - 8]) {
            return Err(StampError::Checksum);
        }
        let (seed, capacity, generation) = (word(0), word(1), word(2));
        let spread = Spread::new(capacity, word(3), word(4), word(6)).ok_or(StampError::Layout)?;
        if spread.stride != word(5) {
            return Err(StampError::Layout);
        }
        Ok(Self { seed, capacity, generation, spread })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trips_and_names_the_bad_sector() {
        let mut buf = [0u8; 4 * SECTOR_SIZE];
        fill(7, 100, &mut buf);
        assert_eq!(check(7, 100, &buf), Ok(()));
        assert!(check(8, 100, &buf).is_err(), "another seed");
        let e = check(7, 101, &buf).unwrap_err();
        assert_eq!((e.sector, e.offset, e.claims), (101, 0, 100), "shifted: sector 101 holds 100's data");
        buf[2 * SECTOR_SIZE + 300] ^= 1;
        let e = check(7, 100, &buf).unwrap_err();
        assert_eq!((e.sector, e.offset, e.claims, e.claims_seed), (102, 300, 102, 7));
    }

    #[test]
    fn sectors_differ_from_each_other() {
        let mut buf = [0u8; 2 * SECTOR_SIZE];
        fill(1, 0, &mut buf);
        assert_ne!(buf[16..SECTOR_SIZE], buf[SECTOR_SIZE + 16..]);
    }

    #[test]
    fn spread_reaches_the_end_and_lanes_are_disjoint() {
        let cap = 131_072;
        let a = Spread::new(cap, 64, 128, 0).unwrap();
        let b = Spread::new(cap, 64, 128, 1).unwrap();
        let last_end = a.start(63) + a.len;
        assert!(last_end <= cap && cap - last_end < a.stride, "{last_end} of {cap}");
        for i in 0..64 {
            assert_eq!(b.start(i), a.start(i) + 128);
            assert!(b.start(i) + b.len <= a.start(i) + a.stride);
        }
        assert_eq!(a.bytes(), 4 << 20);
        assert_eq!(a.start(0), 1, "sector 0 is the stamp's");
        assert!(Spread::new(cap, 64, 128, 14).is_some());
        assert!(Spread::new(cap, 64, 128, 15).is_none(), "16 lanes of 128 do not fit a 2047-sector stride");
        assert!(Spread::new(0, 1, 1, 0).is_none());
        assert!(Spread::new(100, 0, 1, 0).is_none());
    }

    #[test]
    fn stamp_round_trips_and_damage_is_seen() {
        let spread = Spread::new(1 << 17, 64, 128, 0).unwrap();
        let st = Stamp { seed: 0xdead_beef, capacity: 1 << 17, generation: 3, spread };
        let mut s = st.encode();
        assert_eq!(Stamp::decode(&s), Ok(st));
        s[40] ^= 1;
        assert_eq!(Stamp::decode(&s), Err(StampError::Checksum));
        assert_eq!(Stamp::decode(&[0; SECTOR_SIZE]), Err(StampError::NoStamp));
    }

    #[test]
    fn splitmix_is_reproducible() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert!(a.below(10) < 10);
    }
}
