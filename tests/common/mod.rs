//! Helpers shared by the end-to-end tests: where the models and reference files are, and how
//! to run the real `llmsd` binary.
#![allow(dead_code)]

pub mod bus;
pub mod http;
pub mod probe;

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

/// A single-threaded runtime for a test's SDK calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Greedy generation of at most `max_tokens` tokens.
pub fn greedy(max_tokens: u32) -> llmsd_client::GenerationParams {
    llmsd_client::GenerationParams {
        max_tokens,
        ..llmsd_client::GenerationParams::default()
    }
}

/// A running `llmsd serve` with its own socket and state directory, stopped (SIGTERM, then
/// SIGKILL) when dropped.
pub struct Daemon {
    child: Option<std::process::Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    /// `127.0.0.1:PORT` when the HTTP door is on.
    pub http: Option<String>,
    pub log: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// A command the daemon runs under (`sh -c '...; exec "$0" "$@"'`), or none.
    wrapper: Vec<String>,
}

/// A TCP port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Daemon {
    /// Starts a daemon in a new temporary directory: `--http` on a free port when `http`,
    /// D-Bus off unless `extra` says otherwise.
    pub fn start(http: bool, extra: &[&str]) -> Daemon {
        Self::start_env(http, extra, &[])
    }

    pub fn start_env(http: bool, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_full(None, http, extra, env)
    }

    /// Like [`Self::start`], keeping contexts in `state` (e.g. a small tmpfs).
    pub fn start_with_state(state: PathBuf, http: bool, extra: &[&str]) -> Daemon {
        Self::start_full(Some(state), http, extra, &[])
    }

    /// Like [`Self::start_env`] with the HTTP door on `http` (any address, e.g. `0.0.0.0:PORT`;
    /// `off` for none) and the daemon run under `wrapper` (a command that ends by exec'ing its
    /// arguments, e.g. `["sh", "-c", "umask 000 && exec \"$0\" \"$@\""]`).
    pub fn start_custom(
        http: &str,
        wrapper: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut d = Self::unstarted(None, false, extra, env);
        d.http = (http != "off").then(|| http.to_string());
        d.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        d.launch();
        d
    }

    fn start_full(
        state: Option<PathBuf>,
        http: bool,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut d = Self::unstarted(state, http, extra, env);
        d.launch();
        d
    }

    fn unstarted(
        state: Option<PathBuf>,
        http: bool,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("llmsd-e2e-")
            .tempdir()
            .expect("temp dir")
            .keep();
        Daemon {
            child: None,
            socket: dir.join("llmsd.sock"),
            state: state.unwrap_or_else(|| dir.join("state")),
            log: dir.join("daemon.log"),
            http: http.then(|| format!("127.0.0.1:{}", free_port())),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: Vec::new(),
        }
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_llmsd"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_llmsd")),
        };
        cmd.arg("serve")
            .arg("--model")
            .arg(model(SMOLLM2))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--http")
            .arg(self.http.as_deref().unwrap_or("off"))
            .arg("--threads")
            .arg("2");
        if !self.extra.iter().any(|a| a == "--bus") {
            cmd.args(["--bus", "off"]);
        }
        // Only a test's own configuration: none unless its env names a directory.
        cmd.env("XDG_CONFIG_HOME", &self.dir);
        // A test's own LLMSD_LOG (e.g. debug) wins over the default.
        cmd.args(&self.extra)
            .env("LLMSD_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let before = std::fs::read_to_string(&self.log).map_or(0, |s| s.len());
        self.child = Some(cmd.spawn().expect("llmsd serve starts"));
        let t0 = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text
                .get(before..)
                .is_some_and(|t| t.contains("llmsd ready"))
            {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("llmsd serve exited with {st} before ready:\n{text}");
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(120),
                "llmsd serve not ready after 120 s:\n{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait: the clean shutdown path.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid we own and a valid signal number.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = std::time::Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > std::time::Duration::from_secs(30) {
                    let _ = c.kill();
                    panic!("llmsd did not stop within 30 s of SIGTERM");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same daemon again (same socket, state and flags).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// The daemon's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
