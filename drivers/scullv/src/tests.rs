//! Host tests of the bookkeeping, with a heap-backed quantum allocator that counts every
//! quantum and fails on demand.

use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::demo::{demo_bytes_on, fill_pattern, first_mismatch, fnv1a, pattern, FNV_OFFSET};

#[derive(Default)]
struct MockState {
    /// Live quanta: address → size.
    live: HashMap<usize, usize>,
    allocs: usize,
    frees: usize,
    /// Successful allocations left before every allocation fails (`None`: never fail).
    fail_after: Option<usize>,
}

/// A quantum allocator over the host heap, shared with the test through an `Rc`.
#[derive(Clone, Default)]
struct Mock(Rc<RefCell<MockState>>);

impl Mock {
    fn live(&self) -> usize {
        self.0.borrow().live.len()
    }
    fn fail_after(&self, n: Option<usize>) {
        self.0.borrow_mut().fail_after = n;
    }
}

// SAFETY: `alloc_zeroed` gives `bytes` fresh zeroed bytes owned by the caller until
// `dealloc`, which only `free` calls (for a pointer it handed out, with its layout).
unsafe impl QuantumAlloc for Mock {
    fn alloc(&mut self, bytes: usize) -> Result<NonNull<u8>, VmallocError> {
        let mut s = self.0.borrow_mut();
        assert!(bytes > 0 && bytes.is_multiple_of(PAGE_SIZE), "quantum of {bytes} bytes");
        if let Some(n) = s.fail_after.as_mut() {
            if *n == 0 {
                return Err(VmallocError::NoFrames);
            }
            *n -= 1;
        }
        let layout = Layout::from_size_align(bytes, PAGE_SIZE).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(VmallocError::NoFrames)?;
        s.live.insert(p.as_ptr() as usize, bytes);
        s.allocs += 1;
        Ok(p)
    }

    unsafe fn free(&mut self, ptr: NonNull<u8>, bytes: usize) -> Result<(), VmallocError> {
        let mut s = self.0.borrow_mut();
        match s.live.remove(&(ptr.as_ptr() as usize)) {
            Some(size) => {
                assert_eq!(size, bytes, "freed with another size than allocated");
                // SAFETY: allocated above with this layout, and removed from `live` so freed once.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), Layout::from_size_align(bytes, PAGE_SIZE).unwrap()) };
                s.frees += 1;
                Ok(())
            }
            None => Err(VmallocError::NotAnArea),
        }
    }
}

const Q: usize = PAGE_SIZE; // order-0 quantum

fn device(order: u32, qset: usize) -> (ScullV<Mock>, Mock) {
    let mock = Mock::default();
    (ScullV::with_alloc(order, qset, mock.clone()).unwrap(), mock)
}

/// Offsets into the source pattern that [`bytes`] starts at: a prime, so neighbouring seeds
/// give unrelated bytes.
const SEED_STRIDE: usize = 4099;

/// The period of [`bytes`]' output: a prime, so no power-of-two shift (a quantum, a set)
/// maps the bytes onto themselves and a misplaced quantum still reads back wrong.
const PERIOD: usize = 8191;

/// `len` nonzero test bytes that differ from seed to seed: a window of `PERIOD` bytes of
/// one precomputed source, starting at `seed`'s offset into it, repeated. Copying the
/// window is one `memcpy` a period, which Miri runs natively; patterning every write byte
/// by byte was most of the model tests' time under Miri. The source is made once per
/// process (tests run on threads of their own) and is small: each byte made costs Miri
/// a millisecond under Tree Borrows, where a 128 KiB source took a minute.
fn bytes(seed: usize, len: usize) -> Vec<u8> {
    static SOURCE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        let mut v = vec![0; SEED_STRIDE + PERIOD];
        for (i, w) in v.chunks_mut(8).enumerate() {
            // Each byte's low bit set: no byte is zero, so a read of fresh memory shows.
            let word = (crate::demo::splitmix(i as u64) | 0x0101_0101_0101_0101).to_ne_bytes();
            w.copy_from_slice(&word[..w.len()]);
        }
        v
    });
    let start = (seed * 7919) % SEED_STRIDE;
    let window = &source[start..start + PERIOD];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(PERIOD);
        out.extend_from_slice(&window[..n]);
    }
    out
}

