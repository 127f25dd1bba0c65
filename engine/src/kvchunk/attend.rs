//! Attention over chunk slots: the per-chunk kernels (scalar references here, AVX2 in
//! `avx2.rs`) and [`ChunkedKv`]'s attention loop.

use std::ops::Range;

use super::cache::{ChunkSlot, ChunkedKv};
use super::format::{f16_at, f16_group, unpack_group};
use super::{BlockLayout, Precision, CHUNK_TOKENS};
use crate::kv::{dot, AttnQuery, KvShape};

const T: usize = CHUNK_TOKENS;

/// Scores of the 16 tokens of one head block for `nh` consecutive query heads: `q` holds the
/// heads' query vectors (`nh * dk`), `out` receives `[head][t]` (`nh * 16`).
pub(crate) fn key_scores_scalar(
    lay: &BlockLayout,
    block: &[u8],
    q: &[f32],
    nh: usize,
    out: &mut [f32],
) {
    let (dk, gb, bits) = (lay.dk, lay.p.group_bytes(), lay.p.bits());
    let codes = &block[lay.k_codes..lay.k_codes + dk * gb];
    for (qj, oj) in q.chunks_exact(dk).zip(out.chunks_exact_mut(T)).take(nh) {
        let mut acc = [0.0f32; T];
        let mut bias = 0.0f32;
        for (c, g) in codes.chunks_exact(gb).enumerate() {
            if lay.p.is_int() {
                let qs = qj[c] * f16_at(&block[lay.k_scale..], c);
                bias += qj[c] * f16_at(&block[lay.k_min..], c);
                for (a, code) in acc.iter_mut().zip(unpack_group(bits, g)) {
                    *a += qs * code as f32;
                }
            } else {
                for (a, x) in acc.iter_mut().zip(f16_group(g)) {
                    *a += qj[c] * x;
                }
            }
        }
        for (o, a) in oj.iter_mut().zip(acc) {
            *o = a + bias;
        }
    }
}

/// `out[j][c] += Σ_{t ∈ ts} p[j][t] · v[t][c]` for the `nh` heads (`p`: `nh * 16`, `out`:
/// `nh * dv`), reading the values of one head block.
pub(crate) fn value_accum_scalar(
    lay: &BlockLayout,
    block: &[u8],
    p: &[f32],
    nh: usize,
    ts: Range<usize>,
    out: &mut [f32],
) {
    let (dv, gb, bits) = (lay.dv, lay.p.group_bytes(), lay.p.bits());
    for (pj, oj) in p.chunks_exact(T).zip(out.chunks_exact_mut(dv)).take(nh) {
        let mut bias = 0.0f32;
        for t in ts.clone() {
            let w = if lay.p.is_int() {
                bias += pj[t] * f16_at(&block[lay.v_min..], t);
                pj[t] * f16_at(&block[lay.v_scale..], t)
            } else {
                pj[t]
            };
            for (gi, dst) in oj.chunks_mut(T).enumerate() {
                let at = lay.v_codes + (t * lay.vg + gi) * gb;
                let g = &block[at..at + gb];
                let x = if lay.p.is_int() {
                    unpack_group(bits, g).map(|c| c as f32)
                } else {
                    f16_group(g)
                };
                for (o, x) in dst.iter_mut().zip(x) {
                    *o += w * x;
                }
            }
        }
        oj.iter_mut().for_each(|o| *o += bias);
    }
}

/// Whether this CPU runs the AVX2+FMA+F16C kernels (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn simd_available() -> bool {
    false
}

/// Key scores with the SIMD kernel when `SIMD` (only instantiated after the CPU check).
/// `qs` is scratch of at least `min(nh, 4) * dk` floats.
#[inline(always)]
fn key_scores<const SIMD: bool>(
    lay: &BlockLayout,
    block: &[u8],
    q: &[f32],
    nh: usize,
    out: &mut [f32],
    qs: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: `SIMD` is only true on the path taken after `simd_available()` said the CPU
        // has AVX2, FMA and F16C.
        unsafe { super::avx2::key_scores(lay, block, q, nh, out, qs) };
        return;
    }
    let _ = qs;
    key_scores_scalar(lay, block, q, nh, out);
}

#[inline(always)]
fn value_accum<const SIMD: bool>(
    lay: &BlockLayout,
    block: &[u8],
    p: &[f32],
    nh: usize,
    ts: Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: as in `key_scores`.
        unsafe { super::avx2::value_accum(lay, block, p, nh, ts, out) };
        return;
    }
    value_accum_scalar(lay, block, p, nh, ts, out);
}

