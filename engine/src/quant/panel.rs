//! Many-token products (prefill) over a pre-decoded, row-interleaved weight panel, for every
//! block type with a [`Kind`] here (Q4_0, Q4_1, Q5_0, Q8_0 and the K-quants).
//!
//! Why: in prefill each weight block meets dozens of tokens, so the cost that matters is the
//! work per (row, 32 elements, token). The register tiles of `gemm_legacy_avx2` / `gemm_k_avx2`
//! keep one row per accumulator and spend a `madd`, a convert, an FMA and a scale broadcast per
//! row per block per token, plus horizontal sums. Here a strip of 8 rows is decoded once per call
//! into unsigned bytes (signed for Q8_0) and transposed so that vector `k` of a 32-element
//! sub-block holds elements `4k..4k+4` of all 8 rows (4 bytes per row): `maddubs` of it with the
//! token's elements `4k..4k+4` broadcast to every lane leaves each row's products in its own
//! 32-bit lane. Per (8 rows, sub-block, token): 8 broadcasts, 8 `maddubs` summed in i16 (as
//! deep as the quants' range allows), one `madd`, one convert and one or two FMAs with the
//! rows' scale vector; the result lanes are the 8 rows, with no horizontal sum.
//!
//! Scales: every type is written as `w = d·q + m` per sub-block (per half for Q6_K, whose scales
//! cover 16 elements) with `q` the stored unsigned quant: Q4_0 / Q5_0 `m = d` with the offset
//! (-8 / -16 × Σa) moved onto the activation; Q4_1 `m` = the block min; Q4_K / Q5_K `d·sc` and
//! `-dmin·min`; Q6_K `d·sc` and `-32·d·sc`. The activation side supplies, per sub-block, its
//! scale and the constant the `m` term multiplies (Q8_1's `s`, `d·Σa` from Q8_K's bsums, ...).
//! Integer sums are exact, so results differ from the scalar dots only by float rounding.

use super::GgmlType;

/// Rows per strip (lanes of a ymm of i32).
const PR: usize = 8;
/// Most 32-element sub-blocks per column chunk (1024 columns); longer rows add chunk results.
pub(crate) const PG: usize = 32;
/// Most tokens whose activation scales are converted per chunk.
const PT: usize = 64;
/// Tokens per register tile.
const T: usize = 4;

/// The many-token kernel for weights of type `ty`, if this CPU has one.
pub(crate) fn panel_fn(ty: GgmlType) -> Option<super::TileFn> {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        use x86::*;
        return match ty {
            GgmlType::Q4_0 => Some(run::<KQ4_0>),
            GgmlType::Q4_1 => Some(run::<KQ4_1>),
            GgmlType::Q5_0 => Some(run::<KQ5_0>),
            GgmlType::Q8_0 => Some(run::<KQ8_0>),
            GgmlType::Q4_K => Some(run::<KQ4_K>),
            GgmlType::Q5_K => Some(run::<KQ5_K>),
            GgmlType::Q6_K => Some(run::<KQ6_K>),
            _ => None,
        };
    }
    let _ = ty;
    None
}

