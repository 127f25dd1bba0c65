//! The KV store: contexts kept between calls as 16-token chunks, compressed by how much
//! attention they get, swapped out ahead of time, evicted LCTRU-first and restored by reading
//! and recomputing at once (see DESIGN.md, "KV store notes").

pub mod assign;
pub mod durable;
pub mod io;
pub mod lctru;
pub mod plan;
pub mod store;
pub mod swapfile;

pub use store::{
    format_id, ChunkInfo, CompactStats, ContextInfo, KvStore, Policy, RestoreReport, Session,
    SessionStep, StoreConfig, StoreError, StoreStats,
};

#[cfg(test)]
mod tests;
