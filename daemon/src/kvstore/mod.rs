//! The KV store: per-context KV chunks, resident in memory or swapped to disk.

pub mod durable;
pub mod swapfile;
