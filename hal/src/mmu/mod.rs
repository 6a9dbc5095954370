//! Translation tables (placeholder; built by the MMU issue).
