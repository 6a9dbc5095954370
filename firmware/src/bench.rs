//! Linux's `lib/test_vmalloc.c` workloads on our vmalloc (placeholder; see issue 5).

use hal::boot::BootInfo;

/// Whether the command line asks for the bench instead of the boot report.
pub fn requested(info: &BootInfo) -> bool {
    info.cmdline().params().flatten().any(|p| p.key.starts_with("test_vmalloc."))
}

/// Runs the cases the command line selects and returns whether all passed.
pub fn run(_info: &BootInfo) -> bool {
    true
}
