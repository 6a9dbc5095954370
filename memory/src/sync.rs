//! The atomics of the lock-free structures loom model-checks (today the deferred-`vfree`
//! rings, `kernel/deferred.rs`): `core`'s in every build, loom's under `--cfg loom`, so
//! loom runs the real code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
