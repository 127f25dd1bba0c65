//! The D-Bus door against a private dbus-daemon and the real model: a zbus client, then
//! `busctl`, `gdbus` and `dbus-send`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use llmsd_engine::model::Model;
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{Completion, ContextInfo, Door, Health, ModelInfo, DBUS_INTROSPECTION_XML};
use serde_json::Value;

use super::client::Llm1ClientProxy;
use super::*;
use crate::kvstore::StoreConfig;
use crate::service::{ServiceConfig, ServiceParts};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GREEDY_8: &str = r#"{"max_tokens":8}"#;

/// A dbus-daemon of our own on a socket in a temporary directory.
struct PrivateBus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl PrivateBus {
    /// A session bus (everything allowed).
    fn start() -> Self {
        Self::launch(|listen| vec!["--session".into(), format!("--address={listen}")])
    }

    /// A bus with the system bus's default policy (deny owning names and calling methods),
    /// plus `include`d policy files.
    fn system(include: &[PathBuf]) -> Self {
        Self::launch(|listen| {
            let includes: String = include
                .iter()
                .map(|p| format!("  <include>{}</include>\n", p.display()))
                .collect();
            let config = format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
{includes}</busconfig>
"#
            );
            let path =
                PathBuf::from(listen.trim_start_matches("unix:path=")).with_extension("conf");
            std::fs::write(&path, config).expect("bus config");
            vec![format!("--config-file={}", path.display())]
        })
    }

    fn launch(args: impl FnOnce(&str) -> Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen = format!("unix:path={}", dir.path().join("bus").display());
        let mut child = Command::new("dbus-daemon")
            .args(["--nofork", "--nopidfile", "--print-address"])
            .args(args(&listen))
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon runs (install dbus)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("dbus-daemon prints its address");
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:path="), "address {address:?}");
        PrivateBus {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(MODEL);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models",
        p.display()
    );
    p
}

fn start_service(state: &std::path::Path) -> Service {
    let model = Model::load(model_path()).expect("model loads");
    let tokenizer = Tokenizer::from_gguf(model.file()).expect("tokenizer");
    let pool = ThreadPool::with_pinning(2, false).expect("pool");
    let mut store = StoreConfig::new(state);
    store.fit_costs = false;
    let (service, _engine) = Service::start(ServiceParts {
        model: Arc::new(model),
        tokenizer,
        pool: Arc::new(pool),
        model_id: MODEL.trim_end_matches(".gguf").to_string(),
        store,
        service: ServiceConfig::default(),
    })
    .expect("service starts");
    service
}

/// The daemon side: a bus, the service, the door.
struct Fixture {
    service: Service,
    _server: Connection,
    bus: PrivateBus,
    _state: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        let bus = PrivateBus::start();
        let state = tempfile::tempdir().expect("tempdir");
        let service = start_service(state.path());
        let server = serve(service.clone(), Bus::Address(bus.address.clone()))
            .await
            .expect("the door opens");
        Fixture {
            service,
            _server: server,
            bus,
            _state: state,
        }
    }

    async fn client(&self) -> (Connection, Llm1ClientProxy<'static>) {
        let conn = zbus::connection::Builder::address(self.bus.address.as_str())
            .expect("address")
            .build()
            .await
            .expect("client connects");
        let proxy = Llm1ClientProxy::new(&conn).await.expect("proxy");
        (conn, proxy)
    }

    /// The caller the door sees for this test process.
    fn me(&self, app: &str) -> Caller {
        let uid = unsafe { libc::getuid() };
        let gid = unsafe { libc::getgid() };
        Caller::user(Door::Dbus, uid, gid, Some(std::process::id()), app).expect("caller")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.service.shutdown();
    }
}

/// The D-Bus error name of a failed call.
fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => panic!("not a method error: {other:?}"),
    }
}

fn error_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, msg, _) => msg.clone().unwrap_or_default(),
        other => panic!("not a method error: {other:?}"),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Member {
    kind: String,
    name: String,
    /// (name, type, direction)
    args: Vec<(String, String, String)>,
}

fn attrs(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next().expect("quoted value");
        let end = after[1..].find(quote).expect("closing quote") + 1;
        out.insert(key, after[1..end].to_string());
        rest = &after[end + 1..];
    }
    out
}

