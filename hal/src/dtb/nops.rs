//! `FDT_NOP` tokens in a device tree's structure block: counted, and removed in place.
//!
//! QEMU edits the tree it is given with `-dtb` (it replaces the memory nodes, fills in
//! `/chosen`), and libfdt deletes a node by overwriting it with `FDT_NOP` tokens. The
//! `flat_device_tree` crate stops looking through a node's children at the first NOP
//! between two siblings (`find_node`, `children`' subtree skip), so every node after the
//! old memory node — `/reserved-memory` and `/chosen` among them — went unseen: the
//! reserved ranges were handed out and the command line was lost. Boot therefore removes
//! the NOPs before the tree is parsed ([`strip_nops`]), and [`super::Platform::parse`]
//! refuses a blob that still has any ([`count_nops`]), so the crate never sees one.
//!
//! This is a token walk of the structure block (the five token kinds of the devicetree
//! specification, §5.4), not a second parser: it reads no property and no name.

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Why the structure block could not be walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

fn be32(blob: &[u8], at: usize) -> Result<u32, Malformed> {
    let bytes = blob.get(at..at.checked_add(4).ok_or(Malformed)?).ok_or(Malformed)?;
    Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn align4(n: usize) -> Result<usize, Malformed> {
    n.checked_add(3).map(|v| v & !3).ok_or(Malformed)
}

/// The structure block's bounds `(offset, size)` from the header, checked against the blob.
fn struct_block(blob: &[u8]) -> Result<(usize, usize), Malformed> {
    if be32(blob, 0)? != FDT_MAGIC {
        return Err(Malformed);
    }
    let total = be32(blob, 4)? as usize;
    let off = be32(blob, 8)? as usize;
    let size = be32(blob, 36)? as usize;
    let end = off.checked_add(size).ok_or(Malformed)?;
    if total > blob.len() || end > total || !off.is_multiple_of(4) {
        return Err(Malformed);
    }
    Ok((off, size))
}

/// The token at `at` of the structure block `block`: its kind and its length in bytes.
fn token(block: &[u8], at: usize) -> Result<(u32, usize), Malformed> {
    let kind = be32(block, at)?;
    let len = match kind {
        FDT_BEGIN_NODE => {
            let name = block.get(at + 4..).ok_or(Malformed)?;
            let nul = name.iter().position(|&b| b == 0).ok_or(Malformed)?;
            4 + align4(nul + 1)?
        }
        FDT_PROP => 12 + align4(be32(block, at + 4)? as usize)?,
        FDT_END_NODE | FDT_NOP | FDT_END => 4,
        _ => return Err(Malformed),
    };
    if at.checked_add(len).ok_or(Malformed)? > block.len() {
        return Err(Malformed);
    }
    Ok((kind, len))
}

/// How many `FDT_NOP` tokens the structure block holds.
///
/// # Errors
/// [`Malformed`] when the header or a token runs past the blob, a token is unknown, or
/// the block has no `FDT_END`.
pub fn count_nops(blob: &[u8]) -> Result<usize, Malformed> {
    let (off, size) = struct_block(blob)?;
    let block = &blob[off..off + size];
    let (mut at, mut nops) = (0, 0);
    loop {
        let (kind, len) = token(block, at)?;
        nops += usize::from(kind == FDT_NOP);
        if kind == FDT_END {
            return Ok(nops);
        }
        at += len;
    }
}

/// Removes every `FDT_NOP` token in place: later tokens move down, `size_dt_struct`
/// shrinks to match, and the freed tail of the block is zeroed. Returns how many were
/// removed. The blob's total size and its other blocks do not move.
///
/// # Errors
/// [`Malformed`] as [`count_nops`]; the blob is then unchanged (it is walked whole before
/// anything is written).
pub fn strip_nops(blob: &mut [u8]) -> Result<usize, Malformed> {
    let nops = count_nops(blob)?;
    if nops == 0 {
        return Ok(0);
    }
    let (off, size) = struct_block(blob)?;
    let block = &mut blob[off..off + size];
    // One pass: `write` never passes `read`, and a token is measured before it is moved,
    // so every token is read before anything is written over it.
    let (mut read, mut write) = (0, 0);
    loop {
        let (kind, len) = token(block, read)?;
        if kind != FDT_NOP {
            block.copy_within(read..read + len, write);
            write += len;
        }
        read += len;
        if kind == FDT_END {
            break;
        }
    }
    block[write..].fill(0);
    blob[36..40].copy_from_slice(&(write as u32).to_be_bytes());
    Ok(nops)
}
