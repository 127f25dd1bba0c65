//! The forward pass's view of a sequence's keys and values.
//!
//! The forward pass writes each token's keys and values through [`KvCache::write`] and asks the
//! cache to attend ([`KvCache::attend`]), so a cache may hold its entries in any format (the
//! daemon's KV store keeps 16-token chunks at several precisions) and read them directly.
//! [`ContiguousKv`] is the plain f32 implementation used by one-shot commands and tests.

use std::ops::Range;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvError {
    #[error("context full: {needed} positions needed, capacity is {capacity}")]
    Full { needed: usize, capacity: usize },
    #[error("cache shape mismatch: {0}")]
    Shape(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Shape of the per-layer key/value rows a cache must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub v_head_dim: usize,
}

/// One attention question: the query of the token at `pos` in `layer`, for query heads `heads`.
#[derive(Clone, Debug)]
pub struct AttnQuery<'a> {
    pub layer: usize,
    pub pos: usize,
    /// Keys visible to the query, itself included (sliding-window layers); `None`: all.
    pub window: Option<usize>,
    /// Query heads to compute (a sub-range lets threads split one query).
    pub heads: Range<usize>,
    /// Query vectors of all heads (`n_heads * head_dim`), already scaled.
    pub q: &'a [f32],
    pub n_heads: usize,
    /// Whether the cache should be fetched ahead as it is read: when one query reads it once
    /// (decode). A prefill's queries read the same chunks over and over from the CPU caches,
    /// where the hints only cost instructions.
    pub prefetch: bool,
}

impl AttnQuery<'_> {
    /// Positions this query sees.
    pub fn visible(&self) -> Range<usize> {
        let start = match self.window {
            Some(w) => (self.pos + 1).saturating_sub(w),
            None => 0,
        };
        start..self.pos + 1
    }
}

pub trait KvCache: Send + Sync {
    fn shape(&self) -> KvShape;

    /// Number of positions held: `0..len()` are valid.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most positions this cache can hold.
    fn capacity(&self) -> usize;

    /// Makes positions `0..len` writable. Fails if `len` exceeds the capacity.
    fn reserve(&mut self, len: usize) -> Result<(), KvError>;

    /// Stores one token's keys (`n_kv_heads * head_dim`) and values at `pos` of `layer`.
    /// `pos` must be below the length last reserved.
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]);

    /// Marks `0..len` as valid after a forward pass wrote them (all layers).
    fn set_len(&mut self, len: usize);

    /// Forgets positions from `len` on.
    fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.set_len(len);
        }
    }

    /// Softmax attention of `query` over the visible positions: writes `v_head_dim` outputs for
    /// each head of `query.heads` into `out`, which holds exactly those heads in order
    /// (`out.len() == query.heads.len() * v_head_dim`). `scores` is scratch space.
    fn attend(&self, query: &AttnQuery<'_>, out: &mut [f32], scores: &mut Vec<f32>);

    /// A hint: start bringing part `part` of `parts` of `layer`'s keys and values toward the
    /// caches. The forward pass calls it while the previous layer's matrix products run (they
    /// are compute-bound in batched decode, attention is memory-bound), so the two overlap.
    fn prefetch_layer(&self, layer: usize, part: usize, parts: usize) {
        let _ = (layer, part, parts);
    }

    /// Blocks until `layer`'s entries can be read (a cache restored layer by layer while the
    /// forward pass runs); the forward pass calls it before each layer's attention.
    fn wait_layer(&self, layer: usize) -> Result<(), KvError> {
        let _ = layer;
        Ok(())
    }
}

