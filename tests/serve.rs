//! End-to-end tests of `llmsd serve` over its Unix socket, with the real model, the real
//! binary and the llmsd-client SDK: persistence across calls and restarts, isolation between
//! apps and users, cancellation, bad input, concurrency.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use llmsd_client::{
    Client, ErrorCode, GenerationParams, PromptInput, PromptRequest, ResponseFormat,
};

#[test]
fn a_context_continues_across_calls_and_restarts() {
    let mut d = Daemon::start(false, &[]);
    let rt = rt();
    let (id, first) = rt.block_on(async {
        let c = Client::connect(&d.socket, "notes").await.unwrap();
        let ctx = c
            .create_context(Some("You are a terse assistant."))
            .await
            .unwrap();
        let one = ctx
            .chat("What is the capital of France?", greedy(24))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        assert!(one.text.contains("Paris"), "{one:?}");
        assert_eq!(one.usage.cached_tokens, 0);
        assert_eq!(one.timings.prefilled_tokens, one.usage.prompt_tokens);
        // The second turn prefills only its own tokens.
        let two = ctx
            .chat("And of Italy?", greedy(24))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        let held = one.usage.prompt_tokens + one.usage.completion_tokens;
        assert!(two.usage.cached_tokens >= held - 1, "{two:?} after {one:?}");
        assert!(two.timings.prefilled_tokens < 20, "{:?}", two.timings);
        assert_eq!(
            two.timings.prefilled_tokens,
            two.usage.prompt_tokens - two.usage.cached_tokens
        );
        let info = ctx.info().await.unwrap();
        assert_eq!(info.messages, 5, "system + 2 x (user, assistant)");
        (ctx.id().to_string(), two)
    });
    d.restart();
    rt.block_on(async {
        let c = Client::connect(&d.socket, "notes").await.unwrap();
        let ctx = c.context(&id);
        let info = ctx.info().await.unwrap();
        assert_eq!(info.messages, 5);
        assert_eq!(
            info.tokens,
            first.usage.prompt_tokens + first.usage.completion_tokens
        );
        let three = ctx
            .chat("And of Spain?", greedy(24))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        assert!(three.usage.cached_tokens >= info.tokens - 1, "{three:?}");
        assert!(three.timings.prefilled_tokens < 20);
        assert!(!three.text.is_empty());
    });
}

#[test]
fn greedy_output_matches_the_kv_store_run_directly() {
    let d = Daemon::start(false, &[]);
    let text = "The three primary colours are";
    // The same store code (default llms policy), driven one call per process by `llmsd ctx`.
    let state = d.dir.join("cli-state");
    let st = state.to_str().unwrap();
    let m = model(SMOLLM2);
    let mp = m.to_str().unwrap();
    let id = json(&llmsd(&[
        "ctx",
        "--model",
        mp,
        "--state-dir",
        st,
        "--json",
        "create",
    ]))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let want = json(&llmsd(&[
        "ctx",
        "--model",
        mp,
        "--state-dir",
        st,
        "--json",
        "generate",
        &id,
        "--prompt",
        text,
        "--max-tokens",
        "24",
    ]));
    let (got, chat) = rt().block_on(async {
        let c = Client::connect(&d.socket, "one-shot").await.unwrap();
        let got = c
            .prompt(PromptRequest {
                context: None,
                input: PromptInput::Text(text.into()),
                params: greedy(24),
                stream: true,
            })
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        let chat = c.chat_once("Hello there!", greedy(1)).await.unwrap();
        (got, chat)
    });
    assert_eq!(got.text, want["text"].as_str().unwrap());
    assert_eq!(
        got.usage.completion_tokens as usize,
        want["tokens"].as_array().unwrap().len()
    );
    assert_eq!(got.context, None, "a one-off call keeps no context");
    // The chat template renders exactly the prompt the one-shot generator builds.
    let oneshot = json(&llmsd(&[
        "generate",
        "--model",
        mp,
        "--chat",
        "--prompt",
        "Hello there!",
        "--max-tokens",
        "1",
        "--json",
    ]));
    assert_eq!(
        chat.usage.prompt_tokens as usize,
        oneshot["prompt_ids"].as_array().unwrap().len()
    );
}

