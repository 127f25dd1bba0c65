//! Clients that never read what they asked for, against the real `llmsd serve`: the daemon
//! buffers a bounded amount for them (the engine stops running a request whose client is a
//! stream's capacity behind; the socket door's outbox is bounded), cancels their requests
//! after `[limits] slow_client_timeout_ms` (contexts left as before the call), closes a socket
//! connection that stopped reading, and serves everyone else meanwhile.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::http::{metrics, sample};
use common::probe::*;
use common::*;
use llmsd_client::{Client, PromptInput, PromptRequest};
use llmsd_ipc::frame;
use llmsd_ipc::{ClientFrame, Event, Request, ServerFrame, PROTOCOL_VERSION};
use serde_json::{json, Value};

const TIMEOUT_MS: u64 = 2000;
/// Tokens each never-read request asks for: far more than the daemon may buffer.
const ASKED: u32 = 4000;
const KV_BUDGET_MIB: u64 = 64;

/// A daemon with the HTTP door, a 2 s slow-client timeout and a small KV budget.
fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap().keep();
    let cfg: PathBuf = dir.join("llmsd.toml");
    std::fs::write(
        &cfg,
        format!("[limits]\nslow_client_timeout_ms = {TIMEOUT_MS}\n"),
    )
    .unwrap();
    Daemon::start(
        true,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--kv-budget-mib",
            &KV_BUDGET_MIB.to_string(),
        ],
    )
}

fn cancelled(http: &str) -> f64 {
    sample(&metrics(http), "llmsd_errors_total{code=\"Cancelled\"}")
}

fn slow_cancels(http: &str) -> f64 {
    sample(&metrics(http), "llmsd_slow_client_cancels_total")
}

/// A streaming, uncapped-by-EOS request for `ASKED` tokens.
fn long_prompt(context: &str) -> PromptRequest {
    PromptRequest {
        context: Some(context.to_string()),
        input: PromptInput::Text(" Once upon a time".into()),
        params: llmsd_client::GenerationParams {
            ignore_eos: true,
            ..greedy(ASKED)
        },
        stream: true,
    }
}

/// Another app's streamed chats run to the end, token by token, while the slow client sits.
fn served_normally(d: &Daemon) -> Duration {
    rt().block_on(async {
        let c = Client::connect(&d.socket, "reader").await.expect("connect");
        let t0 = Instant::now();
        for _ in 0..3 {
            let mut s = c
                .prompt(PromptRequest {
                    context: None,
                    input: PromptInput::Text("The weather today".into()),
                    params: llmsd_client::GenerationParams {
                        ignore_eos: true,
                        ..greedy(16)
                    },
                    stream: true,
                })
                .await
                .expect("prompt");
            let mut tokens = 0;
            while s.next_token().await.expect("token").is_some() {
                tokens += 1;
            }
            let c = s.completion().await.expect("completion");
            assert_eq!(c.usage.completion_tokens, 16);
            assert!(tokens >= 15, "{tokens} token events");
        }
        t0.elapsed()
    })
}

fn write_frame(s: &mut UnixStream, f: &ClientFrame) {
    s.write_all(&frame::encode(f).unwrap())
        .expect("send a frame");
}

/// One frame, or None at EOF (a frame cut short by the close counts as EOF).
fn read_frame(s: &mut UnixStream) -> Option<ServerFrame> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).ok()?;
    let mut body = vec![0u8; frame::body_len(header).expect("a frame length")];
    s.read_exact(&mut body).ok()?;
    Some(frame::decode(&body).expect("a server frame"))
}