/// Methods and signals of one interface in introspection XML (a tag scanner, enough for
/// introspection data: no CDATA, no entities in names).
fn members(xml: &str, iface: &str) -> Vec<Member> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut cur: Option<Member> = None;
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        rest = &rest[start..];
        if rest.starts_with("<!--") {
            let end = rest.find("-->").expect("comment ends");
            rest = &rest[end + 3..];
            continue;
        }
        let end = rest.find('>').expect("tag ends");
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') || tag.starts_with('?') {
            continue;
        }
        let closing = tag.starts_with('/');
        let empty = tag.ends_with('/');
        let body = tag.trim_start_matches('/').trim_end_matches('/');
        let (name, a) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
        let a = attrs(a);
        match (name, closing) {
            ("interface", false) => inside = a.get("name").map(String::as_str) == Some(iface),
            ("interface", true) => inside = false,
            ("method" | "signal", false) if inside => {
                cur = Some(Member {
                    kind: name.to_string(),
                    name: a["name"].clone(),
                    args: Vec::new(),
                });
                if empty {
                    out.extend(cur.take());
                }
            }
            ("method" | "signal", true) if inside => out.extend(cur.take()),
            ("arg", false) => {
                if let Some(m) = &mut cur {
                    // Defaults of the introspection format: method args are in, signal
                    // args out.
                    let default = if m.kind == "method" { "in" } else { "out" };
                    m.args.push((
                        a.get("name").cloned().unwrap_or_default(),
                        a["type"].clone(),
                        a.get("direction").cloned().unwrap_or(default.into()),
                    ));
                }
            }
            _ => {}
        }
        if empty && name == "interface" {
            inside = false;
        }
    }
    out.sort();
    out
}