/// Softmax of each `n`-wide row in place: max-subtracted exp, normalized (the formula of
/// `ContiguousKv`; the SIMD build uses a vector `exp` within a few ulp of `f32::exp`).
#[inline(always)]
fn softmax_rows<const SIMD: bool>(sc: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: as in `key_scores`.
        unsafe { super::avx2::softmax_rows(sc, n) };
        return;
    }
    for row in sc.chunks_exact_mut(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// Sum with eight independent accumulators (vectorizes without reassociation).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

/// Chunks ahead of the one being scored whose head block is prefetched.
const PREFETCH_AHEAD: usize = 2;

/// Heads processed together by the SIMD kernels (their `qs` scratch is this many rows).
pub(crate) const KERNEL_HEADS: usize = 4;

impl ChunkedKv {
    /// The attention loop compiled for AVX2+FMA+F16C, using the SIMD chunk kernels.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend_avx2(
        &self,
        query: &AttnQuery<'_>,
        out: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        self.attend_impl::<true>(query, out, scores);
    }

    /// The portable attention loop with the scalar chunk kernels.
    pub(super) fn attend_scalar(
        &self,
        query: &AttnQuery<'_>,
        out: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        self.attend_impl::<false>(query, out, scores);
    }

    #[inline(always)]
    fn attend_impl<const SIMD: bool>(
        &self,
        query: &AttnQuery<'_>,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let KvShape {
            n_kv_heads,
            head_dim: dk,
            v_head_dim: dv,
            ..
        } = self.shape;
        let (kw, vw) = (n_kv_heads * dk, n_kv_heads * dv);
        let layer = query.layer;
        let visible = query.visible();
        let visible = visible.start..visible.end.min(self.reserved).min(self.slots.len() * T);
        let n_vis = visible.len();
        if n_vis == 0 || query.heads.is_empty() || n_kv_heads == 0 {
            out.fill(0.0);
            return;
        }
        let group = (query.n_heads / n_kv_heads).max(1);
        // Full f16 chunks take the row kernels (scores written in place, values in one pass).
        let fast = SIMD && cfg!(target_arch = "x86_64") && dv.is_multiple_of(T);
        let first_slot = visible.start / T;
        let last_slot = (visible.end - 1) / T;
        let sampled = self.is_sampled(layer);

        // Scratch: scores [head in group][position], per-chunk scores/probabilities
        // [head][16], the key kernel's q∘scale rows, per-position mass summed over heads.
        let nh_max = group.min(query.heads.len());
        let n_scores = nh_max * n_vis;
        let n_tmp = nh_max * T;
        let n_qs = nh_max.min(KERNEL_HEADS) * dk;
        let n_mass = if sampled { n_vis } else { 0 };
        scratch.clear();
        scratch.resize(n_scores + n_tmp + n_qs + n_mass, 0.0);
        let (sc, rest) = scratch.split_at_mut(n_scores);
        let (tmp, rest) = rest.split_at_mut(n_tmp);
        let (qs, masses) = rest.split_at_mut(n_qs);

        // (slot, range of its tokens visible, index of the first in `visible`)
        let spans = (first_slot..=last_slot).map(|s| {
            let base = s * T;
            let t0 = visible.start.max(base) - base;
            let t1 = visible.end.min(base + T) - base;
            (s, t0..t1, base + t0 - visible.start)
        });

        let mut h0 = query.heads.start;
        while h0 < query.heads.end {
            let g = h0 / group;
            let h1 = ((g + 1) * group).min(query.heads.end);
            let nh = h1 - h0;
            let sc = &mut sc[..nh * n_vis];
            let qg = &query.q[h0 * dk..h1 * dk];

            // Sealed chunks are separate allocations, each a fresh stream for the hardware
            // prefetchers: fetch the head block (keys and values) two chunks ahead.
            let mut ahead = spans.clone().skip(PREFETCH_AHEAD);
            for (s, ts, i0) in spans.clone() {
                #[cfg(target_arch = "x86_64")]
                if let Some((sa, _, _)) = ahead.next() {
                    if let (true, ChunkSlot::Sealed(se)) = (SIMD && query.prefetch, &self.slots[sa])
                    {
                        if let Some((_, block)) = self.block(se, layer, g) {
                            super::avx2::prefetch(block);
                        }
                    }
                }
                match &self.slots[s] {
                    ChunkSlot::Staged(st) => {
                        let keys = st.keys(layer);
                        for (i, t) in ts.enumerate() {
                            let k = &keys[t * kw + g * dk..t * kw + (g + 1) * dk];
                            for (j, qj) in qg.chunks_exact(dk).enumerate() {
                                sc[j * n_vis + i0 + i] = dot(qj, k);
                            }
                        }
                    }
                    ChunkSlot::Sealed(se) => match self.block(se, layer, g) {
                        #[cfg(target_arch = "x86_64")]
                        Some((lay, block)) if fast && lay.p == Precision::F16 && ts.len() == T => {
                            // SAFETY: `fast` implies `SIMD`, only true after the CPU check.
                            unsafe {
                                super::avx2::key_scores_f16_rows(lay, block, qg, nh, sc, n_vis, i0)
                            };
                        }
                        Some((lay, block)) => {
                            key_scores::<SIMD>(lay, block, qg, nh, tmp, qs);
                            for j in 0..nh {
                                sc[j * n_vis + i0..j * n_vis + i0 + ts.len()]
                                    .copy_from_slice(&tmp[j * T + ts.start..j * T + ts.end]);
                            }
                        }
                        None => {
                            for j in 0..nh {
                                sc[j * n_vis + i0..j * n_vis + i0 + ts.len()].fill(0.0);
                            }
                        }
                    },
                }
            }

            softmax_rows::<SIMD>(sc, n_vis);

            if sampled {
                for row in sc.chunks_exact(n_vis) {
                    for (m, &p) in masses.iter_mut().zip(row) {
                        *m += p;
                    }
                }
            }

            let first = (h0 - query.heads.start) * dv;
            let o = &mut out[first..first + nh * dv];
            o.fill(0.0);
            // Full f16 chunks in one pass over all of them (see `value_accum_f16_rows`); the
            // rest chunk by chunk below.
            let f16_full = |s: usize, ts: &Range<usize>| -> Option<&[u8]> {
                match &self.slots[s] {
                    ChunkSlot::Sealed(se) if fast && ts.len() == T => {
                        match self.block(se, layer, g) {
                            Some((lay, block)) if lay.p == Precision::F16 => Some(block),
                            _ => None,
                        }
                    }
                    _ => None,
                }
            };
            #[cfg(target_arch = "x86_64")]
            if fast {
                // In batches of up to 64 chunks, looked up once.
                let lay = &self.layouts[Precision::F16 as usize];
                let mut batch: [(&[u8], usize); 64] = [(&[], 0); 64];
                let mut n_batch = 0;
                let mut spans_left = spans.clone().peekable();
                while let Some((s, ts, i0)) = spans_left.next() {
                    if let Some(b) = f16_full(s, &ts) {
                        batch[n_batch] = (b, i0);
                        n_batch += 1;
                    }
                    if n_batch > 0 && (n_batch == batch.len() || spans_left.peek().is_none()) {
                        // SAFETY: `fast` implies `SIMD`, only true after the CPU check.
                        unsafe {
                            super::avx2::value_accum_f16_rows(
                                lay,
                                &batch[..n_batch],
                                sc,
                                n_vis,
                                nh,
                                o,
                            )
                        };
                        n_batch = 0;
                    }
                }
            }
            for (s, ts, i0) in spans.clone() {
                if f16_full(s, &ts).is_some() {
                    continue;
                }
                match &self.slots[s] {
                    ChunkSlot::Staged(st) => {
                        let values = st.values(layer);
                        for (i, t) in ts.enumerate() {
                            let v = &values[t * vw + g * dv..t * vw + (g + 1) * dv];
                            for (j, oh) in o.chunks_exact_mut(dv).enumerate() {
                                let w = sc[j * n_vis + i0 + i];
                                for (o, &v) in oh.iter_mut().zip(v) {
                                    *o += w * v;
                                }
                            }
                        }
                    }
                    ChunkSlot::Sealed(se) => {
                        if let Some((lay, block)) = self.block(se, layer, g) {
                            let p = &mut tmp[..nh * T];
                            p.fill(0.0);
                            for j in 0..nh {
                                p[j * T + ts.start..j * T + ts.end].copy_from_slice(
                                    &sc[j * n_vis + i0..j * n_vis + i0 + ts.len()],
                                );
                            }
                            value_accum::<SIMD>(lay, block, p, nh, ts, o);
                        }
                    }
                }
            }
            h0 = h1;
        }

        if sampled {
            let obs = query.heads.len() as u64;
            for (s, ts, i0) in spans {
                let m = sum(&masses[i0..i0 + ts.len()]);
                self.add_density(s, f64::from(m), obs);
            }
        }
    }
}
