//! The boot report's demonstration: write a pattern, read it back, checksum, trim.

use alloc::vec::Vec;

use crate::{QuantumAlloc, ScullError, ScullV, DEFAULT_ORDER, DEFAULT_QSET};

/// Write chunk size: not a divisor of any quantum, so writes straddle quantum boundaries.
const WRITE_CHUNK: usize = 3000;
/// Read chunk size: different from the write chunk, so reads straddle them differently.
const READ_CHUNK: usize = 5000;

/// What [`demo`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemoReport {
    /// Bytes written and read back.
    pub bytes: usize,
    /// Bytes per quantum.
    pub quantum_size: usize,
    /// Quanta the data took (vmalloc areas), before the trim.
    pub quanta: usize,
    /// Quantum-set arrays the data took (slab), before the trim.
    pub qset_arrays: usize,
    /// FNV-1a (64-bit) of the data, equal when written and when read back.
    pub checksum: u64,
}

/// The byte the demo writes at `offset`: a SplitMix64 stream, so every quantum differs.
pub(crate) fn pattern(offset: usize) -> u8 {
    (splitmix((offset / 8) as u64) >> ((offset % 8) * 8)) as u8
}

/// The SplitMix64 output for word `index` of the pattern.
pub(crate) fn splitmix(index: u64) -> u64 {
    let mut z = index.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern from `offset` on: [`pattern`] a word at a time (one
/// SplitMix64 step per 8 bytes, not per byte), the same bytes.
pub(crate) fn fill_pattern(buf: &mut [u8], offset: usize) {
    let end = offset + buf.len();
    let mut at = 0;
    while at < buf.len() && !(offset + at).is_multiple_of(8) {
        buf[at] = pattern(offset + at);
        at += 1;
    }
    let mut words = buf[at..].chunks_exact_mut(8);
    for (i, word) in (&mut words).enumerate() {
        let word_index = (offset + at) / 8 + i;
        word.copy_from_slice(&splitmix(word_index as u64).to_le_bytes());
    }
    let tail = words.into_remainder();
    let tail_offset = end - tail.len();
    for (i, b) in tail.iter_mut().enumerate() {
        *b = pattern(tail_offset + i);
    }
}

/// The index of the first byte of `got` that differs from the pattern at `offset`, if any:
/// compared 256 bytes at a time against [`fill_pattern`]'s output.
pub(crate) fn first_mismatch(got: &[u8], offset: usize) -> Option<usize> {
    let mut want = [0u8; 256];
    for (k, chunk) in got.chunks(want.len()).enumerate() {
        let at = k * want.len();
        let want = &mut want[..chunk.len()];
        fill_pattern(want, offset + at);
        if chunk != &want[..] {
            return chunk.iter().zip(want.iter()).position(|(a, b)| a != b).map(|i| at + i);
        }
    }
    None
}

/// FNV-1a over `bytes`, continuing from `hash`.
pub(crate) fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a's starting value.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The checksum [`demo`] reports for `bytes` bytes, computed without a device (to check a
/// report against).
pub fn expected_checksum(bytes: usize) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut chunk = [0u8; 256];
    let mut offset = 0;
    while offset < bytes {
        let n = chunk.len().min(bytes - offset);
        fill_pattern(&mut chunk[..n], offset);
        hash = fnv1a(hash, &chunk[..n]);
        offset += n;
    }
    hash
}

/// Creates a scullv device with the defaults (64 KiB vmalloc quanta, sets of 500), writes
/// `megabytes` MiB of a pattern in 3000-byte writes, reads it back in 5000-byte reads,
/// checks every byte and the checksum, and trims: on return every quantum has been
/// `vfree`d (their virtual ranges may wait for the next lazy purge).
///
/// # Errors
/// [`ScullError::Overflow`] or [`ScullError::TooLarge`] for a size that does not fit,
/// an allocation error (the device is dropped, so nothing stays allocated), or
/// [`ScullError::Mismatch`] if the data read back differs.
pub fn demo(megabytes: usize) -> Result<DemoReport, ScullError> {
    let mut dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET)?;
    demo_on(&mut dev, megabytes)
}

/// [`demo`] on a device of the caller's (any geometry or allocator). The device is trimmed
/// before and after.
///
/// # Errors
/// As [`demo`].
pub fn demo_on<A: QuantumAlloc>(dev: &mut ScullV<A>, megabytes: usize) -> Result<DemoReport, ScullError> {
    let bytes = megabytes.checked_mul(1 << 20).ok_or(ScullError::Overflow)?;
    demo_bytes_on(dev, bytes)
}

/// [`demo_on`] with the length in bytes: the tests under Miri, where every byte costs
/// microseconds, write a few quanta rather than megabytes.
pub(crate) fn demo_bytes_on<A: QuantumAlloc>(dev: &mut ScullV<A>, bytes: usize) -> Result<DemoReport, ScullError> {
    if bytes > dev.max_size() {
        return Err(ScullError::TooLarge);
    }
    dev.trim();
    let result = write_and_verify(dev, bytes);
    dev.trim();
    result
}

fn write_and_verify<A: QuantumAlloc>(dev: &mut ScullV<A>, bytes: usize) -> Result<DemoReport, ScullError> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(WRITE_CHUNK.max(READ_CHUNK)).map_err(|_| ScullError::NoMemory)?;
    buf.resize(WRITE_CHUNK.max(READ_CHUNK), 0u8);

    let mut written = FNV_OFFSET;
    let mut offset = 0;
    while offset < bytes {
        let chunk = &mut buf[..WRITE_CHUNK.min(bytes - offset)];
        fill_pattern(chunk, offset);
        written = fnv1a(written, chunk);
        offset += dev.write(offset, chunk)?;
    }
    let stats = dev.stats();

    let mut read = FNV_OFFSET;
    let mut offset = 0;
    while offset < bytes {
        let n = dev.read(offset, &mut buf[..READ_CHUNK])?;
        if n == 0 {
            return Err(ScullError::Mismatch { offset });
        }
        if let Some(i) = first_mismatch(&buf[..n], offset) {
            return Err(ScullError::Mismatch { offset: offset + i });
        }
        read = fnv1a(read, &buf[..n]);
        offset += n;
    }
    if read != written {
        return Err(ScullError::Mismatch { offset: 0 });
    }
    Ok(DemoReport {
        bytes,
        quantum_size: stats.quantum_size,
        quanta: stats.quanta,
        qset_arrays: stats.qset_arrays,
        checksum: read,
    })
}
