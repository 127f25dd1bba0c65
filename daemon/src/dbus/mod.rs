//! The D-Bus door: `org.llmsd.Llm1` at `/org/llmsd/Llm1` on the session or system bus.
//!
//! The interface is the one in `ipc-schema/org.llmsd.Llm1.xml` (tested against the live
//! object). Who calls is established by the bus, never by an argument: the sender's uid and
//! pid come from `GetConnectionCredentials`, and the `app` argument names one of that uid's
//! apps (the same scoping as the socket door). Generation streams as signals sent only to the
//! caller: `Chat`/`Complete` reply with a request id, then `Token` signals follow, then one
//! `Completed` or `Failed`. When a caller leaves the bus its running requests are cancelled.
//!
//! Signals are fire and forget: llmsd writes them to the bus as fast as tokens come, and the
//! bus reads them at once, so a caller that never reads costs llmsd no memory. The bus queues
//! what the caller has not read up to its `max_outgoing_bytes` limit (127 MiB on the system
//! bus by default, 1 GB on the session bus) and beyond it drops the signals ("Rejected:
//! destination has a full message queue" in the bus's log): such a caller loses tokens, and
//! maybe its `Completed`, while its call runs to its end (or until it leaves the bus).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use llmsd_ipc::{
    ApiError, ChatMessage, CreateContext, Door, ErrorCode, GenerationParams, PromptInput,
    PromptRequest, TokenizeRequest, DBUS_NAME, DBUS_PATH,
};
use zbus::fdo::{ConnectionCredentials, RequestNameFlags, RequestNameReply};
use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::{ResponseDispatchNotifier, SignalEmitter};
use zbus::Connection;

use crate::service::identity::validate_app;
use crate::service::{Caller, PromptStream, Service, StreamItem};

#[cfg(test)]
mod tests;

/// Which bus the door serves on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bus {
    /// `$DBUS_SESSION_BUS_ADDRESS` (else the user's default session bus).
    Session,
    /// `$DBUS_SYSTEM_BUS_ADDRESS` (else `/run/dbus/system_bus_socket`).
    System,
    /// An explicit D-Bus address such as `unix:path=/tmp/bus`.
    Address(String),
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::Session => f.write_str("session bus"),
            Bus::System => f.write_str("system bus"),
            Bus::Address(a) => write!(f, "bus {a}"),
        }
    }
}

/// Why the door could not open.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    #[error("the name {DBUS_NAME} is already owned on the {0} (is another llmsd running?)")]
    NameTaken(String),
}

