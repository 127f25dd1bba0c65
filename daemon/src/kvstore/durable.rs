//! Durable small files: atomic replacement (write `<path>.tmp`, fsync, rename, fsync the
//! directory), checksummed JSON manifests, and private (0700) directories.
//!
//! # JSON envelope
//!
//! [`write_json_atomic`] writes exactly
//!
//! ```text
//! {"version":1,"crc32":<decimal crc>,"body":<compact JSON of the value>}\n
//! ```
//!
//! where the crc32 is over the body's bytes exactly as written. [`read_json`] does not
//! re-serialise anything: it checks that literal prefix, the canonical decimal crc, the
//! `,"body":` separator and the `}\n` suffix byte for byte, takes the text in between as the
//! body, and compares its crc before deserialising it. So a torn, truncated or hand-edited
//! file (even one that is still valid JSON) is reported as [`DurableError::Corrupt`], never
//! half-trusted.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `path` with ".tmp" appended (not replacing any extension).
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

/// Creates `tmp` fresh with mode 0600 (a stale file there is removed first, so the mode of
/// an old file is never inherited), writes `parts`, fsyncs, and renames it to `path`.
/// On failure the temporary file is removed (best effort).
pub(crate) fn write_file_atomic(path: &Path, parts: &[&[u8]]) -> std::io::Result<u64> {
    write_file_atomic_with(path, |f| {
        let mut len = 0u64;
        for p in parts {
            f.write_all(p)?;
            len += p.len() as u64;
        }
        Ok(len)
    })
}

/// Like [`write_file_atomic`], with the content written by `fill` (which returns the bytes it
/// wrote) into the fresh 0600 temporary file; then fsync and rename.
pub(crate) fn write_file_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<u64>,
) -> std::io::Result<u64> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let len = fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The envelope version written and accepted by [`write_json_atomic`] / [`read_json`].
pub const ENVELOPE_VERSION: u32 = 1;

const PREFIX: &str = "{\"version\":";
const CRC_KEY: &str = ",\"crc32\":";
const BODY_KEY: &str = ",\"body\":";
const SUFFIX: &str = "}\n";

/// Why a durable file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("state file I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("state file is corrupt: {0}")]
    Corrupt(String),
    #[error("state file body does not match the expected schema: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} is owned by uid {owner}, not by us (uid {uid})")]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
}

/// Our effective uid (the owner of the files we create).
///
/// Read from `/proc/self/status` (no `unsafe` needed, and readable even when the process is
/// not dumpable). Without /proc, falls back to creating a probe file in `dir` and reading
/// its owner.
fn effective_uid(dir: &Path) -> Result<u32, DurableError> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    let probe = dir.join(format!(".owner-probe-{}.tmp", std::process::id()));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    let uid = f.metadata().map(|m| m.uid());
    drop(f);
    std::fs::remove_file(&probe)?;
    Ok(uid?)
}

/// Creates `dir` (and parents) if missing and makes sure it is mode 0700 and owned by us.
///
/// Parents created here are 0700 too (subject to the umask); existing parents are left
/// alone. A symlink to a directory is followed and the target checked.
pub fn ensure_private_dir(dir: &Path) -> Result<(), DurableError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(DurableError::NotADirectory(dir.to_path_buf()));
    }
    let uid = effective_uid(dir)?;
    if meta.uid() != uid {
        return Err(DurableError::NotOwned {
            path: dir.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// fsync a directory (after renames into it), so the renames survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The directory holding `path` ("." for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` atomically with `bytes`: write `path.tmp` (0600), fsync, rename, fsync
/// the directory. A reader sees either the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    write_file_atomic(path, &[bytes])?;
    sync_dir(parent_dir(path))
}

/// The envelope text for `value` (see the module doc).
fn envelope<T: serde::Serialize>(value: &T) -> Result<String, DurableError> {
    let body = serde_json::to_string(value)?;
    let crc = crc32fast::hash(body.as_bytes());
    Ok(format!(
        "{PREFIX}{ENVELOPE_VERSION}{CRC_KEY}{crc}{BODY_KEY}{body}{SUFFIX}"
    ))
}

/// Serialises `value` as JSON inside a checksummed envelope
/// `{"version":1,"crc32":N,"body":{...}}` (crc over the body's serialised bytes) and writes
/// it with [`write_atomic`].
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), DurableError> {
    write_atomic(path, envelope(value)?.as_bytes())
}

/// Splits a leading canonical decimal u32 (no sign, no leading zeros) off `s`.
fn take_u32(s: &str) -> Option<(u32, &str)> {
    let end = s
        .bytes()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(s.len());
    let digits = &s[..end];
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    Some((digits.parse().ok()?, &s[end..]))
}

/// Checks the envelope and returns the verified body text.
fn open_envelope(bytes: &[u8]) -> Result<&str, DurableError> {
    let bad = |what: &str| DurableError::Corrupt(what.to_string());
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
    let rest = text
        .strip_prefix(PREFIX)
        .ok_or_else(|| bad("not a checksummed envelope"))?;
    let (version, rest) = take_u32(rest).ok_or_else(|| bad("bad version field"))?;
    if version != ENVELOPE_VERSION {
        return Err(DurableError::Corrupt(format!(
            "unsupported envelope version {version}"
        )));
    }
    let rest = rest
        .strip_prefix(CRC_KEY)
        .ok_or_else(|| bad("missing crc32 field"))?;
    let (crc, rest) = take_u32(rest).ok_or_else(|| bad("bad crc32 field"))?;
    let rest = rest
        .strip_prefix(BODY_KEY)
        .ok_or_else(|| bad("missing body field"))?;
    let body = rest
        .strip_suffix(SUFFIX)
        .ok_or_else(|| bad("truncated (no closing brace and newline)"))?;
    let got = crc32fast::hash(body.as_bytes());
    if got != crc {
        return Err(DurableError::Corrupt(format!(
            "body crc32 {got} does not match the recorded {crc}"
        )));
    }
    Ok(body)
}

/// Reads a file written by [`write_json_atomic`]: Ok(None) if it does not exist; Corrupt if
/// the envelope, version or crc is wrong; Json if the (intact) body does not deserialise
/// as `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, DurableError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let body = open_envelope(&bytes)?;
    Ok(Some(serde_json::from_str(body)?))
}

