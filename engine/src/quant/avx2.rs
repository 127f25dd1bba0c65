//! AVX2 + FMA + F16C kernels for x86-64, modelled on ggml-cpu's `arch/x86/quants.c`.
//!
//! Why: decode is one dot product per weight row per token, so these loops are the engine's hot
//! path. Integer block dots use `_mm256_maddubs_epi16` (unsigned × signed bytes) then
//! `_mm256_madd_epi16` to 32-bit lanes, and the per-block scale is applied with one FMA into a
//! float accumulator, exactly as ggml does; results differ from the scalar reference only by
//! float summation order. The Q8 activation quantizers reproduce the scalar reference bit for
//! bit (same scale computation, `roundf` emulated exactly).
//!
//! Pattern: each kernel is a private `#[target_feature] unsafe fn`; the safe wrapper with the
//! [`VecDotFn`](super::VecDotFn) signature checks the cached CPU-feature flag (falling back to
//! the scalar code, so it is sound whoever calls it) and then calls the kernel. Kernels walk
//! their inputs with `chunks_exact`, so every pointer they load from lies inside a slice of the
//! block's exact size: a wrong row length truncates, never reads out of bounds.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::legacy::{
    self, debug_check, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q8_0_BYTES, Q8_1_BYTES, QK,
};

/// Whether this CPU has AVX2, FMA and F16C (detected once, then cached).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Whether this CPU also has AVX-512 VNNI with its 256-bit encodings (AVX-512 VL): `vpdpbusd`
/// does the work of `maddubs` + `madd` + an add in one instruction, on the same registers, with
/// the same integer result. `LLMSD_NO_VNNI=1` turns it off (A/B measurements).
pub(crate) fn vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        available()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && std::env::var_os("LLMSD_NO_VNNI").is_none_or(|v| v == "0")
    })
}

// ---------------------------------------------------------------------------------------------
// Safe wrappers

macro_rules! wrapper {
    ($(#[$m:meta])* $name:ident => $kernel:ident, $scalar:path, $wb:expr, $ab:expr, $qk:expr) => {
        $(#[$m])*
        pub(super) fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            debug_check(n, w, a, $wb, $ab, $qk);
            if !available() {
                return $scalar(n, w, a);
            }
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above); the kernel only
            // reads inside `w` and `a`.
            unsafe { $kernel(w, a) }
        }
    };
}

wrapper!(vec_dot_f32 => dot_f32, legacy::vec_dot_f32, 4, 4, 1);
wrapper!(vec_dot_f16 => dot_f16, legacy::vec_dot_f16, 2, 2, 1);
wrapper!(vec_dot_q4_0_q8_0 => dot_q4_0_q8_0, legacy::vec_dot_q4_0_q8_0, Q4_0_BYTES, Q8_0_BYTES, QK);
wrapper!(vec_dot_q4_1_q8_1 => dot_q4_1_q8_1, legacy::vec_dot_q4_1_q8_1, Q4_1_BYTES, Q8_1_BYTES, QK);
wrapper!(vec_dot_q5_0_q8_0 => dot_q5_0_q8_0, legacy::vec_dot_q5_0_q8_0, Q5_0_BYTES, Q8_0_BYTES, QK);
wrapper!(vec_dot_q8_0_q8_0 => dot_q8_0_q8_0, legacy::vec_dot_q8_0_q8_0, Q8_0_BYTES, Q8_0_BYTES, QK);

/// Q8_0 activation quantizer; bit-identical to `legacy::quantize_row_q8_0`. Lengths are checked
/// by the caller; a mismatch truncates.
pub(super) fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    if !available() {
        return legacy::quantize_row_q8_0(x, out);
    }
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        // SAFETY: AVX2/FMA/F16C checked above; `xb` holds 32 floats and `yb[2..]` 32 bytes.
        let (d, _) = unsafe { quantize_block_q8(xb, &mut yb[2..]) };
        yb[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    }
}

