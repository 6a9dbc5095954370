//! The simulator's page contents, kept sparsely by physical page: only pages written,
//! copied or poisoned hold bytes; any other reads as zeroes.
//!
//! Pages of the frame pool and of the block pool are found by index (O(1): freeing or
//! zeroing a 2 MiB block forgets its 512 pages at a few steps each, which matters under
//! Miri); any other page (vmap's caller frames, poked addresses) in an ordered map.

use super::super::alloc::boxed::Box;
use super::super::alloc::collections::BTreeMap;
use super::super::alloc::vec;

use hal::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// One pool's pages by index from `base`.
struct Pool {
    base: u64,
    pages: Box<[Option<Box<[u8]>>]>,
}

impl Pool {
    fn new(base: u64, pages: usize) -> Self {
        // All `None`: zeroed memory at once, no step per page (under Miri a loop over the
        // pool cost seconds in every test).
        Self { base, pages: vec![None; pages].into_boxed_slice() }
    }

    fn index(&self, pa: u64) -> Option<usize> {
        let i = usize::try_from(pa.checked_sub(self.base)? / PAGE).ok()?;
        (i < self.pages.len()).then_some(i)
    }

    /// The slot of `pa`'s page, if this pool holds it.
    fn slot(&self, pa: u64) -> Option<&Option<Box<[u8]>>> {
        self.index(pa).map(|i| &self.pages[i])
    }
}

/// The slot of `pa`'s page in the frame pool or the block pool, if either holds it (over
/// the two pools only, so the caller may still use the map of other pages).
fn pool_slot<'a>(frames: &'a mut Pool, blocks: &'a mut Pool, pa: u64) -> Option<&'a mut Option<Box<[u8]>>> {
    match frames.index(pa) {
        Some(i) => Some(&mut frames.pages[i]),
        None => blocks.index(pa).map(|i| &mut blocks.pages[i]),
    }
}

/// Page contents by physical page address (page aligned).
pub(super) struct SimMemory {
    frames: Pool,
    blocks: Pool,
    other: BTreeMap<u64, Box<[u8]>>,
}

impl SimMemory {
    /// Contents for `frames` pages from `frame_base` and `block_pages` from `block_base`.
    pub(super) fn new(frame_base: u64, frames: usize, block_base: u64, block_pages: usize) -> Self {
        Self {
            frames: Pool::new(frame_base, frames),
            blocks: Pool::new(block_base, block_pages),
            other: BTreeMap::new(),
        }
    }

    /// Room for `pages` pages of the block pool (contents so far forgotten).
    pub(super) fn set_block_pages(&mut self, pages: usize) {
        self.blocks = Pool::new(self.blocks.base, pages);
    }

    /// The bytes of `pa`'s page, if any were ever stored.
    pub(super) fn get(&self, pa: u64) -> Option<&[u8]> {
        match self.frames.slot(pa).or_else(|| self.blocks.slot(pa)) {
            Some(slot) => slot.as_deref(),
            None => self.other.get(&pa).map(|p| &p[..]),
        }
    }

    /// The bytes of `pa`'s page, zeroes first if none were stored.
    pub(super) fn page_mut(&mut self, pa: u64) -> &mut [u8] {
        let zero = || vec![0u8; PAGE_SIZE].into_boxed_slice();
        match pool_slot(&mut self.frames, &mut self.blocks, pa) {
            Some(slot) => slot.get_or_insert_with(zero),
            None => self.other.entry(pa).or_insert_with(zero),
        }
    }

    /// `pa`'s page holds `byte` throughout.
    pub(super) fn fill(&mut self, pa: u64, byte: u8) {
        let page = vec![byte; PAGE_SIZE].into_boxed_slice();
        match pool_slot(&mut self.frames, &mut self.blocks, pa) {
            Some(slot) => *slot = Some(page),
            None => {
                self.other.insert(pa, page);
            }
        }
    }

    /// `pa`'s page reads as zeroes (its bytes forgotten).
    pub(super) fn forget(&mut self, pa: u64) {
        match pool_slot(&mut self.frames, &mut self.blocks, pa) {
            Some(slot) => *slot = None,
            None => {
                self.other.remove(&pa);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SimMemory, PAGE};

    #[test]
    fn pages_in_and_out_of_the_pools_keep_their_bytes() {
        let mut m = SimMemory::new(0x1000_0000, 4, 0x8000_0000, 512);
        for pa in [0x1000_0000 + 3 * PAGE, 0x8000_0000 + 511 * PAGE, 0x5000_0000, 0x1000_0000 + 4 * PAGE] {
            assert_eq!(m.get(pa), None);
            m.page_mut(pa)[7] = 9;
            assert_eq!(m.get(pa).map(|p| (p.len(), p[7], p[8])), Some((4096, 9, 0)));
            m.fill(pa, 0xa5);
            assert!(m.get(pa).is_some_and(|p| p.iter().all(|&b| b == 0xa5)));
            m.forget(pa);
            assert_eq!(m.get(pa), None);
        }
    }
}