#[cfg(target_arch = "x86_64")]
#[allow(non_camel_case_types)]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{PG, PR, PT, T};
    use crate::quant::avx2::bytes_from_bits_32;
    use crate::quant::k_quants::{k4_scales_mins, Q8_K_BSUMS, Q8_K_BYTES};

    /// One weight type's layout and decoding.
    pub(crate) trait Kind {
        /// Elements per weight block (32, or 256 for the K-quants).
        const BLOCK: usize;
        /// Bytes per weight block.
        const W_BYTES: usize;
        /// Bytes per activation block (Q8_0 34, Q8_1 36, Q8_K 292; same element count).
        const A_BYTES: usize;
        /// Signed weight bytes (Q8_0): `maddubs` gets `|w|` and the sign moves onto `a`.
        const SIGNED: bool = false;
        /// How many `maddubs` results may be summed in i16 before a `madd` (quant range).
        const DEPTH: usize;
        /// Two scales per sub-block, one per 16 elements (Q6_K).
        const SPLIT: bool = false;
        /// Whether there is an `m` term.
        const HAS_M: bool = true;

        /// Decodes weight block `p` into its `BLOCK / 32` sub-blocks: the 32 quants of sub-block
        /// `j` in element order to `q[j]`, its scales to `d[j]` (and `d2[j]` for the second half
        /// when SPLIT) and its `m` terms to `m[j]` (`m2[j]`).
        ///
        /// # Safety
        /// AVX2/FMA/F16C; `W_BYTES` readable bytes at `p`; the slices hold `BLOCK / 32` entries.
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]);

        /// Scales of activation block `p` for each sub-block `j`: `[d, c, c2, 0]` (scale of
        /// the integer sum, and the constant(s) that `m` multiplies).
        ///
        /// # Safety
        /// AVX2/FMA/F16C; `A_BYTES` readable bytes at `p`; `out` holds `BLOCK / 32` entries.
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]);

        /// Offset of sub-block `j`'s 32 quants inside an activation block.
        fn act_quants(j: usize) -> usize;

        /// Bytes of one strip-block of the packed layout (`super::super::packed`): 8 rows × one
        /// 32-element block, `8 · W_BYTES`; 0 for kinds that are never packed.
        const PACK_BYTES: usize = 0;

        /// Unpacks the packed strip-block at `p` into the 8 panel vectors (`v[k]`: elements
        /// `4k..4k+4` of rows 0..8) and returns the rows' `(d, m)` scale vectors.
        ///
        /// # Safety
        /// AVX2/FMA/F16C; `PACK_BYTES` readable bytes at `p` (never called when 0).
        unsafe fn unpack(p: *const u8, v: &mut [__m256i; 8]) -> (__m256, __m256) {
            let _ = (p, v);
            (_mm256_setzero_ps(), _mm256_setzero_ps())
        }
    }

    /// Scales of a packed strip-block: 8 f16 at `p` as f32.
    ///
    /// # Safety
    /// AVX2/F16C; 16 readable bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>()))
    }

    /// The 8 nibble vectors of a packed 4-bit strip-block whose 4 packed vectors start at `q`:
    /// low nibbles of packed vector `i` are panel vector `i`, high nibbles panel vector `i + 4`.
    ///
    /// # Safety
    /// AVX2; 128 readable bytes at `q`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_nibbles(q: *const u8, v: &mut [__m256i; 8]) {
        let m4 = _mm256_set1_epi8(0x0F);
        for i in 0..4 {
            let x = _mm256_loadu_si256(q.add(32 * i).cast::<__m256i>());
            v[i] = _mm256_and_si256(x, m4);
            v[i + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16(p: *const u8) -> f32 {
        let h = u16::from_le(std::ptr::read_unaligned(p.cast::<u16>()));
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let tmp = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast::<__m128i>()));
        let bytes = _mm256_srlv_epi64(tmp, _mm256_set_epi64x(4, 4, 0, 0));
        _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
    }

    /// Σ of the 32 signed bytes of `y`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_i8(y: __m256i) -> i32 {
        let s = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_set1_epi8(1), y),
            _mm256_set1_epi16(1),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b1011_0001>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Q8_0 activation scales with the offset constant `off·d·Σa`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn act_q8_0(p: *const u8, off: f32, out: &mut [[f32; 4]]) {
        let d = f16(p);
        let c = if off == 0.0 {
            0.0
        } else {
            // SAFETY (caller): 32 quants at 2..34.
            off * d * sum_i8(_mm256_loadu_si256(p.add(2).cast::<__m256i>())) as f32
        };
        out[0] = [d, c, 0.0, 0.0];
    }

    pub(crate) struct KQ4_0;
    impl Kind for KQ4_0 {
        const BLOCK: usize = 32;
        const W_BYTES: usize = 18;
        const A_BYTES: usize = 34;
        const DEPTH: usize = 8;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            q[0] = nibbles(p.add(2));
            let d = f16(p);
            s[0] = [d, d, 0.0, 0.0];
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            act_q8_0(p, -8.0, out);
        }
        fn act_quants(_: usize) -> usize {
            2
        }
        const PACK_BYTES: usize = 8 * 18;
        #[inline(always)]
        unsafe fn unpack(p: *const u8, v: &mut [__m256i; 8]) -> (__m256, __m256) {
            unpack_nibbles(p.add(16), v);
            let d = f16x8(p);
            (d, d)
        }
    }

    pub(crate) struct KQ4_1;
    impl Kind for KQ4_1 {
        const BLOCK: usize = 32;
        const W_BYTES: usize = 20;
        const A_BYTES: usize = 36;
        const DEPTH: usize = 8;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            q[0] = nibbles(p.add(4));
            s[0] = [f16(p), f16(p.add(2)), 0.0, 0.0];
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            out[0] = [f16(p), f16(p.add(2)), 0.0, 0.0];
        }
        fn act_quants(_: usize) -> usize {
            4
        }
        const PACK_BYTES: usize = 8 * 20;
        #[inline(always)]
        unsafe fn unpack(p: *const u8, v: &mut [__m256i; 8]) -> (__m256, __m256) {
            unpack_nibbles(p.add(32), v);
            (f16x8(p), f16x8(p.add(16)))
        }
    }

    pub(crate) struct KQ5_0;
    impl Kind for KQ5_0 {
        const BLOCK: usize = 32;
        const W_BYTES: usize = 22;
        const A_BYTES: usize = 34;
        const DEPTH: usize = 4;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            let qh = u32::from_le(std::ptr::read_unaligned(p.add(2).cast::<u32>()));
            let hi = _mm256_and_si256(bytes_from_bits_32(qh), _mm256_set1_epi8(16));
            q[0] = _mm256_or_si256(nibbles(p.add(6)), hi);
            let d = f16(p);
            s[0] = [d, d, 0.0, 0.0];
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            act_q8_0(p, -16.0, out);
        }
        fn act_quants(_: usize) -> usize {
            2
        }
        const PACK_BYTES: usize = 8 * 22;
        #[inline(always)]
        unsafe fn unpack(p: *const u8, v: &mut [__m256i; 8]) -> (__m256, __m256) {
            unpack_nibbles(p.add(48), v);
            // Byte `4r + j` of the high-bit plane: bit k = 5th bit of element 4k + j of row r;
            // moved to bit 4 of vector k by a 16-bit shift (bits never cross into the masked
            // bit of the neighbouring byte for shifts up to 4).
            let h = _mm256_loadu_si256(p.add(16).cast::<__m256i>());
            let m16 = _mm256_set1_epi8(16);
            let hb = [
                _mm256_slli_epi16::<4>(h),
                _mm256_slli_epi16::<3>(h),
                _mm256_slli_epi16::<2>(h),
                _mm256_slli_epi16::<1>(h),
                h,
                _mm256_srli_epi16::<1>(h),
                _mm256_srli_epi16::<2>(h),
                _mm256_srli_epi16::<3>(h),
            ];
            for (vk, hk) in v.iter_mut().zip(hb) {
                *vk = _mm256_or_si256(*vk, _mm256_and_si256(hk, m16));
            }
            let d = f16x8(p);
            (d, d)
        }
    }

    pub(crate) struct KQ8_0;
    impl Kind for KQ8_0 {
        const BLOCK: usize = 32;
        const W_BYTES: usize = 34;
        const A_BYTES: usize = 34;
        const SIGNED: bool = true;
        const DEPTH: usize = 1;
        const HAS_M: bool = false;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            q[0] = _mm256_loadu_si256(p.add(2).cast::<__m256i>());
            s[0] = [f16(p), 0.0, 0.0, 0.0];
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            act_q8_0(p, 0.0, out);
        }
        fn act_quants(_: usize) -> usize {
            2
        }
        const PACK_BYTES: usize = 8 * 34;
        #[inline(always)]
        unsafe fn unpack(p: *const u8, v: &mut [__m256i; 8]) -> (__m256, __m256) {
            for (k, vk) in v.iter_mut().enumerate() {
                *vk = _mm256_loadu_si256(p.add(16 + 32 * k).cast::<__m256i>());
            }
            (f16x8(p), _mm256_setzero_ps())
        }
    }

    /// Q8_K activation scales: `d` for every sub-block, `c = d·Σa` per 32 (or per 16 when
    /// `split`) from the bsums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn act_q8_k(p: *const u8, split: bool, out: &mut [[f32; 4]]) {
        let d = std::ptr::read_unaligned(p.cast::<f32>());
        for (j, o) in out.iter_mut().enumerate().take(8) {
            // SAFETY (caller): 16 i16 bsums at Q8_K_BSUMS.
            let bs = |i: usize| {
                f32::from(i16::from_le(std::ptr::read_unaligned(
                    p.add(Q8_K_BSUMS + 2 * i).cast::<i16>(),
                )))
            };
            let (b0, b1) = (bs(2 * j), bs(2 * j + 1));
            *o = if split {
                [d, d * b0, d * b1, 0.0]
            } else {
                [d, d * (b0 + b1), 0.0, 0.0]
            };
        }
    }

    /// Q4_K / Q5_K sub-block scales: `d·sc_j` and `-dmin·min_j`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k4_scales(p: *const u8, s: &mut [[f32; 4]]) {
        let (d, dmin) = (f16(p), f16(p.add(2)));
        let raw: [u8; 12] = std::ptr::read_unaligned(p.add(4).cast::<[u8; 12]>());
        let sm = k4_scales_mins(&raw);
        for (j, e) in s.iter_mut().enumerate().take(8) {
            *e = [d * f32::from(sm[j]), -dmin * f32::from(sm[8 + j]), 0.0, 0.0];
        }
    }

    pub(super) struct KQ4_K;
    impl Kind for KQ4_K {
        const BLOCK: usize = 256;
        const W_BYTES: usize = 144;
        const A_BYTES: usize = Q8_K_BYTES;
        const DEPTH: usize = 8;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            k4_scales(p, s);
            let m4 = _mm256_set1_epi8(0x0F);
            for j in 0..4 {
                let bits = _mm256_loadu_si256(p.add(16 + 32 * j).cast::<__m256i>());
                q[2 * j] = _mm256_and_si256(bits, m4);
                q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4);
            }
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            act_q8_k(p, false, out);
        }
        fn act_quants(j: usize) -> usize {
            4 + 32 * j
        }
    }

    pub(super) struct KQ5_K;
    impl Kind for KQ5_K {
        const BLOCK: usize = 256;
        const W_BYTES: usize = 176;
        const A_BYTES: usize = Q8_K_BYTES;
        const DEPTH: usize = 4;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            k4_scales(p, s);
            let m4 = _mm256_set1_epi8(0x0F);
            let (m1, m2) = (_mm256_set1_epi8(1), _mm256_set1_epi8(2));
            let mut hbits = _mm256_loadu_si256(p.add(16).cast::<__m256i>());
            for j in 0..4 {
                let bits = _mm256_loadu_si256(p.add(48 + 32 * j).cast::<__m256i>());
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(hbits, m1));
                let h1 = _mm256_slli_epi16::<3>(_mm256_and_si256(hbits, m2));
                hbits = _mm256_srli_epi16::<2>(hbits);
                q[2 * j] = _mm256_or_si256(_mm256_and_si256(bits, m4), h0);
                q[2 * j + 1] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4), h1);
            }
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            act_q8_k(p, false, out);
        }
        fn act_quants(j: usize) -> usize {
            4 + 32 * j
        }
    }

    pub(super) struct KQ6_K;
    impl Kind for KQ6_K {
        const BLOCK: usize = 256;
        const W_BYTES: usize = 210;
        const A_BYTES: usize = Q8_K_BYTES;
        const DEPTH: usize = 2;
        const SPLIT: bool = true;
        #[inline(always)]
        unsafe fn decode(p: *const u8, q: &mut [__m256i], s: &mut [[f32; 4]]) {
            let d = f16(p.add(208));
            let m4 = _mm256_set1_epi8(0x0F);
            let m3 = _mm256_set1_epi8(3);
            for h in 0..2 {
                let b1 = _mm256_loadu_si256(p.add(64 * h).cast::<__m256i>());
                let b2 = _mm256_loadu_si256(p.add(64 * h + 32).cast::<__m256i>());
                let bh = _mm256_loadu_si256(p.add(128 + 32 * h).cast::<__m256i>());
                let hb = |sh: i32| {
                    let x = match sh {
                        0 => bh,
                        2 => _mm256_srli_epi16::<2>(bh),
                        4 => _mm256_srli_epi16::<4>(bh),
                        _ => _mm256_srli_epi16::<6>(bh),
                    };
                    _mm256_slli_epi16::<4>(_mm256_and_si256(x, m3))
                };
                q[4 * h] = _mm256_or_si256(_mm256_and_si256(b1, m4), hb(0));
                q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(b2, m4), hb(2));
                q[4 * h + 2] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b1), m4), hb(4));
                q[4 * h + 3] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(b2), m4), hb(6));
            }
            for (j, e) in s.iter_mut().enumerate().take(8) {
                let s0 = d * f32::from(*p.add(192 + 2 * j) as i8);
                let s1 = d * f32::from(*p.add(192 + 2 * j + 1) as i8);
                *e = [s0, -32.0 * s0, s1, -32.0 * s1];
            }
        }
        #[inline(always)]
        unsafe fn act(p: *const u8, out: &mut [[f32; 4]]) {
            act_q8_k(p, true, out);
        }
        fn act_quants(j: usize) -> usize {
            4 + 32 * j
        }
    }

    /// A strip of `PR` rows × up to `PG` sub-blocks, decoded and transposed: `q[g][k]` holds
    /// elements `4k..4k+4` of sub-block `g` of rows 0..8 (4 bytes per row); `s[g]` the rows'
    /// `[d, m, d2, m2]` scale vectors (8 f32 each). Rows past the strip's end are zero.
    #[repr(C, align(32))]
    pub(super) struct Panel {
        q: [[[u8; 32]; 8]; PG],
        s: [[[f32; PR]; 4]; PG],
    }

    impl Default for Panel {
        fn default() -> Self {
            Panel {
                q: [[[0; 32]; 8]; PG],
                s: [[[0.0; PR]; 4]; PG],
            }
        }
    }

    /// Transposes 8 rows of 8 dwords in place: afterwards `r[k]` holds dword `k` of every row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn transpose8(r: &mut [__m256i; 8]) {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        r[0] = _mm256_permute2x128_si256::<0x20>(u0, u4);
        r[1] = _mm256_permute2x128_si256::<0x20>(u1, u5);
        r[2] = _mm256_permute2x128_si256::<0x20>(u2, u6);
        r[3] = _mm256_permute2x128_si256::<0x20>(u3, u7);
        r[4] = _mm256_permute2x128_si256::<0x31>(u0, u4);
        r[5] = _mm256_permute2x128_si256::<0x31>(u1, u5);
        r[6] = _mm256_permute2x128_si256::<0x31>(u2, u6);
        r[7] = _mm256_permute2x128_si256::<0x31>(u3, u7);
    }

    /// Decodes weight blocks `0..nbk` (`nbk·BLOCK/32 <= PG` sub-blocks) of the `nr <= PR` rows
    /// at `w` (`w_row` bytes apart) into `p`, zeroing rows `nr..PR`.
    ///
    /// # Safety
    /// AVX2/FMA/F16C; for every `r < nr` the bytes `w + r·w_row .. + nbk·W_BYTES` are readable.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_strip<K: Kind>(
        nbk: usize,
        w: *const u8,
        w_row: usize,
        nr: usize,
        p: &mut Panel,
    ) {
        let spb = K::BLOCK / 32;
        debug_assert!(nbk * spb <= PG && nr <= PR);
        let mut q = [[_mm256_setzero_si256(); 8]; PR];
        let mut s = [[[0.0f32; 4]; 8]; PR];
        for b in 0..nbk.min(PG / spb) {
            for r in 0..PR {
                if r < nr {
                    // SAFETY (caller): block b of row r is readable.
                    K::decode(
                        w.add(r * w_row + b * K::W_BYTES),
                        &mut q[r][..spb],
                        &mut s[r][..spb],
                    );
                } else {
                    q[r] = [_mm256_setzero_si256(); 8];
                    s[r] = [[0.0; 4]; 8];
                }
            }
            for j in 0..spb {
                let g = b * spb + j;
                let mut v: [__m256i; 8] = std::array::from_fn(|r| q[r][j]);
                transpose8(&mut v);
                for (k, vk) in v.iter().enumerate() {
                    // SAFETY: `p.q[g][k]` is 32 bytes, 32-aligned.
                    _mm256_store_si256(p.q[g][k].as_mut_ptr().cast::<__m256i>(), *vk);
                }
                for (c, dst) in p.s[g].iter_mut().enumerate() {
                    for (d, sr) in dst.iter_mut().zip(&s) {
                        *d = sr[j][c];
                    }
                }
            }
        }
    }

    /// Unpacks strip-blocks `0..nbk` (`nbk <= PG`) of a packed strip at `p` into the panel.
    ///
    /// # Safety
    /// AVX2/FMA/F16C; `K::BLOCK == 32` and `K::PACK_BYTES > 0`; `nbk · PACK_BYTES` readable bytes
    /// at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_strip<K: Kind>(nbk: usize, p: *const u8, panel: &mut Panel) {
        debug_assert!(K::BLOCK == 32 && K::PACK_BYTES > 0 && nbk <= PG);
        let mut v = [_mm256_setzero_si256(); 8];
        for g in 0..nbk.min(PG) {
            // SAFETY (caller): strip-block g is readable.
            let (d, m) = K::unpack(p.add(g * K::PACK_BYTES), &mut v);
            for (k, vk) in v.iter().enumerate() {
                // SAFETY: `panel.q[g][k]` is 32 bytes, 32-aligned.
                _mm256_store_si256(panel.q[g][k].as_mut_ptr().cast::<__m256i>(), *vk);
            }
            // SAFETY: `panel.s[g][c]` is 8 f32, 32-aligned.
            _mm256_store_ps(panel.s[g][0].as_mut_ptr(), d);
            _mm256_store_ps(panel.s[g][1].as_mut_ptr(), m);
        }
    }

    /// The integer sums of one 32-element sub-block against one token: panel vectors `u`
    /// (the weights as unsigned bytes; their magnitudes for signed kinds, whose signs, from `v`,
    /// move onto the activations) against the 32 activation quants at `ap`. Returns
    /// `[sums, 0]`, or the two 16-element halves' sums for `SPLIT` kinds. `$vnni`: `vpdpbusd`
    /// (AVX-512 VNNI); else `maddubs` summed in i16 as deep as `K::DEPTH` allows, then `madd`.
    /// Both give the same integers. Expands inside an `unsafe fn` with the matching target
    /// features; 32 quants must be readable at `ap`.
    macro_rules! sub_block_sums {
        ($vnni:literal, $K:ty, $u:expr, $v:expr, $ap:expr) => {{
            let (u, v, ap): (&[__m256i; 8], &[__m256i; 8], *const u8) = ($u, $v, $ap);
            let y = |k: usize| {
                // SAFETY (caller): 32 quants at `ap`.
                let y = _mm256_set1_epi32(std::ptr::read_unaligned(ap.add(4 * k).cast::<i32>()));
                if <$K>::SIGNED {
                    _mm256_sign_epi8(y, v[k])
                } else {
                    y
                }
            };
            let mut isum = [_mm256_setzero_si256(); 2];
            if $vnni {
                if <$K>::SPLIT {
                    for k in 0..8 {
                        let h = usize::from(k >= 4);
                        isum[h] = _mm256_dpbusd_epi32(isum[h], u[k], y(k));
                    }
                } else {
                    // Two chains, so consecutive `vpdpbusd`s do not wait on each other.
                    let mut s = [_mm256_setzero_si256(); 2];
                    for k in 0..8 {
                        s[k & 1] = _mm256_dpbusd_epi32(s[k & 1], u[k], y(k));
                    }
                    isum[0] = _mm256_add_epi32(s[0], s[1]);
                }
            } else {
                let ones = _mm256_set1_epi16(1);
                let mut s16 = _mm256_setzero_si256();
                for k in 0..8 {
                    let pr = _mm256_maddubs_epi16(u[k], y(k));
                    s16 = if k % <$K>::DEPTH == 0 {
                        pr
                    } else {
                        _mm256_add_epi16(s16, pr)
                    };
                    if (k + 1) % <$K>::DEPTH == 0 || (<$K>::SPLIT && k == 3) {
                        let h = usize::from(<$K>::SPLIT && k >= 4);
                        isum[h] = _mm256_add_epi32(isum[h], _mm256_madd_epi16(s16, ones));
                    }
                }
            }
            isum
        }};
    }
    pub(crate) use sub_block_sums;

    /// `acc + Σ·(d·d_a) + m·c` for one sub-block: its integer sums `isum` scaled by the rows'
    /// scales `d8` and the activation's `d_a` (`da`, broadcast), then, for kinds with a min
    /// term, the rows' `m8` times the activation constant `c`. The one float sequence of both
    /// kernels (`strip_dot` here, `strip` in `packed`): in this order they give the same bits.
    macro_rules! add_scaled {
        ($K:ty, $acc:expr, $isum:expr, $d8:expr, $da:expr, $m8:expr, $c:expr) => {{
            let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps($isum), _mm256_mul_ps($d8, $da), $acc);
            if <$K>::HAS_M {
                _mm256_fmadd_ps($m8, _mm256_set1_ps($c), acc)
            } else {
                acc
            }
        }};
    }
    pub(crate) use add_scaled;

    /// Defines a panel dot kernel: `res[t]` lane `r` = Σ over sub-blocks `0..ng` of panel row
    /// `r` · token `t`, for the `T` tokens whose quants (chunk start) are at `a[t]` (`A_BYTES`
    /// per block) and whose converted scales are `asc[t·PG + g]`. `strip_dot` multiplies with
    /// `maddubs` summed in i16 then `madd` (AVX2); `strip_dot_vnni` with `vpdpbusd` (the same
    /// integer sums, so the same bits).
    ///
    /// # Safety (of the defined function)
    /// The target features; `ng <= PG`; at each `a[t]` the activation blocks covering
    /// sub-blocks `0..ng` are readable; `asc` holds `T·PG` entries, filled for them.
    macro_rules! strip_dot_kernel {
        ($name:ident, $features:literal, $vnni:literal) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<K: Kind>(
                ng: usize,
                p: &Panel,
                a: [*const u8; T],
                asc: &[[f32; 4]],
            ) -> [[f32; PR]; T] {
                let spb = K::BLOCK / 32;
                let mut acc = [_mm256_setzero_ps(); T];
                debug_assert!(asc.len() >= T * PG && ng <= PG);
                for g in 0..ng.min(PG) {
                    let aoff = (g / spb) * K::A_BYTES + K::act_quants(g % spb);
                    let mut v = [_mm256_setzero_si256(); 8];
                    for (k, vk) in v.iter_mut().enumerate() {
                        // SAFETY: `p.q[g][k]` is 32 bytes, 32-aligned.
                        *vk = _mm256_load_si256(p.q[g][k].as_ptr().cast::<__m256i>());
                    }
                    let u = if K::SIGNED {
                        std::array::from_fn::<__m256i, 8, _>(|k| _mm256_sign_epi8(v[k], v[k]))
                    } else {
                        v
                    };
                    let ld = |c: usize| _mm256_load_ps(p.s[g][c].as_ptr());
                    let (d8, m8) = (ld(0), ld(1));
                    for t in 0..T {
                        // SAFETY (caller): 32 quants at `a[t] + aoff`.
                        let isum = sub_block_sums!($vnni, K, &u, &v, a[t].add(aoff));
                        let sc = &asc[t * PG + g];
                        let da = _mm256_set1_ps(sc[0]);
                        acc[t] = add_scaled!(K, acc[t], isum[0], d8, da, m8, sc[1]);
                        if K::SPLIT {
                            // The second half's scales (SPLIT kinds have a min term).
                            let (d8b, m8b) = (ld(2), ld(3));
                            acc[t] = add_scaled!(K, acc[t], isum[1], d8b, da, m8b, sc[2]);
                        }
                    }
                }
                let mut res = [[0.0f32; PR]; T];
                for (r, a) in res.iter_mut().zip(acc) {
                    // SAFETY: 8 f32 stored to an 8-f32 array.
                    _mm256_storeu_ps(r.as_mut_ptr(), a);
                }
                res
            }
        };
    }
    strip_dot_kernel!(strip_dot, "avx2,fma,f16c", false);
    strip_dot_kernel!(
        strip_dot_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        true
    );

    /// The [`super::super::TileFn`] over panels for kind `K` (see the module doc). Counts are
    /// clamped to what the slices hold; outputs outside `out` are skipped.
    pub(super) fn run<K: Kind>(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let vnni = crate::quant::avx2::vnni();
        run_any::<K, false>(cols, w, n_rows, a, n_tok, out, out_stride, vnni);
    }

    /// [`run`] over weights in the packed layout (`super::super::packed`): `w` holds whole
    /// 8-row strips; a partial strip at the end is ignored.
    pub(crate) fn run_packed<K: Kind>(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        if K::PACK_BYTES == 0 {
            return;
        }
        let vnni = crate::quant::avx2::vnni();
        run_any::<K, true>(cols, w, n_rows / PR * PR, a, n_tok, out, out_stride, vnni);
    }

    /// [`run`] (`PACKED` false) or [`run_packed`] (true); `vnni`: the CPU has AVX-512 VNNI
    /// (see [`crate::quant::avx2::vnni`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_any<K: Kind, const PACKED: bool>(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
        vnni: bool,
    ) {
        let nb = cols / K::BLOCK;
        let (w_row, a_row) = (nb * K::W_BYTES, nb * K::A_BYTES);
        debug_assert_eq!(cols % K::BLOCK, 0, "{cols} columns is not whole blocks");
        if nb == 0 || !crate::quant::avx2::available() {
            return;
        }
        let n_rows = n_rows.min(w.len() / w_row);
        let n_tok = n_tok.min(a.len() / a_row);
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => {
                let s = s.get_or_insert_with(Box::default);
                run_with::<K, PACKED>(nb, w, n_rows, a, n_tok, out, out_stride, s, vnni);
            }
            // Not reached (kernels do not nest); kept for soundness of the borrow.
            Err(_) => run_with::<K, PACKED>(
                nb,
                w,
                n_rows,
                a,
                n_tok,
                out,
                out_stride,
                &mut Box::default(),
                vnni,
            ),
        });
    }

    /// Per-thread buffers of [`run`]: the panel and the activation scales (kept between
    /// calls, so a call does not clear 47 KB of stack).
    struct Scratch {
        panel: Panel,
        asc: [[f32; 4]; PT * PG + T * PG],
    }

    impl Default for Scratch {
        fn default() -> Self {
            Scratch {
                panel: Panel::default(),
                asc: [[0.0; 4]; PT * PG + T * PG],
            }
        }
    }

    thread_local! {
        static SCRATCH: std::cell::RefCell<Option<Box<Scratch>>> =
            const { std::cell::RefCell::new(None) };
    }

    /// [`run`] with its buffers; `w` and `a` hold at least `n_rows` / `n_tok` whole rows.
    #[allow(clippy::too_many_arguments)]
    fn run_with<K: Kind, const PACKED: bool>(
        nb: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
        scratch: &mut Scratch,
        vnni: bool,
    ) {
        let (w_row, a_row) = (nb * K::W_BYTES, nb * K::A_BYTES);
        let Scratch { panel, asc } = scratch;
        let spb = K::BLOCK / 32;
        let bpc = PG / spb; // weight blocks per column chunk
        for c0 in (0..nb).step_by(bpc) {
            let nbk = bpc.min(nb - c0);
            let ng = nbk * spb;
            for tc in (0..n_tok).step_by(PT) {
                let ntc = PT.min(n_tok - tc);
                for t in 0..ntc {
                    for b in 0..nbk {
                        let ab = &a[(tc + t) * a_row + (c0 + b) * K::A_BYTES..][..K::A_BYTES];
                        let dst = &mut asc[t * PG + b * spb..][..spb];
                        // SAFETY: AVX2/FMA/F16C checked; `ab` is one whole activation block.
                        unsafe { K::act(ab.as_ptr(), dst) };
                    }
                }
                for r0 in (0..n_rows).step_by(PR) {
                    let nr = PR.min(n_rows - r0);
                    let ws = &w[r0 * w_row..(r0 + nr) * w_row];
                    if PACKED {
                        // Whole strips only (`run_packed`): `ws` is one packed strip, its
                        // strip-blocks c0..c0 + nbk lie inside it.
                        let sb = &ws[c0 * K::PACK_BYTES..(c0 + nbk) * K::PACK_BYTES];
                        // SAFETY: AVX2/FMA/F16C checked; `sb` holds nbk strip-blocks,
                        // nbk <= PG (legacy kinds: one sub-block per block).
                        unsafe { unpack_strip::<K>(nbk, sb.as_ptr(), panel) };
                    } else {
                        // SAFETY: AVX2/FMA/F16C checked; `ws` holds `nr` rows, each with
                        // blocks c0..c0 + nbk (c0 + nbk <= nb); nbk·spb <= PG.
                        unsafe {
                            decode_strip::<K>(nbk, ws[c0 * K::W_BYTES..].as_ptr(), w_row, nr, panel)
                        };
                    }
                    for t0 in (0..ntc).step_by(T) {
                        let nt = T.min(ntc - t0);
                        // Tokens past `nt` repeat the last one (their results are dropped).
                        let a_ptr: [*const u8; T] = std::array::from_fn(|i| {
                            let t = tc + t0 + i.min(nt - 1);
                            a[t * a_row + c0 * K::A_BYTES..].as_ptr()
                        });
                        // SAFETY: AVX2/FMA/F16C checked (and AVX-512 VNNI/VL when `vnni`);
                        // each token row holds blocks c0..c0 + nbk; `asc[t0·PG..]` holds T·PG entries (the buffer has
                        // T·PG spare) filled for tokens t0..t0 + nt (the rest are stale or zero,
                        // for dropped lanes only).
                        let res = unsafe {
                            if vnni {
                                strip_dot_vnni::<K>(ng, panel, a_ptr, &asc[t0 * PG..])
                            } else {
                                strip_dot::<K>(ng, panel, a_ptr, &asc[t0 * PG..])
                            }
                        };
                        for (i, lanes) in res.iter().enumerate().take(nt) {
                            let base = (tc + t0 + i) * out_stride + r0;
                            if let Some(o) = out.get_mut(base..base + nr) {
                                if c0 == 0 {
                                    o.copy_from_slice(&lanes[..nr]);
                                } else {
                                    o.iter_mut().zip(lanes).for_each(|(o, x)| *o += x);
                                }
                            } else {
                                for (r, &x) in lanes.iter().enumerate().take(nr) {
                                    if let Some(o) = out.get_mut(base + r) {
                                        *o = if c0 == 0 { x } else { *o + x };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::tests::{model_path, quantized, random_activations};
    use super::super::{dequantize_row, vec_dot_fn_scalar, vec_dot_type, GgmlType};
    use super::panel_fn;
    use crate::gguf::GgufFile;

    const SENTINEL: f32 = -12345.0;

    /// Random blocks of `ty` with sane f16 scales (K-quants: `d`/`dmin`, or Q6_K's `d`).
    fn random_weights(ty: GgmlType, n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut w = vec![0u8; ty.row_bytes(n).unwrap()];
        rng.fill(&mut w[..]);
        let offs: &[usize] = match ty {
            GgmlType::Q6_K => &[208],
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q4_1 => &[0, 2],
            _ => &[0],
        };
        for b in w.chunks_exact_mut(ty.type_size()) {
            for &o in offs {
                let v = half::f16::from_f32(rng.gen_range(-0.05f32..0.05));
                b[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        w
    }

    /// Every output against the scalar dot (tolerance relative to Σ|w·a|), padding untouched.
    fn check(
        ty: GgmlType,
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        what: &str,
    ) {
        let f = panel_fn(ty).expect("panel kernel");
        let (wb, ab) = (
            ty.row_bytes(cols).unwrap(),
            vec_dot_type(ty).row_bytes(cols).unwrap(),
        );
        let stride = n_rows + 1;
        let mut out = vec![SENTINEL; stride * n_tok];
        f(cols, w, n_rows, a, n_tok, &mut out, stride);
        let scalar = vec_dot_fn_scalar(ty).unwrap();
        let deq = |t: GgmlType, d: &[u8]| {
            let mut o = vec![0f32; cols];
            if t == GgmlType::Q8_K {
                // d (f32) then 256 i8 quants per 292-byte block.
                for (ob, db) in o.chunks_exact_mut(256).zip(d.chunks_exact(292)) {
                    let s = f32::from_le_bytes(db[..4].try_into().unwrap());
                    for (x, &q) in ob.iter_mut().zip(&db[4..260]) {
                        *x = s * f32::from(q as i8);
                    }
                }
            } else {
                dequantize_row(t, d, &mut o).unwrap();
            }
            o
        };
        let wd: Vec<Vec<f32>> = (0..n_rows).map(|r| deq(ty, &w[r * wb..][..wb])).collect();
        for t in 0..n_tok {
            let arow = &a[t * ab..][..ab];
            let ad = deq(vec_dot_type(ty), arow);
            for (r, wr) in wd.iter().enumerate() {
                let want = scalar(cols, &w[r * wb..][..wb], arow);
                let got = out[t * stride + r];
                let sum_abs: f64 = wr
                    .iter()
                    .zip(&ad)
                    .map(|(x, y)| f64::from((x * y).abs()))
                    .sum();
                let tol = 2e-4 * sum_abs + 1e-5;
                assert!(
                    f64::from((got - want).abs()) <= tol,
                    "{ty} {what} cols={cols} rows={n_rows} toks={n_tok} (r={r}, t={t}): \
                     panel {got} vs scalar {want} (tol {tol})"
                );
            }
            assert_eq!(out[t * stride + n_rows], SENTINEL, "{ty}: padding written");
        }
    }

    /// Random tensors: partial strips (rows not a multiple of 8), several column chunks (more
    /// than 1024 columns), token counts around the register tile (4) and the scale chunk (64).
    #[test]
    fn quant_panel_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(57);
        let cases: [(GgmlType, &[usize]); 7] = [
            (GgmlType::Q4_0, &[32, 640, 2080]),
            (GgmlType::Q4_1, &[96, 576, 1536]),
            (GgmlType::Q5_0, &[64, 640, 2048]),
            (GgmlType::Q8_0, &[32, 640, 1088]),
            (GgmlType::Q4_K, &[256, 1024, 2304]),
            (GgmlType::Q5_K, &[256, 1280]),
            (GgmlType::Q6_K, &[256, 2048]),
        ];
        for (ty, all_cols) in cases {
            for &cols in all_cols {
                let n_rows = 13;
                let w = random_weights(ty, cols * n_rows, &mut rng);
                for n_tok in [9, 14, 67] {
                    let a: Vec<u8> = (0..n_tok)
                        .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                        .collect();
                    check(ty, cols, &w, n_rows, &a, n_tok, "random");
                }
            }
        }
    }

    /// The AVX-512 VNNI kernels (`vpdpbusd`) give exactly the AVX2 kernels' bits, for every
    /// kind, file and packed layouts, random and extreme quants (every activation ±127, so the
    /// AVX2 path's i16 sums are at their deepest).
    #[test]
    fn quant_panel_vnni_gives_the_avx2_bits() {
        use super::x86::{run_any, Kind, KQ4_0, KQ4_1, KQ4_K, KQ5_0, KQ5_K, KQ6_K, KQ8_0};
        if !crate::quant::avx2::vnni() {
            eprintln!("this CPU has no AVX-512 VNNI: nothing to compare");
            return;
        }
        fn both<K: Kind, const PACKED: bool>(
            cols: usize,
            w: &[u8],
            rows: usize,
            a: &[u8],
            n: usize,
        ) {
            let mut x = vec![0f32; rows * n];
            let mut y = vec![0f32; rows * n];
            run_any::<K, PACKED>(cols, w, rows, a, n, &mut x, rows, false);
            run_any::<K, PACKED>(cols, w, rows, a, n, &mut y, rows, true);
            assert!(x.iter().any(|&v| v != 0.0));
            let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "cols={cols} packed={PACKED}: VNNI and AVX2 differ");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(83);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let (cols, rows, n) = (2304, 16, 13);
            let w = random_weights(ty, cols * rows, &mut rng);
            let mut packed = vec![0u8; w.len()];
            let packable = crate::quant::packed::pack(ty, cols, rows, &w, &mut packed).is_ok();
            for extreme in [false, true] {
                let a: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        let mut x = random_activations(cols, &mut rng);
                        if extreme {
                            x.iter_mut()
                                .for_each(|v| *v = if *v < 0.0 { -1.0 } else { 1.0 });
                        }
                        quantized(ty, &x)
                    })
                    .collect();
                match ty {
                    GgmlType::Q4_0 => both::<KQ4_0, false>(cols, &w, rows, &a, n),
                    GgmlType::Q4_1 => both::<KQ4_1, false>(cols, &w, rows, &a, n),
                    GgmlType::Q5_0 => both::<KQ5_0, false>(cols, &w, rows, &a, n),
                    GgmlType::Q8_0 => both::<KQ8_0, false>(cols, &w, rows, &a, n),
                    GgmlType::Q4_K => both::<KQ4_K, false>(cols, &w, rows, &a, n),
                    GgmlType::Q5_K => both::<KQ5_K, false>(cols, &w, rows, &a, n),
                    _ => both::<KQ6_K, false>(cols, &w, rows, &a, n),
                }
                if packable {
                    match ty {
                        GgmlType::Q4_0 => both::<KQ4_0, true>(cols, &packed, rows, &a, n),
                        GgmlType::Q4_1 => both::<KQ4_1, true>(cols, &packed, rows, &a, n),
                        GgmlType::Q5_0 => both::<KQ5_0, true>(cols, &packed, rows, &a, n),
                        _ => both::<KQ8_0, true>(cols, &packed, rows, &a, n),
                    }
                }
            }
        }
    }

    #[test]
    fn quant_panel_real_tensors() {
        let mut rng = ChaCha8Rng::seed_from_u64(61);
        let mut checked = Vec::new();
        for model in [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gemma-3-270m-q4_k_m.gguf",
        ] {
            let file = GgufFile::open(model_path(model)).unwrap();
            for info in file.tensors.iter().filter(|i| i.dims.len() == 2).step_by(3) {
                if panel_fn(info.ty).is_none() {
                    continue;
                }
                let (cols, rows) = (info.n_cols(), info.n_rows());
                let rb = info.ty.row_bytes(cols).unwrap();
                let n_rows = rows.min(11);
                let r0 = rng.gen_range(0..=rows - n_rows);
                let w = &file.tensor_data(info)[r0 * rb..(r0 + n_rows) * rb];
                let a: Vec<u8> = (0..10)
                    .flat_map(|_| quantized(info.ty, &random_activations(cols, &mut rng)))
                    .collect();
                check(info.ty, cols, w, n_rows, &a, 10, &info.name);
                checked.push(info.ty);
            }
        }
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            assert!(checked.contains(&ty), "no real {ty} tensor checked");
        }
    }
}
