//! AVX2 + FMA + F16C streaming kernels for the legacy block types with few tokens (decode
//! GEMV, batched decode): see [`rows`].
//!
//! Why: with one token the weights are read once and used once, so a product is as fast as the
//! weight stream. The register tiles of `gemm_legacy_avx2` walk 4 rows at once (4 streams a
//! row apart, which the hardware prefetchers follow badly) and spend most of their
//! instructions on per-block scale shuffles. Here each weight row is read front to back, two
//! blocks per step, with a software prefetch ahead of the stream, against activations that were
//! re-laid once per call ([`Acts`]) so that the two blocks' halves line up with one nibble
//! unpack:
//! - 4-bit kinds: the 16 quant bytes of blocks `2p` and `2p + 1` are loaded as one ymm `[b0 |
//!   b1]`; its low nibbles are elements 0..16 of both blocks and its high nibbles elements
//!   16..32, matching the activation vectors `[a0[0..16] | a1[0..16]]` and `[a0[16..32] |
//!   a1[16..32]]`. Two `maddubs` (summed in i16: 4-bit × 8-bit pairs stay far below
//!   saturation), one `madd`, one convert and one FMA per token cover both blocks.
//! - Q8_0: the two blocks are two ymm; their `madd` results are folded with one `hadd`.
//! - Scales: the two blocks' f16 headers are converted together (`[d0 m0 d1 m1]`, or `[d0 d0 d1
//!   d1]`) and multiplied by the activation's `[d0 c0 d1 c1]`: lanes 0 and 2 are the scales
//!   of the integer sums, lanes 1 and 3 the offset terms (Q4_1: `m·s`; Q4_0 / Q5_0: `d_w ·
//!   (-8 or -16)·d_a·Σa`, the weights' offset folded into a per-block activation constant), which
//!   are summed apart and added at the end.

use std::arch::x86_64::*;

use super::kernels::{Q4_0, Q4_1, Q5_0, Q8_0};
use crate::quant::avx2::bytes_from_bits_32;

/// Most blocks per activation chunk (2048 columns): longer rows are done in chunks, each
/// accumulated into the outputs.
pub(super) const CHUNK_BLOCKS: usize = 64;
/// Most tokens per [`rows`] call.
pub(super) const MAX_T: usize = 4;
/// Bytes ahead of the weight stream that are prefetched.
const PREFETCH: usize = 768;

/// One token's activation blocks `0..nbc` (`nbc <= CHUNK_BLOCKS`) of a chunk, re-laid.
#[repr(C, align(32))]
pub(super) struct Acts {
    /// Per block pair `p`: 4-bit kinds `[a0[0..16] a1[0..16] a0[16..32] a1[16..32]]`, Q8_0
    /// `[a0 a1]` (a0, a1: the quants of blocks `2p`, `2p + 1`; zero past the chunk's end).
    q: [[u8; 64]; CHUNK_BLOCKS / 2],
    /// Per pair: `[d0 c0 d1 c1]`: block scales and offset constants (see the module doc);
    /// Q8_0: `[d0 d1 0 0]`.
    s: [[f32; 4]; CHUNK_BLOCKS / 2],
}

impl Default for Acts {
    fn default() -> Self {
        Acts {
            q: [[0; 64]; CHUNK_BLOCKS / 2],
            s: [[0.0; 4]; CHUNK_BLOCKS / 2],
        }
    }
}

use crate::quant::avx2::hsum_f32_8 as hsum;

/// The f16 at `p` as f32.
///
/// # Safety
/// F16C; 2 readable bytes at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = std::ptr::read_unaligned(p.cast::<u16>());
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le(h)))))
}

/// Re-lays blocks `0..nbc` of one activation row at `a` (Q8_1 blocks for Q4_1, else Q8_0) into
/// `acts`, zeroing the rest of its last pair.
///
/// # Safety
/// AVX2/FMA/F16C; `nbc <= CHUNK_BLOCKS`; the bytes `a .. a + nbc·a_block(K)` are readable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn arrange<const K: u8>(nbc: usize, a: *const u8, acts: &mut Acts) {
    debug_assert!(nbc <= CHUNK_BLOCKS);
    let (ab, aq) = if K == Q4_1 { (36, 4) } else { (34, 2) };
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    let nbc = nbc.min(CHUNK_BLOCKS);
    for b in 0..nbc.next_multiple_of(2) {
        let (p, h) = (b / 2, b % 2);
        let (y, d, c) = if b < nbc {
            // SAFETY (caller): block b (ab bytes) is readable; quants are 32 bytes at aq.
            let blk = a.add(b * ab);
            let y = _mm256_loadu_si256(blk.add(aq).cast::<__m256i>());
            let d = f16_at(blk);
            let c = match K {
                Q4_1 => f16_at(blk.add(2)),
                Q8_0 => 0.0,
                _ => {
                    // Σ of the 32 signed quants, exactly (|Σ| <= 32·127).
                    let s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, y), ones16);
                    let s =
                        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
                    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b1011_0001>(s));
                    let off = if K == Q4_0 { -8.0 } else { -16.0 };
                    off * d * _mm_cvtsi128_si32(s) as f32
                }
            };
            (y, d, c)
        } else {
            (_mm256_setzero_si256(), 0.0, 0.0)
        };
        let q = acts.q[p].as_mut_ptr();
        if K == Q8_0 {
            // SAFETY: 32 bytes at offset 32h of the 64-byte pair.
            _mm256_storeu_si256(q.add(32 * h).cast::<__m256i>(), y);
            acts.s[p][h] = d;
            acts.s[p][2 + h] = 0.0;
        } else {
            // SAFETY: 16 bytes at 16h and at 32 + 16h of the 64-byte pair.
            _mm_storeu_si128(q.add(16 * h).cast::<__m128i>(), _mm256_castsi256_si128(y));
            _mm_storeu_si128(
                q.add(32 + 16 * h).cast::<__m128i>(),
                _mm256_extracti128_si256::<1>(y),
            );
            acts.s[p][2 * h] = d;
            acts.s[p][2 * h + 1] = c;
        }
    }
}