#[test]
fn fill_pattern_gives_the_pattern_at_any_offset_and_length() {
    for offset in [0, 1, 7, 8, 13] {
        for len in [0, 1, 7, 8, 9, 30] {
            let mut v = vec![0; len];
            fill_pattern(&mut v, offset);
            let want: Vec<u8> = (offset..offset + len).map(pattern).collect();
            assert_eq!(v, want, "offset {offset}, len {len}");
        }
    }
}

#[test]
fn first_mismatch_names_the_first_byte_off_the_pattern() {
    let mut v = vec![0; 1000];
    fill_pattern(&mut v, 5);
    assert_eq!(first_mismatch(&v, 5), None);
    assert_eq!(first_mismatch(&v, 6), Some(0), "another offset: another pattern");
    for at in [0, 255, 256, 700, 999] {
        let mut w = v.clone();
        w[at] ^= 0x40;
        assert_eq!(first_mismatch(&w, 5), Some(at));
    }
}

fn read_all<A: QuantumAlloc>(dev: &ScullV<A>) -> Vec<u8> {
    let mut out = vec![0xaa; dev.size() + 100];
    let n = dev.read(0, &mut out).unwrap();
    assert_eq!(n, dev.size());
    out.truncate(n);
    out
}

#[test]
fn geometry_defaults_and_limits() {
    let dev = ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap();
    assert_eq!(dev.quantum_size(), 64 * 1024);
    assert_eq!((dev.order(), dev.qset(), dev.size()), (4, 500, 0));
    assert_eq!(dev.stats().quanta, 0);
    assert_eq!(ScullV::new(MAX_ORDER + 1, 10).err(), Some(ScullError::BadGeometry));
    assert_eq!(ScullV::new(0, 0).err(), Some(ScullError::BadGeometry));
    assert_eq!(ScullV::new(0, MAX_QSET + 1).err(), Some(ScullError::BadGeometry));
    assert!(ScullV::new(MAX_ORDER, MAX_QSET).is_ok());
}

#[test]
fn write_and_read_within_one_quantum() {
    let (mut dev, mock) = device(0, 4);
    assert_eq!(dev.write(10, b"hello"), Ok(5));
    assert_eq!(dev.size(), 15);
    let mut buf = [0xffu8; 15];
    assert_eq!(dev.read(0, &mut buf), Ok(15));
    assert_eq!(&buf, b"\0\0\0\0\0\0\0\0\0\0hello");
    let s = dev.stats();
    assert_eq!((s.quanta, s.qset_arrays, s.quantum_bytes, s.array_bytes), (1, 1, Q, 4 * 8));
    assert_eq!(mock.live(), 1);
    // Overwrite in place: no new allocation.
    dev.write(11, b"EL").unwrap();
    assert_eq!(dev.read(10, &mut buf[..5]), Ok(5));
    assert_eq!(&buf[..5], b"hELlo");
    assert_eq!(mock.0.borrow().allocs, 1);
}

#[test]
fn write_and_read_across_quantum_and_qset_boundaries() {
    // 4 KiB quanta, 3 per set: a set covers 12 KiB.
    let (mut dev, mock) = device(0, 3);
    let data = bytes(1, 10 * Q + 123);
    let offset = Q - 7; // starts 7 bytes before the end of quantum 0
    assert_eq!(dev.write(offset, &data), Ok(data.len()));
    let end = offset + data.len();
    assert_eq!(dev.size(), end);
    let quanta = (end - 1) / Q - offset / Q + 1;
    let s = dev.stats();
    assert_eq!(s.quanta, quanta);
    assert_eq!(s.qset_arrays, (end - 1) / (3 * Q) + 1);
    assert_eq!(mock.live(), quanta);
    let all = read_all(&dev);
    assert!(all[..offset].iter().all(|&b| b == 0));
    assert_eq!(&all[offset..], &data[..]);
    // Reads of every alignment across the boundaries.
    for (at, len) in [(Q - 1, 2), (3 * Q - 5, 10), (2 * Q, 3 * Q), (offset + 1, data.len() - 1)] {
        let mut buf = vec![0; len];
        assert_eq!(dev.read(at, &mut buf), Ok(len));
        assert_eq!(&buf[..], &all[at..at + len], "read({at}, {len})");
    }
}

