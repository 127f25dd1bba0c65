//! Faults from outside: a full disk under the swap files, a damaged model file. The daemon
//! keeps serving (or refuses clearly at start) and loses no context.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use llmsd_client::Client;

/// A tmpfs of `mib` MiB mounted on a new directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(st.success(), "mounting a tmpfs needs root");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file until it is full.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        // dd stops with "No space left on device": its status is not success, by design.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output()
            .expect("dd runs");
        let free = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("df runs");
        let avail: u64 = String::from_utf8_lossy(&free.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes");
        assert!(avail < 64 * 1024, "disk not full: {avail} bytes free");
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Three turns in one context, then the text of a fourth after a restart; with `disk`, the
/// disk fills after the first turn and is freed after the second.
fn conversation(disk: Option<&SmallDisk>) -> (Vec<String>, String, String) {
    let mut d = match disk {
        Some(disk) => Daemon::start_with_state(disk.path().join("state"), false, &[]),
        None => Daemon::start(false, &[]),
    };
    let rt = rt();
    let questions = [
        "Name a planet.",
        "Name another one.",
        "And a third one?",
        "Which of them is largest?",
    ];
    let mut answers = Vec::new();
    let mut filler = None;
    let id = rt.block_on(async {
        let c = Client::connect(&d.socket, "diary").await.unwrap();
        let ctx = c.create_context(Some("Answer briefly.")).await.unwrap();
        for (turn, q) in questions[..3].iter().enumerate() {
            if turn == 1 {
                filler = disk.map(SmallDisk::fill);
            }
            if turn == 2 {
                if let Some(f) = filler.take() {
                    std::fs::remove_file(f).unwrap();
                }
            }
            let done = ctx
                .chat(q, greedy(12))
                .await
                .unwrap_or_else(|e| panic!("turn {turn}: {e}"))
                .completion()
                .await
                .unwrap_or_else(|e| panic!("turn {turn}: {e}"));
            answers.push(done.text);
        }
        ctx.id().to_string()
    });
    let log = d.log_text();
    d.restart();
    let (info_tokens, last) = rt.block_on(async {
        let c = Client::connect(&d.socket, "diary").await.unwrap();
        let ctx = c.context(&id);
        let info = ctx.info().await.unwrap();
        let last = ctx
            .chat(questions[3], greedy(12))
            .await
            .unwrap()
            .completion()
            .await
            .unwrap();
        (info.tokens, last.text)
    });
    (answers, format!("{info_tokens} tokens: {last}"), log)
}

#[test]
fn a_full_disk_during_swap_out_keeps_serving_and_loses_nothing_once_space_returns() {
    let (want, want_after, _) = conversation(None);
    let disk = SmallDisk::mount(48);
    let (got, got_after, log) = conversation(Some(&disk));
    assert!(
        log.contains("No space left on device") || log.contains("os error 28"),
        "the full disk was never hit:\n{log}"
    );
    // Served from memory while the disk was full: the same answers as with a disk.
    assert_eq!(got, want);
    // Written once space returned: after a restart the context has every turn.
    assert_eq!(got_after, want_after);
}

fn refused(model: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .arg("serve")
        .arg("--model")
        .arg(model)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--http", "off", "--bus", "off"])
        .output()
        .expect("llmsd runs");
    assert!(!out.status.success(), "started with a damaged model");
    assert!(
        !dir.path().join("s.sock").exists(),
        "socket created before the model loaded"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_damaged_model_file_is_refused_at_start() {
    let good = model(SMOLLM2);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("model.gguf");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = refused(&bad);
    assert!(err.contains("model.gguf"), "{err}");
    assert!(
        err.to_lowercase().contains("truncat") || err.contains("outside"),
        "{err}"
    );
    let garbage: Vec<u8> = (0..bytes.len() as u32 / 64)
        .flat_map(|i| i.to_le_bytes())
        .collect();
    std::fs::write(&bad, garbage).unwrap();
    let err = refused(&bad);
    assert!(err.contains("model.gguf"), "{err}");
    assert!(
        err.to_lowercase().contains("magic") || err.contains("GGUF"),
        "{err}"
    );
}

/// Where in serving a turn the daemon is killed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum KillPoint {
    /// While a long prompt is being prefilled (before its first token).
    Prefill,
    /// After some tokens of the answer have streamed.
    Decode,
    /// Just after the answer: its chunks and the manifest are being written and another
    /// context's turn is evicting this one (every write slowed by the fault-injection knob).
    SwapOut,
}

/// The conversation both runs follow: (context, message).
fn crash_script() -> Vec<(usize, String)> {
    let gpl = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3");
    let long = |from: usize| {
        format!(
            "Summarize this in one sentence:\n{}",
            &gpl[from..from + 1500]
        )
    };
    vec![
        (0, "Name a planet.".into()),
        (1, "Name a river.".into()),
        (2, long(0)),
        (0, "Name another one.".into()),
        (1, "Which one is longest?".into()),
        (2, "Say it in three words.".into()),
        (0, long(3000)),
        (1, "Name a mountain.".into()),
        (2, "Name a colour.".into()),
        (0, "Which of them is biggest?".into()),
    ]
}

/// A daemon for the crash runs: a KV budget far below the three contexts, so every switch
/// swaps one out, and slowed writes, so a kill lands inside them.
fn crash_daemon() -> Daemon {
    Daemon::start_env(
        false,
        &["--kv-budget-mib", "16"],
        &[("LLMSD_FAULT_IO_DELAY_MS", "40")],
    )
}

const SYSTEMS: [&str; 3] = [
    "You answer in a few words.",
    "You are a geography teacher. Be brief.",
    "You summarize texts.",
];

/// Every turn's answer and every context's token count after it, without crashes.
fn crash_control() -> (Vec<String>, Vec<[u64; 3]>) {
    let d = crash_daemon();
    rt().block_on(async {
        let c = Client::connect(&d.socket, "crash").await.unwrap();
        let mut ids = Vec::new();
        for s in SYSTEMS {
            ids.push(c.create_context(Some(s)).await.unwrap().id().to_string());
        }
        let mut answers = Vec::new();
        let mut tokens = Vec::new();
        for (ctx, msg) in crash_script() {
            let done = c
                .context(&ids[ctx])
                .chat(&msg, greedy(12))
                .await
                .unwrap()
                .completion()
                .await
                .unwrap();
            answers.push(done.text);
            let mut after = [0u64; 3];
            for (i, id) in ids.iter().enumerate() {
                after[i] = c.context(id).info().await.unwrap().tokens;
            }
            tokens.push(after);
        }
        (answers, tokens)
    })
}

/// kill -9 at random points while serving (prefill, decode, swap-out and manifest writes),
/// then restart: every context is there, holds its state from before or after the turn that
/// was cut (never anything else), and the conversation goes on exactly as without crashes.
#[test]
fn kill_9_while_serving_loses_no_context_and_changes_no_answer() {
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("LLMSD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_secs())
        });
    println!("LLMSD_CRASH_SEED={seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (want_answers, want_tokens) = crash_control();
    let script = crash_script();
    // Where to crash: each kind at least once, at turns where it means something (long
    // prompts for prefill).
    let plan: Vec<(usize, KillPoint)> = vec![
        (2, KillPoint::Prefill),
        (3, KillPoint::Decode),
        (4, KillPoint::SwapOut),
        (6, KillPoint::Prefill),
        (7, KillPoint::SwapOut),
        (9, KillPoint::Decode),
    ];
    let mut d = crash_daemon();
    let rt = rt();
    let ids: Vec<String> = rt.block_on(async {
        let c = Client::connect(&d.socket, "crash").await.unwrap();
        let mut ids = Vec::new();
        for s in SYSTEMS {
            ids.push(c.create_context(Some(s)).await.unwrap().id().to_string());
        }
        ids
    });
    let mut tokens_now = [0u64; 3];
    rt.block_on(async {
        let c = Client::connect(&d.socket, "crash").await.unwrap();
        for (i, id) in ids.iter().enumerate() {
            tokens_now[i] = c.context(id).info().await.unwrap().tokens;
        }
    });
    let mut landed_count = 0;
    for (turn, (ctx, msg)) in script.iter().enumerate() {
        let kill = plan.iter().find(|(t, _)| *t == turn).map(|(_, k)| *k);
        let answer = rt.block_on(async {
            let c = Client::connect(&d.socket, "crash").await.unwrap();
            let mut s = c.context(&ids[*ctx]).chat(msg, greedy(12)).await.unwrap();
            match kill {
                None => Some(s.completion().await.unwrap().text),
                Some(KillPoint::Prefill) => {
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(5..150))).await;
                    None
                }
                Some(KillPoint::Decode) => {
                    for _ in 0..rng.gen_range(1..8) {
                        s.next_token().await.unwrap().expect("a token");
                    }
                    None
                }
                Some(KillPoint::SwapOut) => {
                    s.completion().await.unwrap();
                    // A long one-off prompt needs the memory: this context's chunks go to
                    // disk while its manifest is being written.
                    let _next = c
                        .prompt(llmsd_client::PromptRequest {
                            context: None,
                            input: llmsd_client::PromptInput::Text(script[2].1.clone()),
                            params: greedy(2),
                            stream: true,
                        })
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
                    None
                }
            }
        });
        if let Some(text) = answer {
            assert_eq!(text, want_answers[turn], "turn {turn}");
            tokens_now = want_tokens[turn];
            continue;
        }
        let point = kill.expect("a kill point");
        d.kill();
        d.restart();
        let before = tokens_now[*ctx];
        let (after, listed) = rt.block_on(async {
            let c = Client::connect(&d.socket, "crash").await.unwrap();
            let listed: Vec<String> = c
                .list_contexts()
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.id)
                .collect();
            let mut after = [0u64; 3];
            for (i, id) in ids.iter().enumerate() {
                after[i] = c
                    .context(id)
                    .info()
                    .await
                    .unwrap_or_else(|e| panic!("turn {turn} ({point:?}): context {i} lost: {e}"))
                    .tokens;
            }
            (after, listed)
        });
        for id in &ids {
            assert!(
                listed.contains(id),
                "turn {turn} ({point:?}): {id} not listed"
            );
        }
        for i in 0..3 {
            if i != *ctx {
                assert_eq!(
                    after[i], tokens_now[i],
                    "turn {turn} ({point:?}): context {i} changed"
                );
            }
        }
        let landed = after[*ctx] == want_tokens[turn][*ctx];
        assert!(
            landed || after[*ctx] == before,
            "turn {turn} ({point:?}): context {ctx} has {} tokens: neither {before} (before) \
             nor {} (after)",
            after[*ctx],
            want_tokens[turn][*ctx]
        );
        println!("turn {turn}: killed during {point:?}; the turn landed: {landed}");
        if landed {
            landed_count += 1;
        } else {
            // The client saw no answer: it asks again, and gets what it would have got.
            let text = rt.block_on(async {
                let c = Client::connect(&d.socket, "crash").await.unwrap();
                c.context(&ids[*ctx])
                    .chat(msg, greedy(12))
                    .await
                    .unwrap()
                    .completion()
                    .await
                    .unwrap()
                    .text
            });
            assert_eq!(
                text, want_answers[turn],
                "turn {turn} redone after {point:?}"
            );
        }
        tokens_now = want_tokens[turn];
    }
    println!(
        "{} kills, {landed_count} after the turn had landed",
        plan.len()
    );
    // Swap-out really happened: the contexts' chunks are on disk.
    assert!(
        files_under(&d.state, ".kv") > 0,
        "no swap segment was ever written"
    );
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

