//! End-to-end tests of the OpenAI-compatible HTTP door of the real `llmsd serve`: the official
//! `openai` Python package (installed by this test into a venv under target/) doing chat,
//! streaming, completions and the context extension; the HTTP and socket doors agreeing on
//! greedy output; a context continued over HTTP across a daemon restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::http::http;
use common::*;
use serde_json::json;

const KEY_A: &str = "sk-llmsd-test-app-a";
const KEY_B: &str = "sk-llmsd-test-app-b";

/// A config file with two apps' keys; anonymous callers refused.
fn keys_config(dir: &Path) -> PathBuf {
    let p = dir.join("llmsd.toml");
    std::fs::write(
        &p,
        format!(
            "http_allow_anonymous = false\n\n[http_keys]\n\"{KEY_A}\" = \"app-a\"\n\
             \"{KEY_B}\" = \"app-b\"\n"
        ),
    )
    .unwrap();
    p
}

/// A venv under target/ with the `openai` package; pip failing fails the test.
fn openai_python() -> PathBuf {
    let venv = repo_root().join("target").join("openai-venv");
    let python = venv.join("bin").join("python");
    let ready = python.is_file()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(st.success(), "python3 -m venv failed");
        let out = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .output()
            .expect("pip runs");
        assert!(
            out.status.success(),
            "pip install openai failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    python
}

#[test]
fn the_openai_python_package_works_against_the_http_door() {
    let python = openai_python();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = keys_config(conf_dir.path());
    let d = Daemon::start(true, &["--config", conf.to_str().unwrap()]);
    let addr = d.http.clone().expect("the HTTP door is on");
    let out = Command::new(&python)
        .arg(repo_root().join("tests").join("openai_client.py"))
        .arg(format!("http://{addr}"))
        .args([KEY_A, KEY_B])
        .output()
        .expect("the Python client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai_client.py failed:\n{stdout}\n{}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let seen = json(stdout.lines().last().expect("a summary line"));
    assert_eq!(seen["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(seen["chat"], seen["chat_stream"]);
    let t = &seen["second_turn"];
    assert!(t["cached_tokens"].as_u64().unwrap() > 0, "{seen}");
    assert_eq!(
        t["prefilled_tokens"].as_u64().unwrap(),
        t["prompt_tokens"].as_u64().unwrap() - t["cached_tokens"].as_u64().unwrap()
    );
}

#[test]
fn http_and_socket_doors_agree_and_contexts_survive_a_restart() {
    let mut d = Daemon::start(true, &[]);
    let addr = d.http.clone().expect("the HTTP door is on");
    let (st, _, health) = http(&addr, "GET", "/health", None, None);
    assert_eq!(st, 200);
    assert_eq!(health["status"], "ok");
    // Prometheus text is not JSON: read it raw.
    let r = common::http::request(&addr, "GET", "/metrics", None, b"");
    let (st, head, metrics) = (r.status.to_string(), r.head, r.body);
    assert_eq!(st, "200");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(metrics.contains("llmsd_prompts_total"), "{metrics}");

    // The same greedy answer from both doors (anonymous over HTTP).
    let q = "What is the capital of France?";
    let (st, _, v) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(
            &json!({"messages": [{"role": "user", "content": q}], "max_tokens": 16,
                     "temperature": 0}),
        ),
    );
    assert_eq!(st, 200, "{v}");
    let over_http = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let over_socket = rt.block_on(async {
        let c = llmsd_client::Client::connect(&d.socket, "cmp")
            .await
            .unwrap();
        c.chat_once(
            q,
            llmsd_client::GenerationParams {
                max_tokens: 16,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .text
    });
    assert_eq!(over_http, over_socket);

    // A context made over HTTP continues after a restart with only the new turn prefilled.
    let (st, head, ctx) = http(
        &addr,
        "POST",
        "/v1/contexts",
        None,
        Some(&json!({"system": "You are a terse assistant."})),
    );
    assert_eq!(st, 200, "{ctx}");
    let id = ctx["id"].as_str().unwrap().to_string();
    assert!(head.contains(&format!("x-llmsd-context: {id}")), "{head}");
    let turn = |content: &str| {
        json!({"messages": [{"role": "user", "content": content}], "max_tokens": 8,
               "temperature": 0, "context": id})
    };
    let (st, _, one) = http(&addr, "POST", "/v1/chat/completions", None, Some(&turn(q)));
    assert_eq!(st, 200, "{one}");
    d.restart();
    let (st, _, two) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(&turn("And of Italy?")),
    );
    assert_eq!(st, 200, "{two}");
    assert_eq!(two["context"], id.as_str());
    let cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= one["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{two} after {one}"
    );
    assert_eq!(
        two["timings"]["prefilled_tokens"].as_u64().unwrap(),
        two["usage"]["prompt_tokens"].as_u64().unwrap() - cached
    );
    // Bad JSON through the real server: OpenAI's error body.
    let r = common::http::request(&addr, "POST", "/v1/chat/completions", None, b"{oops");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}
