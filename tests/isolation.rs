//! Isolation and security of the real `llmsd serve`: two real users (created by the test)
//! on the socket and the system bus; HTTP API keys scoped per app and never logged; two
//! apps' secrets under concurrent, batched load; private state files under umask 000; no
//! remote HTTP without keys; no request field reaching the filesystem. Every test also fails
//! on a panic in the daemon's log.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::bus::PrivateBus;
use common::*;
use llmsd_client::{Client, ErrorCode};
use serde_json::{json, Value};

const KEY_A: &str = "sk-llmsd-iso-key-of-app-a";
const KEY_B: &str = "sk-llmsd-iso-key-of-app-b";
const UNKNOWN_KEY: &str = "sk-llmsd-iso-nobody-has-this-key";

/// The daemon's log shows no panic (a panic anywhere fails the test).
fn assert_no_panic(d: &Daemon) {
    let log = d.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// A system user created for one test and removed when dropped, also when the test fails.
struct TempUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TempUser {
    fn create(name: &str) -> TempUser {
        // A killed earlier run may have left the user (and its group) behind.
        remove_user(name);
        let mut error = String::new();
        for _ in 0..50 {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(name)
                .output()
                .expect("useradd runs (package passwd)");
            if out.status.success() {
                return TempUser {
                    name: name.to_string(),
                    uid: id_of(name, "-u"),
                    gid: id_of(name, "-g"),
                };
            }
            // Another process may hold the lock on /etc/passwd for a moment.
            error = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("useradd {name} failed: {error}");
    }

    /// `program args...` run as this user (setpriv; its own groups).
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg(program);
        c
    }

    fn owner(&self, app: &str) -> String {
        format!("u{}:{app}", self.uid)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        remove_user(&self.name);
    }
}

fn remove_user(name: &str) {
    for _ in 0..50 {
        let _ = Command::new("userdel").arg(name).output();
        let _ = Command::new("groupdel").arg(name).output();
        let gone = |db: &str| {
            Command::new("getent")
                .args([db, name])
                .output()
                .is_ok_and(|o| !o.status.success())
        };
        if gone("passwd") && gone("group") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn id_of(name: &str, flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, name])
        .output()
        .expect("id runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {flag} {name}: {out:?}"))
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A socket client in Python (raw frames): says hello as app `argv[2]` (JSON), then sends each
/// `[method, params]` of `argv[3]` in turn and prints the frame that ends it (its streamed
/// text under "streamed"). Stops when the daemon closes the connection.
const SOCKET_CLIENT: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
def send(o):
    b = json.dumps(o).encode(); s.sendall(struct.pack(">I", len(b)) + b)
def recv_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: return None
        b += c
    return b
def recv():
    h = recv_exact(4)
    if h is None: return None
    return json.loads(recv_exact(struct.unpack(">I", h)[0]))
send({"type": "hello", "protocol": 1, "app": json.loads(sys.argv[2])})
w = recv(); print(json.dumps(w))
if w is None or w.get("type") != "welcome": sys.exit(0)
for i, (method, params) in enumerate(json.loads(sys.argv[3]), 1):
    r = {"type": "request", "id": i, "method": method}
    if params is not None: r["params"] = params
    send(r)
    text = ""
    while True:
        f = recv()
        if f is None: sys.exit(0)
        if f.get("type") == "event":
            text += f.get("text", ""); continue
        f["streamed"] = text; print(json.dumps(f)); break
"#;

/// Runs [`SOCKET_CLIENT`] as `user` (root when none): the hello's answer and one final frame
/// per request.
fn socket_calls(
    user: Option<&TempUser>,
    socket: &Path,
    app: &str,
    calls: &[(&str, Value)],
) -> (Value, Vec<Value>) {
    let calls: Vec<Value> = calls.iter().map(|(m, p)| json!([m, p])).collect();
    let mut cmd = match user {
        Some(u) => u.command("/usr/bin/python3"),
        None => Command::new("/usr/bin/python3"),
    };
    let out = cmd
        .arg("-c")
        .arg(SOCKET_CLIENT)
        .arg(socket)
        .arg(Value::from(app).to_string())
        .arg(Value::Array(calls).to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "socket client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut frames = stdout_of(&out).lines().map(json).collect::<Vec<_>>();
    assert!(!frames.is_empty(), "no answer to hello");
    let welcome = frames.remove(0);
    (welcome, frames)
}

/// The error code of a final frame, or "ok" for a response.
fn outcome(frame: &Value) -> &str {
    match frame["type"].as_str() {
        Some("response") => "ok",
        Some("error") => frame["error"]["code"].as_str().unwrap_or("?"),
        _ => "?",
    }
}

/// `busctl --address=BUS --json=short call org.llmsd.Llm1 ...` as `user` (root when none):
/// the reply's values, or the error text.
fn busctl(
    user: Option<&TempUser>,
    bus: &PrivateBus,
    method: &str,
    sig: &str,
    args: &[&str],
) -> Result<Vec<Value>, String> {
    let mut cmd = match user {
        Some(u) => u.command("busctl"),
        None => Command::new("busctl"),
    };
    let out = cmd
        .arg(format!("--address={}", bus.address))
        .args(["--json=short", "call", "org.llmsd.Llm1", "/org/llmsd/Llm1"])
        .args(["org.llmsd.Llm1", method, sig])
        .args(args)
        .output()
        .expect("busctl runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = stdout_of(&out);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    Ok(json(&text)["data"].as_array().expect("data").clone())
}

/// The one string a D-Bus method returned, parsed as JSON.
fn json_reply(v: &[Value]) -> Value {
    json(v[0].as_str().expect("a string reply"))
}

/// One HTTP/1.1 request on a fresh connection: (status, body as JSON, raw body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Value, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP door");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    write!(
        s,
        "{head}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let r = common::http::read_reply(&mut s).expect("a response");
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v, r.body)
}

/// Every byte outside `[A-Za-z0-9]` percent-encoded, for a URL path segment.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn metrics_text(addr: &str) -> String {
    common::http::metrics(addr)
}