#[test]
fn a_socket_client_that_never_reads_is_cut_off_and_its_requests_cancelled() {
    let d = daemon();
    let http = d.http.clone().unwrap();
    let pid = d.pid().unwrap();
    // Eight contexts of the app, each holding a first turn.
    let contexts: Vec<(String, u64)> = rt().block_on(async {
        let c = Client::connect(&d.socket, "deaf").await.expect("connect");
        let mut out = Vec::new();
        for _ in 0..8 {
            let ctx = c.create_context(None).await.expect("create");
            ctx.complete("Hello there.", greedy(4))
                .await
                .expect("prompt")
                .completion()
                .await
                .expect("completion");
            out.push((ctx.id().to_string(), ctx.info().await.expect("info").tokens));
        }
        out
    });
    assert!(contexts.iter().all(|(_, t)| *t > 0), "{contexts:?}");
    let cancelled_before = cancelled(&http);
    let rss_before = vm_rss(pid).unwrap();
    let rss = RssSampler::start(pid);

    let mut deaf = UnixStream::connect(&d.socket).expect("connect");
    set_rcvbuf(deaf.as_raw_fd(), 4096);
    write_frame(
        &mut deaf,
        &ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            app: "deaf".into(),
        },
    );
    assert!(matches!(
        read_frame(&mut deaf),
        Some(ServerFrame::Welcome { .. })
    ));
    for (i, (ctx, _)) in contexts.iter().enumerate() {
        write_frame(
            &mut deaf,
            &ClientFrame::Request {
                id: i as u64 + 1,
                request: Request::Prompt(long_prompt(ctx)),
            },
        );
    }
    let t0 = Instant::now();
    let reader_took = served_normally(&d);
    // The daemon gives up on the client once a frame waited the timeout, and says so.
    wait_for(
        Duration::from_secs(180),
        "the deaf connection closed",
        || {
            d.log_text()
                .contains("closing a socket connection whose client does not read")
        },
    );
    let closed_after = t0.elapsed();
    wait_for(Duration::from_secs(30), "8 requests cancelled", || {
        cancelled(&http) - cancelled_before >= 8.0
    });
    // What the client finds when it reads at last: some tokens, no completion, then EOF.
    deaf.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut tokens: HashMap<u64, u64> = HashMap::new();
    while let Some(f) = read_frame(&mut deaf) {
        match f {
            ServerFrame::Event {
                id,
                event: Event::Token(_),
            } => *tokens.entry(id).or_default() += 1,
            ServerFrame::Error { id, error } => {
                panic!("request {id:?} failed instead of being cut off: {error:?}")
            }
            other => panic!("a frame after the client stopped reading: {other:?}"),
        }
    }
    let (peak, samples) = rss.finish();
    let delivered: u64 = tokens.values().sum();
    println!(
        "deaf socket client: cut off after {:.1} s, {delivered} tokens of {} buffered for it \
         (per request {tokens:?}); the reader's 3 x 16 tokens took {:.1} s; RSS {:.1} MiB \
         before, peak {:.1} MiB ({samples} samples)",
        closed_after.as_secs_f64(),
        8 * ASKED,
        reader_took.as_secs_f64(),
        rss_before as f64 / MIB,
        peak as f64 / MIB,
    );
    // Bounded: the kernel's socket buffer, the outbox (256 frames) and each request's
    // stream (64 items) at most; far from the 16000 tokens asked for.
    assert!(
        delivered < 2000,
        "{delivered} tokens buffered for a deaf client"
    );
    assert!(
        tokens.values().all(|&n| n < u64::from(ASKED) / 4),
        "{tokens:?}"
    );
    assert!(
        peak < rss_before + (KV_BUDGET_MIB << 20) + (32 << 20),
        "RSS grew from {:.1} to {:.1} MiB",
        rss_before as f64 / MIB,
        peak as f64 / MIB
    );
    // The contexts are as before the cancelled calls, and serve the next call.
    rt().block_on(async {
        let c = Client::connect(&d.socket, "deaf").await.expect("connect");
        for (id, before) in &contexts {
            assert_eq!(c.context(id).info().await.unwrap().tokens, *before, "{id}");
        }
        let done = c
            .context(&contexts[0].0)
            .complete(" And then", greedy(4))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        assert_eq!(done.usage.cached_tokens, contexts[0].1);
    });
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
}

/// Reads an HTTP response to its end; the raw text.
fn read_all(s: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn an_http_client_that_never_reads_its_stream_has_the_request_cancelled() {
    let d = daemon();
    let http = d.http.clone().unwrap();
    let pid = d.pid().unwrap();
    let (st, ctx) = http_json(&http, "POST", "/v1/contexts", None, &json!({}));
    assert_eq!(st, 200, "{ctx}");
    let ctx = ctx["id"].as_str().expect("id").to_string();
    let turn = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                      "temperature": 0, "context": ctx});
    let (st, v) = http_json(&http, "POST", "/v1/chat/completions", None, &turn);
    assert_eq!(st, 200, "{v}");
    let tokens_of = || {
        let (st, v) = http_json(
            &http,
            "GET",
            &format!("/v1/contexts/{ctx}"),
            None,
            &Value::Null,
        );
        assert_eq!(st, 200, "{v}");
        v["tokens"].as_u64().expect("tokens")
    };
    let before = tokens_of();
    let rss_before = vm_rss(pid).unwrap();
    let rss = RssSampler::start(pid);

    let mut deaf = TcpStream::connect(&http).expect("connect");
    set_rcvbuf(deaf.as_raw_fd(), 4096);
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}],
                      "max_tokens": ASKED, "ignore_eos": true, "stream": true,
                      "temperature": 0, "context": ctx});
    send_http(&mut deaf, "POST", "/v1/chat/completions", None, &body);
    let t0 = Instant::now();
    // Another client is served meanwhile, streamed and not.
    let mut other = TcpStream::connect(&http).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let q = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
                   "ignore_eos": true, "stream": true});
    send_http(&mut other, "POST", "/v1/chat/completions", None, &q);
    let streamed = read_all(&mut other);
    assert!(streamed.contains("data: [DONE]"), "{streamed}");
    let q = json!({"prompt": "Hi", "max_tokens": 8, "ignore_eos": true});
    let (st, v) = http_json(&http, "POST", "/v1/completions", None, &q);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");

    wait_for(
        Duration::from_secs(180),
        "the deaf request cancelled",
        || slow_cancels(&http) >= 1.0,
    );
    let cancelled_after = t0.elapsed();
    assert!(d
        .log_text()
        .contains("cancelling a request whose client does not read its stream"));
    assert_eq!(tokens_of(), before, "the context changed");
    // Reading at last: the tokens buffered, then the cancellation as an error event.
    deaf.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let raw = read_all(&mut deaf);
    let (peak, samples) = rss.finish();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let chunks = raw.matches("\"content\":").count();
    let error = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    println!(
        "deaf HTTP client: cancelled after {:.1} s with {chunks} chunks of {ASKED} tokens \
         buffered for it; RSS {:.1} MiB before, peak {:.1} MiB ({samples} samples)",
        cancelled_after.as_secs_f64(),
        rss_before as f64 / MIB,
        peak as f64 / MIB,
    );
    assert!(!raw.contains("[DONE]"), "a cancelled stream ended as done");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not read")),
        "last event {error}"
    );
    assert!(chunks < ASKED as usize / 2, "{chunks} chunks buffered");
    assert!(
        peak < rss_before + (KV_BUDGET_MIB << 20) + (32 << 20),
        "RSS grew from {:.1} to {:.1} MiB",
        rss_before as f64 / MIB,
        peak as f64 / MIB
    );
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
}
