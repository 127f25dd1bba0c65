//! Helpers shared by the end-to-end tests: where the models and reference files are, and how
//! to run the real `llmsd` binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon/ has a parent")
        .to_path_buf()
}

/// A model file from `models/`; fails the test (never skips) when it is missing.
pub fn model(name: &str) -> PathBuf {
    let p = repo_root().join("models").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models",
        p.display()
    );
    p
}

/// llama.cpp's reference outputs: `$LLMSD_REFERENCE_DIR`, else `../shared/reference`.
pub fn reference(name: &str) -> serde_json::Value {
    let dir = std::env::var_os("LLMSD_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/reference"));
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("reference file {} unreadable: {e}", p.display()));
    serde_json::from_str(&text).expect("reference file is JSON")
}

/// Runs `llmsd ARGS`, asserts success and returns stdout.
pub fn llmsd(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .args(args)
        .output()
        .expect("llmsd runs");
    assert!(
        out.status.success(),
        "llmsd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs `llmsd ARGS` expecting failure; returns stderr.
pub fn llmsd_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .args(args)
        .output()
        .expect("llmsd runs");
    assert!(
        !out.status.success(),
        "llmsd {args:?} unexpectedly succeeded"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("bad JSON {s:?}: {e}"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}
