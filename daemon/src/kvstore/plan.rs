//! The restore plan: which missing chunks to read from disk and which to recompute.
//!
//! Both run at once (reads on the I/O thread, recompute on the engine pool), so a restore
//! takes max(T_io, T_recompute). Each is a linear cost model fitted on this machine at start-up
//! (LLMS §4.2): T_io = a + b·bytes, T_recompute = c + d·tokens. Chunks recomputed are taken
//! from the front of the missing ones: the earliest positions attend to the fewest keys, and
//! a recomputed prefix never waits for a read.

/// `seconds = fixed + per_unit × units`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearCost {
    pub fixed: f64,
    pub per_unit: f64,
}

impl LinearCost {
    pub fn predict(&self, units: f64) -> f64 {
        if units <= 0.0 {
            0.0
        } else {
            (self.fixed + self.per_unit * units).max(0.0)
        }
    }

    /// Least-squares line through `(units, seconds)` samples; with fewer than two distinct
    /// unit counts, a line through the origin and their mean.
    pub fn fit(samples: &[(f64, f64)]) -> LinearCost {
        let n = samples.len() as f64;
        if samples.is_empty() {
            return LinearCost {
                fixed: 0.0,
                per_unit: 0.0,
            };
        }
        let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
        let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
        let sxx: f64 = samples.iter().map(|s| (s.0 - mx) * (s.0 - mx)).sum();
        let sxy: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
        if sxx <= f64::EPSILON * (1.0 + mx * mx) {
            let per_unit = if mx > 0.0 { my / mx } else { 0.0 };
            return LinearCost {
                fixed: 0.0,
                per_unit: per_unit.max(0.0),
            };
        }
        let per_unit = (sxy / sxx).max(0.0);
        LinearCost {
            fixed: (my - per_unit * mx).max(0.0),
            per_unit,
        }
    }
}

/// The two fitted models.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestoreCosts {
    /// Seconds to read and decompress `bytes` of chunk files.
    pub io: LinearCost,
    /// Seconds to recompute `tokens` tokens of KV.
    pub recompute: LinearCost,
}

/// One chunk that is not resident, in position order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Missing {
    pub tokens: usize,
    /// Bytes to read, or `None` when there is nothing readable (no file, failed checksum).
    pub disk_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Per missing chunk: recompute it (true) or read it (false).
    pub recompute: Vec<bool>,
    pub predicted_io_s: f64,
    pub predicted_recompute_s: f64,
}

impl Plan {
    pub fn predicted_s(&self) -> f64 {
        self.predicted_io_s.max(self.predicted_recompute_s)
    }
}

/// Chooses how many leading chunks to recompute, minimising max(T_io, T_recompute); chunks
/// with nothing to read are recomputed whatever the models say.
pub fn plan(missing: &[Missing], costs: &RestoreCosts) -> Plan {
    let forced_tokens: usize = missing
        .iter()
        .filter(|m| m.disk_bytes.is_none())
        .map(|m| m.tokens)
        .sum();
    let all_bytes: u64 = missing.iter().filter_map(|m| m.disk_bytes).sum();
    let mut best: Option<(f64, usize, f64, f64)> = None;
    // k = number of leading chunks recomputed.
    let (mut rc_tokens, mut io_bytes) = (forced_tokens, all_bytes);
    for k in 0..=missing.len() {
        if k > 0 {
            let m = missing[k - 1];
            if let Some(b) = m.disk_bytes {
                rc_tokens += m.tokens;
                io_bytes -= b;
            }
        }
        let t_io = costs.io.predict(io_bytes as f64);
        let t_rc = costs.recompute.predict(rc_tokens as f64);
        let t = t_io.max(t_rc);
        if best.is_none_or(|b| t < b.0) {
            best = Some((t, k, t_io, t_rc));
        }
    }
    let (_, k, t_io, t_rc) = best.unwrap_or((0.0, 0, 0.0, 0.0));
    Plan {
        recompute: missing
            .iter()
            .enumerate()
            .map(|(i, m)| i < k || m.disk_bytes.is_none())
            .collect(),
        predicted_io_s: t_io,
        predicted_recompute_s: t_rc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(io_per_mb: f64, rc_per_tok: f64) -> RestoreCosts {
        RestoreCosts {
            io: LinearCost {
                fixed: 0.0,
                per_unit: io_per_mb / 1e6,
            },
            recompute: LinearCost {
                fixed: 0.0,
                per_unit: rc_per_tok,
            },
        }
    }

    fn chunks(n: usize, bytes: u64) -> Vec<Missing> {
        vec![
            Missing {
                tokens: 16,
                disk_bytes: Some(bytes),
            };
            n
        ]
    }

    #[test]
    fn fast_disk_reads_everything() {
        let p = plan(&chunks(8, 100_000), &costs(0.001, 0.004));
        assert_eq!(p.recompute, vec![false; 8]);
    }

    #[test]
    fn balances_when_both_cost_the_same() {
        // Reading a chunk costs as much as recomputing one: half and half.
        let p = plan(&chunks(8, 1_000_000), &costs(0.016, 0.001));
        let k = p.recompute.iter().filter(|&&r| r).count();
        assert_eq!(k, 4);
        assert!(
            p.recompute[..4].iter().all(|&r| r),
            "a prefix is recomputed"
        );
        assert!((p.predicted_s() - 0.064).abs() < 1e-9);
    }

    #[test]
    fn unreadable_chunks_are_always_recomputed() {
        let mut m = chunks(4, 1000);
        m[2].disk_bytes = None;
        let p = plan(&m, &costs(0.0001, 1.0));
        assert_eq!(p.recompute, vec![false, false, true, false]);
        assert!((p.predicted_recompute_s - 16.0).abs() < 1e-9);
    }

    #[test]
    fn fit_recovers_a_line() {
        let s: Vec<(f64, f64)> = (1..10).map(|x| (x as f64, 0.5 + 2.0 * x as f64)).collect();
        let c = LinearCost::fit(&s);
        assert!((c.fixed - 0.5).abs() < 1e-9 && (c.per_unit - 2.0).abs() < 1e-9);
        let one = LinearCost::fit(&[(4.0, 2.0), (4.0, 2.0)]);
        assert!((one.per_unit - 0.5).abs() < 1e-12 && one.fixed == 0.0);
        assert_eq!(LinearCost::fit(&[]).predict(10.0), 0.0);
    }
}
