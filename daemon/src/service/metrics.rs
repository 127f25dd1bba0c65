//! Counters and gauges of the service, rendered as Prometheus text for `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use llmsd_ipc::ErrorCode;

/// Values of [`Metrics::pressure_source`].
pub const PRESSURE_SOURCES: [&str; 3] = ["off", "psi", "meminfo"];

#[derive(Debug)]
pub struct Metrics {
    pub running: AtomicU64,
    pub queued: AtomicU64,
    pub prompts_total: AtomicU64,
    pub completed_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub cached_tokens_total: AtomicU64,
    pub prefilled_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub engine_steps_total: AtomicU64,
    pub engine_busy_us_total: AtomicU64,
    pub restore_us_total: AtomicU64,
    pub kv_resident_bytes: AtomicU64,
    pub kv_budget_bytes: AtomicU64,
    pub contexts: AtomicU64,
    /// The configured KV budget (`kv_budget_bytes` is the one in force).
    pub kv_budget_max_bytes: AtomicU64,
    pub kv_disk_bytes: AtomicU64,
    /// Owners the KV store knows.
    pub apps: AtomicU64,
    /// The daemon's resident set, sampled by the memory watcher.
    pub rss_bytes: AtomicU64,
    /// The configured total memory budget (0: none).
    pub memory_budget_bytes: AtomicU64,
    /// [`llmsd_ipc::MemoryPressure::level`] as the watcher last saw it.
    pub memory_pressure: AtomicU64,
    /// Where pressure is read from: one of [`PRESSURE_SOURCES`], by index.
    pub pressure_source: AtomicU64,
    /// Prompts cancelled because their client did not read their stream.
    pub slow_client_cancels_total: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
}

impl Metrics {
    pub fn new(kv_budget_bytes: u64) -> Self {
        Self {
            running: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            prompts_total: AtomicU64::new(0),
            completed_total: AtomicU64::new(0),
            prompt_tokens_total: AtomicU64::new(0),
            cached_tokens_total: AtomicU64::new(0),
            prefilled_tokens_total: AtomicU64::new(0),
            generated_tokens_total: AtomicU64::new(0),
            engine_steps_total: AtomicU64::new(0),
            engine_busy_us_total: AtomicU64::new(0),
            restore_us_total: AtomicU64::new(0),
            kv_resident_bytes: AtomicU64::new(0),
            kv_budget_bytes: AtomicU64::new(kv_budget_bytes),
            contexts: AtomicU64::new(0),
            kv_budget_max_bytes: AtomicU64::new(kv_budget_bytes),
            kv_disk_bytes: AtomicU64::new(0),
            apps: AtomicU64::new(0),
            rss_bytes: AtomicU64::new(0),
            memory_budget_bytes: AtomicU64::new(0),
            memory_pressure: AtomicU64::new(0),
            pressure_source: AtomicU64::new(0),
            slow_client_cancels_total: AtomicU64::new(0),
            errors: Default::default(),
        }
    }

    /// The name of the pressure source in use.
    pub fn pressure_source(&self) -> &'static str {
        let i = self.pressure_source.load(Ordering::Relaxed) as usize;
        PRESSURE_SOURCES.get(i).copied().unwrap_or("off")
    }

    pub fn note_error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|&c| c == code) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP llmsd_{name} {help}");
            let _ = writeln!(out, "# TYPE llmsd_{name} {kind}");
            let _ = writeln!(out, "llmsd_{name} {}", v.load(Ordering::Relaxed));
        };
        one(
            "requests_running",
            "gauge",
            "Prompts generating now.",
            &self.running,
        );
        one(
            "requests_queued",
            "gauge",
            "Prompts waiting for the engine.",
            &self.queued,
        );
        one(
            "prompts_total",
            "counter",
            "Prompts accepted.",
            &self.prompts_total,
        );
        one(
            "completions_total",
            "counter",
            "Prompts that completed.",
            &self.completed_total,
        );
        one(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of completed calls.",
            &self.prompt_tokens_total,
        );
        one(
            "cached_prompt_tokens_total",
            "counter",
            "Prompt tokens whose KV a context already held.",
            &self.cached_tokens_total,
        );
        one(
            "prefilled_tokens_total",
            "counter",
            "Prompt tokens run through the model.",
            &self.prefilled_tokens_total,
        );
        one(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            &self.generated_tokens_total,
        );
        one(
            "engine_steps_total",
            "counter",
            "Batched forward steps.",
            &self.engine_steps_total,
        );
        one(
            "engine_busy_microseconds_total",
            "counter",
            "Time the engine spent in steps.",
            &self.engine_busy_us_total,
        );
        one(
            "restore_microseconds_total",
            "counter",
            "Time spent making contexts resident.",
            &self.restore_us_total,
        );
        one(
            "kv_resident_bytes",
            "gauge",
            "KV cache bytes in memory.",
            &self.kv_resident_bytes,
        );
        one(
            "kv_budget_bytes",
            "gauge",
            "KV cache memory budget.",
            &self.kv_budget_bytes,
        );
        one(
            "contexts",
            "gauge",
            "Persistent contexts of all apps.",
            &self.contexts,
        );
        one(
            "kv_budget_max_bytes",
            "gauge",
            "KV cache memory budget without memory pressure.",
            &self.kv_budget_max_bytes,
        );
        one(
            "kv_disk_bytes",
            "gauge",
            "KV cache bytes in swap files.",
            &self.kv_disk_bytes,
        );
        one(
            "rss_bytes",
            "gauge",
            "Resident set size of the daemon.",
            &self.rss_bytes,
        );
        one(
            "memory_budget_bytes",
            "gauge",
            "Configured total memory budget (0: none).",
            &self.memory_budget_bytes,
        );
        one(
            "memory_pressure",
            "gauge",
            "System memory pressure: 0 none, 1 moderate (KV budget halved), 2 severe (at its minimum).",
            &self.memory_pressure,
        );
        one(
            "slow_client_cancels_total",
            "counter",
            "Prompts cancelled because their client did not read their stream in time.",
            &self.slow_client_cancels_total,
        );
        let _ = writeln!(
            out,
            "# HELP llmsd_errors_total Errors returned to callers, by code."
        );
        let _ = writeln!(out, "# TYPE llmsd_errors_total counter");
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "llmsd_errors_total{{code=\"{}\"}} {}",
                c.name(),
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new(1 << 20);
        m.note_error(ErrorCode::Busy);
        Metrics::add(&m.generated_tokens_total, 7);
        let t = m.render();
        assert!(t.contains("llmsd_generated_tokens_total 7\n"));
        assert!(t.contains("llmsd_errors_total{code=\"Busy\"} 1\n"));
        assert!(t.contains("# TYPE llmsd_kv_budget_bytes gauge\nllmsd_kv_budget_bytes 1048576\n"));
        for gauge in [
            "rss_bytes",
            "kv_resident_bytes",
            "kv_disk_bytes",
            "memory_pressure",
        ] {
            assert!(
                t.contains(&format!("# TYPE llmsd_{gauge} gauge\n")),
                "{gauge}"
            );
        }
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("llmsd_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
