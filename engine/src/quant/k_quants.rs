//! K-quant kernels: Q4_K, Q5_K and Q6_K weights, Q8_K activations.
//!
//! Why a file of its own: Gemma-3's Q4_K_M files store the feed-forward down projection and the
//! attention output as Q4_K / Q6_K, so these dot products are the decode hot path. Every kernel
//! here is a scalar reference written straight from ggml's block layouts (ggml-common.h,
//! `QK_K = 256` elements per super-block); [`super::k_quants_avx2`] holds the AVX2+FMA versions,
//! chosen at run time by the un-suffixed `vec_dot_*` functions and tested against the scalar ones.
//!
//! Block layouts (bytes, little-endian):
//! - `block_q4_K` (144): `d: f16`, `dmin: f16`, `scales[12]` (8 six-bit scales and 8 six-bit
//!   mins, packed), `qs[128]` (4-bit quants; each 32 bytes hold two 32-element sub-blocks, low
//!   nibbles first). Value = `d * scale * q - dmin * min`.
//! - `block_q5_K` (176): as Q4_K with `qh[32]` (fifth bits) between `scales` and `qs`.
//! - `block_q6_K` (210): `ql[128]` (low 4 bits), `qh[64]` (high 2 bits), `scales[16]: i8` (one per
//!   16 elements), `d: f16`. Value = `d * scale * (q - 32)`.
//! - `block_q8_K` (292): `d: f32`, `qs[256]: i8`, `bsums[16]: i16` (sums of each 16 `qs`, which
//!   let the SIMD kernels fold the min / -32 offset terms in one step).
//!
//! Lengths are validated by callers; here every loop walks whole blocks with `chunks_exact`, so
//! a wrong length truncates (and trips a `debug_assert!`) but never reads out of bounds.

// The lead wires these kernels into the `quant` dispatch at merge; until then only the tests
// call them.

/// Elements per K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Bytes of one `block_q4_K`.
pub(crate) const Q4_K_BYTES: usize = 144;
/// Bytes of one `block_q5_K`.
pub(crate) const Q5_K_BYTES: usize = 176;
/// Bytes of one `block_q6_K`.
pub(crate) const Q6_K_BYTES: usize = 210;
/// Bytes of one `block_q8_K`.
pub(crate) const Q8_K_BYTES: usize = 292;

/// Offset of `qs` in a Q8_K block.
pub(super) const Q8_K_QS: usize = 4;
/// Offset of `bsums` in a Q8_K block.
pub(super) const Q8_K_BSUMS: usize = 4 + QK_K;

/// The whole `N`-byte blocks of `s`, as arrays (a trailing partial block is ignored).
#[inline(always)]
pub(super) fn blocks<const N: usize>(s: &[u8]) -> impl Iterator<Item = &[u8; N]> {
    s.chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N-byte chunks"))
}

/// The little-endian f16 at `off` of `b`, as f32.
#[inline(always)]
pub(super) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

/// Exact f16 → f32 conversion in a few integer operations, inlined. (`half`'s conversion is an
/// out-of-line call with a run-time F16C check: measurable at two conversions per block.)
#[inline(always)]
pub(super) fn f16_bits_to_f32(h: u16) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let mut o = (h & 0x7fff) << 13;
    let exp = o & SHIFTED_EXP;
    o += (127 - 15) << 23;
    if exp == SHIFTED_EXP {
        // Inf / NaN: exponent all ones.
        o += (128 - 16) << 23;
    } else if exp == 0 {
        // Zero / subnormal: renormalise through a float subtraction.
        o += 1 << 23;
        o = (f32::from_bits(o) - f32::from_bits(113 << 23)).to_bits();
    }
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// The `d` of a Q8_K block.
#[inline(always)]
pub(super) fn q8k_d(b: &[u8; Q8_K_BYTES]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Unpacks the 12 packed bytes of a Q4_K/Q5_K block into `[scale0..scale7, min0..min7]`, each
/// six bits (the `utmp` shuffle of ggml's kernels, equivalent to `get_scale_min_k4`).
#[inline(always)]
pub(super) fn k4_scales_mins(s: &[u8; 12]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let m_lo = u1 & KMASK1;
    let m_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&sc_lo.to_le_bytes());
    out[4..8].copy_from_slice(&sc_hi.to_le_bytes());
    out[8..12].copy_from_slice(&m_lo.to_le_bytes());
    out[12..16].copy_from_slice(&m_hi.to_le_bytes());
    out
}

