//! Per-CPU vmalloc nodes, after Linux's `vmap_node`: each secondary CPU allocates from an
//! instance of its own, over a 1 TiB part of the window set aside in the global instance,
//! so CPUs allocate and free without sharing one lock.
//!
//! ```text
//!  VMALLOC_START                                                      VMALLOC_END
//!  | vm_map_ram | ioremaps, CPU 0's areas ... | node 1 | node 2 | ... | ... 128 TiB
//!     global instance (CPU 0, vmap, ioremap, huge alignments)  ^ 1 TiB each, reserved
//!                                                                in the global one
//! ```
//!
//! - An allocation on CPU *n* > 0 goes to node *n*'s instance, with its own lock, free
//!   space, busy tree, lazy list, quarantine, spare records and hot page table; one that
//!   node cannot place (larger than its window, or aligned beyond it) goes to the global
//!   instance. CPU 0 uses the global instance: at `-smp 1` there are no nodes at all.
//! - A free, `vrealloc`, `find_area`, `vmalloc_to_phys` or fault explanation finds the
//!   instance from the address alone (one shift and a table), whichever CPU calls.
//! - Each instance purges its own lazy list: a parked range is reused only after its own
//!   instance's flush (broadcast, so it covers every CPU), as before. `kernel::purge`
//!   purges them all.
//! - vmap, ioremap and `vm_map_ram`'s fallback stay in the global instance.
//!
//! Deviation from Linux 6.12: Linux's nodes share one free-space tree and keep per-node
//! busy trees, lazy lists and pools of ready areas; ours split the free space as well
//! (each node owns a fixed part of the 128 TiB window), which takes the free-space lock off
//! the shared path too.

extern crate alloc;

use alloc::vec::Vec;

use hal::kmap::{VMALLOC_END, VMALLOC_START};
use hal::{VirtAddr, VirtRange, PAGE_SIZE};
use spin::Once;

use super::KernelBackend;
use crate::vmalloc::{AreaKind, LockedVmalloc, Vmalloc, VmallocConfig, VmallocError};

/// Address space of one node (1 TiB).
pub const NODE_SIZE: u64 = 1 << 40;
/// Slots of `NODE_SIZE` in the window: the address-to-node table's length.
const SLOTS: usize = ((VMALLOC_END - VMALLOC_START) / NODE_SIZE) as usize;
const NO_NODE: u8 = u8::MAX;

struct Nodes {
    /// Node `i` belongs to CPU `i + 1`.
    nodes: Vec<LockedVmalloc<KernelBackend>>,
    /// Per 1 TiB slot of the window: the node there, or `NO_NODE`.
    by_slot: [u8; SLOTS],
}

static NODES: Once<Nodes> = Once::new();

/// Sets up a node for each CPU but the boot CPU (`cpus` CPUs in the device tree), from
/// `kernel::init`; `make` builds each node's backend.
pub(super) fn init(
    global: &LockedVmalloc<KernelBackend>,
    cpus: usize,
    config: VmallocConfig,
    make: impl Fn() -> KernelBackend,
) -> Result<(), VmallocError> {
    let count = cpus.saturating_sub(1).min(hal::dtb::MAX_CPUS - 1);
    let mut nodes = Vec::new();
    nodes.try_reserve_exact(count).map_err(|_| VmallocError::NoRecords)?;
    let mut by_slot = [NO_NODE; SLOTS];
    for i in 0..count {
        let pages = (NODE_SIZE / PAGE_SIZE as u64) as usize;
        let start = global.with_ready(|v| v.reserve_as(pages, NODE_SIZE as usize, AreaKind::Node))??;
        let range = VirtRange::new(start, NODE_SIZE).map_err(|_| VmallocError::BadRange)?;
        let vm = Vmalloc::new(make(), range, config)?;
        nodes.push(LockedVmalloc::new(vm));
        by_slot[((start.as_u64() - VMALLOC_START) / NODE_SIZE) as usize] = i as u8;
    }
    NODES.call_once(|| Nodes { nodes, by_slot });
    Ok(())
}

/// The node of CPU `cpu` (`None` for the boot CPU, or before `init`).
#[inline]
pub(super) fn of_cpu(cpu: usize) -> Option<&'static LockedVmalloc<KernelBackend>> {
    NODES.get()?.nodes.get(cpu.checked_sub(1)?)
}

/// The node whose window holds `addr`, if any.
#[inline]
pub(super) fn of_addr(addr: VirtAddr) -> Option<&'static LockedVmalloc<KernelBackend>> {
    let n = NODES.get()?;
    let off = addr.as_u64().checked_sub(VMALLOC_START)?;
    let i = *n.by_slot.get((off / NODE_SIZE) as usize)?;
    n.nodes.get(usize::from(i))
}

/// Every node, in address order (CPU 1's first).
pub(super) fn all() -> impl Iterator<Item = &'static LockedVmalloc<KernelBackend>> {
    NODES.get().into_iter().flat_map(|n| n.nodes.iter())
}

/// The window the nodes cover, `[first start, last end)` (`None` without nodes).
pub(super) fn span() -> Option<(u64, u64)> {
    let n = NODES.get()?;
    let lo = n.nodes.iter().map(|v| v.range().start().as_u64()).min()?;
    let hi = n.nodes.iter().map(|v| v.range().end().as_u64()).max()?;
    Some((lo, hi))
}
