//! Area records: one heap object per virtual range, living in exactly one place at a time.
//!
//! A record ([`Node`]) describes `[start, end)` of the vmalloc window. Like Linux's
//! `struct vmap_area` it moves between homes without being copied:
//!
//! ```text
//!   spare pool ──clip──▶ busy tree (live) ──vfree──▶ parked list ──purge──▶ free tree
//!        ▲                    ▲                         │ purge (≤ 256 pages)  ▲  │
//!        │                    └──── its size again ── ready pool ─next purge──┘  │
//!        └────────────────────── merged into a neighbour hole ◀──────────────────┘
//! ```
//!
//! Records are reached through [`NodePtr`], a raw pointer to a heap-allocated node. All
//! fields are `Cell`s, so a record is only ever accessed through shared references and no
//! two `&mut` to one record can exist; the only `unsafe` is turning the pointer into a
//! reference, justified once by the ownership invariant below.
//!
//! **Ownership invariant.** Every `NodePtr` ever created comes from [`NodePool::alloc_new`]
//! (a `Node` written into a block of the global allocator) and is owned by exactly one pool
//! or allocator. It is freed only by
//! [`NodePool::free_one`], which is called on a record that has been unlinked from every
//! tree and list, after which no copy of the pointer is used again.
//!
//! **Out of memory.** A record allocation may fail (the global allocator returns null, or
//! [`crate::fault`] injects a failure): [`NodePool::alloc_new`] then returns `None`, and
//! every caller turns that into [`super::VmallocError::NoRecords`] with nothing changed.
//! (`Box::new` would call `handle_alloc_error`, a panic in the kernel.)

use super::alloc::alloc::{alloc, dealloc, Layout};
use core::cell::Cell;
use core::panic::Location;
use core::ptr::NonNull;

use super::AreaKind;

/// An optional link to a record.
pub(crate) type Link = Option<NodePtr>;

/// Where a record currently lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// In a spare pool, its range meaningless.
    Spare,
    /// A hole in the free tree.
    Free,
    /// A live area, in the busy tree (or the allocator's pending slot).
    Busy,
    /// A freed area on the parked list, unmapped but waiting for its TLB flush.
    Parked,
    /// A flushed range in a pool of ready-made areas (`pool.rs`).
    Pooled,
}

/// One range record. Tree links and keys first, the record cache-line aligned: the search
/// and rebalance loops touch only its first 64-byte line.
#[repr(C, align(64))]
pub(crate) struct Node {
    pub left: Cell<Link>,
    pub right: Cell<Link>,
    pub parent: Cell<Link>,
    /// First byte of the range.
    pub start: Cell<u64>,
    /// First byte past the range (for areas: past the guard page).
    pub end: Cell<u64>,
    /// Free tree only: the largest `end - start` in this subtree.
    pub max: Cell<u64>,
    /// AVL height of the subtree rooted here (a leaf is 1).
    pub height: Cell<u8>,
    pub state: Cell<State>,
    pub kind: Cell<AreaKind>,
    /// [`super::VmFlags`] bits the area was made with.
    pub flags: Cell<u8>,
    /// log2 of the area's requested alignment (pointer alignment for end-aligned areas).
    pub align_shift: Cell<u8>,
    /// Offset of the pointer handed out from `start` (end-aligned placement, ioremap).
    pub offset: Cell<u32>,
    /// Pages mapped from `start`.
    pub pages: Cell<usize>,
    /// Bytes requested.
    pub bytes: Cell<usize>,
    /// Ioremap: the page-aligned physical base.
    pub phys: Cell<u64>,
    /// Who created the area.
    pub caller: Cell<&'static Location<'static>>,
    /// Who freed it (parked areas).
    pub freer: Cell<Option<&'static Location<'static>>>,
    /// Spare pool or parked list link.
    pub next: Cell<Link>,
}

impl Node {
    fn blank() -> Self {
        Self {
            left: Cell::new(None),
            right: Cell::new(None),
            parent: Cell::new(None),
            start: Cell::new(0),
            end: Cell::new(0),
            max: Cell::new(0),
            height: Cell::new(0),
            state: Cell::new(State::Spare),
            kind: Cell::new(AreaKind::Vmalloc),
            flags: Cell::new(0),
            align_shift: Cell::new(0),
            offset: Cell::new(0),
            pages: Cell::new(0),
            bytes: Cell::new(0),
            phys: Cell::new(0),
            caller: Cell::new(Location::caller()),
            freer: Cell::new(None),
            next: Cell::new(None),
        }
    }

