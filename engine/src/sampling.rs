//! Token sampling and stop strings.
//!
//! [`Sampler`] follows llama.cpp's default chain (penalties → top-k → top-p → min-p →
//! temperature → softmax → draw) so the same parameters mean the same thing to users coming
//! from llama.cpp or the OpenAI API. It is seeded (ChaCha20) for reproducible runs, keeps its
//! buffers between calls (no allocation per token after warm-up) and avoids a full sort of
//! large vocabularies (Gemma: 262144) by growing a sorted prefix only as far as needed.
//! [`StopMatcher`] cuts streamed text at stop strings without ever emitting text that could
//! turn out to be part of one.

use std::cmp::Ordering;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

/// Sampling parameters. Defaults are greedy decoding with every filter off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 = greedy (argmax after penalties).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the top token's probability; 0 = off.
    pub min_p: f32,
    /// llama.cpp repetition penalty (positive logits divided, negative multiplied); 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted `count` times per occurrence in the penalty window (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Subtracted once from every token present in the penalty window.
    pub presence_penalty: f32,
    /// How many of the most recent tokens the penalties look at; 0 = penalties off.
    pub penalty_last_n: usize,
    /// `None` = seeded from OS entropy; `Some(s)` = reproducible.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
        }
    }
}

/// An out-of-range sampling parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter {field} = {value}: must be {expected}")]
    InvalidParam {
        field: &'static str,
        value: f32,
        expected: &'static str,
    },
}

impl SamplingParams {
    /// Rejects NaN/infinite values, negative temperature, `top_p` outside (0, 1], `min_p`
    /// outside [0, 1] and a non-positive repetition penalty.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |field, value, expected| {
            Err(SamplingError::InvalidParam {
                field,
                value,
                expected,
            })
        };
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return bad("temperature", t, "finite and >= 0");
        }
        let p = self.top_p;
        if !(p.is_finite() && p > 0.0 && p <= 1.0) {
            return bad("top_p", p, "in (0, 1]");
        }
        let m = self.min_p;
        if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
            return bad("min_p", m, "in [0, 1]");
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return bad("repetition_penalty", r, "finite and > 0");
        }
        if !self.frequency_penalty.is_finite() {
            return bad("frequency_penalty", self.frequency_penalty, "finite");
        }
        if !self.presence_penalty.is_finite() {
            return bad("presence_penalty", self.presence_penalty, "finite");
        }
        Ok(())
    }

    fn penalties_active(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Cand {
    id: u32,
    logit: f32,
}

/// Descending by logit, ties to the lower id (logits are never NaN here).
fn by_logit_desc(a: &Cand, b: &Cand) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// NaN → -inf, +inf → f32::MAX (so `x - max` stays finite for the top token).
#[inline]
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else if l == f32::INFINITY {
        f32::MAX
    } else {
        l
    }
}

/// Sorts `c` so that its first `m` entries are the `m` largest, in descending order.
fn sort_prefix(c: &mut [Cand], m: usize) {
    let m = m.min(c.len());
    if m == 0 {
        return;
    }
    if m < c.len() {
        c.select_nth_unstable_by(m - 1, by_logit_desc);
    }
    c[..m].sort_unstable_by(by_logit_desc);
}

