//! An intrusive AVL tree of [`Node`] records ordered by `start`, augmented with the largest
//! range size in each subtree: the free space of the vmalloc window.
//!
//! Invariants (checked by [`Tree::check`]):
//! - in-order traversal gives strictly increasing `start`, and ranges do not overlap;
//! - `parent` links are the inverse of `left`/`right`, the root has no parent;
//! - `height` = 1 + max(child heights), and child heights differ by at most one (AVL), so
//!   the height is at most 1.44·log2(n + 2);
//! - `max` = max(`end - start`, children's `max`).
//!
//! Every operation walks one root-to-leaf path (plus a retrace back up that stops as soon as
//! a subtree's height and `max` come out unchanged), so all of them are O(log n).

use super::links;
use super::node::{Link, Node, NodePtr};

#[inline(always)]
fn height(l: Link) -> u8 {
    match l {
        Some(n) => n.get().height.get(),
        None => 0,
    }
}

#[inline(always)]
pub(crate) fn sub_max(l: Link) -> u64 {
    match l {
        Some(n) => n.get().max.get(),
        None => 0,
    }
}

/// The tree (the busy areas live in a [`super::treap::Treap`] instead).
pub(crate) struct Tree {
    pub root: Link,
    pub len: usize,
    /// The leftmost record (lowest address), kept up to date by every operation so the
    /// lowest hole is reachable in O(1).
    first: Link,
}

impl Tree {
    pub const fn new() -> Self {
        Self { root: None, len: 0, first: None }
    }

    /// Recompute `height` (and `max`) of `n` from its children.
    #[inline(always)]
    fn update(n: NodePtr) {
        let nd = n.get();
        let (l, r) = (nd.left.get(), nd.right.get());
        nd.height.set(1 + height(l).max(height(r)));
        nd.max.set(nd.size().max(sub_max(l)).max(sub_max(r)));
    }

    /// Rotate `x` down to the left; its right child `y` takes its place. Returns the new root.
    fn rotate_left(&mut self, x: NodePtr, y: NodePtr) -> NodePtr {
        links::rotate_left(&mut self.root, x, y);
        Self::update(x);
        Self::update(y);
        y
    }

    /// Rotate `x` down to the right; its left child `y` takes its place.
    fn rotate_right(&mut self, x: NodePtr, y: NodePtr) -> NodePtr {
        links::rotate_right(&mut self.root, x, y);
        Self::update(x);
        Self::update(y);
        y
    }

    /// Restore the AVL property at `n` (whose subtrees are valid AVL trees differing in
    /// height by at most 2) and recompute its values. Returns the subtree's new root.
    fn fix(&mut self, n: NodePtr) -> NodePtr {
        let nd = n.get();
        let (l, r) = (nd.left.get(), nd.right.get());
        let bf = i16::from(height(l)) - i16::from(height(r));
        if bf > 1 {
            if let Some(l) = l {
                let ln = l.get();
                if height(ln.left.get()) < height(ln.right.get()) {
                    if let Some(lr) = ln.right.get() {
                        self.rotate_left(l, lr);
                    }
                }
                if let Some(l) = nd.left.get() {
                    return self.rotate_right(n, l);
                }
            }
        } else if bf < -1 {
            if let Some(r) = r {
                let rn = r.get();
                if height(rn.right.get()) < height(rn.left.get()) {
                    if let Some(rl) = rn.left.get() {
                        self.rotate_right(r, rl);
                    }
                }
                if let Some(r) = nd.right.get() {
                    return self.rotate_left(n, r);
                }
            }
        }
        Self::update(n);
        n
    }

    /// Walk up from `from`, rebalancing and recomputing. Stops early once a subtree's height
    /// and `max` are unchanged, but never below `must_reach` (a node whose cached values were
    /// copied from another and must be recomputed).
    fn retrace(&mut self, from: Link, mut must_reach: Link) {
        let mut cur = from;
        while let Some(n) = cur {
            let nd = n.get();
            let (old_h, old_m) = (nd.height.get(), nd.max.get());
            let r = self.fix(n);
            let rn = r.get();
            if (must_reach.is_none() || must_reach == Some(n)) && rn.height.get() == old_h && rn.max.get() == old_m {
                return;
            }
            if must_reach == Some(n) {
                must_reach = None;
            }
            cur = rn.parent.get();
        }
    }

    /// After `n`'s own size changed (its key order unchanged): recompute `max` upward,
    /// stopping at the first ancestor whose `max` comes out unchanged. Heights are untouched.
    #[inline]
    pub fn size_changed(&mut self, n: NodePtr) {
        let mut cur = Some(n);
        while let Some(c) = cur {
            let cn = c.get();
            let m = cn.size().max(sub_max(cn.left.get())).max(sub_max(cn.right.get()));
            if m == cn.max.get() && c != n {
                return;
            }
            cn.max.set(m);
            cur = cn.parent.get();
        }
    }

    /// Insert a record whose range overlaps none in the tree.
    pub fn insert(&mut self, node: NodePtr) {
        let (parent, left) = links::leaf_slot(self.root, node.get().start.get());
        self.link_at(node, parent, left);
    }