    /// Size of the range in bytes.
    #[inline(always)]
    pub fn size(&self) -> u64 {
        self.end.get() - self.start.get()
    }
}

// Compile-time: a record is all `Cell`s, so neither it nor a pointer to it may be shared
// between cores (`Sync`) or sent alone (`Send`); a pool moves whole (its `unsafe impl
// Send`) but is never shared. Each line fails to build (E0283, ambiguous) if the auto trait
// named were implemented (the `static_assertions::assert_not_impl_any` construction).
const _: () = {
    trait AmbiguousIfSendOrSync<A> {
        fn some_item() {}
    }
    impl<T: ?Sized> AmbiguousIfSendOrSync<()> for T {}
    struct IfSync;
    impl<T: ?Sized + Sync> AmbiguousIfSendOrSync<IfSync> for T {}
    struct IfSend;
    impl<T: ?Sized + Send> AmbiguousIfSendOrSync<IfSend> for T {}
    let _ = <Node as AmbiguousIfSendOrSync<_>>::some_item;
    let _ = <NodePtr as AmbiguousIfSendOrSync<_>>::some_item;

    trait AmbiguousIfSync<A> {
        fn some_item() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    impl<T: ?Sized + Sync> AmbiguousIfSync<IfSync> for T {}
    let _ = <NodePool as AmbiguousIfSync<_>>::some_item;
};

/// A pointer to a live record (see the module's ownership invariant).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct NodePtr(NonNull<Node>);

impl NodePtr {
    /// The record, borrowed for as long as this copy of the pointer is.
    ///
    /// The lifetime is not the caller's to choose: the reference cannot outlive the
    /// `NodePtr` it came from, and the only way to free a record, [`NodePool::free_one`],
    /// is `unsafe` with the promise that no copy of its pointer (nor a reference from one)
    /// is used afterwards.
    #[inline(always)]
    pub fn get(&self) -> &Node {
        // SAFETY: by the ownership invariant the pointer comes from `NodePool::alloc_new`
        // (a `Node` written into a block of the global allocator, so live and well aligned)
        // and is freed only by `free_one`, whose caller promises that no copy of it or
        // reference from one is used afterwards; so the record outlives `&self` here. All
        // fields are `Cell`s, so shared references never alias a `&mut`.
        unsafe { self.0.as_ref() }
    }
}

/// A stack of spare records, linked through `next`.
pub(crate) struct NodePool {
    head: Link,
    len: usize,
    /// Records allocated from the heap and not yet freed, wherever they are now.
    pub live_records: usize,
}

impl NodePool {
    pub const fn new() -> Self {
        Self { head: None, len: 0, live_records: 0 }
    }

    /// Spare records on the stack.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// A fresh record from the heap (the global allocator), or `None` when the heap has
    /// none (or a failure is injected).
    pub fn alloc_new(&mut self) -> Option<NodePtr> {
        if crate::fault::should_fail() {
            return None;
        }
        let layout = Layout::new::<Node>();
        // SAFETY: `Node` is not zero-sized, so the layout is valid for `alloc`.
        let raw = unsafe { alloc(layout) }.cast::<Node>();
        let ptr = NonNull::new(raw)?;
        // SAFETY: `ptr` is a fresh block of `Node`'s size and alignment, owned by us.
        unsafe { ptr.as_ptr().write(Node::blank()) };
        self.live_records += 1;
        Some(NodePtr(ptr))
    }

    /// Allocate records from the heap until `len() >= want`. Returns `false` when the heap
    /// ran out first; the records obtained until then stay in the pool.
    pub fn fill_to(&mut self, want: usize) -> bool {
        while self.len < want {
            let Some(n) = self.alloc_new() else { return false };
            self.push(n);
        }
        true
    }

    /// Take a spare record.
    #[inline(always)]
    pub fn pop(&mut self) -> Option<NodePtr> {
        let n = self.head?;
        self.head = n.get().next.get();
        self.len -= 1;
        n.get().next.set(None);
        Some(n)
    }

    /// Keep a record that is linked nowhere else.
    #[inline(always)]
    pub fn push(&mut self, n: NodePtr) {
        let node = n.get();
        node.state.set(State::Spare);
        node.left.set(None);
        node.right.set(None);
        node.parent.set(None);
        node.next.set(self.head);
        self.head = Some(n);
        self.len += 1;
    }

    /// Return one record to the heap.
    ///
    /// # Safety
    /// `n` is linked nowhere (no tree, list or pool holds it) and neither it, nor any copy
    /// of it, nor a reference obtained from one by [`NodePtr::get`], is used after the call.
    pub unsafe fn free_one(&mut self, n: NodePtr) {
        self.live_records -= 1;
        // SAFETY: the record came from `alloc` with this layout in `alloc_new` and, by the
        // ownership invariant, is linked nowhere and its pointer is not used after this
        // call. `Node` has no drop glue (only `Cell`s of `Copy` data).
        unsafe { dealloc(n.0.as_ptr().cast(), Layout::new::<Node>()) };
    }

    /// Move spare records beyond `keep` into `out`.
    pub fn split_excess(&mut self, keep: usize, out: &mut NodePool) {
        while self.len > keep {
            if let Some(n) = self.pop() {
                self.live_records -= 1;
                out.live_records += 1;
                out.push(n);
            }
        }
    }

    /// Move every record of `other` here.
    pub fn absorb(&mut self, other: &mut NodePool) {
        while let Some(n) = other.pop() {
            other.live_records -= 1;
            self.live_records += 1;
            self.push(n);
        }
    }

    /// Free spare records beyond `keep`.
    pub fn trim(&mut self, keep: usize) {
        while self.len > keep {
            if let Some(n) = self.pop() {
                // SAFETY: `pop` took the record off this pool, its only home; the pool
                // keeps no copy and `n` is not used again.
                unsafe { self.free_one(n) };
            }
        }
    }
}

impl Drop for NodePool {
    fn drop(&mut self) {
        self.trim(0);
    }
}

// SAFETY: a pool owns its records exclusively (ownership invariant): no other pool, tree or
// thread holds a pointer to them, so moving the pool to another core moves that ownership
// with it, and the `Cell`s inside are then touched by that core alone. `NodePool` is not
// `Sync` (it holds `NodePtr`s, which are not), so two cores never use one pool at once.
unsafe impl Send for NodePool {}

/// Records allocated outside the vmalloc lock, to be handed to an allocator with
/// [`super::Vmalloc::add_spares`], or records it gave back with
/// [`super::Vmalloc::take_excess_spares`], freed when dropped (outside the lock).
///
/// The records are `Cell`-based: a `Spares` may move to another core (`Send`) but never be
/// shared by two at once, so it is not `Sync`:
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>() {}
/// shared::<memory::vmalloc::Spares>();
/// ```
pub struct Spares {
    pub(crate) pool: NodePool,
}

impl Spares {
    /// No records.
    pub const fn empty() -> Self {
        Self { pool: NodePool::new() }
    }

    /// `n` fresh records from the global allocator.
    ///
    /// # Errors
    /// [`super::VmallocError::NoRecords`] when the heap cannot give all `n`; the records
    /// obtained are freed again.
    ///
    /// # Example
    /// ```no_run
    /// let spares = memory::vmalloc::Spares::new(16)?;
    /// assert_eq!(spares.len(), 16);
    /// # Ok::<(), memory::vmalloc::VmallocError>(())
    /// ```
    pub fn new(n: usize) -> Result<Self, super::VmallocError> {
        let mut s = Self::up_to(n);
        if s.len() < n {
            s.pool.trim(0);
            return Err(super::VmallocError::NoRecords);
        }
        Ok(s)
    }

    /// Up to `n` fresh records: as many as the heap gives.
    pub(crate) fn up_to(n: usize) -> Self {
        let mut pool = NodePool::new();
        pool.fill_to(n);
        Self { pool }
    }

    /// How many records this holds.
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    /// Whether this holds no record.
    pub fn is_empty(&self) -> bool {
        self.pool.len() == 0
    }
}

impl core::fmt::Debug for Spares {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Spares({})", self.len())
    }
}