/// What one user tries on another user's context over the socket, and the only answer
/// allowed: never the context's data.
fn socket_attacks(
    victim_ctx: &str,
    victim_owner: &str,
) -> Vec<(&'static str, Value, &'static str)> {
    let c = victim_ctx;
    vec![
        ("get_context", json!({"context": c}), "not_found"),
        ("fork_context", json!({"context": c}), "not_found"),
        ("delete_context", json!({"context": c}), "not_found"),
        (
            "prompt",
            json!({"context": c, "params": {"max_tokens": 2},
                   "input": {"messages": [{"role": "user", "content": "Repeat."}]}}),
            "not_found",
        ),
        ("chunks", json!({"context": c}), "not_found"),
        ("evict", json!({"context": c}), "not_found"),
        (
            "chunks",
            json!({"context": c, "owner": victim_owner}),
            "permission_denied",
        ),
        (
            "evict",
            json!({"context": c, "owner": victim_owner}),
            "permission_denied",
        ),
        ("evict", json!({"app": victim_owner}), "permission_denied"),
        (
            "delete_context_of",
            json!({"owner": victim_owner, "context": c}),
            "permission_denied",
        ),
        (
            "contexts",
            json!({"app": victim_owner}),
            "permission_denied",
        ),
        ("compact", Value::Null, "permission_denied"),
        (
            "quota_set",
            json!({"app": "shared", "quota": {"max_contexts": 1}}),
            "permission_denied",
        ),
    ]
}

