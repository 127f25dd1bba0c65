//! AVX2+FMA tile kernels for K-quant weights (Q4_K / Q5_K / Q6_K) × Q8_K activations.
//!
//! Loop order, for a group of [`R`] weight rows and a chunk of at most [`TOK_CHUNK`] tokens:
//! for each 256-element super-block, the rows' quants are unpacked ONCE into unsigned bytes
//! (eight 32-byte vectors per row, in the activations' element order) together with their
//! per-32-element scale vectors (i16, one vector per 32 elements) and the block's offset
//! weights; then every token of the chunk is dotted against those registers/stack vectors in
//! groups of [`T`] tokens. Per 32 elements and (row, token): one `_mm256_maddubs_epi16`
//! (unsigned weight × signed activation) and one `_mm256_madd_epi16` by the scale, into an i32
//! accumulator held in a register (R × T = 8 of them). At the end of the block each pair's
//! integer sum is converted and FMA'd with `d_w * d_a` into an f32 accumulator on the stack.
//!
//! Offsets: Q4_K/Q5_K's `- dmin * min_j * Σ a` and Q6_K's `- 32 * scale_i * Σ a` both come from
//! the activations' `bsums` (sums of 16 activations): one `_mm256_madd_epi16` of a per-row
//! vector of 16 i16 weights (the mins, each repeated for its two 16-element halves, or the
//! Q6_K scales) with the 16 bsums. Q6_K folds it into the integer sum (exact, as ggml);
//! Q4_K/Q5_K apply it with its own FMA by `dmin * d_a`.
//!
//! Integer sums are exact within a block, so results differ from the scalar references only by
//! float summation order.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::quant::k_quants_avx2::{load128, load256};

use crate::quant::k_quants::{
    f16_at, k4_scales_mins, q8k_d, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BSUMS, Q8_K_BYTES,
    Q8_K_QS, QK_K,
};

/// Weight type selectors for the const-generic kernels.
pub(super) const TY_Q4_K: u8 = 0;
pub(super) const TY_Q5_K: u8 = 1;
pub(super) const TY_Q6_K: u8 = 2;

/// Rows per register tile.
const R: usize = 2;
/// Tokens per register tile.
const T: usize = 4;
/// Tokens whose f32 accumulators live on the stack while a row group walks its blocks.
const TOK_CHUNK: usize = 32;

/// Bytes of one weight block of type `TY`.
const fn block_bytes(ty: u8) -> usize {
    match ty {
        TY_Q4_K => Q4_K_BYTES,
        TY_Q5_K => Q5_K_BYTES,
        _ => Q6_K_BYTES,
    }
}

/// One weight block, unpacked for dotting with any number of tokens.
#[derive(Clone, Copy)]
struct Unpacked {
    /// Quants as unsigned bytes; vector `k` covers elements `32k..32k + 32`.
    q: [__m256i; 8],
    /// i16 scales for each vector of `q` (per 16-bit product lane).
    sc: [__m256i; 8],
    /// i16 weights of the 16 bsums in the offset term.
    bias: __m256i,
    /// Super-block scale.
    d: f32,
    /// Offset scale (Q4_K/Q5_K: `-dmin`; unused for Q6_K).
    dbias: f32,
}

/// Byte-shuffle control broadcasting 16-bit lane `i` of each 128-bit half.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn broadcast_i16_lane(i: usize) -> __m256i {
    let lo = (2 * i) as i16;
    _mm256_set1_epi16(lo | ((lo + 1) << 8))
}

/// Byte-shuffle control for a 128-bit vector: bytes `2i` (×8) then `2i + 1` (×8).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn pair_spread(i: usize) -> __m128i {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let lo = (ONES * (2 * i) as u64) as i64;
    let hi = (ONES * (2 * i + 1) as u64) as i64;
    _mm_set_epi64x(hi, lo)
}

