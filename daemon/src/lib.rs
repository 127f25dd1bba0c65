//! The llmsd service as a library: the KV store (contexts, chunk lifecycle, swap, restore).
//! The `llmsd` binary's subcommands and, later, the daemon's front-ends are built on it.

pub mod kvstore;
