//! Human renderings of the admin replies (`llmsctl` without `--json`): aligned tables, sizes
//! in KiB/MiB/GiB, times as ages.

use llmsd_ipc::{AppInfo, ChunkInfo, CompactReport, EvictReport, OwnedContext, Status};

/// A table with a header row; columns are left-aligned text, right-aligned numbers.
pub struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `header`; a name starting with `>` is right-aligned (the `>` is dropped).
    pub fn new(header: &[&'static str]) -> Self {
        Table {
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut l = String::new();
            for (i, c) in cells.enumerate().take(n) {
                let pad = width[i].saturating_sub(c.chars().count());
                if i > 0 {
                    l.push_str("  ");
                }
                if self.right[i] {
                    l.extend(std::iter::repeat_n(' ', pad));
                    l.push_str(c);
                } else {
                    l.push_str(c);
                    if i + 1 < n {
                        l.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&mut self.header.iter().copied());
        for r in &self.rows {
            line(&mut r.iter().map(String::as_str));
        }
        out
    }
}

/// `1536` → `1.5 KiB`.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// How long ago a unix time was, relative to `now`: `12s`, `5m`, `3h`, `2d`; `-` for never.
pub fn age(unix: u64, now: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    let s = now.saturating_sub(unix);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn status(s: &Status) -> String {
    let mut t = Table::new(&["", ""]);
    let mut kv = |k: &str, v: String| t.row(vec![k.to_string(), v]);
    kv(
        "model",
        format!(
            "{} ({}, {} policy)",
            s.model,
            bytes(s.model_bytes),
            s.kv_policy
        ),
    );
    kv(
        "memory",
        match s.memory_budget_bytes {
            Some(b) => format!("rss {} of a {} budget", bytes(s.rss_bytes), bytes(b)),
            None => format!("rss {} (no total budget)", bytes(s.rss_bytes)),
        },
    );
    let max = if s.kv_budget_max_bytes != s.kv_budget_bytes {
        format!(", lowered from {}", bytes(s.kv_budget_max_bytes))
    } else {
        String::new()
    };
    kv(
        "kv",
        format!(
            "{} resident of {}{max}; {} on disk",
            bytes(s.kv_resident_bytes),
            bytes(s.kv_budget_bytes),
            bytes(s.kv_disk_bytes)
        ),
    );
    kv(
        "pressure",
        format!("{} ({})", s.pressure.name(), s.pressure_source),
    );
    kv("contexts", format!("{} in {} apps", s.contexts, s.apps));
    kv(
        "energy",
        format!("{:.1} J ({})", s.energy_j, s.energy_source),
    );
    kv(
        "queue",
        format!("{} running, {} queued", s.running, s.queued),
    );
    kv(
        "daemon",
        format!(
            "llmsd {}, up {:.0} s{}",
            s.version,
            s.uptime_s,
            if s.admin { "; you are an admin" } else { "" }
        ),
    );
    // No header line for a key/value list.
    t.render()
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect()
}

pub fn apps(list: &[AppInfo], now: u64) -> String {
    let mut t = Table::new(&[
        "OWNER",
        ">CONTEXTS",
        ">TOKENS",
        ">RESIDENT",
        ">DISK",
        ">RUNNING",
        ">QUEUED",
        ">LAST USE",
    ]);
    for a in list {
        t.row(vec![
            a.owner.clone(),
            a.contexts.to_string(),
            a.tokens.to_string(),
            bytes(a.resident_bytes),
            bytes(a.disk_bytes),
            a.running.to_string(),
            a.queued.to_string(),
            age(a.last_use_unix, now),
        ]);
    }
    t.render()
}

pub fn contexts(list: &[OwnedContext], now: u64) -> String {
    let mut t = Table::new(&[
        "OWNER",
        "CONTEXT",
        ">TOKENS",
        ">MESSAGES",
        ">RESIDENT",
        ">DISK",
        ">LAST USE",
    ]);
    for c in list {
        t.row(vec![
            c.owner.clone(),
            c.context.id.clone(),
            c.context.tokens.to_string(),
            c.context.messages.to_string(),
            bytes(c.context.resident_bytes),
            bytes(c.context.disk_bytes),
            age(c.context.last_use_unix, now),
        ]);
    }
    t.render()
}

pub fn chunks(list: &[ChunkInfo], now: u64) -> String {
    let mut t = Table::new(&[
        ">CHUNK",
        ">TOKENS",
        "PRECISION",
        "WHERE",
        ">DENSITY",
        ">SEEN",
        ">SHARED",
        ">LAST USE",
    ]);
    for c in list {
        t.row(vec![
            c.index.to_string(),
            c.tokens.to_string(),
            c.precision.clone(),
            c.location.name().to_string(),
            format!("{:.4}", c.density),
            c.observations.to_string(),
            c.shared_by.to_string(),
            age(c.last_use_unix, now),
        ]);
    }
    t.render()
}

pub fn evicted(r: &EvictReport) -> String {
    let mut s = format!(
        "evicted {} context{}, {} freed\n",
        r.contexts,
        if r.contexts == 1 { "" } else { "s" },
        bytes(r.freed_bytes)
    );
    if !r.in_use.is_empty() {
        s.push_str(&format!("in use, left resident: {}\n", r.in_use.join(", ")));
    }
    s
}

pub fn compacted(r: &CompactReport) -> String {
    format!(
        "re-quantized {} chunks, evicted {} contexts ({} freed), removed {} stray swap files\n\
         KV now {} resident, {} on disk\n",
        r.requantized_chunks,
        r.evicted_contexts,
        bytes(r.freed_bytes),
        r.files_removed,
        bytes(r.kv_resident_bytes),
        bytes(r.kv_disk_bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(24 << 20), "24.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(age(0, 100), "-");
        assert_eq!(age(90, 100), "10s");
        assert_eq!(age(100, 100 + 7200), "2h");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", ">N"]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["long-name".into(), "1234".into()]);
        assert_eq!(
            t.render(),
            "NAME          N\na             1\nlong-name  1234\n"
        );
    }
}
