//! Tolerance-aware bit assignment: which precision each chunk of the KV store keeps.
//!
//! Chunks are ranked by information density (the mean attention mass their tokens receive);
//! the densest get the most bits. With levels sorted by bits `b_0 > b_1 > … > b_k`, an
//! assignment is a set of thresholds in the ranking: the first `n_0` chunks keep `b_0` bits,
//! the next `n_1` keep `b_1`, and so on. Among all threshold choices whose average code width
//! stays within the ratio, the one with the most density-weighted precision
//! `Σ density_i × precision(bits_i)` is chosen, where `precision(b) = 1 − 2^−b` is one minus the
//! relative step of a b-bit quantizer (LLMS §4.1: keep the most information under the ratio).
//! Any precision that grows with bits makes the optimum monotone in density (swapping the
//! levels of a denser and a sparser chunk never helps), so searching thresholds loses nothing.
//!
//! Non-finite or negative densities count as zero; on ties the earlier chunk ranks as denser
//! (attention sinks sit at the start of a context).

/// Bits per element of one level; levels are given most bits first.
pub type Bits = u32;

/// Chooses one level per chunk. `levels` must be sorted by bits, descending, and non-empty;
/// `avg_bits` is the largest allowed mean of the chosen widths. Returns, per chunk, an index
/// into `levels`. If even the smallest level exceeds the ratio, every chunk gets the smallest.
pub fn assign_levels(densities: &[f64], levels: &[Bits], avg_bits: f64) -> Vec<usize> {
    let n = densities.len();
    let k = levels.len();
    if n == 0 || k == 0 {
        return vec![0; n];
    }
    let lowest = k - 1;
    // Ranking: densest first; stable for ties so earlier chunks win.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (da, db) = (clean(densities[a]), clean(densities[b]));
        db.partial_cmp(&da).unwrap_or(std::cmp::Ordering::Equal)
    });
    // prefix[i] = total density of the i densest chunks.
    let mut prefix = vec![0.0f64; n + 1];
    for (i, &c) in order.iter().enumerate() {
        prefix[i + 1] = prefix[i] + clean(densities[c]);
    }
    let budget = avg_bits * n as f64 + 1e-9;
    let mut out = vec![lowest; n];
    if (levels[lowest] as f64) * n as f64 > budget {
        return out;
    }
    // Search the thresholds: every split of the ranking into k consecutive runs, the last run
    // taking what is left. Exhaustive over the first k-2 thresholds and greedy (largest
    // possible) for the second-to-last, which is optimal because a larger run of more bits
    // never lowers the weighted sum. k is at most 4, n at most a few thousand chunks.
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut counts = vec![0usize; k];
    search(
        levels,
        &prefix,
        n,
        budget,
        0,
        0,
        0.0,
        &mut counts,
        &mut best,
    );
    if let Some((_, counts)) = best {
        let mut rank = 0;
        for (level, &c) in counts.iter().enumerate() {
            for &chunk in &order[rank..rank + c] {
                out[chunk] = level;
            }
            rank += c;
        }
    }
    out
}

fn clean(d: f64) -> f64 {
    if d.is_finite() && d > 0.0 {
        d
    } else {
        0.0
    }
}

/// Chooses `counts[level]` for `level..`, given `used` chunks and `bits_used` so far.
#[allow(clippy::too_many_arguments)]
fn search(
    levels: &[Bits],
    prefix: &[f64],
    n: usize,
    budget: f64,
    level: usize,
    used: usize,
    bits_used: f64,
    counts: &mut Vec<usize>,
    best: &mut Option<(f64, Vec<usize>)>,
) {
    let k = levels.len();
    let lowest = levels[k - 1] as f64;
    let left = n - used;
    if level == k - 1 {
        counts[level] = left;
        let total = bits_used + lowest * left as f64;
        if total <= budget {
            let value = score(levels, prefix, counts);
            if best.as_ref().is_none_or(|(v, _)| value > *v) {
                *best = Some((value, counts.clone()));
            }
        }
        return;
    }
    // Room for chunks at this level when every later chunk takes the lowest level.
    let extra = (levels[level] as f64 - lowest).max(f64::MIN_POSITIVE);
    let room = ((budget - bits_used - lowest * left as f64) / extra).floor();
    let max_here = if room <= 0.0 {
        0
    } else {
        (room as usize).min(left)
    };
    if level == k - 2 {
        counts[level] = max_here;
        search(
            levels,
            prefix,
            n,
            budget,
            level + 1,
            used + max_here,
            bits_used + levels[level] as f64 * max_here as f64,
            counts,
            best,
        );
        return;
    }
    for c in 0..=max_here {
        counts[level] = c;
        search(
            levels,
            prefix,
            n,
            budget,
            level + 1,
            used + c,
            bits_used + levels[level] as f64 * c as f64,
            counts,
            best,
        );
    }
}

