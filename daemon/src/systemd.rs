//! Running under systemd: listening sockets passed by socket activation (`LISTEN_FDS`),
//! readiness and status notifications, and the watchdog (`WATCHDOG_USEC`).

use std::io;
use std::time::Duration;

use crate::service::Service;

/// `STATUS=` while the engine misses its pings.
const NOT_ANSWERING: &str = "engine not answering";

/// How often `STATUS=` is refreshed when no watchdog asks for a shorter period.
const STATUS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "inherited socket {index} (fd {fd}) is neither a listening Unix stream socket (the \
         socket door) nor a TCP one (the HTTP door)"
    )]
    Unsupported { index: usize, fd: usize },
    #[error("systemd passed more than one {0} socket; llmsd serves one of each kind")]
    Duplicate(&'static str),
    #[error("inherited socket {index}: {source}")]
    Io { index: usize, source: io::Error },
}

/// Listening sockets the service manager passed (socket activation), by the door that serves
/// them. systemd owns them: the daemon neither creates nor removes their paths.
#[derive(Debug, Default)]
pub struct InheritedSockets {
    /// The socket door's listener (`ListenStream=/path` in the .socket unit).
    pub unix: Option<std::os::unix::net::UnixListener>,
    /// The HTTP door's listener (`ListenStream=ADDR:PORT`).
    pub tcp: Option<std::net::TcpListener>,
}

impl InheritedSockets {
    /// Takes the sockets passed with `LISTEN_FDS` (for this process: `LISTEN_PID`), each once,
    /// sorted by kind: a Unix stream listener and a TCP listener at most. Call it before any
    /// thread starts: it clears the variables so nothing else takes the descriptors.
    pub fn take_from_env() -> Result<Self, SystemdError> {
        let mut fds = listenfd::ListenFd::from_env();
        // listenfd clears LISTEN_PID and LISTEN_FDS; the names go with them.
        std::env::remove_var("LISTEN_FDNAMES");
        let mut sockets = InheritedSockets::default();
        for index in 0..fds.len() {
            let io_err = |source| SystemdError::Io { index, source };
            // Each take checks the descriptor's family and type and leaves it in place when
            // they do not match, so the next kind can be tried.
            if let Ok(Some(l)) = fds.take_unix_listener(index) {
                if sockets.unix.is_some() {
                    return Err(SystemdError::Duplicate("Unix"));
                }
                l.set_nonblocking(true).map_err(io_err)?;
                sockets.unix = Some(l);
            } else if let Ok(Some(l)) = fds.take_tcp_listener(index) {
                if sockets.tcp.is_some() {
                    return Err(SystemdError::Duplicate("TCP"));
                }
                l.set_nonblocking(true).map_err(io_err)?;
                sockets.tcp = Some(l);
            } else {
                return Err(SystemdError::Unsupported {
                    index,
                    fd: 3 + index,
                });
            }
        }
        Ok(sockets)
    }
}