#[test]
fn sparse_writes_allocate_only_what_is_written() {
    let (mut dev, mock) = device(0, 64);
    dev.write(0, b"head").unwrap();
    let far = (1 << 30) + 5;
    dev.write(far, b"tail").unwrap();
    assert_eq!(dev.size(), far + 4);
    let s = dev.stats();
    assert_eq!((s.quanta, s.qset_arrays), (2, 2));
    assert_eq!(mock.live(), 2);
    assert!(dev.is_allocated(0) && dev.is_allocated(far) && !dev.is_allocated(Q));
    assert_eq!(dev.addr_of(Q), None);
    let tail = dev.addr_of(far + 3).unwrap();
    assert_eq!(mock.0.borrow().live.get(&(tail.as_ptr() as usize - (far + 3) % Q)), Some(&Q));
    // SAFETY: the byte is inside a live quantum of `dev`, which is not borrowed now.
    assert_eq!(unsafe { tail.as_ptr().read() }, b'l');
    // The hole reads as zeros with `read`...
    let mut buf = vec![0xee; 3 * Q];
    assert_eq!(dev.read(far - 2 * Q, &mut buf), Ok(2 * Q + 4), "short: the data ends first");
    assert!(buf[..2 * Q].iter().all(|&b| b == 0));
    assert_eq!(&buf[2 * Q..2 * Q + 4], b"tail");
    // ...and is a 0-byte read with LDD's per-quantum semantics.
    assert_eq!(dev.read_quantum(Q, &mut buf), Ok(0));
    assert_eq!(dev.read_quantum(far - 2, &mut buf[..8]), Ok(6));
    assert_eq!(&buf[..6], b"\0\0tail");
}

#[test]
fn reads_past_the_end_are_short_or_empty() {
    let (mut dev, _mock) = device(0, 2);
    let mut buf = [0u8; 64];
    assert_eq!(dev.read(0, &mut buf), Ok(0), "empty device");
    dev.write(0, &[7; 100]).unwrap();
    assert_eq!(dev.read(90, &mut buf), Ok(10));
    assert_eq!(dev.read(100, &mut buf), Ok(0));
    assert_eq!(dev.read(usize::MAX, &mut buf), Ok(0));
    assert_eq!(dev.read(0, &mut []), Ok(0));
}

#[test]
fn per_quantum_calls_stop_at_the_quantum_end() {
    let (mut dev, mock) = device(0, 2);
    let data = bytes(2, 3 * Q);
    assert_eq!(dev.write_quantum(Q - 10, &data), Ok(10));
    assert_eq!(mock.live(), 1);
    assert_eq!(dev.write_quantum(Q, &data[10..]), Ok(Q));
    assert_eq!(dev.size(), 2 * Q);
    let mut buf = vec![0; 3 * Q];
    assert_eq!(dev.read_quantum(Q - 10, &mut buf), Ok(10));
    assert_eq!(&buf[..10], &data[..10]);
    assert_eq!(dev.read_quantum(Q + 1, &mut buf), Ok(Q - 1));
    assert_eq!(&buf[..Q - 1], &data[11..Q + 10]);
    assert_eq!(dev.read_quantum(2 * Q, &mut buf), Ok(0));
    assert_eq!(dev.write_quantum(5, &[]), Ok(0));
}

#[test]
fn zero_length_write_does_nothing() {
    let (mut dev, mock) = device(0, 2);
    assert_eq!(dev.write(12345, &[]), Ok(0));
    assert_eq!((dev.size(), dev.stats().quanta, mock.live()), (0, 0, 0));
    assert_eq!(dev.write(usize::MAX, &[]), Ok(0));
}

