//! The quota book: quotas per app (set by admins, persisted; defaults from the config) and
//! what every app used (sliding windows of tokens per minute and joules per hour, totals,
//! energy per context).
//!
//! Quotas and usage are keyed by app name, whichever uid or door uses it (as the config's
//! `[apps.NAME] priority` is). A call over a quota is refused at once with `QuotaExceeded` and
//! a retry-after, never queued: window quotas say when enough of the window will have
//! expired; limits that waiting alone does not lift (contexts, context length, doors) say
//! [`STATIC_RETRY_MS`]. Tokens counted are the prompt tokens actually prefilled plus the
//! tokens generated. A prompt is admitted while the app's window is under its limit, so one
//! prompt may overshoot by its own size.
//!
//! Files, both in the state directory, written atomically (0600, checksummed):
//! `quotas.json` (what admins set; rewritten on every set, unreadable = refuse to start) and
//! `usage.json` (windows, totals, energy per context; flushed at most every 10 s and at
//! shutdown, unreadable = start from zero).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llmsd_ipc::{ApiError, ErrorCode, Priority, Quota, QuotaKey, QuotaReport, QuotaUsage};
use serde::{Deserialize, Serialize};

use super::energy::{self, EnergyConfig};
use super::identity::{validate_app, Caller};
use crate::kvstore::durable::{self, DurableError};

/// Retry hint for limits that waiting alone does not lift: the app must free something
/// (delete a context, start a shorter one) or the owner raise its quota.
pub const STATIC_RETRY_MS: u64 = 60_000;
/// Retry hint when the app has its maximum of prompts in flight.
pub const CONCURRENT_RETRY_MS: u64 = 1_000;
/// How often usage is written while it changes.
const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Apps tracked at most (names are the callers' choice); idle ones without a set quota are
/// dropped beyond it, oldest first (their energy stays in the total).
const MAX_TRACKED_APPS: usize = 4096;

/// A sliding window of `span_ms`, kept in buckets of `bucket_ms`.
#[derive(Clone, Copy, Debug)]
struct Span {
    span_ms: u64,
    bucket_ms: u64,
}

const TOKENS: Span = Span {
    span_ms: 60_000,
    bucket_ms: 1_000,
};
const JOULES: Span = Span {
    span_ms: 3_600_000,
    bucket_ms: 60_000,
};

/// Amounts per bucket, oldest first: (bucket start, unix ms; amount). A bucket counts until
/// its end has left the window, so a window never under-counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
struct Window(VecDeque<(u64, f64)>);

impl Window {
    fn expires(s: Span, start: u64) -> u64 {
        start + s.bucket_ms + s.span_ms
    }

    fn add(&mut self, s: Span, now: u64, v: f64) {
        self.prune(s, now);
        let start = now - now % s.bucket_ms;
        match self.0.back_mut() {
            Some(last) if last.0 >= start => last.1 += v,
            _ => self.0.push_back((start, v)),
        }
    }

    fn prune(&mut self, s: Span, now: u64) {
        while self
            .0
            .front()
            .is_some_and(|&(start, _)| Self::expires(s, start) <= now)
        {
            self.0.pop_front();
        }
    }

    fn live(&self, s: Span, now: u64) -> impl Iterator<Item = (u64, f64)> + '_ {
        self.0
            .iter()
            .copied()
            .filter(move |&(start, _)| Self::expires(s, start) > now)
    }

    fn sum(&self, s: Span, now: u64) -> f64 {
        self.live(s, now).map(|(_, v)| v).sum()
    }

    /// Milliseconds until the window's sum is below `limit` (at least 1; the whole span for
    /// a limit of 0, which nothing gets under).
    fn retry_after(&self, s: Span, now: u64, limit: f64) -> u64 {
        let mut left = self.sum(s, now);
        for (start, v) in self.live(s, now) {
            left -= v;
            if left < limit {
                return (Self::expires(s, start) - now).max(1);
            }
        }
        s.span_ms
    }
}

/// What one app used.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct AppUsage {
    tokens: Window,
    joules: Window,
    tokens_total: u64,
    energy_j_total: f64,
    last_active_ms: u64,
    /// Prompts queued or running (not persisted: none survive a restart).
    #[serde(skip)]
    running: u32,
    /// Refusals by quota key (not persisted: Prometheus counters may restart).
    #[serde(skip)]
    refusals: BTreeMap<&'static str, u64>,
}

