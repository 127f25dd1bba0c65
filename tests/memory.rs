//! The memory budget end to end: the RSS of a context-switch run stays within the model and
//! its KV budget, and a total budget that leaves too little for the KV cache is refused.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: f64 = 1048576.0;

/// VmRSS of a process, in bytes.
fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[test]
fn rss_stays_within_the_model_and_the_kv_budget_during_context_switches() {
    let model = model(SMOLLM2);
    let model_bytes = std::fs::metadata(&model).unwrap().len();
    let budget_mib = 24u64;
    let limit = model_bytes + (budget_mib << 20) + (64 << 20);
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .args(["bench", "switch", "--model"])
        .arg(&model)
        .args([
            "--threads",
            "2",
            "--policy",
            "llms",
            "--contexts",
            "16",
            "--tokens",
            "1024",
            "--kv-budget-mib",
            &budget_mib.to_string(),
            "--switches",
            "6",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("llmsd bench switch runs");
    let pid = child.id();
    let t0 = Instant::now();
    let mut sampled_peak = 0u64;
    let mut samples = 0usize;
    while child.try_wait().unwrap().is_none() {
        if let Some(rss) = vm_rss(pid) {
            sampled_peak = sampled_peak.max(rss);
            samples += 1;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "bench switch still running after 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    // VmHWM, read by the process itself at the end: covers what 20 ms sampling may miss.
    let hwm = (report["peak_rss_mib"].as_f64().expect("peak_rss_mib") * MIB) as u64;
    let peak = hwm.max(sampled_peak);
    println!(
        "bench switch (16 contexts x 1024 tokens, {budget_mib} MiB KV budget): {:.1} s, \
         {samples} RSS samples, sampled peak {:.1} MiB, VmHWM {:.1} MiB, KV resident peak \
         {:.1} MiB; limit model {:.1} + {budget_mib} + 64 = {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        sampled_peak as f64 / MIB,
        hwm as f64 / MIB,
        report["resident_peak_mib"].as_f64().unwrap(),
        model_bytes as f64 / MIB,
        limit as f64 / MIB,
    );
    assert!(samples > 10, "too few RSS samples ({samples})");
    assert!(
        report["resident_peak_mib"].as_f64().unwrap() <= budget_mib as f64,
        "{report}"
    );
    assert!(
        peak < limit,
        "peak RSS {:.1} MiB is over the limit of {:.1} MiB",
        peak as f64 / MIB,
        limit as f64 / MIB
    );
}

/// Runs `llmsd serve` expecting it to refuse to start; returns its log.
fn serve_refused(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .arg("serve")
        .arg("--model")
        .arg(model(SMOLLM2))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--http", "off", "--bus", "off", "--threads", "2"])
        .args(extra)
        .output()
        .expect("llmsd runs");
    assert!(!out.status.success(), "llmsd serve {extra:?} started");
    assert!(!dir.path().join("s.sock").exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_memory_budget_the_model_does_not_fit_in_is_refused_at_start() {
    // The model file alone is 94 MiB.
    let err = serve_refused(&["--memory-budget-mib", "120"]);
    assert!(
        err.contains("memory budget of 120 MiB leaves") && err.contains("min_kv_mib"),
        "{err}"
    );
    let err = serve_refused(&["--memory-budget-mib", "400", "--kv-budget-mib", "380"]);
    assert!(err.contains("exceed the memory budget of 400 MiB"), "{err}");
}
