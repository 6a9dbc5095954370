//! Free space of the vmalloc window: holes in an augmented AVL tree ([`Tree`](super::tree)).
//!
//! Invariants on top of the tree's own: holes are page aligned, lie inside the window, and
//! never touch (a freed range is always merged with the holes next to it), so the tree
//! holds at most one hole more than there are busy areas.
//!
//! ## Lowest fit with alignment
//! The answer to `lowest_fit(size, align)` is the lowest-addressed hole `[s, e)` with
//! `align_up(s, align) + size <= e`, found by an in-order walk pruned to subtrees whose
//! `max >= size`, rolling back up the tree when a hole big enough is unusable because of its
//! alignment (as Linux's `find_vmap_lowest_match`). For `align == PAGE_SIZE` every hole of
//! `max >= size` fits, so the walk is one descent: O(log n).
//!
//! With a larger alignment an adversary can make many holes big enough yet misaligned, and
//! the exact walk would visit them all. So the walk gets a budget of O(log n) visits; when
//! it runs out, the search falls back to the lowest hole of at least
//! `size + align - PAGE_SIZE` bytes, which fits whatever its alignment (one more descent);
//! when not even that hole exists, the exact walk finishes without a budget, so "no room"
//! is only ever answered when no hole fits.
//! Linux always takes that fallback for `align > PAGE_SIZE`; we take it only when the exact
//! answer is expensive, so we keep aligned holes usable that Linux skips.
//! [`FreeSpace::oracle_lowest_fit`] is the linear-scan definition of both answers.

use super::node::{Link, NodePool, NodePtr, State};
use super::tree::{sub_max, Tree};

const PAGE: u64 = hal::PAGE_SIZE as u64;

/// How the last search went: for tests and statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchStats {
    /// Tree nodes visited.
    pub visits: u32,
    /// The exact walk ran out of budget and the guaranteed-fit descent answered.
    pub fell_back: bool,
}

#[inline(always)]
fn fit_start(s: u64, e: u64, size: u64, align: u64) -> Option<u64> {
    let a = s.checked_add(align - 1)? & !(align - 1);
    let end = a.checked_add(size)?;
    (end <= e).then_some(a)
}

/// The free-space index of one window. Public so tests can drive it alone; [`super::Vmalloc`]
/// embeds one and takes its busy-area records from the same spare pool.
pub struct FreeSpace {
    pub(crate) tree: Tree,
    pub(crate) pool: NodePool,
    start: u64,
    end: u64,
    last: SearchStats,
}

impl FreeSpace {
    /// Free space covering `[start, end)`, both page aligned, `start < end`.
    /// Returns `None` for a bad range, or when the heap has no record for the first hole.
    pub fn new(start: u64, end: u64) -> Option<Self> {
        if start >= end || !start.is_multiple_of(PAGE) || !end.is_multiple_of(PAGE) {
            return None;
        }
        let mut fs = Self { tree: Tree::new(), pool: NodePool::new(), start, end, last: SearchStats::default() };
        let n = fs.pool.alloc_new()?;
        n.get().start.set(start);
        n.get().end.set(end);
        n.get().state.set(State::Free);
        fs.tree.insert(n);
        Some(fs)
    }

    /// Statistics of the last [`Self::alloc`]/lowest-fit search.
    pub fn last_search(&self) -> SearchStats {
        self.last
    }

    /// Number of holes.
    pub fn holes(&self) -> usize {
        self.tree.len
    }

    /// Size of the largest hole.
    pub fn largest(&self) -> u64 {
        sub_max(self.tree.root)
    }

    /// Total free bytes (O(n)).
    pub fn total_free(&self) -> u64 {
        let mut t = 0;
        self.for_each_hole(|s, e| t += e - s);
        t
    }

    /// Heap records owned (in the tree, spare, or lent out as busy areas by the embedding allocator).
    pub fn records(&self) -> usize {
        self.pool.live_records
    }

    /// Call `f(start, end)` for every hole in address order.
    pub fn for_each_hole(&self, mut f: impl FnMut(u64, u64)) {
        let mut cur = self.tree.first();
        while let Some(n) = cur {
            f(n.get().start.get(), n.get().end.get());
            cur = Tree::next(n);
        }
    }