#[test]
fn two_users_reach_only_their_own_contexts_on_the_socket_and_the_system_bus() {
    const APP: &str = "shared";
    let bus = PrivateBus::system();
    let d = Daemon::start_env(
        false,
        &["--bus", "system"],
        &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)],
    );
    // The users reach the socket whatever the umask the test runs under.
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let users = [
        TempUser::create("llmsd-iso-a"),
        TempUser::create("llmsd-iso-b"),
    ];
    // Socket: each user opens a context of the same app name and runs a turn on it.
    let mut own = Vec::new();
    for u in &users {
        let (welcome, r) = socket_calls(
            Some(u),
            &d.socket,
            APP,
            &[("create_context", json!({"system": "You are terse."}))],
        );
        assert_eq!(welcome["uid"], u.uid, "{welcome}");
        let id = r[0]["value"]["id"].as_str().expect("an id").to_string();
        let (_, r) = socket_calls(
            Some(u),
            &d.socket,
            APP,
            &[
                (
                    "prompt",
                    json!({"context": id, "input": {"messages": [{"role": "user", "content": "Hi!"}]},
                           "params": {"max_tokens": 4}}),
                ),
                ("get_context", json!({"context": id})),
            ],
        );
        assert_eq!(outcome(&r[0]), "ok", "{}", r[0]);
        assert!(!r[0]["streamed"].as_str().unwrap().is_empty());
        let tokens = r[1]["value"]["tokens"].as_u64().expect("tokens");
        own.push((id, tokens));
    }
    // Each tries everything on the other's context: not found or refused, never the data.
    for (me, (victim, theirs)) in [(0, (1, &own[1])), (1, (0, &own[0]))] {
        let u = &users[me];
        let attacks = socket_attacks(&theirs.0, &users[victim].owner(APP));
        let calls: Vec<(&str, Value)> = attacks.iter().map(|(m, p, _)| (*m, p.clone())).collect();
        let (_, r) = socket_calls(Some(u), &d.socket, APP, &calls);
        assert_eq!(r.len(), attacks.len());
        for ((method, params, want), got) in attacks.iter().zip(&r) {
            assert_eq!(outcome(got), *want, "{} {method} {params}: {got}", u.name);
            assert_eq!(
                got["streamed"], "",
                "{method}: tokens of another user's context"
            );
        }
        let (_, r) = socket_calls(
            Some(u),
            &d.socket,
            APP,
            &[
                ("list_contexts", Value::Null),
                ("apps", Value::Null),
                ("contexts", json!({})),
                ("status", Value::Null),
            ],
        );
        let ids: Vec<&str> = r[0]["value"]
            .as_array()
            .expect("list")
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [own[me].0.as_str()], "{}", r[0]);
        let owners = |v: &Value| -> Vec<String> {
            v["value"]
                .as_array()
                .unwrap_or_else(|| panic!("not a list: {v}"))
                .iter()
                .map(|a| a["owner"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(owners(&r[1]), [u.owner(APP)]);
        assert_eq!(owners(&r[2]), [u.owner(APP)]);
        assert_eq!(r[3]["value"]["admin"], false);
    }
    // Both contexts are intact and still work for their owners.
    for (u, (id, tokens)) in users.iter().zip(&own) {
        let (_, r) = socket_calls(
            Some(u),
            &d.socket,
            APP,
            &[
                ("get_context", json!({"context": id})),
                (
                    "prompt",
                    json!({"context": id, "input": {"messages": [{"role": "user", "content": "Hi!"}]},
                           "params": {"max_tokens": 2}}),
                ),
            ],
        );
        assert_eq!(r[0]["value"]["tokens"].as_u64(), Some(*tokens), "{}", r[0]);
        assert_eq!(outcome(&r[1]), "ok", "{}", r[1]);
    }

    // D-Bus on the system bus: the same app name under each uid.
    let mut dbus_ids = Vec::new();
    for u in &users {
        let id = busctl(Some(u), &bus, "CreateContext", "ss", &[APP, ""]).expect("CreateContext")
            [0]
        .as_str()
        .expect("id")
        .to_string();
        let done = json_reply(
            &busctl(
                Some(u),
                &bus,
                "ChatSync",
                "ssss",
                &[APP, &id, "Hi!", r#"{"max_tokens":4}"#],
            )
            .expect("ChatSync"),
        );
        assert_eq!(done["context"], id.as_str(), "{done}");
        dbus_ids.push(id);
    }
    for (me, victim) in [(0, 1), (1, 0)] {
        let u = &users[me];
        for id in [&own[victim].0, &dbus_ids[victim]] {
            for (method, sig, args) in [
                ("GetContext", "ss", vec![APP, id.as_str()]),
                ("ForkContext", "ss", vec![APP, id.as_str()]),
                ("DeleteContext", "ss", vec![APP, id.as_str()]),
                (
                    "ChatSync",
                    "ssss",
                    vec![APP, id.as_str(), "Hi!", r#"{"max_tokens":2}"#],
                ),
            ] {
                let e =
                    busctl(Some(u), &bus, method, sig, &args).expect_err("another user's context");
                assert!(e.contains("no such context"), "{} {method}: {e}", u.name);
            }
        }
        // The socket and D-Bus doors share the owner u<uid>:shared, and only it.
        let mine = json_reply(&busctl(Some(u), &bus, "ListContexts", "s", &[APP]).unwrap());
        let mine: BTreeSet<&str> = mine
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            mine,
            BTreeSet::from([own[me].0.as_str(), dbus_ids[me].as_str()])
        );
    }
    // D-Bus Cancel reaches only the caller's uid's requests. A's one-shot Chat (cancelled as
    // busctl leaves) gives the request counter; A's next call is the one after it.
    let first = busctl(
        Some(&users[0]),
        &bus,
        "Chat",
        "ssss",
        &[APP, "", "Hi", r#"{"max_tokens":1}"#],
    )
    .expect("Chat")[0]
        .as_u64()
        .expect("a request id");
    let long = {
        let (addr, uid, gid) = (bus.address.clone(), users[0].uid, users[0].gid);
        std::thread::spawn(move || {
            Command::new("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--init-groups", "busctl"])
                .arg(format!("--address={addr}"))
                .args(["--json=short", "call"])
                .args([
                    "org.llmsd.Llm1",
                    "/org/llmsd/Llm1",
                    "org.llmsd.Llm1",
                    "ChatSync",
                ])
                .args(["ssss", "shared", "", "Count to one hundred."])
                .arg(r#"{"max_tokens":64,"ignore_eos":true}"#)
                .output()
                .expect("busctl runs")
        })
    };
    let rt = rt();
    let root = rt.block_on(Client::connect(&d.socket, "watch")).unwrap();
    let t0 = Instant::now();
    while rt.block_on(root.status()).unwrap().running == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "A's call never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    for request in first + 1..=first + 3 {
        let e = busctl(
            Some(&users[1]),
            &bus,
            "Cancel",
            "t",
            &[&request.to_string()],
        )
        .expect_err("another user's request");
        assert!(e.contains("no running request"), "{e}");
    }
    let out = long.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = json_reply(json(&stdout_of(&out))["data"].as_array().unwrap());
    assert_eq!(done["finish_reason"], "length", "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 64, "{done}");
    assert_no_panic(&d);
}

/// An HTTP call: method, path, body, extra headers.
type HttpCall<'a> = (
    &'a str,
    &'a str,
    Option<&'a Value>,
    &'a [(&'a str, &'a str)],
);

/// A config with two apps' keys and anonymous callers refused.
fn keys_config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("llmsd.toml");
    std::fs::write(
        &p,
        format!(
            "{extra}http_allow_anonymous = false\n\n[http_keys]\n\"{KEY_A}\" = \"app-a\"\n\
             \"{KEY_B}\" = \"app-b\"\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn http_api_keys_scope_contexts_to_their_app_and_are_never_logged() {
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = keys_config(conf_dir.path(), "");
    let d = Daemon::start_env(
        true,
        &["--config", conf.to_str().unwrap()],
        &[("LLMSD_LOG", "debug")],
    );
    let addr = d.http.clone().unwrap();
    let (st, ctx, _) = http(
        &addr,
        "POST",
        "/v1/contexts",
        Some(KEY_A),
        &[],
        Some(&json!({"system": "The secret code is 7319-KESTREL."})),
    );
    assert_eq!(st, 200, "{ctx}");
    let id = ctx["id"].as_str().unwrap().to_string();
    let turn = json!({"context": id, "max_tokens": 16, "temperature": 0,
                      "messages": [{"role": "user", "content": "What is the secret code?"}]});
    let (st, one, _) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        Some(KEY_A),
        &[],
        Some(&turn),
    );
    assert_eq!(st, 200, "{one}");
    let (_, info, _) = http(
        &addr,
        "GET",
        &format!("/v1/contexts/{id}"),
        Some(KEY_A),
        &[],
        None,
    );
    let tokens = info["tokens"].as_u64().expect("tokens");
    assert!(tokens > 0);

    // App B's key reaches none of it.
    let chat_b = json!({"context": id, "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": "What is the secret code?"}]});
    let text_b = json!({"context": id, "prompt": " The code is", "max_tokens": 4});
    let header_b = json!({"max_tokens": 4, "temperature": 0,
                          "messages": [{"role": "user", "content": "Repeat the code."}]});
    let ctx_path = format!("/v1/contexts/{id}");
    let fork_path = format!("/v1/contexts/{id}/fork");
    let attacks: [HttpCall; 6] = [
        ("GET", &ctx_path, None, &[]),
        ("DELETE", &ctx_path, None, &[]),
        ("POST", &fork_path, None, &[]),
        ("POST", "/v1/chat/completions", Some(&chat_b), &[]),
        ("POST", "/v1/completions", Some(&text_b), &[]),
        (
            "POST",
            "/v1/chat/completions",
            Some(&header_b),
            &[("X-Llmsd-Context", id.as_str())],
        ),
    ];
    for (method, path, body, headers) in attacks {
        let (st, v, raw) = http(&addr, method, path, Some(KEY_B), headers, body);
        assert_eq!(st, 404, "{method} {path}: {v}");
        assert!(!raw.contains("KESTREL") && !raw.contains("7319"), "{raw}");
    }
    let (st, list, _) = http(&addr, "GET", "/v1/contexts", Some(KEY_B), &[], None);
    assert_eq!(st, 200);
    assert_eq!(list["data"], json!([]), "{list}");
    // The same app name on the socket is another owner (u0:app-a, not http:app-a).
    rt().block_on(async {
        let c = Client::connect(&d.socket, "app-a").await.unwrap();
        let e = c.context(&id).info().await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
        assert!(c.list_contexts().await.unwrap().is_empty());
    });

    // Missing, unknown and malformed keys: 401 before anything else.
    let models = ("GET", "/v1/models", None);
    let list = ("GET", "/v1/contexts", None);
    let get = ("GET", ctx_path.as_str(), None);
    let chat = ("POST", "/v1/chat/completions", Some(&turn));
    for (method, path, body) in [models, list, get, chat] {
        for (key, code) in [
            (None, "missing_api_key"),
            (Some(UNKNOWN_KEY), "invalid_api_key"),
            (Some(&KEY_A[..KEY_A.len() - 1]), "invalid_api_key"),
        ] {
            let (st, v, raw) = http(&addr, method, path, key, &[], body);
            assert_eq!(st, 401, "{method} {path} {key:?}: {v}");
            assert_eq!(v["error"]["code"], code, "{v}");
            assert!(!raw.contains("sk-llmsd"), "a key echoed: {raw}");
        }
        let (st, v, _) = http(
            &addr,
            method,
            path,
            None,
            &[("Authorization", &format!("Basic {KEY_A}"))],
            body,
        );
        assert_eq!(st, 401, "{v}");
    }
    // A's context is untouched.
    let (st, again, _) = http(&addr, "GET", &ctx_path, Some(KEY_A), &[], None);
    assert_eq!(st, 200);
    assert_eq!(again["tokens"].as_u64(), Some(tokens), "{again}");
    let (_, list, _) = http(&addr, "GET", "/v1/contexts", Some(KEY_A), &[], None);
    assert_eq!(list["data"][0]["id"], id.as_str(), "{list}");

    // The HTTP door has no admin verbs (they are the socket's, for local admins only).
    for (method, path) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/apps"),
        ("POST", "/v1/compact"),
        ("POST", "/v1/evict"),
    ] {
        let (st, v, _) = http(&addr, method, path, Some(KEY_A), &[], None);
        assert_eq!(st, 404, "{method} {path}: {v}");
    }

    let log = d.log_text();
    assert!(log.contains("DEBUG"), "the daemon logs at debug level");
    for key in [KEY_A, KEY_B, UNKNOWN_KEY, "sk-llmsd"] {
        assert!(!log.contains(key), "{key} in the log:\n{log}");
    }
    assert_no_panic(&d);
}

