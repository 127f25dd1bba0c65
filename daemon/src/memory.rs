//! The memory budget: one configured total (weights + KV + scratch) split into the KV budget
//! the KV store enforces, and a watcher that samples the daemon's RSS and the system's memory
//! pressure, lowering the KV budget in force while memory is short and growing it back after.
//!
//! Pressure comes from PSI (`/proc/pressure/memory`, "some" and "full" avg10) when the kernel
//! has it, else from available memory (MemAvailable against MemTotal). `LLMSD_PSI_PATH` and
//! `LLMSD_MEMINFO_PATH` point the watcher at other files (tests simulate pressure that way;
//! a PSI path that cannot be read means "no PSI").

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use llmsd_engine::model::{Model, ModelConfig};
use llmsd_ipc::MemoryPressure;

use crate::service::metrics::PRESSURE_SOURCES;
use crate::service::Service;

/// PSI "some" avg10 (percent of time some task stalled on memory) from which pressure is
/// moderate, and severe.
pub const PSI_SOME_MODERATE: f64 = 10.0;
pub const PSI_SOME_SEVERE: f64 = 40.0;
/// PSI "full" avg10 (every task stalled) from which pressure is severe.
pub const PSI_FULL_SEVERE: f64 = 10.0;
/// Available memory, as a fraction of the total, under which pressure is moderate, and severe.
pub const AVAILABLE_MODERATE: f64 = 0.10;
pub const AVAILABLE_SEVERE: f64 = 0.05;
/// Without pressure the budget grows back by this fraction of the configured one per tick.
pub const GROWTH_STEP: f64 = 0.25;
/// Anonymous memory of the process besides measured scratch that a request path allocates
/// (tokenizer output, transcripts, channels, I/O buffers of swap segments).
pub const SCRATCH_SLACK_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "memory budget of {total_mib} MiB leaves {kv_mib} MiB for the KV cache after the model \
         ({model_mib} MiB) and scratch ({scratch_mib} MiB); at least {min_mib} MiB are needed \
         (raise [memory] budget_mib or lower [memory] min_kv_mib)"
    )]
    TooSmall {
        total_mib: u64,
        model_mib: u64,
        scratch_mib: u64,
        kv_mib: i64,
        min_mib: u64,
    },
    #[error(
        "the KV budget of {kv_mib} MiB plus the model ({model_mib} MiB) and scratch \
         ({scratch_mib} MiB) exceed the memory budget of {total_mib} MiB"
    )]
    KvOverTotal {
        total_mib: u64,
        model_mib: u64,
        scratch_mib: u64,
        kv_mib: u64,
    },
}

/// How the watcher behaves.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// React to pressure (otherwise only RSS is sampled).
    pub pressure: bool,
    /// The KV budget never goes below this under pressure.
    pub min_kv_bytes: u64,
    pub interval: Duration,
    pub psi_path: PathBuf,
    /// A meminfo-format file; none = the system's, through sysinfo.
    pub meminfo_path: Option<PathBuf>,
}

impl WatchConfig {
    /// Defaults, with the paths `LLMSD_PSI_PATH` / `LLMSD_MEMINFO_PATH` give.
    pub fn from_env(pressure: bool, min_kv_bytes: u64, interval: Duration) -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        WatchConfig {
            pressure,
            min_kv_bytes,
            interval,
            psi_path: var("LLMSD_PSI_PATH").unwrap_or_else(|| "/proc/pressure/memory".into()),
            meminfo_path: var("LLMSD_MEMINFO_PATH"),
        }
    }
}

/// The KV budget a total leaves: total − model file − scratch, refused below `min`.
pub fn kv_budget_from_total(
    total: u64,
    model_bytes: u64,
    scratch: u64,
    min: u64,
) -> Result<u64, MemoryError> {
    let kv = total as i64 - model_bytes as i64 - scratch as i64;
    if kv < min as i64 {
        return Err(MemoryError::TooSmall {
            total_mib: total >> 20,
            model_mib: model_bytes >> 20,
            scratch_mib: scratch >> 20,
            kv_mib: kv / (1 << 20),
            min_mib: min >> 20,
        });
    }
    Ok(kv as u64)
}