/// Unpacks one Q4_K / Q5_K / Q6_K block (selected by `TY`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn unpack<const TY: u8>(wb: &[u8]) -> Unpacked {
    let m4 = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    let mut u = Unpacked {
        q: [zero; 8],
        sc: [zero; 8],
        bias: zero,
        d: 0.0,
        dbias: 0.0,
    };
    if TY == TY_Q6_K {
        let wb: &[u8; Q6_K_BYTES] = wb[..Q6_K_BYTES].try_into().expect("block bytes");
        let m3 = _mm256_set1_epi8(3);
        u.d = f16_at(wb, 208);
        // SAFETY: offset 192 + 16 <= 210.
        let scales = unsafe { load128(wb, 192) };
        u.bias = _mm256_cvtepi8_epi16(scales);
        for h in 0..2 {
            // SAFETY: offsets 64h + 32 + 32 <= 128 and 128 + 32h + 32 <= 192, inside the block.
            let (b1, b2, bh) = unsafe {
                (
                    load256(wb, 64 * h),
                    load256(wb, 64 * h + 32),
                    load256(wb, 128 + 32 * h),
                )
            };
            let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(bh, m3));
            let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(bh), m3));
            let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(bh), m3));
            let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(bh), m3));
            u.q[4 * h] = _mm256_or_si256(_mm256_and_si256(b1, m4), h0);
            u.q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(b2, m4), h1);
            u.q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4), h2);
            u.q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4), h3);
            for i in 0..4 {
                u.sc[4 * h + i] =
                    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pair_spread(4 * h + i)));
            }
        }
        return u;
    }
    let bytes = block_bytes(TY);
    let wb = &wb[..bytes];
    u.d = f16_at(wb, 0);
    u.dbias = -f16_at(wb, 2);
    let sm = k4_scales_mins(wb[4..16].try_into().expect("12 bytes"));
    // SAFETY: 0 + 16 <= 16.
    let sm128 = unsafe { load128(&sm, 0) };
    let scales = _mm256_cvtepu8_epi16(sm128);
    let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(scales));
    for k in 0..8 {
        u.sc[k] = _mm256_shuffle_epi8(scales, broadcast_i16_lane(k));
    }
    // Each min repeated for the two 16-element halves of its sub-block: 8,8,9,9,...,15,15.
    let dup = _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    u.bias = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm128, dup));
    if TY == TY_Q4_K {
        let wb: &[u8; Q4_K_BYTES] = wb.try_into().expect("block bytes");
        for j in 0..4 {
            // SAFETY: 16 + 32j + 32 <= 144.
            let bits = unsafe { load256(wb, 16 + 32 * j) };
            u.q[2 * j] = _mm256_and_si256(bits, m4);
            u.q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
        }
    } else {
        let wb: &[u8; Q5_K_BYTES] = wb.try_into().expect("block bytes");
        let m1 = _mm256_set1_epi8(1);
        let m2 = _mm256_set1_epi8(2);
        // SAFETY: 16 + 32 <= 176.
        let mut hbits = unsafe { load256(wb, 16) };
        for j in 0..4 {
            // SAFETY: 48 + 32j + 32 <= 176.
            let bits = unsafe { load256(wb, 48 + 32 * j) };
            let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(hbits, m1));
            let h1 = _mm256_slli_epi16::<3>(_mm256_and_si256(hbits, m2));
            hbits = _mm256_srli_epi16::<2>(hbits);
            u.q[2 * j] = _mm256_or_si256(_mm256_and_si256(bits, m4), h0);
            u.q[2 * j + 1] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4), h1);
        }
    }
    u
}

/// Adds block `u` (of `NR` rows) dotted with the Q8_K blocks `ab` of `NT` tokens into
/// `acc[r][t0 + t]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
fn dot_group<const TY: u8, const NR: usize, const NT: usize>(
    u: &[Unpacked; NR],
    ab: &[&[u8; Q8_K_BYTES]; NT],
    acc: &mut [[__m256; TOK_CHUNK]; NR],
    t0: usize,
) {
    let mut sumi = [[_mm256_setzero_si256(); NT]; NR];
    for k in 0..8 {
        let mut av = [_mm256_setzero_si256(); NT];
        for t in 0..NT {
            // SAFETY: Q8_K_QS + 32k + 32 <= 4 + 256 <= 292, inside the block.
            av[t] = unsafe { load256(ab[t], Q8_K_QS + 32 * k) };
        }
        for r in 0..NR {
            let w = u[r].q[k];
            let s = u[r].sc[k];
            for t in 0..NT {
                let p = _mm256_madd_epi16(s, _mm256_maddubs_epi16(w, av[t]));
                sumi[r][t] = _mm256_add_epi32(sumi[r][t], p);
            }
        }
    }
    for t in 0..NT {
        // SAFETY: Q8_K_BSUMS + 32 == 292, the end of the block.
        let bsums = unsafe { load256(ab[t], Q8_K_BSUMS) };
        let da = q8k_d(ab[t]);
        for r in 0..NR {
            let off = _mm256_madd_epi16(u[r].bias, bsums);
            let a = &mut acc[r][t0 + t];
            if TY == TY_Q6_K {
                let s = _mm256_sub_epi32(sumi[r][t], _mm256_slli_epi32::<5>(off));
                *a = _mm256_fmadd_ps(_mm256_set1_ps(u[r].d * da), _mm256_cvtepi32_ps(s), *a);
            } else {
                let s = _mm256_cvtepi32_ps(sumi[r][t]);
                *a = _mm256_fmadd_ps(_mm256_set1_ps(u[r].d * da), s, *a);
                let o = _mm256_cvtepi32_ps(off);
                *a = _mm256_fmadd_ps(_mm256_set1_ps(u[r].dbias * da), o, *a);
            }
        }
    }
}

