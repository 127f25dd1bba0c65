//! AVX2 + FMA + F16C chunk kernels: the same results as the scalar references in `attend.rs`
//! up to float summation order.
//!
//! A group of 16 codes unpacks to two vectors of 8 f32 (`load_group`): f16 with `vcvtph2ps`;
//! int8 zero-extended bytes; int4 its 8 bytes zero-extended to 32-bit lanes, then masked (codes
//! 0..8) and shifted by 4 (codes 8..16); int2 one 32-bit broadcast shifted by 0/2/4/6 per lane
//! and masked. Key scores accumulate 16 token lanes per head over the channels (no horizontal
//! sums); value outputs accumulate 16 channels per head over the tokens. Up to four query heads
//! share each unpacked group; with up to three heads, even and odd channels (tokens) use
//! separate accumulators so the FMA latency chains overlap. The softmax uses an 8-lane `exp`.
//!
//! Memory safety: the kernels check the block, scratch and output lengths on entry (a mismatch
//! returns without computing, which the callers never cause) and then load groups through
//! pointers whose offsets those checks bound.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{BlockLayout, Precision, CHUNK_TOKENS};

const T: usize = CHUNK_TOKENS;

/// The 16 elements of the group at `g` as two vectors (elements 0..8 and 8..16): f16 values
/// for `B == 16`, integer codes as f32 otherwise.
///
/// # Safety
/// The CPU must support AVX2 and F16C; `g..g + 2 * B` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_group<const B: u32>(g: *const u8) -> (__m256, __m256) {
    match B {
        16 => {
            // SAFETY: 32 readable bytes (caller).
            let lo = _mm_loadu_si128(g.cast());
            let hi = _mm_loadu_si128(g.add(16).cast());
            (_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi))
        }
        // SAFETY (all three): 16, 8 or 4 readable bytes (caller).
        8 => {
            let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(g.cast()));
            let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(g.add(8).cast()));
            (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi))
        }
        4 => {
            // Lane i holds byte i: code i in bits 0..4, code i + 8 in bits 4..8.
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(g.cast()));
            let lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
            let hi = _mm256_srli_epi32::<4>(v);
            (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi))
        }
        _ => {
            let x = g.cast::<u32>().read_unaligned();
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

use crate::quant::avx2::exp8;
use crate::quant::avx2::hsum_f32_8 as hsum;

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
            3 => key_loop::<B, 3, 2>(codes, qsb, dk, &bias, ob),
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
    let cp = codes.as_ptr();
    let mut acc = [[[_mm256_setzero_ps(); 2]; NH]; S];
    let mut c = 0;
    while c + S <= dk {
        for (s, accs) in acc.iter_mut().enumerate() {
            // SAFETY: c + s < dk and codes holds dk groups of gb bytes (checked above).
            let (k0, k1) = load_group::<B>(cp.add((c + s) * gb));
            for (j, a) in accs.iter_mut().enumerate() {
                // SAFETY: j < NH and c + s < dk, so the index is below qs.len() (checked).
                let w = _mm256_broadcast_ss(&*qp.add(j * dk + c + s));
                a[0] = _mm256_fmadd_ps(w, k0, a[0]);
                a[1] = _mm256_fmadd_ps(w, k1, a[1]);
            }
        }
        c += S;
    }
    while c < dk {
        // SAFETY: as above.
        let (k0, k1) = load_group::<B>(cp.add(c * gb));
        for (j, a) in acc[0].iter_mut().enumerate() {
            // SAFETY: as above.
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
        // Per head: weights p·scale per token, and the bias Σ p·min (p is 0 outside `ts`).
        let mut w = [[0.0f32; T]; 4];
        let mut bias = [0.0f32; 4];
        for (jj, wj) in w.iter_mut().enumerate().take(nb) {
            let mut masked = [0.0f32; T];
            masked[ts.clone()]
                .copy_from_slice(&p[(j0 + jj) * T + ts.start..(j0 + jj) * T + ts.end]);
            let pj = &masked;
            if B == 16 {
                *wj = *pj;
            } else {
                let (Ok(sc), Ok(mn)) = (
                    <&[u8; 32]>::try_from(&block[lay.v_scale..lay.v_scale + 32]),
                    <&[u8; 32]>::try_from(&block[lay.v_min..lay.v_min + 32]),
                ) else {
                    return;
                };
                // SAFETY: `pj` and `wj` hold 16 floats, `sc` and `mn` 32 bytes.
                let p0 = _mm256_loadu_ps(pj.as_ptr());
                let p1 = _mm256_loadu_ps(pj.as_ptr().add(8));
                let s0 = _mm256_cvtph_ps(_mm_loadu_si128(sc.as_ptr().cast()));
                let s1 = _mm256_cvtph_ps(_mm_loadu_si128(sc.as_ptr().add(16).cast()));
                let m0 = _mm256_cvtph_ps(_mm_loadu_si128(mn.as_ptr().cast()));
                let m1 = _mm256_cvtph_ps(_mm_loadu_si128(mn.as_ptr().add(16).cast()));
                _mm256_storeu_ps(wj.as_mut_ptr(), _mm256_mul_ps(p0, s0));
                _mm256_storeu_ps(wj.as_mut_ptr().add(8), _mm256_mul_ps(p1, s1));
                bias[jj] = hsum(_mm256_fmadd_ps(p1, m1, _mm256_mul_ps(p0, m0)));
            }
        }
        let ob = &mut out[j0 * dv..(j0 + nb) * dv];
        match nb {
            1 => value_loop::<B, 1, 2>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
            2 => value_loop::<B, 2, 2>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
            3 => value_loop::<B, 3, 2>(codes, lay.vg, dv, &w, &bias, ts.clone(), ob),
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
    let cp = codes.as_ptr();
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
                // SAFETY: t + s < 16 and g < vg: inside the T * vg groups (checked above).
                let (x0, x1) = load_group::<B>(cp.add(((t + s) * vg + g) * gb));
                for (j, a) in accs.iter_mut().enumerate() {
                    let wj = _mm256_set1_ps(w[j][t + s]);
                    a[0] = _mm256_fmadd_ps(wj, x0, a[0]);
                    a[1] = _mm256_fmadd_ps(wj, x1, a[1]);
                }
            }
            t += S;
        }
        while t < ts.end {
            // SAFETY: as above.
            let (x0, x1) = load_group::<B>(cp.add((t * vg + g) * gb));
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

/// Asks for every cache line of `bytes` to be brought into the caches (a hint: no effect on
/// results).
#[inline]
pub(super) fn prefetch(bytes: &[u8]) {
    for line in bytes.chunks(64) {
        // SAFETY: prefetching is a hint and cannot fault; the address lies inside `bytes`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast::<i8>()) };
    }
}

/// [`prefetch`] into the second-level cache only (`prefetcht1`): data needed a little later,
/// which should not evict what the current loop works on from L1.
#[inline]
pub(super) fn prefetch_l2(bytes: &[u8]) {
    for line in bytes.chunks(64) {
        // SAFETY: prefetching is a hint and cannot fault; the address lies inside `bytes`.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast::<i8>()) };
    }
}

/// [`prefetch_l2`] of f32 data.
#[inline]
pub(super) fn prefetch_l2_f32(x: &[f32]) {
    for line in x.chunks(16) {
        // SAFETY: as in `prefetch_l2`.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast::<i8>()) };
    }
}

/// Key scores of one full f16 chunk (all 16 tokens visible) for `nh` heads, written straight
/// into the score rows: `sc[j·stride + at + t]` for head `j`, token `t`. Same sums as
/// [`key_scores`] in the same order (f16 keys have no bias term).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn key_scores_f16_rows(
    lay: &BlockLayout,
    block: &[u8],
    q: &[f32],
    nh: usize,
    sc: &mut [f32],
    stride: usize,
    at: usize,
) {
    let dk = lay.dk;
    let Some(codes) = block.get(lay.k_codes..lay.k_codes + dk * 2 * T) else {
        return;
    };
    if lay.p != Precision::F16
        || nh == 0
        || q.len() < nh * dk
        || stride < at + T
        || sc.len() < (nh - 1) * stride + at + T
    {
        debug_assert!(false, "key_scores_f16_rows: bad arguments");
        return;
    }
    let mut j0 = 0;
    while j0 < nh {
        let nb = (nh - j0).min(4);
        let qb = &q[j0 * dk..(j0 + nb) * dk];
        let out = &mut sc[j0 * stride..];
        match nb {
            1 => key_rows_f16::<1>(codes, qb, dk, out, stride, at),
            2 => key_rows_f16::<2>(codes, qb, dk, out, stride, at),
            3 => key_rows_f16::<3>(codes, qb, dk, out, stride, at),
            _ => key_rows_f16::<4>(codes, qb, dk, out, stride, at),
        }
        j0 += nb;
    }
}

/// [`key_scores_f16_rows`] for `NH` heads; the caller checked the lengths (`codes`: `dk`
/// groups, `q`: `NH·dk`, `out`: `(NH − 1)·stride + at + 16`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn key_rows_f16<const NH: usize>(
    codes: &[u8],
    q: &[f32],
    dk: usize,
    out: &mut [f32],
    stride: usize,
    at: usize,
) {
    let (cp, qp) = (codes.as_ptr(), q.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; NH];
    for c in 0..dk {
        // SAFETY: c < dk and `codes` holds dk groups of 32 bytes (caller).
        let (k0, k1) = load_group::<16>(cp.add(c * 2 * T));
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: j·dk + c < NH·dk <= q.len() (caller).
            let w = _mm256_broadcast_ss(&*qp.add(j * dk + c));
            a[0] = _mm256_fmadd_ps(w, k0, a[0]);
            a[1] = _mm256_fmadd_ps(w, k1, a[1]);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let o = &mut out[j * stride + at..j * stride + at + T];
        // SAFETY: `o` holds 16 floats.
        _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
    }
}

/// `out[j][c] += Σ_chunks Σ_t p[j·stride + at + t] · v[t][c]` for `nh` heads over full f16
/// chunks, each given as its head block and `at` (the index of its first token in the
/// probability rows `p`). Channels go 16 at a time through all the chunks, so the
/// accumulators stay in registers. `dv` must be a multiple of 16.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn value_accum_f16_rows(
    lay: &BlockLayout,
    chunks: &[(&[u8], usize)],
    p: &[f32],
    stride: usize,
    nh: usize,
    out: &mut [f32],
) {
    let dv = lay.dv;
    if lay.p != Precision::F16
        || !dv.is_multiple_of(T)
        || nh == 0
        || out.len() < nh * dv
        || p.len() < (nh - 1) * stride + T
    {
        debug_assert!(false, "value_accum_f16_rows: bad arguments");
        return;
    }
    let mut j0 = 0;
    while j0 < nh {
        let nb = (nh - j0).min(4);
        let (pb, ob) = (&p[j0 * stride..], &mut out[j0 * dv..(j0 + nb) * dv]);
        match nb {
            1 => value_rows_f16::<1>(lay, chunks, pb, stride, ob),
            2 => value_rows_f16::<2>(lay, chunks, pb, stride, ob),
            3 => value_rows_f16::<3>(lay, chunks, pb, stride, ob),
            _ => value_rows_f16::<4>(lay, chunks, pb, stride, ob),
        }
        j0 += nb;
    }
}