/// Connects to `bus`, serves the interface at `/org/llmsd/Llm1` and takes the name
/// `org.llmsd.Llm1` (failing if another process owns it). The door serves while the returned
/// connection is open; `Connection::close` (or the process's exit) ends it.
pub async fn serve(service: Service, bus: Bus) -> Result<Connection, DbusError> {
    let state = Arc::new(DoorState::default());
    let iface = Llm1 {
        service: service.clone(),
        state: state.clone(),
    };
    let builder = match &bus {
        Bus::Session => zbus::connection::Builder::session()?,
        Bus::System => zbus::connection::Builder::system()?,
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    let conn = builder.serve_at(DBUS_PATH, iface)?.build().await?;
    // Watch for callers leaving before anyone can find us by name.
    let dbus = zbus::fdo::DBusProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // Only owners disappearing: the new owner (arg 2) is empty.
    let gone = dbus
        .receive_name_owner_changed_with_args(&[(2, "")])
        .await?;
    tokio::spawn(watch_departures(conn.clone(), gone, service, state));
    let taken = match conn
        .request_name_with_flags(DBUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await
    {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => None,
        Ok(RequestNameReply::InQueue | RequestNameReply::Exists) | Err(zbus::Error::NameTaken) => {
            Some(DbusError::NameTaken(bus.to_string()))
        }
        Err(e) => Some(DbusError::Bus(e)),
    };
    if let Some(e) = taken {
        // Ends the watcher too.
        let _ = conn.close().await;
        return Err(e);
    }
    tracing::info!(
        name = DBUS_NAME,
        path = DBUS_PATH,
        unique = conn.unique_name().map(|n| n.as_str()).unwrap_or(""),
        "D-Bus door serving on the {bus}"
    );
    Ok(conn)
}

/// Cancels the requests of callers that left the bus; forgets their credentials.
async fn watch_departures(
    conn: Connection,
    mut gone: zbus::fdo::NameOwnerChangedStream,
    service: Service,
    state: Arc<DoorState>,
) {
    loop {
        let signal = tokio::select! {
            _ = conn.closed() => break,
            s = gone.next() => s,
        };
        let Some(signal) = signal else { break };
        let Ok(args) = signal.args() else { continue };
        // A unique name's owner leaving = that connection closed.
        let BusName::Unique(name) = args.name() else {
            continue;
        };
        state.departed(&service, name.as_str());
    }
    tracing::debug!("D-Bus door: departure watcher ended");
}

/// Credentials of a bus connection, as the bus reports them.
#[derive(Clone, Copy, Debug)]
struct Creds {
    uid: u32,
    gid: u32,
    pid: Option<u32>,
}

/// Unique names are never reused on a bus, so credentials can be cached until the name
/// leaves; the cap only guards against departures we never heard of.
const MAX_CACHED_CREDS: usize = 4096;

/// A request started through this door.
#[derive(Clone)]
struct Started {
    /// The caller's unique bus name.
    sender: String,
    caller: Caller,
}

#[derive(Default)]
struct DoorState {
    creds: Mutex<HashMap<String, Creds>>,
    requests: Mutex<HashMap<u64, Started>>,
}

impl DoorState {
    fn register(self: &Arc<Self>, request: u64, started: Started) -> Registration {
        if let Ok(mut r) = self.requests.lock() {
            r.insert(request, started);
        }
        Registration {
            state: self.clone(),
            request,
        }
    }

    fn departed(&self, service: &Service, name: &str) {
        if let Ok(mut c) = self.creds.lock() {
            c.remove(name);
        }
        let theirs: Vec<(u64, Caller)> = match self.requests.lock() {
            Ok(r) => r
                .iter()
                .filter(|(_, s)| s.sender == name)
                .map(|(id, s)| (*id, s.caller.clone()))
                .collect(),
            Err(_) => return,
        };
        for (id, caller) in theirs {
            tracing::debug!(
                request = id,
                sender = name,
                "caller left the bus: cancelling"
            );
            let _ = service.cancel(&caller, id);
        }
    }
}

/// Removes a request from the door's table when its stream is done (or dropped).
struct Registration {
    state: Arc<DoorState>,
    request: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut r) = self.state.requests.lock() {
            r.remove(&self.request);
        }
    }
}

/// The errors of the interface: `org.llmsd.Error.<Code>` with the message.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.llmsd.Error")]
pub enum MethodError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidRequest(String),
    NotFound(String),
    PermissionDenied(String),
    ContextWindowExceeded(String),
    QuotaExceeded(String),
    Busy(String),
    BackgroundBlocked(String),
    ModelUnavailable(String),
    Cancelled(String),
    Internal(String),
}

/// An error's message for D-Bus: a retryable one ends with `(retry after N ms)`.
fn dbus_message(e: &ApiError) -> String {
    match e.retry_after_ms {
        Some(ms) => format!("{} (retry after {ms} ms)", e.message),
        None => e.message.clone(),
    }
}

impl From<ApiError> for MethodError {
    fn from(e: ApiError) -> Self {
        let m = dbus_message(&e);
        match e.code {
            ErrorCode::InvalidRequest => MethodError::InvalidRequest(m),
            ErrorCode::NotFound => MethodError::NotFound(m),
            ErrorCode::PermissionDenied => MethodError::PermissionDenied(m),
            ErrorCode::ContextWindowExceeded => MethodError::ContextWindowExceeded(m),
            ErrorCode::QuotaExceeded => MethodError::QuotaExceeded(m),
            ErrorCode::Busy => MethodError::Busy(m),
            ErrorCode::BackgroundBlocked => MethodError::BackgroundBlocked(m),
            ErrorCode::ModelUnavailable => MethodError::ModelUnavailable(m),
            ErrorCode::Cancelled => MethodError::Cancelled(m),
            ErrorCode::Internal => MethodError::Internal(m),
        }
    }
}