/// Bytes of one weight block of kind `k`.
const fn w_block(k: u8) -> usize {
    match k {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 34,
    }
}

/// The two blocks at `b0` (and `b0 + w_block(K)` unless `TAIL`) as `(lo, hi, scales)`: 4-bit
/// kinds: `lo`/`hi` the unsigned quants of elements 0..16 / 16..32 of both blocks, Q8_0: the
/// two blocks' quants; `scales` the converted headers (see the module doc).
///
/// # Safety
/// AVX2/FMA/F16C; the block at `b0` and (unless `TAIL`) the next one are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_pair<const K: u8, const TAIL: bool>(b0: *const u8) -> (__m256i, __m256i, __m128) {
    let wb = w_block(K);
    let b1 = b0.wrapping_add(wb);
    let m4 = _mm256_set1_epi8(0x0F);
    if K == Q8_0 {
        // SAFETY (caller): quants at 2..34 of each block.
        let x0 = _mm256_loadu_si256(b0.add(2).cast::<__m256i>());
        let x1 = if TAIL {
            _mm256_setzero_si256()
        } else {
            _mm256_loadu_si256(b1.add(2).cast::<__m256i>())
        };
        let d0 = u32::from(u16::from_le(std::ptr::read_unaligned(b0.cast::<u16>())));
        let d1 = if TAIL {
            0
        } else {
            u32::from(u16::from_le(std::ptr::read_unaligned(b1.cast::<u16>())))
        };
        let sc = _mm_cvtph_ps(_mm_cvtsi32_si128((d0 | (d1 << 16)) as i32));
        return (x0, x1, sc);
    }
    let qoff = match K {
        Q4_0 => 2,
        Q4_1 => 4,
        _ => 6,
    };
    // SAFETY (caller): 16 quant bytes at `qoff` of each block.
    let q0 = _mm_loadu_si128(b0.add(qoff).cast::<__m128i>());
    let q = if TAIL {
        _mm256_zextsi128_si256(q0)
    } else {
        let q1 = _mm_loadu_si128(b1.add(qoff).cast::<__m128i>());
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q0), q1)
    };
    let mut lo = _mm256_and_si256(q, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
    let h0 = header::<K>(b0);
    let h1 = if TAIL { 0 } else { header::<K>(b1) };
    if K == Q5_0 {
        // SAFETY (caller): qh is the u32 at 2..6 of each block.
        let qh0 = u32::from_le(std::ptr::read_unaligned(b0.add(2).cast::<u32>()));
        let qh1 = if TAIL {
            0
        } else {
            u32::from_le(std::ptr::read_unaligned(b1.add(2).cast::<u32>()))
        };
        let m16 = _mm256_set1_epi8(16);
        let lo_bits = (qh0 & 0xFFFF) | (qh1 << 16);
        let hi_bits = (qh0 >> 16) | (qh1 & 0xFFFF_0000);
        lo = _mm256_or_si256(lo, _mm256_and_si256(bytes_from_bits_32(lo_bits), m16));
        hi = _mm256_or_si256(hi, _mm256_and_si256(bytes_from_bits_32(hi_bits), m16));
    }
    let hv = _mm_cvtsi64_si128((u64::from(h0) | (u64::from(h1) << 32)) as i64);
    (lo, hi, _mm_cvtph_ps(hv))
}

/// The f16 scales of the block at `p` as two f16 in a u32: Q4_1 `[d m]`, else `[d d]`.
///
/// # Safety
/// 4 readable bytes at `p`.
#[inline(always)]
unsafe fn header<const K: u8>(p: *const u8) -> u32 {
    let v = u32::from_le(std::ptr::read_unaligned(p.cast::<u32>()));
    if K == Q4_1 {
        v
    } else {
        (v & 0xFFFF) * 0x1_0001
    }
}

