//! Looking at a running daemon from outside: its resident memory, its Prometheus metrics, and
//! plain HTTP/1.1 requests to its HTTP door.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub const MIB: f64 = 1048576.0;

/// VmRSS of a process, in bytes.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Samples a process's RSS every 20 ms on a thread of its own until stopped.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, samples, stop) = (peak.clone(), samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = vm_rss(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler {
            peak,
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; (peak bytes, samples taken).
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the RSS sampler ran");
        }
        (
            self.peak.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Writes one HTTP/1.1 request (`Connection: close`) on `s`.
pub fn send_http(s: &mut TcpStream, method: &str, path: &str, key: Option<&str>, body: &Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: llmsd\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
}

/// One HTTP/1.1 request over a fresh connection; (status, JSON body). Not for streams.
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP door");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    send_http(&mut s, method, path, key, body);
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let v = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    (status, v)
}

/// Prometheus text from `/metrics`.
pub fn metrics(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP door");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    send_http(&mut s, "GET", "/metrics", None, &Value::Null);
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read /metrics");
    raw.split_once("\r\n\r\n")
        .expect("a header block")
        .1
        .to_string()
}

/// The value of one sample (`name` with its labels, as printed).
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .parse()
        .expect("a number")
}

/// Sets a socket's receive buffer (before it fills: what a client that never reads holds).
pub fn set_rcvbuf(fd: std::os::fd::RawFd, bytes: i32) {
    // SAFETY: setsockopt on an open socket with a pointer to an i32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
