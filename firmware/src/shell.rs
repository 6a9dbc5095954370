//! A small line-editing shell on the UART (`-append shell=1`): inspect and poke the memory
//! system by hand. Every memory access goes through `hal::probe`, so a bad address prints
//! the fault and its explanation and the shell carries on.

use alloc::string::String;
use hal::cmdline::parse_u64;
use hal::exception::Fault;
use hal::{print, println, PhysAddr, VirtAddr};
use memory::kernel;
use memory::vmalloc::DeviceAttr;

const HELP: &str = "\
commands:
  help                      this list
  meminfo                   frames, slab, vmalloc counters
  buddyinfo | zoneinfo | slabinfo | vmallocinfo
  vmalloc SIZE              allocate SIZE bytes (prints the address; `$` names it later)
  vmalloc_huge SIZE         the same with 2 MiB blocks where they fit (vmallocinfo says `huge`)
  vfree ADDR                free a vmalloc area
  purge                     flush the TLB for parked ranges and return them to free space
  ioremap PHYS SIZE         map a device range (Device-nGnRE)
  iounmap ADDR              undo an ioremap
  peek ADDR                 read a 64-bit word (faults are reported, not fatal)
  poke ADDR VALUE           write a 64-bit word
  scullv write N|read|trim  the scullv RAM device: write N KiB, read back and check, free
  poweroff                  leave QEMU
numbers: decimal or 0x hex; `$` is the last address a command returned, `$+N` adds N";

struct Shell {
    last: u64,
    scull: scullv::ScullV,
}

fn report_fault(what: &str, addr: u64, f: Fault) {
    println!("{what} {addr:#x}: {f}");
    let mut text = String::new();
    if hal::exception::explain(addr, &mut text) {
        print!("  {text}");
        if !text.ends_with('\n') {
            println!();
        }
    } else {
        println!("  (no owner known for this address)");
    }
}

