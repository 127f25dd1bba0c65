//! Load and soak against the real `llmsd serve`: 64 concurrent clients on all three doors
//! (the Unix socket through the SDK, HTTP as a plain HTTP/1.1 client, D-Bus on a private
//! session bus), one-off and persistent-context calls (multi-turn, fork, delete), streamed and
//! not, some cancelled, for `LLMSD_SOAK_SECS` seconds (default 300; CI runs 30) with a memory
//! budget and a KV budget small enough that contexts are evicted and restored.
//!
//! Every call must end (within a per-call timeout) completed, cancelled, or refused with a
//! documented `Busy` or `QuotaExceeded`; anything else fails the test with its text. The
//! daemon's RSS, sampled throughout, stays within its memory budget plus a margin; afterwards
//! nothing is running or queued, the daemon's error counters hold only those three codes, it
//! answers a greedy prompt exactly as before the load, and its log has no error or panic.
//! Latency percentiles (first token and whole call, per door) and throughput are printed, and
//! written as JSON to `$LLMSD_SOAK_REPORT` when set:
//!
//!     LLMSD_SOAK_SECS=120 cargo test --release -p llmsd --test load -- --nocapture

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bus::PrivateBus;
use common::http::{metrics, sample};
use common::probe::*;
use common::*;
use futures_util::StreamExt;
use llmsd::dbus::client::Llm1ClientProxy;
use llmsd_client::{
    ChatMessage, ChunkLocation, Client, ClientError, ErrorCode, GenerationParams, PromptInput,
    PromptRequest,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 64;
const MAX_RUNNING: usize = 8;
/// Fewer than the clients, so some calls meet a full queue (`Busy`).
const MAX_QUEUED: usize = 32;
const MEMORY_BUDGET_MIB: u64 = 256;
const KV_BUDGET_MIB: u64 = 24;
/// Beyond the memory budget: tokio, 64 connections and their buffers, allocator slack.
const RSS_MARGIN_MIB: u64 = 32;
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// HTTP clients are two apps, as many clients each as every other app.
const HTTP_KEYS: [(&str, &str); 2] = [
    ("sk-load-http-a-0123456789", "load-http-a"),
    ("sk-load-http-b-0123456789", "load-http-b"),
];
/// An app limited to one call at a time, shared by a client on each door (`QuotaExceeded`).
const LIMITED_APP: &str = "load-limited";
const LIMITED_KEY: &str = "sk-load-limited-0123456789";

const MESSAGES: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is two plus two?",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Door {
    Socket,
    Http,
    Dbus,
}

impl Door {
    fn name(self) -> &'static str {
        match self {
            Door::Socket => "socket",
            Door::Http => "http",
            Door::Dbus => "dbus",
        }
    }
}

/// A documented refusal.
#[derive(Debug)]
enum Refusal {
    Busy,
    Quota,
}

/// Why a call did not complete.
#[derive(Debug)]
enum Fail {
    Refused(Refusal),
    Cancelled,
    /// Anything else: fails the test.
    Error(String),
}

impl Fail {
    fn of_code(code: ErrorCode, text: String, cancelling: bool) -> Fail {
        match code {
            ErrorCode::Busy => Fail::Refused(Refusal::Busy),
            ErrorCode::QuotaExceeded => Fail::Refused(Refusal::Quota),
            ErrorCode::Cancelled if cancelling => Fail::Cancelled,
            _ => Fail::Error(text),
        }
    }

    fn socket(e: ClientError, cancelling: bool) -> Fail {
        match e.code() {
            Some(code) => Fail::of_code(code, format!("socket: {e}"), cancelling),
            None => Fail::Error(format!("socket: {e}")),
        }
    }

    fn dbus_name(name: &str, message: &str, cancelling: bool) -> Fail {
        let text = format!("dbus: {name}: {message}");
        match ErrorCode::from_dbus_name(name) {
            Some(code) => Fail::of_code(code, text, cancelling),
            None => Fail::Error(text),
        }
    }

    fn dbus(e: zbus::Error) -> Fail {
        match &e {
            zbus::Error::MethodError(name, message, _) => {
                Fail::dbus_name(name.as_str(), message.as_deref().unwrap_or(""), false)
            }
            _ => Fail::Error(format!("dbus: {e}")),
        }
    }

    fn http(status: u16, body: &str) -> Fail {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        match (status, v["error"]["code"].as_str()) {
            (429, _) => Fail::Refused(Refusal::Quota),
            (503, Some("busy")) => Fail::Refused(Refusal::Busy),
            _ => Fail::Error(format!("http {status}: {body}")),
        }
    }
}