#[test]
fn trim_frees_every_quantum_and_the_device_is_reusable() {
    let (mut dev, mock) = device(1, 3);
    for i in 0..20 {
        dev.write(i * 37 * Q + i, &bytes(i, 3 * Q)).unwrap();
    }
    let s = dev.stats();
    assert!(s.quanta > 20 && s.qset_arrays > 5, "{s:?}");
    assert_eq!(mock.live(), s.quanta);
    dev.trim();
    assert_eq!(mock.live(), 0);
    let m = mock.0.borrow();
    assert_eq!(m.allocs, m.frees);
    drop(m);
    let s = dev.stats();
    assert_eq!((s.size, s.quanta, s.qset_arrays, s.quantum_bytes, s.array_bytes, s.free_errors), (0, 0, 0, 0, 0, 0));
    assert_eq!(dev.read(0, &mut [0; 8]), Ok(0));
    dev.write(5, b"again").unwrap();
    assert_eq!(mock.live(), 1);
    dev.trim();
    dev.trim();
    assert_eq!(mock.live(), 0);
}

#[test]
fn drop_trims() {
    let mock = Mock::default();
    {
        let mut dev = ScullV::with_alloc(2, 5, mock.clone()).unwrap();
        // Size knob: 100 pages natively, 20 under Miri.
        let pages = if cfg!(miri) { 20 } else { 100 };
        dev.write(0, &bytes(3, pages * Q)).unwrap();
        assert_eq!(mock.live(), pages / 4);
    }
    assert_eq!(mock.live(), 0);
}

#[test]
fn quantum_failure_mid_write_leaves_the_device_as_it_was() {
    let (mut dev, mock) = device(0, 3);
    // Some quanta already there, inside the range of the failing write: they must survive.
    dev.write(2 * Q, &bytes(4, 10)).unwrap();
    dev.write(7 * Q + 3, &bytes(5, 10)).unwrap();
    let before = (read_all(&dev), dev.stats(), mock.live());
    for fail_after in 0..9 {
        mock.fail_after(Some(fail_after));
        let r = dev.write(Q / 2, &bytes(6, 10 * Q));
        assert_eq!(r, Err(ScullError::Quantum(VmallocError::NoFrames)), "fail after {fail_after}");
        assert_eq!(mock.live(), before.2, "everything taken for the write was freed");
        let s = dev.stats();
        assert_eq!((s.size, s.quanta, s.qset_arrays), (before.1.size, before.1.quanta, before.1.qset_arrays));
        assert_eq!(read_all(&dev), before.0, "contents unchanged");
    }
    assert_eq!(dev.stats().failed_quantum_allocs, 9);
    mock.fail_after(None);
    assert_eq!(dev.write(Q / 2, &bytes(6, 10 * Q)), Ok(10 * Q));
    assert_eq!(dev.stats().quanta, 11);
    assert_eq!(mock.live(), 11);
    drop(dev);
    assert_eq!(mock.live(), 0);
}

#[test]
fn array_failure_mid_write_leaves_the_device_as_it_was() {
    let (mut dev, mock) = device(0, 2);
    dev.write(3 * Q, b"x").unwrap();
    let before = (read_all(&dev), dev.stats(), mock.live());
    for n in 0..4 {
        dev.arrays_before_failure = Some(n);
        assert_eq!(dev.write(0, &bytes(7, 9 * Q)), Err(ScullError::NoMemory));
        assert_eq!(mock.live(), before.2);
        assert_eq!(dev.stats(), before.1);
        assert_eq!(read_all(&dev), before.0);
    }
    dev.arrays_before_failure = None;
    dev.write(0, &bytes(7, 9 * Q)).unwrap();
    assert_eq!(dev.stats().qset_arrays, 5);
}

#[test]
fn overflowing_and_oversized_writes_are_refused() {
    let (mut dev, mock) = device(0, 2);
    let max = dev.max_size();
    assert_eq!(max, Q * 2 * MAX_SETS);
    assert_eq!(ScullV::new(DEFAULT_ORDER, DEFAULT_QSET).unwrap().max_size(), (64 << 10) * 500 * MAX_SETS);
    assert_eq!(ScullV::new(8, 1000).unwrap().max_size(), MAX_SIZE);
    assert_eq!(dev.write(usize::MAX - 2, &[1; 10]), Err(ScullError::Overflow));
    assert_eq!(dev.write(usize::MAX, &[1]), Err(ScullError::Overflow));
    assert_eq!(dev.write(max, &[1]), Err(ScullError::TooLarge));
    assert_eq!(dev.write(max - 1, &[1, 2]), Err(ScullError::TooLarge));
    assert_eq!((dev.size(), mock.live()), (0, 0));
    assert_eq!(dev.write(max - 1, &[9]), Ok(1), "the last byte is writable");
    assert_eq!(dev.size(), max);
    assert_eq!(mock.live(), 1);
    let mut b = [0u8; 4];
    assert_eq!(dev.read(max - 2, &mut b), Ok(2));
    assert_eq!(&b[..2], &[0, 9]);
}