/// `needle` as a contiguous run of `hay`.
fn contains_seq(hay: &[u32], needle: &[u32]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secrets_of_two_apps_never_cross_under_concurrent_batched_load() {
    const APPS: [(&str, &str); 2] = [("vault-a", "7319-KESTREL"), ("vault-b", "4862-MARIGOLD")];
    const TURNS: usize = 6;
    let d = Daemon::start(true, &[]);
    let rt = rt();
    struct Turn {
        app: usize,
        ids: Vec<u32>,
        text: String,
        start: Instant,
        end: Instant,
    }
    let (turns, secret_ids) = rt.block_on(async {
        let mut secret_ids = Vec::new();
        let mut tasks = Vec::new();
        for (app, (name, secret)) in APPS.iter().enumerate() {
            let c = Client::connect(&d.socket, name).await.unwrap();
            // As the model writes it after "is".
            secret_ids.push(c.tokenize(&format!(" {secret}"), false).await.unwrap());
            let ctx = c
                .create_context(Some(&format!("The secret code is {secret}.")))
                .await
                .unwrap();
            // Two streams per app: the context and a fork sharing its chunks.
            let fork = ctx.fork().await.unwrap();
            for ctx in [ctx, fork] {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    for _ in 0..TURNS {
                        let start = Instant::now();
                        let mut s = ctx
                            .chat("What is the secret code? Repeat it exactly.", greedy(16))
                            .await
                            .unwrap();
                        let mut ids = Vec::new();
                        while let Some(t) = s.next_token().await.unwrap() {
                            ids.push(t.token_id);
                        }
                        let done = s.completion().await.unwrap();
                        out.push(Turn {
                            app,
                            ids,
                            text: done.text,
                            start,
                            end: Instant::now(),
                        });
                        // Out of memory before the next turn: it restores from the swap files.
                        c.evict_context(ctx.id(), None).await.unwrap();
                    }
                    out
                }));
            }
        }
        let mut turns = Vec::new();
        for t in tasks {
            turns.extend(t.await.unwrap());
        }
        (turns, secret_ids)
    });
    assert_eq!(turns.len(), 4 * TURNS);
    let mut own_secret_seen = [0usize; 2];
    for t in &turns {
        let other = 1 - t.app;
        let (_, secret) = APPS[other];
        assert!(
            !contains_seq(&t.ids, &secret_ids[other]),
            "{} output holds {}'s secret tokens: {:?}",
            APPS[t.app].0,
            APPS[other].0,
            t.text
        );
        for part in secret.split('-') {
            assert!(
                !t.text.contains(part),
                "{} leaked {part}: {:?}",
                APPS[t.app].0,
                t.text
            );
        }
        if contains_seq(&t.ids, &secret_ids[t.app]) && t.text.contains(APPS[t.app].1) {
            own_secret_seen[t.app] += 1;
        }
    }
    // The check can fail: the model does repeat a secret it holds.
    for (app, seen) in own_secret_seen.iter().enumerate() {
        assert!(
            *seen >= TURNS,
            "{} repeated its own secret in only {seen} of {} turns",
            APPS[app].0,
            2 * TURNS
        );
    }
    // The apps' requests overlapped in time and their decode steps were batched.
    let overlapping = turns
        .iter()
        .filter(|a| a.app == 0)
        .flat_map(|a| turns.iter().filter(|b| b.app == 1).map(move |b| (a, b)))
        .filter(|(a, b)| a.start < b.end && b.start < a.end)
        .count();
    let m = metrics_text(d.http.as_deref().unwrap());
    let steps = metric(&m, "llmsd_engine_steps_total");
    let generated = metric(&m, "llmsd_generated_tokens_total");
    println!(
        "own secret repeated {own_secret_seen:?} of {} turns each; {overlapping} overlapping \
         pairs; {generated} tokens in {steps} steps",
        2 * TURNS
    );
    assert!(overlapping > 0, "the two apps never ran at the same time");
    assert!(
        steps < generated,
        "no batched decode: {generated} tokens took {steps} steps"
    );
    assert_no_panic(&d);
}

