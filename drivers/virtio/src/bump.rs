//! The allocator inside a bounce pool: a bump pointer that rewinds when the last bounce is
//! given back.
//!
//! A virtio driver shares the buffers of one request together and unshares them together
//! when the device has answered, so the bounces of a pool are short-lived and freed as a
//! group: a bump pointer with a count of live bounces serves that pattern exactly, in O(1),
//! with no per-allocation metadata. Space is reused when the count drops to zero (and the
//! top allocation is rolled back when it is freed first). A request that does not fit is
//! not this allocator's problem: the caller bounces it elsewhere (see `dma.rs`).

/// A bump allocator over `size` bytes of offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bump {
    size: usize,
    next: usize,
    live: usize,
    high_water: usize,
}

impl Bump {
    /// An empty allocator over `size` bytes.
    pub(crate) const fn new(size: usize) -> Self {
        Self { size, next: 0, live: 0, high_water: 0 }
    }

    /// `len` bytes aligned to `align` (a power of two), as an offset; `None` when they do
    /// not fit in what is left.
    pub(crate) fn alloc(&mut self, len: usize, align: usize) -> Option<usize> {
        debug_assert!(align.is_power_of_two());
        if len == 0 {
            return None;
        }
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(len)?;
        if end > self.size {
            return None;
        }
        self.next = end;
        self.live += 1;
        self.high_water = self.high_water.max(end);
        Some(start)
    }

    /// Gives back the allocation at `offset` of `len` bytes.
    ///
    /// # Panics
    /// When nothing is live (a double free is a bug in the caller).
    pub(crate) fn free(&mut self, offset: usize, len: usize) {
        assert!(self.live > 0, "bounce pool: free of {len} bytes at offset {offset} with nothing live");
        self.live -= 1;
        if self.live == 0 {
            self.next = 0;
        } else if offset + len == self.next {
            // The top allocation: roll the pointer back to it.
            self.next = offset;
        }
    }

    /// Bounces handed out and not yet freed.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// The highest offset ever handed out (bytes in use at the worst moment).
    pub(crate) fn high_water(&self) -> usize {
        self.high_water
    }

    /// The size of the arena.
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::Bump;

    #[test]
    fn fills_aligns_and_rewinds() {
        let mut b = Bump::new(4096);
        assert_eq!(b.alloc(16, 64), Some(0));
        assert_eq!(b.alloc(1, 64), Some(64));
        assert_eq!(b.alloc(4000, 64), None, "does not fit after 128 bytes");
        assert_eq!(b.alloc(3968, 64), Some(128));
        assert_eq!(b.alloc(1, 1), None, "full");
        b.free(0, 16);
        b.free(64, 1);
        assert_eq!(b.alloc(1, 1), None, "still one live bounce at the top end");
        b.free(128, 3968);
        assert_eq!(b.live(), 0);
        assert_eq!(b.alloc(4096, 64), Some(0), "rewound when the last one was freed");
        assert_eq!(b.high_water(), 4096);
        assert_eq!(b.size(), 4096);
    }

    #[test]
    fn top_allocation_rolls_back() {
        let mut b = Bump::new(1024);
        let a = b.alloc(100, 64).unwrap();
        let c = b.alloc(100, 64).unwrap();
        b.free(c, 100);
        assert_eq!(b.alloc(100, 64), Some(c), "top freed first: reused at once");
        assert_eq!(a, 0);
    }

    #[test]
    fn zero_and_overflowing_requests_are_refused() {
        let mut b = Bump::new(1024);
        assert_eq!(b.alloc(0, 64), None);
        assert_eq!(b.alloc(usize::MAX, 64), None);
        assert_eq!(b.live(), 0);
    }

    #[test]
    #[should_panic(expected = "nothing live")]
    fn double_free_panics() {
        let mut b = Bump::new(1024);
        let a = b.alloc(8, 8).unwrap();
        b.free(a, 8);
        b.free(a, 8);
    }
}