#[test]
fn vmalloc_quanta_before_memory_init_fail_cleanly() {
    // On the host `memory::kernel` is never initialised: vzalloc refuses, nothing changes.
    let mut dev = ScullV::new(0, 4).unwrap();
    assert_eq!(dev.write(0, b"x"), Err(ScullError::Quantum(VmallocError::NotInitialized)));
    assert_eq!((dev.size(), dev.stats().quanta, dev.stats().qset_arrays), (0, 0, 0));
    assert_eq!(demo(1), Err(ScullError::Quantum(VmallocError::NotInitialized)));
}

#[test]
fn demo_writes_reads_back_and_trims() {
    // 3 MiB in 64 KiB quanta natively; under Miri, where each byte costs tens of
    // microseconds (pattern and checksum), a 4 KiB quantum and a bit.
    let (order, bytes) = if cfg!(miri) { (0, Q + 100) } else { (DEFAULT_ORDER, 3 << 20) };
    let (mut dev, mock) = device(order, DEFAULT_QSET);
    let r = demo_bytes_on(&mut dev, bytes).unwrap();
    let mut expected = vec![0; bytes];
    fill_pattern(&mut expected, 0);
    let quantum_size = PAGE_SIZE << order;
    assert_eq!(
        r,
        DemoReport {
            bytes,
            quantum_size,
            quanta: bytes.div_ceil(quantum_size),
            qset_arrays: 1,
            checksum: fnv1a(FNV_OFFSET, &expected)
        }
    );
    assert_eq!(r.checksum, expected_checksum(bytes));
    assert_eq!(mock.live(), 0);
    assert_eq!(dev.size(), 0);
    if !cfg!(miri) {
        assert_eq!((r.quantum_size, r.quanta), (64 << 10, 48));
    }
    // Small quanta, small sets: many arrays (1 MiB natively: 256 quanta in 37 sets of 7;
    // under Miri 4 quanta in 2 sets of 2).
    let (qset, bytes) = if cfg!(miri) { (2, 3 * Q + 1) } else { (7, 1 << 20) };
    let (mut dev, mock) = device(0, qset);
    let r = demo_bytes_on(&mut dev, bytes).unwrap();
    assert_eq!((r.quanta, r.qset_arrays), (bytes.div_ceil(Q), bytes.div_ceil(Q).div_ceil(qset)));
    assert_eq!(mock.live(), 0);
    assert_eq!(demo_on(&mut dev, usize::MAX), Err(ScullError::Overflow));
    let too_big = (dev.max_size() >> 20) + 1;
    assert_eq!(demo_on(&mut dev, too_big), Err(ScullError::TooLarge));
    // A failing allocation part way: an error, and nothing stays allocated.
    mock.fail_after(Some(if cfg!(miri) { 2 } else { 100 }));
    assert_eq!(demo_bytes_on(&mut dev, bytes), Err(ScullError::Quantum(VmallocError::NoFrames)));
    assert_eq!(mock.live(), 0);
}

/// xorshift64*: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `model` zero-extended to at least `len` bytes. Appending a zeroed buffer is one
/// `calloc` and one `memcpy`, which Miri runs natively; `Vec::resize` writes byte by byte
/// there, and was four fifths of the model tests' time under Miri.
fn grow(model: &mut Vec<u8>, len: usize) {
    if model.len() < len {
        model.extend_from_slice(&vec![0; len - model.len()]);
    }
}

