//! llmsd under systemd: the unit files pass `systemd-analyze verify`, scripts/install lays out
//! and removes its tree, the sysusers.d and tmpfiles.d entries apply, the example
//! configuration documents every key, `llmsd config check` judges files, and the real daemon
//! runs socket-activated (systemd-socket-activate passes it the listening sockets, as systemd
//! would) while reporting READY, STATUS and watchdog pings on a notify socket.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use llmsd::config::ConfigFile;
use llmsd_client::{Client, GenerationParams};

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?} runs (install systemd): {e}"))
}

/// Log text without the colour codes tracing adds.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        rest = rest.find('m').map_or("", |j| &rest[j + 1..]);
    }
    out.push_str(rest);
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// scripts/install with the release binaries cargo built (no build of its own).
fn install(args: &[&str]) -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_llmsd"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    assert!(
        bin_dir.join("llmsctl").is_file(),
        "{} is missing: cargo build --release -p llmsd-client (scripts/test does)",
        bin_dir.join("llmsctl").display()
    );
    let out = run(Command::new(repo_root().join("scripts/install"))
        .arg("--no-build")
        .args(args)
        .env("CARGO_TARGET_DIR", bin_dir.parent().expect("target dir"))
        .env_remove("DESTDIR")
        .env_remove("PREFIX")
        .env_remove("SYSCONFDIR"));
    assert!(
        out.status.success(),
        "scripts/install {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Every file under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// The first `@NAME@` left in a file scripts/install should have filled in.
fn placeholder(text: &str) -> Option<String> {
    text.match_indices('@').find_map(|(i, _)| {
        let name: String = text[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        let closed = text[i + 1 + name.len()..].starts_with('@');
        (!name.is_empty() && closed).then(|| format!("@{name}@"))
    })
}

/// `systemd-analyze [--user] verify` on unit files: (success, stderr). Everything it finds
/// (unknown keys, bad values, a missing ExecStart binary) goes to stderr, often with exit
/// status 0, so a clean run is success *and* an empty stderr.
fn verify(user: bool, units: &[PathBuf], runtime_dir: &Path) -> (bool, String) {
    let mut cmd = Command::new("systemd-analyze");
    if user {
        cmd.arg("--user");
    }
    // The user manager needs a runtime directory to resolve %t.
    let out = run(cmd
        .arg("verify")
        .args(units)
        .env("XDG_RUNTIME_DIR", runtime_dir)
        .env("SYSTEMD_LOG_COLOR", "0"));
    (out.status.success(), text(&out.stderr))
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    // A PREFIX the test owns (not DESTDIR), so ExecStart= names a binary that exists, as
    // verify checks.
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("usr");
    install(&["--prefix", prefix.to_str().unwrap()]);
    let runtime = tmp.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();

    let system = prefix.join("lib/systemd/system");
    let service = std::fs::read_to_string(system.join("llmsd.service")).unwrap();
    assert!(
        service.contains(&format!(
            "ExecStart={}/bin/llmsd serve --system",
            prefix.display()
        )),
        "{service}"
    );
    assert_eq!(placeholder(&service), None, "{service}");
    let units = [system.join("llmsd.service"), system.join("llmsd.socket")];
    let (ok, stderr) = verify(false, &units, &runtime);
    assert!(ok && stderr.is_empty(), "system units:\n{stderr}");

    let user = prefix.join("lib/systemd/user");
    let units = [user.join("llmsd.service"), user.join("llmsd.socket")];
    let (ok, stderr) = verify(true, &units, &runtime);
    assert!(ok && stderr.is_empty(), "user units:\n{stderr}");

    // The check above can fail: a unit with a bad value does not pass.
    let broken = tmp.path().join("broken/llmsd.service");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(
        &broken,
        service.replace("SystemCallFilter=@system-service", "SystemCallFilter=@nope"),
    )
    .unwrap();
    let (_, stderr) = verify(false, &[broken], &runtime);
    assert!(
        stderr.contains("@nope"),
        "verify missed a bad value: {stderr:?}"
    );
}

#[test]
fn install_honours_destdir_and_prefix_and_uninstall_removes_its_files() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path().to_str().unwrap();
    install(&["--destdir", d, "--prefix", "/usr"]);
    let expected: BTreeSet<String> = [
        "etc/llmsd/llmsd.toml",
        "usr/bin/llmsctl",
        "usr/bin/llmsd",
        "usr/lib/systemd/system/llmsd.service",
        "usr/lib/systemd/system/llmsd.socket",
        "usr/lib/systemd/user/llmsd.service",
        "usr/lib/systemd/user/llmsd.socket",
        "usr/lib/sysusers.d/llmsd.conf",
        "usr/lib/tmpfiles.d/llmsd.conf",
        "usr/share/dbus-1/services/org.llmsd.Llm1.service",
        "usr/share/dbus-1/system-services/org.llmsd.Llm1.service",
        "usr/share/dbus-1/system.d/org.llmsd.Llm1.conf",
        "usr/share/doc/llmsd/README.md",
        "usr/share/doc/llmsd/llmsd.toml.example",
        "usr/share/doc/llmsd/systemd.md",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files_under(dest.path()), expected);
    let root = dest.path();
    let mode = |p: &str| std::fs::metadata(root.join(p)).unwrap().mode() & 0o777;
    assert_eq!(mode("usr/bin/llmsd"), 0o755);
    assert_eq!(mode("usr/lib/systemd/system/llmsd.service"), 0o644);
    // Paths inside name PREFIX, never DESTDIR.
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    assert!(read("usr/lib/systemd/system/llmsd.service")
        .contains("\nExecStart=/usr/bin/llmsd serve --system\n"));
    assert!(
        read("usr/lib/systemd/user/llmsd.service").contains("\nExecStart=/usr/bin/llmsd serve\n")
    );
    assert!(read("usr/share/dbus-1/services/org.llmsd.Llm1.service")
        .contains("\nExec=/usr/bin/llmsd serve\n"));
    for f in &expected {
        if !f.starts_with("usr/bin/") {
            assert!(!read(f).contains(d), "{f} names DESTDIR");
            if f.ends_with(".service") || f.ends_with(".socket") {
                assert_eq!(placeholder(&read(f)), None, "{f}");
            }
        }
    }
    assert_eq!(
        read("etc/llmsd/llmsd.toml"),
        std::fs::read_to_string(repo_root().join("systemd/llmsd.toml.example")).unwrap()
    );

    // An edited configuration survives a reinstall and the uninstall.
    std::fs::write(root.join("etc/llmsd/llmsd.toml"), "threads = 1\n").unwrap();
    install(&["--destdir", d, "--prefix", "/usr"]);
    assert_eq!(read("etc/llmsd/llmsd.toml"), "threads = 1\n");
    let out = install(&["--uninstall", "--destdir", d, "--prefix", "/usr"]);
    assert!(out.contains("kept"), "{out}");
    let left: Vec<String> = files_under(root).into_iter().collect();
    assert_eq!(left, ["etc/llmsd/llmsd.toml"]);

    // make install / uninstall pass PREFIX and DESTDIR through (PREFIX /usr/local: the
    // configuration goes to /etc, the D-Bus policy to /etc/dbus-1/system.d).
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path().to_str().unwrap();
    let target = Path::new(env!("CARGO_BIN_EXE_llmsd"))
        .parent()
        .and_then(Path::parent)
        .unwrap();
    let make = |goal: &str| {
        let out = run(Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(repo_root())
            .arg(goal)
            .arg(format!("DESTDIR={d}"))
            .arg("INSTALL_FLAGS=--no-build")
            .env("CARGO_TARGET_DIR", target));
        assert!(
            out.status.success(),
            "make {goal}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    };
    make("install");
    let got = files_under(dest.path());
    for f in [
        "usr/local/bin/llmsd",
        "usr/local/lib/systemd/system/llmsd.socket",
        "etc/llmsd/llmsd.toml",
        "etc/dbus-1/system.d/org.llmsd.Llm1.conf",
        "usr/local/share/dbus-1/system-services/org.llmsd.Llm1.service",
    ] {
        assert!(got.contains(f), "{f} not in {got:?}");
    }
    make("uninstall");
    assert!(files_under(dest.path()).is_empty());
}

#[test]
fn sysusers_and_tmpfiles_entries_apply() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", r.display()))
        .arg(repo_root().join("systemd/sysusers.d/llmsd.conf")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("llmsd:"))
        .unwrap_or_else(|| panic!("no llmsd user in {passwd}"))
        .split(':')
        .collect();
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system uid: {user:?}");
    assert_eq!(user[5], "/var/lib/llmsd");
    assert!(user[6].ends_with("nologin"), "{user:?}");
    let group = std::fs::read_to_string(r.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("llmsd:")), "{group}");
    assert!(
        group.lines().any(|l| l.starts_with("llmsd-admin:")),
        "{group}"
    );

    let out = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", r.display()))
        .arg("--create")
        .arg(repo_root().join("systemd/tmpfiles.d/llmsd.conf")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (dir, mode, owner) in [
        ("var/lib/llmsd", 0o700, uid),
        ("var/lib/llmsd/models", 0o755, uid),
        ("run/llmsd", 0o755, uid),
        ("etc/llmsd", 0o755, 0),
    ] {
        let m = std::fs::metadata(r.join(dir)).unwrap();
        assert!(m.is_dir(), "{dir}");
        assert_eq!(m.mode() & 0o777, mode, "{dir}");
        assert_eq!(m.uid(), owner, "{dir}");
    }
}

/// The field names a `deny_unknown_fields` section accepts, from serde's own error message.
fn section_fields(header: &str) -> Option<Vec<String>> {
    let probe = format!("{header}\nno_such_key_probe = 1\n");
    let err = ConfigFile::parse(&probe).err()?;
    let (_, rest) = err.split_once("unknown field `no_such_key_probe`, expected ")?;
    let list = rest.lines().next()?;
    let names = list
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, n)| n.to_string())
        .collect();
    Some(names)
}

