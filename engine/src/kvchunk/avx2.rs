//! AVX2 + FMA + F16C chunk kernels: the same results as the scalar references in `attend.rs`
//! up to float summation order.
//!
//! A group of 16 codes unpacks to two vectors of 8 f32 (`load_group`): f16 with `vcvtph2ps`;
//! int8 zero-extended bytes; int4 one 64-bit load, a shift by 4 and a mask give the 16 codes in
//! order as bytes; int2 one 32-bit broadcast shifted by 0/2/4/6 per lane and masked. Key scores
//! accumulate 16 token lanes per head over the channels (no horizontal sums); value outputs
//! accumulate 16 channels per head over the tokens. Up to four query heads share each unpacked
//! group; with one or two heads, even and odd channels (tokens) use separate accumulators so
//! the FMA latency chains overlap.
//!
//! Memory safety: every group is a `chunks_exact` piece of the block of exactly its size and
//! the loads read inside it; scratch and output lengths are checked on entry (a mismatch
//! returns without computing, which the callers never cause).

use std::arch::x86_64::*;
use std::ops::Range;

use super::{BlockLayout, Precision, CHUNK_TOKENS};

const T: usize = CHUNK_TOKENS;

/// The 16 elements of a group as two vectors (elements 0..8 and 8..16): f16 values for
/// `B == 16`, integer codes as f32 otherwise.
///
/// # Safety
/// The CPU must support AVX2 and F16C. `g` must hold at least `2 * B` bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_group<const B: u32>(g: &[u8]) -> (__m256, __m256) {
    match B {
        16 => {
            let g: &[u8; 32] = match g.get(..32).and_then(|s| s.try_into().ok()) {
                Some(a) => a,
                None => return (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            // SAFETY: `g` is 32 bytes; the two loads read bytes 0..16 and 16..32.
            let lo = _mm_loadu_si128(g.as_ptr().cast());
            let hi = _mm_loadu_si128(g.as_ptr().add(16).cast());
            (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
        }
        8 => {
            let g: &[u8; 16] = match g.get(..16).and_then(|s| s.try_into().ok()) {
                Some(a) => a,
                None => return (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            // SAFETY: `g` is 16 bytes.
            let v = _mm_loadu_si128(g.as_ptr().cast());
            widen(v)
        }
        4 => {
            let x = match g.get(..8).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                Some(a) => u64::from_le_bytes(a),
                None => return (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            let v = _mm_cvtsi64_si128(x as i64);
            let v = _mm_unpacklo_epi64(v, _mm_srli_epi64::<4>(v));
            widen(_mm_and_si128(v, _mm_set1_epi8(0x0F)))
        }
        _ => {
            let x = match g.get(..4).and_then(|s| <[u8; 4]>::try_from(s).ok()) {
                Some(a) => u32::from_le_bytes(a),
                None => return (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            let v = _mm_set1_epi32(x as i32);
            let v = _mm_srlv_epi32(v, _mm_setr_epi32(0, 2, 4, 6));
            widen(_mm_and_si128(v, _mm_set1_epi8(0x03)))
        }
    }
}

/// 16 unsigned bytes to two vectors of 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen(v: __m128i) -> (__m256, __m256) {
    let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v)));
    (lo, hi)
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(x: __m256) -> f32 {
    let mut r = _mm256_extractf128_ps::<1>(x);
    r = _mm_add_ps(r, _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// 8 f16 at `b[16 * i..16 * i + 16]` (the `i`-th 8-lane piece) as f32.
///
/// # Safety
/// The CPU must support F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8(b: &[u8; 16]) -> __m256 {
    // SAFETY: `b` is 16 bytes.
    _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().cast()))
}

/// SIMD [`key_scores_scalar`](super::attend::key_scores_scalar). `qs` is scratch of at least
/// `min(nh, 4) * dk` floats.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn key_scores(
    lay: &BlockLayout,
    block: &[u8],
    q: &[f32],
    nh: usize,
    out: &mut [f32],
    qs: &mut [f32],
) {
    match lay.p {
        Precision::F16 => key_scores_fmt::<16>(lay, block, q, nh, out, qs),
        Precision::Int8 => key_scores_fmt::<8>(lay, block, q, nh, out, qs),
        Precision::Int4 => key_scores_fmt::<4>(lay, block, q, nh, out, qs),
        Precision::Int2 => key_scores_fmt::<2>(lay, block, q, nh, out, qs),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn key_scores_fmt<const B: u32>(
    lay: &BlockLayout,
    block: &[u8],
    q: &[f32],
    nh: usize,
    out: &mut [f32],
    qs: &mut [f32],
) {
    let dk = lay.dk;
    let gb = 2 * B as usize;
    let Some(codes) = block.get(lay.k_codes..lay.k_codes + dk * gb) else {
        return;
    };
    if q.len() < nh * dk
        || out.len() < nh * T
        || qs.len() < nh.min(4) * dk
        || block.len() < lay.k_codes
    {
        debug_assert!(false, "key_scores: short buffers");
        return;
    }
    let mut j0 = 0;
    while j0 < nh {
        let nb = (nh - j0).min(4);
        let qb = &q[j0 * dk..(j0 + nb) * dk];
        let qsb = &mut qs[..nb * dk];
        let mut bias = [0.0f32; 4];
        if B == 16 {
            qsb.copy_from_slice(qb);
        } else {
            let scales = &block[lay.k_scale..lay.k_scale + 2 * dk];
            let mins = &block[lay.k_min..lay.k_min + 2 * dk];
            for (jj, (qj, qsj)) in qb
                .chunks_exact(dk)
                .zip(qsb.chunks_exact_mut(dk))
                .enumerate()
            {
                bias[jj] = prep_keys(qj, scales, mins, qsj);
            }
        }
        let ob = &mut out[j0 * T..(j0 + nb) * T];
        match nb {
            1 => key_loop::<B, 1, 2>(codes, qsb, dk, &bias, ob),
            2 => key_loop::<B, 2, 2>(codes, qsb, dk, &bias, ob),
            3 => key_loop::<B, 3, 1>(codes, qsb, dk, &bias, ob),
            _ => key_loop::<B, 4, 1>(codes, qsb, dk, &bias, ob),
        }
        j0 += nb;
    }
}

/// `qs = q ∘ scale`, returns `Σ q·min`. `scales`/`mins` are `2 * dk` bytes of f16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prep_keys(q: &[f32], scales: &[u8], mins: &[u8], qs: &mut [f32]) -> f32 {
    let mut bias = _mm256_setzero_ps();
    let n8 = q.len() / 8 * 8;
    let it = q[..n8]
        .chunks_exact(8)
        .zip(qs[..n8].chunks_exact_mut(8))
        .zip(scales.chunks_exact(16).zip(mins.chunks_exact(16)));
    for ((qv, qsv), (s, m)) in it {
        let (Ok(qv), Ok(qsv), Ok(s), Ok(m)) = (
            <&[f32; 8]>::try_from(qv),
            <&mut [f32; 8]>::try_from(qsv),
            <&[u8; 16]>::try_from(s),
            <&[u8; 16]>::try_from(m),
        ) else {
            continue;
        };
        // SAFETY: `qv` and `qsv` hold 8 floats.
        let x = _mm256_loadu_ps(qv.as_ptr());
        _mm256_storeu_ps(qsv.as_mut_ptr(), _mm256_mul_ps(x, f16x8(s)));
        bias = _mm256_fmadd_ps(x, f16x8(m), bias);
    }
    let mut b = hsum(bias);
    for c in n8..q.len() {
        qs[c] = q[c] * super::format::f16_at(scales, c);
        b += q[c] * super::format::f16_at(mins, c);
    }
    b
}

/// Scores of `NH` heads: `acc[j][t] = Σ_c qs[j][c] · x[c][t] + bias[j]`, with `S` accumulator
/// sets (channels alternate between them).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn key_loop<const B: u32, const NH: usize, const S: usize>(
    codes: &[u8],
    qs: &[f32],
    dk: usize,
    bias: &[f32; 4],
    out: &mut [f32],
) {
    let gb = 2 * B as usize;
    if qs.len() < NH * dk || codes.len() < dk * gb || out.len() < NH * T {
        return;
    }
    let qp = qs.as_ptr();
    let mut acc = [[[_mm256_setzero_ps(); 2]; NH]; S];
    let mut groups = codes[..dk * gb].chunks_exact(gb * S);
    let mut c = 0;
    for gs in &mut groups {
        for (s, accs) in acc.iter_mut().enumerate() {
            let (k0, k1) = load_group::<B>(&gs[s * gb..]);
            for (j, a) in accs.iter_mut().enumerate() {
                // SAFETY: j < NH and c + s < dk, so the index is below qs.len() (checked).
                let w = _mm256_broadcast_ss(&*qp.add(j * dk + c + s));
                a[0] = _mm256_fmadd_ps(w, k0, a[0]);
                a[1] = _mm256_fmadd_ps(w, k1, a[1]);
            }
        }
        c += S;
    }
    for g in groups.remainder().chunks_exact(gb) {
        let (k0, k1) = load_group::<B>(g);
        for (j, a) in acc[0].iter_mut().enumerate() {
            // SAFETY: as above, with c < dk.
            let w = _mm256_broadcast_ss(&*qp.add(j * dk + c));
            a[0] = _mm256_fmadd_ps(w, k0, a[0]);
            a[1] = _mm256_fmadd_ps(w, k1, a[1]);
        }
        c += 1;
    }
    for (j, o) in out.chunks_exact_mut(T).take(NH).enumerate() {
        let mut a0 = acc[0][j][0];
        let mut a1 = acc[0][j][1];
        for accs in &acc[1..] {
            a0 = _mm256_add_ps(a0, accs[j][0]);
            a1 = _mm256_add_ps(a1, accs[j][1]);
        }
        let b = _mm256_set1_ps(bias[j]);
        // SAFETY: `o` holds 16 floats.
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(a0, b));
        _mm256_storeu_ps(o.as_mut_ptr().add(8), _mm256_add_ps(a1, b));
    }
}

/// SIMD [`value_accum_scalar`](super::attend::value_accum_scalar).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn value_accum(
    lay: &BlockLayout,
    block: &[u8],
    p: &[f32],
    nh: usize,
    ts: Range<usize>,
    out: &mut [f32],
) {
    match lay.p {
        Precision::F16 => value_accum_fmt::<16>(lay, block, p, nh, ts, out),
        Precision::Int8 => value_accum_fmt::<8>(lay, block, p, nh, ts, out),
        Precision::Int4 => value_accum_fmt::<4>(lay, block, p, nh, ts, out),
        Precision::Int2 => value_accum_fmt::<2>(lay, block, p, nh, ts, out),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn value_accum_fmt<const B: u32>(
    lay: &BlockLayout,
    block: &[u8],
    p: &[f32],
    nh: usize,
    ts: Range<usize>,
    out: &mut [f32],
) {
    let dv = lay.dv;
    let gb = 2 * B as usize;
    let Some(codes) = block.get(lay.v_codes..lay.v_codes + T * lay.vg * gb) else {
        return;
    };
    if p.len() < nh * T || out.len() < nh * dv || ts.end > T || ts.is_empty() {
        debug_assert!(ts.is_empty(), "value_accum: short buffers");
        return;
    }
    let mut j0 = 0;
    while j0 < nh {
        let nb = (nh - j0).min(4);
        // Per head: weights p·scale per token, and the bias Σ p·min.
        let mut w = [[0.0f32; T]; 4];
        let mut bias = [0.0f32; 4];
        for jj in 0..nb {
            let pj = &p[(j0 + jj) * T..(j0 + jj + 1) * T];
            for t in ts.clone() {
                if B == 16 {
                    w[jj][t] = pj[t];
                } else {
                    w[jj][t] = pj[t] * super::format::f16_at(&block[lay.v_scale..], t);
                    bias[jj] += pj[t] * super::format::f16_at(&block[lay.v_min..], t);
                }
            }
        }
        let ob = &mut out[j0 * dv..(j0 + nb) * dv];
        match nb {
            1 => value_loop::<B, 1, 2>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
            2 => value_loop::<B, 2, 2>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
            3 => value_loop::<B, 3, 1>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
            _ => value_loop::<B, 4, 1>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
        }
        j0 += nb;
    }
}

/// `out[j][c] += Σ_t w[j][t] · x[t][c] + bias[j]` for `NH` heads, 16 channels at a time, with
/// `S` accumulator sets (tokens alternate between them).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn value_loop<const B: u32, const NH: usize, const S: usize>(
    codes: &[u8],
    vg: usize,
    dv: usize,
    w: &[[f32; T]; 4],
    bias: &[f32; 4],
    ts: Range<usize>,
    out: &mut [f32],
) {
    let gb = 2 * B as usize;
    if codes.len() < T * vg * gb || out.len() < NH * dv || ts.end > T {
        return;
    }
    for g in 0..vg {
        let width = (dv - g * T).min(T);
        // Accumulators start from the current outputs (a partial last group via a copy).
        let mut acc = [[[_mm256_setzero_ps(); 2]; NH]; S];
        let mut part = [[0.0f32; T]; NH];
        for (j, a) in acc[0].iter_mut().enumerate() {
            let o = &out[j * dv + g * T..j * dv + g * T + width];
            if let Ok(o) = <&[f32; T]>::try_from(o) {
                // SAFETY: `o` holds 16 floats.
                a[0] = _mm256_loadu_ps(o.as_ptr());
                a[1] = _mm256_loadu_ps(o.as_ptr().add(8));
            } else {
                part[j][..width].copy_from_slice(o);
                a[0] = _mm256_loadu_ps(part[j].as_ptr());
                a[1] = _mm256_loadu_ps(part[j].as_ptr().add(8));
            }
        }
        let mut t = ts.start;
        while t + S <= ts.end {
            for (s, accs) in acc.iter_mut().enumerate() {
                let at = ((t + s) * vg + g) * gb;
                let (x0, x1) = load_group::<B>(&codes[at..at + gb]);
                for (j, a) in accs.iter_mut().enumerate() {
                    let wj = _mm256_set1_ps(w[j][t + s]);
                    a[0] = _mm256_fmadd_ps(wj, x0, a[0]);
                    a[1] = _mm256_fmadd_ps(wj, x1, a[1]);
                }
            }
            t += S;
        }
        while t < ts.end {
            let at = (t * vg + g) * gb;
            let (x0, x1) = load_group::<B>(&codes[at..at + gb]);
            for (j, a) in acc[0].iter_mut().enumerate() {
                let wj = _mm256_set1_ps(w[j][t]);
                a[0] = _mm256_fmadd_ps(wj, x0, a[0]);
                a[1] = _mm256_fmadd_ps(wj, x1, a[1]);
            }
            t += 1;
        }
        for j in 0..NH {
            let b = _mm256_set1_ps(bias[j]);
            let mut a0 = _mm256_add_ps(acc[0][j][0], b);
            let mut a1 = _mm256_add_ps(acc[0][j][1], b);
            for accs in &acc[1..] {
                a0 = _mm256_add_ps(a0, accs[j][0]);
                a1 = _mm256_add_ps(a1, accs[j][1]);
            }
            let o = &mut out[j * dv + g * T..j * dv + g * T + width];
            if let Ok(o) = <&mut [f32; T]>::try_from(&mut *o) {
                // SAFETY: `o` holds 16 floats.
                _mm256_storeu_ps(o.as_mut_ptr(), a0);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a1);
            } else {
                _mm256_storeu_ps(part[j].as_mut_ptr(), a0);
                _mm256_storeu_ps(part[j].as_mut_ptr().add(8), a1);
                o.copy_from_slice(&part[j][..width]);
            }
        }
    }
}
