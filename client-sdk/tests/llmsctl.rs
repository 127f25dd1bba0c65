//! `llmsctl` against a running `llmsd serve`: every verb, as tables and as JSON; admin rules
//! (a non-admin, run as nobody with setpriv, sees only its own apps and is refused admin
//! verbs and other users' apps); and memory pressure simulated through the files the
//! daemon's watcher reads, shrinking the KV budget and growing it back.
//!
//! The daemon binary is the workspace's `llmsd`, built beside `llmsctl` by
//! `cargo test --workspace` (alone: `cargo build --release -p llmsd` first).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client-sdk/ has a parent")
        .to_path_buf()
}

fn llmsd_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_llmsctl")).with_file_name("llmsd");
    assert!(
        p.is_file(),
        "{} is missing: cargo test --workspace builds it (or cargo build --release -p llmsd)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `llmsd serve` in a directory other users can reach (its socket is 0666).
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    http: String,
}

impl Daemon {
    fn start(extra: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("llmsd.sock");
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let model = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            model.is_file(),
            "{} missing: run scripts/fetch-models",
            model.display()
        );
        let http = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(llmsd_bin())
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--http", &http, "--bus", "off", "--threads", "2"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("LLMSD_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("llmsd serve starts");
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("llmsd ready") {
                break;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("llmsd serve exited with {st}:\n{text}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "not ready:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon {
            child,
            dir,
            socket,
            http,
        }
    }

    /// `llmsctl --socket S ARGS` as root, or as nobody; (success, stdout, stderr).
    fn ctl_as(&self, nobody: bool, args: &[&str], stdin: &str) -> (bool, String, String) {
        let ctl = env!("CARGO_BIN_EXE_llmsctl");
        let mut cmd = if nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", ctl]);
            c
        } else {
            Command::new(ctl)
        };
        let mut child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("LLMSD_APP")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("llmsctl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs as root and expects success; returns stdout.
    fn ctl(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.ctl_as(false, args, "");
        assert!(ok, "llmsctl {args:?} failed: {err}");
        out
    }

    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// A new chat context of `app` (as root or nobody) after one short turn; its id.
    fn chat(&self, nobody: bool, app: &str, text: &str) -> String {
        let (ok, _, err) = self.ctl_as(
            nobody,
            &["--app", app, "chat", "--max-tokens", "4"],
            &format!("{text}\n"),
        );
        assert!(ok, "chat failed: {err}");
        let id = err
            .split_whitespace()
            .find(|w| w.starts_with("ctx-"))
            .unwrap_or_else(|| panic!("no context id in {err}"));
        id.to_string()
    }

    /// Continues a context for one turn; (prompt tokens, cached tokens).
    fn continue_chat(&self, app: &str, id: &str) -> (u64, u64) {
        let (ok, _, err) = self.ctl_as(
            false,
            &[
                "--app",
                app,
                "chat",
                "--context",
                id,
                "--max-tokens",
                "2",
                "--verbose",
            ],
            "And then?\n",
        );
        assert!(ok, "chat failed: {err}");
        let nums: Vec<u64> = err
            .split(['[', ' ', ','])
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1])
    }

    fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(&self.http).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("daemon.log"));
            eprintln!("daemon log:\n{}", log.unwrap_or_default());
        }
    }
}

fn owners(list: &Value) -> Vec<String> {
    let mut o: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["owner"].as_str().unwrap().to_string())
        .collect();
    o.sort();
    o
}

