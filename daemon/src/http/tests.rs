//! In-process tests of the HTTP door against the real model (SmolLM2): requests go through
//! the axum router as `tower` calls, and the service underneath is the real one.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body as AxBody;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use llmsd_engine::model::Model;
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{ChatMessage, GenerationParams, PromptInput, PromptRequest};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::kvstore::StoreConfig;
use crate::service::{ServiceConfig, ServiceParts};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// One service for every test of this process (the engine thread is shared, as in the
/// daemon), over a state directory that lives as long as the process.
fn service() -> Service {
    static SVC: OnceLock<(Service, tempfile::TempDir)> = OnceLock::new();
    SVC.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(format!("{MODEL}.gguf"));
        let model = Model::load(&path).expect("the model (run scripts/fetch-models)");
        let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
        let pool = ThreadPool::with_pinning(2, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut store = StoreConfig::new(dir.path());
        store.fit_costs = false;
        let (svc, _engine) = Service::start(ServiceParts {
            model: Arc::new(model),
            tokenizer,
            pool: Arc::new(pool),
            model_id: MODEL.into(),
            store,
            service: ServiceConfig::default(),
        })
        .unwrap();
        (svc, dir)
    })
    .0
    .clone()
}

/// Greedy output depends on how a prompt is sliced for prefill, and a prompt is sliced finer
/// while other requests decode: tests that compare two generations run alone.
static ORDER: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

async fn exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    ORDER.write().await
}

async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    ORDER.read().await
}

fn app() -> Router {
    router(service(), HttpOptions::default())
}

/// Two apps with keys; anonymous callers refused.
fn keyed_app() -> Router {
    let mut opts = HttpOptions {
        allow_anonymous: false,
        ..HttpOptions::default()
    };
    opts.api_keys.insert("key-a".into(), "app-a".into());
    opts.api_keys.insert("key-b".into(), "app-b".into());
    router(service(), opts)
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        let text = self.text();
        assert!(text.ends_with("\n\n"), "{text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }

    fn assert_error(&self, status: u16, kind: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert_eq!(e["type"], kind, "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        v
    }
}

async fn call_raw(
    app: &Router,
    method: Method,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = app
        .clone()
        .oneshot(req.body(AxBody::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(app: &Router, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    call_raw(
        app,
        Method::POST,
        path,
        body.to_string().into_bytes(),
        headers,
    )
    .await
}

async fn get(app: &Router, path: &str, headers: &[(&str, &str)]) -> Reply {
    call_raw(app, Method::GET, path, Vec::new(), headers).await
}

const QUESTION: &str = "What is the capital of France?";

fn chat_body(extra: Value) -> Value {
    let mut v = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 12,
        "temperature": 0,
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

#[tokio::test]
async fn http_chat_greedy_matches_the_service() {
    let _order = exclusive().await;
    let app = app();
    let r = post(&app, "/v1/chat/completions", chat_body(json!({})), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["logprobs"].is_null());
    let text = choice["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(v["timings"]["prefilled_tokens"].as_u64().unwrap() > 0);
    assert!(v.get("context").is_none());

    // The same call straight on the service.
    let svc = service();
    let direct = svc
        .prompt(
            &Caller::http("direct").unwrap(),
            PromptRequest {
                context: None,
                input: PromptInput::Messages(vec![ChatMessage::new("user", QUESTION)]),
                params: GenerationParams {
                    max_tokens: 12,
                    ..GenerationParams::default()
                },
                stream: false,
            },
        )
        .unwrap()
        .completion()
        .await
        .unwrap();
    assert_eq!(text, direct.text);
    assert_eq!(choice["finish_reason"], direct.finish_reason.as_str());
    assert_eq!(u["completion_tokens"], direct.usage.completion_tokens);
}

#[tokio::test]
async fn http_chat_stream_concatenates_to_the_whole_reply() {
    let _order = exclusive().await;
    let app = app();
    let whole = post(&app, "/v1/chat/completions", chat_body(json!({})), &[]).await;
    let whole = whole.json();
    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"stream": true})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(c.get("usage").is_none(), "{c}");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, whole["choices"][0]["message"]["content"]);
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(last["timings"]["prefilled_tokens"].as_u64().unwrap() > 0);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null());
    }
}

#[tokio::test]
async fn http_stream_include_usage() {
    let _order = shared().await;
    let app = app();
    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
        &[],
    )
    .await;
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let u = &usage["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(u["completion_tokens"].as_u64().unwrap() > 0);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null(), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn http_chat_logprobs_shape() {
    let _order = shared().await;
    let app = app();
    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 4})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut joined = Vec::new();
    for e in content {
        assert!(e["token"].is_string());
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert!(
            (top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-4,
            "{e}"
        );
        for t in top {
            assert!(t["token"].is_string() && t["bytes"].is_array());
        }
        joined.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(
        String::from_utf8(joined).unwrap(),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Streamed: one logprobs entry per token chunk.
    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"logprobs": true, "max_tokens": 4, "stream": true})),
        &[],
    )
    .await;
    let events = r.events();
    let n = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .map(|a| a.len())
        .sum::<usize>();
    assert_eq!(n, content.len());
}

