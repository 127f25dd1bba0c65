//! AVX2 + FMA + F16C register-tiled kernels for the legacy block types (see
//! [`super::super::TileFn`]).
//!
//! One kernel, [`tile`], generic over the weight kind `K` and the tile shape `R` rows × `T`
//! tokens (R ≤ 4, T ≤ 2). Per 32-element block it
//! - decodes each of the `R` weight blocks once into a ymm of bytes usable as the *unsigned*
//!   operand of `_mm256_maddubs_epi16` (Q4_1: nibbles 0..15; Q4_0 / Q5_0: the unsigned codes
//!   0..15 / 0..31, the offset 8 / 16 being subtracted later in i16 as `maddubs(off, y)`;
//!   Q8_0: `|x|`, the sign moved onto the activation with `_mm256_sign_epi8`),
//! - computes all `R·T` scale products `d_w·d_a` (and for Q4_1 the min terms `m_w·s_a`) with one
//!   8-lane multiply: lane `r + 4t` holds the pair (r, t),
//! - dots the block against each token's activation block (`maddubs` + `madd` with ones, convert,
//!   one FMA into the pair's float accumulator).
//!
//! Horizontal sums happen once per tile, at the end.

use std::arch::x86_64::*;

use crate::quant::avx2::bytes_from_bits_32;

/// Weight kinds (const generic parameter of [`tile`]).
pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q5_0: u8 = 2;
pub(super) const Q8_0: u8 = 3;

/// Bytes of one weight block of kind `k`.
pub(super) const fn w_block(k: u8) -> usize {
    match k {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 34,
    }
}

/// Bytes of one activation block (Q8_1 for Q4_1, else Q8_0).
pub(super) const fn a_block(k: u8) -> usize {
    if k == Q4_1 {
        36
    } else {
        34
    }
}

/// Offset of the quants in an activation block.
const fn a_quants(k: u8) -> usize {
    if k == Q4_1 {
        4
    } else {
        2
    }
}

/// 16 bytes of nibbles at `p` as 32 bytes 0..15: low nibbles in the low lane (elements 0..16),
/// high nibbles in the high lane.
///
/// # Safety
/// AVX2; `p` points to at least 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY (caller): 16 readable bytes at `p`; unaligned load.
    let tmp = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast::<__m128i>()));
    // One variable shift (high lane by 4) instead of a shift and a lane insert.
    let bytes = _mm256_srlv_epi64(tmp, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// The weight block at `p` as the unsigned operand of `maddubs` (see the module doc).
///
/// # Safety
/// AVX2; `p` points to one whole weight block of kind `K`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode<const K: u8>(p: *const u8) -> __m256i {
    match K {
        Q4_0 => nibbles(p.add(2)),
        Q4_1 => nibbles(p.add(4)),
        Q5_0 => {
            let qh = std::ptr::read_unaligned(p.add(2).cast::<u32>());
            let hi = _mm256_and_si256(bytes_from_bits_32(u32::from_le(qh)), _mm256_set1_epi8(16));
            _mm256_or_si256(nibbles(p.add(6)), hi)
        }
        _ => {
            let x = _mm256_loadu_si256(p.add(2).cast::<__m256i>());
            _mm256_sign_epi8(x, x)
        }
    }
}