/// Every entry under `dir` (itself included): (path, metadata), without following links.
fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = vec![(dir.to_path_buf(), std::fs::symlink_metadata(dir).unwrap())];
    let mut i = 0;
    while i < out.len() {
        if out[i].1.is_dir() {
            let path = out[i].0.clone();
            for e in std::fs::read_dir(&path).unwrap() {
                let p = e.unwrap().path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                out.push((p, m));
            }
        }
        i += 1;
    }
    out
}

#[test]
fn state_files_are_0600_in_0700_directories_even_under_umask_000() {
    let mut d = Daemon::start_custom(
        "off",
        &["sh", "-c", "umask 000 && exec \"$0\" \"$@\""],
        &["--kv-budget-mib", "8"],
        &[],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid().unwrap())).unwrap();
    assert!(
        status.contains("Umask:\t0000"),
        "the daemon's umask is not 000:\n{status}"
    );
    rt().block_on(async {
        for app in ["files-a", "files-b"] {
            let c = Client::connect(&d.socket, app).await.unwrap();
            let ctx = c.create_context(Some("You are terse.")).await.unwrap();
            for q in ["Name a colour.", "Name another."] {
                ctx.chat(q, greedy(8))
                    .await
                    .unwrap()
                    .completion()
                    .await
                    .unwrap();
            }
            ctx.fork().await.unwrap();
            c.evict_app(app).await.unwrap();
        }
        let c = Client::connect(&d.socket, "files-a").await.unwrap();
        let quota = llmsd_client::Quota {
            max_contexts: Some(8),
            ..Default::default()
        };
        c.quota_set("files-a", quota, Vec::new()).await.unwrap();
    });
    // SIGTERM flushes usage.json.
    d.stop();
    let entries = walk(&d.state);
    let mut kinds = BTreeSet::new();
    for (p, m) in &entries {
        let mode = m.mode() & 0o7777;
        assert_eq!(m.uid(), 0, "{} is not the daemon's", p.display());
        if m.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
        } else {
            assert!(m.is_file(), "{} is neither file nor directory", p.display());
            assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let under = |dir: &str| p.strip_prefix(d.state.join(dir)).is_ok();
            kinds.insert(match name.as_str() {
                n if n.ends_with(".kv") => "swap segment",
                "manifest.json" => "manifest",
                n if under("transcripts") && n.ends_with(".json") => "transcript",
                "quotas.json" => "quotas.json",
                "usage.json" => "usage.json",
                "costs.json" => "costs.json",
                _ => "other",
            });
        }
    }
    assert_eq!(
        kinds,
        BTreeSet::from([
            "costs.json",
            "manifest",
            "quotas.json",
            "swap segment",
            "transcript",
            "usage.json"
        ]),
        "{entries:#?}"
    );
    assert_no_panic(&d);
}