/// A completed call as its client saw it.
struct Done {
    tokens: u64,
    first_token: Option<Duration>,
    total: Duration,
    restore_ms: f64,
}

/// One call: a user message, on a context or not.
struct Ask<'a> {
    context: Option<&'a str>,
    message: &'a str,
    max_tokens: u32,
    stream: bool,
    /// Cancel it once its first token arrives.
    cancel: bool,
}

impl Ask<'_> {
    fn params(&self) -> GenerationParams {
        GenerationParams {
            ignore_eos: self.cancel,
            ..greedy(self.max_tokens)
        }
    }
}

/// What an admin sees of the KV store during the run.
#[derive(Default)]
struct Monitor {
    /// Most chunks of live contexts seen out of memory at once (on disk, or to recompute).
    evicted_chunks: usize,
    /// Chunk listings of contexts deleted in between (counted by the daemon as NotFound).
    gone: u64,
}

impl Monitor {
    async fn look(&mut self, admin: &Client) {
        let Ok(list) = admin.owned_contexts(None).await else {
            return;
        };
        let mut evicted = 0;
        for c in list {
            match admin.chunks(&c.context.id, Some(&c.owner)).await {
                Ok(chunks) => {
                    evicted += chunks
                        .iter()
                        .filter(|k| {
                            matches!(k.location, ChunkLocation::Disk | ChunkLocation::Recompute)
                        })
                        .count()
                }
                Err(e) if e.code() == Some(ErrorCode::NotFound) => self.gone += 1,
                Err(_) => {}
            }
        }
        self.evicted_chunks = self.evicted_chunks.max(evicted);
    }
}

#[derive(Default, serde::Serialize)]
struct DoorStats {
    completed: u64,
    cancelled: u64,
    busy: u64,
    quota_exceeded: u64,
    tokens: u64,
    #[serde(skip)]
    first_token_ms: Vec<f64>,
    #[serde(skip)]
    total_ms: Vec<f64>,
}

#[derive(Default)]
struct Tally {
    doors: BTreeMap<Door, DoorStats>,
    failures: Vec<String>,
    /// Cancels that lost the race with the call's end (it completed).
    cancel_races: u64,
    /// HTTP calls cancelled by closing the connection (the daemon cancels them, or they had
    /// just completed).
    http_closes: u64,
    restore_ms: f64,
    contexts_created: u64,
    forks: u64,
}

impl Tally {
    fn record(&mut self, door: Door, cancel: bool, r: &Result<Done, Fail>) {
        let s = self.doors.entry(door).or_default();
        match r {
            Ok(d) => {
                s.completed += 1;
                s.tokens += d.tokens;
                s.total_ms.push(d.total.as_secs_f64() * 1e3);
                if let Some(f) = d.first_token {
                    s.first_token_ms.push(f.as_secs_f64() * 1e3);
                }
                self.restore_ms += d.restore_ms;
                if cancel {
                    self.cancel_races += 1;
                }
            }
            Err(Fail::Cancelled) => s.cancelled += 1,
            Err(Fail::Refused(Refusal::Busy)) => s.busy += 1,
            Err(Fail::Refused(Refusal::Quota)) => s.quota_exceeded += 1,
            Err(Fail::Error(e)) => self.failures.push(format!("{}: {e}", door.name())),
        }
    }
}

/// xorshift64*: the same workload for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo + 1)) as u32
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Signal streams of one D-Bus connection.
struct Signals {
    tokens: llmsd::dbus::client::TokenStream,
    completed: llmsd::dbus::client::CompletedStream,
    failed: llmsd::dbus::client::FailedStream,
}

/// One client's connection through its door.
enum Conn {
    Socket(Client),
    Http {
        addr: String,
        key: String,
    },
    Dbus {
        proxy: Llm1ClientProxy<'static>,
        signals: Box<Signals>,
        app: String,
    },
}

fn completion_of(json: &Value) -> Result<(u64, f64), Fail> {
    let tokens = json["usage"]["completion_tokens"]
        .as_u64()
        .ok_or_else(|| Fail::Error(format!("no usage in {json}")))?;
    Ok((
        tokens,
        json["timings"]["restore_ms"].as_f64().unwrap_or(0.0),
    ))
}

