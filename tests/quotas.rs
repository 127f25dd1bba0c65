//! End-to-end tests of quotas per app and energy accounting, against the real `llmsd serve`
//! and its three doors (the Unix socket, D-Bus on a private dbus-daemon, HTTP):
//!
//! - every quota, driven past on every door, gives its typed error and a retry-after
//!   (`QuotaExceeded`; `BackgroundBlocked` for background work), at once;
//! - quotas are set with `llmsctl quota set` as root (an admin) and with `quota_set` over the
//!   socket; another uid may read but not set them; config defaults apply underneath;
//! - the energy of each response, context and app adds up to the total the daemon measured,
//!   which agrees with the CPU time the daemon used; a fake power_supply tree puts the
//!   machine on battery; quotas and usage survive a restart.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::bus::PrivateBus;
use common::http::{metrics, sample};
use common::*;
use llmsd::dbus::client::Llm1ClientProxy;
use llmsd_client::{
    ChatMessage, Client, ClientError, Completion, ErrorCode, GenerationParams, Priority,
    PromptInput, PromptRequest, Quota, QuotaReport, TokenStream,
};
use serde_json::{json, Value};

/// `llmsctl`, built if needed: `cargo test -p llmsd` builds only this package's binaries
/// (a no-op when it is fresh).
fn llmsctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(env!("CARGO_BIN_EXE_llmsd")).with_file_name("llmsctl");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo_root()).args([
            "build",
            "-q",
            "-p",
            "llmsd-client",
            "--bin",
            "llmsctl",
        ]);
        if bin.parent().is_some_and(|p| p.ends_with("release")) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo runs");
        assert!(st.success(), "building llmsctl failed");
        assert!(bin.is_file(), "{} missing after the build", bin.display());
        bin
    })
}

/// Runs `llmsctl --socket SOCK ARGS` (as uid nobody with `nobody`); (success, stdout, stderr).
fn llmsctl(d: &Daemon, nobody: bool, args: &[&str]) -> (bool, String, String) {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(llmsctl_bin());
        c
    } else {
        Command::new(llmsctl_bin())
    };
    let out = cmd
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("llmsctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `llmsctl quota set APP FLAGS... --json` as root; the report.
fn quota_set(d: &Daemon, app: &str, flags: &[&str]) -> Value {
    let mut args = vec!["quota", "set", app];
    args.extend_from_slice(flags);
    args.push("--json");
    let (ok, out, err) = llmsctl(d, false, &args);
    assert!(ok, "llmsctl {args:?}: {err}");
    json(&out)
}

fn quota_get(d: &Daemon, app: &str) -> Value {
    let (ok, out, err) = llmsctl(d, false, &["quota", "get", app, "--json"]);
    assert!(ok, "llmsctl quota get {app}: {err}");
    json(&out)
}

/// The HTTP key of an app in these tests.
fn key(app: &str) -> String {
    format!("sk-quota-{app}")
}

/// One HTTP/1.1 request with a JSON body; (status, lower-cased headers, JSON body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, String, Value) {
    common::http::http(addr, method, path, key, Some(body))
}

/// A refusal as a test sees it on any door.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    retry_ms: Option<u64>,
    message: String,
}

impl Refusal {
    fn socket(e: ClientError) -> Self {
        match e {
            ClientError::Api(e) => Refusal {
                code: e.code,
                retry_ms: e.retry_after_ms,
                message: e.message,
            },
            other => panic!("not a refusal of the daemon: {other}"),
        }
    }

    /// `org.llmsd.Error.<Code>` with the message, whose end is `(retry after N ms)` when
    /// a retry may succeed.
    fn dbus(e: zbus::Error) -> Self {
        match e {
            zbus::Error::MethodError(name, message, _) => {
                let message = message.unwrap_or_default();
                let code = ErrorCode::from_dbus_name(name.as_str())
                    .unwrap_or_else(|| panic!("not an llmsd error: {name} {message}"));
                let retry_ms = message
                    .strip_suffix(" ms)")
                    .and_then(|m| m.rsplit_once("(retry after "))
                    .map(|(_, n)| n.parse().expect("a number of ms"));
                Refusal {
                    code,
                    retry_ms,
                    message,
                }
            }
            other => panic!("not a method error: {other}"),
        }
    }