/// Checks an explicitly configured KV budget against the total.
pub fn check_kv_within_total(
    total: u64,
    model_bytes: u64,
    scratch: u64,
    kv: u64,
) -> Result<(), MemoryError> {
    if model_bytes + scratch + kv > total {
        return Err(MemoryError::KvOverTotal {
            total_mib: total >> 20,
            model_mib: model_bytes >> 20,
            scratch_mib: scratch >> 20,
            kv_mib: kv >> 20,
        });
    }
    Ok(())
}

/// Activation memory of the largest engine step: per token the hidden states, q/k/v,
/// attention output and FFN gate/up in f32 plus their quantized copies, attention scores per
/// thread over the longest context, and logits rows.
pub fn step_scratch_bytes(
    cfg: &ModelConfig,
    step_tokens: usize,
    logit_rows: usize,
    threads: usize,
    max_context: usize,
) -> u64 {
    let q = cfg.n_heads * cfg.head_dim;
    let kv = cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim);
    let att = cfg.n_heads * cfg.v_head_dim;
    let per_token_f32 = 3 * cfg.d_model + q + kv + att + 2 * cfg.ffn_dim;
    // Quantized activations: about one byte per element of the widest input.
    let per_token = per_token_f32 * 4 + cfg.d_model.max(cfg.ffn_dim) * 2;
    let scores = threads * max_context * 4;
    let logits = logit_rows * cfg.vocab_size * 4;
    (step_tokens * per_token + scores + logits) as u64
}

/// What the weights occupy in memory: the matrices repacked at load live in anonymous memory
/// (their file bytes are not touched again), the rest of the file is used in place. Returns
/// (all weight bytes, the repacked part).
pub fn weights_memory(model: &Model) -> (u64, u64) {
    let w = &model.weights;
    let matrices = w
        .layers
        .iter()
        .flat_map(|l| {
            [
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.ffn_gate,
                &l.ffn_up,
                &l.ffn_down,
            ]
        })
        .chain([&w.tok_embd, &w.output]);
    // A tied output head shares its tensor (and its packed copy) with the embeddings.
    let mut seen = std::collections::HashSet::new();
    let (mut packed, mut replaced) = (0u64, 0u64);
    for m in matrices {
        if let Some(p) = &m.packed {
            if seen.insert(m.offset) {
                packed += p.bytes().len() as u64;
                replaced += (m.rows * m.row_bytes) as u64;
            }
        }
    }
    let file = model.file().bytes().len() as u64;
    (file - replaced.min(file) + packed, packed)
}

/// The anonymous (non-file) resident memory of this process: what is not the mapped model.
pub fn rss_anon_bytes() -> Option<u64> {
    status_kib("RssAnon:").map(|k| k << 10)
}

fn status_kib(key: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, key)
}

/// The value of a `Key:   123 kB` line (as /proc/self/status and /proc/meminfo write them).
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// PSI `some` and `full` avg10 of a `/proc/pressure/memory`-format text.
pub fn parse_psi(text: &str) -> Option<(f64, f64)> {
    let avg10 = |kind: &str| {
        let line = text.lines().find(|l| l.starts_with(kind))?;
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse::<f64>()
            .ok()
    };
    let some = avg10("some")?;
    // Kernels before 5.13 have no "full" line for memory in a cgroup; treat it as 0.
    Some((some, avg10("full").unwrap_or(0.0)))
}

/// MemTotal and MemAvailable (bytes) of a `/proc/meminfo`-format text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    Some((
        kib_field(text, "MemTotal:")? << 10,
        kib_field(text, "MemAvailable:")? << 10,
    ))
}

pub fn psi_level(some: f64, full: f64) -> MemoryPressure {
    if some >= PSI_SOME_SEVERE || full >= PSI_FULL_SEVERE {
        MemoryPressure::Severe
    } else if some >= PSI_SOME_MODERATE {
        MemoryPressure::Moderate
    } else {
        MemoryPressure::None
    }
}