/// Adds pair `p` of `T` tokens' activations times the decoded pair into the accumulators.
///
/// # Safety
/// AVX2/FMA/F16C; `p < CHUNK_BLOCKS / 2`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_pair<const K: u8, const T: usize>(
    (lo, hi, ws): (__m256i, __m256i, __m128),
    acts: &[Acts; T],
    p: usize,
    acc: &mut [__m256; T],
    macc: &mut [__m128; T],
) {
    let ones = _mm256_set1_epi16(1);
    // Q8_0: |w| as the unsigned operand, the sign moved onto the activations.
    let (ulo, uhi) = if K == Q8_0 {
        (_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(hi, hi))
    } else {
        (lo, hi)
    };
    for t in 0..T {
        let a = &acts[t];
        let q = a.q[p].as_ptr();
        // SAFETY: `a.q[p]` is 64 bytes, 32-aligned (repr align(32), 64-byte entries).
        let (y0, y1) = (
            _mm256_load_si256(q.cast::<__m256i>()),
            _mm256_load_si256(q.add(32).cast::<__m256i>()),
        );
        // SAFETY: `a.s[p]` is 4 f32, 16-aligned (16-byte entries after the 32-aligned `q`).
        let prod = _mm_mul_ps(ws, _mm_load_ps(a.s[p].as_ptr()));
        if K == Q8_0 {
            let p0 = _mm256_maddubs_epi16(ulo, _mm256_sign_epi8(y0, lo));
            let p1 = _mm256_maddubs_epi16(uhi, _mm256_sign_epi8(y1, hi));
            let (p0, p1) = (_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
            let f = _mm256_cvtepi32_ps(_mm256_hadd_epi32(p0, p1));
            let sc = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(prod),
                _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1),
            );
            acc[t] = _mm256_fmadd_ps(f, sc, acc[t]);
        } else {
            let s16 =
                _mm256_add_epi16(_mm256_maddubs_epi16(ulo, y0), _mm256_maddubs_epi16(uhi, y1));
            let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            let sc = _mm256_permutevar8x32_ps(
                _mm256_castps128_ps256(prod),
                _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
            );
            acc[t] = _mm256_fmadd_ps(f, sc, acc[t]);
            macc[t] = _mm_add_ps(macc[t], prod);
        }
    }
}

/// `out[t·out_stride + r] (+)= dot(w_r, a_t)` over the `nbc` blocks of this chunk, for the
/// `n_rows` rows at `w` (`w_row` bytes apart, block 0 of the chunk at `w`) and the `T` tokens
/// re-laid in `acts`; `add` says whether to add to `out` (chunks after the first). Outputs
/// outside `out` are skipped.
///
/// # Safety
/// AVX2/FMA/F16C; `1 <= T <= MAX_T`, `nbc <= CHUNK_BLOCKS`; for every `r < n_rows` the bytes
/// `w + r·w_row .. + nbc·w_block(K)` are readable; `acts` were filled by [`arrange`] with at
/// least `nbc` blocks.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows<const K: u8, const T: usize>(
    nbc: usize,
    w: *const u8,
    w_row: usize,
    n_rows: usize,
    acts: &[Acts; T],
    out: &mut [f32],
    out_stride: usize,
    add: bool,
) {
    debug_assert!((1..=MAX_T).contains(&T) && nbc <= CHUNK_BLOCKS);
    let wb = w_block(K);
    let nbc = nbc.min(CHUNK_BLOCKS);
    let np = nbc / 2;
    for r in 0..n_rows {
        let row = w.add(r * w_row);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut macc = [_mm_setzero_ps(); T];
        for p in 0..np {
            let b0 = row.add(2 * p * wb);
            // A hint only: the address may lie past the weights (hence `wrapping_add`).
            _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(PREFETCH).cast::<i8>());
            // SAFETY (caller): blocks 2p and 2p + 1 < nbc of row r are readable.
            let pair = load_pair::<K, false>(b0);
            dot_pair::<K, T>(pair, acts, p, &mut acc, &mut macc);
        }
        if nbc % 2 == 1 {
            // SAFETY (caller): block nbc - 1 = 2·np of row r is readable.
            let pair = load_pair::<K, true>(row.add(2 * np * wb));
            dot_pair::<K, T>(pair, acts, np, &mut acc, &mut macc);
        }
        for t in 0..T {
            let m = macc[t];
            // Offset terms are in lanes 1 and 3 (zero for Q8_0).
            let off = _mm_cvtss_f32(_mm_add_ss(
                _mm_movehdup_ps(m),
                _mm_movehl_ps(m, _mm_movehdup_ps(m)),
            ));
            let v = hsum(acc[t]) + off;
            if let Some(o) = out.get_mut(t * out_stride + r) {
                *o = if add { *o + v } else { v };
            }
        }
    }
}
