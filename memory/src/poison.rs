//! Poison checks: where a byte range stops holding the fill byte that strict mode wrote
//! into freed memory (buddy blocks, slab objects and their red zones).

/// The index of the first byte of `bytes` that is not `fill`, or `None` when all are.
///
/// One slice comparison for the whole range: the first byte is `fill` and every byte
/// equals the next one (`bytes[1..] == bytes[..n - 1]`, a single `memcmp`). A byte loop
/// runs only to name the byte once a difference is known (under Miri, an interpreter,
/// a loop over every freed page's bytes took minutes of the strict-mode suites).
pub(crate) fn first_not(bytes: &[u8], fill: u8) -> Option<usize> {
    let (&first, rest) = bytes.split_first()?;
    if first == fill && rest == &bytes[..rest.len()] {
        return None;
    }
    bytes.iter().position(|&b| b != fill)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_not_finds_the_first_other_byte_anywhere() {
        // Every position of a difference, the last byte included.
        const CHUNK: usize = 256;
        let mut v = [0x6bu8; 3 * CHUNK + 5];
        assert_eq!(first_not(&v, 0x6b), None);
        assert_eq!(first_not(&[], 0x6b), None);
        // Bytes all alike but not the fill; one byte either way.
        assert_eq!(first_not(&[0; 300], 0x6b), Some(0));
        assert_eq!((first_not(&[0x6b], 0x6b), first_not(&[1], 0x6b)), (None, Some(0)));
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