/// Sum of the 8 lanes.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(x: __m256) -> f32 {
    let mut r = _mm256_extractf128_ps::<1>(x);
    r = _mm_add_ps(r, _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// `res[r][t] = dot(w_r, a_t)` over `nb` blocks for `R` weight rows starting at `w` (rows
/// `w_row` bytes apart) and `T` activation rows starting at `a` (`a_row` bytes apart).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `1 <= R <= 4`, `1 <= T <= 2`; for every `r < R` the
/// bytes `w + r·w_row .. + nb·w_block(K)` and for every `t < T` the bytes
/// `a + t·a_row .. + nb·a_block(K)` are readable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const K: u8, const R: usize, const T: usize>(
    nb: usize,
    w: *const u8,
    w_row: usize,
    a: *const u8,
    a_row: usize,
) -> [[f32; T]; R] {
    debug_assert!((1..=4).contains(&R) && (1..=2).contains(&T));
    let wb = w_block(K);
    let ab = a_block(K);
    let aq = a_quants(K);
    let ones = _mm256_set1_epi16(1);
    let off = _mm256_set1_epi8(if K == Q4_0 { 8 } else { 16 });
    // Weight scales: the first 4 bytes of each block as 2 f16 ([d, m] for Q4_1, [d, junk]
    // otherwise) -> lanes [d0 m0 d1 m1 d2 m2 d3 m3]. Activations likewise: [d_t s_t] (junk s
    // for Q8_0) -> lanes [d0 s0 d1 s1 ..].
    let w_d = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    let w_m = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
    let (a_d, a_s) = if T == 2 {
        (
            _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2),
            _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3),
        )
    } else {
        (_mm256_set1_epi32(0), _mm256_set1_epi32(1))
    };
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut macc = _mm256_setzero_ps();
    let mut dd = [0.0f32; 8];
    for b in 0..nb {
        let mut ws = [0i32; 4];
        let mut wq = [_mm256_setzero_si256(); R];
        for r in 0..R {
            // SAFETY (caller): block b of row r is readable; blocks are >= 18 bytes.
            let p = w.add(r * w_row + b * wb);
            ws[r] = std::ptr::read_unaligned(p.cast::<i32>());
            wq[r] = decode::<K>(p);
        }
        let mut at = [0i32; 2];
        for (t, s) in at.iter_mut().enumerate().take(T) {
            // SAFETY (caller): block b of token t is readable.
            *s = std::ptr::read_unaligned(a.add(t * a_row + b * ab).cast::<i32>());
        }
        let wv = _mm256_cvtph_ps(_mm_setr_epi32(ws[0], ws[1], ws[2], ws[3]));
        let av = _mm256_cvtph_ps(_mm_setr_epi32(at[0], at[1], 0, 0));
        let prod = _mm256_mul_ps(
            _mm256_permutevar8x32_ps(wv, w_d),
            _mm256_permutevar8x32_ps(av, a_d),
        );
        if K == Q4_1 {
            macc = _mm256_fmadd_ps(
                _mm256_permutevar8x32_ps(wv, w_m),
                _mm256_permutevar8x32_ps(av, a_s),
                macc,
            );
        }
        _mm256_storeu_ps(dd.as_mut_ptr(), prod);
        for t in 0..T {
            // SAFETY (caller): block b of token t is readable; its quants are 32 bytes at `aq`.
            let pa = a.add(t * a_row + b * ab + aq);
            let y = _mm256_loadu_si256(pa.cast::<__m256i>());
            let corr = _mm256_maddubs_epi16(off, y);
            for r in 0..R {
                let p16 = match K {
                    Q4_1 => _mm256_maddubs_epi16(wq[r], y),
                    Q4_0 | Q5_0 => _mm256_sub_epi16(_mm256_maddubs_epi16(wq[r], y), corr),
                    _ => {
                        // SAFETY (caller): block b of row r is readable; quants at offset 2.
                        let pw = w.add(r * w_row + b * wb + 2);
                        let x = _mm256_loadu_si256(pw.cast::<__m256i>());
                        _mm256_maddubs_epi16(wq[r], _mm256_sign_epi8(y, x))
                    }
                };
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                let s = _mm256_broadcast_ss(&dd[r + 4 * t]);
                acc[r][t] = _mm256_fmadd_ps(f, s, acc[r][t]);
            }
        }
    }
    let mut mins = [0.0f32; 8];
    _mm256_storeu_ps(mins.as_mut_ptr(), macc);
    let mut res = [[0.0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            res[r][t] = hsum(acc[r][t]) + mins[r + 4 * t];
        }
    }
    res
}

/// Most blocks of a pre-decoded Q4_1 panel chunk (768 columns; the per-strip buffers stay in L1).
pub(super) const NBC: usize = 24;
/// Most tokens whose activation scales are pre-converted at once.
pub(super) const TOKC: usize = 32;