pub fn available_level(total: u64, available: u64) -> MemoryPressure {
    if total == 0 {
        return MemoryPressure::None;
    }
    let frac = available as f64 / total as f64;
    if frac < AVAILABLE_SEVERE {
        MemoryPressure::Severe
    } else if frac < AVAILABLE_MODERATE {
        MemoryPressure::Moderate
    } else {
        MemoryPressure::None
    }
}

/// The KV budget in force as pressure comes and goes: it drops at once to what the level
/// allows (half the configured budget at moderate, the minimum at severe) and grows back by
/// [`GROWTH_STEP`] of the configured budget per tick once the level allows more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetController {
    pub max: u64,
    pub min: u64,
    pub current: u64,
}

impl BudgetController {
    pub fn new(max: u64, min: u64) -> Self {
        BudgetController {
            max,
            min: min.min(max),
            current: max,
        }
    }

    pub fn target(&self, level: MemoryPressure) -> u64 {
        match level {
            MemoryPressure::None => self.max,
            MemoryPressure::Moderate => (self.max / 2).max(self.min),
            MemoryPressure::Severe => self.min,
        }
    }

    /// The budget for the next tick at `level`.
    pub fn step(&mut self, level: MemoryPressure) -> u64 {
        let target = self.target(level);
        self.current = if target <= self.current {
            target
        } else {
            let step = ((self.max as f64 * GROWTH_STEP) as u64).max(1);
            (self.current + step).min(target)
        };
        self.current
    }
}

/// Samples RSS and pressure every `interval` and sets the KV budget in force. Runs until
/// the task is dropped.
pub async fn watch(service: Service, cfg: WatchConfig) {
    let metrics = service.metrics();
    let max = metrics.kv_budget_max_bytes.load(Ordering::Relaxed);
    let mut control = BudgetController::new(max, cfg.min_kv_bytes);
    let mut sampler = Sampler::new(&cfg);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_level = MemoryPressure::None;
    loop {
        tick.tick().await;
        // A reloaded configuration may have changed the configured budget.
        let max = metrics.kv_budget_max_bytes.load(Ordering::Relaxed);
        if max != control.max {
            control.max = max;
            control.min = cfg.min_kv_bytes.min(max);
            control.current = control.current.min(max);
        }
        if let Some(rss) = sampler.rss() {
            metrics.rss_bytes.store(rss, Ordering::Relaxed);
        }
        if !cfg.pressure {
            continue;
        }
        let (source, level) = sampler.pressure(&cfg);
        metrics.pressure_source.store(
            PRESSURE_SOURCES
                .iter()
                .position(|s| *s == source)
                .unwrap_or(0) as u64,
            Ordering::Relaxed,
        );
        metrics
            .memory_pressure
            .store(level.level(), Ordering::Relaxed);
        if level != last_level {
            tracing::info!(pressure = level.name(), source, "memory pressure changed");
            last_level = level;
        }
        let before = control.current;
        let budget = control.step(level);
        if budget != before {
            tracing::info!(
                kv_budget_mib = budget >> 20,
                pressure = level.name(),
                "KV budget changed"
            );
            if let Err(e) = service.set_kv_budget(budget).await {
                tracing::warn!(error = %e, "setting the KV budget failed");
                control.current = before;
            }
        }
    }
}

/// Where RSS and pressure readings come from.
struct Sampler {
    system: sysinfo::System,
    pid: Option<sysinfo::Pid>,
}

impl Sampler {
    fn new(_cfg: &WatchConfig) -> Self {
        Sampler {
            system: sysinfo::System::new(),
            pid: sysinfo::get_current_pid().ok(),
        }
    }

