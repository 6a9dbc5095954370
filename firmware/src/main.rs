//! The firmware image (placeholder).
#![no_std]
#![no_main]
