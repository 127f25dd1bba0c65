//! `llmsd serve` configuration: a TOML file, overridden by flags and `LLMSD_*` variables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llmsd_ipc::{Door, Priority, Quota};
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
    /// What can be measured again (fitted restore cost models); default: the state dir.
    pub cache_dir: Option<PathBuf>,
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
    /// Every app's quota defaults (the keys of `[apps.NAME]`'s quotas).
    pub quotas: Quota,
    pub energy: EnergySection,
    pub limits: LimitsSection,
}

/// `[limits]`: what one client may cost the daemon.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// How long a streaming call may wait on a client that does not read it before the call
    /// is cancelled (and a socket connection closed) [default: 10000].
    pub slow_client_timeout_ms: Option<u64>,
}

/// `[energy]`: how energy is measured and what battery power changes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnergySection {
    /// `auto` (RAPL when readable, else CPU time), `rapl` or `cpu`.
    pub source: Option<crate::service::energy::SourceChoice>,
    /// Watts one busy core draws, for the CPU-time model.
    pub watts_per_core: Option<f64>,
    /// `joules_per_hour` quotas are multiplied by this on battery (0-1).
    pub battery_factor: Option<f64>,
    /// Refuse background prompts on battery.
    pub block_background_on_battery: Option<bool>,
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
    pub tokens_per_min: Option<u64>,
    pub joules_per_hour: Option<f64>,
    pub max_contexts: Option<u32>,
    pub max_context_tokens: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub doors: Option<Vec<Door>>,
    pub background_allowed: Option<bool>,
}

