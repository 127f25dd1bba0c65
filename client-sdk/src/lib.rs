//! llmsd-client: async client of llmsd's Unix-socket API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), llmsd_client::ClientError> {
//! use llmsd_client::{Client, GenerationParams};
//! let client = Client::connect_default("notes").await?;
//! let ctx = client.create_context(Some("You are terse.")).await?;
//! let mut stream = ctx.chat("What is the capital of France?", GenerationParams::default()).await?;
//! while let Some(token) = stream.next_token().await? {
//!     print!("{}", token.text);
//! }
//! let done = stream.completion().await?;
//! println!("\n{} tokens", done.usage.completion_tokens);
//! # Ok(()) }
//! ```
//!
//! One connection carries many requests at once; every method may be called concurrently.

pub mod bench;
pub mod render;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use llmsd_ipc::frame::{self, FrameError};
pub use llmsd_ipc::{
    ApiError, ChatMessage, Completion, ContextInfo, ErrorCode, FinishReason, GenerationParams,
    Health, ModelInfo, Priority, PromptInput, PromptRequest, ResponseFormat, TokenEvent,
    PROTOCOL_VERSION,
};
pub use llmsd_ipc::{
    AppInfo, ChunkInfo, ChunkLocation, CompactReport, EvictReport, MemoryPressure, OwnedContext,
    Status,
};
use llmsd_ipc::{
    ClientFrame, CreateContext, Event, Request, Response, ServerFrame, TokenizeRequest,
};
pub use llmsd_ipc::{Door, Quota, QuotaKey, QuotaReport, QuotaSet, QuotaUsage, Usage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The daemon refused the call.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the connection to llmsd closed")]
    Closed,
}

impl ClientError {
    /// The daemon's error code, if the daemon refused the call.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// The socket a user's daemon listens on: `$XDG_RUNTIME_DIR/llmsd/llmsd.sock`, else the
/// system daemon's `/run/llmsd/llmsd.sock`. `$LLMSD_SOCKET` overrides both.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LLMSD_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let p = PathBuf::from(d).join("llmsd/llmsd.sock");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/run/llmsd/llmsd.sock")
}

/// Frames of one request, routed by the connection's reader.
type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<ServerFrame>>>>;

struct Inner {
    out: mpsc::UnboundedSender<Vec<u8>>,
    routes: Routes,
    next_id: AtomicU64,
    uid: u32,
    app: String,
    model: String,
}

