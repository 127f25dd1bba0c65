//! The Unix-socket door: length-prefixed JSON frames (ipc-schema), identity from
//! SO_PEERCRED, many requests in flight per connection, streamed tokens.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmsd_ipc::frame::{self, FrameError};
use llmsd_ipc::{
    ApiError, ClientFrame, Door, ErrorCode, Event, Request, Response, ServerFrame, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex, Notify};

use crate::service::{Caller, Service, StreamItem};

/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a frame may take to arrive once its first byte has.
const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may have running at once.
const MAX_IN_FLIGHT: usize = 64;
/// Frames queued for one connection's writer beyond what the kernel buffers; a client that
/// does not read fills it, then its requests wait (see [`Outbox::send`]).
const OUTBOX_FRAMES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another llmsd is already serving {0}")]
    InUse(PathBuf),
    #[error("socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Binds the socket (mode 0666: every local user may connect; identity comes from the
/// kernel), replacing a stale file left by a crashed daemon but never a live one.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io_err)?;
    Ok(listener)
}

/// Accepts connections until the listener fails or the task is dropped.
pub async fn serve(service: Service, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let service = service.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(service, stream).await {
                        tracing::debug!(error = %e, "socket connection ended");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one frame. Waiting for a frame to begin has no limit (clients keep idle connections),
/// but once its first byte is in, the rest must arrive within [`FRAME_READ_TIMEOUT`]: a
/// slow-loris client trickling a frame is cut off.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    match r.read(&mut header[..1]).await {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let rest = async {
        r.read_exact(&mut header[1..]).await?;
        let len = frame::body_len(header)?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        Ok::<_, FrameError>(body)
    };
    match tokio::time::timeout(FRAME_READ_TIMEOUT, rest).await {
        Ok(Ok(body)) => Ok(Some(body)),
        Ok(Err(FrameError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(FrameError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed inside a frame",
            )))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no whole frame within {} s of its first byte",
                FRAME_READ_TIMEOUT.as_secs()
            ),
        ))),
    }
}

/// The frames on their way to one connection's writer: bounded, so a client that does not
/// read costs a bounded amount of memory. A frame that cannot be queued within the
/// slow-client timeout gives up on the client: the connection closes (its running prompts
/// are cancelled, their contexts left as before).
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<ServerFrame>,
    timeout: Duration,
    /// Set once the connection is given up on; `stalled` wakes the reader to close it.
    given_up: Arc<AtomicBool>,
    stalled: Arc<Notify>,
}

/// The connection is closing: the frame was not sent.
#[derive(Debug)]
struct Closed;

impl Outbox {
    async fn send(&self, f: ServerFrame) -> Result<(), Closed> {
        match tokio::time::timeout(self.timeout, self.tx.send(f)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closed),
            Err(_) => {
                if !self.given_up.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        timeout_ms = self.timeout.as_millis() as u64,
                        "closing a socket connection whose client does not read"
                    );
                    self.stalled.notify_one();
                }
                Err(Closed)
            }
        }
    }
}

async fn connection(service: Service, stream: UnixStream) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut outbox) = mpsc::channel::<ServerFrame>(OUTBOX_FRAMES);
    let out = Outbox {
        tx,
        timeout: service.slow_client_timeout(),
        given_up: Arc::default(),
        stalled: Arc::default(),
    };
    // One writer per connection, so frames of concurrent requests never interleave.
    let writer = tokio::spawn(async move {
        while let Some(f) = outbox.recv().await {
            let bytes = match frame::encode(&f) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "unencodable frame");
                    continue;
                }
            };
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    // Before the welcome the outbox is empty, so this never waits.
    let fatal = |out: &Outbox, code: ErrorCode, msg: String| {
        let _ = out.tx.try_send(ServerFrame::Error {
            id: None,
            error: ApiError::new(code, msg),
        });
    };
    // Handshake.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd)).await {
        Err(_) => {
            fatal(
                &out,
                ErrorCode::InvalidRequest,
                "no hello within 10 s".into(),
            );
            None
        }
        Ok(Ok(Some(body))) => match frame::decode::<ClientFrame>(&body) {
            Ok(ClientFrame::Hello { protocol, app }) => Some((protocol, app)),
            Ok(_) => {
                fatal(
                    &out,
                    ErrorCode::InvalidRequest,
                    "the first frame must be hello".into(),
                );
                None
            }
            Err(e) => {
                fatal(&out, ErrorCode::InvalidRequest, e.to_string());
                None
            }
        },
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            fatal(&out, ErrorCode::InvalidRequest, e.to_string());
            None
        }
    };
    let caller = match hello {
        Some((protocol, _)) if protocol != PROTOCOL_VERSION => {
            fatal(
                &out,
                ErrorCode::InvalidRequest,
                format!(
                    "protocol {protocol} is not supported; this daemon speaks {PROTOCOL_VERSION}"
                ),
            );
            None
        }
        Some((_, app)) => {
            let pid = cred.pid().map(|p| p as u32);
            match Caller::user(Door::Socket, cred.uid(), cred.gid(), pid, &app) {
                Ok(c) => Some(c.with_admin(service.is_admin(cred.uid(), cred.gid()))),
                Err(e) => {
                    let _ = out.tx.try_send(ServerFrame::Error { id: None, error: e });
                    None
                }
            }
        }
        None => None,
    };
    let Some(caller) = caller else {
        drop(out);
        let _ = writer.await;
        return Ok(());
    };
    let _ = out.tx.try_send(ServerFrame::Welcome {
        protocol: PROTOCOL_VERSION,
        server: env!("CARGO_PKG_VERSION").into(),
        model: service.model_info().id,
        uid: cred.uid(),
        app: caller.app.clone(),
    });
    tracing::debug!(caller = %caller, pid = ?cred.pid(), "socket client connected");
    // Client request id → service request id of its running prompts.
    let prompts: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let read = tokio::select! {
            r = read_frame(&mut rd) => r,
            // A reply waited too long on this client: close (a half-read frame is dropped).
            _ = out.stalled.notified() => break,
        };
        let body = match read {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                // The stream is out of step (or too large a frame): say why and close.
                let _ = out
                    .send(ServerFrame::Error {
                        id: None,
                        error: ApiError::invalid(e.to_string()),
                    })
                    .await;
                break;
            }
        };
        let (id, request) = match frame::decode::<ClientFrame>(&body) {
            Ok(ClientFrame::Request { id, request }) => (id, request),
            Ok(ClientFrame::Hello { .. }) => {
                let error = ApiError::invalid("hello sent twice");
                if out
                    .send(ServerFrame::Error { id: None, error })
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Err(e) => {
                // The frame boundary is intact: answer and go on. Recover the id if we can.
                let id = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_u64()));
                let error = ApiError::invalid(e.to_string());
                if out.send(ServerFrame::Error { id, error }).await.is_err() {
                    break;
                }
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= MAX_IN_FLIGHT {
            let error = ApiError::busy(
                100,
                format!("{MAX_IN_FLIGHT} requests already in flight on this connection"),
            );
            let f = ServerFrame::Error {
                id: Some(id),
                error,
            };
            if out.send(f).await.is_err() {
                break;
            }
            continue;
        }
        let (service, caller, out, prompts) = (
            service.clone(),
            caller.clone(),
            out.clone(),
            prompts.clone(),
        );
        tasks.spawn(async move {
            let reply = handle(&service, &caller, id, request, &out, &prompts).await;
            let f = match reply {
                Ok(Some(response)) => ServerFrame::Response { id, response },
                Ok(None) => return,
                Err(error) => ServerFrame::Error {
                    id: Some(id),
                    error,
                },
            };
            let _ = out.send(f).await;
        });
    }
    // The client is gone (or given up on): dropping the tasks drops their prompt streams,
    // which cancels them.
    tasks.abort_all();
    if out.given_up.load(Ordering::Relaxed) {
        // The writer is stuck on a client that does not read.
        writer.abort();
    } else {
        drop(out);
        let _ = writer.await;
    }
    Ok(())
}