impl AppSection {
    /// The app's quota keys (`priority` included: the owner's pin).
    pub fn quota(&self) -> Quota {
        Quota {
            tokens_per_min: self.tokens_per_min,
            joules_per_hour: self.joules_per_hour,
            max_contexts: self.max_contexts,
            max_context_tokens: self.max_context_tokens,
            max_concurrent: self.max_concurrent,
            doors: self.doors.clone(),
            background_allowed: self.background_allowed,
            priority: self.priority,
        }
    }
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
        c.quotas.validate().map_err(|e| format!("quotas: {e}"))?;
        for (name, app) in &c.apps {
            crate::service::identity::validate_app(name).map_err(|e| e.message)?;
            app.quota()
                .validate()
                .map_err(|e| format!("apps.{name}: {e}"))?;
        }
        crate::service::energy::validate(c.energy.watts_per_core, c.energy.battery_factor)?;
        if c.limits.slow_client_timeout_ms == Some(0) {
            return Err("limits.slow_client_timeout_ms must be at least 1".into());
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

/// A non-loopback HTTP door must require API keys: at least one in `[http_keys]` and no
/// anonymous callers (`http_allow_anonymous` unset means false there). Callers from the
/// network have no uid to scope them: a key is all that tells their apps apart.
pub fn check_remote_http(
    addr: std::net::SocketAddr,
    keys: usize,
    allow_anonymous: Option<bool>,
) -> Result<(), ConfigError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if keys == 0 {
        return Err(ConfigError::Invalid(format!(
            "refusing to serve HTTP on non-loopback {addr} without API keys: add [http_keys]"
        )));
    }
    if allow_anonymous == Some(true) {
        return Err(ConfigError::Invalid(format!(
            "refusing to serve HTTP on non-loopback {addr} to anonymous callers: remove \
             http_allow_anonymous = true"
        )));
    }
    Ok(())
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

/// Where `serve` looks for its configuration when none is named: `/etc/llmsd/llmsd.toml` for
/// the system service, `$XDG_CONFIG_HOME/llmsd/llmsd.toml` (`~/.config/...`) per user.
pub fn default_config_path(system: bool) -> Option<PathBuf> {
    if system {
        return Some(PathBuf::from("/etc/llmsd/llmsd.toml"));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("llmsd/llmsd.toml"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".config/llmsd/llmsd.toml"))
}

/// The configuration `serve` runs with, and the file it came from: the named file (which must
/// exist), else the default location's file if there is one, else the defaults.
pub fn load_config(
    explicit: Option<&Path>,
    system: bool,
) -> Result<(ConfigFile, Option<PathBuf>), ConfigError> {
    if let Some(p) = explicit {
        return Ok((ConfigFile::load(p)?, Some(p.to_path_buf())));
    }
    let Some(p) = default_config_path(system) else {
        return Ok((ConfigFile::default(), None));
    };
    match ConfigFile::load(&p) {
        Ok(c) => Ok((c, Some(p))),
        Err(ConfigError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok((ConfigFile::default(), None))
        }
        Err(e) => Err(e),
    }
}

/// What `llmsd config check` finds wrong in a parsed file beyond its syntax: values `serve`
/// would refuse (errors), and settings that run but likely not as meant (warnings).
#[derive(Debug, Default, PartialEq)]
pub struct CheckReport {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Paths the system unit hides from the daemon (`ProtectHome=yes`).
const HIDDEN_FROM_SYSTEM_SERVICE: [&str; 3] = ["/home", "/root", "/run/user"];

impl ConfigFile {
    /// The semantic checks of `llmsd config check`; `system` checks it as the system
    /// service's file (absolute paths, nothing under the homes the unit hides).
    pub fn check(&self, system: bool) -> CheckReport {
        let mut r = CheckReport::default();
        if let Some(http) = &self.http {
            let addr = http_addr(http, self.http_allow_remote).and_then(|a| {
                a.map_or(Ok(()), |a| {
                    check_remote_http(a, self.http_keys.len(), self.http_allow_anonymous)
                })
            });
            if let Err(e) = addr {
                r.errors.push(e.to_string());
            }
        }
        if let Some(bus) = &self.bus {
            if let Err(e) = bus.parse::<BusChoice>() {
                r.errors.push(e.to_string());
            }
        }
        if self.threads == Some(0) {
            r.errors.push("threads must be at least 1".into());
        }
        if let Err(e) = admin_policy(self.admin_group.as_deref()) {
            r.errors.push(e.to_string());
        }
        if self.kv.budget_mib == Some(0) {
            r.errors.push("kv.budget_mib must be at least 1".into());
        }
        if let Some(b) = self.kv.bits_avg {
            if !(b.is_finite() && b > 0.0) {
                r.errors
                    .push(format!("kv.bits_avg must be positive, got {b}"));
            }
        }
        if self.kv.max_context_tokens == Some(0) {
            r.errors
                .push("kv.max_context_tokens must be at least 1".into());
        }
        if let Some(f) = self.scheduler.prefill_latency_factor {
            if !(f.is_finite() && f > 0.0) {
                r.errors.push(format!(
                    "scheduler.prefill_latency_factor must be positive, got {f}"
                ));
            }
        }
        match &self.model {
            Some(m) => {
                if let Err(e) = check_gguf(m) {
                    r.errors.push(format!("model {}: {e}", m.display()));
                }
            }
            None if system => r.warnings.push(
                "model is not set: the system service looks for models/ in its working \
                 directory (/); set model to an absolute path"
                    .into(),
            ),
            None => {}
        }
        if let Some(d) = &self.state_dir {
            if d.exists() && !d.is_dir() {
                r.errors
                    .push(format!("state_dir {} is not a directory", d.display()));
            }
        }
        if system {
            let paths = [
                ("model", &self.model),
                ("state_dir", &self.state_dir),
                ("socket", &self.socket),
            ];
            for (key, path) in paths {
                let Some(p) = path else { continue };
                if p.is_relative() {
                    r.warnings.push(format!(
                        "{key} {} is relative: the system service runs in /",
                        p.display()
                    ));
                } else if HIDDEN_FROM_SYSTEM_SERVICE.iter().any(|h| p.starts_with(h)) {
                    r.warnings.push(format!(
                        "{key} {} is under a home directory, which llmsd.service hides \
                         (ProtectHome=yes)",
                        p.display()
                    ));
                }
            }
        }
        r
    }
}

/// A readable file that starts like a GGUF model.
fn check_gguf(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err("not a file".into());
    }
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|_| "too short to be a GGUF file".to_string())?;
    if &magic != b"GGUF" {
        return Err("not a GGUF file".into());
    }
    Ok(())
}

/// A `MemoryMax=` for the daemon's unit: 1.5x the model file (its weights as the engine holds
/// them: SmolLM2's 94 MiB file came to 135 MiB resident), the KV budget, and 256 MiB for the
/// rest (activations, tokenizer, buffers, swap-file page cache), rounded up to MiB.
pub fn suggested_memory_max(model_bytes: u64, kv_budget_bytes: u64) -> u64 {
    const RUNTIME_MARGIN: u64 = 256 << 20;
    let total = model_bytes + model_bytes / 2 + kv_budget_bytes + RUNTIME_MARGIN;
    total.div_ceil(1 << 20) << 20
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
            [limits]
            slow_client_timeout_ms = 2500
            "#,
        )
        .unwrap();
        assert_eq!(c.limits.slow_client_timeout_ms, Some(2500));
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
    fn quotas_and_energy_parse_and_bad_values_are_refused() {
        let c = ConfigFile::parse(
            r#"
            [quotas]
            tokens_per_min = 6000
            max_contexts = 16
            [apps.notes]
            priority = "foreground"
            joules_per_hour = 50.5
            doors = ["socket", "dbus"]
            background_allowed = false
            [energy]
            source = "cpu"
            watts_per_core = 6.5
            battery_factor = 0.25
            block_background_on_battery = true
            "#,
        )
        .unwrap();
        assert_eq!(c.quotas.tokens_per_min, Some(6000));
        let notes = c.apps["notes"].quota();
        assert_eq!(notes.joules_per_hour, Some(50.5));
        assert_eq!(notes.doors, Some(vec![Door::Socket, Door::Dbus]));
        assert_eq!(notes.priority, Some(Priority::Foreground));
        assert_eq!(
            c.energy.source,
            Some(crate::service::energy::SourceChoice::Cpu)
        );
        for bad in [
            "[quotas]\njoules_per_hour = -1.0",
            "[quotas]\ntokens_per_min = -5",
            "[quotas]\njoules_per_hour = nan",
            "[quotas]\ntokens_per_minute = 5",
            "[apps.x]\njoules_per_hour = inf",
            "[apps.x]\ndoors = [\"smtp\"]",
            "[apps.x]\ndoors = [\"http\", \"http\"]",
            "[apps.'a b']\nmax_contexts = 1",
            "[energy]\nsource = \"gpu\"",
            "[energy]\nwatts_per_core = 0.0",
            "[energy]\nbattery_factor = 2.0",
            "[energy]\nwatts = 4.0",
            "[limits]\nslow_client_timeout_ms = 0",
            "[limits]\nslow_client_timeout = 5",
        ] {
            assert!(ConfigFile::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ConfigFile::parse("[quotas]\njoules_per_hour = -1.0")
            .unwrap_err()
            .contains("joules_per_hour"));
    }

    #[test]
    fn remote_http_needs_consent() {
        assert!(http_addr("0.0.0.0:8460", false).is_err());
        assert!(http_addr("0.0.0.0:8460", true).unwrap().is_some());
        assert!(http_addr("127.0.0.1:8460", false).unwrap().is_some());
        assert_eq!(http_addr("off", false).unwrap(), None);
        assert!(http_addr("localhost", false).is_err());
    }

    #[test]
    fn remote_http_requires_keys_and_no_anonymous_callers() {
        let remote: std::net::SocketAddr = "0.0.0.0:8460".parse().unwrap();
        let local: std::net::SocketAddr = "[::1]:8460".parse().unwrap();
        assert!(check_remote_http(local, 0, Some(true)).is_ok());
        let e = check_remote_http(remote, 0, None).unwrap_err().to_string();
        assert!(e.contains("without API keys"), "{e}");
        let e = check_remote_http(remote, 1, Some(true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("anonymous"), "{e}");
        assert!(check_remote_http(remote, 1, None).is_ok());
        assert!(check_remote_http(remote, 1, Some(false)).is_ok());
        let keyless = ConfigFile::parse("http = \"0.0.0.0:8460\"\nhttp_allow_remote = true\n")
            .unwrap()
            .check(false);
        assert!(
            keyless
                .errors
                .iter()
                .any(|e| e.contains("without API keys")),
            "{keyless:?}"
        );
    }
}