/// Q8_1 activation quantizer; bit-identical to `legacy::quantize_row_q8_1`.
pub(super) fn quantize_row_q8_1(x: &[f32], out: &mut [u8]) {
    if !available() {
        return legacy::quantize_row_q8_1(x, out);
    }
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_1_BYTES)) {
        // SAFETY: AVX2/FMA/F16C checked above; `xb` holds 32 floats and `yb[4..]` 32 bytes.
        let (d, sum) = unsafe { quantize_block_q8(xb, &mut yb[4..]) };
        yb[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        yb[2..4].copy_from_slice(&half::f16::from_f32(sum as f32 * d).to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers (ggml-cpu's x86 idioms)

/// The little-endian f16 at `b[i..i + 2]` as f32, with the F16C instruction.
///
/// # Safety
/// The CPU must support F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

/// `d_x · d_y` broadcast to 8 lanes, from the f16 scales at the start of blocks `x` and `y`.
///
/// Both scales go through one `vmovd` (which zeroes the upper lanes), so the conversion never
/// merges into a live register: a single-lane insert let LLVM pick the accumulator as the
/// pass-through register, chaining every block's scale conversion onto the previous FMA.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_product(x: &[u8], y: &[u8]) -> __m256 {
    let bits = u32::from(u16::from_le_bytes([x[0], x[1]]))
        | (u32::from(u16::from_le_bytes([y[0], y[1]])) << 16);
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    _mm256_broadcastss_ps(_mm_mul_ss(v, _mm_movehdup_ps(v)))
}

/// `e^x` in 8 lanes: Cephes' `expf` (range reduction by ln 2 in two parts, degree-6
/// polynomial), within a few ulp of `f32::exp` on [-87.3, 88]; 0 below -87.3 (where the
/// true value is subnormal), NaN stays NaN.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.3);
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    let xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0));
    let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(fx),
        _mm256_set1_epi32(127),
    ));
    let e = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
    _mm256_andnot_ps(underflow, e)
}

/// Sum of the 8 lanes (every AVX2 kernel of the engine sums its f32 lanes through this one).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum_f32_8(x: __m256) -> f32 {
    let mut r = _mm256_extractf128_ps::<1>(x);
    r = _mm_add_ps(r, _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Sum of the 8 i32 lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32_8(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b1011_0001>(s));
    _mm_cvtsi128_si32(s)
}

/// Max of the 8 lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax_f32_8(x: __m256) -> f32 {
    let mut r = _mm_max_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Unpacks 16 bytes of nibbles into 32 bytes 0..15: low nibbles in the low lane (elements
/// 0..16), high nibbles in the high lane (elements 16..32).
///
/// # Safety
/// The CPU must support AVX2; `q` must hold at least 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes_from_nibbles_32(q: &[u8]) -> __m256i {
    debug_assert!(q.len() >= 16);
    // SAFETY (caller): `q` holds at least 16 bytes; unaligned load.
    let tmp = _mm_loadu_si128(q.as_ptr().cast::<__m128i>());
    let bytes = _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// Spreads the 32 bits of `qh` to 32 bytes: 0xFF where the bit is set, 0 elsewhere.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn bytes_from_bits_32(qh: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Loads 32 bytes.
///
/// # Safety
/// The CPU must support AVX2; `q` must hold at least 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_32(q: &[u8]) -> __m256i {
    debug_assert!(q.len() >= 32);
    // SAFETY (caller): `q` holds at least 32 bytes; unaligned load.
    _mm256_loadu_si256(q.as_ptr().cast::<__m256i>())
}

/// Σ x·y over pairs of unsigned `x` and signed `y` bytes, as 8 float lanes.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mul_sum_us8_pairs_float(x: __m256i, y: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(x, y);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
}

/// Σ x·y over pairs of signed bytes, as 8 float lanes. `y` must not hold -128 (Q8 activations
/// are within ±127); `x` may.
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mul_sum_i8_pairs_float(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_us8_pairs_float(ax, sy)
}