/// Files under `dir` (recursively) whose names end with `suffix`.
fn files_under(dir: &Path, suffix: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += files_under(&p, suffix);
        } else if p.to_string_lossy().ends_with(suffix) {
            n += 1;
        }
    }
    n
}

/// How each app's swap files are damaged.
const DAMAGE: [(&str, &str); 3] = [
    ("dmg-flip", "bytes flipped"),
    ("dmg-trunc", "truncated to half"),
    ("dmg-delete", "deleted"),
];

/// The directory of `app`'s swap files and manifest under `state`.
fn app_dir(state: &Path, app: &str) -> PathBuf {
    let owner = format!("\"u0:{app}\"");
    let mut found = Vec::new();
    let mut stack = vec![state.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "manifest.json")
                && std::fs::read_to_string(&p).is_ok_and(|t| t.contains(&owner))
            {
                found.push(dir.clone());
            }
        }
    }
    assert_eq!(found.len(), 1, "{app}: manifests {found:?}");
    found.remove(0)
}

/// Damages every swap segment of `app` the way its row of [`DAMAGE`] says; returns how many.
fn damage(state: &Path, app: &str) -> usize {
    let dir = app_dir(state, app);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "kv") {
            continue;
        }
        n += 1;
        match app {
            "dmg-flip" => {
                let mut b = std::fs::read(&p).unwrap();
                let len = b.len();
                for k in 1..16 {
                    b[len * k / 16] ^= 0x5a;
                }
                // In place, as a bad disk would: the daemon's open descriptors see it too.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &b))
                    .unwrap();
            }
            "dmg-trunc" => {
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len / 2).unwrap();
            }
            _ => std::fs::remove_file(&p).unwrap(),
        }
    }
    n
}

