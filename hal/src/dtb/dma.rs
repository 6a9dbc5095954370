//! The limit below which every device can reach memory, from the tree's `dma-ranges`
//! (Linux's `of_dma_get_max_cpu_address`, which sets arm64's `zone_dma_limit`).
//!
//! Each enabled node with a non-empty `dma-ranges` names the windows of CPU addresses its
//! bus masters can reach: `<child-bus-address parent-bus-address size>` entries, the child
//! address in the node's `#address-cells`, the parent address in its parent's, the size in
//! the node's `#size-cells`. The parent address is carried up to a CPU address through the
//! `ranges` of every ancestor below the root (an empty `ranges` is the identity). A node's
//! reach ends where its highest window ends; the tree's limit is the lowest such end over
//! all nodes. An empty `dma-ranges` (identity) or none at all sets no limit; so does an
//! entry whose address cannot be carried up (a bus without `ranges`), whose cells are not
//! 1 or 2 (the child address may be 3 cells: PCI) or that overflows: such an entry is
//! skipped rather than guessed.

use flat_device_tree::node::FdtNode;
use flat_device_tree::Fdt;

use crate::addr::PhysAddr;

/// Deepest node nesting looked at (QEMU virt's tree is 3 deep; real boards about 6).
const MAX_DEPTH: usize = 16;

/// `#address-cells` and `#size-cells` a node gives its children (the devicetree
/// specification's defaults, 2 and 1, when absent).
fn cells(node: FdtNode<'_, '_>) -> (usize, usize) {
    let get = |name: &str, default: usize| {
        node.property(name)
            .and_then(|p| p.value.get(..4))
            .map_or(default, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    (get("#address-cells", 2), get("#size-cells", 1))
}

/// Reads `n` big-endian cells (1 to 3) from the front of `bytes`, advancing it; the value
/// when it fits in 64 bits (1 or 2 cells).
fn take(bytes: &mut &[u8], n: usize) -> Option<u64> {
    if !(1..=3).contains(&n) || bytes.len() < 4 * n {
        return None;
    }
    let (head, rest) = bytes.split_at(4 * n);
    *bytes = rest;
    let mut v: u64 = 0;
    for c in head.chunks_exact(4) {
        v = v.checked_shl(32)? | u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    // Three cells (a PCI address) do not fit: the caller only skips them.
    (n <= 2).then_some(v)
}

/// Whether an entry of `child`, `parent` and `size` cells can be read: a child address of 1
/// to 3 cells (3 only skipped), a parent address and a size of 1 or 2.
fn valid(child: usize, parent: usize, size: usize) -> bool {
    (1..=3).contains(&child) && (1..=2).contains(&parent) && (1..=2).contains(&size)
}

/// One ancestor below the root on the way down: its `ranges` and the cells they use.
#[derive(Clone, Copy)]
struct Bus<'a> {
    /// `None`: no `ranges` property (addresses do not translate); `Some(&[])`: identity.
    ranges: Option<&'a [u8]>,
    /// The bus's own `#address-cells` / `#size-cells` (child side of its `ranges`).
    child_cells: (usize, usize),
    /// Its parent's `#address-cells` (parent side of its `ranges`).
    parent_cells: usize,
}

/// Carry `addr`, an address on the bus the last of `path` provides (its children's address
/// space), up to a CPU address through the `ranges` of `path` (outermost first).
fn to_cpu(mut addr: u64, path: &[Bus<'_>]) -> Option<u64> {
    for bus in path.iter().rev() {
        let mut r = bus.ranges?;
        if r.is_empty() {
            continue;
        }
        if !valid(bus.child_cells.0, bus.parent_cells, bus.child_cells.1) {
            return None;
        }
        let mut found = None;
        while !r.is_empty() {
            let child = take(&mut r, bus.child_cells.0);
            let parent = take(&mut r, bus.parent_cells)?;
            let size = take(&mut r, bus.child_cells.1)?;
            if let Some(child) = child {
                if addr >= child && addr - child < size {
                    found = parent.checked_add(addr - child);
                    break;
                }
            }
        }
        addr = found?;
    }
    Some(addr)
}

/// The end (exclusive) of the lowest reach any bus master's `dma-ranges` gives, if any.
pub(super) fn dma_limit(fdt: &Fdt<'_>) -> Option<PhysAddr> {
    let root = fdt.find_node("/")?;
    let mut limit: Option<u64> = None;
    let mut path = [Bus { ranges: None, child_cells: (2, 1), parent_cells: 2 }; MAX_DEPTH];
    walk(root, cells(root), &mut path, 0, &mut limit);
    limit.map(PhysAddr::new)
}

/// Visit the children of `node` (at `depth`, whose children use `node_cells`).
fn walk<'a>(
    node: FdtNode<'_, 'a>,
    node_cells: (usize, usize),
    path: &mut [Bus<'a>; MAX_DEPTH],
    depth: usize,
    limit: &mut Option<u64>,
) {
    if depth >= MAX_DEPTH {
        return;
    }
    for child in node.children() {
        if super::is_disabled(child) {
            continue;
        }
        let child_cells = cells(child);
        if let Some(end) =
            child.property("dma-ranges").and_then(|p| reach(p.value, child_cells, node_cells.0, &path[..depth]))
        {
            *limit = Some(limit.map_or(end, |l| l.min(end)));
        }
        path[depth] =
            Bus { ranges: child.property("ranges").map(|p| p.value), child_cells, parent_cells: node_cells.0 };
        walk(child, child_cells, path, depth + 1, limit);
    }
}

/// Where the highest window of one node's `dma-ranges` ends (exclusive, a CPU address);
/// `None` for an empty property or when no entry can be read and carried up.
fn reach(mut value: &[u8], cells: (usize, usize), parent_cells: usize, path: &[Bus<'_>]) -> Option<u64> {
    if !valid(cells.0, parent_cells, cells.1) {
        return None;
    }
    let mut end: Option<u64> = None;
    while !value.is_empty() {
        if value.len() < 4 * (cells.0 + parent_cells + cells.1) {
            break;
        }
        let _child = take(&mut value, cells.0);
        let (Some(parent), Some(size)) = (take(&mut value, parent_cells), take(&mut value, cells.1)) else {
            continue;
        };
        if size == 0 {
            continue;
        }
        // The window's last byte, carried up: its end is one past it.
        let Some(last) = parent.checked_add(size - 1).and_then(|l| to_cpu(l, path)) else { continue };
        let e = last.saturating_add(1);
        end = Some(end.map_or(e, |x| x.max(e)));
    }
    end
}