#[test]
fn apps_and_users_cannot_see_each_others_contexts() {
    let d = Daemon::start(false, &[]);
    let rt = rt();
    let id = rt.block_on(async {
        let a = Client::connect(&d.socket, "alpha").await.unwrap();
        let b = Client::connect(&d.socket, "beta").await.unwrap();
        let ctx = a.create_context(None).await.unwrap();
        ctx.complete("The sky is", greedy(4))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        let theirs = b.context(ctx.id());
        for e in [
            theirs.info().await.unwrap_err(),
            theirs.fork().await.unwrap_err(),
            theirs
                .complete(" blue", greedy(2))
                .await
                .unwrap()
                .completion()
                .await
                .unwrap_err(),
            b.context(ctx.id()).delete().await.unwrap_err(),
        ] {
            assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
        }
        assert!(b.list_contexts().await.unwrap().is_empty());
        assert_eq!(a.list_contexts().await.unwrap().len(), 1);
        ctx.id().to_string()
    });
    // The same app name under another uid is another app (setpriv runs a client as nobody).
    let script = format!(
        r#"
import json, socket, struct
s = socket.socket(socket.AF_UNIX); s.connect({sock:?})
def send(o):
    b = json.dumps(o).encode(); s.sendall(struct.pack(">I", len(b)) + b)
def recv():
    h = b""
    while len(h) < 4: h += s.recv(4 - len(h))
    n = struct.unpack(">I", h)[0]; b = b""
    while len(b) < n: b += s.recv(n - len(b))
    return json.loads(b)
send({{"type": "hello", "protocol": 1, "app": "alpha"}}); print(json.dumps(recv()))
send({{"type": "request", "id": 1, "method": "get_context", "params": {{"context": {id:?}}}}}); print(json.dumps(recv()))
send({{"type": "request", "id": 2, "method": "list_contexts"}}); print(json.dumps(recv()))
"#,
        sock = d.socket.to_str().unwrap(),
    );
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .expect("setpriv runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(json)
        .collect();
    assert_eq!(lines[0]["uid"], 65534);
    assert_eq!(lines[1]["error"]["code"], "not_found", "{}", lines[1]);
    assert_eq!(lines[2]["value"], serde_json::json!([]));
}

#[test]
fn cancel_stops_a_generation_and_leaves_the_context_as_it_was() {
    let d = Daemon::start(false, &[]);
    rt().block_on(async {
        let c = Client::connect(&d.socket, "canceller").await.unwrap();
        let ctx = c.create_context(None).await.unwrap();
        ctx.complete("Once upon a time", greedy(4))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        let before = ctx.info().await.unwrap().tokens;
        let mut s = ctx.complete(" there was", greedy(4000)).await.unwrap();
        for _ in 0..3 {
            s.next_token().await.unwrap().expect("a token");
        }
        s.cancel().await.unwrap();
        let e = loop {
            match s.next_token().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("completed instead of being cancelled"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Some(ErrorCode::Cancelled), "{e}");
        assert_eq!(ctx.info().await.unwrap().tokens, before);
        // The context is free again.
        ctx.complete(" a", greedy(2))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
    });
}

fn raw_frame(s: &mut UnixStream, body: &[u8]) {
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
}

fn raw_read(s: &mut UnixStream) -> Option<serde_json::Value> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut b = vec![0u8; u32::from_be_bytes(h) as usize];
    s.read_exact(&mut b).ok()?;
    Some(serde_json::from_slice(&b).unwrap())
}

#[test]
fn bad_input_gets_typed_errors_and_the_daemon_stays_up() {
    let mut d = Daemon::start(false, &[]);
    let connect = || {
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    // Wrong protocol version.
    let mut s = connect();
    raw_frame(&mut s, br#"{"type":"hello","protocol":99,"app":"x"}"#);
    let e = raw_read(&mut s).unwrap();
    assert_eq!(e["error"]["code"], "invalid_request");
    assert!(e["error"]["message"].as_str().unwrap().contains("99"));
    assert!(
        raw_read(&mut s).is_none(),
        "closed after a failed handshake"
    );
    // A bad app name.
    let mut s = connect();
    raw_frame(&mut s, br#"{"type":"hello","protocol":1,"app":"../etc"}"#);
    assert_eq!(
        raw_read(&mut s).unwrap()["error"]["code"],
        "invalid_request"
    );
    // Garbage, an unknown method and bad parameters keep the connection.
    let mut s = connect();
    raw_frame(&mut s, br#"{"type":"hello","protocol":1,"app":"fuzz"}"#);
    assert_eq!(raw_read(&mut s).unwrap()["type"], "welcome");
    raw_frame(&mut s, b"{not json");
    assert_eq!(
        raw_read(&mut s).unwrap()["error"]["code"],
        "invalid_request"
    );
    raw_frame(&mut s, br#"{"type":"request","id":7,"method":"reboot"}"#);
    let e = raw_read(&mut s).unwrap();
    assert_eq!(
        (e["id"].as_u64(), e["error"]["code"].as_str()),
        (Some(7), Some("invalid_request"))
    );
    raw_frame(
        &mut s,
        br#"{"type":"request","id":8,"method":"prompt","params":{"input":{"text":"x"},"params":{"temperature":-3}}}"#,
    );
    let e = raw_read(&mut s).unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"),
        "{e}"
    );
    raw_frame(
        &mut s,
        br#"{"type":"request","id":9,"method":"get_context","params":{"context":"../../etc/passwd"}}"#,
    );
    assert_eq!(raw_read(&mut s).unwrap()["error"]["code"], "not_found");
    raw_frame(&mut s, br#"{"type":"request","id":10,"method":"health"}"#);
    assert_eq!(raw_read(&mut s).unwrap()["value"]["status"], "ok");
    // A frame over the limit: error, then the connection closes.
    s.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    let e = raw_read(&mut s).unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("exceeds"),
        "{e}"
    );
    assert!(raw_read(&mut s).is_none());
    // A client that connects and vanishes mid-frame.
    let mut s = connect();
    s.write_all(&[0, 0, 1]).unwrap();
    drop(s);
    assert!(d.is_running());
    rt().block_on(async {
        let c = Client::connect(&d.socket, "after").await.unwrap();
        assert_eq!(c.health().await.unwrap().status, "ok");
    });
}

#[test]
fn concurrent_apps_all_complete_and_json_mode_gives_json() {
    let d = Daemon::start(false, &[]);
    rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..6 {
            let sock = d.socket.clone();
            tasks.push(tokio::spawn(async move {
                let c = Client::connect(&sock, &format!("app{i}")).await.unwrap();
                let ctx = c.create_context(None).await.unwrap();
                let r = ctx
                    .chat(&format!("Count from {i} to {}.", i + 5), greedy(24))
                    .await
                    .unwrap()
                    .completion()
                    .await
                    .unwrap();
                assert!(r.usage.completion_tokens > 0);
                r
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let c = Client::connect(&d.socket, "json").await.unwrap();
        let r = c
            .prompt(PromptRequest {
                context: None,
                input: PromptInput::Messages(vec![llmsd_client::ChatMessage::new(
                    "user",
                    "Describe a cat as JSON with fields name and age.",
                )]),
                params: GenerationParams {
                    max_tokens: 128,
                    response_format: ResponseFormat::JsonObject,
                    ..GenerationParams::default()
                },
                stream: true,
            })
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        if r.finish_reason == llmsd_client::FinishReason::Stop {
            let v: serde_json::Value = serde_json::from_str(&r.text)
                .unwrap_or_else(|e| panic!("not JSON: {e}: {:?}", r.text));
            assert!(v.is_object());
        } else {
            assert!(r.text.starts_with('{'), "{:?}", r.text);
        }
    });
}