/// Two more turns of each damage app's context after its first; with `damaged`, its swap
/// files are damaged behind the running daemon's back before the second turn (all contexts
/// evicted first, so it must read them), and again while it is stopped before the third.
fn damaged_conversation(damaged: bool) -> (Vec<Answer>, String) {
    let mut d = Daemon::start(false, &[]);
    let rt = rt();
    let questions = [
        "Describe the sea in two sentences.",
        "And a river?",
        "And a lake?",
    ];
    let mut answers = Vec::new();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for (app, _) in DAMAGE {
            let c = Client::connect(&d.socket, app).await.unwrap();
            let ctx = c.create_context(Some("Answer briefly.")).await.unwrap();
            ctx.chat(questions[0], greedy(24))
                .await
                .unwrap()
                .completion()
                .await
                .unwrap();
            ids.push(ctx.id().to_string());
        }
        ids
    });
    for (turn, question) in questions.iter().enumerate().skip(1) {
        if damaged {
            if turn == 2 {
                d.stop();
            } else {
                rt.block_on(async {
                    let c = Client::connect(&d.socket, "admin").await.unwrap();
                    for (app, _) in DAMAGE {
                        c.evict_app(app).await.unwrap();
                    }
                });
            }
            for (app, how) in DAMAGE {
                let n = damage(&d.state, app);
                assert!(n > 0, "{app}: no swap segment to damage");
                println!("turn {turn}: {app}: {n} segments {how}");
            }
            if turn == 2 {
                d.restart();
            }
        }
        rt.block_on(async {
            for ((app, _), id) in DAMAGE.iter().zip(&ids) {
                let c = Client::connect(&d.socket, app).await.unwrap();
                let params = llmsd_client::GenerationParams {
                    logprobs: Some(2),
                    ..greedy(12)
                };
                let done = c
                    .context(id)
                    .chat(question, params)
                    .await
                    .unwrap()
                    .completion()
                    .await
                    .unwrap();
                answers.push(Answer {
                    app,
                    turn,
                    steps: done.logprobs.expect("log-probabilities asked for"),
                    text: done.text,
                });
            }
        });
    }
    (answers, d.log_text())
}