/// A stateful sampler: parameters, RNG and reusable buffers for one generation stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    cand: Vec<Cand>,
    counts: Vec<u32>,
    touched: Vec<u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Validates `params`; `seed: None` seeds from OS entropy, `Some(s)` reproducibly.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s),
            None => ChaCha20Rng::from_entropy(),
        };
        Ok(Self {
            params,
            rng,
            cand: Vec::new(),
            counts: Vec::new(),
            touched: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one per vocabulary entry) given the tokens so far
    /// (`history`; penalties look at its last `penalty_last_n`). Returns 0 for empty logits.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let n = logits.len();
        if n == 0 {
            return 0;
        }
        let p = &self.params;
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| Cand {
                id: i as u32,
                logit: sanitize(l),
            }));

        // 1. Penalties (llama.cpp semantics), only on tokens seen in the window.
        if p.penalties_active() {
            if self.counts.len() < n {
                self.counts.resize(n, 0);
            }
            let window = &history[history.len().saturating_sub(p.penalty_last_n)..];
            for &t in window {
                let ti = t as usize;
                if ti < n {
                    if self.counts[ti] == 0 {
                        self.touched.push(t);
                    }
                    self.counts[ti] += 1;
                }
            }
            for &t in &self.touched {
                let ti = t as usize;
                let count = self.counts[ti];
                self.counts[ti] = 0;
                let l = &mut self.cand[ti].logit;
                if *l <= 0.0 {
                    *l *= p.repetition_penalty;
                } else {
                    *l /= p.repetition_penalty;
                }
                *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
                *l = sanitize(*l);
            }
            self.touched.clear();
        }

        // Greedy: argmax after penalties.
        if p.temperature == 0.0 {
            return best_of(&self.cand);
        }

        // 2. Top-k.
        let mut sorted = 0;
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            self.cand.truncate(p.top_k);
        }
        let max = self
            .cand
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Nothing has any probability (all NaN / -inf): fall back to the lowest id.
            return self.cand.iter().map(|c| c.id).min().unwrap_or(0);
        }

        // 3. Top-p over temperature-1 probabilities, growing a sorted prefix on demand.
        if p.top_p < 1.0 {
            let total: f64 = self
                .cand
                .iter()
                .map(|c| f64::from((c.logit - max).exp()))
                .sum();
            let target = f64::from(p.top_p) * total;
            let len = self.cand.len();
            let mut cum = 0.0f64;
            let mut i = 0;
            let mut keep = len;
            'grow: loop {
                while i < sorted {
                    cum += f64::from((self.cand[i].logit - max).exp());
                    i += 1;
                    if cum >= target {
                        keep = i;
                        break 'grow;
                    }
                }
                if sorted == len {
                    break;
                }
                let want = (sorted.max(16) * 4).min(len);
                sort_prefix(&mut self.cand[sorted..], want - sorted);
                sorted = want;
            }
            self.cand.truncate(keep.max(1));
        }

        // 4. Min-p: p >= min_p * p_max  <=>  logit >= max + ln(min_p).
        if p.min_p > 0.0 {
            let threshold = max + p.min_p.ln();
            self.cand.retain(|c| c.logit >= threshold);
        }

        // 5. Temperature, softmax, draw. Weights overwrite the logits in place.
        let inv_t = 1.0 / p.temperature;
        let mut total = 0.0f64;
        for c in self.cand.iter_mut() {
            let w = ((c.logit - max) * inv_t).exp();
            let w = if w.is_finite() { w } else { 0.0 };
            c.logit = w;
            total += f64::from(w);
        }
        if !(total > 0.0 && total.is_finite()) {
            return best_of(&self.cand);
        }
        let r = self.rng.gen::<f64>() * total;
        let mut acc = 0.0f64;
        let mut last = self.cand[0].id;
        for c in &self.cand {
            if c.logit > 0.0 {
                acc += f64::from(c.logit);
                last = c.id;
                if r < acc {
                    return c.id;
                }
            }
        }
        last
    }

    /// Log-softmax of the raw `logits` at `id` and the top `n` `(id, logprob)` in descending
    /// order (ties to the lower id). NaN counts as -inf; with no finite logit all tokens are
    /// treated as equally likely. An out-of-range `id` gets -inf.
    pub fn logprobs(logits: &[f32], id: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
        if logits.is_empty() {
            return (f32::NEG_INFINITY, Vec::new());
        }
        let max = logits
            .iter()
            .map(|&l| sanitize(l))
            .fold(f32::NEG_INFINITY, f32::max);
        // ln(sum exp(l - max)), computed once.
        let lse_tail = if max == f32::NEG_INFINITY {
            0.0
        } else {
            let s: f64 = logits
                .iter()
                .map(|&l| f64::from((sanitize(l) - max).exp()))
                .sum();
            s.ln() as f32
        };
        let lp = |l: f32| -> f32 {
            if max == f32::NEG_INFINITY {
                -(logits.len() as f32).ln()
            } else {
                (sanitize(l) - max) - lse_tail
            }
        };
        let own = logits
            .get(id as usize)
            .map(|&l| lp(l))
            .unwrap_or(f32::NEG_INFINITY);
        let n = n.min(logits.len());
        let mut top: Vec<Cand> = Vec::new();
        if n > 0 {
            top = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| Cand {
                    id: i as u32,
                    logit: sanitize(l),
                })
                .collect();
            sort_prefix(&mut top, n);
            top.truncate(n);
        }
        (own, top.iter().map(|c| (c.id, lp(c.logit))).collect())
    }
}

