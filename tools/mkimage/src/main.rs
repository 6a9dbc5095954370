//! `mkimage ELF IMAGE`: writes the loadable segments of an AArch64 ELF as one flat binary
//! (what `objcopy -O binary` does), then checks that it starts with an arm64 Linux `Image`
//! header whose `image_size` covers the ELF's memory footprint (BSS and stacks included),
//! so a loader never places the DTB or an initrd on top of our BSS.
//!
//! A tool of our own because a fresh machine has no aarch64 objcopy (the toolchain's
//! `rust-objcopy` needs the `llvm-tools` component's libLLVM).

use std::process::ExitCode;

fn u16_at(b: &[u8], o: usize) -> Result<u64, String> {
    b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]) as u64).ok_or_else(|| "truncated ELF".into())
}
fn u32_at(b: &[u8], o: usize) -> Result<u64, String> {
    b.get(o..o + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()) as u64).ok_or_else(|| "truncated ELF".into())
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, String> {
    b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap())).ok_or_else(|| "truncated ELF".into())
}

/// One PT_LOAD segment: where it goes, its bytes in the file, its size in memory.
struct Segment {
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

fn segments(elf: &[u8]) -> Result<Vec<Segment>, String> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    if u16_at(elf, 18)? != 183 {
        return Err("not an AArch64 ELF (e_machine != EM_AARCH64)".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(elf, 32)?, u16_at(elf, 54)?, u16_at(elf, 56)?);
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = (phoff + i * phentsize) as usize;
        if u32_at(elf, ph)? != 1 {
            continue; // not PT_LOAD
        }
        out.push(Segment {
            offset: u64_at(elf, ph + 8)?,
            paddr: u64_at(elf, ph + 24)?,
            filesz: u64_at(elf, ph + 32)?,
            memsz: u64_at(elf, ph + 40)?,
        });
    }
    if out.is_empty() {
        return Err("no loadable segment".into());
    }
    Ok(out)
}

fn flatten(elf: &[u8]) -> Result<Vec<u8>, String> {
    let segs = segments(elf)?;
    let base = segs.iter().map(|s| s.paddr).min().unwrap_or(0);
    let file_end = segs.iter().filter(|s| s.filesz > 0).map(|s| s.paddr + s.filesz).max().unwrap_or(base);
    let mem_end = segs.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(base);
    let mut image = vec![0u8; (file_end - base) as usize];
    for s in segs.iter().filter(|s| s.filesz > 0) {
        let src = elf.get(s.offset as usize..(s.offset + s.filesz) as usize).ok_or("segment outside the file")?;
        let at = (s.paddr - base) as usize;
        image[at..at + src.len()].copy_from_slice(src);
    }
    // The arm64 Image header: magic "ARM\x64" at 56, image_size at 16.
    if image.get(56..60) != Some(b"ARM\x64") {
        return Err("the first loaded byte is not an arm64 Image header (magic ARM\\x64 at 56)".into());
    }
    let image_size = u64_at(&image, 16)?;
    if image_size < mem_end - base {
        return Err(format!("header image_size {image_size:#x} is below the memory footprint {:#x}", mem_end - base));
    }
    Ok(image)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: mkimage ELF IMAGE");
        return ExitCode::from(2);
    }
    let result = std::fs::read(&args[1])
        .map_err(|e| format!("{}: {e}", args[1]))
        .and_then(|elf| flatten(&elf))
        .and_then(|img| std::fs::write(&args[2], &img).map(|_| img.len()).map_err(|e| format!("{}: {e}", args[2])));
    match result {
        Ok(len) => {
            println!("mkimage: {} ({len} bytes, arm64 Image header checked)", args[2]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mkimage: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_elf() {
        assert!(flatten(b"hello world, this is not an ELF file at all").is_err());
    }
}
