//! llmsd-ipc: the one definition of llmsd's API, shared by the daemon and its clients.
//!
//! - [`error`]: the typed errors every door returns, with their HTTP status and D-Bus name.
//! - [`api`]: requests, responses and stream events (the same meaning on every door).
//! - [`frame`]: the socket protocol: handshake messages and length-prefixed JSON frames.
//!
//! serde only: no runtime, no I/O. See `ipc-schema/README.md` for the protocol with examples.

pub mod api;
pub mod error;
pub mod frame;

pub use api::*;
pub use error::{ApiError, ErrorCode};
pub use frame::{ClientFrame, FrameError, ServerFrame, MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// D-Bus well-known name, object path and interface of the service.
pub const DBUS_NAME: &str = "org.llmsd.Llm1";
pub const DBUS_PATH: &str = "/org/llmsd/Llm1";
pub const DBUS_INTERFACE: &str = "org.llmsd.Llm1";

/// The D-Bus interface as introspection XML; the daemon's live object is tested against it.
pub const DBUS_INTROSPECTION_XML: &str = include_str!("../org.llmsd.Llm1.xml");

/// Default HTTP address of the OpenAI-compatible door.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8460";