impl Conn {
    async fn open(door: Door, app: &str, env: &Env) -> Result<Conn, String> {
        Ok(match door {
            Door::Socket => Conn::Socket(
                Client::connect(&env.socket, app)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            Door::Http => Conn::Http {
                addr: env.http.clone(),
                key: HTTP_KEYS
                    .iter()
                    .chain([(LIMITED_KEY, LIMITED_APP)].iter())
                    .find(|(_, a)| *a == app)
                    .map(|(k, _)| k.to_string())
                    .ok_or_else(|| format!("no HTTP key for {app}"))?,
            },
            Door::Dbus => {
                let conn = zbus::connection::Builder::address(env.bus.as_str())
                    .map_err(|e| e.to_string())?
                    .build()
                    .await
                    .map_err(|e| e.to_string())?;
                let proxy = Llm1ClientProxy::new(&conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let signals = Signals {
                    tokens: proxy.receive_token().await.map_err(|e| e.to_string())?,
                    completed: proxy.receive_completed().await.map_err(|e| e.to_string())?,
                    failed: proxy.receive_failed().await.map_err(|e| e.to_string())?,
                };
                Conn::Dbus {
                    proxy,
                    signals: Box::new(signals),
                    app: app.to_string(),
                }
            }
        })
    }

    async fn ask(&mut self, a: &Ask<'_>) -> Result<Done, Fail> {
        let t0 = Instant::now();
        match self {
            Conn::Socket(c) => {
                let req = PromptRequest {
                    context: a.context.map(str::to_string),
                    input: PromptInput::Messages(vec![ChatMessage::new("user", a.message)]),
                    params: a.params(),
                    stream: a.stream,
                };
                let mut s = c.prompt(req).await.map_err(|e| Fail::socket(e, false))?;
                let mut first = None;
                if a.stream {
                    loop {
                        match s.next_token().await {
                            Ok(Some(_)) => {
                                if first.is_none() {
                                    first = Some(t0.elapsed());
                                    if a.cancel {
                                        match s.cancel().await {
                                            Ok(()) => {}
                                            // It ended first.
                                            Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                                            Err(e) => return Err(Fail::socket(e, false)),
                                        }
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return Err(Fail::socket(e, a.cancel)),
                        }
                    }
                }
                let c = s
                    .completion()
                    .await
                    .map_err(|e| Fail::socket(e, a.cancel))?;
                Ok(Done {
                    tokens: c.usage.completion_tokens,
                    first_token: first,
                    total: t0.elapsed(),
                    restore_ms: c.timings.restore_ms,
                })
            }
            Conn::Http { addr, key } => {
                let mut body = json!({
                    "messages": [{"role": "user", "content": a.message}],
                    "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": a.cancel,
                    "stream": a.stream,
                });
                if a.stream {
                    body["stream_options"] = json!({"include_usage": true});
                }
                if let Some(c) = a.context {
                    body["context"] = json!(c);
                }
                let mut s = http_send(addr, "POST", "/v1/chat/completions", key, &body).await?;
                let (status, mut rest) = read_head(&mut s).await?;
                // A stream's response starts with its first token.
                let first = a.stream.then(|| t0.elapsed());
                if status == 200 && a.cancel {
                    // Closing the connection cancels the call.
                    return Err(Fail::Cancelled);
                }
                s.read_to_end(&mut rest)
                    .await
                    .map_err(|e| Fail::Error(format!("http read: {e}")))?;
                let text = String::from_utf8_lossy(&rest).into_owned();
                if status != 200 {
                    return Err(Fail::http(status, &text));
                }
                let (tokens, restore_ms) = if a.stream {
                    if !text.contains("data: [DONE]") {
                        return Err(Fail::Error(format!("http stream without [DONE]: {text}")));
                    }
                    let usage = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .find(|v| v["usage"].is_object())
                        .ok_or_else(|| Fail::Error(format!("no usage chunk: {text}")))?;
                    completion_of(&usage)?
                } else {
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| Fail::Error(format!("http body {e}: {text}")))?;
                    completion_of(&v)?
                };
                Ok(Done {
                    tokens,
                    first_token: first,
                    total: t0.elapsed(),
                    restore_ms,
                })
            }
            Conn::Dbus {
                proxy,
                signals,
                app,
            } => {
                let params = serde_json::to_string(&a.params()).expect("params JSON");
                let context = a.context.unwrap_or("");
                if !a.stream {
                    let json = proxy
                        .chat_sync(app, context, a.message, &params)
                        .await
                        .map_err(Fail::dbus)?;
                    let (tokens, restore_ms) = completion_of(
                        &serde_json::from_str(&json)
                            .map_err(|e| Fail::Error(format!("dbus completion {e}: {json}")))?,
                    )?;
                    return Ok(Done {
                        tokens,
                        first_token: None,
                        total: t0.elapsed(),
                        restore_ms,
                    });
                }
                let id = proxy
                    .chat(app, context, a.message, &params)
                    .await
                    .map_err(Fail::dbus)?;
                let mut first = None;
                loop {
                    tokio::select! {
                        t = signals.tokens.next() => {
                            let t = t.ok_or_else(|| Fail::Error("dbus: token signals ended".into()))?;
                            let args = t.args().map_err(|e| Fail::Error(e.to_string()))?;
                            if *args.request() == id && first.is_none() {
                                first = Some(t0.elapsed());
                                if a.cancel {
                                    match proxy.cancel(id).await {
                                        Ok(()) => {}
                                        Err(zbus::Error::MethodError(name, _, _))
                                            if name.as_str() == "org.llmsd.Error.NotFound" => {}
                                        Err(e) => return Err(Fail::dbus(e)),
                                    }
                                }
                            }
                        }
                        c = signals.completed.next() => {
                            let c = c.ok_or_else(|| Fail::Error("dbus: completed signals ended".into()))?;
                            let args = c.args().map_err(|e| Fail::Error(e.to_string()))?;
                            if *args.request() == id {
                                let v: Value = serde_json::from_str(args.completion_json())
                                    .map_err(|e| Fail::Error(format!("dbus completion: {e}")))?;
                                let (tokens, restore_ms) = completion_of(&v)?;
                                return Ok(Done { tokens, first_token: first, total: t0.elapsed(), restore_ms });
                            }
                        }
                        f = signals.failed.next() => {
                            let f = f.ok_or_else(|| Fail::Error("dbus: failed signals ended".into()))?;
                            let args = f.args().map_err(|e| Fail::Error(e.to_string()))?;
                            if *args.request() == id {
                                return Err(Fail::dbus_name(args.error(), args.message(), a.cancel));
                            }
                        }
                    }
                }
            }
        }
    }

    async fn create(&mut self, system: Option<&str>) -> Result<String, Fail> {
        match self {
            Conn::Socket(c) => c
                .create_context(system)
                .await
                .map(|c| c.id().to_string())
                .map_err(|e| Fail::socket(e, false)),
            Conn::Http { addr, key } => {
                let body = system.map_or(json!({}), |s| json!({ "system": s }));
                let v = http_json_call(addr, "POST", "/v1/contexts", key, &body).await?;
                v["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Fail::Error(format!("no id in {v}")))
            }
            Conn::Dbus { proxy, app, .. } => proxy
                .create_context(app, system.unwrap_or(""))
                .await
                .map_err(Fail::dbus),
        }
    }

    async fn fork(&mut self, id: &str) -> Result<String, Fail> {
        match self {
            Conn::Socket(c) => c
                .context(id)
                .fork()
                .await
                .map(|c| c.id().to_string())
                .map_err(|e| Fail::socket(e, false)),
            Conn::Http { addr, key } => {
                let path = format!("/v1/contexts/{id}/fork");
                let v = http_json_call(addr, "POST", &path, key, &Value::Null).await?;
                v["id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Fail::Error(format!("no id in {v}")))
            }
            Conn::Dbus { proxy, app, .. } => proxy.fork_context(app, id).await.map_err(Fail::dbus),
        }
    }

    async fn delete(&mut self, id: &str) -> Result<(), Fail> {
        match self {
            Conn::Socket(c) => c
                .context(id)
                .delete()
                .await
                .map_err(|e| Fail::socket(e, false)),
            Conn::Http { addr, key } => {
                let path = format!("/v1/contexts/{id}");
                http_json_call(addr, "DELETE", &path, key, &Value::Null)
                    .await
                    .map(|_| ())
            }
            Conn::Dbus { proxy, app, .. } => {
                proxy.delete_context(app, id).await.map_err(Fail::dbus)
            }
        }
    }
}

async fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> Result<tokio::net::TcpStream, Fail> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| Fail::Error(format!("http connect: {e}")))?;
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: llmsd\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| Fail::Error(format!("http write: {e}")))?;
    Ok(s)
}

/// Reads up to the end of the header block: the status and what was read past it.
async fn read_head(s: &mut tokio::net::TcpStream) -> Result<(u16, Vec<u8>), Fail> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Fail::Error(format!("http status line: {head}")))?;
            return Ok((status, buf[end + 4..].to_vec()));
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| Fail::Error(format!("http read: {e}")))?;
        if n == 0 {
            return Err(Fail::Error(format!(
                "http: closed before the headers: {}",
                String::from_utf8_lossy(&buf)
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A non-streamed call: its JSON body on 2xx, else the refusal.
async fn http_json_call(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> Result<Value, Fail> {
    let mut s = http_send(addr, method, path, key, body).await?;
    let (status, mut rest) = read_head(&mut s).await?;
    s.read_to_end(&mut rest)
        .await
        .map_err(|e| Fail::Error(format!("http read: {e}")))?;
    let text = String::from_utf8_lossy(&rest).into_owned();
    if !(200..300).contains(&status) {
        return Err(Fail::http(status, &text));
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| Fail::Error(format!("http body {e}: {text}")))
}

/// Where the clients connect.
struct Env {
    socket: std::path::PathBuf,
    http: String,
    bus: String,
}

/// Runs `f` with the per-call timeout; a hang is a failure.
async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, Fail>>,
) -> Result<T, Fail> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(Fail::Error(format!(
                "{what} did not end within {CALL_TIMEOUT:?}"
            )))
        })
}

/// A refused call waits before the client's next one: the daemon's queue takes about a
/// second to move (its `Busy` says so).
async fn back_off<T>(r: &Result<T, Fail>) {
    let pause = match r {
        Err(Fail::Refused(Refusal::Busy)) => 1000,
        Err(Fail::Refused(Refusal::Quota)) => 300,
        _ => return,
    };
    tokio::time::sleep(Duration::from_millis(pause)).await;
}

/// A client's own conversation is started afresh after this many turns.
const HOME_TURNS: u32 = 10;

/// One client: random calls until the deadline. Each keeps a conversation of its own going
/// (together they outgrow the KV budget, so contexts are evicted and restored) and now and
/// then forks it; it also holds short conversations, makes one-off calls, streamed or not,
/// and cancels some at their first token.
async fn client(
    i: usize,
    door: Door,
    app: String,
    env: Arc<Env>,
    deadline: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let fail = |what: &str, e: Fail| {
        tally
            .lock()
            .unwrap()
            .failures
            .push(format!("{} client {i}: {what}: {e:?}", door.name()))
    };
    let mut conn = match Conn::open(door, &app, &env).await {
        Ok(c) => c,
        Err(e) => return fail("connect", Fail::Error(e)),
    };
    let note = |cancel: bool, r: &Result<Done, Fail>| tally.lock().unwrap().record(door, cancel, r);
    let mut home: Option<(String, u32)> = None;
    while Instant::now() < deadline {
        let message = MESSAGES[rng.below(MESSAGES.len() as u64) as usize];
        let roll = rng.below(100);
        if roll < 35 {
            // A turn of the client's own conversation.
            if let Some((ctx, turns)) = &home {
                if *turns >= HOME_TURNS {
                    if let Err(e) = timed("delete", conn.delete(ctx)).await {
                        fail("delete", e);
                    }
                    home = None;
                }
            }
            let ctx = match &home {
                Some((ctx, _)) => ctx.clone(),
                None => {
                    let system = rng.chance(50).then_some("You are a terse assistant.");
                    match timed("create", conn.create(system)).await {
                        Ok(c) => {
                            tally.lock().unwrap().contexts_created += 1;
                            home = Some((c.clone(), 0));
                            c
                        }
                        Err(e @ Fail::Refused(_)) => {
                            back_off::<()>(&Err(e)).await;
                            continue;
                        }
                        Err(e) => {
                            fail("create", e);
                            continue;
                        }
                    }
                }
            };
            let ask = Ask {
                context: Some(&ctx),
                message,
                max_tokens: rng.range(8, 24),
                stream: rng.chance(50),
                cancel: false,
            };
            let r = timed("a turn", conn.ask(&ask)).await;
            note(false, &r);
            back_off(&r).await;
            if r.is_ok() {
                if let Some((_, turns)) = &mut home {
                    *turns += 1;
                }
                if rng.chance(25) {
                    match timed("fork", conn.fork(&ctx)).await {
                        Ok(fork) => {
                            tally.lock().unwrap().forks += 1;
                            let ask = Ask {
                                context: Some(&fork),
                                message: MESSAGES[rng.below(MESSAGES.len() as u64) as usize],
                                max_tokens: rng.range(8, 16),
                                stream: true,
                                cancel: false,
                            };
                            let r = timed("a turn on a fork", conn.ask(&ask)).await;
                            note(false, &r);
                            back_off(&r).await;
                            if let Err(e) = timed("delete a fork", conn.delete(&fork)).await {
                                fail("delete a fork", e);
                            }
                        }
                        Err(e @ Fail::Refused(_)) => back_off::<()>(&Err(e)).await,
                        Err(e) => fail("fork", e),
                    }
                }
            }
        } else if roll < 50 {
            // A short conversation: created, two turns, deleted.
            let ctx = match timed("create", conn.create(None)).await {
                Ok(c) => c,
                Err(e @ Fail::Refused(_)) => {
                    back_off::<()>(&Err(e)).await;
                    continue;
                }
                Err(e) => {
                    fail("create", e);
                    continue;
                }
            };
            tally.lock().unwrap().contexts_created += 1;
            for _ in 0..2 {
                let ask = Ask {
                    context: Some(&ctx),
                    message: MESSAGES[rng.below(MESSAGES.len() as u64) as usize],
                    max_tokens: rng.range(8, 24),
                    stream: rng.chance(50),
                    cancel: false,
                };
                let r = timed("a turn", conn.ask(&ask)).await;
                note(false, &r);
                back_off(&r).await;
            }
            if let Err(e) = timed("delete", conn.delete(&ctx)).await {
                fail("delete", e);
            }
        } else if roll < 85 {
            // A one-off call, streamed or not.
            let ask = Ask {
                context: None,
                message,
                max_tokens: rng.range(8, 24),
                stream: roll >= 68,
                cancel: false,
            };
            let r = timed("a one-off call", conn.ask(&ask)).await;
            note(false, &r);
            back_off(&r).await;
        } else {
            // A long streamed call, cancelled at its first token.
            let ask = Ask {
                context: None,
                message,
                max_tokens: 64,
                stream: true,
                cancel: true,
            };
            let r = timed("a cancelled call", conn.ask(&ask)).await;
            if door == Door::Http && matches!(r, Err(Fail::Cancelled)) {
                tally.lock().unwrap().http_closes += 1;
            }
            note(true, &r);
            back_off(&r).await;
        }
    }
    if let Some((ctx, _)) = home {
        if let Err(e) = timed("delete", conn.delete(&ctx)).await {
            fail("delete", e);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn percentiles(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({"n": s.len(), "p50": percentile(&s, 50.0), "p90": percentile(&s, 90.0),
           "p99": percentile(&s, 99.0), "max": s.last().copied().unwrap_or(f64::NAN)})
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("llmsd.toml");
    std::fs::write(
        &p,
        format!(
            "http_allow_anonymous = false\n\
             [scheduler]\nmax_running = {MAX_RUNNING}\nmax_queued = {MAX_QUEUED}\n\
             [memory]\nbudget_mib = {MEMORY_BUDGET_MIB}\n\
             [kv]\nbudget_mib = {KV_BUDGET_MIB}\n\
             [apps.{LIMITED_APP}]\nmax_concurrent = 1\n\
             [http_keys]\n\"{}\" = \"{}\"\n\"{}\" = \"{}\"\n\"{LIMITED_KEY}\" = \"{LIMITED_APP}\"\n",
            HTTP_KEYS[0].0, HTTP_KEYS[0].1, HTTP_KEYS[1].0, HTTP_KEYS[1].1
        ),
    )
    .unwrap();
    p
}

/// The greedy answer the daemon must give before and after the load.
fn probe_answer(d: &Daemon) -> String {
    rt().block_on(async {
        let c = Client::connect(&d.socket, "load-probe")
            .await
            .expect("connect");
        c.chat_once("What is the capital of France?", greedy(16))
            .await
            .expect("the probe call")
            .text
    })
}

#[test]
fn sixty_four_clients_on_three_doors_within_budget_and_documented_errors() {
    let secs: u64 = std::env::var("LLMSD_SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("LLMSD_SOAK_SECS is a number of seconds"))
        .unwrap_or(300);
    let bus = PrivateBus::session();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let d = Daemon::start_env(
        true,
        &["--config", cfg.to_str().unwrap(), "--bus", "session"],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let http = d.http.clone().unwrap();
    let pid = d.pid().unwrap();
    let before = probe_answer(&d);
    let env = Arc::new(Env {
        socket: d.socket.clone(),
        http: http.clone(),
        bus: bus.address.clone(),
    });
    let tally = Arc::new(Mutex::new(Tally::default()));
    let rss = RssSampler::start(pid);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let (monitor, kv_peak) = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..CLIENTS {
            // Half on the socket, a quarter each on HTTP and D-Bus; one of each door shares
            // the limited app.
            let door = match i % 4 {
                0 | 1 => Door::Socket,
                2 => Door::Http,
                _ => Door::Dbus,
            };
            // Eight apps of eight clients (the HTTP ones by key), and the limited one.
            let app = match (i, door) {
                (0..4, _) => LIMITED_APP.to_string(),
                (_, Door::Http) => HTTP_KEYS[(i / 4) % 2].1.to_string(),
                _ => format!("load-{}", i % 8),
            };
            tasks.spawn(client(i, door, app, env.clone(), deadline, tally.clone()));
        }
        // As root, an admin: sees every app's contexts and where their chunks are.
        let admin = Client::connect(&d.socket, "load-monitor")
            .await
            .expect("connect");
        let mut monitor = Monitor::default();
        let mut kv_peak = 0u64;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            if let Ok(st) = admin.status().await {
                kv_peak = kv_peak.max(st.kv_resident_bytes);
            }
            monitor.look(&admin).await;
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tally
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("a client panicked: {e}"));
            }
        }
        (monitor, kv_peak)
    });
    let evicted_seen = monitor.evicted_chunks;
    let elapsed = t0.elapsed();
    let (rss_peak, rss_samples) = rss.finish();
    let after = probe_answer(&d);
    // Calls whose clients vanished (an HTTP connection closed at the first token) end when
    // the engine next notices; give it a moment, then nothing may run or wait.
    let drained = Instant::now();
    let mut text = metrics(&http);
    while (sample(&text, "llmsd_requests_running") > 0.0
        || sample(&text, "llmsd_requests_queued") > 0.0)
        && drained.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
        text = metrics(&http);
    }
    println!(
        "the daemon was idle {:?} after the last call",
        drained.elapsed()
    );
    let log = d.log_text();

    let tally = tally.lock().unwrap();
    let mut doors = serde_json::Map::new();
    let (mut completed, mut tokens) = (0u64, 0u64);
    println!(
        "load: {CLIENTS} clients for {:.0} s (deadline {secs} s), max_running {MAX_RUNNING}, \
         max_queued {MAX_QUEUED}, memory budget {MEMORY_BUDGET_MIB} MiB, KV {KV_BUDGET_MIB} MiB",
        elapsed.as_secs_f64()
    );
    println!(
        "{:<7} {:>9} {:>9} {:>5} {:>6} {:>7}  {:>24}  {:>24}",
        "door",
        "completed",
        "cancelled",
        "busy",
        "quota",
        "tokens",
        "first token p50/p90/p99 ms",
        "whole call p50/p90/p99 ms"
    );
    for (door, s) in &tally.doors {
        let ft = percentiles(&s.first_token_ms);
        let tot = percentiles(&s.total_ms);
        println!(
            "{:<7} {:>9} {:>9} {:>5} {:>6} {:>7}  {:>8.0}/{:>6.0}/{:>7.0}  {:>8.0}/{:>6.0}/{:>7.0}",
            door.name(),
            s.completed,
            s.cancelled,
            s.busy,
            s.quota_exceeded,
            s.tokens,
            ft["p50"].as_f64().unwrap_or(f64::NAN),
            ft["p90"].as_f64().unwrap_or(f64::NAN),
            ft["p99"].as_f64().unwrap_or(f64::NAN),
            tot["p50"].as_f64().unwrap_or(f64::NAN),
            tot["p90"].as_f64().unwrap_or(f64::NAN),
            tot["p99"].as_f64().unwrap_or(f64::NAN),
        );
        completed += s.completed;
        tokens += s.tokens;
        let mut v = serde_json::to_value(s).unwrap();
        v["first_token_ms"] = ft;
        v["total_ms"] = tot;
        doors.insert(door.name().to_string(), v);
    }
    let secs_run = elapsed.as_secs_f64();
    let engine_busy_s = sample(&text, "llmsd_engine_busy_microseconds_total") / 1e6;
    let report = json!({
        "clients": CLIENTS,
        "seconds": secs_run,
        "doors": doors,
        "completed_per_s": completed as f64 / secs_run,
        "generated_tokens_per_s": tokens as f64 / secs_run,
        "engine_busy_fraction": engine_busy_s / secs_run,
        "contexts_created": tally.contexts_created,
        "forks": tally.forks,
        "cancel_races": tally.cancel_races,
        "restore_ms_total": tally.restore_ms,
        "evicted_chunks_seen": evicted_seen,
        "kv_resident_peak_mib": kv_peak as f64 / MIB,
        "rss_peak_mib": rss_peak as f64 / MIB,
        "rss_samples": rss_samples,
        "memory_budget_mib": MEMORY_BUDGET_MIB,
        "kv_budget_mib": KV_BUDGET_MIB,
    });
    println!(
        "throughput {:.2} calls/s, {:.1} generated tokens/s (engine busy {:.0}%); {} contexts, \
         {} forks, {} cancels lost the race; up to {evicted_seen} chunks evicted at once, \
         {:.0} ms of restores; KV resident peak {:.1} MiB; RSS peak {:.1} MiB ({rss_samples} \
         samples)",
        report["completed_per_s"].as_f64().unwrap(),
        report["generated_tokens_per_s"].as_f64().unwrap(),
        100.0 * engine_busy_s / secs_run,
        tally.contexts_created,
        tally.forks,
        tally.cancel_races,
        tally.restore_ms,
        kv_peak as f64 / MIB,
        rss_peak as f64 / MIB,
    );
    if let Some(path) = std::env::var_os("LLMSD_SOAK_REPORT") {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap())
            .expect("write the soak report");
    }