/// Flags and environment `llmsd serve` must refuse to start with, and what it must say.
type Refusal = (Vec<String>, Vec<(&'static str, String)>, &'static str);

/// `llmsd serve ARGS` (with `env`) that must refuse to start; its stderr.
fn serve_refused(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let socket = dir.join("refused.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .arg("serve")
        .arg("--model")
        .arg(model(SMOLLM2))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--bus", "off", "--threads", "1"])
        .args(args)
        .env("XDG_CONFIG_HOME", dir)
        .envs(env.iter().copied())
        .output()
        .expect("llmsd runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "llmsd serve {args:?} started:\n{err}"
    );
    assert!(!err.contains("llmsd ready"), "{err}");
    assert!(!socket.exists(), "a refused daemon created its socket");
    err
}

#[test]
fn http_refuses_non_loopback_addresses_unless_allowed_and_keyed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let any4 = format!("0.0.0.0:{port}");
    let config = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let in_file = config("in-file.toml", &format!("http = \"{any4}\"\n"));
    let keyless = config(
        "keyless.toml",
        &format!("http = \"{any4}\"\nhttp_allow_remote = true\n"),
    );
    let anonymous = config(
        "anonymous.toml",
        &format!(
            "http = \"{any4}\"\nhttp_allow_remote = true\nhttp_allow_anonymous = true\n\
             [http_keys]\n\"{KEY_A}\" = \"app-a\"\n"
        ),
    );
    let cases: Vec<Refusal> = vec![
        (vec!["--http".into(), any4.clone()], vec![], "non-loopback"),
        (
            vec!["--http".into(), format!("192.0.2.7:{port}")],
            vec![],
            "non-loopback",
        ),
        (
            vec!["--http".into(), format!("[::]:{port}")],
            vec![],
            "non-loopback",
        ),
        (vec![], vec![("LLMSD_HTTP", any4.clone())], "non-loopback"),
        (
            vec!["--config".into(), in_file],
            vec![],
            "http_allow_remote = true",
        ),
        (
            vec!["--config".into(), keyless.clone()],
            vec![],
            "without API keys",
        ),
        (
            vec!["--config".into(), anonymous],
            vec![],
            "anonymous callers",
        ),
    ];
    for (args, env, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = serve_refused(dir.path(), &args, &env);
        assert!(err.contains(want), "{args:?} {env:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .args(["config", "check", &keyless])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stdout_of(&out).contains("without API keys"), "{out:?}");

    // Allowed, with keys: it serves on every address and requires a key.
    let conf = keys_config(dir.path(), "http_allow_remote = true\n");
    let d = Daemon::start_custom(&any4, &[], &["--config", conf.to_str().unwrap()], &[]);
    assert!(d.log_text().contains(&any4), "{}", d.log_text());
    let local = format!("127.0.0.1:{port}");
    let (st, v, _) = http(&local, "GET", "/v1/models", None, &[], None);
    assert_eq!(
        (st, &v["error"]["code"]),
        (401, &json!("missing_api_key")),
        "{v}"
    );
    let (st, v, _) = http(&local, "GET", "/v1/models", Some(KEY_B), &[], None);
    assert_eq!(st, 200, "{v}");
    // /metrics names every app: on a remote door it needs a key too.
    let (st, v, _) = http(&local, "GET", "/metrics", None, &[], None);
    assert_eq!(
        (st, &v["error"]["code"]),
        (401, &json!("missing_api_key")),
        "{v}"
    );
    let (st, _, text) = http(&local, "GET", "/metrics", Some(KEY_B), &[], None);
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("llmsd_requests_running"), "{text}");
    assert_no_panic(&d);
}

/// Strings that would reach a file if any request field became a path.
fn hostile_strings(canary: &Path) -> Vec<String> {
    let target = canary.join("pwned");
    let abs = target.to_str().unwrap().to_string();
    vec![
        "../../etc/passwd".into(),
        "/etc/passwd".into(),
        abs.clone(),
        format!("../../../../../../../..{abs}"),
        format!("ctx-../../../../..{abs}"),
        ".".into(),
        "..".into(),
        String::new(),
        "a/b".into(),
        "pwned\0.json".into(),
        "x".repeat(5000),
        // One-dot leaders and a division slash; fullwidth "ctx-" and digits.
        "\u{2024}\u{2024}\u{2215}etc\u{2215}passwd".into(),
        "\u{ff43}\u{ff54}\u{ff58}-\u{ff10}\u{ff10}\u{ff11}".into(),
        "ctx-0000000000000001/../../pwned".into(),
    ]
}

/// An app name as ipc-schema/README.md documents it: 1-48 characters of `[A-Za-z0-9._-]`.
fn app_name_ok(s: &str) -> bool {
    (1..=48).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A name in the state dir is one llmsd makes: hex owner directories, issued context ids,
/// numbered segments, its fixed file names.
fn llmsd_made(state: &Path, p: &Path) -> bool {
    let rel: Vec<String> = p
        .strip_prefix(state)
        .unwrap()
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let hex_owner = |s: &str| {
        s.len().is_multiple_of(2)
            && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap() as char)
                .collect::<String>()
                .split_once(':')
                .is_some_and(|(who, app)| {
                    (who == "http"
                        || who
                            .strip_prefix('u')
                            .is_some_and(|u| u.parse::<u32>().is_ok()))
                        && app_name_ok(app)
                })
    };
    let ctx_file = |s: &str| {
        s.strip_prefix("ctx-")
            .and_then(|s| s.strip_suffix(".json"))
            .is_some_and(|h| {
                h.len() == 16 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            })
    };
    let segment = |s: &str| {
        s.strip_prefix('f')
            .and_then(|s| s.strip_suffix(".kv"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match rel.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] | ["apps"] | ["transcripts"] => true,
        ["costs.json" | "quotas.json" | "usage.json"] => true,
        ["apps", o] | ["transcripts", o] => hex_owner(o),
        ["apps", o, f] => hex_owner(o) && (f == "manifest.json" || segment(f)),
        ["transcripts", o, f] => hex_owner(o) && ctx_file(f),
        _ => false,
    }
}

#[test]
fn no_request_field_reaches_the_filesystem() {
    let bus = PrivateBus::session();
    let mut d = Daemon::start_env(
        true,
        &["--bus", "session"],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let canary = tempfile::Builder::new()
        .prefix("llmsd-iso-canary-")
        .tempdir()
        .unwrap();
    let evil = hostile_strings(canary.path());
    let addr = d.http.clone().unwrap();
    let model_id = "SmolLM2-135M-Instruct.Q4_1";

    // A real context on the socket, and aliases of its id.
    let (_, r) = socket_calls(
        None,
        &d.socket,
        "paths",
        &[("create_context", json!({"system": "You are terse."}))],
    );
    let real = r[0]["value"]["id"].as_str().unwrap().to_string();
    let hex = &real["ctx-".len()..];
    let mut ids = evil.clone();
    ids.push(format!("ctx-{}", hex.to_uppercase()));
    ids.push(format!("ctx-+{}", &hex[1..]));
    ids.push(format!("CTX-{hex}"));
    ids.push(format!(" {real}"));

    // Socket, as root (an admin: the widest reach). App names outside the documented
    // alphabet are refused at hello; "." and ".." are names like any other (hex on disk).
    for app in &evil {
        let (welcome, _) = socket_calls(None, &d.socket, app, &[]);
        let want = if app_name_ok(app) { "welcome" } else { "error" };
        assert_eq!(welcome["type"], want, "{app:?}: {welcome}");
        if want == "error" {
            assert_eq!(welcome["error"]["code"], "invalid_request", "{welcome}");
        }
    }
    let mut calls = Vec::new();
    for id in &ids {
        for m in ["get_context", "delete_context", "fork_context", "chunks"] {
            calls.push((m, json!({"context": id}), "not_found"));
        }
        calls.push(("evict", json!({"context": id}), "not_found"));
        calls.push((
            "prompt",
            json!({"context": id, "input": {"text": "x"}, "params": {"max_tokens": 1}}),
            "not_found",
        ));
    }
    for s in &evil {
        let owner = format!("u0:{s}");
        calls.push((
            "chunks",
            json!({"context": real, "owner": owner}),
            "not_found",
        ));
        calls.push((
            "delete_context_of",
            json!({"owner": owner, "context": real}),
            "not_found",
        ));
        let named = if app_name_ok(s) {
            "ok"
        } else {
            "invalid_request"
        };
        calls.push(("quota_get", json!({"app": s}), named));
        calls.push((
            "quota_set",
            json!({"app": s, "quota": {"max_contexts": 1}}),
            named,
        ));
        if !s.contains(':') {
            calls.push((
                "chunks",
                json!({"context": real, "owner": s}),
                "invalid_request",
            ));
            calls.push((
                "delete_context_of",
                json!({"owner": s, "context": real}),
                "invalid_request",
            ));
        }
    }
    let plain: Vec<(&str, Value)> = calls.iter().map(|(m, p, _)| (*m, p.clone())).collect();
    let (_, r) = socket_calls(None, &d.socket, "paths", &plain);
    assert_eq!(r.len(), calls.len());
    for ((method, params, want), got) in calls.iter().zip(&r) {
        let p = params.to_string();
        let p = &p[..p.len().min(200)];
        assert_eq!(outcome(got), *want, "{method} {p}: {got}");
    }
    // Listing and bulk eviction by a hostile app name find nothing.
    for s in &evil {
        let (_, r) = socket_calls(
            None,
            &d.socket,
            "paths",
            &[
                ("contexts", json!({"app": s})),
                ("evict", json!({"app": s})),
            ],
        );
        for got in &r {
            let ok = match outcome(got) {
                "ok" => got["value"] == json!([]) || got["value"]["contexts"] == 0,
                code => code == "invalid_request" || code == "not_found",
            };
            assert!(ok, "{s:?}: {got}");
        }
    }

    // HTTP (anonymous on loopback): ids in the URL, the body and the header; model and user.
    for id in &ids {
        let p = pct(id);
        for (method, path) in [
            ("GET", format!("/v1/contexts/{p}")),
            ("DELETE", format!("/v1/contexts/{p}")),
            ("POST", format!("/v1/contexts/{p}/fork")),
            ("GET", format!("/v1/models/{p}")),
        ] {
            let (st, v, _) = http(&addr, method, &path, None, &[], None);
            assert!(
                (400..500).contains(&st) && st != 401,
                "{method} {}: {st} {v}",
                &path[..path.len().min(200)]
            );
        }
        let turn = json!({"context": id, "max_tokens": 1,
                          "messages": [{"role": "user", "content": "x"}]});
        let (st, v, _) = http(
            &addr,
            "POST",
            "/v1/chat/completions",
            None,
            &[],
            Some(&turn),
        );
        assert!(st == 404 || st == 400, "{st} {v}");
        if id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') && !id.is_empty() {
            let plain = json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
            let (st, v, _) = http(
                &addr,
                "POST",
                "/v1/chat/completions",
                None,
                &[("X-Llmsd-Context", id)],
                Some(&plain),
            );
            assert!(st == 404 || st == 400, "header {id:?}: {st} {v}");
        }
    }
    for s in &evil {
        let body = json!({"model": s, "user": s, "max_tokens": 1, "temperature": 0,
                          "messages": [{"role": "user", "content": "Hi"}]});
        let (st, v, _) = http(
            &addr,
            "POST",
            "/v1/chat/completions",
            None,
            &[],
            Some(&body),
        );
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["model"], model_id,
            "the loaded model answers, whatever was named"
        );
    }

    // D-Bus (strings cannot hold NUL there; "" is no context, a one-off call).
    for s in evil.iter().filter(|s| !s.contains('\0')) {
        if app_name_ok(s) {
            busctl(None, &bus, "CreateContext", "ss", &[s, ""]).expect("a valid app name");
            let e = busctl(None, &bus, "GetContext", "ss", &[s, &real]).expect_err("not its own");
            assert!(e.contains("no such context"), "{s:?}: {e}");
            continue;
        }
        for (method, sig, args) in [
            ("CreateContext", "ss", vec![s.as_str(), ""]),
            ("ListContexts", "s", vec![s.as_str()]),
            ("GetContext", "ss", vec![s.as_str(), real.as_str()]),
        ] {
            let e = busctl(None, &bus, method, sig, &args).expect_err("a hostile app name");
            assert!(e.contains("app name"), "{method} {s:?}: {e}");
        }
    }
    for id in ids.iter().filter(|s| !s.contains('\0') && !s.is_empty()) {
        for (method, sig, args) in [
            ("GetContext", "ss", vec!["paths", id.as_str()]),
            ("DeleteContext", "ss", vec!["paths", id.as_str()]),
            ("ForkContext", "ss", vec!["paths", id.as_str()]),
            (
                "ChatSync",
                "ssss",
                vec!["paths", id.as_str(), "x", r#"{"max_tokens":1}"#],
            ),
        ] {
            let e = busctl(None, &bus, method, sig, &args).expect_err("a hostile id");
            assert!(e.contains("no such context"), "{method} {id:?}: {e}");
        }
    }

    // The real context is untouched and still works; then everything is flushed to disk.
    let (_, r) = socket_calls(
        None,
        &d.socket,
        "paths",
        &[
            ("get_context", json!({"context": real})),
            (
                "prompt",
                json!({"context": real, "input": {"messages": [{"role": "user", "content": "Hi"}]},
                       "params": {"max_tokens": 2}}),
            ),
        ],
    );
    assert_eq!(r[0]["value"]["id"], real.as_str(), "{}", r[0]);
    assert_eq!(outcome(&r[1]), "ok", "{}", r[1]);
    d.stop();
    assert_eq!(
        std::fs::read_dir(canary.path()).unwrap().count(),
        0,
        "something was created in the canary directory"
    );
    assert!(!Path::new("/pwned").exists() && !Path::new("/etc/pwned").exists());
    let strays: Vec<PathBuf> = walk(&d.state)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| !llmsd_made(&d.state, p))
        .collect();
    assert!(strays.is_empty(), "names llmsd did not make: {strays:#?}");
    assert_no_panic(&d);
}
