//! Faults from outside: a full disk under the swap files, a damaged model file. The daemon
//! keeps serving (or refuses clearly at start) and loses no context.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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