/// Every key of the configuration, as `key`, `section.key`, or `section.*.key` for tables of
/// named entries: found from the parser, so a key added to config.rs shows up here.
fn all_config_keys() -> Vec<String> {
    let top = section_fields("").expect("the top level lists its fields");
    let mut keys = Vec::new();
    for name in top {
        if let Some(fields) = section_fields(&format!("[{name}]")) {
            keys.extend(fields.into_iter().map(|f| format!("{name}.{f}")));
        } else if let Some(fields) = section_fields(&format!("[{name}.probe]")) {
            keys.extend(fields.into_iter().map(|f| format!("{name}.*.{f}")));
        } else {
            keys.push(name);
        }
    }
    keys
}

/// The example with every `#key = value` and `#[section]` line uncommented.
fn example_uncommented() -> String {
    let example = std::fs::read_to_string(repo_root().join("systemd/llmsd.toml.example")).unwrap();
    example
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '[' || c == '"') =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_configuration_documents_every_key_with_a_valid_value() {
    let keys = all_config_keys();
    assert!(keys.contains(&"kv.budget_mib".to_string()), "{keys:?}");
    assert!(keys.contains(&"apps.*.priority".to_string()), "{keys:?}");
    assert!(keys.contains(&"http_keys".to_string()), "{keys:?}");

    let text = example_uncommented();
    ConfigFile::parse(&text).unwrap_or_else(|e| panic!("the uncommented example: {e}"));
    let doc: toml::Table = text.parse().unwrap();
    let mut missing = Vec::new();
    for key in &keys {
        let parts: Vec<&str> = key.split('.').collect();
        let found = match parts.as_slice() {
            [k] => doc.contains_key(*k),
            [s, k] => doc
                .get(*s)
                .and_then(|t| t.as_table())
                .is_some_and(|t| t.contains_key(*k)),
            [s, "*", k] => doc.get(*s).and_then(|t| t.as_table()).is_some_and(|t| {
                t.values()
                    .any(|e| e.as_table().is_some_and(|e| e.contains_key(*k)))
            }),
            _ => false,
        };
        if !found {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "systemd/llmsd.toml.example does not document {missing:?}"
    );
}

fn llmsd_cmd(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmsd"));
    cmd.args(args).env_remove("LLMSD_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

#[test]
fn config_check_accepts_good_files_and_lists_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo_root().join("systemd/llmsd.toml.example");
    let out = llmsd_cmd(&["config", "check", example.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with(": OK\n"),
        "{}",
        text(&out.stdout)
    );

    // A good file, with the effective settings and a MemoryMax= for them.
    let model = model(SMOLLM2);
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("model = {:?}\n[kv]\nbudget_mib = 64\n", model.display()),
    )
    .unwrap();
    let out = llmsd_cmd(
        &[
            "config",
            "check",
            "--print",
            "--config",
            good.to_str().unwrap(),
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("kv.budget_mib = 64\n"), "{stdout}");
    let model_mib = std::fs::metadata(&model).unwrap().len().div_ceil(1 << 20);
    let memory_max =
        llmsd::config::suggested_memory_max(std::fs::metadata(&model).unwrap().len(), 64 << 20);
    assert!(
        stdout.contains(&format!(
            "MemoryMax={}M  (model {model_mib} MiB + KV budget 64 MiB",
            memory_max >> 20
        )),
        "{stdout}"
    );

    // Errors are all listed (exit 1); warnings alone do not fail.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "model = \"/nonexistent/m.gguf\"\nhttp = \"0.0.0.0:8460\"\nbus = \"sesion\"\n\
         threads = 0\n[scheduler]\nprefill_latency_factor = -1.0\n",
    )
    .unwrap();
    let out = llmsd_cmd(&["config", "check", bad.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for needle in [
        "/nonexistent/m.gguf",
        "non-loopback",
        "sesion",
        "threads",
        "prefill_latency_factor",
    ] {
        assert!(stdout.contains(needle), "{needle} not reported:\n{stdout}");
    }
    assert_eq!(stdout.matches("error: ").count(), 5, "{stdout}");
    assert!(
        text(&out.stderr).contains("5 errors"),
        "{}",
        text(&out.stderr)
    );

    // A typo is a parse error naming the key; a file that is not a model is refused.
    std::fs::write(&bad, "[kv]\nbudget_mb = 64\n").unwrap();
    let out = llmsd_cmd(&["config", "check", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("budget_mb"),
        "{}",
        text(&out.stdout)
    );
    std::fs::write(&bad, format!("model = {:?}\n", bad.display())).unwrap();
    let out = llmsd_cmd(&["config", "check", bad.to_str().unwrap()], &[]);
    assert!(
        text(&out.stdout).contains("not a GGUF file"),
        "{}",
        text(&out.stdout)
    );

    // As the system service's file: paths it cannot see are warned about.
    std::fs::write(&bad, "state_dir = \"/home/me/llmsd\"\n").unwrap();
    let out = llmsd_cmd(&["config", "check", "--system", bad.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: state_dir /home/me/llmsd is under a home"),
        "{stdout}"
    );
    assert!(stdout.contains("warning: model is not set"), "{stdout}");

    // Without a file, the default location is checked: absent means defaults.
    let out = llmsd_cmd(&["config", "check"], &[("XDG_CONFIG_HOME", dir.path())]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains(&format!(
            "{}: absent",
            dir.path().join("llmsd/llmsd.toml").display()
        )),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn serve_reads_the_default_config_location_and_insists_on_a_named_file() {
    let cfg_home = tempfile::tempdir().unwrap();
    std::fs::create_dir(cfg_home.path().join("llmsd")).unwrap();
    std::fs::write(
        cfg_home.path().join("llmsd/llmsd.toml"),
        "[kv]\npolicy = \"paged\"\n",
    )
    .unwrap();
    let d = Daemon::start_env(
        false,
        &[],
        &[("XDG_CONFIG_HOME", cfg_home.path().to_str().unwrap())],
    );
    let info = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let c = Client::connect(&d.socket, "cfg").await.unwrap();
            c.model_info().await.unwrap()
        });
    assert_eq!(info.kv_policy, "paged");
    let log = plain(&d.log_text());
    let path = cfg_home.path().join("llmsd/llmsd.toml");
    assert!(log.contains(&format!("config={}", path.display())), "{log}");
    drop(d);

    let missing = cfg_home.path().join("nope.toml");
    let err = llmsd_fails(&[
        "serve",
        "--model",
        model(SMOLLM2).to_str().unwrap(),
        "--config",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("nope.toml"), "{err}");
}

/// Reads notifications (one datagram each, `KEY=VALUE` lines) until `done` holds or a
/// deadline passes; returns them all.
fn notifications(sock: &UnixDatagram, all: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while !done(all) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "notifications so far: {all:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            all.push(text(&buf[..n]));
        }
    }
}

fn count(all: &[String], line: &str) -> usize {
    all.iter().filter(|m| m.lines().any(|l| l == line)).count()
}

#[test]
fn socket_activated_daemon_serves_inherited_sockets_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("llmsd.sock");
    let not_this = dir.path().join("configured.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let http_port = free_port();
    let log = dir.path().join("daemon.log");
    let log_file = std::fs::File::create(&log).unwrap();
    // systemd-socket-activate binds both sockets, waits for the first connection, and execs
    // the daemon with LISTEN_FDS=2 and LISTEN_PID set to its own pid, as systemd does.
    let mut child = Command::new("systemd-socket-activate")
        .arg(format!("--listen={}", socket.display()))
        .arg(format!("--listen=127.0.0.1:{http_port}"))
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=WATCHDOG_USEC=400000")
        .arg("--setenv=LLMSD_LOG=info")
        .arg(format!("--setenv=XDG_CONFIG_HOME={}", dir.path().display()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_llmsd"))
        .args(["serve", "--model"])
        .arg(model(SMOLLM2))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&not_this)
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .args(["--bus", "off", "--threads", "2", "--kv-budget-mib", "16"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("systemd-socket-activate runs (install systemd)");
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no socket from systemd-socket-activate"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let inode = std::fs::metadata(&socket).unwrap().ino();

    // The first connection starts the daemon, which answers on the socket it was given.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = rt.block_on(async {
        let c = Client::connect(&socket, "notes").await.unwrap();
        let ctx = c.create_context(None).await.unwrap();
        ctx.chat(
            "What is the capital of France?",
            GenerationParams {
                max_tokens: 8,
                ..GenerationParams::default()
            },
        )
        .await
        .unwrap()
        .completion()
        .await
        .unwrap()
    });
    assert!(reply.usage.completion_tokens > 0, "{reply:?}");

    // The HTTP door is on the TCP socket systemd passed, not on the configured address.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let mut all = Vec::new();
    notifications(&notify, &mut all, |all| {
        count(all, "READY=1") == 1
            && all.iter().any(|m| m.contains("STATUS=serving: 1 contexts"))
            && count(all, "WATCHDOG=1") >= 3
    });
    let has = |m: &String, line: &str| m.lines().any(|l| l == line);
    let ready = all.iter().position(|m| has(m, "READY=1")).unwrap();
    let first_ping = all.iter().position(|m| has(m, "WATCHDOG=1")).unwrap();
    assert!(ready < first_ping, "pings start after READY: {all:?}");

    // SIGTERM: a clean stop that leaves systemd's socket where it was.
    // SAFETY: kill with a pid we own and a valid signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log_text = plain(&std::fs::read_to_string(&log).unwrap());
    assert!(status.success(), "{status}: {log_text}");
    notifications(&notify, &mut all, |all| count(all, "STOPPING=1") == 1);
    assert!(log_text.contains("socket_activated=true"), "{log_text}");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().ino(),
        inode,
        "the socket was replaced"
    );
    assert!(
        !not_this.exists(),
        "the daemon bound its configured socket too"
    );
}

#[test]
fn an_inherited_socket_of_another_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dgram.sock");
    let log = dir.path().join("daemon.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("--datagram")
        .arg(format!("--listen={}", socket.display()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_llmsd"))
        .args(["serve", "--model"])
        .arg(model(SMOLLM2))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--http", "off", "--bus", "off"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("systemd-socket-activate runs (install systemd)");
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A datagram socket is activated by its first datagram.
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"hello", &socket)
        .unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the daemon kept running on a datagram socket");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{log_text}");
    assert!(
        log_text.contains("is neither a listening Unix stream socket"),
        "{log_text}"
    );
}

#[test]
fn the_cost_models_go_to_systemds_cache_directory() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("llmsd");
    let d = Daemon::start_env(
        false,
        &[],
        &[("CACHE_DIRECTORY", cache_dir.to_str().unwrap())],
    );
    assert!(
        cache_dir.join("costs.json").is_file(),
        "no costs.json in the cache directory"
    );
    let mode = std::fs::metadata(&cache_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(
        !d.state.join("costs.json").exists(),
        "costs.json in the state directory"
    );
}