/// Results of the interface's methods (the `interface` macro needs the name `Result`).
type Result<T, E = MethodError> = std::result::Result<T, E>;

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| MethodError::Internal(format!("JSON: {e}")))
}

/// `""` = defaults; anything else must be the JSON of `GenerationParams`.
fn parse_params(json: &str) -> Result<GenerationParams> {
    if json.trim().is_empty() {
        return Ok(GenerationParams::default());
    }
    serde_json::from_str(json).map_err(|e| MethodError::InvalidRequest(format!("params: {e}")))
}

/// `""` = no context (a one-off call).
fn context_arg(context: &str) -> Option<String> {
    (!context.is_empty()).then(|| context.to_string())
}

/// The real gid of `pid` if that process still runs as `uid` (else unknown: the gid only
/// describes the caller, it decides nothing).
fn gid_of(pid: Option<u32>, uid: u32) -> u32 {
    let field = |status: &str, key: &str| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| (field(&s, "Uid:") == Some(uid)).then(|| field(&s, "Gid:"))?)
        .unwrap_or(u32::MAX)
}

/// The object at `/org/llmsd/Llm1`.
pub struct Llm1 {
    service: Service,
    state: Arc<DoorState>,
}

impl Llm1 {
    async fn creds(&self, conn: &Connection, sender: &UniqueName<'_>) -> Result<Creds> {
        if let Some(c) = self
            .state
            .creds
            .lock()
            .ok()
            .and_then(|c| c.get(sender.as_str()).copied())
        {
            return Ok(c);
        }
        let reply = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetConnectionCredentials",
                &(sender.as_str(),),
            )
            .await?;
        let cc: ConnectionCredentials = reply.body().deserialize()?;
        let uid = cc.unix_user_id().ok_or_else(|| {
            MethodError::PermissionDenied("the bus does not know the caller's uid".into())
        })?;
        let pid = cc.process_id();
        let creds = Creds {
            uid,
            gid: gid_of(pid, uid),
            pid,
        };
        if let Ok(mut c) = self.state.creds.lock() {
            if c.len() >= MAX_CACHED_CREDS {
                c.clear();
            }
            c.insert(sender.to_string(), creds);
        }
        Ok(creds)
    }

    fn sender(hdr: &Header<'_>) -> Result<UniqueName<'static>> {
        hdr.sender().map(|s| s.to_owned()).ok_or_else(|| {
            MethodError::PermissionDenied("the call has no sender (not a bus connection?)".into())
        })
    }

    /// The calling app: uid and pid from the bus, `app` scoped under the uid.
    async fn caller(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        app: &str,
    ) -> Result<(Caller, UniqueName<'static>)> {
        validate_app(app)?;
        let sender = Self::sender(hdr)?;
        let c = self.creds(conn, &sender).await?;
        let caller = Caller::user(Door::Dbus, c.uid, c.gid, c.pid, app)?;
        let admin = self.service.is_admin(c.uid, c.gid);
        Ok((caller.with_admin(admin), sender))
    }

    /// Starts a streamed generation; its signals go to the caller once the reply (the
    /// request id) is on its way.
    async fn start_stream(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        app: &str,
        context: &str,
        input: PromptInput,
        params: &str,
    ) -> Result<ResponseDispatchNotifier<u64>> {
        let (caller, sender) = self.caller(conn, hdr, app).await?;
        let req = PromptRequest {
            context: context_arg(context),
            input,
            params: parse_params(params)?,
            stream: true,
        };
        let stream = self.service.prompt(&caller, req)?;
        let request = stream.request;
        let reg = self.state.register(
            request,
            Started {
                sender: sender.to_string(),
                caller: caller.clone(),
            },
        );
        tracing::debug!(request, caller = %caller, sender = %sender, "D-Bus prompt");
        let emitter = SignalEmitter::new(conn, DBUS_PATH)?
            .set_destination(BusName::Unique(sender))
            .into_owned();
        let (reply, sent) = ResponseDispatchNotifier::new(request);
        tokio::spawn(async move {
            sent.await;
            drain(emitter, stream, reg).await;
        });
        Ok(reply)
    }
}

