//! AVX2+FMA K-quant dot products (Q4_K / Q5_K / Q6_K weights × Q8_K activations).
//!
//! Modelled on ggml-cpu's x86 `ggml_vec_dot_q{4,5,6}_K_q8_K`: weights are unpacked to unsigned
//! bytes, multiplied with the signed activations by `_mm256_maddubs_epi16`, weighted by the
//! sub-block scales with `_mm256_madd_epi16`, and the per-block offset terms (Q4_K/Q5_K mins,
//! Q6_K's -32) come from the activations' `bsums` instead of per-element work. Integer sums are
//! exact within a block; only the f32 accumulation across blocks differs from the scalar
//! references in [`super::k_quants`], which the tests compare against.
//!
//! Callers (the dispatchers in `k_quants`) must have detected AVX2 and FMA at run time.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::k_quants::{
    blocks, f16_at, k4_scales_mins, q8k_d, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BSUMS,
    Q8_K_BYTES, Q8_K_QS, QK_K,
};

/// Loads the 32 bytes at `off` of block `b` (bounds-checked; the check folds away for the
/// constant offsets the kernels use).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn load256<const N: usize>(b: &[u8; N], off: usize) -> __m256i {
    assert!(off + 32 <= N);
    // SAFETY: `off + 32 <= N` was just checked, so the 32 bytes lie inside `b`; `loadu` has no
    // alignment requirement; AVX is enabled for this function.
    unsafe { _mm256_loadu_si256(b.as_ptr().add(off).cast()) }
}

/// Loads the 16 bytes at `off` of block `b` (bounds-checked as [`load256`]).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn load128<const N: usize>(b: &[u8; N], off: usize) -> __m128i {
    assert!(off + 16 <= N);
    // SAFETY: `off + 16 <= N` was just checked, so the 16 bytes lie inside `b`; `loadu` has no
    // alignment requirement; SSE2 is part of x86_64.
    unsafe { _mm_loadu_si128(b.as_ptr().add(off).cast()) }
}

/// Sum of the 4 lanes of `r`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_ps_128(r: __m128) -> f32 {
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Byte-shuffle control broadcasting 16-bit lane `i` of each 128-bit half.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn broadcast_i16_lane(i: usize) -> __m256i {
    let lo = (2 * i) as i16;
    _mm256_set1_epi16(lo | ((lo + 1) << 8))
}

/// Byte-shuffle control for a 128-bit vector: bytes `2i` (×8) then `2i + 1` (×8).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pair_spread(i: usize) -> __m128i {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let lo = (ONES * (2 * i) as u64) as i64;
    let hi = (ONES * (2 * i + 1) as u64) as i64;
    _mm_set_epi64x(hi, lo)
}

/// The Q4_K/Q5_K mins term of one block, `Σ_j min_j · Σ_{sub-block j} q8`, as 4 i32 lanes.
/// `mins_and_scales` holds the 8 scales (low half) and 8 mins (high half) as i16.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn k4_mins_term(mins_and_scales: __m256i, ab: &[u8; Q8_K_BYTES]) -> __m128i {
    let q8sums = load256(ab, Q8_K_BSUMS);
    // Adjacent bsums pairs: the sums of the eight 32-element sub-blocks.
    let q8s = _mm_hadd_epi16(
        _mm256_castsi256_si128(q8sums),
        _mm256_extracti128_si256::<1>(q8sums),
    );
    _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_and_scales), q8s)
}

/// AVX2 dot of a Q4_K weight row with a Q8_K activation row (`n / 256` whole blocks; shorter
/// inputs truncate).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn vec_dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for (wb, ab) in blocks::<Q4_K_BYTES>(w)
        .zip(blocks::<Q8_K_BYTES>(a))
        .take(n / QK_K)
    {
        let ad = q8k_d(ab);
        let d = ad * f16_at(wb, 0);
        let dmin = -ad * f16_at(wb, 2);
        let sm = k4_scales_mins(wb[4..16].try_into().expect("12 bytes"));
        let mins_and_scales = _mm256_cvtepu8_epi16(load128(&sm, 0));
        let prod = k4_mins_term(mins_and_scales, ab);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

        let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(mins_and_scales));
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / 64 {
            let scale_l = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * j));
            let scale_h = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * j + 1));
            let q4bits = load256(wb, 16 + 32 * j);
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4);
            let q8l = load256(ab, Q8_K_QS + 64 * j);
            let q8h = load256(ab, Q8_K_QS + 64 * j + 32);
            let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
            let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    super::avx2::hsum_f32_8(acc) + hsum_ps_128(acc_m)
}