/// The watchdog interval systemd expects pings within (`WatchdogSec=`), as `sd_watchdog_enabled`
/// reads it: `WATCHDOG_USEC`, for this process when `WATCHDOG_PID` says so (or does not say).
/// Clears both so no child inherits them; call it before any thread starts.
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_from_env`] on given values.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        None => {}
        Some(Ok(p)) if p == own_pid => {}
        Some(_) => return None,
    }
    Some(Duration::from_micros(usec))
}

/// Whether a service manager listens for notifications.
pub fn notify_socket_set() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// Sends states to the service manager, if any; a failure is logged, never fatal.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The one-line status `systemctl status` shows.
pub fn status_line(service: &Service) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let m = service.metrics();
    format!(
        "serving: {} contexts, {} running, {} queued",
        m.contexts.load(Relaxed),
        m.running.load(Relaxed),
        m.queued.load(Relaxed)
    )
}

/// Keeps the service manager informed (through `send`, [`notify`] in the daemon) until
/// dropped: every period (half the watchdog interval, or [`STATUS_EVERY`]), a round trip
/// through the engine thread; when it answers in time, `WATCHDOG=1` (if a watchdog is on) and
/// the `STATUS=` line when it changed. A hung or dead engine misses its pings and systemd
/// restarts the service.
pub async fn supervise(
    service: Service,
    watchdog: Option<Duration>,
    mut send: impl FnMut(&[sd_notify::NotifyState]),
) {
    let period = watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(Duration::from_millis(10)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    loop {
        tick.tick().await;
        match tokio::time::timeout(period, service.ping_engine()).await {
            Ok(Ok(())) => {
                let status = status_line(&service);
                let mut states = Vec::with_capacity(2);
                if watchdog.is_some() {
                    states.push(sd_notify::NotifyState::Watchdog);
                }
                if status != last_status {
                    states.push(sd_notify::NotifyState::Status(&status));
                }
                if !states.is_empty() {
                    send(&states);
                }
                last_status = status;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the engine did not answer; withholding the watchdog ping");
                send(&[sd_notify::NotifyState::Status(NOT_ANSWERING)]);
                last_status.clear();
            }
            Err(_) => {
                tracing::error!(
                    timeout_ms = period.as_millis() as u64,
                    "the engine did not answer in time; withholding the watchdog ping"
                );
                send(&[sd_notify::NotifyState::Status(NOT_ANSWERING)]);
                last_status.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use llmsd_engine::model::Model;
    use llmsd_engine::pool::ThreadPool;
    use llmsd_engine::tokenizer::Tokenizer;

    use super::*;
    use crate::kvstore::StoreConfig;
    use crate::service::{ServiceConfig, ServiceParts};

    #[test]
    fn the_watchdog_is_fed_while_the_engine_answers_and_starved_once_it_stops() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let model = Model::load(&path).expect("model loads (run scripts/fetch-models)");
        let tokenizer = Tokenizer::from_gguf(model.file()).expect("tokenizer");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = StoreConfig::new(dir.path());
        store.fit_costs = false;
        let (service, engine) = Service::start(ServiceParts {
            model: Arc::new(model),
            tokenizer,
            pool: Arc::new(ThreadPool::new(1).expect("pool")),
            model_id: "test".into(),
            store,
            service: ServiceConfig::default(),
        })
        .expect("service starts");
        let sent: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = {
            let sent = sent.clone();
            move |states: &[sd_notify::NotifyState]| {
                let line = states.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                sent.lock().unwrap().push(line.join("\n"));
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let watchdog = Some(Duration::from_millis(100));
        rt.block_on(async {
            let task = tokio::spawn(supervise(service.clone(), watchdog, record));
            tokio::time::sleep(Duration::from_millis(400)).await;
            let alive = sent.lock().unwrap().clone();
            assert!(alive.len() >= 3, "{alive:?}");
            assert!(
                alive.iter().all(|m| m.starts_with("WATCHDOG=1")),
                "{alive:?}"
            );
            assert_eq!(
                alive[0],
                "WATCHDOG=1\nSTATUS=serving: 0 contexts, 0 running, 0 queued"
            );
            // The status is sent again only when it changes.
            assert!(alive[1..].iter().all(|m| m == "WATCHDOG=1"), "{alive:?}");

            service.shutdown();
            tokio::task::spawn_blocking(move || engine.join())
                .await
                .unwrap()
                .unwrap();
            let before = sent.lock().unwrap().len();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let dead = sent.lock().unwrap()[before..].to_vec();
            task.abort();
            assert!(!dead.is_empty(), "the supervisor stopped reporting");
            assert!(
                dead.iter().all(|m| m == &format!("STATUS={NOT_ANSWERING}")),
                "a stopped engine must not feed the watchdog: {dead:?}"
            );
        });
    }

    #[test]
    fn watchdog_interval_follows_sd_watchdog_enabled() {
        let d = Some(Duration::from_secs(30));
        assert_eq!(watchdog_interval(Some("30000000"), None, 7), d);
        assert_eq!(watchdog_interval(Some("30000000"), Some("7"), 7), d);
        // Meant for another process (a parent that exec'd us without clearing it).
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("30000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
