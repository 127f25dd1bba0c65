//! The KV store's I/O thread: swap-out writes happen here, off the token path.
//!
//! Jobs run in submission order, so a manifest queued after a call's chunk files is written
//! only once those files are durable. Results come back as [`Done`] records the store drains
//! when it next runs; [`IoThread::flush`] waits for everything queued so far, and
//! [`IoThread::submitted`] / [`IoThread::completed`] let a caller wait without blocking.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The longest the I/O thread stays held at one yield point, whatever the holders: durable
/// writes hold replies back, so a hold must stay short.
const MAX_HOLD: Duration = Duration::from_millis(20);

/// Holds the I/O thread back while the engine needs every core for a moment (a restore read
/// split across the pool). Without it the thread's writes keep a core, and on a 2-core machine
/// the pool's second thread joins a 1 ms restore half a millisecond late: the scheduler lets
/// a running thread finish its slice before a woken one gets the core.
///
/// The thread stops at its next yield point (before a job, before each section a segment write
/// writes) until every [`HoldGuard`] is dropped, or [`MAX_HOLD`] has passed.
#[derive(Debug, Default)]
pub struct IoHold {
    held: AtomicBool,
    holders: Mutex<usize>,
    released: Condvar,
}

impl IoHold {
    /// Holds the thread until the guard is dropped.
    pub fn hold(self: &Arc<Self>) -> HoldGuard {
        let mut n = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        self.held.store(true, Ordering::Release);
        HoldGuard(Arc::clone(self))
    }

    /// Waits while held (at most [`MAX_HOLD`]); returns at once otherwise.
    pub fn yield_point(&self) {
        if !self.held.load(Ordering::Acquire) {
            return;
        }
        let deadline = Instant::now() + MAX_HOLD;
        let mut n = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = self
                .released
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Releases an [`IoHold`] when dropped.
#[derive(Debug)]
pub struct HoldGuard(Arc<IoHold>);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let mut n = self.0.holders.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.held.store(false, Ordering::Release);
            self.0.released.notify_all();
        }
    }
}

/// What a job reports: which write it was (the store's tag) and how it went.
#[derive(Debug)]
pub struct Done {
    pub tag: u64,
    pub result: Result<u64, String>,
}

type Job = Box<dyn FnOnce() -> Option<Done> + Send>;

enum Msg {
    Run(Job),
    Flush(mpsc::Sender<()>),
}