/// `usage.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct UsageFile {
    apps: BTreeMap<String, AppUsage>,
    /// Owner → context → joules.
    contexts: BTreeMap<String, BTreeMap<String, f64>>,
    /// Everything the meter measured while the engine worked.
    energy_total_j: f64,
}

/// `quotas.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct QuotasFile {
    apps: BTreeMap<String, Quota>,
}

/// Quota defaults and energy settings from the config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuotaConfig {
    /// `[quotas]`: every app's defaults.
    pub defaults: Quota,
    /// `[apps.NAME]`: per app, over the defaults.
    pub apps: HashMap<String, Quota>,
    pub energy: EnergyConfig,
}

impl QuotaConfig {
    /// Adds the owner's priority marks (`ServiceConfig::app_priority`) where an app's
    /// section sets none.
    pub fn with_priorities(mut self, marks: &HashMap<String, Priority>) -> Self {
        for (app, p) in marks {
            self.apps
                .entry(app.clone())
                .or_default()
                .priority
                .get_or_insert(*p);
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quotas file {path}: {source}")]
    File { path: PathBuf, source: DurableError },
    #[error("quotas file {path}: app {app:?}: {message}")]
    Invalid {
        path: PathBuf,
        app: String,
        message: String,
    },
}

/// What the engine thread charges to one request after a step.
#[derive(Clone, Debug)]
pub struct Charge<'a> {
    pub owner: &'a str,
    /// A persistent context (one-off calls have none to charge).
    pub context: Option<&'a str>,
    pub tokens: u64,
    pub joules: f64,
}

struct State {
    set: BTreeMap<String, Quota>,
    usage: UsageFile,
    dirty: bool,
    last_flush: Instant,
}

/// The quota book. Shared by the service (admission) and the engine thread (charges).
pub struct QuotaBook {
    quotas_path: PathBuf,
    usage_path: PathBuf,
    /// Replaced as a whole when the configuration is reloaded (SIGHUP).
    cfg: RwLock<Arc<QuotaConfig>>,
    energy_source: &'static str,
    state: Mutex<State>,
}

/// The app part of an owner key (`u1000:notes` → `notes`, `http:notes` → `notes`).
pub fn app_of(owner: &str) -> &str {
    owner.split_once(':').map_or(owner, |(_, app)| app)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An admitted prompt's place in its app's `max_concurrent`; freed when dropped.
pub struct QuotaSlot {
    book: Arc<QuotaBook>,
    app: String,
}

impl Drop for QuotaSlot {
    fn drop(&mut self) {
        if let Some(u) = self.book.lock().usage.apps.get_mut(&self.app) {
            u.running = u.running.saturating_sub(1);
        }
    }
}

impl std::fmt::Debug for QuotaSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuotaSlot({})", self.app)
    }
}