/// A pre-decoded Q4_1 strip of 4 rows × up to [`NBC`] blocks: `q[b][r]` the 32 nibbles of
/// block `b` of row `r` as bytes 0..15 (layout of [`nibbles`]), `s[b]` = `[d0 d1 d2 d3 m0 m1 m2
/// m3]` as f32. Rows past the strip's end are zero.
#[repr(C, align(32))]
pub(super) struct Panel {
    q: [[[u8; 32]; 4]; NBC],
    s: [[f32; 8]; NBC],
}

impl Default for Panel {
    fn default() -> Self {
        Self {
            q: [[[0; 32]; 4]; NBC],
            s: [[0.0; 8]; NBC],
        }
    }
}

/// Decodes blocks `0..nbc` of the `nr` Q4_1 rows at `w` (`w_row` bytes apart) into `p`, zeroing
/// rows `nr..4`.
///
/// # Safety
/// AVX2/FMA/F16C; `nbc <= NBC`, `nr <= 4`; for every `r < nr` the bytes
/// `w + r·w_row .. + nbc·20` are readable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn decode_panel_q4_1(
    nbc: usize,
    w: *const u8,
    w_row: usize,
    nr: usize,
    p: &mut Panel,
) {
    debug_assert!(nbc <= NBC && nr <= 4);
    for b in 0..nbc.min(NBC) {
        let mut dm = [0i32; 4];
        for (r, h) in dm.iter_mut().enumerate() {
            let q = if r < nr {
                // SAFETY (caller): block b of row r (20 bytes) is readable.
                let blk = w.add(r * w_row + b * 20);
                *h = std::ptr::read_unaligned(blk.cast::<i32>());
                nibbles(blk.add(4))
            } else {
                _mm256_setzero_si256()
            };
            // SAFETY: `p.q[b][r]` is 32 bytes, 32-aligned (repr align(32), offsets of 32).
            _mm256_store_si256(p.q[b][r].as_mut_ptr().cast::<__m256i>(), q);
        }
        // [d0 m0 d1 m1 d2 m2 d3 m3] -> [d0 d1 d2 d3 m0 m1 m2 m3].
        let v = _mm256_cvtph_ps(_mm_setr_epi32(dm[0], dm[1], dm[2], dm[3]));
        let v = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
        // SAFETY: `p.s[b]` is 8 f32.
        _mm256_storeu_ps(p.s[b].as_mut_ptr(), v);
    }
}

/// Converts the Q8_1 block headers `[d, s]` (f16) of blocks `0..nbc` of `nt` tokens at `a`
/// (`a_row` bytes apart) to f32 into `asc[b·TOKC + t]`.
///
/// # Safety
/// AVX2/FMA/F16C; `nbc <= NBC`, `nt <= TOKC`; for every `t < nt` the bytes
/// `a + t·a_row .. + nbc·36` are readable; `asc` holds `NBC·TOKC` entries.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn act_scales_q8_1(
    nbc: usize,
    nt: usize,
    a: *const u8,
    a_row: usize,
    asc: &mut [[f32; 2]],
) {
    debug_assert!(nbc <= NBC && nt <= TOKC && asc.len() >= NBC * TOKC);
    for t in 0..nt.min(TOKC) {
        for b in 0..nbc.min(NBC) {
            // SAFETY (caller): block b of token t is readable; its first 4 bytes are [d, s].
            let h = std::ptr::read_unaligned(a.add(t * a_row + b * 36).cast::<i32>());
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(h));
            if let Some(e) = asc.get_mut(b * TOKC + t) {
                // SAFETY: `e` is 2 f32 (8 bytes), unaligned store of the low half.
                _mm_storel_epi64(e.as_mut_ptr().cast::<__m128i>(), _mm_castps_si128(v));
            }
        }
    }
}