/// [`value_accum_f16_rows`] for `NH` heads (`out`: `NH·dv`, `p`: rows `stride` apart).
/// Chunks whose block or probabilities are too short are skipped.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn value_rows_f16<const NH: usize>(
    lay: &BlockLayout,
    chunks: &[(&[u8], usize)],
    p: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let (dv, vg) = (lay.dv, lay.vg);
    let tok_bytes = vg * 2 * T;
    let v_end = lay.v_codes + T * tok_bytes;
    let p_len = (NH - 1) * stride;
    for g in 0..vg {
        let mut acc = [[_mm256_setzero_ps(); 2]; NH];
        for &(block, at) in chunks {
            if block.len() < v_end || p.len() < p_len + at + T {
                continue;
            }
            let cp = block.as_ptr().add(lay.v_codes + g * 2 * T);
            let pp = p.as_ptr().add(at);
            for t in 0..T {
                // SAFETY: token t's group g lies inside the value codes (checked above).
                let (x0, x1) = load_group::<16>(cp.add(t * tok_bytes));
                for (j, a) in acc.iter_mut().enumerate() {
                    // SAFETY: j·stride + at + t < p.len() (checked above).
                    let w = _mm256_broadcast_ss(&*pp.add(j * stride + t));
                    a[0] = _mm256_fmadd_ps(w, x0, a[0]);
                    a[1] = _mm256_fmadd_ps(w, x1, a[1]);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let o = &mut out[j * dv + g * T..j * dv + (g + 1) * T];
            // SAFETY: `o` holds 16 floats.
            let o0 = _mm256_loadu_ps(o.as_ptr());
            let o1 = _mm256_loadu_ps(o.as_ptr().add(8));
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_add_ps(o0, a[0]));
            _mm256_storeu_ps(o.as_mut_ptr().add(8), _mm256_add_ps(o1, a[1]));
        }
    }
}

