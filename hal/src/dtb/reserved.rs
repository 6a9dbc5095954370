//! Reserved memory: the `/memreserve/` block and the children of `/reserved-memory`
//! (devicetree bindings `reserved-memory.yaml`), as boot must honour them.
//!
//! - A child with `reg` reserves those ranges; one with `no-map` is also left out of the
//!   linear map (no cacheable alias of memory the firmware or another master owns).
//! - A child with `size` and no `reg` is placed here, top-down as Linux's memblock places
//!   it, within its `alloc-ranges` (else anywhere in RAM), at its `alignment` (at least a
//!   page), clear of every other reservation and of the ranges boot names (the image);
//!   one that cannot be placed is refused by name.
//! - `status = "disabled"` children are skipped, as Linux skips them.
//! - A `/reserved-memory` node whose `ranges` is not empty (a translated address space)
//!   is refused: its children's addresses would not be physical ones.

use super::{is_disabled, DtbError};
use crate::addr::{PhysAddr, PhysRange, PAGE_SIZE};
use core::fmt;
use flat_device_tree::node::CellSize;
use flat_device_tree::Fdt;

/// How many reserved ranges boot accepts, `/memreserve/` entries and `/reserved-memory`
/// children together. A tree with more is refused by name and count
/// ([`DtbError::TooMany`]), never cut.
pub const MAX_RESERVED: usize = 128;

/// How many of them may be `size`-only children, placed at boot.
pub const MAX_DYNAMIC: usize = 16;

/// Where a reserved range came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservedKind {
    /// A `/memreserve/` entry of the blob's header.
    MemReserve,
    /// A `/reserved-memory` child with `reg`.
    Static,
    /// A `/reserved-memory` child with `size` only, placed at boot.
    Dynamic,
}

/// One reserved range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    /// The bytes reserved.
    pub range: PhysRange,
    /// The node's name (`"/memreserve/"` for header entries).
    pub name: &'static str,
    /// `no-map`: not in the linear map either.
    pub no_map: bool,
    /// Where it came from.
    pub kind: ReservedKind,
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#012x}-{:#012x} ({} KiB) {}",
            self.range.start(),
            self.range.end().as_u64(),
            self.range.size() >> 10,
            self.name
        )?;
        if self.kind == ReservedKind::Dynamic {
            f.write_str(" [placed at boot]")?;
        }
        if self.no_map {
            f.write_str(" [no-map]")?;
        }
        Ok(())
    }
}

const NONE: Reserved = Reserved {
    range: match PhysRange::new(PhysAddr::new(0), 1) {
        Ok(r) => r,
        Err(_) => panic!("one byte at 0 is a range"),
    },
    name: "",
    no_map: false,
    kind: ReservedKind::MemReserve,
};

/// The reserved ranges, in the order the tree gives them (dynamic ones last).
#[derive(Clone, Copy)]
pub struct ReservedList {
    items: [Reserved; MAX_RESERVED],
    len: usize,
}

impl ReservedList {
    /// An empty list.
    pub const fn new() -> Self {
        Self { items: [NONE; MAX_RESERVED], len: 0 }
    }

    fn push(&mut self, r: Reserved) -> Result<(), DtbError> {
        let slot = self.items.get_mut(self.len).ok_or(DtbError::TooMany {
            what: "reserved ranges",
            found: 0,
            max: MAX_RESERVED,
        })?;
        *slot = r;
        self.len += 1;
        Ok(())
    }

    /// Every reserved range.
    pub fn iter(&self) -> impl Iterator<Item = &Reserved> + '_ {
        self.items[..self.len].iter()
    }

    /// The reserved byte ranges.
    pub fn ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.iter().map(|r| r.range)
    }

    /// The `no-map` ranges.
    pub fn no_map(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.iter().filter(|r| r.no_map).map(|r| r.range)
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `pa` is reserved.
    pub fn contains(&self, pa: PhysAddr) -> bool {
        self.ranges().any(|r| r.contains(pa))
    }

    /// Whether `range` overlaps a reserved range.
    pub fn overlaps(&self, range: &PhysRange) -> bool {
        self.ranges().any(|r| r.overlaps(range))
    }
}