    /// An HTTP error: the code from the OpenAI-style body, `Retry-After` in seconds.
    fn http(status: u16, head: &str, body: &Value) -> Self {
        let code: ErrorCode = serde_json::from_value(body["error"]["code"].clone())
            .unwrap_or_else(|e| panic!("{e}: status {status} {body}"));
        assert_eq!(status, code.http_status(), "{body}");
        let retry_ms = head
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .map(|s| s.trim().parse::<u64>().expect("seconds") * 1000);
        Refusal {
            code,
            retry_ms,
            message: body["error"]["message"].as_str().unwrap_or("").to_string(),
        }
    }

    /// A `QuotaExceeded` whose retry-after is within `range` (ms).
    fn assert_quota(&self, range: std::ops::RangeInclusive<u64>, what: &str) {
        assert_eq!(self.code, ErrorCode::QuotaExceeded, "{what}: {self:?}");
        let retry = self
            .retry_ms
            .unwrap_or_else(|| panic!("{what}: no retry-after: {self:?}"));
        assert!(
            range.contains(&retry),
            "{what}: retry after {retry} ms: {self:?}"
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Socket,
    Dbus,
    Http,
}

impl Via {
    const ALL: [Via; 3] = [Via::Socket, Via::Dbus, Via::Http];

    fn suffix(self) -> &'static str {
        match self {
            Via::Socket => "s",
            Via::Dbus => "d",
            Via::Http => "h",
        }
    }
}

/// A generation kept running (to hold a `max_concurrent` place).
enum Running {
    Socket(Box<TokenStream>),
    Dbus(u64),
    Http(TcpStream),
}

/// The three doors of one daemon.
struct Doors {
    socket: PathBuf,
    http: String,
    bus: Llm1ClientProxy<'static>,
}

fn params(max_tokens: u32, background: bool) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ignore_eos: true,
        priority: if background {
            Priority::Background
        } else {
            Priority::Normal
        },
        ..GenerationParams::default()
    }
}

impl Doors {
    async fn new(d: &Daemon, bus: &PrivateBus) -> Self {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .expect("bus address")
            .build()
            .await
            .expect("connect to the bus");
        Doors {
            socket: d.socket.clone(),
            http: d.http.clone().expect("the HTTP door is on"),
            bus: Llm1ClientProxy::new(&conn).await.expect("proxy"),
        }
    }

    async fn client(&self, app: &str) -> Client {
        Client::connect(&self.socket, app).await.expect("connect")
    }

