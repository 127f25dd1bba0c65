//! llmsd-ipc: the one definition of llmsd's API, shared by the daemon and its clients.

/// Version of the socket protocol; a client and daemon agree on it in the handshake.
pub const PROTOCOL_VERSION: u32 = 1;
