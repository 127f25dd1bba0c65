//! The bad-input matrix: one table of hostile or malformed requests, each sent through every
//! door that can express it (the Unix socket as raw frames, HTTP as raw bytes, D-Bus as raw
//! method calls on a private dbus-daemon) to one real `llmsd serve`. Every row must get its
//! documented typed error, and after every row the same door serves a normal request at once.
//! Slow-loris clients and clients that vanish mid-stream have tests of their own below.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::bus::PrivateBus;
use common::*;
use llmsd_client::ErrorCode;
use serde_json::{json, Value};

const APP: &str = "matrix";
const DBUS_NAME: &str = "org.llmsd.Llm1";
const DBUS_PATH: &str = "/org/llmsd/Llm1";

/// What a row sends on the socket (after the hello).
enum SocketSend {
    /// A whole frame body, sent on the shared connection; the reply names `id` 1.
    Frame(Vec<u8>),
    /// A frame body on a new connection instead of the hello; the reply is a connection-level
    /// error and the connection closes.
    Hello(Vec<u8>),
    /// A raw length header announcing `n` bytes (over the limit): error, then close.
    Header(u32),
}

/// What a row sends over D-Bus: `ChatSync(app, context, message, params)` or a raw call.
enum DbusSend {
    ChatSync {
        app: String,
        context: String,
        message: String,
        params: String,
    },
    GetContext(String),
    Cancel(u64),
    /// `ChatSync` with a single integer argument: the wrong signature.
    WrongSignature,
    /// A method the interface does not have.
    Unknown,
}