    /// A one-off chat; the completion as JSON, or the refusal.
    async fn prompt(
        &self,
        via: Via,
        app: &str,
        message: &str,
        max_tokens: u32,
        background: bool,
    ) -> Result<Value, Refusal> {
        let p = params(max_tokens, background);
        match via {
            Via::Socket => self
                .client(app)
                .await
                .chat_once(message, p)
                .await
                .map(|c| serde_json::to_value(c).unwrap())
                .map_err(Refusal::socket),
            Via::Dbus => self
                .bus
                .chat_sync(app, "", message, &serde_json::to_string(&p).unwrap())
                .await
                .map(|s| json(&s))
                .map_err(Refusal::dbus),
            Via::Http => {
                let body = json!({
                    "messages": [{"role": "user", "content": message}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
                    "priority": if background { "background" } else { "normal" },
                });
                let (st, head, v) = http(
                    &self.http,
                    "POST",
                    "/v1/chat/completions",
                    Some(&key(app)),
                    &body,
                );
                if st == 200 {
                    Ok(v)
                } else {
                    Err(Refusal::http(st, &head, &v))
                }
            }
        }
    }

    /// A new context; its id, or the refusal.
    async fn create(&self, via: Via, app: &str) -> Result<String, Refusal> {
        match via {
            Via::Socket => self
                .client(app)
                .await
                .create_context(None)
                .await
                .map(|c| c.id().to_string())
                .map_err(Refusal::socket),
            Via::Dbus => self
                .bus
                .create_context(app, "")
                .await
                .map_err(Refusal::dbus),
            Via::Http => {
                let (st, head, v) = http(
                    &self.http,
                    "POST",
                    "/v1/contexts",
                    Some(&key(app)),
                    &json!({}),
                );
                if st == 200 {
                    Ok(v["id"].as_str().expect("id").to_string())
                } else {
                    Err(Refusal::http(st, &head, &v))
                }
            }
        }
    }

    /// Starts a long generation and returns once it is running (its first token is out).
    async fn start_long(&self, via: Via, app: &str) -> Running {
        let message = "Count from one to one thousand.";
        match via {
            Via::Socket => {
                let mut s = self
                    .client(app)
                    .await
                    .prompt(PromptRequest {
                        context: None,
                        input: PromptInput::Messages(vec![ChatMessage::new("user", message)]),
                        params: params(2000, false),
                        stream: true,
                    })
                    .await
                    .expect("prompt");
                s.next_token().await.expect("a token").expect("not ended");
                Running::Socket(Box::new(s))
            }
            // The reply (the request id) comes once the prompt is admitted.
            Via::Dbus => Running::Dbus(
                self.bus
                    .chat(
                        app,
                        "",
                        message,
                        &serde_json::to_string(&params(2000, false)).unwrap(),
                    )
                    .await
                    .expect("chat"),
            ),
            Via::Http => {
                let mut s = TcpStream::connect(&self.http).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                let body = json!({"messages": [{"role": "user", "content": message}],
                                  "max_tokens": 2000, "ignore_eos": true, "stream": true});
                common::http::send(
                    &mut s,
                    "POST",
                    "/v1/chat/completions",
                    Some(&key(app)),
                    body.to_string().as_bytes(),
                );
                // The status line comes with the first token.
                let mut first = [0u8; 12];
                s.read_exact(&mut first).expect("a status line");
                assert_eq!(
                    &first,
                    b"HTTP/1.1 200",
                    "{}",
                    String::from_utf8_lossy(&first)
                );
                Running::Http(s)
            }
        }
    }

    async fn stop(&self, r: Running) {
        match r {
            Running::Socket(s) => {
                s.cancel().await.expect("cancel");
                assert_eq!(
                    s.completion().await.map(|_| ()).unwrap_err().code(),
                    Some(ErrorCode::Cancelled)
                );
            }
            Running::Dbus(id) => self.bus.cancel(id).await.expect("cancel"),
            // Closing the connection cancels the request.
            Running::Http(s) => drop(s),
        }
    }
}

/// Sets an app's quota as root: through `llmsctl quota set` for the socket and D-Bus apps,
/// through the client API for the HTTP ones (both are the socket's `quota_set`).
async fn set_quota(
    d: &Daemon,
    admin: &Client,
    via: Via,
    app: &str,
    flags: &[&str],
    quota: Quota,
) -> QuotaReport {
    let r = if via == Via::Http {
        admin
            .quota_set(app, quota, Vec::new())
            .await
            .expect("quota_set")
    } else {
        serde_json::from_value(quota_set(d, app, flags)).expect("a quota report")
    };
    assert_eq!(r.app, app);
    r
}

const APPS: [&str; 7] = ["tpm", "jph", "ctx", "len", "conc", "door", "bg"];

/// A config with an HTTP key for every test app, no anonymous callers, quota defaults and
/// one app limited by the config alone.
fn quota_config(dir: &Path) -> PathBuf {
    let mut text = String::from(
        "http_allow_anonymous = false\n\n[quotas]\nmax_concurrent = 4\n\n\
         [apps.cfg-ctx]\nmax_contexts = 1\n\n[http_keys]\n",
    );
    for app in APPS {
        for via in Via::ALL {
            let a = format!("{app}-{}", via.suffix());
            text.push_str(&format!("\"{}\" = \"{a}\"\n", key(&a)));
        }
    }
    let p = dir.join("llmsd.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_quota_is_refused_with_a_retry_after_on_every_door() {
    let bus = PrivateBus::session();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = quota_config(cfg_dir.path());
    let d = Daemon::start_env(
        true,
        &["--bus", "session", "--config", cfg.to_str().unwrap()],
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let doors = Doors::new(&d, &bus).await;
        let admin = doors.client("quota-admin").await;
        for via in Via::ALL {
            let app = |name: &str| format!("{name}-{}", via.suffix());
            // tokens_per_min: the first call fills the window (its prompt alone is more).
            let r = set_quota(
                &d,
                &admin,
                via,
                &app("tpm"),
                &["--tokens-per-min", "5"],
                Quota {
                    tokens_per_min: Some(5),
                    ..Quota::default()
                },
            )
            .await;
            assert_eq!(r.effective.tokens_per_min, Some(5));
            doors
                .prompt(via, &app("tpm"), "Hi", 2, false)
                .await
                .expect("under the quota");
            let e = doors
                .prompt(via, &app("tpm"), "Hi", 2, false)
                .await
                .unwrap_err();
            e.assert_quota(1..=61_000, &format!("tokens_per_min over {via:?}"));
            assert!(e.message.contains("tokens_per_min 5"), "{e:?}");

            // joules_per_hour: a tiny budget.
            set_quota(
                &d,
                &admin,
                via,
                &app("jph"),
                &["--joules-per-hour", "0.000001"],
                Quota {
                    joules_per_hour: Some(0.000001),
                    ..Quota::default()
                },
            )
            .await;
            doors
                .prompt(via, &app("jph"), "Hi", 2, false)
                .await
                .expect("under the quota");
            let e = doors
                .prompt(via, &app("jph"), "Hi", 2, false)
                .await
                .unwrap_err();
            e.assert_quota(
                3_000_000..=3_661_000,
                &format!("joules_per_hour over {via:?}"),
            );

            // max_contexts.
            set_quota(
                &d,
                &admin,
                via,
                &app("ctx"),
                &["--max-contexts", "1"],
                Quota {
                    max_contexts: Some(1),
                    ..Quota::default()
                },
            )
            .await;
            doors
                .create(via, &app("ctx"))
                .await
                .expect("the first context");
            doors
                .create(via, &app("ctx"))
                .await
                .unwrap_err()
                .assert_quota(60_000..=60_000, &format!("max_contexts over {via:?}"));

            // max_context_tokens: the chat template alone is longer.
            set_quota(
                &d,
                &admin,
                via,
                &app("len"),
                &["--max-context-tokens", "8"],
                Quota {
                    max_context_tokens: Some(8),
                    ..Quota::default()
                },
            )
            .await;
            let e = doors
                .prompt(via, &app("len"), "Hi", 2, false)
                .await
                .unwrap_err();
            e.assert_quota(60_000..=60_000, &format!("max_context_tokens over {via:?}"));
            assert!(e.message.contains("max_context_tokens"), "{e:?}");
            if via == Via::Dbus {
                // Streamed, the refusal comes as a Failed signal with the same retry-after.
                use futures_util::StreamExt;
                let mut failed = doors.bus.receive_failed().await.expect("subscribe");
                let p = serde_json::to_string(&params(2, false)).unwrap();
                let id = doors
                    .bus
                    .chat(&app("len"), "", "Hi", &p)
                    .await
                    .expect("chat");
                let signal = failed.next().await.expect("a Failed signal");
                let args = signal.args().expect("arguments");
                assert_eq!(*args.request(), id);
                assert_eq!(*args.error(), "org.llmsd.Error.QuotaExceeded");
                assert!(
                    args.message().ends_with("(retry after 60000 ms)"),
                    "{}",
                    args.message()
                );
            }

            // max_concurrent: one running, the next refused at once.
            set_quota(
                &d,
                &admin,
                via,
                &app("conc"),
                &["--max-concurrent", "1"],
                Quota {
                    max_concurrent: Some(1),
                    ..Quota::default()
                },
            )
            .await;
            let long = doors.start_long(via, &app("conc")).await;
            let t0 = std::time::Instant::now();
            let e = doors
                .prompt(via, &app("conc"), "Hi", 2, false)
                .await
                .unwrap_err();
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "refused at once, not queued"
            );
            e.assert_quota(1_000..=1_000, &format!("max_concurrent over {via:?}"));
            doors.stop(long).await;

            // doors: every door but this one.
            let others: Vec<&str> = Via::ALL
                .iter()
                .filter(|&&v| v != via)
                .map(|v| match v {
                    Via::Socket => "socket",
                    Via::Dbus => "dbus",
                    Via::Http => "http",
                })
                .collect();
            let list = others.join(",");
            set_quota(
                &d,
                &admin,
                via,
                &app("door"),
                &["--doors", &list],
                Quota {
                    doors: Some(others.iter().map(|d| d.parse().unwrap()).collect()),
                    ..Quota::default()
                },
            )
            .await;
            let e = doors
                .prompt(via, &app("door"), "Hi", 2, false)
                .await
                .unwrap_err();
            e.assert_quota(60_000..=60_000, &format!("doors over {via:?}"));
            doors
                .create(via, &app("door"))
                .await
                .unwrap_err()
                .assert_quota(60_000..=60_000, &format!("doors (create) over {via:?}"));

            // background_allowed = false: background prompts are BackgroundBlocked.
            set_quota(
                &d,
                &admin,
                via,
                &app("bg"),
                &["--background-allowed", "false"],
                Quota {
                    background_allowed: Some(false),
                    ..Quota::default()
                },
            )
            .await;
            let e = doors
                .prompt(via, &app("bg"), "Hi", 2, true)
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::BackgroundBlocked, "{via:?}: {e:?}");
        }
        // The socket apps with a door quota still work through an allowed door.
        doors
            .prompt(Via::Http, "door-s", "Hi", 1, false)
            .await
            .expect("http is allowed to door-s");
    });

    // Config: defaults under every app, and an app limited by the config alone.
    let r = quota_get(&d, "tpm-s");
    assert_eq!(r["set"], json!({"tokens_per_min": 5}));
    assert_eq!(r["config"], json!({"max_concurrent": 4}));
    assert_eq!(
        r["effective"],
        json!({"tokens_per_min": 5, "max_concurrent": 4})
    );
    assert!(r["usage"]["tokens_last_min"].as_u64().unwrap() >= 5, "{r}");
    let e = rt.block_on(async {
        let c = Client::connect(&d.socket, "cfg-ctx").await.unwrap();
        c.create_context(None).await.expect("the first context");
        c.create_context(None).await.map(|_| ()).unwrap_err()
    });
    Refusal::socket(e).assert_quota(60_000..=60_000, "max_contexts from the config");
    // A key cleared goes back to the config's value.
    let r = quota_set(&d, "ctx-s", &["--clear", "max-contexts"]);
    assert_eq!(r["set"], json!({}));
    assert_eq!(r["effective"], json!({"max_concurrent": 4}));

    // The human table.
    let (ok, out, err) = llmsctl(&d, false, &["quota", "get", "jph-s"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("joules_per_hour") && out.contains("0.000001"),
        "{out}"
    );
    assert!(out.contains("J/token"), "{out}");

    // Another uid reads its app's quota but may not set any.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, _, err) = llmsctl(
        &d,
        true,
        &["quota", "set", "tpm-s", "--tokens-per-min", "100000"],
    );
    assert!(!ok, "nobody set a quota");
    assert!(err.contains("PermissionDenied"), "{err}");
    let (ok, out, err) = llmsctl(&d, true, &["quota", "get", "tpm-s", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json(&out)["set"], json!({"tokens_per_min": 5}));

    // Refusals are counted per app and quota.
    let m = metrics(d.http.as_deref().unwrap());
    for (app, quota) in [
        ("tpm-h", "tokens_per_min"),
        ("jph-d", "joules_per_hour"),
        ("ctx-s", "max_contexts"),
        ("len-h", "max_context_tokens"),
        ("conc-d", "max_concurrent"),
        ("door-s", "doors"),
        ("bg-h", "background_allowed"),
    ] {
        let name = format!("llmsd_quota_refusals_total{{app=\"{app}\",quota=\"{quota}\"}}");
        assert!(sample(&m, &name) >= 1.0, "{name}");
    }
}