/// `res[r][t] = dot(panel row r, a_t)` over blocks `0..nbc` for the 4 rows of `p` and `T`
/// tokens at `a` (`a_row` bytes apart), whose converted scales are `asc[b·TOKC + t0 + t]`.
///
/// Both tokens share one accumulator per row: the i16 products of token 0 are folded into the
/// low lane and those of token 1 into the high lane (`vperm2i128` + add; Q4_1 products stay far
/// below i16 saturation), so each (row, block) takes one `madd`, one convert and one FMA with the
/// scale vector `[d_r·d_t0 ×4 | d_r·d_t1 ×4]` for both tokens.
///
/// # Safety
/// AVX2/FMA/F16C; `1 <= T <= 2`, `nbc <= NBC`, `t0 + T <= TOKC`; `p` holds blocks `0..nbc`
/// (see [`decode_panel_q4_1`]); for every `t < T` the bytes `a + t·a_row .. + nbc·36` are
/// readable; `asc` was filled for blocks `0..nbc` of tokens `t0..t0 + T`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn panel_q4_1<const T: usize>(
    nbc: usize,
    p: &Panel,
    a: *const u8,
    a_row: usize,
    asc: &[[f32; 2]; NBC * TOKC + 1],
    t0: usize,
) -> [[f32; T]; 4] {
    debug_assert!((1..=2).contains(&T) && nbc <= NBC && t0 + T <= TOKC);
    let ones = _mm256_set1_epi16(1);
    let a_d = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    let a_s = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut macc = _mm256_setzero_ps();
    let a1 = if T == 2 { a_row } else { 0 };
    for (b, (q, s)) in p.q.iter().zip(&p.s).enumerate().take(nbc.min(NBC)) {
        // SAFETY: b < NBC and t0 < TOKC, so entries b·TOKC + t0 and the next one (4 f32) are
        // within the NBC·TOKC + 1 entries of `asc`; `s` is 8 f32 ([d0..d3] then [m0..m3]).
        let av = _mm256_broadcast_ps(&*asc.as_ptr().add(b * TOKC + t0).cast::<__m128>());
        let wd = _mm256_broadcast_ps(&*s.as_ptr().cast::<__m128>());
        let wm = _mm256_broadcast_ps(&*s.as_ptr().add(4).cast::<__m128>());
        let (mut ad, mut as_) = (
            _mm256_permutevar8x32_ps(av, a_d),
            _mm256_permutevar8x32_ps(av, a_s),
        );
        if T == 1 {
            // The high lane repeats token 0; its scales are zeroed.
            ad = _mm256_blend_ps::<0xF0>(ad, _mm256_setzero_ps());
            as_ = _mm256_blend_ps::<0xF0>(as_, _mm256_setzero_ps());
        }
        let prod = _mm256_mul_ps(wd, ad);
        macc = _mm256_fmadd_ps(wm, as_, macc);
        // SAFETY (caller): block b of tokens 0 and (T == 2) 1 is readable; quants at 4.
        let y0 = _mm256_loadu_si256(a.add(b * 36 + 4).cast::<__m256i>());
        let y1 = _mm256_loadu_si256(a.add(a1 + b * 36 + 4).cast::<__m256i>());
        macro_rules! row {
            ($r:literal, $imm:literal) => {{
                // SAFETY: `q[$r]` is 32 bytes, 32-aligned.
                let wq = _mm256_load_si256(q[$r].as_ptr().cast::<__m256i>());
                let p0 = _mm256_maddubs_epi16(wq, y0);
                let p1 = _mm256_maddubs_epi16(wq, y1);
                let lo = _mm256_permute2x128_si256::<0x20>(p0, p1);
                let hi = _mm256_permute2x128_si256::<0x31>(p0, p1);
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones));
                let sc = _mm256_shuffle_ps::<$imm>(prod, prod);
                acc[$r] = _mm256_fmadd_ps(f, sc, acc[$r]);
            }};
        }
        row!(0, 0x00);
        row!(1, 0x55);
        row!(2, 0xAA);
        row!(3, 0xFF);
    }
    let mut sums = [[0.0f32; 8]; 4];
    for (dst, v) in sums.iter_mut().zip(acc) {
        _mm256_storeu_ps(dst.as_mut_ptr(), v);
    }
    let mut mins = [0.0f32; 8];
    _mm256_storeu_ps(mins.as_mut_ptr(), macc);
    let mut res = [[0.0f32; T]; 4];
    for r in 0..4 {
        for t in 0..T {
            let h = &sums[r][4 * t..4 * t + 4];
            res[r][t] = (h[0] + h[1]) + (h[2] + h[3]) + mins[r + 4 * t];
        }
    }
    res
}