/// The 12 scale bytes of a Q4_K / Q5_K block.
#[inline(always)]
fn k4_scale_bytes(b: &[u8]) -> &[u8; 12] {
    b[4..16].try_into().expect("12 bytes")
}

#[inline(always)]
fn debug_check_row(n: usize, w: &[u8], w_block: usize, a: &[u8]) {
    debug_assert!(
        n.is_multiple_of(QK_K),
        "row length {n} is not a multiple of {QK_K}"
    );
    debug_assert_eq!(w.len(), n / QK_K * w_block, "weight row length");
    debug_assert_eq!(a.len(), n / QK_K * Q8_K_BYTES, "Q8_K activation row length");
}

#[inline(always)]
fn debug_check_dequant(data: &[u8], w_block: usize, out: &[f32]) {
    debug_assert!(
        out.len().is_multiple_of(QK_K),
        "row length {} is not a multiple of {QK_K}",
        out.len()
    );
    debug_assert_eq!(
        data.len(),
        out.len() / QK_K * w_block,
        "block bytes for the row"
    );
}

/// ggml's `nearest_int`: round half to even through the float mantissa (valid for |f| < 2^22,
/// which quantization guarantees; other inputs give a bounded, meaningless value, never UB).
#[inline(always)]
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantizes `x` (a whole number of 256-element blocks) to Q8_K blocks in `out`, exactly as
/// ggml's `quantize_row_q8_K_ref`: per block, `d = max / -127` where `max` is the element of
/// largest magnitude, `qs = round(x / d)`, and `bsums` the sums of each 16 `qs`. An all-zero
/// block gets `d = 0` and zero `qs` and `bsums`.
pub(crate) fn quantize_row_q8_k(x: &[f32], out: &mut [u8]) {
    debug_assert!(
        x.len().is_multiple_of(QK_K),
        "row length {} is not a multiple of {QK_K}",
        x.len()
    );
    debug_assert_eq!(out.len(), x.len() / QK_K * Q8_K_BYTES, "Q8_K row length");
    for (xb, yb) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8_K_BYTES)) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            let av = v.abs();
            if av > amax {
                amax = av;
                max = v;
            }
        }
        if amax == 0.0 {
            yb.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        let (d_bytes, rest) = yb.split_at_mut(4);
        let (qs, bsums) = rest.split_at_mut(QK_K);
        for (q, &v) in qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).clamp(-128, 127) as i8 as u8;
        }
        for (bs, q16) in bsums.chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
            let s: i32 = q16.iter().map(|&q| i32::from(q as i8)).sum();
            bs.copy_from_slice(&(s as i16).to_le_bytes());
        }
        d_bytes.copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// Dequantizes Q4_K blocks `data` into `out` (`out.len() / 256` blocks).
pub(crate) fn dequantize_row_q4_k(data: &[u8], out: &mut [f32]) {
    debug_check_dequant(data, Q4_K_BYTES, out);
    for (b, y) in blocks::<Q4_K_BYTES>(data).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let sm = k4_scales_mins(k4_scale_bytes(b));
        for (j, (q, y)) in b[16..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (d1, m1) = (d * f32::from(sm[2 * j]), dmin * f32::from(sm[8 + 2 * j]));
            let (d2, m2) = (
                d * f32::from(sm[2 * j + 1]),
                dmin * f32::from(sm[9 + 2 * j]),
            );
            let (lo, hi) = y.split_at_mut(32);
            for ((&q, lo), hi) in q.iter().zip(lo).zip(hi) {
                *lo = d1 * f32::from(q & 0xF) - m1;
                *hi = d2 * f32::from(q >> 4) - m2;
            }
        }
    }
}