/// A connection to llmsd. Cheap to clone; closes when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the default socket as `app`.
    pub async fn connect_default(app: &str) -> Result<Client> {
        Self::connect(&default_socket_path(), app).await
    }

    /// Connects to `path` and says hello as `app` (the daemon scopes it under your uid).
    pub async fn connect(path: &Path, app: &str) -> Result<Client> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (mut rd, mut wr) = stream.into_split();
        let hello = frame::encode(&ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            app: app.to_string(),
        })?;
        wr.write_all(&hello).await.map_err(FrameError::from)?;
        let (uid, app, model) = match read_frame(&mut rd).await? {
            Some(ServerFrame::Welcome {
                protocol,
                uid,
                app,
                model,
                ..
            }) if protocol == PROTOCOL_VERSION => (uid, app, model),
            Some(ServerFrame::Error { error, .. }) => return Err(error.into()),
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )))
            }
            None => return Err(ClientError::Closed),
        };
        let (out, mut outbox) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(bytes) = outbox.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        let routes: Routes = Arc::default();
        let reader_routes = routes.clone();
        tokio::spawn(async move {
            while let Ok(Some(f)) = read_frame(&mut rd).await {
                let id = match &f {
                    ServerFrame::Response { id, .. } | ServerFrame::Event { id, .. } => Some(*id),
                    ServerFrame::Error { id, .. } => *id,
                    ServerFrame::Welcome { .. } => None,
                };
                let Ok(r) = reader_routes.lock() else { break };
                match id {
                    Some(id) => {
                        if let Some(tx) = r.get(&id) {
                            let _ = tx.send(f);
                        }
                    }
                    // An error of the whole connection: every request gets it.
                    None => {
                        for tx in r.values() {
                            let _ = tx.send(f.clone());
                        }
                    }
                }
            }
            // Closing every route wakes their waiters with `Closed`.
            if let Ok(mut r) = reader_routes.lock() {
                r.clear();
            }
        });
        Ok(Client {
            inner: Arc::new(Inner {
                out,
                routes,
                next_id: AtomicU64::new(1),
                uid,
                app,
                model,
            }),
        })
    }

    /// The uid the daemon sees this client as.
    pub fn uid(&self) -> u32 {
        self.inner.uid
    }

    pub fn app(&self) -> &str {
        &self.inner.app
    }

    /// The daemon's model id.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// Sends a request; its frames arrive on the returned receiver.
    fn send(&self, request: Request) -> Result<(u64, mpsc::UnboundedReceiver<ServerFrame>)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(&ClientFrame::Request { id, request })?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .routes
            .lock()
            .map_err(|_| ClientError::Closed)?
            .insert(id, tx);
        if self.inner.out.send(bytes).is_err() {
            self.forget(id);
            return Err(ClientError::Closed);
        }
        Ok((id, rx))
    }

    fn forget(&self, id: u64) {
        if let Ok(mut r) = self.inner.routes.lock() {
            r.remove(&id);
        }
    }

    async fn call(&self, request: Request) -> Result<Response> {
        let (id, mut rx) = self.send(request)?;
        let r = loop {
            match rx.recv().await {
                Some(ServerFrame::Response { response, .. }) => break Ok(response),
                Some(ServerFrame::Error { error, .. }) => break Err(error.into()),
                Some(_) => continue,
                None => break Err(ClientError::Closed),
            }
        };
        self.forget(id);
        r
    }

    pub async fn create_context(&self, system: Option<&str>) -> Result<Context> {
        match self
            .call(Request::CreateContext(CreateContext {
                system: system.map(str::to_string),
            }))
            .await?
        {
            Response::Context(info) => Ok(Context {
                client: self.clone(),
                id: info.id,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// A handle on an existing context (not checked until used).
    pub fn context(&self, id: &str) -> Context {
        Context {
            client: self.clone(),
            id: id.to_string(),
        }
    }

    pub async fn list_contexts(&self) -> Result<Vec<ContextInfo>> {
        match self.call(Request::ListContexts).await? {
            Response::Contexts(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    pub async fn tokenize(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        match self
            .call(Request::Tokenize(TokenizeRequest {
                text: text.to_string(),
                special,
            }))
            .await?
        {
            Response::Tokens(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    pub async fn model_info(&self) -> Result<ModelInfo> {
        match self.call(Request::ModelInfo).await? {
            Response::Model(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    pub async fn health(&self) -> Result<Health> {
        match self.call(Request::Health).await? {
            Response::Health(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// An app's quota and usage (admins: any app; others: the app this client is).
    pub async fn quota_get(&self, app: &str) -> Result<QuotaReport> {
        match self
            .call(Request::QuotaGet {
                app: app.to_string(),
            })
            .await?
        {
            Response::Quota(r) => Ok(*r),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the keys `quota` sets and clears those in `clear` (admins only).
    pub async fn quota_set(
        &self,
        app: &str,
        quota: Quota,
        clear: Vec<QuotaKey>,
    ) -> Result<QuotaReport> {
        match self
            .call(Request::QuotaSet(QuotaSet {
                app: app.to_string(),
                quota,
                clear,
            }))
            .await?
        {
            Response::Quota(r) => Ok(*r),
            other => Err(unexpected(other)),
        }
    }

    /// Starts a generation; tokens stream as they are sampled.
    pub async fn prompt(&self, req: PromptRequest) -> Result<TokenStream> {
        let (id, rx) = self.send(Request::Prompt(req))?;
        Ok(TokenStream {
            client: self.clone(),
            id,
            rx,
            done: None,
        })
    }

    /// The daemon's memory, KV store and queue.
    pub async fn status(&self) -> Result<Status> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Apps with contexts: every owner for an admin, your uid's apps otherwise.
    pub async fn apps(&self) -> Result<Vec<AppInfo>> {
        match self.call(Request::Apps).await? {
            Response::Apps(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// Contexts across apps (scoped as [`Self::apps`]); `app` narrows to an app name or one
    /// owner (`u1000:notes`).
    pub async fn owned_contexts(&self, app: Option<&str>) -> Result<Vec<OwnedContext>> {
        match self
            .call(Request::Contexts {
                app: app.map(str::to_string),
            })
            .await?
        {
            Response::OwnedContexts(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Each chunk of a context of this app, or of `owner`.
    pub async fn chunks(&self, context: &str, owner: Option<&str>) -> Result<Vec<ChunkInfo>> {
        match self
            .call(Request::Chunks {
                context: context.to_string(),
                owner: owner.map(str::to_string),
            })
            .await?
        {
            Response::Chunks(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Moves a context (of this app, or of `owner`) out of memory.
    pub async fn evict_context(&self, context: &str, owner: Option<&str>) -> Result<EvictReport> {
        self.evict(Some(context), owner, None).await
    }

    /// Moves every context of an app (a name, or an owner `u1000:notes`) out of memory.
    pub async fn evict_app(&self, app: &str) -> Result<EvictReport> {
        self.evict(None, None, Some(app)).await
    }

    async fn evict(
        &self,
        context: Option<&str>,
        owner: Option<&str>,
        app: Option<&str>,
    ) -> Result<EvictReport> {
        match self
            .call(Request::Evict {
                context: context.map(str::to_string),
                owner: owner.map(str::to_string),
                app: app.map(str::to_string),
            })
            .await?
        {
            Response::Evicted(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Admin only: compression rebalanced, idle KV evicted, unreferenced swap files removed.
    pub async fn compact(&self) -> Result<CompactReport> {
        match self.call(Request::Compact).await? {
            Response::Compacted(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a context of another owner (an admin, or an app of your own uid).
    pub async fn delete_context_of(&self, owner: &str, context: &str) -> Result<()> {
        match self
            .call(Request::DeleteContextOf {
                owner: owner.to_string(),
                context: context.to_string(),
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// A one-off chat (no context kept).
    pub async fn chat_once(&self, message: &str, params: GenerationParams) -> Result<Completion> {
        self.prompt(PromptRequest {
            context: None,
            input: PromptInput::Messages(vec![ChatMessage::new("user", message)]),
            params,
            stream: false,
        })
        .await?
        .completion()
        .await
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

/// A persistent context of this app.
#[derive(Clone)]
pub struct Context {
    client: Client,
    id: String,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("id", &self.id).finish()
    }
}

impl Context {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends a user message and generates the assistant's reply.
    pub async fn chat(&self, message: &str, params: GenerationParams) -> Result<TokenStream> {
        self.prompt(
            PromptInput::Messages(vec![ChatMessage::new("user", message)]),
            params,
        )
        .await
    }

    /// Appends raw text and continues it.
    pub async fn complete(&self, text: &str, params: GenerationParams) -> Result<TokenStream> {
        self.prompt(PromptInput::Text(text.to_string()), params)
            .await
    }

    pub async fn prompt(
        &self,
        input: PromptInput,
        params: GenerationParams,
    ) -> Result<TokenStream> {
        self.client
            .prompt(PromptRequest {
                context: Some(self.id.clone()),
                input,
                params,
                stream: true,
            })
            .await
    }

    pub async fn info(&self) -> Result<ContextInfo> {
        match self
            .client
            .call(Request::GetContext {
                context: self.id.clone(),
            })
            .await?
        {
            Response::Context(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// A copy-on-write copy.
    pub async fn fork(&self) -> Result<Context> {
        match self
            .client
            .call(Request::ForkContext {
                context: self.id.clone(),
            })
            .await?
        {
            Response::Context(c) => Ok(Context {
                client: self.client.clone(),
                id: c.id,
            }),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete(self) -> Result<()> {
        match self
            .client
            .call(Request::DeleteContext {
                context: self.id.clone(),
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// The tokens of one generation, then its completion. Dropping it before the end cancels
/// the generation.
pub struct TokenStream {
    client: Client,
    id: u64,
    rx: mpsc::UnboundedReceiver<ServerFrame>,
    done: Option<Result<Completion>>,
}

impl TokenStream {
    /// The next token, or `None` when the generation has ended (then [`Self::completion`]).
    pub async fn next_token(&mut self) -> Result<Option<TokenEvent>> {
        if self.done.is_some() {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(ServerFrame::Event {
                event: Event::Token(t),
                ..
            }) => Ok(Some(t)),
            Some(ServerFrame::Response {
                response: Response::Completion(c),
                ..
            }) => {
                self.done = Some(Ok(c));
                self.client.forget(self.id);
                Ok(None)
            }
            Some(ServerFrame::Error { error, .. }) => {
                self.client.forget(self.id);
                self.done = Some(Err(error.clone().into()));
                Err(error.into())
            }
            Some(other) => Err(ClientError::Protocol(format!("unexpected frame {other:?}"))),
            None => {
                self.done = Some(Err(ClientError::Closed));
                Err(ClientError::Closed)
            }
        }
    }

    /// Waits for the end (skipping tokens not yet read) and returns the completion.
    pub async fn completion(mut self) -> Result<Completion> {
        while self.next_token().await?.is_some() {}
        match self.done.take() {
            Some(r) => r,
            None => Err(ClientError::Closed),
        }
    }

    /// Asks the daemon to stop this generation; the stream then ends with `Cancelled`.
    pub async fn cancel(&self) -> Result<()> {
        match self
            .client
            .call(Request::Cancel { request: self.id })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The request id on this connection.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        self.client.forget(self.id);
        if self.done.is_none() {
            // Fire and forget: the reply finds no route and is dropped.
            let id = self.client.inner.next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(bytes) = frame::encode(&ClientFrame::Request {
                id,
                request: Request::Cancel { request: self.id },
            }) {
                let _ = self.client.inner.out.send(bytes);
            }
        }
    }
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Option<ServerFrame>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::from(e).into()),
    }
    let len = frame::body_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::from)?;
    Ok(Some(frame::decode(&body)?))
}
