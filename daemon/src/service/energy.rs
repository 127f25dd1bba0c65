//! Energy: a meter of the joules the engine spends, and whether the machine runs on battery.
//!
//! The meter reads RAPL package counters (`/sys/class/powercap/intel-rapl:N/energy_uj`,
//! wrapping at `max_energy_range_uj`) when they are readable, else the process's CPU time
//! (`CLOCK_PROCESS_CPUTIME_ID`: every thread, the engine's pool included) times a
//! watts-per-core model. RAPL counts the whole package, other processes included; CPU time
//! counts only llmsd. The scheduler reads the meter around each engine step and splits the
//! difference among the step's requests (see `scheduler.rs`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_POWERCAP_DIR: &str = "/sys/class/powercap";
pub const DEFAULT_POWER_SUPPLY_DIR: &str = "/sys/class/power_supply";
/// What one busy core draws in the CPU-time model (a laptop or small server core under load).
pub const DEFAULT_WATTS_PER_CORE: f64 = 4.0;
/// Energy quotas on battery are this fraction of the configured ones.
pub const DEFAULT_BATTERY_FACTOR: f64 = 0.5;

/// Which meter to use (`[energy] source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceChoice {
    /// RAPL when readable, else CPU time.
    #[default]
    Auto,
    /// RAPL or refuse to start.
    Rapl,
    Cpu,
}

impl std::str::FromStr for SourceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SourceChoice::Auto),
            "rapl" => Ok(SourceChoice::Rapl),
            "cpu" => Ok(SourceChoice::Cpu),
            other => Err(format!(
                "energy source must be auto, rapl or cpu, got {other:?}"
            )),
        }
    }
}

/// How energy is measured and what battery power changes.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergyConfig {
    pub source: SourceChoice,
    pub watts_per_core: f64,
    /// `joules_per_hour` quotas are multiplied by this on battery (0-1).
    pub battery_factor: f64,
    /// Refuse background prompts on battery.
    pub block_background_on_battery: bool,
    pub powercap_dir: PathBuf,
    pub power_supply_dir: PathBuf,
}

impl Default for EnergyConfig {
    fn default() -> Self {
        Self {
            source: SourceChoice::Auto,
            watts_per_core: DEFAULT_WATTS_PER_CORE,
            battery_factor: DEFAULT_BATTERY_FACTOR,
            block_background_on_battery: false,
            powercap_dir: PathBuf::from(DEFAULT_POWERCAP_DIR),
            power_supply_dir: PathBuf::from(DEFAULT_POWER_SUPPLY_DIR),
        }
    }
}