/// Whether a match `(end, start)` beats the current best (earliest end, then earliest start).
fn better(best: Option<(usize, usize)>, end: usize, start: usize) -> bool {
    match best {
        None => true,
        Some((be, bs)) => end < be || (end == be && start < bs),
    }
}

fn best_of(c: &[Cand]) -> u32 {
    let mut best: Option<Cand> = None;
    for &x in c {
        match best {
            Some(b) if by_logit_desc(&x, &b) != Ordering::Less => {}
            _ => best = Some(x),
        }
    }
    best.map_or(0, |b| b.id)
}

/// Index of the largest logit; ties go to the lowest id, NaN counts as -inf, and empty or
/// all-NaN input gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_v {
            best = i;
            best_v = l;
        }
    }
    best as u32
}

/// Result of feeding one piece of text to a [`StopMatcher`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopStep {
    /// No stop string yet; `emit` can be sent to the client now (may be empty).
    Continue { emit: String },
    /// `stop` completed; `emit` is the text before it. Generation should end.
    Stopped { emit: String, stop: String },
}

/// Incremental stop-string matcher over generated text.
///
/// Holds back the longest suffix that could still be the start of a stop string, so a stop
/// split across tokens is never partially emitted. When several stop strings could match,
/// the one that completes first (earliest end, then longest) wins; this makes the result
/// independent of how the text is split into pieces. Pieces must be whole UTF-8 text (the
/// detokenizer holds back incomplete byte sequences). After `Stopped`, further input is
/// ignored.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    max_len: usize,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            held: String::new(),
            max_len,
            stopped: false,
        }
    }

    pub fn push(&mut self, piece: &str) -> StopStep {
        if self.stopped {
            return StopStep::Continue {
                emit: String::new(),
            };
        }
        self.held.push_str(piece);
        // Earliest-ending match (first occurrence of each stop ends earliest for that stop).
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, stop index)
        for (i, s) in self.stops.iter().enumerate() {
            if let Some(start) = self.held.find(s.as_str()) {
                let end = start + s.len();
                if better(best.map(|(be, bs, _)| (be, bs)), end, start) {
                    best = Some((end, start, i));
                }
            }
        }
        if let Some((_, start, i)) = best {
            self.held.truncate(start);
            self.stopped = true;
            return StopStep::Stopped {
                emit: std::mem::take(&mut self.held),
                stop: self.stops[i].clone(),
            };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let len = self.held.len();
        let mut k = len.saturating_sub(self.max_len.saturating_sub(1));
        let mut cut = len;
        while k < len {
            if self.held.is_char_boundary(k) {
                let tail = &self.held[k..];
                if self.stops.iter().any(|s| s.starts_with(tail)) {
                    cut = k;
                    break;
                }
            }
            k += 1;
        }
        let emit = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopStep::Continue { emit }
    }

    /// Text currently held back (a possible stop-string prefix).
    pub fn held(&self) -> &str {
        &self.held
    }

    /// True once a stop string has been seen.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// End of generation without a stop: returns (and clears) the held-back text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(42),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn logits_example() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 3.0, 0.5, f32::NAN, 2.9]
    }

    #[test]
    fn sampling_types_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Sampler>();
        assert_send::<StopMatcher>();
    }

    #[test]
    fn sampling_argmax_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 2.0]), 3);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::INFINITY]), 1);
    }

    #[test]
    fn sampling_greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        let l = logits_example();
        assert_eq!(s.sample(&l, &[]), argmax(&l));
        assert_eq!(s.sample(&l, &[]), 1);
        let mut s = Sampler::new(params(|_| {})).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&l, &[5, 6]), 1);
        }
    }

    #[test]
    fn sampling_same_seed_same_sequence() {
        let l: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 101) as f32 / 20.0)
            .collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 1.0;
                p.seed = Some(seed);
            }))
            .unwrap();
            (0..100).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Entropy seeding works and produces valid ids.
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.seed = None;
        }))
        .unwrap();
        assert!((s.sample(&l, &[]) as usize) < l.len());
    }

    #[test]
    fn sampling_top_k_1_is_greedy() {
        let l = logits_example();
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut s = Sampler::new(params(|p| {
                p.temperature = t;
                p.top_k = 1;
            }))
            .unwrap();
            for _ in 0..50 {
                assert_eq!(s.sample(&l, &[]), 1);
            }
        }
    }

    #[test]
    fn sampling_small_top_p_keeps_top_token() {
        // Large vocabulary to exercise the growing sorted prefix.
        let mut l: Vec<f32> = (0..262_144).map(|i| (i % 1000) as f32 / 1000.0).collect();
        l[123_456] = 20.0; // p ≈ 0.999
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.5;
            p.top_p = 0.01;
        }))
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[]), 123_456);
        }
        // Top token at p ≈ 0.0003: the nucleus of 0.01 spans ~1700 tokens (logits >= ~0.99),
        // so the sorted prefix has to grow several times.
        l[123_456] = 5.0;
        for _ in 0..50 {
            let id = s.sample(&l, &[]) as usize;
            assert!(id == 123_456 || l[id] >= 0.99, "{id} {}", l[id]);
        }
        // top_p keeps exactly the nucleus: [0.5, 0.3, 0.2] with top_p 0.75 → ids 0 and 1.
        let l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.75;
        }))
        .unwrap();
        let mut seen = [0; 3];
        for _ in 0..500 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0, "{seen:?}");
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn sampling_min_p_filters() {
        // probabilities 0.6, 0.3, 0.1: min_p 0.4 → threshold 0.24 → {0, 1}.
        let l = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.min_p = 0.4;
        }))
        .unwrap();
        let mut seen = [0; 3];
        for _ in 0..500 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0, "{seen:?}");
        assert!(seen[1] > 0, "{seen:?}");
        let mut s = Sampler::new(params(|p| {
            p.temperature = 1.0;
            p.min_p = 1.0;
        }))
        .unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&l, &[]), 0);
        }
    }

    #[test]
    fn sampling_penalties_change_the_pick() {
        let l = [2.0, 1.8, -1.0];
        // repetition: 2.0 / 1.5 = 1.33 < 1.8
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 1.5)).unwrap();
        assert_eq!(s.sample(&l, &[0]), 1);
        assert_eq!(s.sample(&l, &[]), 0);
        // outside the window: no effect
        let mut s = Sampler::new(params(|p| {
            p.repetition_penalty = 1.5;
            p.penalty_last_n = 2;
        }))
        .unwrap();
        assert_eq!(s.sample(&l, &[0, 1, 2]), 0);
        // frequency: 2.0 - 3 * 0.1 = 1.7 < 1.8; one occurrence (1.9) is not enough.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.1)).unwrap();
        assert_eq!(s.sample(&l, &[0, 0, 0]), 1);
        assert_eq!(s.sample(&l, &[0]), 0);
        // presence: 2.0 - 0.5 = 1.5 < 1.8
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.5)).unwrap();
        assert_eq!(s.sample(&l, &[0, 0, 0, 0]), 1);
        // negative logits are multiplied: -1.0 * 2 = -2.0 stays below; ids out of range ignored.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0)).unwrap();
        assert_eq!(s.sample(&[-1.0, -1.5], &[0, 99]), 1);
        // counts are reset between calls
        assert_eq!(s.sample(&[-1.0, -1.5], &[]), 0);
    }

    #[test]
    fn sampling_distribution_sanity() {
        let l = [0.7f32.ln(), 0.3f32.ln()];
        let mut s = Sampler::new(params(|p| p.temperature = 1.0)).unwrap();
        let n = 2000;
        let zeros = (0..n).filter(|_| s.sample(&l, &[]) == 0).count();
        let frac = zeros as f64 / n as f64;
        assert!((frac - 0.7).abs() < 0.04, "{frac}");
    }

    #[test]
    fn sampling_nan_and_inf_logits_do_not_panic() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.8;
            p.top_p = 0.9;
            p.min_p = 0.05;
            p.top_k = 3;
            p.repetition_penalty = 1.3;
            p.frequency_penalty = -1e38;
        }))
        .unwrap();
        assert_eq!(s.sample(&[f32::NAN; 4], &[0, 1]), 0);
        assert_eq!(s.sample(&[f32::NAN, f32::INFINITY, 0.0], &[1]), 1);
        assert_eq!(s.sample(&[], &[]), 0);
        let (lp, top) = Sampler::logprobs(&[f32::NAN, f32::NAN], 0, 2);
        assert!((lp - (-(2f32).ln())).abs() < 1e-6);
        assert_eq!(top.len(), 2);
    }

    #[test]
    fn sampling_logprobs() {
        let l = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln(), f32::NAN];
        let (lp, top) = Sampler::logprobs(&l, 1, 2);
        assert!((lp - 0.25f32.ln()).abs() < 1e-5);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, 0);
        assert_eq!(top[1].0, 1); // tie → lower id
        assert!((top[0].1 - 0.5f32.ln()).abs() < 1e-5);
        // shift invariance
        let shifted: Vec<f32> = l.iter().map(|x| x + 100.0).collect();
        let (lp2, _) = Sampler::logprobs(&shifted, 1, 0);
        assert!((lp - lp2).abs() < 1e-4);
        assert_eq!(Sampler::logprobs(&l, 3, 0).0, f32::NEG_INFINITY);
        assert_eq!(Sampler::logprobs(&l, 99, 0).0, f32::NEG_INFINITY);
    }

    #[test]
    fn sampling_validate_rejects_bad_params() {
        assert!(SamplingParams::default().validate().is_ok());
        let bad: Vec<SamplingParams> = vec![
            params(|p| p.temperature = f32::NAN),
            params(|p| p.temperature = -0.1),
            params(|p| p.temperature = f32::INFINITY),
            params(|p| p.top_p = 0.0),
            params(|p| p.top_p = 1.1),
            params(|p| p.top_p = f32::NAN),
            params(|p| p.min_p = -0.1),
            params(|p| p.min_p = 1.5),
            params(|p| p.repetition_penalty = 0.0),
            params(|p| p.repetition_penalty = -1.0),
            params(|p| p.frequency_penalty = f32::NAN),
            params(|p| p.presence_penalty = f32::NEG_INFINITY),
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
            assert!(Sampler::new(p).is_err());
        }
        // serde: partial JSON fills defaults
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.7,"seed":1}"#).unwrap();
        assert_eq!(p.temperature, 0.7);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.seed, Some(1));
    }

    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopStep::Continue { emit } => out.push_str(&emit),
                StopStep::Stopped { emit, stop } => {
                    out.push_str(&emit);
                    return (out, Some(stop));
                }
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn sampling_stop_split_across_pieces() {
        let mut m = StopMatcher::new(vec!["<|im_end|>".into()]);
        assert_eq!(
            m.push("Hello <|im"),
            StopStep::Continue {
                emit: "Hello ".into()
            }
        );
        assert_eq!(m.held(), "<|im");
        assert_eq!(
            m.push("_end|> trailing"),
            StopStep::Stopped {
                emit: String::new(),
                stop: "<|im_end|>".into()
            }
        );
        assert!(m.is_stopped());
        assert_eq!(
            m.push("more"),
            StopStep::Continue {
                emit: String::new()
            }
        );
    }

    #[test]
    fn sampling_stop_multiple_strings() {
        let mut m = StopMatcher::new(vec!["STOP".into(), "\n\n".into(), String::new()]);
        assert_eq!(
            run(&mut m, &["a b", "\n", "\nc STOP"]),
            ("a b".into(), Some("\n\n".into()))
        );
        let mut m = StopMatcher::new(vec!["STOP".into(), "\n\n".into()]);
        assert_eq!(
            run(&mut m, &["x ST", "OP\n\n"]),
            ("x ".into(), Some("STOP".into()))
        );
    }

    #[test]
    fn sampling_stop_partial_match_released() {
        let mut m = StopMatcher::new(vec!["</end>".into()]);
        assert_eq!(m.push("a </e"), StopStep::Continue { emit: "a ".into() });
        assert_eq!(
            m.push("x> b"),
            StopStep::Continue {
                emit: "</ex> b".into()
            }
        );
        assert_eq!(m.push("</"), StopStep::Continue { emit: "".into() });
        assert_eq!(m.finish(), "</");
    }

    #[test]
    fn sampling_stop_multibyte_utf8() {
        let mut m = StopMatcher::new(vec!["€€".into(), "日本語".into()]);
        assert_eq!(
            run(&mut m, &["aé€", "b日本", "x€", "€z"]),
            ("aé€b日本x".into(), Some("€€".into()))
        );
        let mut m = StopMatcher::new(vec!["日本語".into()]);
        assert_eq!(
            run(&mut m, &["日", "本", "語"]),
            (String::new(), Some("日本語".into()))
        );
        let mut m = StopMatcher::new(vec!["日本語".into()]);
        assert_eq!(run(&mut m, &["é日", "本é"]), ("é日本é".into(), None));
    }

    /// Reference: the earliest-ending (then longest) occurrence in the whole text.
    fn reference(input: &str, stops: &[String]) -> (String, Option<String>) {
        let mut best: Option<(usize, usize, &String)> = None;
        for s in stops.iter().filter(|s| !s.is_empty()) {
            if let Some(start) = input.find(s.as_str()) {
                let end = start + s.len();
                if better(best.map(|(be, bs, _)| (be, bs)), end, start) {
                    best = Some((end, start, s));
                }
            }
        }
        match best {
            Some((_, start, s)) => (input[..start].to_owned(), Some(s.clone())),
            None => (input.to_owned(), None),
        }
    }

    proptest! {
        #[test]
        fn sampling_stop_matcher_prop(
            chars in prop::collection::vec(prop::sample::select(vec!['a', 'b', 'é', '€', '\n']), 0..40),
            stops in prop::collection::vec(
                prop::collection::vec(prop::sample::select(vec!['a', 'b', 'é', '€', '\n']), 0..4)
                    .prop_map(|v| v.into_iter().collect::<String>()),
                0..4),
            cuts in prop::collection::vec(0usize..40, 0..10),
        ) {
            let input: String = chars.iter().collect();
            // split at char indices
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= chars.len()).collect();
            cuts.push(0);
            cuts.push(chars.len());
            cuts.sort_unstable();
            cuts.dedup();
            let pieces: Vec<String> = cuts
                .windows(2)
                .map(|w| chars[w[0]..w[1]].iter().collect())
                .collect();

            let mut m = StopMatcher::new(stops.clone());
            let mut emitted = String::new();
            let mut fed = String::new();
            let mut stopped = None;
            for p in &pieces {
                fed.push_str(p);
                match m.push(p) {
                    StopStep::Continue { emit } => {
                        emitted.push_str(&emit);
                        // invariant: emitted + held == everything fed so far
                        prop_assert_eq!(format!("{}{}", emitted, m.held()), fed.clone());
                    }
                    StopStep::Stopped { emit, stop } => {
                        emitted.push_str(&emit);
                        stopped = Some(stop);
                        break;
                    }
                }
            }
            if stopped.is_none() {
                emitted.push_str(&m.finish());
            }
            let (want, want_stop) = reference(&input, &stops);
            prop_assert_eq!(&emitted, &want);
            prop_assert_eq!(&stopped, &want_stop);
            if let Some(s) = &stopped {
                prop_assert!(input[emitted.len()..].starts_with(s.as_str()));
            }
        }
    }
}