/// CPU seconds a process used (all its threads), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz: f64 = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks / hz
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn energy_adds_up_battery_tightens_and_quotas_survive_a_restart() {
    let supplies = tempfile::tempdir().unwrap();
    let ps = supplies.path();
    for (f, v) in [
        ("AC/type", "Mains"),
        ("AC/online", "1"),
        ("BAT0/type", "Battery"),
        ("BAT0/status", "Charging"),
    ] {
        std::fs::create_dir_all(ps.join(f).parent().unwrap()).unwrap();
        std::fs::write(ps.join(f), format!("{v}\n")).unwrap();
    }
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("llmsd.toml");
    std::fs::write(
        &cfg,
        "[energy]\nsource = \"cpu\"\nwatts_per_core = 4.0\nbattery_factor = 0.5\n\
         block_background_on_battery = true\n",
    )
    .unwrap();
    let mut d = Daemon::start_env(
        true,
        &["--config", cfg.to_str().unwrap()],
        &[("LLMSD_POWER_SUPPLY_DIR", ps.to_str().unwrap())],
    );
    assert!(
        d.log_text().contains("process CPU time × 4 W per core"),
        "{}",
        d.log_text()
    );
    let addr = d.http.clone().unwrap();
    let pid = d.pid().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let apps = ["e-one", "e-two", "e-three"];

    let cpu0 = cpu_seconds(pid);
    let total0 = sample(&metrics(&addr), "llmsd_energy_joules_total");
    // Three apps at once, batched together; a context over two turns; one HTTP call.
    let (per_app, turns, ctx_info) = rt.block_on(async {
        let health = Client::connect(&d.socket, "e-one")
            .await
            .unwrap()
            .health()
            .await
            .unwrap();
        assert_eq!(
            (health.energy_source.as_str(), health.on_battery),
            ("cpu", false)
        );
        let run = |app: &'static str, n: u32| {
            let socket = d.socket.clone();
            async move {
                let c = Client::connect(&socket, app).await.unwrap();
                c.chat_once("Write a short poem about the sea.", params(n, false))
                    .await
                    .unwrap()
            }
        };
        let (a, b, c) = tokio::join!(run(apps[0], 24), run(apps[1], 16), run(apps[2], 8));
        let ctx_client = Client::connect(&d.socket, "e-ctx").await.unwrap();
        let ctx = ctx_client.create_context(None).await.unwrap();
        let mut turns: Vec<Completion> = Vec::new();
        for q in ["What is the capital of France?", "And of Italy?"] {
            turns.push(
                ctx.chat(q, params(8, false))
                    .await
                    .unwrap()
                    .completion()
                    .await
                    .unwrap(),
            );
        }
        let info = ctx.info().await.unwrap();
        (vec![a, b, c], turns, info)
    });
    let (st, _, over_http) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        None,
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(st, 200, "{over_http}");
    let m = metrics(&addr);
    let cpu1 = cpu_seconds(pid);
    let total = sample(&m, "llmsd_energy_joules_total") - total0;

    // Every response says what it cost; each app's metric is the sum of its responses.
    let mut by_app: Vec<(&str, f64)> = apps
        .iter()
        .zip(&per_app)
        .map(|(a, c)| (*a, c.usage.energy_j))
        .collect();
    by_app.push(("e-ctx", turns.iter().map(|t| t.usage.energy_j).sum()));
    by_app.push((
        "anonymous",
        over_http["usage"]["energy_j"]
            .as_f64()
            .expect("usage.energy_j"),
    ));
    let mut apps_sum = 0.0;
    for (app, spent) in &by_app {
        assert!(*spent > 0.0, "{app} cost nothing");
        let metric = sample(
            &m,
            &format!("llmsd_app_energy_joules_total{{app=\"{app}\"}}"),
        );
        assert!(
            close(metric, *spent, 1e-6),
            "{app}: metric {metric} J, responses {spent} J"
        );
        apps_sum += metric;
    }
    // The apps' energy adds up to the total measured (within 5%)...
    assert!(
        close(apps_sum, total, 0.05),
        "apps {apps_sum} J, total {total} J"
    );
    // ... which is the daemon's CPU time at 4 W per core (the engine's share of it).
    let cpu_j = (cpu1 - cpu0) * 4.0;
    assert!(
        total >= 0.5 * cpu_j && total <= 1.1 * cpu_j + 0.1,
        "measured {total} J for {cpu_j} J of CPU time"
    );
    // A longer generation costs more.
    assert!(
        per_app[0].usage.energy_j > per_app[2].usage.energy_j,
        "{per_app:?}"
    );

    // Per context: the sum of its turns.
    let turns_j: f64 = turns.iter().map(|t| t.usage.energy_j).sum();
    assert!(
        close(ctx_info.energy_j, turns_j, 1e-6),
        "{ctx_info:?} vs {turns_j}"
    );

    // Energy per token: tokens are those prefilled plus those generated.
    let r = quota_get(&d, "e-one");
    let u = &r["usage"];
    let c = &per_app[0];
    assert_eq!(
        u["tokens_total"].as_u64().unwrap(),
        c.timings.prefilled_tokens + c.usage.completion_tokens,
        "{r}"
    );
    assert_eq!(
        sample(&m, "llmsd_app_tokens_total{app=\"e-one\"}") as u64,
        u["tokens_total"].as_u64().unwrap()
    );
    let per_token = u["joules_per_token"].as_f64().unwrap();
    assert!(per_token > 0.0);
    assert!(close(
        per_token,
        u["energy_j_total"].as_f64().unwrap() / u["tokens_total"].as_f64().unwrap(),
        1e-9
    ));

    // Battery: the energy quota tightens by the factor; background work is blocked.
    let used = u["joules_last_hour"].as_f64().unwrap();
    assert!(
        close(used, c.usage.energy_j, 1e-6),
        "{used} vs {}",
        c.usage.energy_j
    );
    let limit = used * 1.5;
    let r = quota_set(&d, "e-one", &["--joules-per-hour", &limit.to_string()]);
    assert_eq!(r["on_battery"], false);
    assert!(close(
        r["effective"]["joules_per_hour"].as_f64().unwrap(),
        limit,
        1e-9
    ));
    std::fs::write(ps.join("AC/online"), "0\n").unwrap();
    let r = quota_get(&d, "e-one");
    assert_eq!(r["on_battery"], true);
    assert!(
        close(
            r["effective"]["joules_per_hour"].as_f64().unwrap(),
            limit * 0.5,
            1e-9
        ),
        "{r}"
    );
    assert!(
        close(r["set"]["joules_per_hour"].as_f64().unwrap(), limit, 1e-9),
        "{r}"
    );
    assert_eq!(sample(&metrics(&addr), "llmsd_on_battery"), 1.0);
    rt.block_on(async {
        let one = Client::connect(&d.socket, "e-one").await.unwrap();
        assert!(one.health().await.unwrap().on_battery);
        let e = Refusal::socket(one.chat_once("Hi", params(2, false)).await.unwrap_err());
        e.assert_quota(3_000_000..=3_661_000, "joules_per_hour on battery");
        assert!(e.message.contains("on battery"), "{e:?}");
        let two = Client::connect(&d.socket, "e-two").await.unwrap();
        let e = Refusal::socket(two.chat_once("Hi", params(2, true)).await.unwrap_err());
        assert_eq!(e.code, ErrorCode::BackgroundBlocked, "{e:?}");
    });
    // Back on mains: under the quota again.
    std::fs::write(ps.join("AC/online"), "1\n").unwrap();
    rt.block_on(async {
        let one = Client::connect(&d.socket, "e-one").await.unwrap();
        one.chat_once("Hi", params(2, false))
            .await
            .expect("on mains again");
        let two = Client::connect(&d.socket, "e-two").await.unwrap();
        two.chat_once("Hi", params(2, true))
            .await
            .expect("background on mains");
    });

    // A restart keeps the quotas, the usage and the energy of contexts.
    let before = quota_get(&d, "e-one");
    d.restart();
    let after = quota_get(&d, "e-one");
    assert_eq!(after["set"], before["set"]);
    assert_eq!(
        after["usage"]["tokens_total"],
        before["usage"]["tokens_total"]
    );
    assert!(close(
        after["usage"]["joules_last_hour"].as_f64().unwrap(),
        before["usage"]["joules_last_hour"].as_f64().unwrap(),
        1e-9
    ));
    assert!(close(
        after["usage"]["energy_j_total"].as_f64().unwrap(),
        before["usage"]["energy_j_total"].as_f64().unwrap(),
        1e-9
    ));
    let info = rt.block_on(async {
        let c = Client::connect(&d.socket, "e-ctx").await.unwrap();
        c.context(&ctx_info.id).info().await.unwrap()
    });
    assert!(close(info.energy_j, ctx_info.energy_j, 1e-9), "{info:?}");
}