impl QuotaBook {
    /// Loads what admins set (an unreadable or invalid `quotas.json` is an error: the limits
    /// it holds must not silently vanish) and the usage so far (unreadable = from zero).
    pub fn open(
        state_dir: &Path,
        cfg: QuotaConfig,
        energy_source: &'static str,
    ) -> Result<Self, QuotaError> {
        let quotas_path = state_dir.join("quotas.json");
        let usage_path = state_dir.join("usage.json");
        let file_err = |source| QuotaError::File {
            path: quotas_path.clone(),
            source,
        };
        durable::ensure_private_dir(state_dir).map_err(file_err)?;
        let set = durable::read_json::<QuotasFile>(&quotas_path)
            .map_err(file_err)?
            .unwrap_or_default()
            .apps;
        for (app, q) in &set {
            validate_app(app)
                .map_err(|e| e.message)
                .and_then(|_| q.validate())
                .map_err(|message| QuotaError::Invalid {
                    path: quotas_path.clone(),
                    app: app.clone(),
                    message,
                })?;
        }
        let usage = match durable::read_json::<UsageFile>(&usage_path) {
            Ok(u) => u.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(path = %usage_path.display(), error = %e,
                    "usage file unreadable; app usage starts from zero");
                UsageFile::default()
            }
        };
        Ok(Self {
            quotas_path,
            usage_path,
            cfg: RwLock::new(Arc::new(cfg)),
            energy_source,
            state: Mutex::new(State {
                set,
                usage,
                dirty: false,
                last_flush: Instant::now(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is one step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cfg(&self) -> Arc<QuotaConfig> {
        Arc::clone(&self.cfg.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies reloaded configuration: quota defaults, per-app quotas and priorities, battery
    /// settings. What admins set at run time stays on top; the energy source and the sysfs
    /// roots stay as they were at start.
    pub fn reload(&self, mut cfg: QuotaConfig) {
        let old = self.cfg();
        cfg.energy.source = old.energy.source;
        cfg.energy.powercap_dir = old.energy.powercap_dir.clone();
        cfg.energy.power_supply_dir = old.energy.power_supply_dir.clone();
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
    }

    pub fn energy_source(&self) -> &'static str {
        self.energy_source
    }

    pub fn on_battery(&self) -> bool {
        energy::on_battery(&self.cfg().energy.power_supply_dir)
    }

    fn configured(&self, app: &str) -> Quota {
        let cfg = self.cfg();
        match cfg.apps.get(app) {
            Some(q) => cfg.defaults.overlaid(q),
            None => cfg.defaults.clone(),
        }
    }

    fn resolved(&self, st: &State, app: &str) -> Quota {
        match st.set.get(app) {
            Some(q) => self.configured(app).overlaid(q),
            None => self.configured(app),
        }
    }

    fn battery_scaled(&self, mut q: Quota, on_battery: bool) -> Quota {
        if on_battery {
            q.joules_per_hour = q
                .joules_per_hour
                .map(|j| j * self.cfg().energy.battery_factor);
        }
        q
    }

    /// The quota enforced now for `app`.
    pub fn effective(&self, app: &str) -> Quota {
        let q = self.resolved(&self.lock(), app);
        self.battery_scaled(q, self.on_battery())
    }

    /// The priority the owner pins `app` at.
    pub fn priority(&self, app: &str) -> Priority {
        self.resolved(&self.lock(), app)
            .priority
            .unwrap_or_default()
    }

    /// Counts a refusal and builds its error.
    fn refuse(st: &mut State, app: &str, key: QuotaKey, e: ApiError) -> ApiError {
        let u = st.usage.apps.entry(app.to_string()).or_default();
        *u.refusals.entry(key.name()).or_default() += 1;
        e
    }

    fn door_check(st: &mut State, q: &Quota, caller: &Caller) -> Result<(), ApiError> {
        match &q.doors {
            Some(doors) if !doors.contains(&caller.door) => {
                let allowed: Vec<&str> = doors.iter().map(|d| d.name()).collect();
                let e = ApiError::quota(
                    STATIC_RETRY_MS,
                    format!(
                        "app {} may not use the {} door (quota doors: {})",
                        caller.app,
                        caller.door,
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                );
                Err(Self::refuse(st, &caller.app, QuotaKey::Doors, e))
            }
            _ => Ok(()),
        }
    }

    /// Context operations that cost resources (create, fork) go through allowed doors only.
    pub fn check_door(&self, caller: &Caller) -> Result<(), ApiError> {
        let mut st = self.lock();
        let q = self.resolved(&st, &caller.app);
        Self::door_check(&mut st, &q, caller)
    }

    /// Admits a prompt of `caller` that declared `declared`: checks the door, background
    /// policy, prompts in flight and both windows; returns the request's priority and its
    /// slot (held until the request ends).
    pub fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        declared: Priority,
    ) -> Result<(Priority, QuotaSlot), ApiError> {
        self.admit_at(caller, declared, now_ms())
    }

    fn admit_at(
        self: &Arc<Self>,
        caller: &Caller,
        declared: Priority,
        now: u64,
    ) -> Result<(Priority, QuotaSlot), ApiError> {
        let app = caller.app.as_str();
        // Reading the power supplies is file I/O: only when an answer depends on it.
        let mut st = self.lock();
        let q = self.resolved(&st, app);
        Self::door_check(&mut st, &q, caller)?;
        let priority = if declared == Priority::Background {
            Priority::Background
        } else {
            q.priority.unwrap_or_default()
        };
        let battery_matters = q.joules_per_hour.is_some()
            || (priority == Priority::Background && self.cfg().energy.block_background_on_battery);
        let on_battery = battery_matters && self.on_battery();
        if priority == Priority::Background {
            let why = if q.background_allowed == Some(false) {
                Some(format!("app {app} may not run background prompts"))
            } else if on_battery && self.cfg().energy.block_background_on_battery {
                Some("background prompts are blocked while on battery".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                let e = ApiError::new(ErrorCode::BackgroundBlocked, why);
                return Err(Self::refuse(&mut st, app, QuotaKey::BackgroundAllowed, e));
            }
        }
        let q = self.battery_scaled(q, on_battery);
        let u = st.usage.apps.entry(app.to_string()).or_default();
        let refusal = if let Some(max) = q.max_concurrent.filter(|&m| u.running >= m) {
            Some((
                QuotaKey::MaxConcurrent,
                ApiError::quota(
                    CONCURRENT_RETRY_MS,
                    format!(
                        "app {app} has {} prompts in flight (quota max_concurrent {max})",
                        u.running
                    ),
                ),
            ))
        } else if let Some(limit) = q
            .tokens_per_min
            .filter(|&l| u.tokens.sum(TOKENS, now) >= l as f64)
        {
            Some((
                QuotaKey::TokensPerMin,
                ApiError::quota(
                    u.tokens.retry_after(TOKENS, now, limit as f64),
                    format!(
                        "app {app} used {} tokens in the last minute (quota tokens_per_min {limit})",
                        u.tokens.sum(TOKENS, now) as u64
                    ),
                ),
            ))
        } else if let Some(limit) = q
            .joules_per_hour
            .filter(|&l| u.joules.sum(JOULES, now) >= l)
        {
            Some((
                QuotaKey::JoulesPerHour,
                ApiError::quota(
                    u.joules.retry_after(JOULES, now, limit),
                    format!(
                        "app {app} used {:.3} J in the last hour (quota joules_per_hour {limit}{})",
                        u.joules.sum(JOULES, now),
                        if on_battery { ", on battery" } else { "" }
                    ),
                ),
            ))
        } else {
            None
        };
        if let Some((key, e)) = refusal {
            *u.refusals.entry(key.name()).or_default() += 1;
            return Err(e);
        }
        u.running += 1;
        u.last_active_ms = now;
        Ok((
            priority,
            QuotaSlot {
                book: self.clone(),
                app: app.to_string(),
            },
        ))
    }

    /// Before a context is created for `app`; `held` counts its contexts (only called when
    /// the app has a limit).
    pub fn check_contexts(&self, app: &str, held: impl FnOnce() -> usize) -> Result<(), ApiError> {
        let mut st = self.lock();
        let max = self.resolved(&st, app).max_contexts;
        match max.map(|m| (m, held())) {
            Some((max, held)) if held >= max as usize => {
                let e = ApiError::quota(
                    STATIC_RETRY_MS,
                    format!(
                        "app {app} holds {held} contexts (quota max_contexts {max}); delete one first"
                    ),
                );
                Err(Self::refuse(&mut st, app, QuotaKey::MaxContexts, e))
            }
            _ => Ok(()),
        }
    }

    /// Tokens one context of `app` may hold, if limited.
    pub fn context_limit(&self, app: &str) -> Option<usize> {
        self.resolved(&self.lock(), app)
            .max_context_tokens
            .map(|t| t as usize)
    }

    /// A prompt of `tokens` over `app`'s `max_context_tokens` of `limit`.
    pub fn refuse_context_tokens(&self, app: &str, tokens: usize, limit: usize) -> ApiError {
        let e = ApiError::quota(
            STATIC_RETRY_MS,
            format!(
                "the prompt has {tokens} tokens; app {app} may hold at most {limit} per context \
                 (quota max_context_tokens), with room for one generated token"
            ),
        );
        Self::refuse(&mut self.lock(), app, QuotaKey::MaxContextTokens, e)
    }

    /// Charges what the engine did: `metered_j` is everything the meter measured, split
    /// among `charges` by the caller (what is not charged stays in the total only).
    pub fn record(&self, charges: &[Charge<'_>], metered_j: f64) {
        self.record_at(charges, metered_j, now_ms());
    }

    fn record_at(&self, charges: &[Charge<'_>], metered_j: f64, now: u64) {
        let mut st = self.lock();
        st.usage.energy_total_j += metered_j;
        for c in charges {
            let u = st
                .usage
                .apps
                .entry(app_of(c.owner).to_string())
                .or_default();
            if c.tokens > 0 {
                u.tokens.add(TOKENS, now, c.tokens as f64);
            }
            if c.joules > 0.0 {
                u.joules.add(JOULES, now, c.joules);
            }
            u.tokens_total += c.tokens;
            u.energy_j_total += c.joules;
            u.last_active_ms = now;
            if let Some(ctx) = c.context {
                *st.usage
                    .contexts
                    .entry(c.owner.to_string())
                    .or_default()
                    .entry(ctx.to_string())
                    .or_default() += c.joules;
            }
        }
        st.dirty = true;
        if st.usage.apps.len() > MAX_TRACKED_APPS {
            Self::prune_apps(&mut st);
        }
    }

    fn prune_apps(st: &mut State) {
        let mut idle: Vec<(u64, String)> = st
            .usage
            .apps
            .iter()
            .filter(|(app, u)| u.running == 0 && !st.set.contains_key(*app))
            .map(|(app, u)| (u.last_active_ms, app.clone()))
            .collect();
        idle.sort_unstable();
        let excess = st.usage.apps.len() - MAX_TRACKED_APPS * 3 / 4;
        for (_, app) in idle.into_iter().take(excess) {
            st.usage.apps.remove(&app);
        }
    }

    /// Joules spent on a context so far.
    pub fn context_energy(&self, owner: &str, ctx: &str) -> f64 {
        self.lock()
            .usage
            .contexts
            .get(owner)
            .and_then(|c| c.get(ctx))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn forget_context(&self, owner: &str, ctx: &str) {
        let mut st = self.lock();
        if let Some(c) = st.usage.contexts.get_mut(owner) {
            c.remove(ctx);
            if c.is_empty() {
                st.usage.contexts.remove(owner);
            }
            st.dirty = true;
        }
    }

    /// Applies `quota_set` (the caller is an admin) and persists it before it takes effect.
    pub fn set(&self, app: &str, quota: &Quota, clear: &[QuotaKey]) -> Result<(), ApiError> {
        validate_app(app)?;
        quota.validate().map_err(ApiError::invalid)?;
        let mut st = self.lock();
        let mut new = st.set.get(app).cloned().unwrap_or_default();
        for &k in clear {
            let mut probe = quota.clone();
            probe.clear(k);
            if probe != *quota {
                return Err(ApiError::invalid(format!("{k} is both set and cleared")));
            }
            new.clear(k);
        }
        new = new.overlaid(quota);
        let mut apps = st.set.clone();
        if new.is_empty() {
            apps.remove(app);
        } else {
            apps.insert(app.to_string(), new);
        }
        durable::write_json_atomic(&self.quotas_path, &QuotasFile { apps: apps.clone() })
            .map_err(|e| ApiError::internal(format!("saving the quotas: {e}")))?;
        st.set = apps;
        Ok(())
    }

    /// `app`'s quota report; `contexts` is what it holds (the KV store knows).
    pub fn report(&self, app: &str, contexts: u64) -> QuotaReport {
        let on_battery = self.on_battery();
        let now = now_ms();
        let st = self.lock();
        let set = st.set.get(app).cloned().unwrap_or_default();
        let effective = self.battery_scaled(self.resolved(&st, app), on_battery);
        let usage = match st.usage.apps.get(app) {
            Some(u) => QuotaUsage {
                tokens_last_min: u.tokens.sum(TOKENS, now) as u64,
                joules_last_hour: u.joules.sum(JOULES, now),
                contexts,
                running: u.running as u64,
                tokens_total: u.tokens_total,
                energy_j_total: u.energy_j_total,
                joules_per_token: if u.tokens_total > 0 {
                    u.energy_j_total / u.tokens_total as f64
                } else {
                    0.0
                },
            },
            None => QuotaUsage {
                contexts,
                ..QuotaUsage::default()
            },
        };
        QuotaReport {
            app: app.to_string(),
            set,
            config: self.configured(app),
            effective,
            on_battery,
            usage,
        }
    }

    /// Writes `usage.json` if it changed: at once with `force`, else at most every 10 s.
    pub fn flush(&self, force: bool) {
        let mut st = self.lock();
        if !st.dirty || (!force && st.last_flush.elapsed() < USAGE_FLUSH_INTERVAL) {
            return;
        }
        let now = now_ms();
        for u in st.usage.apps.values_mut() {
            u.tokens.prune(TOKENS, now);
            u.joules.prune(JOULES, now);
        }
        match durable::write_json_atomic(&self.usage_path, &st.usage) {
            Ok(()) => {
                st.dirty = false;
                st.last_flush = Instant::now();
            }
            Err(e) => {
                tracing::warn!(path = %self.usage_path.display(), error = %e, "saving app usage");
                // Try again at the next interval, not at every step.
                st.last_flush = Instant::now();
            }
        }
    }

    /// Prometheus text: the total energy, its source, the battery state, and per app its
    /// energy, tokens and refusals (by quota key).
    /// Energy measured since the state directory was created, in joules.
    pub fn total_energy_j(&self) -> f64 {
        self.lock().usage.energy_total_j
    }

    pub fn render_metrics(&self) -> String {
        let on_battery = self.on_battery();
        let st = self.lock();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP llmsd_{name} {help}");
            let _ = writeln!(out, "# TYPE llmsd_{name} {kind}");
        };
        head(
            &mut out,
            "energy_joules_total",
            "counter",
            "Energy the engine spent, all apps (see llmsd_energy_source).",
        );
        let _ = writeln!(out, "llmsd_energy_joules_total {}", st.usage.energy_total_j);
        head(
            &mut out,
            "energy_source",
            "gauge",
            "Where energy figures come from: rapl counters, or cpu time times watts per core.",
        );
        let _ = writeln!(
            out,
            "llmsd_energy_source{{source=\"{}\"}} 1",
            self.energy_source
        );
        head(
            &mut out,
            "on_battery",
            "gauge",
            "1 when the machine runs on battery.",
        );
        let _ = writeln!(out, "llmsd_on_battery {}", u8::from(on_battery));
        // App names are [A-Za-z0-9._-]: nothing to escape in a label.
        head(
            &mut out,
            "app_energy_joules_total",
            "counter",
            "Energy charged to each app's requests.",
        );
        for (app, u) in &st.usage.apps {
            let _ = writeln!(
                out,
                "llmsd_app_energy_joules_total{{app=\"{app}\"}} {}",
                u.energy_j_total
            );
        }
        head(
            &mut out,
            "app_tokens_total",
            "counter",
            "Tokens prefilled and generated for each app.",
        );
        for (app, u) in &st.usage.apps {
            let _ = writeln!(
                out,
                "llmsd_app_tokens_total{{app=\"{app}\"}} {}",
                u.tokens_total
            );
        }
        head(
            &mut out,
            "quota_refusals_total",
            "counter",
            "Calls refused by a quota, by app and quota key.",
        );
        for (app, u) in &st.usage.apps {
            for (key, n) in &u.refusals {
                let _ = writeln!(
                    out,
                    "llmsd_quota_refusals_total{{app=\"{app}\",quota=\"{key}\"}} {n}"
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsd_ipc::Door;

    fn book(dir: &Path, cfg: QuotaConfig) -> Arc<QuotaBook> {
        Arc::new(QuotaBook::open(dir, cfg, "cpu").unwrap())
    }

    fn socket(app: &str) -> Caller {
        Caller::user(Door::Socket, 1000, 1000, None, app).unwrap()
    }

    fn charge(owner: &str, tokens: u64, joules: f64) -> Charge<'_> {
        Charge {
            owner,
            context: None,
            tokens,
            joules,
        }
    }

    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn windows_slide_and_say_when_to_retry() {
        let mut w = Window::default();
        w.add(TOKENS, T0, 6.0);
        w.add(TOKENS, T0 + 500, 4.0); // same bucket
        w.add(TOKENS, T0 + 20_000, 5.0);
        assert_eq!(w.0.len(), 2);
        assert_eq!(w.sum(TOKENS, T0 + 30_000), 15.0);
        // Under 12 once the first bucket (10 tokens) expires: 61 s after T0's bucket.
        let start = T0 - T0 % 1000;
        assert_eq!(
            w.retry_after(TOKENS, T0 + 30_000, 12.0),
            start + 61_000 - (T0 + 30_000)
        );
        // Under 3 only when both have expired.
        assert_eq!(
            w.retry_after(TOKENS, T0 + 30_000, 3.0),
            start + 20_000 + 61_000 - (T0 + 30_000)
        );
        assert_eq!(w.retry_after(TOKENS, T0, 0.0), 60_000, "limit 0");
        assert_eq!(w.sum(TOKENS, T0 + 200_000), 0.0);
        w.prune(TOKENS, T0 + 200_000);
        assert!(w.0.is_empty());
    }

    #[test]
    fn layers_resolve_set_over_app_over_defaults() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = QuotaConfig {
            defaults: Quota {
                max_contexts: Some(8),
                tokens_per_min: Some(1000),
                ..Quota::default()
            },
            ..QuotaConfig::default()
        };
        cfg.apps.insert(
            "notes".into(),
            Quota {
                max_contexts: Some(2),
                ..Quota::default()
            },
        );
        let marks = HashMap::from([("player".to_string(), Priority::Foreground)]);
        let b = book(d.path(), cfg.with_priorities(&marks));
        assert_eq!(b.effective("other").max_contexts, Some(8));
        assert_eq!(b.effective("notes").max_contexts, Some(2));
        assert_eq!(b.priority("player"), Priority::Foreground);
        assert_eq!(b.priority("notes"), Priority::Normal);
        b.set(
            "notes",
            &Quota {
                max_contexts: Some(5),
                ..Quota::default()
            },
            &[],
        )
        .unwrap();
        let r = b.report("notes", 1);
        assert_eq!(r.set.max_contexts, Some(5));
        assert_eq!(r.config.max_contexts, Some(2));
        assert_eq!(r.effective.max_contexts, Some(5));
        assert_eq!(r.effective.tokens_per_min, Some(1000));
        b.set("notes", &Quota::default(), &[QuotaKey::MaxContexts])
            .unwrap();
        assert_eq!(b.effective("notes").max_contexts, Some(2));
        let both = Quota {
            max_contexts: Some(1),
            ..Quota::default()
        };
        assert!(b.set("notes", &both, &[QuotaKey::MaxContexts]).is_err());
        assert!(b.set("bad app", &both, &[]).is_err());
    }

    #[test]
    fn admission_refuses_each_quota_with_a_retry_after() {
        let d = tempfile::tempdir().unwrap();
        let b = book(d.path(), QuotaConfig::default());
        let set = |app: &str, q: Quota| b.set(app, &q, &[]).unwrap();
        set(
            "tpm",
            Quota {
                tokens_per_min: Some(10),
                ..Quota::default()
            },
        );
        set(
            "jph",
            Quota {
                joules_per_hour: Some(1.0),
                ..Quota::default()
            },
        );
        set(
            "conc",
            Quota {
                max_concurrent: Some(1),
                ..Quota::default()
            },
        );
        set(
            "door",
            Quota {
                doors: Some(vec![Door::Http]),
                ..Quota::default()
            },
        );
        set(
            "nobg",
            Quota {
                background_allowed: Some(false),
                ..Quota::default()
            },
        );
        let code = |r: Result<(Priority, QuotaSlot), ApiError>| r.map(|_| ()).unwrap_err();
        // tokens_per_min: admitted until the window holds 10.
        let (_, slot) = b.admit_at(&socket("tpm"), Priority::Normal, T0).unwrap();
        drop(slot);
        b.record_at(&[charge("u1000:tpm", 12, 0.0)], 0.0, T0);
        let e = code(b.admit_at(&socket("tpm"), Priority::Normal, T0 + 5_000));
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        let retry = e.retry_after_ms.unwrap();
        assert!((55_000..=56_000).contains(&retry), "{retry}");
        assert!(b
            .admit_at(&socket("tpm"), Priority::Normal, T0 + 5_000 + retry)
            .is_ok());
        // joules_per_hour.
        b.record_at(&[charge("u1000:jph", 1, 1.5)], 1.5, T0);
        let e = code(b.admit_at(&socket("jph"), Priority::Normal, T0 + 60_000));
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(e.retry_after_ms.unwrap() > 3_000_000, "{e:?}");
        // max_concurrent: the slot is the place; dropping it frees it.
        let (_, first) = b.admit_at(&socket("conc"), Priority::Normal, T0).unwrap();
        let e = code(b.admit_at(&socket("conc"), Priority::Normal, T0));
        assert_eq!(e.retry_after_ms, Some(CONCURRENT_RETRY_MS));
        drop(first);
        assert!(b.admit_at(&socket("conc"), Priority::Normal, T0).is_ok());
        // doors.
        let e = code(b.admit_at(&socket("door"), Priority::Normal, T0));
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(e.message.contains("socket door"), "{e:?}");
        assert!(b.check_door(&socket("door")).is_err());
        let http = Caller::http("door").unwrap();
        assert!(b.admit_at(&http, Priority::Normal, T0).is_ok());
        // background.
        let e = code(b.admit_at(&socket("nobg"), Priority::Background, T0));
        assert_eq!(e.code, ErrorCode::BackgroundBlocked);
        assert!(b.admit_at(&socket("nobg"), Priority::Normal, T0).is_ok());
        // contexts and context length.
        b.set(
            "ctx",
            &Quota {
                max_contexts: Some(2),
                max_context_tokens: Some(64),
                ..Quota::default()
            },
            &[],
        )
        .unwrap();
        assert!(b.check_contexts("ctx", || 1).is_ok());
        let e = b.check_contexts("ctx", || 2).unwrap_err();
        assert_eq!(e.retry_after_ms, Some(STATIC_RETRY_MS));
        assert_eq!(b.context_limit("ctx"), Some(64));
        assert_eq!(b.context_limit("other"), None);
        let m = b.render_metrics();
        for want in [
            "llmsd_quota_refusals_total{app=\"tpm\",quota=\"tokens_per_min\"} 1",
            "llmsd_quota_refusals_total{app=\"jph\",quota=\"joules_per_hour\"} 1",
            "llmsd_quota_refusals_total{app=\"conc\",quota=\"max_concurrent\"} 1",
            "llmsd_quota_refusals_total{app=\"door\",quota=\"doors\"} 2",
            "llmsd_quota_refusals_total{app=\"nobg\",quota=\"background_allowed\"} 1",
            "llmsd_quota_refusals_total{app=\"ctx\",quota=\"max_contexts\"} 1",
            "llmsd_app_tokens_total{app=\"tpm\"} 12",
            "llmsd_energy_source{source=\"cpu\"} 1",
        ] {
            assert!(m.contains(want), "{want} missing from\n{m}");
        }
        // Every metric's HELP/TYPE comes once, before its samples.
        let mut seen = std::collections::HashSet::new();
        let mut current = "";
        for line in m.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split_whitespace().next().unwrap();
                assert!(seen.insert(current.to_string()), "{current} twice");
            } else if !line.starts_with('#') {
                assert!(line.starts_with(current), "{line} after TYPE {current}");
            }
        }
    }

    #[test]
    fn battery_tightens_energy_and_can_block_background() {
        let d = tempfile::tempdir().unwrap();
        let supplies = d.path().join("ps");
        std::fs::create_dir_all(supplies.join("AC")).unwrap();
        std::fs::create_dir_all(supplies.join("BAT0")).unwrap();
        std::fs::write(supplies.join("AC/type"), "Mains\n").unwrap();
        std::fs::write(supplies.join("AC/online"), "1\n").unwrap();
        std::fs::write(supplies.join("BAT0/type"), "Battery\n").unwrap();
        std::fs::write(supplies.join("BAT0/status"), "Charging\n").unwrap();
        let cfg = QuotaConfig {
            energy: EnergyConfig {
                battery_factor: 0.25,
                block_background_on_battery: true,
                power_supply_dir: supplies.clone(),
                ..EnergyConfig::default()
            },
            ..QuotaConfig::default()
        };
        let b = book(&d.path().join("state"), cfg);
        b.set(
            "app",
            &Quota {
                joules_per_hour: Some(8.0),
                ..Quota::default()
            },
            &[],
        )
        .unwrap();
        b.record_at(&[charge("u1000:app", 1, 3.0)], 3.0, T0);
        assert!(b.admit_at(&socket("app"), Priority::Normal, T0).is_ok());
        assert!(b.admit_at(&socket("app"), Priority::Background, T0).is_ok());
        std::fs::write(supplies.join("AC/online"), "0\n").unwrap();
        assert_eq!(b.effective("app").joules_per_hour, Some(2.0));
        let e = b
            .admit_at(&socket("app"), Priority::Normal, T0)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(e.message.contains("on battery"), "{e:?}");
        let e = b
            .admit_at(&socket("other"), Priority::Background, T0)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BackgroundBlocked);
        assert!(b.report("app", 0).on_battery);
    }

    #[test]
    fn quotas_and_usage_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let b = book(d.path(), QuotaConfig::default());
        b.set(
            "notes",
            &Quota {
                tokens_per_min: Some(99),
                doors: Some(vec![Door::Socket, Door::Dbus]),
                ..Quota::default()
            },
            &[],
        )
        .unwrap();
        let now = now_ms();
        b.record_at(
            &[
                Charge {
                    owner: "u0:notes",
                    context: Some("ctx-1"),
                    tokens: 7,
                    joules: 0.5,
                },
                charge("http:mail", 3, 0.25),
            ],
            0.8,
            now,
        );
        b.flush(true);
        use std::os::unix::fs::PermissionsExt;
        for f in ["quotas.json", "usage.json"] {
            let mode = std::fs::metadata(d.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        drop(b);
        let b = book(d.path(), QuotaConfig::default());
        let r = b.report("notes", 0);
        assert_eq!(r.set.tokens_per_min, Some(99));
        assert_eq!(r.usage.tokens_last_min, 7);
        assert_eq!(r.usage.tokens_total, 7);
        assert!((r.usage.joules_per_token - 0.5 / 7.0).abs() < 1e-12);
        assert_eq!(b.context_energy("u0:notes", "ctx-1"), 0.5);
        b.forget_context("u0:notes", "ctx-1");
        assert_eq!(b.context_energy("u0:notes", "ctx-1"), 0.0);
        assert!(b
            .render_metrics()
            .contains("llmsd_energy_joules_total 0.8\n"));
        // A damaged quotas file stops the daemon rather than dropping the limits.
        std::fs::write(d.path().join("quotas.json"), "{").unwrap();
        assert!(QuotaBook::open(d.path(), QuotaConfig::default(), "cpu").is_err());
    }
}
