//! # memory — physical and virtual memory management (placeholder)
#![cfg_attr(not(test), no_std)]

pub mod buddy;
pub mod ioremap;
pub mod kernel;
pub mod slab;
pub mod vmalloc;