/// A contiguous f32 cache: per layer, `[position][kv_head][dim]`.
#[derive(Clone, Debug)]
pub struct ContiguousKv {
    shape: KvShape,
    capacity: usize,
    len: usize,
    reserved: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl ContiguousKv {
    pub fn new(shape: KvShape, capacity: usize) -> Self {
        ContiguousKv {
            shape,
            capacity,
            len: 0,
            reserved: 0,
            keys: vec![Vec::new(); shape.n_layers],
            values: vec![Vec::new(); shape.n_layers],
        }
    }

    fn k_width(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    fn v_width(&self) -> usize {
        self.shape.n_kv_heads * self.shape.v_head_dim
    }
}

impl KvCache for ContiguousKv {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn reserve(&mut self, len: usize) -> Result<(), KvError> {
        if len > self.capacity {
            return Err(KvError::Full {
                needed: len,
                capacity: self.capacity,
            });
        }
        if len > self.reserved {
            let (kw, vw) = (self.k_width(), self.v_width());
            for l in 0..self.shape.n_layers {
                self.keys[l].resize(len * kw, 0.0);
                self.values[l].resize(len * vw, 0.0);
            }
            self.reserved = len;
        }
        Ok(())
    }

    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (kw, vw) = (self.k_width(), self.v_width());
        debug_assert!(pos < self.reserved && k.len() == kw && v.len() == vw);
        if let Some(dst) = self.keys[layer].get_mut(pos * kw..(pos + 1) * kw) {
            dst.copy_from_slice(k);
        }
        if let Some(dst) = self.values[layer].get_mut(pos * vw..(pos + 1) * vw) {
            dst.copy_from_slice(v);
        }
    }

    fn set_len(&mut self, len: usize) {
        self.len = len.min(self.reserved);
    }

    fn attend(&self, query: &AttnQuery<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { self.attend_avx2(query, out, scores) };
            return;
        }
        self.attend_impl(query, out, scores);
    }
}

/// Whether this CPU runs the AVX2+FMA build of the attention loops (checked once).
#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