/// AVX2 dot of a Q5_K weight row with a Q8_K activation row (`n / 256` whole blocks; shorter
/// inputs truncate).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn vec_dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let m1 = _mm256_set1_epi8(1);
    let m2 = _mm256_set1_epi8(2);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for (wb, ab) in blocks::<Q5_K_BYTES>(w)
        .zip(blocks::<Q8_K_BYTES>(a))
        .take(n / QK_K)
    {
        let ad = q8k_d(ab);
        let d = ad * f16_at(wb, 0);
        let dmin = -ad * f16_at(wb, 2);
        let sm = k4_scales_mins(wb[4..16].try_into().expect("12 bytes"));
        let mins_and_scales = _mm256_cvtepu8_epi16(load128(&sm, 0));
        let prod = k4_mins_term(mins_and_scales, ab);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

        let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(mins_and_scales));
        // Fifth bits: sub-block pair j uses bits 2j and 2j+1 of each qh byte. Shifting the
        // 16-bit lanes right by 2 per pair keeps bits 0 and 1 of every byte from its own byte
        // (at most 6 bits shifted in total).
        let mut hbits = load256(wb, 16);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / 64 {
            let scale_0 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * j));
            let scale_1 = _mm256_shuffle_epi8(scales, broadcast_i16_lane(2 * j + 1));
            let q5bits = load256(wb, 48 + 32 * j);
            let q5h_0 = _mm256_slli_epi16::<4>(_mm256_and_si256(hbits, m1));
            let q5h_1 = _mm256_slli_epi16::<3>(_mm256_and_si256(hbits, m2));
            hbits = _mm256_srli_epi16::<2>(hbits);
            let q5_0 = _mm256_or_si256(_mm256_and_si256(q5bits, m4), q5h_0);
            let q5_1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q5bits), m4), q5h_1);
            let q8_0 = load256(ab, Q8_K_QS + 64 * j);
            let q8_1 = load256(ab, Q8_K_QS + 64 * j + 32);
            let p16_0 = _mm256_madd_epi16(scale_0, _mm256_maddubs_epi16(q5_0, q8_0));
            let p16_1 = _mm256_madd_epi16(scale_1, _mm256_maddubs_epi16(q5_1, q8_1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_0, p16_1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    super::avx2::hsum_f32_8(acc) + hsum_ps_128(acc_m)
}

/// AVX2 dot of a Q6_K weight row with a Q8_K activation row (`n / 256` whole blocks; shorter
/// inputs truncate).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn vec_dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for (wb, ab) in blocks::<Q6_K_BYTES>(w)
        .zip(blocks::<Q8_K_BYTES>(a))
        .take(n / QK_K)
    {
        let d = q8k_d(ab) * f16_at(wb, 208);
        let scales = load128(wb, 192);
        // The -32 offset of every quant: Σ_i scale_i · 32 · bsum_i, subtracted up front (scale i
        // and bsum i cover the same 16 elements).
        let offset = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), load256(ab, Q8_K_BSUMS));
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(offset));
        for h in 0..QK_K / 128 {
            let scale_0 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pair_spread(4 * h)));
            let scale_1 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pair_spread(4 * h + 1)));
            let scale_2 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pair_spread(4 * h + 2)));
            let scale_3 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pair_spread(4 * h + 3)));

            let q4bits1 = load256(wb, 64 * h);
            let q4bits2 = load256(wb, 64 * h + 32);
            let q4bits_h = load256(wb, 128 + 32 * h);
            let q4h_0 = _mm256_slli_epi16::<4>(_mm256_and_si256(q4bits_h, m3));
            let q4h_1 =
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(q4bits_h), m3));
            let q4h_2 =
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits_h), m3));
            let q4h_3 =
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(q4bits_h), m3));
            let q4_0 = _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0);
            let q4_1 = _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1);
            let q4_2 =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits1), m4), q4h_2);
            let q4_3 =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits2), m4), q4h_3);

            let q8 = Q8_K_QS + 128 * h;
            let p16_0 = _mm256_maddubs_epi16(q4_0, load256(ab, q8));
            let p16_1 = _mm256_maddubs_epi16(q4_1, load256(ab, q8 + 32));
            let p16_2 = _mm256_maddubs_epi16(q4_2, load256(ab, q8 + 64));
            let p16_3 = _mm256_maddubs_epi16(q4_3, load256(ab, q8 + 96));
            let p_0 = _mm256_madd_epi16(scale_0, p16_0);
            let p_1 = _mm256_madd_epi16(scale_1, p16_1);
            let p_2 = _mm256_madd_epi16(scale_2, p16_2);
            let p_3 = _mm256_madd_epi16(scale_3, p16_3);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_0, p_1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_2, p_3));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    super::avx2::hsum_f32_8(acc)
}