/// `watts_per_core` must be positive and `battery_factor` within 0-1 (both finite).
pub fn validate(watts_per_core: Option<f64>, battery_factor: Option<f64>) -> Result<(), String> {
    if let Some(w) = watts_per_core {
        if !(w.is_finite() && w > 0.0) {
            return Err(format!(
                "energy.watts_per_core must be a positive number, got {w}"
            ));
        }
    }
    if let Some(f) = battery_factor {
        if !(f.is_finite() && (0.0..=1.0).contains(&f)) {
            return Err(format!(
                "energy.battery_factor must be between 0 and 1, got {f}"
            ));
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    #[error("energy source rapl: no readable RAPL counters under {0}")]
    NoRapl(PathBuf),
    #[error("reading the process CPU clock: {0}")]
    Clock(#[from] nix::Error),
}

/// One RAPL zone's counter.
#[derive(Debug)]
struct RaplZone {
    counter: PathBuf,
    max_range_uj: u64,
    last_uj: u64,
    warned: bool,
}

#[derive(Debug)]
enum Source {
    Rapl(Vec<RaplZone>),
    Cpu { watts_per_core: f64, last_s: f64 },
}

/// Joules spent since the meter opened; [`EnergyMeter::read`] is cheap enough for every step.
#[derive(Debug)]
pub struct EnergyMeter {
    source: Source,
    total_j: f64,
}

impl EnergyMeter {
    pub fn open(cfg: &EnergyConfig) -> Result<Self, EnergyError> {
        let zones = || rapl_zones(&cfg.powercap_dir);
        let source = match cfg.source {
            SourceChoice::Cpu => None,
            SourceChoice::Auto => Some(zones()).filter(|z| !z.is_empty()),
            SourceChoice::Rapl => match zones() {
                z if z.is_empty() => return Err(EnergyError::NoRapl(cfg.powercap_dir.clone())),
                z => Some(z),
            },
        };
        let source = match source {
            Some(z) => Source::Rapl(z),
            None => Source::Cpu {
                watts_per_core: cfg.watts_per_core,
                last_s: process_cpu_seconds()?,
            },
        };
        Ok(Self {
            source,
            total_j: 0.0,
        })
    }

    /// `rapl` or `cpu`.
    pub fn source_name(&self) -> &'static str {
        match self.source {
            Source::Rapl(_) => "rapl",
            Source::Cpu { .. } => "cpu",
        }
    }

    /// For the log: the source and its parameters.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Rapl(z) => format!("rapl ({} package counters)", z.len()),
            Source::Cpu { watts_per_core, .. } => {
                format!("cpu (process CPU time × {watts_per_core} W per core)")
            }
        }
    }

    /// Joules since the meter opened (never decreasing).
    pub fn read(&mut self) -> f64 {
        match &mut self.source {
            Source::Rapl(zones) => {
                for z in zones {
                    self.total_j += z.advance() as f64 * 1e-6;
                }
            }
            Source::Cpu {
                watts_per_core,
                last_s,
            } => match process_cpu_seconds() {
                Ok(now) => {
                    if now > *last_s {
                        self.total_j += (now - *last_s) * *watts_per_core;
                        *last_s = now;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the process CPU clock"),
            },
        }
        self.total_j
    }
}

impl RaplZone {
    /// Microjoules since the last reading, across a wrap of the counter.
    fn advance(&mut self) -> u64 {
        let now = match read_u64(&self.counter) {
            Some(v) => v,
            None => {
                if !self.warned {
                    tracing::warn!(counter = %self.counter.display(), "RAPL counter unreadable");
                    self.warned = true;
                }
                return 0;
            }
        };
        let delta = if now >= self.last_uj {
            now - self.last_uj
        } else {
            self.max_range_uj.saturating_sub(self.last_uj) + now
        };
        self.last_uj = now;
        delta
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_word(path: &Path) -> Option<String> {
    Some(std::fs::read_to_string(path).ok()?.trim().to_string())
}

/// The readable top-level RAPL zones: `intel-rapl:N` (the driver's name on AMD too), the
/// `package-*` ones when there are any (`psys` overlaps them), else all.
fn rapl_zones(dir: &Path) -> Vec<RaplZone> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut zones: Vec<(String, RaplZone)> = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let top_level = file
            .strip_prefix("intel-rapl:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !top_level {
            continue;
        }
        let p = e.path();
        let counter = p.join("energy_uj");
        let (Some(last_uj), Some(max_range_uj)) =
            (read_u64(&counter), read_u64(&p.join("max_energy_range_uj")))
        else {
            continue;
        };
        let name = read_word(&p.join("name")).unwrap_or_default();
        zones.push((
            name,
            RaplZone {
                counter,
                max_range_uj,
                last_uj,
                warned: false,
            },
        ));
    }
    let packages = zones.iter().any(|(n, _)| n.starts_with("package"));
    zones
        .into_iter()
        .filter(|(n, _)| !packages || n.starts_with("package"))
        .map(|(_, z)| z)
        .collect()
}

/// CPU seconds of every thread of this process.
fn process_cpu_seconds() -> Result<f64, nix::Error> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)?;
    Ok(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

/// Whether the machine runs on battery: a battery reports `Discharging`, or a battery is
/// present and every mains/USB supply is offline. No supplies at all (a server) = mains.
pub fn on_battery(power_supply_dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(power_supply_dir) else {
        return false;
    };
    let mut battery = false;
    let mut external = 0;
    let mut external_online = 0;
    for e in entries.flatten() {
        let p = e.path();
        let Some(kind) = read_word(&p.join("type")) else {
            continue;
        };
        match kind.as_str() {
            "Battery" => {
                if read_u64(&p.join("present")) == Some(0) {
                    continue;
                }
                if read_word(&p.join("status")).as_deref() == Some("Discharging") {
                    return true;
                }
                battery = true;
            }
            "Mains" | "USB" | "USB_C" | "USB_PD" | "Wireless" => {
                external += 1;
                if read_u64(&p.join("online")).is_some_and(|v| v > 0) {
                    external_online += 1;
                }
            }
            _ => {}
        }
    }
    battery && external > 0 && external_online == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn cfg(dir: &Path, source: SourceChoice) -> EnergyConfig {
        EnergyConfig {
            source,
            powercap_dir: dir.to_path_buf(),
            ..EnergyConfig::default()
        }
    }

    #[test]
    fn rapl_counters_are_summed_across_a_wrap() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        write(root, "intel-rapl:0/name", "package-0\n");
        write(root, "intel-rapl:0/energy_uj", "999000000\n");
        write(root, "intel-rapl:0/max_energy_range_uj", "1000000000\n");
        // A subzone and psys overlap the package: not counted.
        write(root, "intel-rapl:0:0/name", "core\n");
        write(root, "intel-rapl:0:0/energy_uj", "5\n");
        write(root, "intel-rapl:0:0/max_energy_range_uj", "1000000000\n");
        write(root, "intel-rapl:1/name", "psys\n");
        write(root, "intel-rapl:1/energy_uj", "7\n");
        write(root, "intel-rapl:1/max_energy_range_uj", "1000000000\n");
        let mut m = EnergyMeter::open(&cfg(root, SourceChoice::Auto)).unwrap();
        assert_eq!(m.source_name(), "rapl");
        assert_eq!(m.read(), 0.0);
        write(root, "intel-rapl:0/energy_uj", "999500000\n");
        write(root, "intel-rapl:1/energy_uj", "9000007\n");
        assert!((m.read() - 0.5).abs() < 1e-9);
        // Wraps past the range: 0.5 J to the top, then 1.5 J.
        write(root, "intel-rapl:0/energy_uj", "1500000\n");
        assert!((m.read() - 2.5).abs() < 1e-9, "{}", m.read());
        // An unreadable counter adds nothing and does not fail.
        std::fs::remove_file(root.join("intel-rapl:0/energy_uj")).unwrap();
        assert!((m.read() - 2.5).abs() < 1e-9);
    }

    #[test]
    fn cpu_time_is_the_fallback_and_rapl_can_be_required() {
        let d = tempfile::tempdir().unwrap();
        let mut m = EnergyMeter::open(&cfg(d.path(), SourceChoice::Auto)).unwrap();
        assert_eq!(m.source_name(), "cpu");
        assert!(m.describe().contains("4 W per core"), "{}", m.describe());
        let before = m.read();
        // 50 ms of CPU on this thread: at least 0.2 J at 4 W per core (other threads of the
        // test process may add theirs).
        let thread_cpu = || {
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
            t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9
        };
        let t0 = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - t0 < 0.05 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let spent = m.read() - before;
        assert!(spent >= 0.2 - 1e-6, "{spent} J for 50 ms of CPU");
        assert!(matches!(
            EnergyMeter::open(&cfg(d.path(), SourceChoice::Rapl)),
            Err(EnergyError::NoRapl(_))
        ));
        write(d.path(), "intel-rapl:0/name", "package-0\n");
        write(d.path(), "intel-rapl:0/energy_uj", "1\n");
        write(d.path(), "intel-rapl:0/max_energy_range_uj", "10\n");
        let m = EnergyMeter::open(&cfg(d.path(), SourceChoice::Cpu)).unwrap();
        assert_eq!(m.source_name(), "cpu", "cpu is used when asked for");
    }

    #[test]
    fn battery_is_detected_from_power_supplies() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert!(!on_battery(&root.join("missing")), "no supplies: mains");
        write(root, "AC/type", "Mains\n");
        write(root, "AC/online", "1\n");
        write(root, "BAT0/type", "Battery\n");
        write(root, "BAT0/status", "Charging\n");
        assert!(!on_battery(root));
        write(root, "AC/online", "0\n");
        assert!(on_battery(root), "mains offline with a battery");
        write(root, "AC/online", "1\n");
        write(root, "BAT0/status", "Discharging\n");
        assert!(on_battery(root), "a discharging battery");
        write(root, "BAT0/status", "Full\n");
        write(root, "BAT0/present", "0\n");
        write(root, "AC/online", "0\n");
        assert!(!on_battery(root), "no battery present");
    }

    #[test]
    fn bad_energy_values_are_refused() {
        assert!(validate(Some(4.0), Some(0.5)).is_ok());
        assert!(validate(Some(0.0), None).is_err());
        assert!(validate(Some(f64::NAN), None).is_err());
        assert!(validate(None, Some(1.5)).is_err());
        assert!(validate(None, Some(-0.1)).is_err());
        assert!("gpu".parse::<SourceChoice>().is_err());
        assert_eq!("rapl".parse(), Ok(SourceChoice::Rapl));
    }
}