/// Sends one request's tokens and its end as signals to the caller.
async fn drain(emitter: SignalEmitter<'static>, mut stream: PromptStream, reg: Registration) {
    let request = stream.request;
    let mut reg = Some(reg);
    loop {
        let item = stream.next().await;
        if !matches!(item, Some(StreamItem::Token(_))) {
            // The request is over: it leaves the table before the caller hears so, so a
            // Cancel sent on hearing it finds nothing.
            drop(reg.take());
        }
        let sent = match item {
            Some(StreamItem::Token(t)) => {
                Llm1::token(&emitter, request, t.index, t.token_id, &t.text).await
            }
            Some(StreamItem::Done(c)) => match serde_json::to_string(&*c) {
                Ok(json) => Llm1::completed(&emitter, request, &json).await,
                Err(e) => {
                    let name = ErrorCode::Internal.dbus_name();
                    Llm1::failed(&emitter, request, &name, &format!("JSON: {e}")).await
                }
            },
            Some(StreamItem::Failed(e)) => {
                let name = e.code.dbus_name();
                Llm1::failed(&emitter, request, &name, &dbus_message(&e)).await
            }
            None => {
                let name = ErrorCode::Internal.dbus_name();
                let msg = "the engine dropped the request";
                Llm1::failed(&emitter, request, &name, msg).await
            }
        };
        if let Err(e) = sent {
            // The bus connection is gone: dropping the stream cancels the request.
            tracing::warn!(request, error = %e, "D-Bus door: cannot send a signal");
            return;
        }
        if reg.is_none() {
            return;
        }
    }
}

#[zbus::interface(name = "org.llmsd.Llm1", introspection_docs = false)]
impl Llm1 {
    /// A new context of the calling app, opened with a system prompt ("" = none).
    #[zbus(out_args("context"))]
    async fn create_context(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        system: &str,
    ) -> Result<String> {
        let (caller, _) = self.caller(conn, &hdr, app).await?;
        let req = CreateContext {
            system: (!system.is_empty()).then(|| system.to_string()),
        };
        Ok(self.service.create_context(&caller, req).await?.id)
    }

    #[zbus(out_args("contexts_json"))]
    async fn list_contexts(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
    ) -> Result<String> {
        let (caller, _) = self.caller(conn, &hdr, app).await?;
        to_json(&self.service.list_contexts(&caller).await?)
    }

    #[zbus(out_args("context_json"))]
    async fn get_context(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        context: &str,
    ) -> Result<String> {
        let (caller, _) = self.caller(conn, &hdr, app).await?;
        to_json(&self.service.get_context(&caller, context).await?)
    }

    async fn delete_context(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        context: &str,
    ) -> Result<()> {
        let (caller, _) = self.caller(conn, &hdr, app).await?;
        Ok(self.service.delete_context(&caller, context).await?)
    }

    #[zbus(out_args("new_context"))]
    async fn fork_context(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        context: &str,
    ) -> Result<String> {
        let (caller, _) = self.caller(conn, &hdr, app).await?;
        Ok(self.service.fork_context(&caller, context).await?.id)
    }

    /// One user message; replies with the request id, then streams signals to the caller.
    #[zbus(out_args("request"))]
    async fn chat(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        context: &str,
        message: &str,
        params: &str,
    ) -> Result<ResponseDispatchNotifier<u64>> {
        let input = PromptInput::Messages(vec![ChatMessage::new("user", message)]);
        self.start_stream(conn, &hdr, app, context, input, params)
            .await
    }

    /// Raw text continuation; replies with the request id, then streams like `Chat`.
    #[zbus(out_args("request"))]
    async fn complete(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        context: &str,
        text: &str,
        params: &str,
    ) -> Result<ResponseDispatchNotifier<u64>> {
        let input = PromptInput::Text(text.to_string());
        self.start_stream(conn, &hdr, app, context, input, params)
            .await
    }