    /// Lowest fit for `size` bytes at `align` (both page multiples, `align` a power of two).
    /// Returns the hole and the start of the fit inside it.
    pub(crate) fn lowest_fit(&mut self, size: u64, align: u64) -> Option<(NodePtr, u64)> {
        let root = self.tree.root?;
        let mut visits = 0u32;
        self.last = SearchStats::default();
        // Fast path: the lowest hole fits (always so while allocations walk up through a run
        // of equal holes, as in full_fit). Nothing lower exists, so it is the exact answer.
        if let Some(first) = self.tree.first() {
            let f = first.get();
            if let Some(a) = fit_start(f.start.get(), f.end.get(), size, align) {
                self.last.visits = 1;
                return Some((first, a));
            }
        }
        if root.get().max.get() < size {
            self.last.visits = 1;
            return None;
        }
        // Budget: a few descents' worth. A descent visits at most height nodes.
        let budget = 3 * u32::from(root.get().height.get()) + 8;
        let mut n = root;
        'descend: loop {
            visits += 1;
            if visits > budget {
                break 'descend;
            }
            let nd = n.get();
            if let Some(l) = nd.left.get() {
                if l.get().max.get() >= size {
                    n = l;
                    continue;
                }
            }
            if let Some(a) = fit_start(nd.start.get(), nd.end.get(), size, align) {
                self.last.visits = visits;
                return Some((n, a));
            }
            if let Some(r) = nd.right.get() {
                if r.get().max.get() >= size {
                    n = r;
                    continue;
                }
            }
            // Roll back: up to the first ancestor we reach from its left subtree; that
            // ancestor comes next in address order, then its right subtree.
            let mut child = n;
            loop {
                let Some(p) = child.get().parent.get() else {
                    self.last.visits = visits;
                    return None;
                };
                visits += 1;
                if visits > budget {
                    break 'descend;
                }
                let pn = p.get();
                if pn.left.get() == Some(child) {
                    if let Some(a) = fit_start(pn.start.get(), pn.end.get(), size, align) {
                        self.last.visits = visits;
                        return Some((p, a));
                    }
                    if let Some(r) = pn.right.get() {
                        if r.get().max.get() >= size {
                            n = r;
                            continue 'descend;
                        }
                    }
                }
                child = p;
            }
        }
        // Budget spent: the lowest hole that fits whatever its alignment.
        self.last.fell_back = true;
        let want = size.checked_add(align - PAGE);
        if let Some(n) = want.and_then(|want| self.lowest_at_least(want, &mut visits)) {
            self.last.visits = visits;
            let a = fit_start(n.get().start.get(), n.get().end.get(), size, align)?;
            return Some((n, a));
        }
        // No hole is big enough to fit at any alignment, yet one may still happen to be
        // aligned: finish the exact walk without a budget rather than answer "no room"
        // wrongly. Only an adversarial layout that is also nearly full gets here.
        let mut cur = self.tree.first();
        while let Some(n) = cur {
            visits += 1;
            let nd = n.get();
            if nd.size() >= size {
                if let Some(a) = fit_start(nd.start.get(), nd.end.get(), size, align) {
                    self.last.visits = visits;
                    return Some((n, a));
                }
            }
            cur = Tree::next(n);
        }
        self.last.visits = visits;
        None
    }

    /// The lowest hole of at least `want` bytes: one descent.
    fn lowest_at_least(&self, want: u64, visits: &mut u32) -> Option<NodePtr> {
        let mut cur = self.tree.root;
        if sub_max(cur) < want {
            return None;
        }
        while let Some(n) = cur {
            *visits += 1;
            let nd = n.get();
            if sub_max(nd.left.get()) >= want {
                cur = nd.left.get();
            } else if nd.size() >= want {
                return Some(n);
            } else {
                cur = nd.right.get();
            }
        }
        None
    }

    /// The linear-scan definition of [`Self::alloc`]'s answer: `(exact, fallback)` where
    /// `exact` is the lowest fit start and `fallback` the fit start in the lowest hole of at
    /// least `size + align - PAGE_SIZE` bytes. The search returns `exact` unless it reports
    /// [`SearchStats::fell_back`], then `fallback` — or `exact` when there is no such hole
    /// (so it answers "no room" only when no hole fits at all).
    pub fn oracle_lowest_fit(&self, size: u64, align: u64) -> (Option<u64>, Option<u64>) {
        let mut exact = None;
        let mut fallback = None;
        let want = size.checked_add(align - PAGE);
        self.for_each_hole(|s, e| {
            if exact.is_none() {
                exact = fit_start(s, e, size, align);
            }
            if fallback.is_none() && want.is_some_and(|w| e - s >= w) {
                fallback = fit_start(s, e, size, align);
            }
        });
        (exact, fallback)
    }

    /// Carve `[at, at + size)` out of `hole`, returning the record now describing it (not in
    /// any tree). Needs up to two spare records (`pool.len() >= 2`), Linux's `va_clip`.
    pub(crate) fn clip(&mut self, hole: NodePtr, at: u64, size: u64) -> Option<NodePtr> {
        let h = hole.get();
        let (hs, he) = (h.start.get(), h.end.get());
        let ae = at + size;
        debug_assert!(hs <= at && ae <= he);
        if at == hs && ae == he {
            // Full fit: the hole's record becomes the area.
            self.tree.remove(hole);
            return Some(hole);
        }
        let area = self.pool.pop()?;
        if at == hs {
            // Left edge: the hole now starts after the area; its order is unchanged.
            h.start.set(ae);
            self.tree.size_changed(hole);
        } else if ae == he {
            h.end.set(at);
            self.tree.size_changed(hole);
        } else {
            // Middle: the hole keeps the left part, a new record takes the right part.
            let Some(right) = self.pool.pop() else {
                self.pool.push(area);
                return None;
            };
            h.end.set(at);
            self.tree.size_changed(hole);
            let rn = right.get();
            rn.start.set(ae);
            rn.end.set(he);
            rn.state.set(State::Free);
            self.tree.insert(right);
        }
        let an = area.get();
        an.start.set(at);
        an.end.set(ae);
        Some(area)
    }

    /// Return the (unlinked) record's range to free space, merging it with the holes next to
    /// it; records made redundant go to the spare pool. Needs no spare record.
    pub(crate) fn give_back(&mut self, node: NodePtr) {
        let nd = node.get();
        let (s, e) = (nd.start.get(), nd.end.get());
        // One descent finds both neighbours and the insertion spot; a range below the lowest
        // hole (a purge returns ranges highest first) needs none: its spot is that hole's left.
        let mut pred: Link = None;
        let mut succ: Link = None;
        let mut parent: Link = None;
        let mut left = false;
        let mut cur = self.tree.root;
        if let Some(f) = self.tree.first() {
            if e <= f.get().start.get() {
                succ = Some(f);
                parent = Some(f);
                left = true;
                cur = None;
            }
        }
        while let Some(c) = cur {
            parent = Some(c);
            left = s < c.get().start.get();
            if left {
                succ = Some(c);
                cur = c.get().left.get();
            } else {
                pred = Some(c);
                cur = c.get().right.get();
            }
        }
        let joins_pred = pred.filter(|p| p.get().end.get() == s);
        let joins_succ = succ.filter(|n| n.get().start.get() == e);
        match (joins_pred, joins_succ) {
            (Some(p), Some(n)) => {
                p.get().end.set(n.get().end.get());
                self.tree.size_changed(p);
                self.tree.remove(n);
                self.pool.push(n);
                self.pool.push(node);
            }
            (Some(p), None) => {
                p.get().end.set(e);
                self.tree.size_changed(p);
                self.pool.push(node);
            }
            (None, Some(n)) => {
                n.get().start.set(s);
                self.tree.size_changed(n);
                self.pool.push(node);
            }
            (None, None) => {
                nd.state.set(State::Free);
                self.tree.link_at(node, parent, left);
            }
        }
    }

    /// The hole starting exactly at `start`.
    pub(crate) fn hole_at(&self, start: u64) -> Option<NodePtr> {
        self.tree.find_start(start)
    }

    /// Take `size` bytes from the front of `hole`. Needs no spare record.
    pub(crate) fn take_front(&mut self, hole: NodePtr, size: u64) {
        let h = hole.get();
        if h.size() == size {
            self.tree.remove(hole);
            self.pool.push(hole);
        } else {
            h.start.set(h.start.get() + size);
            self.tree.size_changed(hole);
        }
    }

    /// Allocate `size` bytes at `align` (page multiples, power-of-two alignment) from the
    /// lowest fit. Returns the start, or `None` when nothing fits, the arguments are bad or
    /// the heap has no record for a split hole (then the holes are as they were).
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !size.is_multiple_of(PAGE) || !align.is_power_of_two() || align < PAGE {
            return None;
        }
        if !self.pool.fill_to(2) {
            return None;
        }
        let (hole, at) = self.lowest_fit(size, align)?;
        let area = self.clip(hole, at, size)?;
        self.pool.push(area);
        Some(at)
    }

    /// Give `[start, start + size)` back. The caller must have allocated it with
    /// [`Self::alloc`] (page multiples, not already free). Returns `false`, changing
    /// nothing, for a range outside the window or when the heap has no record for it.
    pub fn free(&mut self, start: u64, size: u64) -> bool {
        if size == 0 || start < self.start || start.saturating_add(size) > self.end {
            return false;
        }
        if !self.pool.fill_to(1) {
            return false;
        }
        let Some(n) = self.pool.pop() else { return false };
        n.get().start.set(start);
        n.get().end.set(start + size);
        self.give_back(n);
        true
    }

    /// Verify the tree (order, balance, recomputed augmented values) and that holes are page
    /// aligned, inside the window, and never adjacent.
    ///
    /// # Errors
    /// A description of the first violation found.
    pub fn check(&self) -> Result<(), &'static str> {
        self.tree.check()?;
        let mut last_end: Option<u64> = None;
        let mut err = None;
        self.for_each_hole(|s, e| {
            if !s.is_multiple_of(PAGE) || !e.is_multiple_of(PAGE) {
                err = Some("hole not page aligned");
            }
            if s < self.start || e > self.end {
                err = Some("hole outside the window");
            }
            if last_end == Some(s) {
                err = Some("two holes touch (missed merge)");
            }
            last_end = Some(e);
        });
        err.map_or(Ok(()), Err)
    }
}

impl Drop for FreeSpace {
    fn drop(&mut self) {
        let pool = &mut self.pool;
        // SAFETY: `drain` hands each record over once it is unlinked from the tree (its
        // leaves first), and the tree keeps no copy of it; nothing else holds a hole's record.
        self.tree.drain(|n| unsafe { pool.free_one(n) });
    }
}

impl core::fmt::Debug for FreeSpace {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "FreeSpace({:#x}-{:#x}, {} holes)", self.start, self.end, self.tree.len)
    }
}