    assert!(
        tally.failures.is_empty(),
        "{} calls failed otherwise than Busy/QuotaExceeded:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    // Every door did real work, and the contended paths were exercised.
    for door in [Door::Socket, Door::Http, Door::Dbus] {
        let s = &tally.doors[&door];
        assert!(
            s.completed > 0 && s.cancelled > 0,
            "{door:?}: {:?}",
            doors[door.name()]
        );
    }
    let quota: u64 = tally.doors.values().map(|s| s.quota_exceeded).sum();
    assert!(quota > 0, "the limited app never met its quota");
    assert!(
        evicted_seen > 0,
        "no chunk was ever evicted: the KV budget is too large"
    );
    assert!(
        kv_peak <= KV_BUDGET_MIB << 20,
        "KV resident {kv_peak} over the budget"
    );
    let limit = (MEMORY_BUDGET_MIB + RSS_MARGIN_MIB) << 20;
    assert!(
        rss_peak < limit,
        "RSS peaked at {:.1} MiB, over the memory budget + margin {:.0} MiB",
        rss_peak as f64 / MIB,
        limit as f64 / MIB
    );
    // Everything accepted has ended: nothing runs or waits.
    assert_eq!(sample(&text, "llmsd_requests_running"), 0.0, "{text}");
    assert_eq!(sample(&text, "llmsd_requests_queued"), 0.0, "{text}");
    // The daemon's own count agrees: only documented codes, and every cancel accounted for.
    for code in ErrorCode::ALL {
        let n = sample(
            &text,
            &format!("llmsd_errors_total{{code=\"{}\"}}", code.name()),
        );
        match code {
            ErrorCode::Busy | ErrorCode::QuotaExceeded => {}
            // The monitor asking after contexts their clients had just deleted.
            ErrorCode::NotFound => assert!(
                n <= monitor.gone as f64,
                "the daemon returned {n} NotFound errors, {} of them to the monitor",
                monitor.gone
            ),
            ErrorCode::Cancelled => {
                let seen: u64 = tally.doors.values().map(|s| s.cancelled).sum();
                let confirmed = seen - tally.http_closes;
                assert!(
                    n >= confirmed as f64 && n <= seen as f64,
                    "the daemon counted {n} cancelled calls; clients saw {seen} \
                     ({} by closing an HTTP connection)",
                    tally.http_closes
                );
            }
            _ => assert_eq!(n, 0.0, "the daemon returned {code:?} errors:\n{text}"),
        }
    }
    let served = sample(&text, "llmsd_completions_total");
    assert!(
        served >= (completed + 1) as f64 && served <= (completed + 1 + tally.http_closes) as f64,
        "the daemon completed {served} calls; clients saw {completed} (+1 probe)"
    );
    // Still healthy, and still right.
    assert_eq!(after, before, "the greedy answer changed after the load");
    let (st, health) = http_json(&http, "GET", "/health", None, &Value::Null);
    assert_eq!(st, 200);
    assert_eq!(health["status"], "ok", "{health}");
    for bad in ["ERROR", "panicked"] {
        assert!(!log.contains(bad), "the log has {bad:?}:\n{log}");
    }
}