    /// One user message; replies with the completion when generation ends.
    #[zbus(out_args("completion_json"))]
    async fn chat_sync(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        app: &str,
        context: &str,
        message: &str,
        params: &str,
    ) -> Result<String> {
        let (caller, sender) = self.caller(conn, &hdr, app).await?;
        let req = PromptRequest {
            context: context_arg(context),
            input: PromptInput::Messages(vec![ChatMessage::new("user", message)]),
            params: parse_params(params)?,
            stream: false,
        };
        let stream = self.service.prompt(&caller, req)?;
        let _reg = self.state.register(
            stream.request,
            Started {
                sender: sender.to_string(),
                caller,
            },
        );
        to_json(&stream.completion().await?)
    }

    /// Cancels a running request started by this connection or by another connection of the
    /// same uid (so a shell can cancel what an app started).
    async fn cancel(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        request: u64,
    ) -> Result<()> {
        let sender = Self::sender(&hdr)?;
        let creds = self.creds(conn, &sender).await?;
        let started = self
            .state
            .requests
            .lock()
            .ok()
            .and_then(|r| r.get(&request).cloned());
        match started {
            Some(s) if s.sender == sender.as_str() || s.caller.uid() == Some(creds.uid) => {
                Ok(self.service.cancel(&s.caller, request)?)
            }
            _ => Err(MethodError::NotFound(format!(
                "no running request {request}"
            ))),
        }
    }

    #[zbus(out_args("ids"))]
    async fn tokenize(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self.service.tokenize(&TokenizeRequest {
            text: text.to_string(),
            special,
        })?)
    }

    #[zbus(out_args("model_json"))]
    async fn model_info(&self) -> Result<String> {
        to_json(&self.service.model_info())
    }

    #[zbus(out_args("health_json"))]
    async fn health(&self) -> Result<String> {
        to_json(&self.service.health())
    }

    /// A generated token (text may be empty while a character or stop string is held back).
    #[zbus(signal)]
    async fn token(
        emitter: &SignalEmitter<'_>,
        request: u64,
        index: u32,
        token_id: u32,
        text: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        request: u64,
        completion_json: &str,
    ) -> zbus::Result<()>;

    /// `error` is the D-Bus error name (`org.llmsd.Error.<Code>`).
    #[zbus(signal)]
    async fn failed(
        emitter: &SignalEmitter<'_>,
        request: u64,
        error: &str,
        message: &str,
    ) -> zbus::Result<()>;
}

/// A client of the interface (tests and Rust apps): `client::Llm1ClientProxy`.
pub mod client {
    /// A client of the interface (tests and Rust apps).
    #[zbus::proxy(
        interface = "org.llmsd.Llm1",
        default_service = "org.llmsd.Llm1",
        default_path = "/org/llmsd/Llm1"
    )]
    pub trait Llm1Client {
        fn create_context(&self, app: &str, system: &str) -> zbus::Result<String>;
        fn list_contexts(&self, app: &str) -> zbus::Result<String>;
        fn get_context(&self, app: &str, context: &str) -> zbus::Result<String>;
        fn delete_context(&self, app: &str, context: &str) -> zbus::Result<()>;
        fn fork_context(&self, app: &str, context: &str) -> zbus::Result<String>;
        fn chat(&self, app: &str, context: &str, message: &str, params: &str) -> zbus::Result<u64>;
        fn complete(&self, app: &str, context: &str, text: &str, params: &str)
            -> zbus::Result<u64>;
        fn chat_sync(
            &self,
            app: &str,
            context: &str,
            message: &str,
            params: &str,
        ) -> zbus::Result<String>;
        fn cancel(&self, request: u64) -> zbus::Result<()>;
        fn tokenize(&self, text: &str, special: bool) -> zbus::Result<Vec<u32>>;
        fn model_info(&self) -> zbus::Result<String>;
        fn health(&self) -> zbus::Result<String>;
        #[zbus(signal)]
        fn token(&self, request: u64, index: u32, token_id: u32, text: &str) -> zbus::Result<()>;
        #[zbus(signal)]
        fn completed(&self, request: u64, completion_json: &str) -> zbus::Result<()>;
        #[zbus(signal)]
        fn failed(&self, request: u64, error: &str, message: &str) -> zbus::Result<()>;
    }
}