/// One greedy answer of [`damaged_conversation`], with each token's log-probability and the
/// two likeliest tokens of its step.
struct Answer {
    app: &'static str,
    turn: usize,
    text: String,
    steps: Vec<llmsd_ipc::TokenLogprob>,
}

/// Log-probabilities of the same token, recomputed chunks against chunks read back, differ by
/// at most this (nats). The chunks read back are the quantized copies; recomputed ones attend
/// to those copies, so they differ from the originals by the KV compression's error.
const RECOMPUTE_TOLERANCE: f32 = 0.5;

/// `got` equals `want` up to float tolerance: token for token with log-probabilities within
/// [`RECOMPUTE_TOLERANCE`], except that an app's answers may part at a near-tie (the two
/// likeliest tokens of `want`'s step within the tolerance, `got` taking the runner-up), after
/// which its later turns hold another history and are not compared. Returns the tokens
/// compared and the largest log-probability difference seen.
fn same_up_to_float_tolerance(want: &[Answer], got: &[Answer]) -> (usize, f32) {
    assert_eq!(want.len(), got.len());
    let (mut compared, mut worst) = (0, 0f32);
    let mut parted: Vec<&str> = Vec::new();
    for (w, g) in want.iter().zip(got) {
        assert_eq!((w.app, w.turn), (g.app, g.turn));
        if parted.contains(&w.app) {
            continue;
        }
        let at = format!(
            "{} turn {}: {:?} against {:?}",
            w.app, w.turn, g.text, w.text
        );
        for (ws, gs) in w.steps.iter().zip(&g.steps) {
            if ws.id == gs.id {
                let d = (ws.logprob - gs.logprob).abs();
                worst = worst.max(d);
                compared += 1;
                assert!(d <= RECOMPUTE_TOLERANCE, "{at}: log-probability {d} apart");
                continue;
            }
            let (first, second) = (&ws.top[0], &ws.top[1]);
            assert!(
                first.logprob - second.logprob <= RECOMPUTE_TOLERANCE && second.id == gs.id,
                "{at}: parted where the undamaged run was not near a tie \
                 ({first:?} against {second:?}, damaged took {})",
                gs.id
            );
            println!("{at}: parted at a near-tie");
            parted.push(w.app);
            break;
        }
        if !parted.contains(&w.app) {
            assert_eq!(g.text, w.text, "{at}");
        }
    }
    (compared, worst)
}

/// Swap files corrupted, truncated or deleted behind the daemon's back (while it runs, and
/// while it is stopped) are detected when read and their chunks recomputed from the
/// context's tokens: the answers are those of an undamaged run, up to float tolerance.
#[test]
fn damaged_swap_files_are_detected_and_recomputed() {
    let (want, _) = damaged_conversation(false);
    let (got, log) = damaged_conversation(true);
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("recomputing")).collect();
    println!(
        "{} damage warnings, e.g. {:?}",
        warnings.len(),
        warnings.first()
    );
    assert!(
        log.contains("unusable, recomputing"),
        "the damage was never detected:\n{log}"
    );
    let (compared, worst) = same_up_to_float_tolerance(&want, &got);
    println!("{compared} tokens compared, log-probabilities at most {worst} apart");
    // The first damaged turn of every app is compared at least up to a parting.
    assert!(
        compared >= DAMAGE.len() * 4,
        "only {compared} tokens compared"
    );
    assert!(!log.contains("panicked"), "{log}");
}