/// The error one door must answer with.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    /// The service's typed error (its code on the socket, its status and OpenAI code on
    /// HTTP, `org.llmsd.Error.<Code>` on D-Bus).
    Code(ErrorCode),
    /// An HTTP status and OpenAI error code of the door itself (413, 404, 405).
    Http(u16, &'static str),
    /// A standard D-Bus error the bus layer gives (wrong signature, unknown method).
    Dbus(&'static str),
}

struct Row {
    name: &'static str,
    socket: Option<SocketSend>,
    /// (method, path, raw body)
    http: Option<(&'static str, String, Vec<u8>)>,
    dbus: Option<DbusSend>,
    want: Want,
    /// Overrides of `want` for one door.
    http_want: Option<Want>,
    dbus_want: Option<Want>,
}

impl Row {
    fn new(name: &'static str, want: ErrorCode) -> Self {
        Row {
            name,
            socket: None,
            http: None,
            dbus: None,
            want: Want::Code(want),
            http_want: None,
            dbus_want: None,
        }
    }

    /// A stateless prompt with the generation parameters `fragment` (JSON members without
    /// braces) on all three doors: the socket's `params`, OpenAI's body, D-Bus's params JSON.
    fn params(name: &'static str, fragment: &str, want: ErrorCode) -> Self {
        Row::new(name, want)
            .socket_frame(format!(
                r#"{{"type":"request","id":1,"method":"prompt","params":{{"input":{{"text":"Hi"}},"params":{{{fragment}}}}}}}"#
            ))
            .http_post(
                "/v1/completions",
                format!(r#"{{"prompt":"Hi",{fragment}}}"#).into_bytes(),
            )
            .dbus(DbusSend::ChatSync {
                app: APP.into(),
                context: String::new(),
                message: "Hi".into(),
                params: format!("{{{fragment}}}"),
            })
    }

    /// A prompt of `text` in `context` (None: stateless) on all three doors.
    fn prompt(name: &'static str, context: Option<&str>, text: &str, want: ErrorCode) -> Self {
        let ctx = context.map_or(String::new(), |c| format!(r#""context":{},"#, json!(c)));
        let text_json = json!(text);
        Row::new(name, want)
            .socket_frame(format!(
                r#"{{"type":"request","id":1,"method":"prompt","params":{{{ctx}"input":{{"text":{text_json}}},"params":{{"max_tokens":2}}}}}}"#
            ))
            .http_post(
                "/v1/completions",
                format!(r#"{{{ctx}"prompt":{text_json},"max_tokens":2}}"#).into_bytes(),
            )
            .dbus(DbusSend::ChatSync {
                app: APP.into(),
                context: context.unwrap_or("").into(),
                message: text.into(),
                params: r#"{"max_tokens":2}"#.into(),
            })
    }

    fn socket_frame(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.socket = Some(SocketSend::Frame(body.into()));
        self
    }

    fn socket(mut self, send: SocketSend) -> Self {
        self.socket = Some(send);
        self
    }

    fn http_post(mut self, path: &str, body: impl Into<Vec<u8>>) -> Self {
        self.http = Some(("POST", path.into(), body.into()));
        self
    }

    fn http(mut self, method: &'static str, path: &str, body: impl Into<Vec<u8>>) -> Self {
        self.http = Some((method, path.into(), body.into()));
        self
    }

    fn no_http(mut self) -> Self {
        self.http = None;
        self
    }

    fn dbus(mut self, send: DbusSend) -> Self {
        self.dbus = Some(send);
        self
    }

    fn http_want(mut self, w: Want) -> Self {
        self.http_want = Some(w);
        self
    }

    fn dbus_want(mut self, w: Want) -> Self {
        self.dbus_want = Some(w);
        self
    }
}

fn snake(code: ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("codes serialize as strings")
}

/// The error code OpenAI's shape carries for a service error.
fn openai_code(code: ErrorCode) -> String {
    match code {
        ErrorCode::ContextWindowExceeded => "context_length_exceeded".into(),
        c => snake(c),
    }
}

// --- the socket -------------------------------------------------------------------------

fn frame(s: &mut UnixStream, body: &[u8]) {
    s.write_all(&(body.len() as u32).to_be_bytes())
        .expect("write header");
    s.write_all(body).expect("write body");
}

fn read_frame(s: &mut UnixStream) -> Option<Value> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut b = vec![0u8; u32::from_be_bytes(h) as usize];
    s.read_exact(&mut b).ok()?;
    Some(serde_json::from_slice(&b).expect("the daemon sends JSON"))
}

fn socket_connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
}

fn socket_hello(d: &Daemon, app: &str) -> UnixStream {
    let mut s = socket_connect(d);
    frame(
        &mut s,
        json!({"type": "hello", "protocol": 1, "app": app})
            .to_string()
            .as_bytes(),
    );
    let w = read_frame(&mut s).expect("welcome");
    assert_eq!(w["type"], "welcome", "{w}");
    s
}

/// The frame answering request `id` (events of it skipped).
fn reply_to(s: &mut UnixStream, id: u64) -> Value {
    loop {
        let f = read_frame(s).unwrap_or_else(|| panic!("connection closed before reply {id}"));
        if f["type"] == "event" {
            continue;
        }
        if f["id"] == id || f["id"].is_null() {
            return f;
        }
    }
}

/// A normal greedy prompt of 2 tokens on the socket connection.
fn socket_works(s: &mut UnixStream, id: u64) {
    frame(
        s,
        json!({"type": "request", "id": id, "method": "prompt",
               "params": {"input": {"text": "The sky is"}, "params": {"max_tokens": 2}}})
        .to_string()
        .as_bytes(),
    );
    let r = reply_to(s, id);
    assert_eq!(r["kind"], "completion", "the next request failed: {r}");
}

// --- D-Bus --------------------------------------------------------------------------------

async fn dbus_call(conn: &zbus::Connection, send: &DbusSend) -> Result<(), (String, String)> {
    let r = match send {
        DbusSend::ChatSync {
            app,
            context,
            message,
            params,
        } => {
            conn.call_method(
                Some(DBUS_NAME),
                DBUS_PATH,
                Some(DBUS_NAME),
                "ChatSync",
                &(
                    app.as_str(),
                    context.as_str(),
                    message.as_str(),
                    params.as_str(),
                ),
            )
            .await
        }
        DbusSend::GetContext(id) => {
            conn.call_method(
                Some(DBUS_NAME),
                DBUS_PATH,
                Some(DBUS_NAME),
                "GetContext",
                &(APP, id.as_str()),
            )
            .await
        }
        DbusSend::Cancel(id) => {
            conn.call_method(Some(DBUS_NAME), DBUS_PATH, Some(DBUS_NAME), "Cancel", id)
                .await
        }
        DbusSend::WrongSignature => {
            conn.call_method(
                Some(DBUS_NAME),
                DBUS_PATH,
                Some(DBUS_NAME),
                "ChatSync",
                &42u32,
            )
            .await
        }
        DbusSend::Unknown => {
            conn.call_method(Some(DBUS_NAME), DBUS_PATH, Some(DBUS_NAME), "Reboot", &())
                .await
        }
    };
    match r {
        Ok(_) => Ok(()),
        Err(zbus::Error::MethodError(name, message, _)) => {
            Err((name.to_string(), message.unwrap_or_default()))
        }
        Err(e) => Err(("transport".into(), e.to_string())),
    }
}

async fn dbus_works(conn: &zbus::Connection) {
    let send = DbusSend::ChatSync {
        app: APP.into(),
        context: String::new(),
        message: "The sky is".into(),
        params: r#"{"max_tokens":2}"#.into(),
    };
    if let Err(e) = dbus_call(conn, &send).await {
        panic!("the next D-Bus request failed: {e:?}");
    }
}

// --- HTTP -----------------------------------------------------------------------------------

fn http_works(addr: &str) {
    let r = common::http::request(
        addr,
        "POST",
        "/v1/completions",
        None,
        br#"{"prompt":"The sky is","max_tokens":2,"temperature":0}"#,
    );
    assert_eq!(r.status, 200, "the next HTTP request failed: {}", r.body);
}

fn config(dir: &std::path::Path) -> String {
    let p = dir.join("bad-input.toml");
    // A small window, so a prompt longer than it is cheap to tokenize.
    std::fs::write(&p, "[kv]\nmax_context_tokens = 1024\n").expect("config");
    p.to_str().expect("UTF-8 path").to_string()
}

#[test]
fn every_bad_input_gets_its_typed_error_on_every_door_and_the_next_request_is_served() {
    let bus = PrivateBus::session();
    let conf_dir = tempfile::tempdir().expect("tempdir");
    let conf = config(conf_dir.path());
    let mut d = Daemon::start_env(
        true,
        &["--bus", "session", "--config", &conf],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let addr = d.http.clone().expect("HTTP door");
    let rt = rt();
    let conn = rt.block_on(async {
        zbus::connection::Builder::address(bus.address.as_str())
            .expect("bus address")
            .build()
            .await
            .expect("connect to the bus")
    });
    // A context of another app (on the socket): every door must treat it as absent.
    let foreign = {
        let mut s = socket_hello(&d, "owner");
        frame(
            &mut s,
            br#"{"type":"request","id":1,"method":"create_context","params":{}}"#,
        );
        reply_to(&mut s, 1)["value"]["id"]
            .as_str()
            .expect("a context id")
            .to_string()
    };
    let window = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3");
    let huge = "word ".repeat(400_000); // 2 MB: over the prompt and body limits
    let prompt_frame = |input: &str| {
        format!(r#"{{"type":"request","id":1,"method":"prompt","params":{{"input":{input}}}}}"#)
    };
    let chat = |messages: &str| format!(r#"{{"messages":{messages}}}"#);

    let rows = vec![
        // Malformed bodies.
        Row::new("invalid JSON", ErrorCode::InvalidRequest)
            .socket_frame("{not json")
            .http_post("/v1/completions", "{not json")
            .dbus(DbusSend::ChatSync {
                app: APP.into(),
                context: String::new(),
                message: "Hi".into(),
                params: "{not json".into(),
            }),
        Row::new("JSON of the wrong shape", ErrorCode::InvalidRequest)
            .socket_frame("[1,2,3]")
            .http_post("/v1/completions", "[1,2,3]")
            .dbus(DbusSend::ChatSync {
                app: APP.into(),
                context: String::new(),
                message: "Hi".into(),
                params: "[1,2,3]".into(),
            }),
        Row::new("invalid UTF-8 in a string", ErrorCode::InvalidRequest)
            .socket_frame(
                [
                    &br#"{"type":"request","id":1,"method":"prompt","params":{"input":{"text":""#[..],
                    b"\xff\xfe",
                    br#""}}}"#,
                ]
                .concat(),
            )
            .http_post("/v1/completions", b"{\"prompt\":\"\xff\xfe\"}".to_vec()),
        Row::new("empty messages", ErrorCode::InvalidRequest)
            .socket_frame(prompt_frame(r#"{"messages":[]}"#))
            .http_post("/v1/chat/completions", chat("[]")),
        Row::new("unknown role", ErrorCode::InvalidRequest)
            .socket_frame(prompt_frame(r#"{"messages":[{"role":"wizard","content":"Hi"}]}"#))
            .http_post(
                "/v1/chat/completions",
                chat(r#"[{"role":"wizard","content":"Hi"}]"#),
            ),
        Row::new("wrong argument type", ErrorCode::InvalidRequest)
            .socket_frame(r#"{"type":"request","id":1,"method":"get_context","params":{"context":42}}"#)
            .http_post("/v1/contexts", r#"{"system":42}"#)
            .dbus(DbusSend::WrongSignature)
            .dbus_want(Want::Dbus("org.freedesktop.zbus.Error")),
        Row::new("unknown method or URL", ErrorCode::InvalidRequest)
            .socket_frame(r#"{"type":"request","id":1,"method":"reboot"}"#)
            .http("POST", "/v1/reboot", "{}")
            .http_want(Want::Http(404, "not_found"))
            .dbus(DbusSend::Unknown)
            .dbus_want(Want::Dbus("org.freedesktop.DBus.Error.UnknownMethod")),
        // Generation parameters.
        Row::params("max_tokens of the wrong type", r#""max_tokens":"ten""#, ErrorCode::InvalidRequest),
        Row::params("temperature of the wrong type", r#""temperature":[1]"#, ErrorCode::InvalidRequest),
        Row::params("max_tokens 0", r#""max_tokens":0"#, ErrorCode::InvalidRequest),
        Row::params("max_tokens negative", r#""max_tokens":-1"#, ErrorCode::InvalidRequest),
        Row::params("max_tokens enormous", r#""max_tokens":4294967295"#, ErrorCode::InvalidRequest),
        Row::params("max_tokens beyond 64 bits", r#""max_tokens":18446744073709551616"#, ErrorCode::InvalidRequest),
        Row::params("max_tokens 1e30", r#""max_tokens":1e30"#, ErrorCode::InvalidRequest),
        Row::params("temperature NaN", r#""temperature":NaN"#, ErrorCode::InvalidRequest),
        Row::params("temperature infinite", r#""temperature":1e999"#, ErrorCode::InvalidRequest),
        Row::params("temperature negative", r#""temperature":-1"#, ErrorCode::InvalidRequest),
        Row::params("top_p negative", r#""top_p":-0.5"#, ErrorCode::InvalidRequest),
        Row::params("top_p above 1", r#""top_p":1.5"#, ErrorCode::InvalidRequest),
        Row::params("top_k negative", r#""top_k":-3"#, ErrorCode::InvalidRequest),
        Row::params("min_p negative", r#""min_p":-1"#, ErrorCode::InvalidRequest),
        Row::params("repetition_penalty negative", r#""repetition_penalty":-1"#, ErrorCode::InvalidRequest),
        Row::params("frequency_penalty out of range", r#""frequency_penalty":-5"#, ErrorCode::InvalidRequest),
        Row::params("seed negative", r#""seed":-1"#, ErrorCode::InvalidRequest),
        Row::params("five stop strings", r#""stop":["a","b","c","d","e"]"#, ErrorCode::InvalidRequest),
        Row::params("an empty stop string", r#""stop":[""]"#, ErrorCode::InvalidRequest),
        Row::params("logprobs 99", r#""logprobs":99"#, ErrorCode::InvalidRequest),
        // Sizes.
        Row::prompt(
            "prompt longer than the context window",
            None,
            &window,
            ErrorCode::ContextWindowExceeded,
        ),
        Row::prompt("prompt over the size limit", None, &huge, ErrorCode::InvalidRequest)
            .http_want(Want::Http(413, "request_too_large")),
        Row::new("frame or body over the limit", ErrorCode::InvalidRequest)
            .socket(SocketSend::Header(64 << 20))
            .http_post("/v1/chat/completions", huge.clone().into_bytes())
            .http_want(Want::Http(413, "request_too_large")),
        // Context ids.
        Row::prompt(
            "unknown context id",
            Some("ctx-00000000deadbeef"),
            "Hi",
            ErrorCode::NotFound,
        ),
        Row::prompt("another app's context id", Some(&foreign), "Hi", ErrorCode::NotFound),
        Row::prompt(
            "a path as context id",
            Some("../../../etc/passwd"),
            "Hi",
            ErrorCode::NotFound,
        ),
        Row::new("get another app's context", ErrorCode::NotFound)
            .socket_frame(format!(
                r#"{{"type":"request","id":1,"method":"get_context","params":{{"context":"{foreign}"}}}}"#
            ))
            .http("GET", &format!("/v1/contexts/{foreign}"), "")
            .dbus(DbusSend::GetContext(foreign.clone())),
        Row::new("delete another app's context", ErrorCode::NotFound)
            .socket_frame(format!(
                r#"{{"type":"request","id":1,"method":"delete_context","params":{{"context":"{foreign}"}}}}"#
            ))
            .http("DELETE", &format!("/v1/contexts/{foreign}"), ""),
        Row::new("fork another app's context", ErrorCode::NotFound)
            .socket_frame(format!(
                r#"{{"type":"request","id":1,"method":"fork_context","params":{{"context":"{foreign}"}}}}"#
            ))
            .http_post(&format!("/v1/contexts/{foreign}/fork"), ""),
        Row::new("cancel of an unknown request", ErrorCode::NotFound)
            .socket_frame(r#"{"type":"request","id":1,"method":"cancel","params":{"request":999999}}"#)
            .dbus(DbusSend::Cancel(999_999)),
        // Identity.
        Row::new("a path as app name", ErrorCode::InvalidRequest)
            .socket(SocketSend::Hello(
                br#"{"type":"hello","protocol":1,"app":"../../etc"}"#.to_vec(),
            ))
            .dbus(DbusSend::ChatSync {
                app: "../../etc".into(),
                context: String::new(),
                message: "Hi".into(),
                params: String::new(),
            })
            .no_http(),
        Row::new("a foreign protocol version", ErrorCode::InvalidRequest).socket(SocketSend::Hello(
            br#"{"type":"hello","protocol":99,"app":"x"}"#.to_vec(),
        )),
    ];

    let mut sock = socket_hello(&d, APP);
    let mut next_id = 100u64;
    let mut table = Vec::new();
    for row in &rows {
        let mut doors = Vec::new();
        if let Some(send) = &row.socket {
            let code = snake(match &row.want {
                Want::Code(c) => *c,
                w => panic!("{}: socket rows want a code, not {w:?}", row.name),
            });
            match send {
                SocketSend::Frame(body) => {
                    frame(&mut sock, body);
                    let r = reply_to(&mut sock, 1);
                    assert_eq!(r["error"]["code"], code.as_str(), "{}: {r}", row.name);
                }
                SocketSend::Hello(body) => {
                    let mut s = socket_connect(&d);
                    frame(&mut s, body);
                    let r = read_frame(&mut s).expect("an error frame");
                    assert_eq!(r["error"]["code"], code.as_str(), "{}: {r}", row.name);
                    assert!(read_frame(&mut s).is_none(), "{}: not closed", row.name);
                }
                SocketSend::Header(n) => {
                    let mut s = socket_hello(&d, APP);
                    s.write_all(&n.to_be_bytes()).expect("header");
                    let r = read_frame(&mut s).expect("an error frame");
                    assert_eq!(r["error"]["code"], code.as_str(), "{}: {r}", row.name);
                    assert!(read_frame(&mut s).is_none(), "{}: not closed", row.name);
                }
            }
            next_id += 1;
            socket_works(&mut sock, next_id);
            doors.push(format!("socket {code}"));
        }
        if let Some((method, path, body)) = &row.http {
            let r = common::http::request(&addr, method, path, None, body);
            let (status, code) = match row.http_want.clone().unwrap_or(row.want.clone()) {
                Want::Code(c) => (c.http_status(), openai_code(c)),
                Want::Http(s, c) => (s, c.to_string()),
                w => panic!("{}: {w:?} is not an HTTP answer", row.name),
            };
            assert_eq!(r.status, status, "{}: {}", row.name, r.body);
            let v = r.json();
            assert_eq!(v["error"]["code"], code.as_str(), "{}: {v}", row.name);
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{}: {v}",
                row.name
            );
            http_works(&addr);
            doors.push(format!("HTTP {status} {code}"));
        }
        if let Some(send) = &row.dbus {
            let want = match row.dbus_want.clone().unwrap_or(row.want.clone()) {
                Want::Code(c) => c.dbus_name(),
                Want::Dbus(n) => n.to_string(),
                w => panic!("{}: {w:?} is not a D-Bus answer", row.name),
            };
            let got = rt.block_on(dbus_call(&conn, send));
            let (name, message) = got.expect_err(row.name);
            assert_eq!(name, want, "{}: {message}", row.name);
            rt.block_on(dbus_works(&conn));
            doors.push(format!("D-Bus {}", want.rsplit('.').next().unwrap_or("")));
        }
        assert!(!doors.is_empty(), "{}: no door sends it", row.name);
        table.push(format!("| {} | {} |", row.name, doors.join("; ")));
    }
    println!("| input | answer per door |\n|---|---|");
    for line in &table {
        println!("{line}");
    }
    assert!(d.is_running());
    let log = d.log_text();
    assert!(!log.contains("panicked"), "a panic:\n{log}");
}

/// A connection a test holds open without finishing its request.
enum Stalled {
    Socket(UnixStream),
    Http(std::net::TcpStream),
}

impl Stalled {
    /// Waits (up to `limit`) for the daemon to close the connection; returns when it did and
    /// what it said first (an error frame or HTTP response), if anything.
    fn closed_within(&mut self, limit: Duration) -> (Duration, String) {
        let t0 = Instant::now();
        let mut said = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            assert!(!left.is_zero(), "still open after {limit:?}");
            let r = match self {
                Stalled::Socket(s) => {
                    s.set_read_timeout(Some(left)).expect("timeout");
                    s.read(&mut buf)
                }
                Stalled::Http(s) => {
                    s.set_read_timeout(Some(left)).expect("timeout");
                    s.read(&mut buf)
                }
            };
            match r {
                Ok(0) => return (t0.elapsed(), String::from_utf8_lossy(&said).into_owned()),
                Ok(n) => said.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return (t0.elapsed(), String::from_utf8_lossy(&said).into_owned())
                }
                Err(e) => panic!("still open after {:?}: {e}", t0.elapsed()),
            }
        }
    }
}

/// Slow-loris clients on the socket and HTTP: connections that start a request and then
/// stall or trickle. While many are open, both doors serve others normally; each is cut off
/// once its request has not arrived whole within the read timeout (10 s). D-Bus has no such
/// client: the bus daemon hands the daemon whole messages only.
#[test]
fn slow_loris_clients_are_cut_off_and_do_not_block_others() {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let d = Daemon::start(true, &[]);
    let addr = d.http.clone().expect("HTTP door");
    let mut stalled: Vec<(&str, Instant, Stalled)> = Vec::new();
    for _ in 0..25 {
        let mut s = socket_connect(&d);
        s.write_all(&[0, 0]).expect("half a hello header");
        stalled.push(("socket: half a hello", Instant::now(), Stalled::Socket(s)));
        let mut s = socket_hello(&d, "loris");
        s.write_all(&100u32.to_be_bytes()).expect("header");
        s.write_all(b"{\"type\":").expect("a piece of the body");
        stalled.push(("socket: half a frame", Instant::now(), Stalled::Socket(s)));
        let mut h = common::http::connect(&addr);
        h.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: llmsd\r\nX-Slow: ")
            .expect("half a header");
        stalled.push(("HTTP: half the headers", Instant::now(), Stalled::Http(h)));
        let mut h = common::http::connect(&addr);
        h.write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: llmsd\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\":",
        )
        .expect("headers and half the body");
        stalled.push(("HTTP: half the body", Instant::now(), Stalled::Http(h)));
    }
    // A trickler: a byte of a frame every 400 ms, so the frame takes 40 s to arrive.
    let sock = d.socket.clone();
    let trickler = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).expect("connect");
        let hello = br#"{"type":"hello","protocol":1,"app":"trickle"}"#;
        s.write_all(&(hello.len() as u32).to_be_bytes())
            .expect("hello");
        s.write_all(hello).expect("hello");
        let body = [b' '; 100];
        let t0 = Instant::now();
        let mut sent = 0;
        for chunk in (100u32).to_be_bytes().iter().chain(body.iter()) {
            if s.write_all(&[*chunk]).is_err() {
                return (t0.elapsed(), sent);
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(400));
        }
        (t0.elapsed(), sent)
    });
    // Meanwhile both doors serve at once.
    let t0 = Instant::now();
    let mut s = socket_hello(&d, "normal");
    socket_works(&mut s, 1);
    http_works(&addr);
    let served = t0.elapsed();
    assert!(
        served < TIMEOUT,
        "normal requests took {served:?} among the stalled ones"
    );
    let mut report = std::collections::BTreeMap::<&str, (Duration, String)>::new();
    for (what, opened, conn) in &mut stalled {
        let (_, said) = conn.closed_within(TIMEOUT + Duration::from_secs(15));
        let after = opened.elapsed();
        assert!(
            after >= TIMEOUT - Duration::from_secs(1) || what.starts_with("socket: half a hello"),
            "{what}: cut off after {after:?}, before the timeout"
        );
        let e = report.entry(what).or_insert((Duration::ZERO, said.clone()));
        e.0 = e.0.max(after);
    }
    for (what, (after, said)) in &report {
        println!("{what}: closed after at most {after:.1?}; said {said:?}");
    }
    // The socket says why in an error frame; HTTP answers a started body with 408.
    let half_frame = &report["socket: half a frame"].1;
    assert!(half_frame.contains("invalid_request"), "{half_frame:?}");
    let half_body = &report["HTTP: half the body"].1;
    assert!(half_body.starts_with("HTTP/1.1 408"), "{half_body:?}");
    let (took, sent) = trickler.join().expect("trickler");
    assert!(
        sent < 104 && took < TIMEOUT + Duration::from_secs(5),
        "the trickler sent {sent} bytes over {took:?} without being cut off"
    );
    let mut s = socket_hello(&d, "normal");
    socket_works(&mut s, 2);
    http_works(&addr);
}

/// The `running` figure of `status` (prompts queued or running).
fn running(s: &mut UnixStream, id: u64) -> u64 {
    frame(
        s,
        json!({"type": "request", "id": id, "method": "status"})
            .to_string()
            .as_bytes(),
    );
    let r = reply_to(s, id);
    r["value"]["running"]
        .as_u64()
        .unwrap_or_else(|| panic!("status: {r}"))
}

/// Clients that disconnect in the middle of a streamed answer, on all three doors: the
/// generation stops at once, the context is left as it was before the turn, and its next turn
/// gives exactly what a context that never saw the aborted turn gives.
#[test]
fn a_client_that_disconnects_mid_stream_leaves_its_context_as_it_was() {
    let bus = PrivateBus::session();
    let d = Daemon::start_env(
        true,
        &["--bus", "session"],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let addr = d.http.clone().expect("HTTP door");
    let rt = rt();
    let mut admin = socket_hello(&d, APP);
    let mut id = 10u64;
    let mut next = || {
        id += 1;
        id
    };
    // One context per door plus a control, all with the same opening turn (HTTP contexts
    // belong to the HTTP app, so the HTTP pair is made there).
    let new_socket_ctx = |s: &mut UnixStream, id: u64| -> String {
        frame(
            s,
            json!({"type": "request", "id": id, "method": "create_context",
                   "params": {"system": "Answer briefly."}})
            .to_string()
            .as_bytes(),
        );
        reply_to(s, id)["value"]["id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let long = json!({"max_tokens": 2000, "ignore_eos": true});
    let turn = json!({"max_tokens": 8});
    let socket_turn = |s: &mut UnixStream, id: u64, ctx: &str, text: &str, params: &Value| {
        frame(
            s,
            json!({"type": "request", "id": id, "method": "prompt",
                   "params": {"context": ctx,
                              "input": {"messages": [{"role": "user", "content": text}]},
                              "params": params}})
            .to_string()
            .as_bytes(),
        );
    };
    let tokens = |s: &mut UnixStream, id: u64, ctx: &str| -> u64 {
        frame(
            s,
            json!({"type": "request", "id": id, "method": "get_context",
                   "params": {"context": ctx}})
            .to_string()
            .as_bytes(),
        );
        reply_to(s, id)["value"]["tokens"].as_u64().expect("tokens")
    };

    // The socket (and D-Bus, same uid and app name: the same app).
    let sock_ctx = new_socket_ctx(&mut admin, next());
    let dbus_ctx = new_socket_ctx(&mut admin, next());
    let control = new_socket_ctx(&mut admin, next());
    for ctx in [&sock_ctx, &dbus_ctx, &control] {
        let i = next();
        socket_turn(&mut admin, i, ctx, "Name a colour.", &turn);
        assert_eq!(reply_to(&mut admin, i)["kind"], "completion");
    }
    let before = tokens(&mut admin, next(), &control);

    // Socket: read three tokens, then vanish.
    {
        let mut s = socket_hello(&d, APP);
        socket_turn(&mut s, 1, &sock_ctx, "Tell me a long story.", &long);
        for _ in 0..3 {
            let f = read_frame(&mut s).expect("a frame");
            assert_eq!(f["event"], "token", "{f}");
        }
    }
    // D-Bus: a streamed Chat; the caller leaves the bus after its first token.
    rt.block_on(async {
        use futures_util::StreamExt;
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .expect("address")
            .build()
            .await
            .expect("bus");
        let proxy = llmsd::dbus::client::Llm1ClientProxy::new(&conn)
            .await
            .expect("proxy");
        let mut tokens = proxy.receive_token().await.expect("token signals");
        proxy
            .chat(APP, &dbus_ctx, "Tell me a long story.", &long.to_string())
            .await
            .expect("chat starts");
        tokens.next().await.expect("a token signal");
        drop(tokens);
        drop(proxy);
        conn.close().await.expect("leave the bus");
    });
    // HTTP: a context of the HTTP app, a streamed turn read for its first event, dropped.
    let (_, _, hctx) = common::http::http(
        &addr,
        "POST",
        "/v1/contexts",
        None,
        Some(&json!({"system": "Answer briefly."})),
    );
    let http_ctx = hctx["id"].as_str().expect("id").to_string();
    let (_, _, hcontrol) = common::http::http(
        &addr,
        "POST",
        "/v1/contexts",
        None,
        Some(&json!({"system": "Answer briefly."})),
    );
    let http_control = hcontrol["id"].as_str().expect("id").to_string();
    let http_turn = |ctx: &str, text: &str| -> Value {
        let (st, _, v) = common::http::http(
            &addr,
            "POST",
            "/v1/chat/completions",
            None,
            Some(
                &json!({"context": ctx, "messages": [{"role": "user", "content": text}],
                         "max_tokens": 8, "temperature": 0}),
            ),
        );
        assert_eq!(st, 200, "{v}");
        v
    };
    for ctx in [&http_ctx, &http_control] {
        http_turn(ctx, "Name a colour.");
    }
    {
        let mut h = common::http::connect(&addr);
        let body = json!({"context": http_ctx,
                          "messages": [{"role": "user", "content": "Tell me a long story."}],
                          "max_tokens": 2000, "ignore_eos": true, "stream": true,
                          "temperature": 0});
        common::http::send(
            &mut h,
            "POST",
            "/v1/chat/completions",
            None,
            body.to_string().as_bytes(),
        );
        let mut first = [0u8; 512];
        let n = h.read(&mut first).expect("the first event");
        assert!(
            String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&first[..n])
        );
    }
    // Every aborted generation stops within a few steps, not after 2000 tokens.
    let t0 = Instant::now();
    while running(&mut admin, next()) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "generations of vanished clients still run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("all three aborted streams ended within {:?}", t0.elapsed());
    // The contexts are as they were, and continue exactly like their controls.
    for ctx in [&sock_ctx, &dbus_ctx] {
        assert_eq!(tokens(&mut admin, next(), ctx), before, "{ctx}");
    }
    let answer = |s: &mut UnixStream, id: u64, ctx: &str| -> String {
        socket_turn(s, id, ctx, "And another one?", &turn);
        let r = reply_to(s, id);
        r["value"]["text"].as_str().expect("text").to_string()
    };
    let want = answer(&mut admin, next(), &control);
    for ctx in [&sock_ctx, &dbus_ctx] {
        assert_eq!(answer(&mut admin, next(), ctx), want, "{ctx}");
    }
    let want = http_turn(&http_control, "And another one?");
    let got = http_turn(&http_ctx, "And another one?");
    assert_eq!(
        got["choices"][0]["message"]["content"],
        want["choices"][0]["message"]["content"]
    );
    for k in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(got["usage"][k], want["usage"][k], "{k}");
    }
}