impl Shell {
    fn scullv(&mut self, sub: Option<&str>, arg: Option<&str>) {
        match (sub, arg.and_then(parse_u64)) {
            (Some("write"), Some(kib)) => {
                let chunk = [0u8; 1024];
                let mut at = self.scull.size();
                for i in 0..kib {
                    let mut buf = chunk;
                    buf.iter_mut().enumerate().for_each(|(j, b)| *b = (i as usize + j) as u8);
                    if let Err(e) = self.scull.write(at, &buf) {
                        println!("scullv write: {e}");
                        return;
                    }
                    at += buf.len();
                }
                let s = self.scull.stats();
                println!("scullv: {} bytes in {} quanta", s.size, s.quanta);
            }
            (Some("read"), None) => {
                let mut buf = [0u8; 4096];
                let (mut at, mut sum) = (0usize, 0u64);
                loop {
                    let n = self.scull.read(at, &mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    sum = buf[..n].iter().fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
                    at += n;
                }
                println!("scullv: read {at} bytes, checksum {sum:#018x}");
            }
            (Some("trim"), None) => {
                let q = self.scull.stats().quanta;
                self.scull.trim();
                println!("scullv: trimmed, {q} quanta freed");
            }
            _ => println!("usage: scullv write KIB | scullv read | scullv trim"),
        }
    }

    fn number(&self, word: Option<&str>) -> Option<u64> {
        let w = word?;
        if let Some(rest) = w.strip_prefix('$') {
            return match rest.strip_prefix('+') {
                None if rest.is_empty() => Some(self.last),
                Some(n) => self.last.checked_add(parse_u64(n)?),
                None => None,
            };
        }
        parse_u64(w)
    }

    fn run(&mut self, line: &str) -> bool {
        let mut words = line.split_ascii_whitespace();
        let Some(cmd) = words.next() else { return true };
        let a = words.next();
        let b = words.next();
        match cmd {
            "help" | "?" => println!("{HELP}"),
            "meminfo" => meminfo(),
            "buddyinfo" => match memory::buddy::stats() {
                Some(s) => println!("{}\n(hot list: {} order-0 frames)", s.buddyinfo(), s.hot_pages),
                None => println!("buddy allocator not initialised"),
            },
            "zoneinfo" => match memory::buddy::stats() {
                Some(s) => println!("{}", s.zoneinfo()),
                None => println!("buddy allocator not initialised"),
            },
            "slabinfo" => match memory::slab::slabinfo() {
                Some(si) => print!("{si}"),
                None => println!("slab allocator not initialised"),
            },
            "vmallocinfo" => {
                let _ = kernel::write_vmallocinfo(&mut hal::console::Console);
            }
            "vmalloc" | "vmalloc_huge" => match self.number(a) {
                Some(size) => {
                    let r = if cmd == "vmalloc" {
                        kernel::vmalloc(size as usize)
                    } else {
                        kernel::vmalloc_huge(size as usize)
                    };
                    match r {
                        Ok(va) => {
                            self.last = va.as_u64();
                            println!("{cmd}({size}) = {va:#x}");
                        }
                        Err(e) => println!("{cmd}({size}): {e}"),
                    }
                }
                None => println!("usage: {cmd} SIZE"),
            },
            "vfree" => match self.number(a) {
                Some(addr) => match kernel::vfree(VirtAddr::new(addr)) {
                    Ok(()) => println!("vfree({addr:#x}): ok (parked until the next purge)"),
                    Err(e) => println!("vfree({addr:#x}): {e}"),
                },
                None => println!("usage: vfree ADDR"),
            },
            "purge" => {
                let before = kernel::vmalloc_stats().map(|s| s.parked_areas).unwrap_or(0);
                kernel::purge();
                println!("purged {before} parked areas");
            }
            "ioremap" => match (self.number(a), self.number(b)) {
                (Some(pa), Some(size)) => {
                    match kernel::ioremap_attr(PhysAddr::new(pa), size as usize, DeviceAttr::DeviceNGnRE) {
                        Ok(va) => {
                            self.last = va.as_u64();
                            println!("ioremap({pa:#x}, {size}) = {va:#x}");
                        }
                        Err(e) => println!("ioremap({pa:#x}, {size}): {e}"),
                    }
                }
                _ => println!("usage: ioremap PHYS SIZE"),
            },
            "iounmap" => match self.number(a) {
                Some(addr) => match kernel::iounmap(VirtAddr::new(addr)) {
                    Ok(()) => println!("iounmap({addr:#x}): ok"),
                    Err(e) => println!("iounmap({addr:#x}): {e}"),
                },
                None => println!("usage: iounmap ADDR"),
            },
            "peek" => match self.number(a) {
                Some(addr) if addr % 8 == 0 => match hal::probe::read_u64(addr as usize) {
                    Ok(v) => println!("{addr:#x}: {v:#018x}"),
                    Err(f) => report_fault("peek", addr, f),
                },
                Some(_) => println!("peek: address must be 8-byte aligned"),
                None => println!("usage: peek ADDR"),
            },
            "poke" => match (self.number(a), self.number(b)) {
                (Some(addr), Some(v)) if addr % 8 == 0 => {
                    // SAFETY: a debugging tool: the user chose the address. A write to memory
                    // Rust code owns can corrupt it, as in any monitor; faults are contained.
                    match unsafe { hal::probe::write_u64(addr as usize, v) } {
                        Ok(()) => println!("{addr:#x} <- {v:#x}"),
                        Err(f) => report_fault("poke", addr, f),
                    }
                }
                (Some(_), Some(_)) => println!("poke: address must be 8-byte aligned"),
                _ => println!("usage: poke ADDR VALUE"),
            },
            "scullv" => self.scullv(a, b),
            "poweroff" | "exit" | "quit" => return false,
            other => println!("unknown command '{other}' (try help)"),
        }
        true
    }
}

/// Prints the frame, slab and vmalloc counters.
pub fn meminfo() {
    if let Some(s) = memory::buddy::stats() {
        println!("MemTotal:      {:>10} kB", s.total_pages * 4);
        println!("MemFree:       {:>10} kB", s.free_pages * 4);
    }
    if let Some(s) = memory::slab::stats() {
        println!("Slab:          {:>10} kB", s.slab_pages * 4);
        println!("KmallocLarge:  {:>10} kB", s.large_pages * 4);
    }
    if let Some(s) = kernel::vmalloc_stats() {
        println!("VmallocUsed:   {:>10} kB  ({} areas)", s.mapped_pages * 4, s.live_areas);
        let lazy_max = kernel::vmalloc_instance().map_or(0, |v| v.lock().config().lazy_max_pages);
        println!(
            "VmallocParked: {:>10} kB  ({} areas, purge at {} pages per instance)",
            s.parked_pages * 4,
            s.parked_areas,
            lazy_max
        );
        println!("VmallocPooled: {:>10} kB  ({} ready-made areas)", s.pooled_pages * 4, s.pooled_areas);
        println!(
            "VmallocTables: {:>10} kB  ({} table pages given back by purges)",
            kernel::vmalloc_table_pages() * 4,
            s.tables_freed
        );
        println!(
            "Quarantined:   {:>10} kB  ({} writes after vfree caught)",
            s.quarantined_frames * 4,
            s.quarantine_hits
        );
        println!(
            "Purges:        {:>10}     ({} TLB page ops in {} batches, {} full flushes; max {} us, p99 {} us)",
            s.purges,
            s.tlb_page_ops,
            s.tlb_page_batches,
            s.tlb_full_flushes,
            s.purge_ns_max / 1000,
            s.purge_ns_p99 / 1000
        );
    }
    print!("{}", memory::reclaim::stats());
}

fn read_line(buf: &mut String) -> bool {
    buf.clear();
    loop {
        let Some(b) = hal::console::try_read_byte() else {
            core::hint::spin_loop();
            continue;
        };
        match b {
            b'\r' | b'\n' => {
                println!();
                return true;
            }
            0x08 | 0x7f if buf.pop().is_some() => print!("\x08 \x08"),
            0x15 => {
                // Ctrl-U: kill the line.
                for _ in 0..buf.len() {
                    print!("\x08 \x08");
                }
                buf.clear();
            }
            0x04 => return false, // Ctrl-D
            0x20..=0x7e if buf.len() < 256 => {
                buf.push(b as char);
                print!("{}", b as char);
            }
            _ => {}
        }
    }
}

/// Runs the shell until `poweroff` (or Ctrl-D).
pub fn run() {
    println!("\nmemory shell — type `help`");
    let mut shell = Shell {
        last: 0,
        scull: scullv::ScullV::new(scullv::DEFAULT_ORDER, scullv::DEFAULT_QSET).expect("default geometry"),
    };
    let mut line = String::new();
    loop {
        print!("mm> ");
        if !read_line(&mut line) {
            break;
        }
        if !shell.run(line.trim()) {
            break;
        }
    }
    println!("bye");
}