/// The device next to a plain model: the bytes as a `Vec<u8>` and the set of quanta written.
fn model_run(order: u32, qset: usize, seed: u64, ops: usize) {
    let (mut dev, mock) = device(order, qset);
    let quantum = PAGE_SIZE << order;
    let span = 6 * quantum * qset + 3 * quantum; // a few quantum sets' worth
    let mut rng = Rng(seed);
    let mut model: Vec<u8> = Vec::new();
    let mut written: BTreeSet<usize> = BTreeSet::new();
    for op in 0..ops {
        let offset = rng.below(span);
        let len = match rng.below(4) {
            0 => rng.below(16),
            1 => rng.below(quantum + 1),
            _ => rng.below(3 * quantum),
        };
        match rng.below(100) {
            0..=34 => {
                let data = bytes(op, len);
                assert_eq!(dev.write(offset, &data), Ok(len), "op {op}: write({offset}, {len})");
                if len > 0 {
                    grow(&mut model, offset + len);
                    model[offset..offset + len].copy_from_slice(&data);
                    written.extend(offset / quantum..=(offset + len - 1) / quantum);
                }
            }
            35..=44 => {
                // A write whose allocations fail part way: all or nothing.
                let data = bytes(op, len);
                let missing = if len == 0 {
                    0
                } else {
                    (offset / quantum..=(offset + len - 1) / quantum).filter(|q| !written.contains(q)).count()
                };
                if missing == 0 {
                    continue;
                }
                mock.fail_after(Some(rng.below(missing)));
                assert_eq!(dev.write(offset, &data), Err(ScullError::Quantum(VmallocError::NoFrames)), "op {op}");
                mock.fail_after(None);
            }
            45..=54 => {
                let data = bytes(op, len);
                let n = len.min(quantum - offset % quantum);
                assert_eq!(dev.write_quantum(offset, &data), Ok(n), "op {op}");
                if n > 0 {
                    grow(&mut model, offset + n);
                    model[offset..offset + n].copy_from_slice(&data[..n]);
                    written.insert(offset / quantum);
                }
            }
            55..=84 => {
                let mut buf = vec![0x5a; len];
                let expect = len.min(model.len().saturating_sub(offset));
                assert_eq!(dev.read(offset, &mut buf), Ok(expect), "op {op}: read({offset}, {len})");
                if expect > 0 {
                    assert_eq!(&buf[..expect], &model[offset..offset + expect], "op {op}: read({offset}, {len})");
                }
            }
            85..=97 => {
                let mut buf = vec![0x5a; len];
                let expect = if offset >= model.len() || !written.contains(&(offset / quantum)) {
                    0
                } else {
                    len.min(model.len() - offset).min(quantum - offset % quantum)
                };
                assert_eq!(dev.read_quantum(offset, &mut buf), Ok(expect), "op {op}: read_quantum({offset}, {len})");
                if expect > 0 {
                    assert_eq!(&buf[..expect], &model[offset..offset + expect], "op {op}");
                }
            }
            _ => {
                dev.trim();
                model.clear();
                written.clear();
            }
        }
        let s = dev.stats();
        let sets: BTreeSet<usize> = written.iter().map(|q| q / qset).collect();
        assert_eq!(s.size, model.len(), "op {op}");
        assert_eq!(s.quanta, written.len(), "op {op}");
        assert_eq!(s.qset_arrays, sets.len(), "op {op}");
        assert_eq!(mock.live(), written.len(), "op {op}");
    }
    assert_eq!(read_all(&dev), model);
    assert_eq!(dev.stats().free_errors, 0);
    drop(dev);
    assert_eq!(mock.live(), 0);
}

/// Operations per model run; fewer under Miri (an interpreter), same mix.
const MODEL_OPS: usize = if cfg!(miri) { 100 } else { 10_000 };

#[test]
fn random_ops_match_a_vec_model() {
    model_run(0, 3, 0x5eed_0001, MODEL_OPS);
}

#[test]
fn random_ops_match_a_vec_model_other_geometries() {
    model_run(0, 1, 0x5eed_0002, MODEL_OPS);
    model_run(1, 2, 0x5eed_0003, MODEL_OPS);
    model_run(2, 7, 0x5eed_0004, MODEL_OPS);
}
