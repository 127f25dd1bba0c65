//! Persistent contexts through the real binary: `llmsd ctx` across processes, kill -9 during
//! swap-out, `llmsd bench switch` for every policy, and perplexity under KV compression.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TEXT_A: &str = "The GNU General Public License is a free, copyleft license for software \
and other kinds of works. The licenses for most software and other practical works are designed \
to take away your freedom to share and change the works.";
const TEXT_B: &str = " By contrast, the GNU General Public License is intended to guarantee your \
freedom to share and change all versions of a program, to make sure it remains free software for \
all its users.";

fn ctx(dir: &Path, args: &[&str]) -> Value {
    let d = dir.to_str().unwrap();
    let mut all = vec!["ctx", "--state-dir", d, "--json"];
    all.extend_from_slice(args);
    let out = llmsd(&all);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// Greedy continuation of a fork of `id` (the context itself is left as it is).
fn continuation(dir: &Path, id: &str) -> String {
    let fork = id_of(&ctx(dir, &["fork", id]));
    let out = ctx(
        dir,
        &["generate", &fork, "--prompt", " It", "--max-tokens", "8"],
    );
    ctx(dir, &["delete", &fork]);
    out["text"].as_str().unwrap().to_string()
}

#[test]
fn contexts_persist_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let id = id_of(&ctx(d, &["create", "--text", TEXT_A]));
    let before = ctx(d, &["tokens", &id]);
    ctx(d, &["append", &id, TEXT_B]);
    let after = ctx(d, &["tokens", &id]);
    assert!(after.as_array().unwrap().len() > before.as_array().unwrap().len());
    let list = ctx(d, &["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    let chunks = ctx(d, &["chunks", &id]);
    let n = after.as_array().unwrap().len();
    assert_eq!(chunks.as_array().unwrap().len(), n.div_ceil(16));
    // The same continuation every time: read back bit for bit.
    let c1 = continuation(d, &id);
    let c2 = continuation(d, &id);
    assert_eq!(c1, c2);
    assert!(!c1.is_empty());
    // Another app does not see it.
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .args([
            "ctx",
            "--state-dir",
            d.to_str().unwrap(),
            "--app",
            "other",
            "tokens",
            &id,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no context"));
}

/// kill -9 while an append's chunks and manifest are being written (each I/O job slowed down by
/// the fault-injection knob), then restart: the context is there, holds either the old or the
/// new tokens, and continues exactly as a run without the crash.
#[test]
fn kill_during_swap_out_loses_nothing() {
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let id = id_of(&ctx(d, &["create", "--text", TEXT_A]));
        let old_tokens = ctx(d, &["tokens", &id]);
        let first = continuation(d, &id);
        let files_before = count_kv_files(d);
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmsd"))
            .args([
                "ctx",
                "--state-dir",
                d.to_str().unwrap(),
                "append",
                &id,
                TEXT_B,
            ])
            .env("LLMSD_FAULT_IO_DELAY_MS", "150")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until swap-out has started writing, then kill at a varying point inside it.
        let t0 = Instant::now();
        while count_kv_files(d) <= files_before && t0.elapsed() < Duration::from_secs(60) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(40 + 170 * round));
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: append finished before the kill"
        );

        let list = ctx(d, &["list"]);
        assert_eq!(list.as_array().unwrap().len(), 1, "round {round}: {list}");
        let tokens = ctx(d, &["tokens", &id]);
        let landed = tokens != old_tokens;
        eprintln!("round {round}: killed during swap-out; append landed: {landed}");
        let now = continuation(d, &id);
        // The same operations without a crash, in a fresh directory.
        let control = tempfile::tempdir().unwrap();
        let c = control.path();
        let cid = id_of(&ctx(c, &["create", "--text", TEXT_A]));
        let cfirst = continuation(c, &cid);
        assert_eq!(first, cfirst);
        if landed {
            ctx(c, &["append", &cid, TEXT_B]);
            assert_eq!(tokens, ctx(c, &["tokens", &cid]), "round {round}");
        } else {
            assert_eq!(tokens, old_tokens);
        }
        assert_eq!(
            now,
            continuation(c, &cid),
            "round {round} (append landed: {landed})"
        );
    }
}

fn count_kv_files(dir: &Path) -> usize {
    let mut n = 0;
    for app in std::fs::read_dir(dir.join("apps"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(app.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".kv") || name.ends_with(".tmp") {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn bench_switch_reports_every_policy_within_the_budget() {
    for policy in ["recompute", "swap-whole", "paged", "paged-int8", "llms"] {
        let out = llmsd(&[
            "bench",
            "switch",
            "--policy",
            policy,
            "--contexts",
            "3",
            "--tokens",
            "64",
            "--kv-budget-mib",
            "5",
            "--switches",
            "5",
            "--json",
        ]);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["policy"], policy);
        for key in [
            "restore_mean_ms",
            "restore_median_ms",
            "restore_p90_ms",
            "ttft_median_ms",
            "resident_peak_mib",
        ] {
            assert!(
                v[key].as_f64().is_some_and(|x| x >= 0.0),
                "{policy}: {key} in {v}"
            );
        }
        assert!(
            v["resident_peak_mib"].as_f64().unwrap() <= 5.0,
            "{policy}: {v}"
        );
        assert!(v["ttft_median_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_switch_refuses_a_context_larger_than_the_budget() {
    let err = llmsd_fails(&[
        "bench",
        "switch",
        "--contexts",
        "1",
        "--tokens",
        "512",
        "--kv-budget-mib",
        "1",
        "--switches",
        "1",
    ]);
    assert!(err.contains("KV budget"), "{err}");
}

fn ppl(model: &str, policy: Option<&str>) -> f64 {
    let m = common::model(model);
    let mut args = vec![
        "perplexity".to_string(),
        "--model".into(),
        m.to_str().unwrap().into(),
        "--file".into(),
        "/usr/share/common-licenses/GPL-3".into(),
        "--tokens".into(),
        "1024".into(),
        "--json".into(),
    ];
    if model == GEMMA3 {
        args.push("--bos".into());
    }
    if let Some(p) = policy {
        args.push("--kv-policy".into());
        args.push(p.into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let v: Value = serde_json::from_str(llmsd(&refs).trim()).unwrap();
    v["ppl"].as_f64().unwrap()
}

/// The acceptance bound: at the default ratio (4 bits on average), perplexity within 2% of
/// an f16 KV cache, for both models.
#[test]
fn default_compression_keeps_perplexity_within_two_percent() {
    for model in [SMOLLM2, GEMMA3] {
        let f16 = ppl(model, Some("paged"));
        let llms = ppl(model, Some("llms"));
        let rel = (llms - f16) / f16;
        eprintln!(
            "{model}: f16 {f16:.4}, llms {llms:.4} ({:+.2}%)",
            rel * 100.0
        );
        assert!(rel.abs() < 0.02, "{model}: llms {llms} vs f16 {f16}");
    }
}