impl ContiguousKv {
    /// The attention loops compiled for AVX2+FMA: the same code as [`Self::attend_impl`],
    /// which is inlined here, so the compiler vectorises it 8 wide instead of SSE2's 4.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self, query: &AttnQuery<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
        self.attend_impl(query, out, scores);
    }

    #[inline(always)]
    fn attend_impl(&self, query: &AttnQuery<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
        let KvShape {
            n_kv_heads,
            head_dim,
            v_head_dim,
            ..
        } = self.shape;
        let (kw, vw) = (self.k_width(), self.v_width());
        let visible = query.visible();
        let visible = visible.start..visible.end.min(self.reserved);
        let n_vis = visible.len();
        let group = query.n_heads / n_kv_heads;
        let keys = &self.keys[query.layer];
        let values = &self.values[query.layer];
        // Heads sharing a kv head are done together, so each key and value row is read once
        // per group: scores are laid out [head in group][position].
        let mut h0 = query.heads.start;
        while h0 < query.heads.end {
            let g = h0 / group;
            let h1 = ((g + 1) * group).min(query.heads.end);
            let nh = h1 - h0;
            scores.resize(nh * n_vis, 0.0);
            for (i, p) in visible.clone().enumerate() {
                let k = &keys[p * kw + g * head_dim..p * kw + (g + 1) * head_dim];
                for j in 0..nh {
                    let h = h0 + j;
                    scores[j * n_vis + i] = dot(&query.q[h * head_dim..(h + 1) * head_dim], k);
                }
            }
            for row in scores.chunks_exact_mut(n_vis) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            let first = (h0 - query.heads.start) * v_head_dim;
            let o = &mut out[first..first + nh * v_head_dim];
            o.fill(0.0);
            for (i, p) in visible.clone().enumerate() {
                let v = &values[p * vw + g * v_head_dim..p * vw + (g + 1) * v_head_dim];
                for (j, oh) in o.chunks_exact_mut(v_head_dim).enumerate() {
                    let w = scores[j * n_vis + i];
                    for (o, &v) in oh.iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
            h0 = h1;
        }
    }
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociation.
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            v_head_dim: 2,
        }
    }

    #[test]
    fn attends_with_softmax_and_window() {
        let mut kv = ContiguousKv::new(shape(), 8);
        kv.reserve(3).unwrap();
        kv.write(0, 0, &[1.0, 0.0], &[1.0, 0.0]);
        kv.write(0, 1, &[0.0, 1.0], &[0.0, 1.0]);
        kv.write(0, 2, &[0.0, 0.0], &[5.0, 5.0]);
        kv.set_len(3);
        let q = [2.0f32, 0.0];
        let mut out = [0.0f32; 4];
        let mut scratch = Vec::new();
        let query = AttnQuery {
            layer: 0,
            pos: 1,
            window: None,
            heads: 0..2,
            q: &[2.0, 0.0, 2.0, 0.0],
            n_heads: 2,
            prefetch: true,
        };
        kv.attend(&query, &mut out, &mut scratch);
        let e = 2f32.exp();
        let w0 = e / (e + 1.0);
        assert!((out[0] - w0).abs() < 1e-6 && (out[1] - (1.0 - w0)).abs() < 1e-6);
        assert_eq!(out[0..2], out[2..4]);
        // Window of 1: only itself.
        let query = AttnQuery {
            window: Some(1),
            pos: 2,
            heads: 0..1,
            q: &q,
            n_heads: 1,
            prefetch: true,
            layer: 0,
        };
        kv.attend(&query, &mut out[..2], &mut scratch);
        assert_eq!(&out[0..2], &[5.0, 5.0]);
    }

    /// Grouped attention equals a naive per-head softmax(q·k)·v, for a head range that starts
    /// and ends inside kv groups, with and without a window.
    #[test]
    fn grouped_heads_match_naive_attention() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 8,
            v_head_dim: 4,
        };
        let (n_heads, len) = (6, 23);
        let mut kv = ContiguousKv::new(shape, 32);
        kv.reserve(len).unwrap();
        let mut ks = vec![];
        let mut vs = vec![];
        for p in 0..len {
            let k: Vec<f32> = (0..16).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..8).map(|_| rng.gen_range(-1.0..1.0)).collect();
            kv.write(1, p, &k, &v);
            ks.push(k);
            vs.push(v);
        }
        kv.set_len(len);
        let q: Vec<f32> = (0..n_heads * 8).map(|_| rng.gen_range(-2.0..2.0)).collect();
        for window in [None, Some(5)] {
            let query = AttnQuery {
                layer: 1,
                pos: 20,
                window,
                heads: 1..5,
                q: &q,
                n_heads,
                prefetch: true,
            };
            let mut out = vec![0.0; 4 * 4];
            kv.attend(&query, &mut out, &mut Vec::new());
            for h in 1..5 {
                let g = h / 3;
                let vis = query.visible();
                let sc: Vec<f32> = vis
                    .clone()
                    .map(|p| dot(&q[h * 8..(h + 1) * 8], &ks[p][g * 8..(g + 1) * 8]))
                    .collect();
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for d in 0..4 {
                    let want: f32 = vis
                        .clone()
                        .zip(&e)
                        .map(|(p, w)| w / sum * vs[p][g * 4 + d])
                        .sum();
                    let got = out[(h - 1) * 4 + d];
                    assert!(
                        (got - want).abs() < 1e-5,
                        "head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The AVX2 build of the attention loops equals the baseline build.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_attention_matches_baseline() {
        use rand::{Rng, SeedableRng};
        if !avx2_fma() {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let shape = KvShape {
            n_layers: 1,
            n_kv_heads: 3,
            head_dim: 64,
            v_head_dim: 64,
        };
        let mut kv = ContiguousKv::new(shape, 300);
        kv.reserve(300).unwrap();
        for p in 0..300 {
            let k: Vec<f32> = (0..192).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..192).map(|_| rng.gen_range(-1.0..1.0)).collect();
            kv.write(0, p, &k, &v);
        }
        kv.set_len(300);
        let q: Vec<f32> = (0..9 * 64).map(|_| rng.gen_range(-0.5..0.5)).collect();
        for (pos, window, heads) in [(299, None, 0..9), (150, Some(64), 2..7), (0, None, 4..5)] {
            let query = AttnQuery {
                layer: 0,
                pos,
                window,
                heads: heads.clone(),
                q: &q,
                n_heads: 9,
                prefetch: true,
            };
            let mut a = vec![0.0; heads.len() * 64];
            let mut b = a.clone();
            // SAFETY: AVX2 and FMA were checked above.
            unsafe { kv.attend_avx2(&query, &mut a, &mut Vec::new()) };
            kv.attend_impl(&query, &mut b, &mut Vec::new());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn capacity_is_enforced() {
        let mut kv = ContiguousKv::new(shape(), 4);
        assert_eq!(
            kv.reserve(5),
            Err(KvError::Full {
                needed: 5,
                capacity: 4
            })
        );
        kv.reserve(4).unwrap();
        kv.set_len(4);
        kv.truncate(2);
        assert_eq!(kv.len(), 2);
    }
}
