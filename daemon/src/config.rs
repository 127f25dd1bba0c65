//! `llmsd serve` configuration: a TOML file, overridden by flags and `LLMSD_*` variables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llmsd_ipc::Priority;
use serde::Deserialize;

use crate::kvstore::Policy;
use crate::service::identity::AdminPolicy;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The file's shape. Every key is optional; unknown keys are errors (a typo should not be
/// silently ignored by a system service).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub model: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    /// `ADDR:PORT` or `off`.
    pub http: Option<String>,
    /// Allow the HTTP door on a non-loopback address.
    pub http_allow_remote: bool,
    /// Callers without an API key are the `anonymous` app (otherwise refused).
    pub http_allow_anonymous: Option<bool>,
    /// API key → app name.
    pub http_keys: HashMap<String, String>,
    pub http_max_body_bytes: Option<usize>,
    pub state_dir: Option<PathBuf>,
    /// `session`, `system` or `off`.
    pub bus: Option<String>,
    pub threads: Option<usize>,
    /// Members of this group (and root, and the daemon's own uid) may use admin verbs.
    pub admin_group: Option<String>,
    pub kv: KvSection,
    pub scheduler: SchedulerSection,
    pub memory: MemorySection,
    /// Per-app settings, by app name.
    pub apps: HashMap<String, AppSection>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvSection {
    pub budget_mib: Option<u64>,
    pub policy: Option<String>,
    pub bits_avg: Option<f64>,
    pub max_context_tokens: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    pub max_running: Option<usize>,
    pub max_queued: Option<usize>,
    pub step_prefill_tokens: Option<usize>,
    pub alone_prefill_tokens: Option<usize>,
    pub prefill_latency_factor: Option<f64>,
}

/// The memory budget and how the daemon reacts to memory pressure (see `memory.rs`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemorySection {
    /// Total for weights + KV + scratch; without `[kv] budget_mib`, the KV budget is what
    /// the model file and the measured scratch leave of it.
    pub budget_mib: Option<u64>,
    /// Shrink the KV budget under system memory pressure [default: true].
    pub pressure: Option<bool>,
    /// The KV budget never goes below this [default: 8].
    pub min_kv_mib: Option<u64>,
    /// How often RSS and pressure are sampled [default: 1000].
    pub interval_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppSection {
    pub priority: Option<Priority>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let c: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(p) = &c.kv.policy {
            p.parse::<Policy>().map_err(|e| e.to_string())?;
        }
        for (key, app) in &c.http_keys {
            crate::service::identity::validate_app(app).map_err(|e| e.message)?;
            if key.len() < 8 {
                return Err(format!(
                    "http_keys: key for app {app:?} is shorter than 8 characters"
                ));
            }
        }
        Ok(c)
    }
}

/// Where the D-Bus door goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusChoice {
    Session,
    System,
    Off,
}

impl std::str::FromStr for BusChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "session" => Ok(BusChoice::Session),
            "system" => Ok(BusChoice::System),
            "off" => Ok(BusChoice::Off),
            other => Err(ConfigError::Invalid(format!(
                "bus must be session, system or off, got {other:?}"
            ))),
        }
    }
}

/// The HTTP door's address, refusing a non-loopback one unless allowed.
pub fn http_addr(
    spec: &str,
    allow_remote: bool,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    if spec == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = spec.parse().map_err(|_| {
        ConfigError::Invalid(format!("http must be ADDR:PORT or off, got {spec:?}"))
    })?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(ConfigError::Invalid(format!(
            "refusing to serve HTTP on non-loopback {addr}: set http_allow_remote = true in the \
             config file to allow it"
        )));
    }
    Ok(Some(addr))
}

/// Resolves the admin group (if any) into the policy the doors check callers against.
pub fn admin_policy(group: Option<&str>) -> Result<AdminPolicy, ConfigError> {
    let mut policy = AdminPolicy {
        daemon_uid: own_uid(),
        ..AdminPolicy::default()
    };
    let Some(name) = group else {
        return Ok(policy);
    };
    let g = nix::unistd::Group::from_name(name)
        .map_err(|e| ConfigError::Invalid(format!("admin_group {name:?}: {e}")))?
        .ok_or_else(|| ConfigError::Invalid(format!("admin_group {name:?}: no such group")))?;
    policy.admin_gid = Some(g.gid.as_raw());
    for member in &g.mem {
        match nix::unistd::User::from_name(member) {
            Ok(Some(u)) => policy.member_uids.push(u.uid.as_raw()),
            _ => tracing::warn!("admin_group {name:?}: member {member:?} is not a known user"),
        }
    }
    Ok(policy)
}

/// Default paths of DESIGN.md: per user, or system-wide.
pub fn default_socket(system: bool) -> PathBuf {
    if system {
        return PathBuf::from("/run/llmsd/llmsd.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("llmsd/llmsd.sock"),
        _ => std::env::temp_dir().join(format!("llmsd-{}/llmsd.sock", own_uid())),
    }
}

pub fn default_state_dir(system: bool) -> PathBuf {
    if system {
        return PathBuf::from("/var/lib/llmsd");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("llmsd");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/llmsd"),
        None => PathBuf::from("/var/lib/llmsd"),
    }
}

/// The daemon's own uid.
fn own_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_group_resolves_or_is_refused() {
        let p = admin_policy(Some("root")).unwrap();
        assert_eq!(p.admin_gid, Some(0));
        assert_eq!(p.daemon_uid, own_uid());
        assert!(admin_policy(Some("no-such-group-llmsd")).is_err());
        assert_eq!(admin_policy(None).unwrap().admin_gid, None);
    }

    #[test]
    fn full_file_parses() {
        let c = ConfigFile::parse(
            r#"
            model = "/models/m.gguf"
            http = "127.0.0.1:9000"
            bus = "off"
            threads = 2
            [kv]
            budget_mib = 64
            policy = "llms"
            [scheduler]
            max_running = 4
            [memory]
            budget_mib = 512
            pressure = true
            min_kv_mib = 16
            interval_ms = 500
            [apps.notes]
            priority = "foreground"
            [http_keys]
            "sk-test-123456" = "notes"
            "#,
        )
        .unwrap();
        assert_eq!(c.kv.budget_mib, Some(64));
        assert_eq!(c.memory.budget_mib, Some(512));
        assert_eq!(c.memory.interval_ms, Some(500));
        assert_eq!(c.apps["notes"].priority, Some(Priority::Foreground));
        assert_eq!(c.http_keys["sk-test-123456"], "notes");
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(ConfigFile::parse("modle = 'x'")
            .unwrap_err()
            .contains("modle"));
        assert!(ConfigFile::parse("[kv]\npolicy = 'fast'").is_err());
        assert!(ConfigFile::parse("[http_keys]\n'k' = 'a'").is_err());
        assert!(ConfigFile::parse("[http_keys]\n'longenoughkey' = 'a b'").is_err());
    }

    #[test]
    fn remote_http_needs_consent() {
        assert!(http_addr("0.0.0.0:8460", false).is_err());
        assert!(http_addr("0.0.0.0:8460", true).unwrap().is_some());
        assert!(http_addr("127.0.0.1:8460", false).unwrap().is_some());
        assert_eq!(http_addr("off", false).unwrap(), None);
        assert!(http_addr("localhost", false).is_err());
    }
}