    /// Attach `node` as the `left`/right child of `parent` (which must be the empty spot a
    /// descent for its key ended at) and rebalance.
    pub fn link_at(&mut self, node: NodePtr, parent: Link, left: bool) {
        let nd = node.get();
        nd.left.set(None);
        nd.right.set(None);
        nd.parent.set(parent);
        nd.height.set(1);
        nd.max.set(nd.size());
        match parent {
            None => {
                self.root = Some(node);
                self.first = Some(node);
            }
            Some(p) => {
                if left {
                    p.get().left.set(Some(node));
                    // Only the left child of the leftmost record comes before it.
                    if self.first == Some(p) {
                        self.first = Some(node);
                    }
                } else {
                    p.get().right.set(Some(node));
                }
            }
        }
        self.len += 1;
        self.retrace(parent, None);
    }

    /// Unlink `n` from the tree.
    pub fn remove(&mut self, n: NodePtr) {
        if self.first == Some(n) {
            self.first = Self::next(n);
        }
        let nd = n.get();
        let (l, r, p) = (nd.left.get(), nd.right.get(), nd.parent.get());
        match (l, r) {
            (Some(l), Some(r)) => {
                // Put the in-order successor `s` (leftmost of the right subtree) in n's place.
                let mut s = r;
                while let Some(sl) = s.get().left.get() {
                    s = sl;
                }
                let sn = s.get();
                let from = if s == r {
                    s
                } else {
                    let sp = sn.parent.get();
                    let sr = sn.right.get();
                    if let Some(sp) = sp {
                        sp.get().left.set(sr);
                    }
                    if let Some(sr) = sr {
                        sr.get().parent.set(sp);
                    }
                    sn.right.set(Some(r));
                    r.get().parent.set(Some(s));
                    sp.unwrap_or(s)
                };
                sn.left.set(Some(l));
                l.get().parent.set(Some(s));
                sn.parent.set(p);
                links::replace_child(&mut self.root, p, n, Some(s));
                sn.height.set(nd.height.get());
                sn.max.set(nd.max.get());
                self.retrace(Some(from), Some(s));
            }
            _ => {
                let c = l.or(r);
                if let Some(c) = c {
                    c.get().parent.set(p);
                }
                links::replace_child(&mut self.root, p, n, c);
                self.retrace(p, None);
            }
        }
        nd.left.set(None);
        nd.right.set(None);
        nd.parent.set(None);
        self.len -= 1;
    }

    /// The record starting exactly at `start`.
    pub fn find_start(&self, start: u64) -> Option<NodePtr> {
        let mut cur = self.root;
        while let Some(c) = cur {
            let s = c.get().start.get();
            if start < s {
                cur = c.get().left.get();
            } else if start > s {
                cur = c.get().right.get();
            } else {
                return Some(c);
            }
        }
        None
    }

    /// The first record in address order (O(1)).
    #[inline(always)]
    pub fn first(&self) -> Link {
        self.first
    }

    /// The record after `n` in address order.
    pub fn next(n: NodePtr) -> Link {
        links::next(n)
    }

    /// Unlink every record, calling `f` on each (in no particular order).
    pub fn drain(&mut self, f: impl FnMut(NodePtr)) {
        links::drain(&mut self.root, f);
        self.len = 0;
        self.first = None;
    }

    /// Verify every invariant listed in the module docs by a full walk, recomputing heights
    /// and augmented values. O(n); for tests and debugging.
    ///
    /// # Errors
    /// A description of the first violation found.
    pub fn check(&self) -> Result<(), &'static str> {
        if let Some(r) = self.root {
            if r.get().parent.get().is_some() {
                return Err("root has a parent");
            }
        }
        let mut leftmost = self.root;
        while let Some(l) = leftmost.and_then(|n| n.get().left.get()) {
            leftmost = Some(l);
        }
        if leftmost != self.first {
            return Err("cached first record is not the leftmost");
        }
        let mut count = 0usize;
        let mut last_end: Option<u64> = None;
        Self::check_sub(self.root, &mut count, &mut last_end)?;
        if count != self.len {
            return Err("tree length does not match its node count");
        }
        Ok(())
    }

    /// Returns (height, max) of the subtree.
    fn check_sub(n: Link, count: &mut usize, last_end: &mut Option<u64>) -> Result<(u8, u64), &'static str> {
        let Some(n) = n else { return Ok((0, 0)) };
        let nd: &Node = n.get();
        for c in [nd.left.get(), nd.right.get()].into_iter().flatten() {
            if c.get().parent.get() != Some(n) {
                return Err("child's parent link is wrong");
            }
        }
        let (lh, lm) = Self::check_sub(nd.left.get(), count, last_end)?;
        if nd.end.get() <= nd.start.get() {
            return Err("empty or inverted range");
        }
        if let Some(e) = *last_end {
            if nd.start.get() < e {
                return Err("ranges out of order or overlapping");
            }
        }
        *last_end = Some(nd.end.get());
        *count += 1;
        let (rh, rm) = Self::check_sub(nd.right.get(), count, last_end)?;
        if lh.abs_diff(rh) > 1 {
            return Err("AVL balance violated");
        }
        let h = 1 + lh.max(rh);
        if nd.height.get() != h {
            return Err("cached height is wrong");
        }
        let m = nd.size().max(lm).max(rm);
        if nd.max.get() != m {
            return Err("cached subtree max is wrong");
        }
        Ok((h, m))
    }
}
