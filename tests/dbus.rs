//! End-to-end tests of the D-Bus door: the real `llmsd serve` on a private dbus-daemon the
//! test starts (a session bus, and a bus with the system bus's default policy plus
//! `systemd/org.llmsd.Llm1.conf`), called with `busctl`, `gdbus` and `dbus-send`.

mod common;

use std::process::Command;

use common::bus::PrivateBus;
use common::*;
use llmsd_client::Client;
use serde_json::Value;

const NAME: &str = "org.llmsd.Llm1";
const PATH: &str = "/org/llmsd/Llm1";
const IFACE: &str = "org.llmsd.Llm1";

/// Runs a tool, optionally as another uid (setpriv); returns (success, stdout, stderr).
fn tool(as_nobody: bool, program: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        c
    } else {
        Command::new(program)
    };
    let out = cmd
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `busctl --address=BUS --json=short call org.llmsd.Llm1 /org/llmsd/Llm1 org.llmsd.Llm1
/// METHOD SIG ARGS...`: the reply's values, or the error text.
fn busctl_as(
    nobody: bool,
    bus: &PrivateBus,
    method: &str,
    sig: &str,
    args: &[&str],
) -> Result<Vec<Value>, String> {
    let addr = format!("--address={}", bus.address);
    let mut a = vec![
        addr.as_str(),
        "--json=short",
        "call",
        NAME,
        PATH,
        IFACE,
        method,
    ];
    if !sig.is_empty() {
        a.push(sig);
        a.extend_from_slice(args);
    }
    let (ok, out, err) = tool(nobody, "busctl", &a);
    if !ok {
        return Err(err);
    }
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v = json(&out);
    Ok(v["data"].as_array().expect("data").clone())
}

fn busctl(bus: &PrivateBus, method: &str, sig: &str, args: &[&str]) -> Vec<Value> {
    busctl_as(false, bus, method, sig, args)
        .unwrap_or_else(|e| panic!("busctl {method} {args:?}: {e}"))
}

/// The one string a method returned, parsed as JSON.
fn json_reply(v: &[Value]) -> Value {
    json(v[0].as_str().expect("a string reply"))
}

/// A string in GVariant text form (as `gdbus` prints it), unquoted and unescaped.
fn gvariant_string(s: &str) -> String {
    let s = s.trim();
    let q = s.chars().next().expect("quoted");
    assert!(q == '\'' || q == '"', "not a GVariant string: {s}");
    let inner = &s[1..s.rfind(q).expect("closing quote")];
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next().expect("escape") {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16).expect("\\u escape");
                out.push(char::from_u32(code).expect("char"));
            }
            other => out.push(other),
        }
    }
    out
}

/// `gdbus call ... --method org.llmsd.Llm1.METHOD ARGS...`: the single string reply.
fn gdbus(bus: &PrivateBus, method: &str, args: &[&str]) -> Result<String, String> {
    let m = format!("{IFACE}.{method}");
    let mut a = vec![
        "call",
        "--address",
        &bus.address,
        "--dest",
        NAME,
        "--object-path",
        PATH,
        "--method",
        &m,
    ];
    a.extend_from_slice(args);
    let (ok, out, err) = tool(false, "gdbus", &a);
    if !ok {
        return Err(err);
    }
    // ('...',)
    let body = out
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(",)"))
        .unwrap_or_else(|| panic!("gdbus output {out:?}"));
    Ok(gvariant_string(body))
}

/// `dbus-send --print-reply ... org.llmsd.Llm1.METHOD ARGS...`: stdout, or stderr on failure.
fn dbus_send(bus: &PrivateBus, method: &str, args: &[&str]) -> Result<String, String> {
    let b = format!("--bus={}", bus.address);
    let d = format!("--dest={NAME}");
    let m = format!("{IFACE}.{method}");
    let mut a = vec![b.as_str(), "--print-reply", d.as_str(), PATH, m.as_str()];
    a.extend_from_slice(args);
    let (ok, out, err) = tool(false, "dbus-send", &a);
    if ok {
        Ok(out)
    } else {
        Err(err)
    }
}

/// The string of a `dbus-send --print-reply` reply (printed as `string "..."`, unescaped).
fn dbus_send_string(out: &str) -> String {
    let start = out.find("string \"").expect("a string reply") + "string \"".len();
    let end = out.rfind('"').expect("closing quote");
    out[start..end].to_string()
}