    fn rss(&mut self) -> Option<u64> {
        let pid = self.pid?;
        self.system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            false,
            sysinfo::ProcessRefreshKind::nothing().with_memory(),
        );
        self.system.process(pid).map(|p| p.memory())
    }

    /// The pressure level and the source it came from (`psi` or `meminfo`).
    fn pressure(&mut self, cfg: &WatchConfig) -> (&'static str, MemoryPressure) {
        if let Some((some, full)) = read(&cfg.psi_path).as_deref().and_then(parse_psi) {
            return ("psi", psi_level(some, full));
        }
        let (total, available) = match &cfg.meminfo_path {
            Some(p) => match read(p).as_deref().and_then(parse_meminfo) {
                Some(v) => v,
                None => return ("off", MemoryPressure::None),
            },
            None => {
                self.system
                    .refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
                (self.system.total_memory(), self.system.available_memory())
            }
        };
        ("meminfo", available_level(total, available))
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_and_meminfo_parse() {
        let psi = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n\
                   full avg10=0.40 avg60=0.10 avg300=0.00 total=45\n";
        assert_eq!(parse_psi(psi), Some((12.5, 0.4)));
        assert_eq!(
            parse_psi("some avg10=1.00 avg60=0 avg300=0 total=0\n"),
            Some((1.0, 0.0))
        );
        assert_eq!(parse_psi("garbage"), None);
        let mi = "MemTotal:        8000000 kB\nMemFree:  100 kB\nMemAvailable:     400000 kB\n";
        assert_eq!(parse_meminfo(mi), Some((8_000_000 << 10, 400_000 << 10)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn levels_follow_the_thresholds() {
        assert_eq!(psi_level(0.0, 0.0), MemoryPressure::None);
        assert_eq!(psi_level(10.0, 0.0), MemoryPressure::Moderate);
        assert_eq!(psi_level(40.0, 0.0), MemoryPressure::Severe);
        assert_eq!(psi_level(15.0, 12.0), MemoryPressure::Severe);
        assert_eq!(available_level(1000, 500), MemoryPressure::None);
        assert_eq!(available_level(1000, 80), MemoryPressure::Moderate);
        assert_eq!(available_level(1000, 40), MemoryPressure::Severe);
    }

    #[test]
    fn budget_drops_at_once_and_grows_back_stepwise() {
        let mut c = BudgetController::new(400, 40);
        assert_eq!(c.step(MemoryPressure::None), 400);
        assert_eq!(c.step(MemoryPressure::Moderate), 200);
        assert_eq!(c.step(MemoryPressure::Severe), 40);
        // Severe → moderate grows toward half, a step at a time.
        assert_eq!(c.step(MemoryPressure::Moderate), 140);
        assert_eq!(c.step(MemoryPressure::Moderate), 200);
        assert_eq!(c.step(MemoryPressure::None), 300);
        assert_eq!(c.step(MemoryPressure::None), 400);
        assert_eq!(c.step(MemoryPressure::None), 400);
        // A minimum above half the budget wins at moderate; above the budget, it is capped.
        assert_eq!(
            BudgetController::new(100, 80).target(MemoryPressure::Moderate),
            80
        );
        assert_eq!(
            BudgetController::new(100, 500).target(MemoryPressure::Severe),
            100
        );
    }

    #[test]
    fn the_total_leaves_the_kv_budget_or_is_refused() {
        let mib = 1u64 << 20;
        assert_eq!(
            kv_budget_from_total(300 * mib, 100 * mib, 50 * mib, 16 * mib).unwrap(),
            150 * mib
        );
        let e = kv_budget_from_total(150 * mib, 100 * mib, 40 * mib, 16 * mib).unwrap_err();
        assert!(e.to_string().contains("leaves 10 MiB"), "{e}");
        assert!(kv_budget_from_total(100 * mib, 100 * mib, 40 * mib, 16 * mib).is_err());
        assert!(check_kv_within_total(300 * mib, 100 * mib, 50 * mib, 150 * mib).is_ok());
        assert!(check_kv_within_total(300 * mib, 100 * mib, 50 * mib, 151 * mib).is_err());
    }

    #[test]
    fn own_memory_is_readable() {
        assert!(rss_anon_bytes().unwrap() > 0);
        let mut s = Sampler::new(&WatchConfig::from_env(true, 0, Duration::from_secs(1)));
        let rss = s.rss().unwrap();
        assert!(rss >= rss_anon_bytes().unwrap() / 2, "{rss}");
    }
}
