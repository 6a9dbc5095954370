//! On-target test runner (placeholder).
#![no_std]