async fn handle(
    service: &Service,
    caller: &Caller,
    id: u64,
    request: Request,
    out: &Outbox,
    prompts: &Mutex<HashMap<u64, u64>>,
) -> Result<Option<Response>, ApiError> {
    Ok(Some(match request {
        Request::CreateContext(c) => Response::Context(service.create_context(caller, c).await?),
        Request::ListContexts => Response::Contexts(service.list_contexts(caller).await?),
        Request::GetContext { context } => {
            Response::Context(service.get_context(caller, &context).await?)
        }
        Request::DeleteContext { context } => {
            service.delete_context(caller, &context).await?;
            Response::Ok
        }
        Request::ForkContext { context } => {
            Response::Context(service.fork_context(caller, &context).await?)
        }
        Request::Tokenize(t) => Response::Tokens(service.tokenize(&t)?),
        Request::ModelInfo => Response::Model(service.model_info()),
        Request::Health => Response::Health(service.health()),
        Request::QuotaGet { app } => {
            Response::Quota(Box::new(service.quota_get(caller, &app).await?))
        }
        Request::QuotaSet(q) => Response::Quota(Box::new(service.quota_set(caller, q).await?)),
        Request::Status => Response::Status(service.status(caller)),
        Request::Apps => Response::Apps(service.apps(caller, None).await?),
        Request::Contexts { app } => {
            Response::OwnedContexts(service.owned_contexts(caller, app.as_deref()).await?)
        }
        Request::Chunks { context, owner } => {
            Response::Chunks(service.chunks(caller, owner.as_deref(), &context).await?)
        }
        Request::Evict {
            context,
            owner,
            app,
        } => Response::Evicted(
            service
                .evict(caller, context.as_deref(), owner.as_deref(), app.as_deref())
                .await?,
        ),
        Request::Compact => Response::Compacted(service.compact(caller).await?),
        Request::DeleteContextOf { owner, context } => {
            service.delete_context_of(caller, &owner, &context).await?;
            Response::Ok
        }
        Request::Cancel { request } => {
            let target = prompts.lock().await.get(&request).copied();
            match target {
                Some(r) => service.cancel(caller, r)?,
                None => {
                    return Err(ApiError::new(
                        ErrorCode::NotFound,
                        format!("no running request {request} on this connection"),
                    ))
                }
            }
            Response::Ok
        }
        Request::Prompt(p) => {
            let mut stream = service.prompt(caller, p)?;
            prompts.lock().await.insert(id, stream.request);
            let mut result = None;
            while let Some(item) = stream.next().await {
                match item {
                    StreamItem::Token(t) => {
                        let f = ServerFrame::Event {
                            id,
                            event: Event::Token(t),
                        };
                        if out.send(f).await.is_err() {
                            break;
                        }
                    }
                    StreamItem::Done(c) => {
                        result = Some(Ok(Response::Completion(*c)));
                        break;
                    }
                    StreamItem::Failed(e) => {
                        result = Some(Err(e));
                        break;
                    }
                }
            }
            prompts.lock().await.remove(&id);
            match result {
                Some(r) => r?,
                None => return Ok(None),
            }
        }
    }))
}
