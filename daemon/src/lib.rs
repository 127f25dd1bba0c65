//! The llmsd service as a library: the KV store (contexts, chunk lifecycle, swap, restore)
//! and the service every door calls (scheduler, identity, generation).

pub mod config;
pub mod dbus;
pub mod fuzzing;
pub mod http;
pub mod kvstore;
pub mod memory;
pub mod service;
pub mod socket;
pub mod systemd;