#[test]
fn sighup_reloads_quotas_and_budgets_without_dropping_contexts() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("llmsd.toml");
    std::fs::write(&cfg, "[kv]\nbudget_mib = 64\n[quotas]\nmax_contexts = 1\n").unwrap();
    let cfg_arg = cfg.display().to_string();
    let d = Daemon::start(false, &["--config", &cfg_arg]);
    let pid = d.pid().expect("daemon pid") as i32;
    let hup = |d: &Daemon, times: usize| {
        let before = d.log_text().matches("configuration reload").count();
        // SAFETY: kill with the pid of our own child and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        let t0 = std::time::Instant::now();
        while d.log_text().matches("configuration reload").count() < before + times {
            assert!(t0.elapsed() < Duration::from_secs(10), "no reload logged");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.socket, "notes").await.unwrap();
        let first = c.create_context(Some("Be brief.")).await.unwrap();
        let Err(refused) = c.create_context(None).await else {
            panic!("a second context over max_contexts = 1");
        };
        assert_eq!(refused.code(), Some(ErrorCode::QuotaExceeded), "{refused}");
        assert_eq!(c.status().await.unwrap().kv_budget_max_bytes, 64 << 20);
        std::fs::write(&cfg, "[kv]\nbudget_mib = 32\n[quotas]\nmax_contexts = 3\n").unwrap();
        hup(&d, 1);
        let status = c.status().await.unwrap();
        assert_eq!(status.kv_budget_max_bytes, 32 << 20);
        assert_eq!(status.kv_budget_bytes, 32 << 20);
        let second = c
            .create_context(None)
            .await
            .expect("allowed after the reload");
        let ids: Vec<String> = c
            .list_contexts()
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert!(ids.contains(&first.id().to_string()) && ids.contains(&second.id().to_string()));
        // A file that no longer parses is refused; the old limits stay in force.
        std::fs::write(&cfg, "[quotas]\nmax_contexts = \"many\"\n").unwrap();
        hup(&d, 1);
        assert!(d.log_text().contains("configuration reload refused"));
        c.create_context(None).await.expect("third of 3");
        let Err(refused) = c.create_context(None).await else {
            panic!("a fourth context over max_contexts = 3");
        };
        assert_eq!(refused.code(), Some(ErrorCode::QuotaExceeded), "{refused}");
    });
}
