//! Looking at a running daemon from outside: its resident memory, its Prometheus metrics, and
//! plain HTTP/1.1 requests to its HTTP door.

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

/// Writes one HTTP/1.1 request (`Connection: close`) on `s`; a `Null` body is none.
pub fn send_http(s: &mut TcpStream, method: &str, path: &str, key: Option<&str>, body: &Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    super::http::send(s, method, path, key, body.as_bytes());
}

/// One HTTP/1.1 request over a fresh connection; (status, JSON body). Not for streams.
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let (status, _, v) =
        super::http::http(addr, method, path, key, (!body.is_null()).then_some(body));
    (status, v)
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