#[test]
fn every_verb_against_a_running_daemon_with_admin_rules() {
    let t0 = Instant::now();
    let d = Daemon::start(&["--memory-budget-mib", "400"], &[]);
    let notes1 = d.chat(false, "notes", "Name a colour.");
    let notes2 = d.chat(false, "notes", "Name a fruit.");
    let mail = d.chat(false, "mail", "Say hello.");

    // status: the memory budget split, the KV store, as a table and as JSON.
    let s = d.ctl_json(&["status"]);
    for key in [
        "kv_budget_bytes",
        "kv_resident_bytes",
        "kv_disk_bytes",
        "rss_bytes",
    ] {
        assert!(s[key].is_u64(), "{key} in {s}");
    }
    assert_eq!(s["memory_budget_bytes"], 400 * MIB);
    let kv_budget = s["kv_budget_bytes"].as_u64().unwrap();
    assert!(
        kv_budget < 400 * MIB - s["model_bytes"].as_u64().unwrap(),
        "{s}"
    );
    assert!(s["rss_bytes"].as_u64().unwrap() > 50 * MIB, "{s}");
    assert!(s["kv_resident_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["kv_disk_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["contexts"], 3);
    assert_eq!(s["admin"], true);
    // Three calls ran: the engine used energy, measured by the source it names.
    assert!(s["energy_j"].as_f64().unwrap() > 0.0, "{s}");
    assert!(
        ["rapl", "cpu"].contains(&s["energy_source"].as_str().unwrap()),
        "{s}"
    );
    let human = d.ctl(&["status"]);
    assert!(
        human.contains("of a 400.0 MiB budget")
            && human.contains("you are an admin")
            && human.contains(" J ("),
        "{human}"
    );

    // apps and contexts: everything for root; --app narrows by name or owner.
    let apps = d.ctl_json(&["apps"]);
    assert_eq!(owners(&apps), ["u0:mail", "u0:notes"]);
    let notes_app = apps
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["owner"] == "u0:notes")
        .unwrap();
    assert_eq!(notes_app["contexts"], 2);
    assert_eq!(notes_app["uid"], 0);
    assert!(d.ctl(&["apps"]).contains("u0:notes"));
    assert_eq!(d.ctl_json(&["contexts"]).as_array().unwrap().len(), 3);
    let notes = d.ctl_json(&["--app", "notes", "contexts"]);
    assert_eq!(owners(&notes), ["u0:notes", "u0:notes"]);
    let table = d.ctl(&["--app", "u0:notes", "contexts"]);
    assert!(
        table.starts_with("OWNER") && table.contains(&notes1) && !table.contains(&mail),
        "{table}"
    );

    // chunks: one row per 16 tokens (the last partial), covering the context.
    let tokens = notes
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == notes1.as_str())
        .unwrap()["tokens"]
        .as_u64()
        .unwrap();
    let chunks = d.ctl_json(&["--app", "notes", "chunks", &notes1]);
    let chunks = chunks.as_array().unwrap();
    assert_eq!(chunks.len() as u64, tokens.div_ceil(16));
    let sum: u64 = chunks.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert_eq!(sum, tokens);
    assert!(chunks.iter().all(|c| c["location"] == "both"), "{chunks:?}");
    assert!(d
        .ctl(&["--app", "notes", "chunks", &notes1])
        .contains("PRECISION"));

    // evict one context: out of memory, on disk, and nothing lost on the next turn.
    let r = d.ctl_json(&["--app", "notes", "evict", &notes1]);
    assert_eq!(r["contexts"], 1);
    assert!(r["freed_bytes"].as_u64().unwrap() > 0, "{r}");
    let chunks = d.ctl_json(&["--app", "notes", "chunks", &notes1]);
    assert!(
        chunks
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["location"] == "disk"),
        "{chunks}"
    );
    let (prompt, cached) = d.continue_chat("notes", &notes1);
    // The last generated token may be re-tokenized with the turn's end.
    assert!(cached >= tokens - 1, "{cached} of {tokens} tokens kept");
    assert!(prompt > cached);

    // evict a whole app; the table form says what it freed.
    let out = d.ctl(&["--app", "mail", "evict"]);
    assert!(out.starts_with("evicted 1 context,"), "{out}");
    assert_eq!(
        d.ctl_json(&["--app", "mail", "contexts"])[0]["resident_bytes"],
        0
    );

    // compact: everything idle leaves memory.
    let c = d.ctl_json(&["compact"]);
    assert!(c["evicted_contexts"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(c["kv_resident_bytes"], 0);
    assert_eq!(d.ctl_json(&["status"])["kv_resident_bytes"], 0);

    // top: one refresh as a table, then JSON lines.
    let top = d.ctl(&["top", "--once"]);
    assert!(top.contains("pressure") && top.contains("OWNER"), "{top}");
    let lines = d.ctl(&["--json", "top", "--iterations", "2", "--interval-ms", "50"]);
    let lines: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1]["status"]["kv_budget_bytes"].is_u64());
    assert_eq!(lines[1]["apps"].as_array().unwrap().len(), 2);

    // A non-admin: its own app only, refused admin verbs and other users' apps.
    let (ok, out, err) = d.ctl_as(true, &["--json", "status"], "");
    assert!(ok, "{err}");
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["admin"], false);
    let mine = d.chat(true, "mine", "Hi.");
    let (ok, out, _) = d.ctl_as(true, &["--json", "apps"], "");
    assert!(ok);
    let apps: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(owners(&apps), ["u65534:mine"]);
    let (ok, out, _) = d.ctl_as(true, &["--json", "contexts"], "");
    assert!(ok);
    let ctxs: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(owners(&ctxs), ["u65534:mine"]);
    assert_eq!(ctxs[0]["id"], mine.as_str());
    for args in [
        vec!["compact"],
        vec!["--app", "u0:notes", "contexts"],
        vec!["--app", "u0:notes", "evict"],
        vec!["--app", "u0:notes", "evict", &notes2],
        vec!["--app", "u0:notes", "chunks", &notes2],
        vec!["--app", "u0:notes", "delete", &notes2],
    ] {
        let (ok, _, err) = d.ctl_as(true, &args, "");
        assert!(!ok && err.contains("PermissionDenied"), "{args:?}: {err}");
    }
    // Another user's context id under its own app name is simply not found.
    let (ok, _, err) = d.ctl_as(true, &["--app", "notes", "chunks", &notes2], "");
    assert!(!ok && err.contains("NotFound"), "{err}");
    // Its own contexts it manages.
    let (ok, out, err) = d.ctl_as(true, &["--app", "mine", "--json", "evict", &mine], "");
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["contexts"], 1);
    // The admin sees it too, and deletes another owner's context by owner.
    assert_eq!(
        owners(&d.ctl_json(&["apps"])),
        ["u0:mail", "u0:notes", "u65534:mine"]
    );
    let out = d.ctl(&["--app", "u65534:mine", "delete", &mine]);
    assert_eq!(out.trim(), format!("deleted {mine}"));
    d.ctl(&["--app", "notes", "delete", &notes2]);
    assert_eq!(d.ctl_json(&["contexts"]).as_array().unwrap().len(), 2);
    println!("llmsctl verbs: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Polls `llmsctl status --json` until `done` holds (30 s at most); every status seen.
fn wait_status(d: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    loop {
        let s = d.ctl_json(&["status"]);
        seen.push(s.clone());
        if done(&s) {
            return seen;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: last status {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn memory_pressure_shrinks_the_kv_budget_and_it_grows_back() {
    let t0 = Instant::now();
    let files = tempfile::tempdir().unwrap();
    let psi = files.path().join("pressure-memory");
    let meminfo = files.path().join("meminfo");
    let write_psi = |some: f64| {
        std::fs::write(
            &psi,
            format!(
                "some avg10={some:.2} avg60=0.00 avg300=0.00 total=1\n\
                 full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            ),
        )
        .unwrap()
    };
    let write_meminfo = |available_kib: u64| {
        std::fs::write(
            &meminfo,
            format!("MemTotal: 8000000 kB\nMemFree: 1000 kB\nMemAvailable: {available_kib} kB\n"),
        )
        .unwrap()
    };
    write_psi(0.0);
    write_meminfo(6_000_000);
    let config = files.path().join("llmsd.toml");
    std::fs::write(
        &config,
        "[memory]\npressure = true\nmin_kv_mib = 1\ninterval_ms = 100\n",
    )
    .unwrap();
    let d = Daemon::start(
        &[
            "--kv-budget-mib",
            "32",
            "--config",
            config.to_str().unwrap(),
        ],
        &[
            ("LLMSD_PSI_PATH", psi.as_path()),
            ("LLMSD_MEMINFO_PATH", meminfo.as_path()),
        ],
    );
    let ids: Vec<String> = ["Name a colour.", "Name a fruit.", "Name a tree."]
        .iter()
        .map(|t| d.chat(false, "notes", t))
        .collect();
    let calm = wait_status(&d, "watcher running", |s| s["pressure_source"] == "psi");
    let s = calm.last().unwrap();
    assert_eq!(s["kv_budget_bytes"], 32 * MIB);
    assert_eq!(s["pressure"], "none");
    let resident = s["kv_resident_bytes"].as_u64().unwrap();
    assert!(resident > MIB, "{s}");

    // Severe (PSI some avg10 ≥ 40): the budget drops to its minimum and the store evicts.
    write_psi(55.0);
    let seen = wait_status(&d, "severe", |s| s["kv_budget_bytes"] == MIB);
    let s = seen.last().unwrap();
    assert_eq!(s["pressure"], "severe");
    assert!(s["kv_resident_bytes"].as_u64().unwrap() <= MIB, "{s}");
    assert_eq!(s["kv_budget_max_bytes"], 32 * MIB);
    let m = d.metrics();
    assert!(
        m.contains("\nllmsd_memory_pressure 2\n")
            && m.contains("\nllmsd_kv_budget_bytes 1048576\n"),
        "{m}"
    );
    assert!(!m.contains("\nllmsd_rss_bytes 0\n"), "{m}");

    // Moderate: back up to half, a step per tick.
    write_psi(15.0);
    wait_status(&d, "moderate", |s| {
        s["kv_budget_bytes"] == 16 * MIB && s["pressure"] == "moderate"
    });
    // None: back to the configured budget, through 24 MiB.
    write_psi(0.0);
    let seen = wait_status(&d, "regrown", |s| s["kv_budget_bytes"] == 32 * MIB);
    assert!(
        seen.iter().any(|s| s["kv_budget_bytes"] == 24 * MIB),
        "no intermediate step: {seen:?}"
    );

    // Without PSI, available memory decides: under 5% of the total is severe.
    std::fs::remove_file(&psi).unwrap();
    write_meminfo(200_000);
    let seen = wait_status(&d, "meminfo severe", |s| s["kv_budget_bytes"] == MIB);
    assert_eq!(seen.last().unwrap()["pressure_source"], "meminfo");
    write_meminfo(6_000_000);
    wait_status(&d, "meminfo calm", |s| {
        s["kv_budget_bytes"] == 32 * MIB && s["pressure"] == "none"
    });

    // Nothing was lost: the evicted contexts continue from their KV on disk.
    let before = d.ctl_json(&["--app", "notes", "contexts"]);
    let tokens = before
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == ids[0].as_str())
        .unwrap()["tokens"]
        .as_u64()
        .unwrap();
    let (_, cached) = d.continue_chat("notes", &ids[0]);
    assert!(cached >= tokens - 1, "{cached} of {tokens} tokens kept");
    println!("memory pressure: {:.1} s", t0.elapsed().as_secs_f64());
}