#[tokio::test]
async fn http_completions_echo_and_logprobs() {
    let _order = exclusive().await;
    let app = app();
    let prompt = "The quick brown fox";
    let r = post(
        &app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0,
               "echo": true, "logprobs": 2}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with(prompt) && text.len() > prompt.len(),
        "{text}"
    );
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let prompt_n = tokens.len() - completion;
    assert!(prompt_n >= 4, "{lp}");
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, text);
    let lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), tokens.len());
    assert!(lps[0].is_null());
    assert!(lps[1..]
        .iter()
        .all(|x| x.as_f64().is_some_and(|l| l <= 0.0)));
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), tokens.len());
    assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 2);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));

    // Without echo: the continuation only, the same greedy tokens.
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "temperature": 0}),
        &[],
    )
    .await;
    let plain = r.json();
    assert_eq!(
        format!("{prompt}{}", plain["choices"][0]["text"].as_str().unwrap()),
        text
    );
    assert!(plain["choices"][0]["logprobs"].is_null());

    // Streamed with echo: the prompt first, then the same continuation.
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": true,
               "stream": true}),
        &[],
    )
    .await;
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["text"], prompt);
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, text);
}

#[tokio::test]
async fn http_json_object_output_parses() {
    let _order = exclusive().await;
    let app = app();
    let r = post(
        &app,
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "content":
                "Return a JSON object with one key \"answer\" holding the capital of France."}],
            "response_format": {"type": "json_object"},
            "temperature": 0,
            "max_tokens": 64,
        }),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content.trim()).unwrap_or_else(|e| {
        panic!("{e}: {content:?}");
    });
    assert!(parsed.is_object(), "{content}");
}

#[tokio::test]
async fn http_stop_strings() {
    let _order = exclusive().await;
    let app = app();
    let base = post(
        &app,
        "/v1/completions",
        json!({"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}),
        &[],
    )
    .await
    .json();
    let full = base["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(full.contains('6'), "{full:?}");
    for stop in [json!("6"), json!(["xyz", "6"])] {
        let r = post(
            &app,
            "/v1/completions",
            json!({"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": stop}),
            &[],
        )
        .await
        .json();
        let cut = r["choices"][0]["text"].as_str().unwrap();
        assert_eq!(cut, &full[..full.find('6').unwrap()]);
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": "1, 2, 3, 4,", "max_tokens": 3, "temperature": 0}),
        &[],
    )
    .await
    .json();
    assert_eq!(r["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn http_bad_requests_are_openai_errors() {
    let _order = shared().await;
    let app = app();
    // Not JSON.
    let r = call_raw(
        &app,
        Method::POST,
        "/v1/chat/completions",
        b"{\"messages\": [".to_vec(),
        &[],
    )
    .await;
    let v = r.assert_error(400, "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));
    // Wrong types, missing fields.
    for body in [
        json!({"messages": "hi"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}),
        json!({"model": "x"}),
        json!({"prompt": 5}),
    ] {
        post(&app, "/v1/chat/completions", body, &[])
            .await
            .assert_error(400, "invalid_request_error");
    }
    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"n": 2})),
        &[],
    )
    .await;
    let v = r.assert_error(400, "invalid_request_error");
    assert_eq!(v["error"]["param"], "n");
    // Values the service refuses.
    for extra in [
        json!({"temperature": 5}),
        json!({"stop": ["a", "b", "c", "d", "e"]}),
        json!({"messages": [{"role": "tool", "content": "x"}]}),
        json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
    ] {
        post(&app, "/v1/chat/completions", chat_body(extra), &[])
            .await
            .assert_error(400, "invalid_request_error");
    }
    // Too large.
    let small = router(
        service(),
        HttpOptions {
            max_body_bytes: 1024,
            ..HttpOptions::default()
        },
    );
    let big = chat_body(json!({"messages": [{"role": "user", "content": "x".repeat(4096)}]}));
    let r = post(&small, "/v1/chat/completions", big, &[]).await;
    let v = r.assert_error(413, "invalid_request_error");
    assert_eq!(v["error"]["code"], "request_too_large");
    // Unknown URL and method.
    get(&app, "/v2/nothing", &[])
        .await
        .assert_error(404, "not_found_error");
    get(&app, "/v1/chat/completions", &[])
        .await
        .assert_error(405, "invalid_request_error");
    // Unknown context: a 404 before any event, streamed or not.
    for stream in [false, true] {
        let r = post(
            &app,
            "/v1/chat/completions",
            chat_body(json!({"context": "ctx-nope", "stream": stream})),
            &[],
        )
        .await;
        r.assert_error(404, "not_found_error");
    }
}

#[tokio::test]
async fn http_api_keys() {
    let _order = shared().await;
    let app = keyed_app();
    let r = get(&app, "/v1/models", &[("authorization", "Bearer wrong")]).await;
    let v = r.assert_error(401, "invalid_request_error");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = post(&app, "/v1/chat/completions", chat_body(json!({})), &[]).await;
    r.assert_error(401, "invalid_request_error");
    let r = get(&app, "/v1/models", &[("authorization", "Bearer key-a")]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    let r = get(
        &app,
        &format!("/v1/models/{MODEL}"),
        &[("authorization", "Bearer key-a")],
    )
    .await;
    assert_eq!(r.json()["id"], MODEL);
    // Health and metrics need no key.
    let r = get(&app, "/health", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let r = get(&app, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(r.text().contains("# TYPE llmsd_prompts_total counter"));
}

#[tokio::test]
async fn http_context_continuation_prefills_only_the_new_turn() {
    let _order = shared().await;
    let app = keyed_app();
    let a = [("authorization", "Bearer key-a")];
    let r = post(
        &app,
        "/v1/contexts",
        json!({"system": "You are a helpful assistant."}),
        &a,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let info = r.json();
    let ctx = info["id"].as_str().unwrap().to_string();
    assert_eq!(r.headers[CONTEXT_HEADER], ctx.as_str());
    assert_eq!(info["messages"], 1);

    let r = post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"context": ctx})),
        &a,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json();
    assert_eq!(first["context"], ctx.as_str());
    assert_eq!(r.headers[CONTEXT_HEADER], ctx.as_str());

    // Second turn through the header, streamed, with usage.
    let r = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "And of Italy?"}], "max_tokens": 8,
               "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        &[a[0], (CONTEXT_HEADER, &ctx)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers[CONTEXT_HEADER], ctx.as_str());
    let events = r.events();
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["context"], ctx.as_str());
    let u = &usage["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prefilled = usage["timings"]["prefilled_tokens"].as_u64().unwrap();
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached >= first_prompt, "{usage} after {first}");
    assert!(prefilled < prompt, "{usage}");
    assert_eq!(prefilled, prompt - cached);

    // The context now holds both turns and both replies.
    let r = get(&app, &format!("/v1/contexts/{ctx}"), &a).await;
    assert_eq!(r.json()["messages"], 5);
    let list = get(&app, "/v1/contexts", &a).await.json();
    assert_eq!(list["object"], "list");
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == ctx.as_str()));

    // A fork continues independently; text completions refuse a chat context.
    let fork = post(&app, &format!("/v1/contexts/{ctx}/fork"), json!({}), &a)
        .await
        .json();
    let fork_id = fork["id"].as_str().unwrap();
    assert_ne!(fork_id, ctx);
    assert_eq!(
        fork["tokens"],
        get(&app, &format!("/v1/contexts/{ctx}"), &a).await.json()["tokens"]
    );
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "context": fork_id, "max_tokens": 2}),
        &a,
    )
    .await
    .assert_error(400, "invalid_request_error");
    let r = call_raw(
        &app,
        Method::DELETE,
        &format!("/v1/contexts/{fork_id}"),
        Vec::new(),
        &a,
    )
    .await;
    assert_eq!(r.json()["deleted"], true);
    get(&app, &format!("/v1/contexts/{fork_id}"), &a)
        .await
        .assert_error(404, "not_found_error");
}