impl Default for ReservedList {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ReservedList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

fn cells(size: CellSize) -> Option<usize> {
    match size {
        CellSize::One => Some(1),
        CellSize::Two => Some(2),
        _ => None,
    }
}

/// Reads one number of `n` cells (1 or 2) from `bytes` at `*at`.
fn read_cells(bytes: &[u8], at: &mut usize, n: usize) -> Option<u64> {
    let mut v = 0u64;
    for _ in 0..n {
        let b = bytes.get(*at..*at + 4)?;
        v = (v << 32) | u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        *at += 4;
    }
    Some(v)
}

/// A `size`-only child, waiting to be placed.
#[derive(Clone, Copy)]
struct Request {
    name: &'static str,
    size: u64,
    align: u64,
    no_map: bool,
    /// `alloc-ranges`: up to 8 windows (none: anywhere in RAM).
    windows: [Option<PhysRange>; 8],
}

/// Reads `/memreserve/` and `/reserved-memory` into `out`, placing the dynamic children
/// in `ram` clear of `avoid`.
pub(super) fn parse(
    fdt: &Fdt<'static>,
    ram: &super::RangeList,
    avoid: &[PhysRange],
    out: &mut ReservedList,
) -> Result<(), DtbError> {
    let mut found = 0usize;
    for res in fdt.memory_reservations() {
        found += 1;
        if res.size() == 0 {
            continue;
        }
        let range = PhysRange::new(PhysAddr::new(res.address() as u64), res.size() as u64)
            .map_err(|_| DtbError::BadReserved("/memreserve/"))?;
        if found <= MAX_RESERVED {
            out.push(Reserved { range, name: "/memreserve/", no_map: false, kind: ReservedKind::MemReserve })?;
        }
    }
    let mut requests: [Option<Request>; MAX_DYNAMIC] = [None; MAX_DYNAMIC];
    let mut nreq = 0;
    if let Some(node) = fdt.find_node("/reserved-memory") {
        let sizes = node.cell_sizes();
        let (Some(ac), Some(sc)) = (cells(sizes.address_cells), cells(sizes.size_cells)) else {
            return Err(DtbError::BadReserved("/reserved-memory (#address-cells or #size-cells not 1 or 2)"));
        };
        if node.property("ranges").is_some_and(|p| !p.value.is_empty()) {
            return Err(DtbError::BadReserved("/reserved-memory (non-empty ranges: translated addresses)"));
        }
        for child in node.children() {
            if is_disabled(child) {
                continue;
            }
            let name: &'static str = child.name;
            let no_map = child.property("no-map").is_some();
            if let Some(reg) = child.property("reg") {
                let (bytes, mut at) = (reg.value, 0);
                while at < bytes.len() {
                    let (Some(base), Some(size)) = (read_cells(bytes, &mut at, ac), read_cells(bytes, &mut at, sc))
                    else {
                        return Err(DtbError::BadReserved(name));
                    };
                    found += 1;
                    if size == 0 {
                        continue;
                    }
                    let range = PhysRange::new(PhysAddr::new(base), size).map_err(|_| DtbError::BadReserved(name))?;
                    if found <= MAX_RESERVED {
                        out.push(Reserved { range, name, no_map, kind: ReservedKind::Static })?;
                    }
                }
            } else if let Some(size) = child.property("size") {
                let mut at = 0;
                let size = read_cells(size.value, &mut at, sc).filter(|&s| s > 0).ok_or(DtbError::BadReserved(name))?;
                let align = match child.property("alignment") {
                    Some(p) => {
                        let mut at = 0;
                        read_cells(p.value, &mut at, sc)
                            .filter(|a| a.is_power_of_two())
                            .ok_or(DtbError::BadReserved(name))?
                    }
                    None => PAGE_SIZE as u64,
                }
                .max(PAGE_SIZE as u64);
                let mut windows = [None; 8];
                if let Some(p) = child.property("alloc-ranges") {
                    let (bytes, mut at, mut i) = (p.value, 0, 0);
                    while at < bytes.len() {
                        let (Some(b), Some(s)) = (read_cells(bytes, &mut at, ac), read_cells(bytes, &mut at, sc))
                        else {
                            return Err(DtbError::BadReserved(name));
                        };
                        let w = PhysRange::new(PhysAddr::new(b), s).map_err(|_| DtbError::BadReserved(name))?;
                        *windows.get_mut(i).ok_or(DtbError::BadReserved(name))? = Some(w);
                        i += 1;
                    }
                }
                found += 1;
                if let Some(slot) = requests.get_mut(nreq) {
                    *slot = Some(Request { name, size, align, no_map, windows });
                }
                nreq += 1;
            } else {
                return Err(DtbError::BadReserved(name));
            }
        }
    }
    if nreq > MAX_DYNAMIC {
        return Err(DtbError::TooMany { what: "size-only reserved-memory children", found: nreq, max: MAX_DYNAMIC });
    }
    if found > MAX_RESERVED {
        return Err(DtbError::TooMany { what: "reserved ranges", found, max: MAX_RESERVED });
    }
    for req in requests.iter().flatten() {
        let range = place(req, ram, avoid, out).ok_or(DtbError::CannotPlace(req.name))?;
        out.push(Reserved { range, name: req.name, no_map: req.no_map, kind: ReservedKind::Dynamic })?;
    }
    Ok(())
}

/// The highest `req.align`-aligned range of `req.size` bytes inside RAM and one of the
/// request's windows, overlapping neither a reservation nor `avoid`.
fn place(req: &Request, ram: &super::RangeList, avoid: &[PhysRange], taken: &ReservedList) -> Option<PhysRange> {
    let anywhere = [PhysRange::new(PhysAddr::new(0), u64::MAX).ok()];
    let windows: &[Option<PhysRange>] = if req.windows[0].is_some() { &req.windows } else { &anywhere };
    let busy = |r: &PhysRange| taken.ranges().chain(avoid.iter().copied()).find(|o| o.overlaps(r));
    let mut best: Option<PhysRange> = None;
    for window in windows.iter().flatten() {
        for region in ram.iter() {
            let lo = region.start().as_u64().max(window.start().as_u64());
            let hi = region.end().as_u64().min(window.end().as_u64());
            // Top-down: the highest aligned start whose range ends by `hi`, stepping below
            // whatever it overlaps.
            let mut top = hi;
            while let Some(start) = top.checked_sub(req.size).map(|s| s & !(req.align - 1)) {
                if start < lo {
                    break;
                }
                let candidate = PhysRange::new(PhysAddr::new(start), req.size).ok()?;
                match busy(&candidate) {
                    Some(o) => top = o.start().as_u64(),
                    None => {
                        if best.is_none_or(|b| b.start() < candidate.start()) {
                            best = Some(candidate);
                        }
                        break;
                    }
                }
            }
        }
    }
    best
}