// ---------------------------------------------------------------------------------------------
// Dot kernels

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (wc, ac) = (w.chunks_exact(128), a.chunks_exact(128));
    let (wr, ar) = (wc.remainder(), ac.remainder());
    for (x, y) in wc.zip(ac) {
        for (k, s) in acc.iter_mut().enumerate() {
            // SAFETY: `x` and `y` hold 128 bytes; 32*k + 32 <= 128.
            let vx = _mm256_loadu_ps(x.as_ptr().add(32 * k).cast::<f32>());
            let vy = _mm256_loadu_ps(y.as_ptr().add(32 * k).cast::<f32>());
            *s = _mm256_fmadd_ps(vx, vy, *s);
        }
    }
    let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32_8(acc);
    for (x, y) in wr.chunks_exact(4).zip(ar.chunks_exact(4)) {
        sum += f32::from_le_bytes([x[0], x[1], x[2], x[3]])
            * f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
    }
    sum
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let (wc, ac) = (w.chunks_exact(64), a.chunks_exact(64));
    let (wr, ar) = (wc.remainder(), ac.remainder());
    for (x, y) in wc.zip(ac) {
        for (k, s) in acc.iter_mut().enumerate() {
            // SAFETY: `x` and `y` hold 64 bytes; 16*k + 16 <= 64.
            let vx = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(16 * k).cast::<__m128i>()));
            let vy = _mm256_cvtph_ps(_mm_loadu_si128(y.as_ptr().add(16 * k).cast::<__m128i>()));
            *s = _mm256_fmadd_ps(vx, vy, *s);
        }
    }
    let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32_8(acc);
    for (x, y) in wr.chunks_exact(2).zip(ar.chunks_exact(2)) {
        sum += f16_at(x, 0) * f16_at(y, 0);
    }
    sum
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let off = _mm256_set1_epi8(8);
    for (x, y) in w.chunks_exact(Q4_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let d = scale_product(x, y);
        // Block slices: x[2..] holds 16 bytes, y[2..] 32 bytes.
        let qx = _mm256_sub_epi8(bytes_from_nibbles_32(&x[2..]), off);
        let qy = load_32(&y[2..]);
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
    }
    hsum_f32_8(acc)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for (x, y) in w.chunks_exact(Q4_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
        // [d_x, m_x, d_y, s_y] in one conversion (see `scale_product`).
        let sc = _mm_cvtph_ps(_mm_set_epi32(
            0,
            0,
            i32::from_le_bytes([y[0], y[1], y[2], y[3]]),
            i32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        ));
        let p = _mm_mul_ps(sc, _mm_movehl_ps(sc, sc)); // [d_x·d_y, m_x·s_y, ..]
        summs += _mm_cvtss_f32(_mm_movehdup_ps(p));
        let d = _mm256_broadcastss_ps(p);
        // Block slices: x[4..] holds 16 bytes, y[4..] 32 bytes.
        let qx = bytes_from_nibbles_32(&x[4..]);
        let qy = load_32(&y[4..]);
        acc = _mm256_fmadd_ps(d, mul_sum_us8_pairs_float(qx, qy), acc);
    }
    hsum_f32_8(acc) + summs
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let hi = _mm256_set1_epi8(0xF0u8 as i8);
    for (x, y) in w.chunks_exact(Q5_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let d = scale_product(x, y);
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        // (nibble | 16·bit) − 16 == nibble | (bit ? 0 : 0xF0) as a signed byte.
        let bxhi = _mm256_andnot_si256(bytes_from_bits_32(qh), hi);
        let qx = _mm256_or_si256(bytes_from_nibbles_32(&x[6..]), bxhi);
        let qy = load_32(&y[2..]);
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
    }
    hsum_f32_8(acc)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.chunks_exact(Q8_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let d = scale_product(x, y);
        let qx = load_32(&x[2..]);
        let qy = load_32(&y[2..]);
        acc = _mm256_fmadd_ps(d, mul_sum_i8_pairs_float(qx, qy), acc);
    }
    hsum_f32_8(acc)
}

// ---------------------------------------------------------------------------------------------
// Activation quantizer

/// Quantizes 32 floats to 32 signed bytes as `quantize_row_q8_*_ref` does; returns the scale
/// (before f16 rounding) and the sum of the quants.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. `x` holds at least 32 floats, `qs` 32 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_q8(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    debug_assert!(x.len() >= QK && qs.len() >= QK);
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY (caller): `x` holds at least 32 floats.
    let v = [
        _mm256_loadu_ps(x.as_ptr()),
        _mm256_loadu_ps(x.as_ptr().add(8)),
        _mm256_loadu_ps(x.as_ptr().add(16)),
        _mm256_loadu_ps(x.as_ptr().add(24)),
    ];
    let m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
    let m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
    let amax = hmax_f32_8(_mm256_max_ps(m01, m23));
    // Same scalar arithmetic as the reference, so the products below are bit-identical.
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mul = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let mut iv = [_mm256_setzero_si256(); 4];
    for (o, &vk) in iv.iter_mut().zip(&v) {
        let p = _mm256_mul_ps(vk, mul);
        // roundf: truncate, then step away from zero when the dropped fraction is >= 0.5
        // (p − trunc(p) is exact for these magnitudes).
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
        let step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
        let adj = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step);
        *o = _mm256_cvtps_epi32(_mm256_add_ps(t, adj));
    }
    let sum = hsum_i32_8(_mm256_add_epi32(
        _mm256_add_epi32(iv[0], iv[1]),
        _mm256_add_epi32(iv[2], iv[3]),
    ));
    let i01 = _mm256_packs_epi32(iv[0], iv[1]);
    let i23 = _mm256_packs_epi32(iv[2], iv[3]);
    let i8s = _mm256_packs_epi16(i01, i23);
    let i8s = _mm256_permutevar8x32_epi32(i8s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY (caller): `qs` holds at least 32 bytes; unaligned store.
    _mm256_storeu_si256(qs.as_mut_ptr().cast::<__m256i>(), i8s);
    (d, sum)
}