#[tokio::test]
async fn http_apps_cannot_see_each_others_contexts() {
    let _order = shared().await;
    let app = keyed_app();
    let a = [("authorization", "Bearer key-a")];
    let b = [("authorization", "Bearer key-b")];
    let ctx = post(&app, "/v1/contexts", json!({}), &a).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    get(&app, &format!("/v1/contexts/{ctx}"), &b)
        .await
        .assert_error(404, "not_found_error");
    post(
        &app,
        "/v1/chat/completions",
        chat_body(json!({"context": ctx})),
        &b,
    )
    .await
    .assert_error(404, "not_found_error");
    post(&app, &format!("/v1/contexts/{ctx}/fork"), json!({}), &b)
        .await
        .assert_error(404, "not_found_error");
    call_raw(
        &app,
        Method::DELETE,
        &format!("/v1/contexts/{ctx}"),
        Vec::new(),
        &b,
    )
    .await
    .assert_error(404, "not_found_error");
    let list = get(&app, "/v1/contexts", &b).await.json();
    assert!(!list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == ctx.as_str()));
    // Still there for its owner.
    assert_eq!(
        get(&app, &format!("/v1/contexts/{ctx}"), &a).await.status,
        200
    );
    // The anonymous app of an open door is a third app.
    get(
        &router(service(), HttpOptions::default()),
        &format!("/v1/contexts/{ctx}"),
        &[],
    )
    .await
    .assert_error(404, "not_found_error");
}

fn cancelled_total() -> u64 {
    service()
        .metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("llmsd_errors_total{code=\"Cancelled\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Over a real socket: a client that goes away mid-stream cancels its request.
#[tokio::test]
async fn http_disconnect_cancels_the_stream() {
    let _order = shared().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        service(),
        listener,
        HttpOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Counting on: thousands of tokens unless cancelled.
    let body = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 4000, "temperature": 0,
                      "stream": true})
    .to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while String::from_utf8_lossy(&got).matches("data: ").count() < 3 {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let before = cancelled_total();
    drop(s);
    let t0 = std::time::Instant::now();
    while cancelled_total() == before {
        assert!(t0.elapsed().as_secs() < 20, "the request was not cancelled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