pub struct IoThread {
    tx: Option<mpsc::Sender<Msg>>,
    delay: Option<std::time::Duration>,
    done: Arc<Mutex<Vec<Done>>>,
    /// Jobs queued so far, and jobs finished (in order: every job up to it has run).
    submitted: AtomicU64,
    completed: Arc<AtomicU64>,
    hold: Arc<IoHold>,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let done = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&done);
        // Fault injection for crash tests: every job waits this long first, so a test can
        // kill the process while swap-out is under way.
        let delay = std::env::var("LLMSD_FAULT_IO_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis);
        let job_delay = delay;
        let completed = Arc::new(AtomicU64::new(0));
        let finished = Arc::clone(&completed);
        let hold = Arc::new(IoHold::default());
        let held = Arc::clone(&hold);
        let handle = std::thread::Builder::new()
            .name("llmsd-kv-io".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Msg::Run(job) => {
                            held.yield_point();
                            if let Some(d) = job_delay {
                                std::thread::sleep(d);
                            }
                            if let Some(d) = job() {
                                if let Err(e) = &d.result {
                                    tracing::warn!(tag = d.tag, "KV swap-out failed: {e}");
                                }
                                sink.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                            }
                            finished.fetch_add(1, Ordering::Release);
                        }
                        Msg::Flush(ack) => {
                            let _ = ack.send(());
                        }
                    }
                }
            })?;
        Ok(IoThread {
            tx: Some(tx),
            delay,
            done,
            submitted: AtomicU64::new(0),
            completed,
            hold,
            handle: Some(handle),
        })
    }

    /// The fault-injection delay (`LLMSD_FAULT_IO_DELAY_MS`) every job waits first, if set;
    /// a job writing several things may wait it again between them.
    pub fn fault_delay(&self) -> Option<std::time::Duration> {
        self.delay
    }

    /// The thread's hold: jobs call [`IoHold::yield_point`] between their parts, the engine
    /// holds it around work that needs every core.
    pub fn hold(&self) -> &Arc<IoHold> {
        &self.hold
    }

    /// Queues a job; it reports a [`Done`] if it returns one.
    pub fn submit(&self, job: impl FnOnce() -> Option<Done> + Send + 'static) {
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(Msg::Run(Box::new(job))).is_ok());
        if sent == Some(true) {
            self.submitted.fetch_add(1, Ordering::Release);
        } else {
            tracing::error!("KV I/O thread is gone; a swap-out was dropped");
        }
    }

    /// How many jobs were queued so far: a mark to compare with [`Self::completed`].
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Acquire)
    }

    /// How many jobs have run (successfully or not); jobs run in order, so every job up to
    /// this count has.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    /// Waits until every job queued before this call has run.
    pub fn flush(&self) {
        let (ack, wait) = mpsc::channel();
        if let Some(tx) = &self.tx {
            if tx.send(Msg::Flush(ack)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Results of the jobs that finished since the last call.
    pub fn take_done(&self) -> Vec<Done> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Closing the channel lets the thread finish the queue and exit: nothing queued is lost.
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_and_flush_waits() {
        let io = IoThread::start().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..50u64 {
            let log = Arc::clone(&log);
            io.submit(move || {
                log.lock().unwrap().push(i);
                (i % 10 == 0).then_some(Done {
                    tag: i,
                    result: Ok(i),
                })
            });
        }
        assert_eq!(io.submitted(), 50);
        io.flush();
        assert_eq!(io.completed(), 50);
        assert_eq!(*log.lock().unwrap(), (0..50).collect::<Vec<_>>());
        let done: Vec<u64> = io.take_done().iter().map(|d| d.tag).collect();
        assert_eq!(done, vec![0, 10, 20, 30, 40]);
        assert!(io.take_done().is_empty());
    }

    #[test]
    fn drop_finishes_the_queue() {
        let log = Arc::new(Mutex::new(0));
        {
            let io = IoThread::start().unwrap();
            for _ in 0..20 {
                let log = Arc::clone(&log);
                io.submit(move || {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    *log.lock().unwrap() += 1;
                    None
                });
            }
        }
        assert_eq!(*log.lock().unwrap(), 20);
    }

    #[test]
    fn a_held_thread_waits_at_its_yield_point_until_released() {
        let io = IoThread::start().unwrap();
        let guard = io.hold().hold();
        let held_at = Instant::now();
        let passed = Arc::new(Mutex::new(None));
        let (hold, seen) = (Arc::clone(io.hold()), Arc::clone(&passed));
        io.submit(move || {
            hold.yield_point();
            *seen.lock().unwrap() = Some(Instant::now());
            None
        });
        std::thread::sleep(Duration::from_millis(2));
        let released_at = Instant::now();
        drop(guard);
        io.flush();
        let passed = passed.lock().unwrap().expect("job ran");
        // Only the release (or the cap) lets it through.
        assert!(passed >= released_at || passed - held_at >= MAX_HOLD);
    }

    #[test]
    fn a_hold_never_released_stops_the_thread_for_at_most_max_hold() {
        let io = IoThread::start().unwrap();
        let held_at = Instant::now();
        std::mem::forget(io.hold().hold());
        let hold = Arc::clone(io.hold());
        io.submit(move || {
            hold.yield_point();
            None
        });
        io.flush();
        assert_eq!(io.completed(), 1);
        assert!(held_at.elapsed() >= MAX_HOLD);
    }
}
