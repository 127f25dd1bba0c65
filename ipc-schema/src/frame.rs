//! The socket protocol. Every message is one frame: a 4-byte big-endian length, then that
//! many bytes of UTF-8 JSON. The client speaks first with [`ClientFrame::Hello`]; the daemon
//! answers [`ServerFrame::Welcome`] (or an error, and closes). Then requests carry client-chosen
//! ids; replies, stream events and errors name the id they belong to, and may interleave.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::api::{Event, Request, Response};
use crate::error::ApiError;

/// Version of the socket protocol; a client and daemon agree on it in the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts (the length prefix excluded). A longer frame is a
/// protocol error: the receiver answers with an error and closes the connection.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame of a connection. `app` names the calling app; the daemon scopes it under
    /// the peer's uid (from the socket), so an app name is only unique per user.
    Hello { protocol: u32, app: String },
    Request {
        id: u64,
        #[serde(flatten)]
        request: Request,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        protocol: u32,
        /// Daemon version.
        server: String,
        /// Model id.
        model: String,
        /// Who the daemon takes the caller to be.
        uid: u32,
        app: String,
    },
    /// The reply to request `id` (for a prompt: its completion, after its events).
    Response {
        id: u64,
        #[serde(flatten)]
        response: Response,
    },
    /// A stream event of request `id`.
    Event {
        id: u64,
        #[serde(flatten)]
        event: Event,
    },
    /// Request `id` failed; `id` is absent for an error of the connection itself (bad frame,
    /// failed handshake), after which the daemon closes it.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        error: ApiError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("bad frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Serializes `msg` into one frame, length prefix included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, msg)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The body length a frame header announces, checked against the limit before anything
/// is read or allocated.
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(len)
}

/// Parses a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::*;
    use serde_json::json;

    #[test]
    fn frames_round_trip() {
        let msgs = vec![
            ClientFrame::Hello {
                protocol: PROTOCOL_VERSION,
                app: "notes".into(),
            },
            ClientFrame::Request {
                id: 7,
                request: Request::Tokenize(TokenizeRequest {
                    text: "hi".into(),
                    special: false,
                }),
            },
        ];
        for m in msgs {
            let f = encode(&m).unwrap();
            let len = body_len(f[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, f.len() - 4);
            assert_eq!(decode::<ClientFrame>(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn request_frame_is_flat() {
        let f = ClientFrame::Request {
            id: 3,
            request: Request::DeleteContext {
                context: "ctx-0000000000000001".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"type":"request","id":3,"method":"delete_context",
                   "params":{"context":"ctx-0000000000000001"}})
        );
        let e = ServerFrame::Event {
            id: 3,
            event: Event::Token(TokenEvent {
                index: 0,
                token_id: 42,
                text: "Hi".into(),
                logprob: None,
            }),
        };
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(
            j,
            json!({"type":"event","id":3,"event":"token","index":0,"token_id":42,"text":"Hi"})
        );
        assert_eq!(serde_json::from_value::<ServerFrame>(j).unwrap(), e);
        let r = ServerFrame::Response {
            id: 4,
            response: Response::Tokens(vec![5]),
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(
            j,
            json!({"type":"response","id":4,"kind":"tokens","value":[5]})
        );
        assert_eq!(serde_json::from_value::<ServerFrame>(j).unwrap(), r);
    }

    #[test]
    fn oversized_and_empty_frames_are_refused() {
        assert!(matches!(
            body_len(((MAX_FRAME_BYTES + 1) as u32).to_be_bytes()),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(body_len([0; 4]), Err(FrameError::Empty)));
        let huge = "x".repeat(MAX_FRAME_BYTES);
        assert!(matches!(
            encode(&TokenizeRequest {
                text: huge,
                special: false
            }),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