/// Dequantizes Q5_K blocks `data` into `out` (`out.len() / 256` blocks).
pub(crate) fn dequantize_row_q5_k(data: &[u8], out: &mut [f32]) {
    debug_check_dequant(data, Q5_K_BYTES, out);
    for (b, y) in blocks::<Q5_K_BYTES>(data).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let sm = k4_scales_mins(k4_scale_bytes(b));
        let qh = &b[16..48];
        for (j, (q, y)) in b[48..]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let (d1, m1) = (d * f32::from(sm[2 * j]), dmin * f32::from(sm[8 + 2 * j]));
            let (d2, m2) = (
                d * f32::from(sm[2 * j + 1]),
                dmin * f32::from(sm[9 + 2 * j]),
            );
            let (lo, hi) = y.split_at_mut(32);
            for (((&q, &h), lo), hi) in q.iter().zip(qh).zip(lo).zip(hi) {
                let h = h >> (2 * j);
                *lo = d1 * f32::from((q & 0xF) | ((h & 1) << 4)) - m1;
                *hi = d2 * f32::from((q >> 4) | ((h & 2) << 3)) - m2;
            }
        }
    }
}

/// Dequantizes Q6_K blocks `data` into `out` (`out.len() / 256` blocks).
pub(crate) fn dequantize_row_q6_k(data: &[u8], out: &mut [f32]) {
    debug_check_dequant(data, Q6_K_BYTES, out);
    for (b, y) in blocks::<Q6_K_BYTES>(data).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 208);
        let sc = &b[192..208];
        // Two halves of 128 elements: 64 bytes of `ql`, 32 of `qh`, 8 scales each.
        for (h, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &b[64 * h..64 * h + 64];
            let qh = &b[128 + 32 * h..128 + 32 * h + 32];
            let sc = &sc[8 * h..8 * h + 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
                y[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
                y[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
                y[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
            }
        }
    }
}

/// Scalar reference: dot of a Q4_K weight row with a Q8_K activation row, `n` elements.
pub(crate) fn vec_dot_q4_k_q8_k_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check_row(n, w, Q4_K_BYTES, a);
    let mut sum = 0.0f32;
    for (wb, ab) in blocks::<Q4_K_BYTES>(w)
        .zip(blocks::<Q8_K_BYTES>(a))
        .take(n / QK_K)
    {
        let ad = q8k_d(ab);
        let d = f16_at(wb, 0) * ad;
        let dmin = f16_at(wb, 2) * ad;
        let sm = k4_scales_mins(k4_scale_bytes(wb));
        let aq = &ab[Q8_K_QS..Q8_K_QS + QK_K];
        let (mut isum, mut msum) = (0i32, 0i32);
        for (j, (q, a64)) in wb[16..]
            .chunks_exact(32)
            .zip(aq.chunks_exact(64))
            .enumerate()
        {
            let (a_lo, a_hi) = a64.split_at(32);
            let (mut s_lo, mut s_hi, mut t_lo, mut t_hi) = (0i32, 0i32, 0i32, 0i32);
            for ((&q, &al), &ah) in q.iter().zip(a_lo).zip(a_hi) {
                let (al, ah) = (i32::from(al as i8), i32::from(ah as i8));
                s_lo += i32::from(q & 0xF) * al;
                s_hi += i32::from(q >> 4) * ah;
                t_lo += al;
                t_hi += ah;
            }
            isum += i32::from(sm[2 * j]) * s_lo + i32::from(sm[2 * j + 1]) * s_hi;
            msum += i32::from(sm[8 + 2 * j]) * t_lo + i32::from(sm[9 + 2 * j]) * t_hi;
        }
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}

/// Scalar reference: dot of a Q5_K weight row with a Q8_K activation row, `n` elements.
pub(crate) fn vec_dot_q5_k_q8_k_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check_row(n, w, Q5_K_BYTES, a);
    let mut sum = 0.0f32;
    for (wb, ab) in blocks::<Q5_K_BYTES>(w)
        .zip(blocks::<Q8_K_BYTES>(a))
        .take(n / QK_K)
    {
        let ad = q8k_d(ab);
        let d = f16_at(wb, 0) * ad;
        let dmin = f16_at(wb, 2) * ad;
        let sm = k4_scales_mins(k4_scale_bytes(wb));
        let qh = &wb[16..48];
        let aq = &ab[Q8_K_QS..Q8_K_QS + QK_K];
        let (mut isum, mut msum) = (0i32, 0i32);
        for (j, (q, a64)) in wb[48..]
            .chunks_exact(32)
            .zip(aq.chunks_exact(64))
            .enumerate()
        {
            let (a_lo, a_hi) = a64.split_at(32);
            let (mut s_lo, mut s_hi, mut t_lo, mut t_hi) = (0i32, 0i32, 0i32, 0i32);
            for (((&q, &h), &al), &ah) in q.iter().zip(qh).zip(a_lo).zip(a_hi) {
                let h = h >> (2 * j);
                let (al, ah) = (i32::from(al as i8), i32::from(ah as i8));
                s_lo += i32::from((q & 0xF) | ((h & 1) << 4)) * al;
                s_hi += i32::from((q >> 4) | ((h & 2) << 3)) * ah;
                t_lo += al;
                t_hi += ah;
            }
            isum += i32::from(sm[2 * j]) * s_lo + i32::from(sm[2 * j + 1]) * s_hi;
            msum += i32::from(sm[8 + 2 * j]) * t_lo + i32::from(sm[9 + 2 * j]) * t_hi;
        }
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}

/// Scalar reference: dot of a Q6_K weight row with a Q8_K activation row, `n` elements.
pub(crate) fn vec_dot_q6_k_q8_k_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check_row(n, w, Q6_K_BYTES, a);
    let mut sum = 0.0f32;
    for (wb, ab) in blocks::<Q6_K_BYTES>(w)
        .zip(blocks::<Q8_K_BYTES>(a))
        .take(n / QK_K)
    {
        let d = f16_at(wb, 208) * q8k_d(ab);
        let aq = &ab[Q8_K_QS..Q8_K_QS + QK_K];
        let mut isum = 0i32;
        for h in 0..2 {
            let ql = &wb[64 * h..64 * h + 64];
            let qh = &wb[128 + 32 * h..128 + 32 * h + 32];
            let sc = &wb[192 + 8 * h..192 + 8 * h + 8];
            let aq = &aq[128 * h..128 * h + 128];
            // Quarter k (32 elements) takes nibble k / 2 of ql[32 * (k % 2)..] and bits
            // 2k..2k+2 of qh; each 16 elements have their own scale.
            for k in 0..4 {
                let ql = &ql[32 * (k % 2)..32 * (k % 2) + 32];
                let nib_shift = 4 * (k / 2);
                for s in 0..2 {
                    let mut acc = 0i32;
                    for l in 16 * s..16 * s + 16 {
                        let q = ((ql[l] >> nib_shift) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4);
                        acc += (i32::from(q) - 32) * i32::from(aq[32 * k + l] as i8);
                    }
                    isum += i32::from(sc[2 * k + s] as i8) * acc;
                }
            }
        }
        sum += d * isum as f32;
    }
    sum
}

