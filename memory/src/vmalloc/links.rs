//! Pointer surgery on intrusive binary trees of [`Node`](super::node::Node) records, shared by
//! the free tree (AVL, [`super::tree`]) and the busy treap ([`super::treap`]): each keeps its
//! own balance information and calls these for the links.

use super::node::{Link, NodePtr};

/// Where a new record starting at `key` hangs as a leaf of a tree ordered by start address:
/// its parent (`None`: the tree is empty) and whether it becomes the left child.
#[inline(always)]
pub(super) fn leaf_slot(root: Link, key: u64) -> (Link, bool) {
    let mut parent = None;
    let mut cur = root;
    let mut left = false;
    while let Some(c) = cur {
        parent = Some(c);
        left = key < c.get().start.get();
        cur = if left { c.get().left.get() } else { c.get().right.get() };
    }
    (parent, left)
}

/// Makes `new` take `old`'s place under `parent` (or at the root when `parent` is `None`).
#[inline(always)]
pub(super) fn replace_child(root: &mut Link, parent: Link, old: NodePtr, new: Link) {
    match parent {
        None => *root = new,
        Some(p) => {
            let pn = p.get();
            if pn.left.get() == Some(old) {
                pn.left.set(new);
            } else {
                pn.right.set(new);
            }
        }
    }
}

/// Lifts `y`, the right child of `x`, above it.
#[inline(always)]
pub(super) fn rotate_left(root: &mut Link, x: NodePtr, y: NodePtr) {
    let (xn, yn) = (x.get(), y.get());
    let b = yn.left.get();
    xn.right.set(b);
    if let Some(b) = b {
        b.get().parent.set(Some(x));
    }
    let p = xn.parent.get();
    yn.parent.set(p);
    replace_child(root, p, x, Some(y));
    yn.left.set(Some(x));
    xn.parent.set(Some(y));
}

/// Lifts `y`, the left child of `x`, above it.
#[inline(always)]
pub(super) fn rotate_right(root: &mut Link, x: NodePtr, y: NodePtr) {
    let (xn, yn) = (x.get(), y.get());
    let b = yn.right.get();
    xn.left.set(b);
    if let Some(b) = b {
        b.get().parent.set(Some(x));
    }
    let p = xn.parent.get();
    yn.parent.set(p);
    replace_child(root, p, x, Some(y));
    yn.right.set(Some(x));
    xn.parent.set(Some(y));
}

/// The record after `n` in address order.
pub(super) fn next(n: NodePtr) -> Link {
    if let Some(mut c) = n.get().right.get() {
        while let Some(l) = c.get().left.get() {
            c = l;
        }
        return Some(c);
    }
    let mut child = n;
    let mut up = n.get().parent.get();
    while let Some(p) = up {
        if p.get().left.get() == Some(child) {
            return Some(p);
        }
        child = p;
        up = p.get().parent.get();
    }
    None
}

/// Unlinks every record under `root`, calling `f` on each (in no particular order), and
/// leaves `root` empty. Iterative post-order through the parent links: a node is handed to
/// `f` once both its children are gone.
pub(super) fn drain(root: &mut Link, mut f: impl FnMut(NodePtr)) {
    let mut cur = *root;
    while let Some(n) = cur {
        let nd = n.get();
        if let Some(l) = nd.left.get() {
            cur = Some(l);
        } else if let Some(r) = nd.right.get() {
            cur = Some(r);
        } else {
            let p = nd.parent.get();
            if let Some(p) = p {
                let pn = p.get();
                if pn.left.get() == Some(n) {
                    pn.left.set(None);
                } else {
                    pn.right.set(None);
                }
            }
            nd.parent.set(None);
            f(n);
            cur = p;
        }
    }
    *root = None;
}