/// Removes stray `*.tmp` files (regular files only, not recursing) left by a crash in
/// `dir`; returns how many. Call it at startup, before anything writes into `dir`.
pub fn remove_stale_tmp(dir: &Path) -> Result<usize, DurableError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().as_bytes().ends_with(b".tmp") || !entry.file_type()?.is_file() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use serde::{Deserialize, Serialize};
    use std::time::{Duration, Instant};

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Manifest {
        app: String,
        contexts: Vec<(u64, Vec<u32>)>,
        note: Option<String>,
    }

    fn manifest() -> Manifest {
        Manifest {
            app: "org.example.notes".into(),
            contexts: vec![(1, vec![1, 2, 3]), (7, vec![]), (9, (0..100).collect())],
            note: Some("quotes \" and \\ and }\n and unicode é ✓".into()),
        }
    }

    #[test]
    fn json_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        assert!(read_json::<Manifest>(&path).unwrap().is_none());
        let m = manifest();
        write_json_atomic(&path, &m).unwrap();
        assert_eq!(read_json::<Manifest>(&path).unwrap(), Some(m.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("manifest.json.tmp").exists());
        // The text is the documented envelope, and the body is ordinary JSON.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"version\":1,\"crc32\":"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["body"]["app"], "org.example.notes");
        assert_eq!(v["crc32"].as_u64().unwrap() as u32, {
            let body = serde_json::to_string(&m).unwrap();
            crc32fast::hash(body.as_bytes())
        });
        // Replacing.
        let mut m2 = m.clone();
        m2.note = None;
        write_json_atomic(&path, &m2).unwrap();
        assert_eq!(read_json::<Manifest>(&path).unwrap(), Some(m2));
        // A body of another schema is a Json error, not Corrupt.
        write_json_atomic(&path, &vec![1, 2, 3]).unwrap();
        assert!(matches!(
            read_json::<Manifest>(&path),
            Err(DurableError::Json(_))
        ));
        // Non-object bodies work.
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), Some(vec![1, 2, 3]));
    }

    #[test]
    fn bare_file_name_uses_current_dir() {
        assert_eq!(parent_dir(Path::new("m.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/m.json")), Path::new("/a"));
    }

    #[test]
    fn every_flip_and_truncation_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        write_json_atomic(&path, &manifest()).unwrap();
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            for mask in [0x01u8, 0x20, 0x80] {
                let mut b = good.clone();
                b[i] ^= mask;
                std::fs::write(&path, &b).unwrap();
                match read_json::<Manifest>(&path) {
                    Err(DurableError::Corrupt(_)) => {}
                    other => panic!("byte {i} ^ {mask:#x}: {other:?}"),
                }
            }
        }
        for len in 0..good.len() {
            std::fs::write(&path, &good[..len]).unwrap();
            assert!(
                matches!(read_json::<Manifest>(&path), Err(DurableError::Corrupt(_))),
                "truncated to {len}"
            );
        }
    }

    #[test]
    fn edited_but_valid_json_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        write_json_atomic(&path, &manifest()).unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        for edited in [
            good.replace("org.example.notes", "org.example.evil!"),
            good.replace(",\"body\":", ", \"body\": "),
            good.replace("{\"version\":1", "{\"version\":2"),
            good.trim_end().to_string(),
            format!("{good}\n"),
            good.replacen("\"crc32\":", "\"crc32\":0", 1),
        ] {
            assert_ne!(edited, good);
            std::fs::write(&path, &edited).unwrap();
            assert!(
                matches!(read_json::<Manifest>(&path), Err(DurableError::Corrupt(_))),
                "{edited}"
            );
        }
        // The same edit with a recomputed crc is accepted: the crc is about integrity.
        let body = serde_json::to_string(&manifest())
            .unwrap()
            .replace("org.example.notes", "org.example.other");
        let crc = crc32fast::hash(body.as_bytes());
        std::fs::write(
            &path,
            format!("{{\"version\":1,\"crc32\":{crc},\"body\":{body}}}\n"),
        )
        .unwrap();
        assert_eq!(
            read_json::<Manifest>(&path).unwrap().unwrap().app,
            "org.example.other"
        );
    }

    #[test]
    fn take_u32_is_canonical() {
        assert_eq!(take_u32("0,"), Some((0, ",")));
        assert_eq!(take_u32("4294967295x"), Some((u32::MAX, "x")));
        assert_eq!(take_u32("4294967296"), None);
        assert_eq!(take_u32("01"), None);
        assert_eq!(take_u32("-1"), None);
        assert_eq!(take_u32(""), None);
    }

    #[test]
    fn private_dirs() {
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;

        let d = root.path().join("a/b/c");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        // Idempotent.
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);

        let loose = root.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);

        // Too tight (not even writable by us) is fixed too.
        let tight = root.path().join("tight");
        std::fs::create_dir(&tight).unwrap();
        std::fs::set_permissions(&tight, std::fs::Permissions::from_mode(0o500)).unwrap();
        ensure_private_dir(&tight).unwrap();
        assert_eq!(mode(&tight), 0o700);

        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(ensure_private_dir(&file).is_err());

        // Not ours: / is owned by root (skip when the tests run as root).
        let me = effective_uid(root.path()).unwrap();
        assert_eq!(me, std::fs::metadata(&file).unwrap().uid());
        if me != 0 {
            assert!(matches!(
                ensure_private_dir(Path::new("/")),
                Err(DurableError::NotOwned { owner: 0, .. })
            ));
        }
    }

    #[test]
    fn stale_tmp_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("a.kv.tmp"), b"x").unwrap();
        std::fs::write(p.join("manifest.json.tmp"), b"x").unwrap();
        std::fs::write(p.join("keep.kv"), b"x").unwrap();
        std::fs::write(p.join("tmp"), b"x").unwrap();
        std::fs::create_dir(p.join("sub.tmp")).unwrap();
        assert_eq!(remove_stale_tmp(p).unwrap(), 2);
        assert!(!p.join("a.kv.tmp").exists());
        assert!(!p.join("manifest.json.tmp").exists());
        assert!(p.join("keep.kv").exists() && p.join("tmp").exists());
        assert!(p.join("sub.tmp").is_dir());
        assert_eq!(remove_stale_tmp(p).unwrap(), 0);
    }

    #[test]
    fn write_atomic_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        write_atomic(&path, b"three").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        assert_eq!(remove_stale_tmp(dir.path()).unwrap(), 0);
    }

    // ---- crash safety: a child process rewriting a file is SIGKILLed at random times ----

    const CHILD_ENV: &str = "LLMSD_TEST_DURABLE_CRASH_CHILD";
    const CHILD_TEST: &str = "kvstore::durable::tests::crash_child_loop";

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Version {
        n: u64,
        payload: Vec<u64>,
    }

    /// Version `n`: its size varies with `n` and every element depends on `n`, so a torn
    /// mix of two versions cannot look like either.
    fn version(n: u64) -> Version {
        let len = 2000 + (n % 7) as usize * 1500;
        Version {
            n,
            payload: (0..len as u64)
                .map(|i| n.wrapping_mul(1_000_003) ^ i)
                .collect(),
        }
    }

    /// Not a real test: when started by `write_atomic_survives_kill_9` (with CHILD_ENV set),
    /// rewrites the file forever; otherwise returns at once.
    #[test]
    fn crash_child_loop() {
        let Some(path) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let path = PathBuf::from(path);
        let mut n = match read_json::<Version>(&path) {
            Ok(Some(v)) => v.n,
            _ => 0,
        };
        loop {
            n += 1;
            write_json_atomic(&path, &version(n)).unwrap();
        }
    }

    #[test]
    fn write_atomic_survives_kill_9() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let exe = std::env::current_exe().unwrap();
        let mut rng = rand::thread_rng();
        let mut last = 0u64;
        let rounds = 12;
        for round in 0..rounds {
            let mut child = std::process::Command::new(&exe)
                .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &path)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Wait until this child has completed a write (reading concurrently with its
            // renames, which must never show a torn file either), then let it run a little.
            let start = Instant::now();
            loop {
                match read_json::<Version>(&path) {
                    Ok(Some(v)) if v.n > last => break,
                    Ok(_) => {}
                    Err(e) => panic!("round {round}: concurrent read: {e}"),
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "child never wrote"
                );
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("child exited early: {status}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..40_000)));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();

            let v: Version = match read_json(&path) {
                Ok(Some(v)) => v,
                other => panic!("round {round}: after kill -9: {other:?}"),
            };
            assert_eq!(v, version(v.n), "round {round}: torn or mixed version");
            assert!(
                v.n > last,
                "round {round}: went back from {last} to {}",
                v.n
            );
            last = v.n;
        }
        println!("write_atomic kill -9: {rounds} rounds, reached version {last}, never torn");
        assert!(last >= rounds as u64);
        // At most the one in-flight temporary file is left behind.
        assert!(remove_stale_tmp(dir.path()).unwrap() <= 1);
    }
}