/// The Q8_K block `b` of token `t` in `a` (rows of `arow` bytes).
#[inline(always)]
fn act_block(a: &[u8], arow: usize, t: usize, b: usize) -> &[u8; Q8_K_BYTES] {
    let off = t * arow + b * Q8_K_BYTES;
    a[off..off + Q8_K_BYTES].try_into().expect("Q8_K block")
}

/// The `NR` rows of `w` (rows of `nb` blocks) against all `n_tok` tokens of `a`, written to
/// `out[t * out_stride + r0 + r]` (entries outside `out` are skipped).
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn row_group<const TY: u8, const NR: usize>(
    nb: usize,
    w: &[u8],
    a: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
    r0: usize,
) {
    let wbytes = block_bytes(TY);
    let wrow = nb * wbytes;
    let arow = nb * Q8_K_BYTES;
    let mut tc0 = 0;
    while tc0 < n_tok {
        let nt = TOK_CHUNK.min(n_tok - tc0);
        let mut acc = [[_mm256_setzero_ps(); TOK_CHUNK]; NR];
        for b in 0..nb {
            let u: [Unpacked; NR] =
                std::array::from_fn(|r| unpack::<TY>(&w[r * wrow + b * wbytes..][..wbytes]));
            let mut t = 0;
            while t + T <= nt {
                let ab = std::array::from_fn(|i| act_block(a, arow, tc0 + t + i, b));
                dot_group::<TY, NR, T>(&u, &ab, &mut acc, t);
                t += T;
            }
            match nt - t {
                3 => {
                    let ab = std::array::from_fn(|i| act_block(a, arow, tc0 + t + i, b));
                    dot_group::<TY, NR, 3>(&u, &ab, &mut acc, t);
                }
                2 => {
                    let ab = std::array::from_fn(|i| act_block(a, arow, tc0 + t + i, b));
                    dot_group::<TY, NR, 2>(&u, &ab, &mut acc, t);
                }
                1 => {
                    let ab = [act_block(a, arow, tc0 + t, b)];
                    dot_group::<TY, NR, 1>(&u, &ab, &mut acc, t);
                }
                _ => {}
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (t, &v) in acc_r[..nt].iter().enumerate() {
                if let Some(o) = out.get_mut((tc0 + t) * out_stride + r0 + r) {
                    *o = crate::quant::avx2::hsum_f32_8(v);
                }
            }
        }
        tc0 += nt;
    }
}

/// Tile product of `n_rows` rows of `nb` blocks of type `TY` in `w` with `n_tok` Q8_K rows of
/// `nb` blocks in `a`: `out[t * out_stride + r] = dot(w_r, a_t)`. The caller guarantees
/// `w.len() >= n_rows * nb * block_bytes(TY)` and `a.len() >= n_tok * nb * 292` (else this
/// panics on a bounds check); entries outside `out` are skipped.
#[target_feature(enable = "avx2,fma")]
pub(super) fn tile<const TY: u8>(
    nb: usize,
    w: &[u8],
    n_rows: usize,
    a: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let wrow = nb * block_bytes(TY);
    let mut r0 = 0;
    while r0 < n_rows {
        let rows = &w[r0 * wrow..];
        if n_rows - r0 >= R {
            row_group::<TY, R>(nb, rows, a, n_tok, out, out_stride, r0);
            r0 += R;
        } else {
            row_group::<TY, 1>(nb, rows, a, n_tok, out, out_stride, r0);
            r0 += 1;
        }
    }
}

/// Decode GEMV (one token): one dot product per row with the existing single-row kernels.
#[target_feature(enable = "avx2,fma")]
pub(super) fn gemv<const TY: u8>(nb: usize, w: &[u8], n_rows: usize, a: &[u8], out: &mut [f32]) {
    let wrow = nb * block_bytes(TY);
    let n = nb * QK_K;
    for (o, wr) in out.iter_mut().zip(w.chunks_exact(wrow)).take(n_rows) {
        // SAFETY: AVX2 and FMA are enabled here (the caller checked them); the kernels read only
        // whole blocks inside `wr` and `a`.
        *o = unsafe {
            match TY {
                TY_Q4_K => crate::quant::k_quants_avx2::vec_dot_q4_k_q8_k(n, wr, a),
                TY_Q5_K => crate::quant::k_quants_avx2::vec_dot_q5_k_q8_k(n, wr, a),
                _ => crate::quant::k_quants_avx2::vec_dot_q6_k_q8_k(n, wr, a),
            }
        };
    }
}