/// [`exp8`] of one value (tests).
#[cfg(test)]
pub(super) fn exp_one(x: f32) -> f32 {
    // SAFETY: only called by tests after checking the CPU features.
    unsafe { _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))) }
}

/// Softmax of each `n`-wide row of `sc` in place: `exp(s − max) / Σ exp(s − max)`, as the
/// scalar loop computes it, with [`exp8`] and 8-lane sums.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn softmax_rows(sc: &mut [f32], n: usize) {
    if n == 0 {
        return;
    }
    for row in sc.chunks_exact_mut(n) {
        let n8 = n / 8 * 8;
        let (body, tail) = row.split_at_mut(n8);
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(8) {
            // SAFETY: `c` holds 8 floats.
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(c.as_ptr()));
        }
        let mut buf = [0.0f32; 8];
        // SAFETY: `buf` holds 8 floats.
        _mm256_storeu_ps(buf.as_mut_ptr(), vmax);
        let max = buf
            .iter()
            .chain(tail.iter())
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let m = _mm256_set1_ps(max);
        let mut vsum = _mm256_setzero_ps();
        for c in body.chunks_exact_mut(8) {
            // SAFETY: `c` holds 8 floats.
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            vsum = _mm256_add_ps(vsum, e);
        }
        let mut sum = hsum(vsum);
        if !tail.is_empty() {
            let mut t = [f32::NEG_INFINITY; 8];
            t[..tail.len()].copy_from_slice(tail);
            // SAFETY: `t` holds 8 floats.
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), m));
            _mm256_storeu_ps(t.as_mut_ptr(), e);
            tail.copy_from_slice(&t[..tail.len()]);
            sum += tail.iter().sum::<f32>();
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        for c in body.chunks_exact_mut(8) {
            // SAFETY: `c` holds 8 floats.
            _mm256_storeu_ps(
                c.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv),
            );
        }
        let inv = 1.0 / sum;
        tail.iter_mut().for_each(|s| *s *= inv);
    }
}