#[test]
fn the_xml_scanner_reads_the_contract() {
    let m = members(DBUS_INTROSPECTION_XML, "org.llmsd.Llm1");
    assert_eq!(m.iter().filter(|m| m.kind == "method").count(), 12);
    assert_eq!(m.iter().filter(|m| m.kind == "signal").count(), 3);
    let token = m.iter().find(|m| m.name == "Token").expect("Token");
    assert_eq!(token.args[3], ("text".into(), "s".into(), "out".into()));
    assert!(members(DBUS_INTROSPECTION_XML, "org.example.Other").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_matches_the_checked_in_xml() {
    let f = Fixture::start().await;
    let (conn, _) = f.client().await;
    let intro = zbus::fdo::IntrospectableProxy::builder(&conn)
        .destination(DBUS_NAME)
        .expect("name")
        .path(DBUS_PATH)
        .expect("path")
        .build()
        .await
        .expect("proxy")
        .introspect()
        .await
        .expect("Introspect");
    let live = members(&intro, "org.llmsd.Llm1");
    let want = members(DBUS_INTROSPECTION_XML, "org.llmsd.Llm1");
    assert_eq!(live, want, "live XML:\n{intro}");

    // A second daemon on the same bus does not queue for the name: it fails.
    let e = serve(f.service.clone(), Bus::Address(f.bus.address.clone()))
        .await
        .expect_err("the name is taken");
    assert!(matches!(e, DbusError::NameTaken(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_are_scoped_and_errors_are_typed() {
    let f = Fixture::start().await;
    let (_conn, p) = f.client().await;

    let id = p
        .create_context("notes", "You are terse.")
        .await
        .expect("create");
    let info: ContextInfo =
        serde_json::from_str(&p.get_context("notes", &id).await.expect("get")).expect("JSON");
    assert_eq!(info.id, id);
    assert_eq!(info.messages, 1, "the system prompt opens the conversation");
    let fork = p.fork_context("notes", &id).await.expect("fork");
    assert_ne!(fork, id);
    let list: Vec<ContextInfo> =
        serde_json::from_str(&p.list_contexts("notes").await.expect("list")).expect("JSON");
    let mut ids: Vec<_> = list.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    let mut want = vec![id.clone(), fork.clone()];
    want.sort();
    assert_eq!(ids, want);

    // Another app of the same uid sees none of it.
    let other: Vec<ContextInfo> =
        serde_json::from_str(&p.list_contexts("mail").await.expect("list")).expect("JSON");
    assert!(other.is_empty(), "{other:?}");
    let e = p.get_context("mail", &id).await.expect_err("not mail's");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");
    let e = p.delete_context("mail", &id).await.expect_err("not mail's");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");
    let e = p
        .chat_sync("mail", &id, "hi", GREEDY_8)
        .await
        .expect_err("not mail's");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");

    p.delete_context("notes", &fork).await.expect("delete");
    let e = p.get_context("notes", &fork).await.expect_err("deleted");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");
    let e = p
        .get_context("notes", "ctx-nope")
        .await
        .expect_err("unknown");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");
    assert!(
        error_message(&e).contains("ctx-nope"),
        "{}",
        error_message(&e)
    );

    // Bad input: app names, params JSON, parameter ranges.
    let e = p.list_contexts("no/slash").await.expect_err("bad app");
    assert_eq!(error_name(&e), "org.llmsd.Error.InvalidRequest");
    let e = p.create_context("", "").await.expect_err("empty app");
    assert_eq!(error_name(&e), "org.llmsd.Error.InvalidRequest");
    let e = p
        .chat_sync("notes", "", "hi", "{not json")
        .await
        .expect_err("bad JSON");
    assert_eq!(error_name(&e), "org.llmsd.Error.InvalidRequest");
    let e = p
        .chat("notes", "", "hi", r#"{"max_tokenz":3}"#)
        .await
        .expect_err("unknown field");
    assert_eq!(error_name(&e), "org.llmsd.Error.InvalidRequest");
    assert!(error_message(&e).contains("max_tokenz"));
    let e = p
        .complete("notes", "", "hi", r#"{"temperature":-1}"#)
        .await
        .expect_err("bad range");
    assert_eq!(error_name(&e), "org.llmsd.Error.InvalidRequest");
    let e = p.cancel(987_654).await.expect_err("no such request");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");

    // Stateless methods.
    let ids = p.tokenize("Hello world", false).await.expect("tokenize");
    assert_eq!(
        ids,
        f.service.tokenizer().encode("Hello world", false, false)
    );
    let special = p.tokenize("<|im_start|>", true).await.expect("tokenize");
    assert_eq!(special.len(), 1);
    let model: ModelInfo =
        serde_json::from_str(&p.model_info().await.expect("model")).expect("JSON");
    assert_eq!(model.id, "SmolLM2-135M-Instruct.Q4_1");
    let health: Health = serde_json::from_str(&p.health().await.expect("health")).expect("JSON");
    assert_eq!(health.status, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_tokens_to_the_caller_then_completes() {
    let f = Fixture::start().await;
    let (conn, p) = f.client().await;
    let (_conn2, bystander) = f.client().await;
    let params = r#"{"max_tokens":12}"#;
    let message = "What is the capital of France?";

    // The same greedy request straight through the service.
    let direct = f
        .service
        .prompt(
            &f.me("direct"),
            PromptRequest {
                context: None,
                input: PromptInput::Messages(vec![ChatMessage::new("user", message)]),
                params: parse_params(params).expect("params"),
                stream: false,
            },
        )
        .expect("prompt")
        .completion()
        .await
        .expect("completion");
    assert!(!direct.text.is_empty());

    let sync: Completion = serde_json::from_str(
        &p.chat_sync("chat", "", message, params)
            .await
            .expect("ChatSync"),
    )
    .expect("JSON");
    assert_eq!(sync.text, direct.text);
    assert_eq!(sync.usage.completion_tokens, direct.usage.completion_tokens);
    assert_eq!(sync.context, None);

    // Every message the client connection receives, in arrival order.
    let mut incoming = zbus::MessageStream::from(&conn);
    let mut seen_by_other = bystander.receive_token().await.expect("Token stream");
    let request = p.chat("chat", "", message, params).await.expect("Chat");
    let mut text = String::new();
    let mut index = 0;
    let mut replied = false;
    let done = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), incoming.next())
            .await
            .expect("messages in time")
            .expect("stream open")
            .expect("message");
        let h = msg.header();
        if h.message_type() == zbus::message::Type::MethodReturn {
            replied = true;
            continue;
        }
        if h.message_type() != zbus::message::Type::Signal
            || h.interface().map(|i| i.as_str()) != Some("org.llmsd.Llm1")
        {
            continue;
        }
        assert!(
            replied,
            "a signal came before the reply with the request id"
        );
        assert_eq!(
            h.destination().map(|d| d.to_string()),
            conn.unique_name().map(|n| n.to_string())
        );
        match h.member().map(|m| m.as_str()) {
            Some("Token") => {
                let (r, i, _id, t): (u64, u32, u32, String) =
                    msg.body().deserialize().expect("Token args");
                assert_eq!(r, request);
                assert_eq!(i, index);
                index += 1;
                text.push_str(&t);
            }
            Some("Completed") => {
                let (r, json): (u64, String) = msg.body().deserialize().expect("Completed args");
                assert_eq!(r, request);
                break serde_json::from_str::<Completion>(&json).expect("JSON");
            }
            other => panic!("unexpected signal {other:?}"),
        }
    };
    assert_eq!(done.text, direct.text);
    assert_eq!(text, done.text);
    assert_eq!(index as u64, done.usage.completion_tokens);
    // Unicast: the other client got nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), seen_by_other.next())
            .await
            .is_err(),
        "signals must go only to the caller"
    );

    // Complete streams the same way, here with an error: an unknown context.
    let mut failed = p.receive_failed().await.expect("Failed stream");
    let request = p
        .complete("chat", "ctx-missing", "Once upon a time", GREEDY_8)
        .await
        .expect("Complete");
    let f_sig = tokio::time::timeout(Duration::from_secs(30), failed.next())
        .await
        .expect("Failed in time")
        .expect("signal");
    let a = f_sig.args().expect("Failed args");
    assert_eq!(a.request, request);
    assert_eq!(a.error, "org.llmsd.Error.NotFound");

    // A persistent context continues across calls.
    let ctx = p.create_context("chat", "").await.expect("create");
    let first: Completion = serde_json::from_str(
        &p.chat_sync("chat", &ctx, "My name is Ada.", GREEDY_8)
            .await
            .expect("turn 1"),
    )
    .expect("JSON");
    assert_eq!(first.context.as_deref(), Some(ctx.as_str()));
    let second: Completion = serde_json::from_str(
        &p.chat_sync("chat", &ctx, "What is my name?", GREEDY_8)
            .await
            .expect("turn 2"),
    )
    .expect("JSON");
    assert!(
        second.usage.cached_tokens >= first.usage.prompt_tokens,
        "turn 2 reuses turn 1's KV: {:?} after {:?}",
        second.usage,
        first.usage
    );
    let info: ContextInfo =
        serde_json::from_str(&p.get_context("chat", &ctx).await.expect("get")).expect("JSON");
    assert_eq!(info.messages, 4);
}

async fn idle(service: &Service) -> bool {
    for _ in 0..300 {
        let h = service.health();
        if h.running == 0 && h.queued == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_disconnect_stop_generation() {
    let f = Fixture::start().await;
    let long = r#"{"max_tokens":2000,"temperature":1.0,"seed":7}"#;

    // Cancel by id: the request ends with a Failed(Cancelled) signal.
    let (_conn, p) = f.client().await;
    let mut failed = p.receive_failed().await.expect("Failed stream");
    let mut tokens = p.receive_token().await.expect("Token stream");
    let request = p
        .complete("long", "", "Once upon a time", long)
        .await
        .expect("Complete");
    tokens.next().await.expect("a first token");
    p.cancel(request).await.expect("Cancel");
    let sig = tokio::time::timeout(Duration::from_secs(30), failed.next())
        .await
        .expect("Failed in time")
        .expect("signal");
    let a = sig.args().expect("args");
    assert_eq!(a.request, request);
    assert_eq!(a.error, "org.llmsd.Error.Cancelled");
    let e = p.cancel(request).await.expect_err("already over");
    assert_eq!(error_name(&e), "org.llmsd.Error.NotFound");
    assert!(idle(&f.service).await);

    // A caller leaving the bus: its streamed and its waiting requests are cancelled.
    let (conn, p) = f.client().await;
    let mut tokens = p.receive_token().await.expect("Token stream");
    p.complete("long", "", "Once upon a time", long)
        .await
        .expect("Complete");
    tokens.next().await.expect("a first token");
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move { p.chat_sync("long", "", "Tell me a story.", long).await })
    };
    for _ in 0..100 {
        if f.service.health().running + f.service.health().queued >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.service.health().running + f.service.health().queued, 2);
    drop(tokens);
    conn.close().await.expect("close");
    assert!(waiting.await.expect("task").is_err());
    assert!(
        idle(&f.service).await,
        "requests of a departed caller keep running: {:?}",
        f.service.health()
    );
}

/// Runs a command-line tool off the async workers; returns (success, stdout, stderr).
async fn run(program: &str, args: Vec<String>) -> (bool, String, String) {
    let program = program.to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{program} runs: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_gdbus_and_dbus_send_work() {
    let f = Fixture::start().await;
    let addr = f.bus.address.clone();
    let busctl = |rest: &[&str]| {
        let mut a = vec![format!("--address={addr}")];
        a.extend(strings(rest));
        a
    };
    let (obj, iface) = (DBUS_PATH, "org.llmsd.Llm1");

    // busctl: create, get (JSON output), introspect, a typed error.
    let (ok, out, err) = run(
        "busctl",
        busctl(&[
            "call",
            DBUS_NAME,
            obj,
            iface,
            "CreateContext",
            "ss",
            "demo",
            "",
        ]),
    )
    .await;
    assert!(ok, "busctl CreateContext: {err}");
    let id = out
        .trim()
        .strip_prefix("s \"")
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or_else(|| panic!("busctl output {out:?}"))
        .to_string();
    let (ok, out, err) = run(
        "busctl",
        busctl(&[
            "--json=short",
            "call",
            DBUS_NAME,
            obj,
            iface,
            "GetContext",
            "ss",
            "demo",
            &id,
        ]),
    )
    .await;
    assert!(ok, "busctl GetContext: {err}");
    let v: Value = serde_json::from_str(&out).expect("busctl JSON");
    assert_eq!(v["type"], "s");
    let info: ContextInfo =
        serde_json::from_str(v["data"][0].as_str().expect("string")).expect("context JSON");
    assert_eq!(info.id, id);
    let (ok, out, err) = run("busctl", busctl(&["introspect", DBUS_NAME, obj, iface])).await;
    assert!(ok, "busctl introspect: {err}");
    for m in [".ChatSync", ".Chat ", ".Token ", ".Completed ", ".Failed "] {
        assert!(out.contains(m), "{m} missing in {out}");
    }
    let (ok, _, err) = run(
        "busctl",
        busctl(&[
            "call",
            DBUS_NAME,
            obj,
            iface,
            "GetContext",
            "ss",
            "demo",
            "nope",
        ]),
    )
    .await;
    assert!(!ok);
    assert!(err.contains("no such context"), "{err}");

    // busctl Chat replies with the request id at once.
    let (ok, out, err) = run(
        "busctl",
        busctl(&[
            "call", DBUS_NAME, obj, iface, "Chat", "ssss", "demo", &id, "Hi!", GREEDY_8,
        ]),
    )
    .await;
    assert!(ok, "busctl Chat: {err}");
    assert!(out.starts_with("t "), "{out}");
    assert!(idle(&f.service).await);

    // gdbus: ChatSync, the same greedy text the zbus client gets.
    let (_conn, p) = f.client().await;
    let want: Completion = serde_json::from_str(
        &p.chat_sync("demo", "", "Say hello.", GREEDY_8)
            .await
            .expect("ChatSync"),
    )
    .expect("JSON");
    let (ok, out, err) = run(
        "gdbus",
        strings(&[
            "call",
            "--address",
            &addr,
            "--dest",
            DBUS_NAME,
            "--object-path",
            obj,
            "--method",
            "org.llmsd.Llm1.ChatSync",
            "demo",
            "",
            "Say hello.",
            GREEDY_8,
        ]),
    )
    .await;
    assert!(ok, "gdbus ChatSync: {err}");
    // GVariant text: ('<json>',), or ("<json>",) when the text holds a single quote; inside,
    // a backslash escapes the next character (the JSON has no raw control characters).
    let quoted = out
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(",)"))
        .filter(|s| s.len() >= 2 && (s.starts_with('\'') || s.starts_with('"')))
        .unwrap_or_else(|| panic!("gdbus output {out:?}"));
    let mut json = String::new();
    let mut chars = quoted[1..quoted.len() - 1].chars();
    while let Some(c) = chars.next() {
        json.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    let got: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(got["text"], want.text.as_str(), "{out}");
    assert_eq!(
        got["usage"]["completion_tokens"],
        want.usage.completion_tokens
    );
    let (ok, _, err) = run(
        "gdbus",
        strings(&[
            "call",
            "--address",
            &addr,
            "--dest",
            DBUS_NAME,
            "--object-path",
            obj,
            "--method",
            "org.llmsd.Llm1.GetContext",
            "demo",
            "nope",
        ]),
    )
    .await;
    assert!(!ok);
    assert!(err.contains("org.llmsd.Error.NotFound"), "{err}");

    // dbus-send: Tokenize, ModelInfo and an error name.
    let send = |rest: &[&str]| {
        let mut a = strings(&[
            &format!("--bus={addr}"),
            "--print-reply",
            &format!("--dest={DBUS_NAME}"),
            obj,
        ]);
        a.extend(strings(rest));
        a
    };
    let (ok, out, err) = run(
        "dbus-send",
        send(&[
            "org.llmsd.Llm1.Tokenize",
            "string:Hello world",
            "boolean:false",
        ]),
    )
    .await;
    assert!(ok, "dbus-send Tokenize: {err}");
    let ids: Vec<u32> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "uint32")
        .map(|w| w[1].parse().expect("id"))
        .collect();
    assert_eq!(
        ids,
        f.service.tokenizer().encode("Hello world", false, false)
    );
    let (ok, out, err) = run("dbus-send", send(&["org.llmsd.Llm1.ModelInfo"])).await;
    assert!(ok, "dbus-send ModelInfo: {err}");
    assert!(out.contains("SmolLM2-135M-Instruct.Q4_1"), "{out}");
    let (ok, out, err) = run(
        "dbus-send",
        send(&["org.llmsd.Llm1.GetContext", "string:demo", "string:nope"]),
    )
    .await;
    assert!(!ok, "{out}");
    assert!(err.contains("Error org.llmsd.Error.NotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_bus_policy_lets_the_daemon_own_the_name_and_everyone_call() {
    let state = tempfile::tempdir().expect("tempdir");
    let service = start_service(state.path());

    // The default system policy alone: nobody may own the name.
    let bare = PrivateBus::system(&[]);
    let e = serve(service.clone(), Bus::Address(bare.address.clone()))
        .await
        .expect_err("owning the name is denied without the policy file");
    assert!(e.to_string().contains("AccessDenied"), "{e}");

    // As root the file is used as installed; as anyone else, in the role of the llmsd user.
    let mut policy =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/org.llmsd.Llm1.conf");
    if unsafe { libc::getuid() } != 0 {
        let me = Command::new("id").arg("-un").output().expect("id -un");
        let me = String::from_utf8(me.stdout).expect("user name");
        let text = std::fs::read_to_string(&policy).expect("policy file");
        assert!(text.contains(r#"<policy user="llmsd">"#));
        let text = text.replace(
            r#"<policy user="llmsd">"#,
            &format!(r#"<policy user="{}">"#, me.trim()),
        );
        policy = state.path().join("org.llmsd.Llm1.conf");
        std::fs::write(&policy, text).expect("policy copy");
    }
    let bus = PrivateBus::system(&[policy]);
    let _server = serve(service.clone(), Bus::Address(bus.address.clone()))
        .await
        .expect("the policy lets root own org.llmsd.Llm1");
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .expect("address")
        .build()
        .await
        .expect("client connects");
    let p = Llm1ClientProxy::new(&conn).await.expect("proxy");
    let id = p
        .create_context("sys", "")
        .await
        .expect("calls are allowed");
    assert!(!id.is_empty());
    // Signals reach the caller under the default policy.
    let mut completed = p.receive_completed().await.expect("Completed stream");
    let request = p.chat("sys", &id, "Hi", GREEDY_8).await.expect("Chat");
    let c = tokio::time::timeout(Duration::from_secs(60), completed.next())
        .await
        .expect("Completed in time")
        .expect("signal");
    assert_eq!(c.args().expect("args").request, request);
    let (ok, out, err) = run(
        "busctl",
        strings(&[
            &format!("--address={}", bus.address),
            "introspect",
            DBUS_NAME,
            DBUS_PATH,
        ]),
    )
    .await;
    assert!(ok, "introspection is allowed: {err}");
    assert!(out.contains("org.llmsd.Llm1"), "{out}");
    // Anything else stays denied (the default policy is in force).
    let e = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination(DBUS_NAME)
        .expect("name")
        .path(DBUS_PATH)
        .expect("path")
        .build()
        .await
        .expect("proxy")
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            "org.llmsd.Llm1",
        ))
        .await
        .expect_err("Properties is not in the policy");
    assert!(e.to_string().contains("AccessDenied"), "{e}");
    service.shutdown();
}