#[test]
fn llmsd_serve_answers_busctl_gdbus_and_dbus_send_on_the_session_bus() {
    let bus = PrivateBus::session();
    let mut d = Daemon::start_env(
        false,
        &["--bus", "session"],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    assert!(
        d.log_text().contains("D-Bus door serving"),
        "{}",
        d.log_text()
    );

    // busctl: a context with a system prompt, a first turn.
    let id = busctl(
        &bus,
        "CreateContext",
        "ss",
        &["notes", "You are a terse assistant."],
    )[0]
    .as_str()
    .expect("id")
    .to_string();
    let one = json_reply(&busctl(
        &bus,
        "ChatSync",
        "ssss",
        &[
            "notes",
            &id,
            "What is the capital of France?",
            r#"{"max_tokens":24}"#,
        ],
    ));
    assert!(
        one["text"].as_str().expect("text").contains("Paris"),
        "{one}"
    );
    assert_eq!(one["context"], id.as_str());

    // gdbus: the second turn prefills only its own tokens.
    let two = json(
        &gdbus(
            &bus,
            "ChatSync",
            &["notes", &id, "And of Italy?", r#"{"max_tokens":24}"#],
        )
        .expect("gdbus ChatSync"),
    );
    let held = one["usage"]["prompt_tokens"].as_u64().expect("prompt")
        + one["usage"]["completion_tokens"]
            .as_u64()
            .expect("completion");
    assert!(
        two["usage"]["cached_tokens"].as_u64().expect("cached") >= held - 1,
        "{two} after {one}"
    );
    assert!(
        two["timings"]["prefilled_tokens"]
            .as_u64()
            .expect("prefilled")
            < 20,
        "{two}"
    );

    // The same greedy output as the socket door.
    let message = "Name three colors.";
    let via_dbus = json(
        &gdbus(
            &bus,
            "ChatSync",
            &["notes", "", message, r#"{"max_tokens":16}"#],
        )
        .expect("gdbus ChatSync"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let via_socket = rt.block_on(async {
        let c = Client::connect(&d.socket, "notes").await.expect("connect");
        c.chat_once(message, greedy(16)).await.expect("chat")
    });
    assert_eq!(via_dbus["text"], via_socket.text.as_str());

    // dbus-send: the context holds both turns; a typed error.
    let info = json(&dbus_send_string(
        &dbus_send(
            &bus,
            "GetContext",
            &["string:notes", &format!("string:{id}")],
        )
        .expect("dbus-send GetContext"),
    ));
    assert_eq!(info["messages"], 5, "{info}");
    let err = dbus_send(&bus, "GetContext", &["string:notes", "string:ctx-nope"])
        .expect_err("unknown context");
    assert!(err.contains("Error org.llmsd.Error.NotFound"), "{err}");
    let err = gdbus(&bus, "ChatSync", &["notes", "", "hi", "{bad json"]).expect_err("bad params");
    assert!(err.contains("org.llmsd.Error.InvalidRequest"), "{err}");

    // Another app sees nothing; Chat replies with a request id at once.
    assert_eq!(
        json_reply(&busctl(&bus, "ListContexts", "s", &["mail"])),
        serde_json::json!([])
    );
    let r = busctl(
        &bus,
        "Chat",
        "ssss",
        &["mail", "", "Hi!", r#"{"max_tokens":4}"#],
    );
    assert!(r[0].as_u64().is_some(), "{r:?}");
    let model = json_reply(&busctl(&bus, "ModelInfo", "", &[]));
    assert_eq!(model["id"], "SmolLM2-135M-Instruct.Q4_1");

    // A restart releases and retakes the name; the context is still there.
    d.restart();
    let info = json_reply(&busctl(&bus, "GetContext", "ss", &["notes", &id]));
    assert_eq!(info["messages"], 5, "{info}");
    let three = json_reply(&busctl(
        &bus,
        "ChatSync",
        "ssss",
        &["notes", &id, "And of Spain?", r#"{"max_tokens":24}"#],
    ));
    // The history is there ("And of Spain?" answered as a capital), and only the new turn
    // is prefilled.
    assert!(
        three["text"].as_str().expect("text").contains("Madrid"),
        "{three}"
    );
    let cached = three["usage"]["cached_tokens"]
        .as_u64()
        .expect("cached tokens");
    let prompt = three["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    assert!(cached > 0 && cached < prompt, "{three}");
    assert_eq!(
        three["timings"]["prefilled_tokens"].as_u64(),
        Some(prompt - cached),
        "{three}"
    );
}

#[test]
fn another_uid_is_another_app_on_the_system_bus() {
    let bus = PrivateBus::system();
    let _d = Daemon::start_env(
        false,
        &["--bus", "system"],
        &[("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)],
    );
    let id = busctl(&bus, "CreateContext", "ss", &["notes", ""])[0]
        .as_str()
        .expect("id")
        .to_string();
    // nobody may call (the policy lets everyone in) but sees none of root's contexts.
    let theirs = busctl_as(true, &bus, "ListContexts", "s", &["notes"]).expect("nobody lists");
    assert_eq!(json_reply(&theirs), serde_json::json!([]));
    let err = busctl_as(true, &bus, "GetContext", "ss", &["notes", &id]).expect_err("not theirs");
    assert!(err.contains("no such context"), "{err}");
    let err =
        busctl_as(true, &bus, "DeleteContext", "ss", &["notes", &id]).expect_err("not theirs");
    assert!(err.contains("no such context"), "{err}");
    let own = busctl_as(true, &bus, "CreateContext", "ss", &["notes", ""]).expect("nobody creates");
    let own = own[0].as_str().expect("id");
    let mine = json_reply(&busctl(&bus, "ListContexts", "s", &["notes"]));
    let mine: Vec<&str> = mine
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(mine, vec![id.as_str()], "nobody's {own} is not root's");
    // Owning the name is root's and llmsd's only.
    let (ok, _, err) = tool(
        true,
        "busctl",
        &[
            &format!("--address={}", bus.address),
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "RequestName",
            "su",
            "org.llmsd.Llm1",
            "4",
        ],
    );
    assert!(!ok, "nobody must not own org.llmsd.Llm1");
    assert!(
        err.contains("not allowed") || err.contains("denied"),
        "{err}"
    );
}
