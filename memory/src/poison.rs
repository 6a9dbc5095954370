//! Poison checks: where a byte range stops holding the fill byte that strict mode wrote
//! into freed memory (buddy blocks, slab objects and their red zones).

/// Bytes compared as one slice at a time: a slice comparison is one `memcmp`, where a byte
/// loop is one step per byte (under Miri, minutes for the strict-mode suites).
const CHUNK: usize = 256;

/// The index of the first byte of `bytes` that is not `fill`, or `None` when all are.
pub(crate) fn first_not(bytes: &[u8], fill: u8) -> Option<usize> {
    let pattern = [fill; CHUNK];
    let mut at = 0;
    for chunk in bytes.chunks(CHUNK) {
        if chunk != &pattern[..chunk.len()] {
            return chunk.iter().position(|&b| b != fill).map(|i| at + i);
        }
        at += chunk.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_not_finds_the_first_other_byte_in_any_chunk() {
        let mut v = [0x6bu8; 3 * CHUNK + 5];
        assert_eq!(first_not(&v, 0x6b), None);
        assert_eq!(first_not(&[], 0x6b), None);
        for at in [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7, 3 * CHUNK + 4] {
            v[at] = 0;
            assert_eq!(first_not(&v, 0x6b), Some(at), "at {at}");
            v[at] = 0x6b;
        }
        v[CHUNK + 3] = 1;
        v[2 * CHUNK] = 1;
        assert_eq!(first_not(&v, 0x6b), Some(CHUNK + 3));
    }
}