/// How much of a value a `bits`-wide quantizer keeps.
pub fn precision(bits: Bits) -> f64 {
    1.0 - (-(bits as f64)).exp2()
}

/// Density-weighted precision of a threshold choice. A tiny per-chunk term favours spending
/// the budget (more bits) when densities are all zero.
fn score(levels: &[Bits], prefix: &[f64], counts: &[usize]) -> f64 {
    let mut rank = 0;
    let mut value = 0.0;
    for (level, &c) in counts.iter().enumerate() {
        let mass = prefix[rank + c] - prefix[rank];
        value += precision(levels[level]) * (mass + 1e-12 * c as f64);
        rank += c;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEVELS: [Bits; 3] = [8, 4, 2];

    fn mean_bits(levels: &[Bits], chosen: &[usize]) -> f64 {
        chosen.iter().map(|&l| levels[l] as f64).sum::<f64>() / chosen.len() as f64
    }

    #[test]
    fn densest_chunks_keep_most_bits() {
        let d = [0.5, 0.01, 0.2, 0.001, 0.05, 0.3];
        let chosen = assign_levels(&d, &LEVELS, 4.0);
        assert!(mean_bits(&LEVELS, &chosen) <= 4.0);
        // Ordered by density, bits never increase.
        let mut idx: Vec<usize> = (0..d.len()).collect();
        idx.sort_by(|&a, &b| d[b].partial_cmp(&d[a]).unwrap());
        for w in idx.windows(2) {
            assert!(chosen[w[0]] <= chosen[w[1]], "{chosen:?}");
        }
        assert_eq!(chosen[0], 0, "the densest chunk keeps 8 bits");
        assert_eq!(chosen[3], 2, "the sparsest goes to 2 bits");
    }

    #[test]
    fn generous_ratio_keeps_everything_at_the_top() {
        let chosen = assign_levels(&[0.1, 0.2, 0.3], &LEVELS, 8.0);
        assert_eq!(chosen, vec![0, 0, 0]);
    }

    #[test]
    fn impossible_ratio_gives_the_lowest_level() {
        let chosen = assign_levels(&[0.1, 0.2], &LEVELS, 1.0);
        assert_eq!(chosen, vec![2, 2]);
    }

    #[test]
    fn non_finite_densities_count_as_zero() {
        let chosen = assign_levels(&[f64::NAN, 1.0, f64::INFINITY, -3.0], &LEVELS, 4.0);
        assert_eq!(chosen[1], 0);
        assert!(mean_bits(&LEVELS, &chosen) <= 4.0);
    }

    /// Brute force over every assignment of levels (respecting nothing but the ratio) cannot
    /// beat the threshold search.
    fn brute_force(d: &[f64], levels: &[Bits], avg: f64) -> f64 {
        let n = d.len();
        let k = levels.len();
        let mut best = f64::NEG_INFINITY;
        let mut choice = vec![0usize; n];
        loop {
            let bits: f64 = choice.iter().map(|&l| levels[l] as f64).sum();
            if bits <= avg * n as f64 + 1e-9 {
                let v: f64 = choice
                    .iter()
                    .zip(d)
                    .map(|(&l, &x)| precision(levels[l]) * x)
                    .sum();
                best = best.max(v);
            }
            let mut i = 0;
            loop {
                if i == n {
                    return best;
                }
                choice[i] += 1;
                if choice[i] < k {
                    break;
                }
                choice[i] = 0;
                i += 1;
            }
        }
    }

    proptest! {
        #[test]
        fn threshold_search_is_optimal(
            d in proptest::collection::vec(0.0f64..1.0, 1..7),
            avg in 2.0f64..8.0,
        ) {
            let chosen = assign_levels(&d, &LEVELS, avg);
            prop_assert!(mean_bits(&LEVELS, &chosen) <= avg + 1e-9);
            let value: f64 = chosen.iter().zip(&d).map(|(&l, &x)| precision(LEVELS[l]) * x).sum();
            let best = brute_force(&d, &LEVELS, avg);
            prop_assert!(value >= best - 1e-9, "threshold {value} < brute force {best}");
        }

        #[test]
        fn four_levels_stay_within_ratio(
            d in proptest::collection::vec(0.0f64..1.0, 0..200),
            avg in 1.0f64..16.0,
        ) {
            let levels = [16, 8, 4, 2];
            let chosen = assign_levels(&d, &levels, avg);
            prop_assert_eq!(chosen.len(), d.len());
            if !d.is_empty() && avg >= 2.0 {
                prop_assert!(mean_bits(&levels, &chosen) <= avg + 1e-9);
            }
        }
    }
}
