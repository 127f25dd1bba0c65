//! llmsd-client: client of llmsd's socket API.

pub use llmsd_ipc::PROTOCOL_VERSION;