/// Whether the AVX2+FMA kernels can run here (detected once, then cached).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn has_avx2_fma() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not yet detected, 1: no, 2: yes.
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let yes = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            STATE.store(1 + u8::from(yes), Ordering::Relaxed);
            yes
        }
    }
}

/// Dot of a Q4_K weight row with a Q8_K activation row, with the best kernel for this CPU.
pub(crate) fn vec_dot_q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected at run time; the kernel reads only whole blocks
            // inside `w` and `a`.
            return unsafe { super::k_quants_avx2::vec_dot_q4_k_q8_k(n, w, a) };
        }
    }
    vec_dot_q4_k_q8_k_scalar(n, w, a)
}

/// Dot of a Q5_K weight row with a Q8_K activation row, with the best kernel for this CPU.
pub(crate) fn vec_dot_q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected at run time; the kernel reads only whole blocks
            // inside `w` and `a`.
            return unsafe { super::k_quants_avx2::vec_dot_q5_k_q8_k(n, w, a) };
        }
    }
    vec_dot_q5_k_q8_k_scalar(n, w, a)
}

/// Dot of a Q6_K weight row with a Q8_K activation row, with the best kernel for this CPU.
pub(crate) fn vec_dot_q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected at run time; the kernel reads only whole blocks
            // inside `w` and `a`.
            return unsafe { super::k_quants_avx2::vec_dot_q6_k_q8_k(n, w, a) };
        }
    }
    vec_dot_q6_k_q8_k_scalar(n, w, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    type Dequant = fn(&[u8], &mut [f32]);
    type VecDot = fn(usize, &[u8], &[u8]) -> f32;

    /// One weight type under test.
    struct Kind {
        name: &'static str,
        bytes: usize,
        /// Byte offsets of the block's f16 super-scales.
        f16_offsets: &'static [usize],
        dequant: Dequant,
        scalar: VecDot,
        best: VecDot,
    }

    const KINDS: [Kind; 3] = [
        Kind {
            name: "Q4_K",
            bytes: Q4_K_BYTES,
            f16_offsets: &[0, 2],
            dequant: dequantize_row_q4_k,
            scalar: vec_dot_q4_k_q8_k_scalar,
            best: vec_dot_q4_k_q8_k,
        },
        Kind {
            name: "Q5_K",
            bytes: Q5_K_BYTES,
            f16_offsets: &[0, 2],
            dequant: dequantize_row_q5_k,
            scalar: vec_dot_q5_k_q8_k_scalar,
            best: vec_dot_q5_k_q8_k,
        },
        Kind {
            name: "Q6_K",
            bytes: Q6_K_BYTES,
            f16_offsets: &[208],
            dequant: dequantize_row_q6_k,
            scalar: vec_dot_q6_k_q8_k_scalar,
            best: vec_dot_q6_k_q8_k,
        },
    ];

    fn kind(name: &str) -> &'static Kind {
        KINDS.iter().find(|k| k.name == name).expect("known kind")
    }

    /// Random bytes with finite f16 super-scales in [1e-3, 1e-1].
    fn random_blocks(k: &Kind, n_blocks: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut v = vec![0u8; n_blocks * k.bytes];
        rng.fill(&mut v[..]);
        for b in v.chunks_exact_mut(k.bytes) {
            for &off in k.f16_offsets {
                let x = f16::from_f32(rng.gen_range(1e-3f32..1e-1));
                b[off..off + 2].copy_from_slice(&x.to_le_bytes());
            }
        }
        v
    }

    /// Activation-like values: mostly in [-1, 1], with a few outliers.
    fn random_acts(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x: f32 = rng.gen_range(-1.0..1.0);
                if rng.gen_bool(0.02) {
                    x * 20.0
                } else {
                    x
                }
            })
            .collect()
    }

    fn quantize(x: &[f32]) -> Vec<u8> {
        let mut q = vec![0u8; x.len() / QK_K * Q8_K_BYTES];
        quantize_row_q8_k(x, &mut q);
        q
    }

    fn dequantize_q8k(a: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(a.len() / Q8_K_BYTES * QK_K);
        for b in blocks::<Q8_K_BYTES>(a) {
            let d = q8k_d(b);
            out.extend(
                b[Q8_K_QS..Q8_K_QS + QK_K]
                    .iter()
                    .map(|&q| d * f32::from(q as i8)),
            );
        }
        out
    }

    fn dequantize(k: &Kind, w: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; w.len() / k.bytes * QK_K];
        (k.dequant)(w, &mut out);
        out
    }

    /// Σ|w_i · a_i| and Σ w_i · a_i in f64.
    fn dot_f64(w: &[f32], a: &[f32]) -> (f64, f64) {
        let (mut abs, mut dot) = (0f64, 0f64);
        for (&x, &y) in w.iter().zip(a) {
            let t = f64::from(x) * f64::from(y);
            abs += t.abs();
            dot += t;
        }
        (abs, dot)
    }

    #[test]
    fn f16_conversion_matches_half() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: got {got} want {want}"
            );
        }
    }

    #[test]
    fn scale_unpack_matches_get_scale_min_k4() {
        // ggml's get_scale_min_k4, verbatim in meaning.
        fn reference(j: usize, q: &[u8; 12]) -> (u8, u8) {
            if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                (
                    (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                    (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                )
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..1000 {
            let mut s = [0u8; 12];
            rng.fill(&mut s);
            let got = k4_scales_mins(&s);
            for j in 0..8 {
                assert_eq!((got[j], got[8 + j]), reference(j, &s), "j={j} s={s:?}");
            }
        }
    }

    #[test]
    fn dequantize_matches_gguf_py() {
        macro_rules! fixture {
            ($name:literal, $ext:literal) => {
                include_bytes!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/quant/",
                    $name,
                    ".",
                    $ext
                ))
                .as_slice()
            };
        }
        let fixtures: [(&str, &[u8], &[u8]); 3] = [
            ("Q4_K", fixture!("Q4_K", "blocks"), fixture!("Q4_K", "f32")),
            ("Q5_K", fixture!("Q5_K", "blocks"), fixture!("Q5_K", "f32")),
            ("Q6_K", fixture!("Q6_K", "blocks"), fixture!("Q6_K", "f32")),
        ];
        for (name, blocks, expected) in fixtures {
            let k = kind(name);
            assert_eq!(
                blocks.len() % k.bytes,
                0,
                "{name}: fixture is not whole blocks"
            );
            let expected: Vec<f32> = expected
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(
                expected.len(),
                blocks.len() / k.bytes * QK_K,
                "{name}: fixture sizes"
            );
            let got = dequantize(k, blocks);
            for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits(),
                    "{name}[{i}] (block {}, element {}): got {g}, gguf-py {e}",
                    i / QK_K,
                    i % QK_K
                );
            }
        }
    }

    #[test]
    fn quantize_q8_k_round_trips_with_bsums() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut x = random_acts(6 * QK_K, &mut rng);
        // Block 1: all zero. Block 2: largest magnitude negative. Block 3: tiny values.
        x[QK_K..2 * QK_K].fill(0.0);
        x[2 * QK_K + 77] = -50.0;
        for v in &mut x[3 * QK_K..4 * QK_K] {
            *v *= 1e-30;
        }
        let q = quantize(&x);
        for (bi, (b, xb)) in blocks::<Q8_K_BYTES>(&q)
            .zip(x.chunks_exact(QK_K))
            .enumerate()
        {
            let d = q8k_d(b);
            let qs: Vec<i32> = b[Q8_K_QS..Q8_K_QS + QK_K]
                .iter()
                .map(|&v| i32::from(v as i8))
                .collect();
            let max = xb
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            if max == 0.0 {
                assert_eq!(d, 0.0, "block {bi}: zero block d");
            } else {
                // ggml's sign convention: d = max / -127, so the largest element maps to -127.
                assert!(
                    ((d - max / -127.0) / d).abs() < 1e-6,
                    "block {bi}: d {d} max {max}"
                );
            }
            for (j, (&qv, &xv)) in qs.iter().zip(xb).enumerate() {
                assert!((-127..=127).contains(&qv), "block {bi}[{j}]: q {qv}");
                let err = (d * qv as f32 - xv).abs();
                assert!(
                    err <= d.abs() * 0.5 * (1.0 + 1e-5) + f32::MIN_POSITIVE,
                    "block {bi}[{j}]: x {xv} q {qv} d {d} err {err}"
                );
            }
            for j in 0..16 {
                let bs = i16::from_le_bytes([b[Q8_K_BSUMS + 2 * j], b[Q8_K_BSUMS + 2 * j + 1]]);
                let want: i32 = qs[16 * j..16 * j + 16].iter().sum();
                assert_eq!(i32::from(bs), want, "block {bi} bsum {j}");
            }
        }
    }

    #[test]
    fn simd_vec_dot_matches_scalar_random() {
        #[cfg(target_arch = "x86_64")]
        if !has_avx2_fma() {
            eprintln!("warning: no AVX2+FMA on this CPU, the dispatched kernel is the scalar one");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut failures = Vec::new();
        for k in &KINDS {
            for n_blocks in [1, 2, 3, 8, 17] {
                for _trial in 0..20 {
                    let n = n_blocks * QK_K;
                    let w = random_blocks(k, n_blocks, &mut rng);
                    let a = quantize(&random_acts(n, &mut rng));
                    let scalar = (k.scalar)(n, &w, &a);
                    let best = (k.best)(n, &w, &a);
                    let (abs, exact) = dot_f64(&dequantize(k, &w), &dequantize_q8k(&a));
                    let tol = 1e-4 * abs + 1e-6;
                    if (f64::from(scalar) - f64::from(best)).abs() > tol {
                        failures.push(format!(
                            "{} n={n}: scalar {scalar} simd {best} (tol {tol})",
                            k.name
                        ));
                    }
                    // The scalar reference is the dot of the dequantized rows.
                    if (f64::from(scalar) - exact).abs() > tol {
                        failures.push(format!(
                            "{} n={n}: scalar {scalar} vs dequantized dot {exact} (tol {tol})",
                            k.name
                        ));
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
    }

    #[test]
    fn vec_dot_close_to_f32_dot_of_original_activations() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for k in &KINDS {
            for n_blocks in [1, 4, 9] {
                let n = n_blocks * QK_K;
                let w = random_blocks(k, n_blocks, &mut rng);
                let x = random_acts(n, &mut rng);
                let a = quantize(&x);
                let wf = dequantize(k, &w);
                let (abs, exact) = dot_f64(&wf, &x);
                // Each activation is off by at most d/2 of its block: the only error source
                // apart from float rounding.
                let mut bound = 0f64;
                for ((wb, ab), _) in wf.chunks_exact(QK_K).zip(blocks::<Q8_K_BYTES>(&a)).zip(0..) {
                    let half_d = f64::from(q8k_d(ab).abs()) * 0.5;
                    bound += half_d * wb.iter().map(|&v| f64::from(v.abs())).sum::<f64>();
                }
                let tol = bound * 1.001 + 1e-4 * abs + 1e-6;
                for (label, f) in [("scalar", k.scalar), ("best", k.best)] {
                    let got = f64::from(f(n, &w, &a));
                    assert!(
                        (got - exact).abs() <= tol,
                        "{} {label} n={n}: {got} vs f32 dot {exact} (tol {tol})",
                        k.name
                    );
                }
            }
        }
    }

    #[test]
    fn vec_dot_truncates_to_whole_blocks() {
        // Lengths shorter than `n` (a caller bug) must truncate, not read out of bounds.
        if cfg!(debug_assertions) {
            return; // the debug_asserts fire first, by design
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for k in &KINDS {
            let w = random_blocks(k, 3, &mut rng);
            let a = quantize(&random_acts(3 * QK_K, &mut rng));
            for f in [k.scalar, k.best] {
                let one_block = f(QK_K, &w[..k.bytes], &a[..Q8_K_BYTES]);
                let got = f(3 * QK_K, &w[..k.bytes + 7], &a[..Q8_K_BYTES + 100]);
                assert_eq!(got, one_block, "{}", k.name);
            }
        }
    }

    #[test]
    fn real_gemma3_q4_k_q6_k_tensors() {
        use crate::gguf::GgufFile;
        use crate::quant::GgmlType;

        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/gemma-3-270m-q4_k_m.gguf"
        );
        assert!(
            std::path::Path::new(path).exists(),
            "{path} is missing: run `scripts/fetch-models` first"
        );
        let file = GgufFile::open(path).expect("open gemma-3 gguf");
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (mut n_q4, mut n_q6) = (0, 0);
        for info in &file.tensors {
            let k = match info.ty {
                GgmlType::Q4_K => {
                    n_q4 += 1;
                    kind("Q4_K")
                }
                GgmlType::Q6_K => {
                    n_q6 += 1;
                    kind("Q6_K")
                }
                _ => continue,
            };
            let data = file.tensor_data(info);
            let (cols, rows) = (info.n_cols(), info.n_rows());
            assert_eq!(cols % QK_K, 0, "{}: {cols} columns", info.name);
            let row_bytes = cols / QK_K * k.bytes;
            assert_eq!(data.len(), rows * row_bytes, "{}: data size", info.name);
            let a = quantize(&random_acts(cols, &mut rng));
            let a_f = dequantize_q8k(&a);
            let sample = [0, 1, rows / 2, rows - 1]
                .into_iter()
                .chain((0..12).map(|_| rng.gen_range(0..rows)));
            for r in sample {
                let w = &data[r * row_bytes..(r + 1) * row_bytes];
                let wf = dequantize(k, w);
                assert!(
                    wf.iter().all(|v| v.is_finite()),
                    "{} row {r}: non-finite dequantized value",
                    info.name
                );
                let scalar = (k.scalar)(cols, w, &a);
                let best = (k.best)(cols, w, &a);
                let (abs, exact) = dot_f64(&wf, &a_f);
                let tol = 1e-4 * abs + 1e-6;
                assert!(
                    (f64::from(scalar) - f64::from(best)).abs() <= tol,
                    "{} row {r}: scalar {scalar} simd {best} (tol {tol})",
                    info.name
                );
                assert!(
                    (f64::from(scalar) - exact).abs() <= tol,
                    "{} row {r}: scalar {scalar} vs dequantized dot {exact} (tol {tol})",
                    info.name
                );
            }
        }
        assert!(
            n_q4 > 0 && n_q6 > 0,
            "expected Q4_K and Q6_K tensors, got {n_q4} / {n_q6}"
        );
    }
}
