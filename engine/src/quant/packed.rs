//! Weights repacked at load into 8-row strips whose blocks are already in the register layout
//! of the panel kernels (`panel.rs`), for Q4_0, Q4_1, Q5_0 and Q8_0.
//!
//! Why: with a few tokens per product (batched decode) the panel and streaming kernels spend a
//! large share of their instructions re-arranging weight blocks (the panel kernel transposes 8
//! rows × 32 elements per block with about 150 instructions, for as few as 8 tokens). Packed
//! once at load, a strip-block unpacks into the 8 panel vectors with 4 loads and 8 masks (4-bit
//! kinds) or 8 plain loads (Q8_0), so batched decode, single-token decode and prefill all read
//! the same copy. The packed copy has exactly the size of the original tensor, whose pages are
//! then released (see `Model`), so resident memory does not grow.
//!
//! # Layout
//!
//! Rows are grouped in strips of 8 (a packed matrix has a multiple of 8 rows); a strip is
//! `8 · row_bytes` bytes, so row ranges on multiples of 8 are the same byte ranges as in the
//! original tensor. A strip holds its blocks in column order; block `b` of a strip (a
//! *strip-block*, `8 · type_size` bytes) is, for rows `r = 0..8`:
//!
//! | type | bytes |
//! |---|---|
//! | Q4_0 | `d[r]` f16 ×8 (16), quants (128) |
//! | Q4_1 | `d[r]` ×8 (16), `m[r]` ×8 (16), quants (128) |
//! | Q5_0 | `d[r]` ×8 (16), high bits (32), quants (128) |
//! | Q8_0 | `d[r]` ×8 (16), quants (256) |
//!
//! Quants are the original quant bytes cut into 4-byte groups and interleaved by row: packed
//! vector `i` (32 bytes) holds group `i` of rows 0..8 (bytes `4r..4r+4` from row `r`). For
//! Q8_0 vector `k` is then exactly panel vector `k` (elements `4k..4k+4` of the 8 rows). For
//! the 4-bit kinds a quant byte holds element `e` in its low nibble and `e + 16` in its high
//! nibble, so the low nibbles of packed vector `i` are panel vector `i` and its high nibbles
//! panel vector `i + 4`. Q5_0's high-bit plane: byte `4r + j`, bit `k` = the fifth bit of
//! element `4k + j` of row `r`.

use super::{GgmlType, QuantError};

/// Rows per strip.
pub const STRIP: usize = 8;

/// Whether weights of type `ty` can be packed and multiplied in the packed layout on this CPU.
pub fn packable(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0
        ) && super::avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// `(offset of the quant bytes in an original block, quant bytes per block, offset of the
/// packed quant vectors in a strip-block)`.
fn quant_layout(ty: GgmlType) -> Option<(usize, usize, usize)> {
    Some(match ty {
        GgmlType::Q4_0 => (2, 16, 16),
        GgmlType::Q4_1 => (4, 16, 32),
        GgmlType::Q5_0 => (6, 16, 48),
        GgmlType::Q8_0 => (2, 32, 16),
        _ => return None,
    })
}

/// Checks a packing request: a packable type, whole blocks, whole strips, exact lengths.
/// Returns `(blocks per row, bytes per row)`.
fn check(ty: GgmlType, cols: usize, rows: usize, len: usize) -> Result<(usize, usize), QuantError> {
    if quant_layout(ty).is_none() {
        return Err(QuantError::Unsupported(ty));
    }
    let rb = ty.row_bytes(cols).ok_or(QuantError::PartialBlock {
        ty,
        n: cols,
        block: ty.block_size(),
    })?;
    if !rows.is_multiple_of(STRIP) || len != rows * rb {
        return Err(QuantError::BadLength {
            ty,
            n: rows * cols,
            expected: rows / STRIP * STRIP * rb,
            got: len,
        });
    }
    Ok((cols / ty.block_size(), rb))
}

/// Packs `rows` rows (a multiple of 8) of `cols` elements from the original layout `src` into
/// `dst` (the same length).
pub fn pack(
    ty: GgmlType,
    cols: usize,
    rows: usize,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), QuantError> {
    let (nb, rb) = check(ty, cols, rows, src.len())?;
    check(ty, cols, rows, dst.len())?;
    let ts = ty.type_size();
    let sb = STRIP * ts;
    let Some((oq, nq, pq)) = quant_layout(ty) else {
        return Err(QuantError::Unsupported(ty));
    };
    for (s_src, s_dst) in src
        .chunks_exact(STRIP * rb)
        .zip(dst.chunks_exact_mut(STRIP * rb))
    {
        for (b, out) in s_dst.chunks_exact_mut(sb).enumerate().take(nb) {
            for r in 0..STRIP {
                let blk = &s_src[r * rb + b * ts..][..ts];
                out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                if ty == GgmlType::Q4_1 {
                    out[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                }
                if ty == GgmlType::Q5_0 {
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    for j in 0..4 {
                        out[16 + 4 * r + j] = (0..8)
                            .fold(0u8, |acc, k| acc | ((((qh >> (4 * k + j)) & 1) as u8) << k));
                    }
                }
                for i in 0..nq / 4 {
                    out[pq + 32 * i + 4 * r..][..4].copy_from_slice(&blk[oq + 4 * i..][..4]);
                }
            }
        }
    }
    Ok(())
}

/// A packed copy of a matrix (64-byte aligned, so strip-blocks never straddle more cache lines
/// than their size needs).
pub struct PackedBuf {
    buf: Vec<[u8; 64]>,
    len: usize,
}

impl PackedBuf {
    /// Packs `rows` (a multiple of 8) rows of `cols` elements of `ty` from `src`, in pieces of
    /// about 1 MiB; after each piece `done(range)` gets the byte range of `src` just packed
    /// (so the caller can release it: the peak footprint is then the packed copy plus one
    /// piece).
    pub fn new(
        ty: GgmlType,
        cols: usize,
        rows: usize,
        src: &[u8],
        done: &mut dyn FnMut(std::ops::Range<usize>),
    ) -> Result<Self, QuantError> {
        let (_, rb) = check(ty, cols, rows, src.len())?;
        let len = src.len();
        let mut buf = vec![[0u8; 64]; len.div_ceil(64)];
        let dst = &mut buf.as_flattened_mut()[..len];
        let piece_rows = ((1 << 20) / (STRIP * rb)).max(1) * STRIP;
        for r0 in (0..rows).step_by(piece_rows) {
            let nr = piece_rows.min(rows - r0);
            let range = r0 * rb..(r0 + nr) * rb;
            pack(ty, cols, nr, &src[range.clone()], &mut dst[range.clone()])?;
            done(range);
        }
        Ok(PackedBuf { buf, len })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_flattened()[..self.len]
    }
}

impl std::fmt::Debug for PackedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBuf").field("len", &self.len).finish()
    }
}

/// Writes row `row` of the packed strips `packed` (of `cols` elements) back in the original
/// block layout into `dst` (`row_bytes(cols)` bytes).
pub fn unpack_row(
    ty: GgmlType,
    cols: usize,
    packed: &[u8],
    row: usize,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    let rows = packed.len() / ty.row_bytes(cols).unwrap_or(usize::MAX).max(1);
    let (nb, rb) = check(ty, cols, rows / STRIP * STRIP, packed.len())?;
    if row >= rows || dst.len() != rb {
        return Err(QuantError::BadLength {
            ty,
            n: cols,
            expected: rb,
            got: dst.len(),
        });
    }
    for b in 0..nb {
        unpack_block(
            ty,
            packed,
            rb,
            row,
            b,
            &mut dst[b * ty.type_size()..][..ty.type_size()],
        );
    }
    Ok(())
}

/// Block `b` of row `row` in the original layout (`dst`: one block). The caller has checked
/// the type and that the block lies inside `packed`.
fn unpack_block(ty: GgmlType, packed: &[u8], rb: usize, row: usize, b: usize, dst: &mut [u8]) {
    let Some((oq, nq, pq)) = quant_layout(ty) else {
        return;
    };
    let ts = ty.type_size();
    let (s, r) = (row / STRIP, row % STRIP);
    let sbk = &packed[s * STRIP * rb + b * STRIP * ts..][..STRIP * ts];
    dst[..2].copy_from_slice(&sbk[2 * r..2 * r + 2]);
    if ty == GgmlType::Q4_1 {
        dst[2..4].copy_from_slice(&sbk[16 + 2 * r..16 + 2 * r + 2]);
    }
    if ty == GgmlType::Q5_0 {
        let mut qh = 0u32;
        for j in 0..4 {
            let byte = sbk[16 + 4 * r + j];
            for k in 0..8 {
                qh |= u32::from((byte >> k) & 1) << (4 * k + j);
            }
        }
        dst[2..6].copy_from_slice(&qh.to_le_bytes());
    }
    for i in 0..nq / 4 {
        dst[oq + 4 * i..][..4].copy_from_slice(&sbk[pq + 32 * i + 4 * r..][..4]);
    }
}

/// Dequantizes row `row` of the packed strips `packed` (of `cols` elements) into `out`
/// (`cols` floats), block by block, without allocating.
pub fn dequantize_row(
    ty: GgmlType,
    cols: usize,
    packed: &[u8],
    row: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let rows = packed.len() / ty.row_bytes(cols).unwrap_or(usize::MAX).max(1);
    let (nb, rb) = check(ty, cols, rows / STRIP * STRIP, packed.len())?;
    let bs = ty.block_size();
    if row >= rows || out.len() != cols {
        return Err(QuantError::BadLength {
            ty,
            n: cols,
            expected: cols,
            got: out.len(),
        });
    }
    let mut blk = [0u8; 34];
    let ts = ty.type_size();
    for b in 0..nb {
        unpack_block(ty, packed, rb, row, b, &mut blk[..ts]);
        super::dequantize_row(ty, &blk[..ts], &mut out[b * bs..(b + 1) * bs])?;
    }
    Ok(())
}

/// The tile kernel (see [`super::TileFn`]) over packed weights of type `ty`: `w` holds whole
/// strips (`n_rows` is rounded down to a multiple of 8).
pub fn tile_fn(ty: GgmlType) -> Option<super::TileFn> {
    #[cfg(target_arch = "x86_64")]
    if packable(ty) {
        use super::panel::x86::{KQ4_0, KQ4_1, KQ5_0, KQ8_0};
        return match ty {
            GgmlType::Q4_0 => Some(x86::tile::<KQ4_0>),
            GgmlType::Q4_1 => Some(x86::tile::<KQ4_1>),
            GgmlType::Q5_0 => Some(x86::tile::<KQ5_0>),
            GgmlType::Q8_0 => Some(x86::tile::<KQ8_0>),
            _ => None,
        };
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::STRIP;
    use crate::quant::panel::x86::{add_scaled, run_packed, sub_block_sums, Kind};

    /// Token counts up to this take [`small`]; more go to the panel kernel. `small` is the
    /// faster of the two up to about 32 tokens (decode_prof, SmolLM2, 2 threads: 9 tokens 24
    /// against 32 ms a step, 16 tokens 37 against 49; at 64 the two are even), so a step of 8
    /// decoders and a prompt slice does not jump to the panel's cost. The two give the same
    /// bits (`small_and_panel_give_the_same_bits`), so the choice never changes an output.
    pub(super) const SMALL_MAX: usize = 32;
    /// Tokens per register tile of [`small`].
    const T: usize = 4;
    /// Bytes ahead of the weight stream that are prefetched.
    const PREFETCH: usize = 1024;
    /// Most blocks per row handled by one [`small`] call's activation-scale table (longer
    /// rows are done in column chunks whose results are added). The panel kernel's column
    /// chunk, so that the two add the same partial sums in the same order.
    const MAX_NB: usize = crate::quant::panel::PG;

    /// The [`crate::quant::TileFn`] for packed kind `K`.
    pub(super) fn tile<K: Kind>(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        if K::BLOCK != 32 || K::PACK_BYTES == 0 || !crate::quant::avx2::available() {
            return;
        }
        let nb = cols / 32;
        let (w_row, a_row) = (nb * K::W_BYTES, nb * K::A_BYTES);
        if nb == 0 {
            return;
        }
        let n_strips = (n_rows / STRIP).min(w.len() / (STRIP * w_row));
        let n_tok = n_tok.min(a.len() / a_row);
        if n_tok > SMALL_MAX {
            return run_packed::<K>(cols, w, n_strips * STRIP, a, n_tok, out, out_stride);
        }
        thread_local! {
            /// Each thread's activation-scale table (kept: zeroing 8 KB per call shows up).
            static ASC: std::cell::RefCell<Vec<[f32; 4]>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        ASC.with(|cell| {
            let mut own = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let asc = match borrowed.as_mut() {
                Ok(t) => &mut **t,
                // Not reached (kernels do not nest); kept for soundness of the borrow.
                Err(_) => &mut own,
            };
            asc.resize(SMALL_MAX * MAX_NB, [0.0; 4]);
            let vnni = crate::quant::avx2::vnni();
            small::<K>(nb, w, n_strips, a, n_tok, out, out_stride, asc, vnni);
        });
    }

    /// A group of up to `T` tokens: first token, count, activation rows, scale tables.
    type TokenGroup<'a> = (usize, usize, [*const u8; T], [&'a [[f32; 4]]; T]);

    /// [`tile`] for `n_tok <= SMALL_MAX` tokens, `n_strips` whole strips; `asc` holds
    /// `SMALL_MAX · MAX_NB` entries; `vnni`: the CPU has AVX-512 VNNI (see
    /// [`crate::quant::avx2::vnni`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn small<K: Kind>(
        nb: usize,
        w: &[u8],
        n_strips: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
        asc: &mut [[f32; 4]],
        vnni: bool,
    ) {
        let (w_row, a_row) = (nb * K::W_BYTES, nb * K::A_BYTES);
        for c0 in (0..nb).step_by(MAX_NB) {
            let nbc = MAX_NB.min(nb - c0);
            for t in 0..n_tok {
                for b in 0..nbc {
                    let ab = &a[t * a_row + (c0 + b) * K::A_BYTES..][..K::A_BYTES];
                    // SAFETY: AVX2/FMA/F16C checked; `ab` is one whole activation block.
                    unsafe { K::act(ab.as_ptr(), &mut asc[t * MAX_NB + b..][..1]) };
                }
            }
            // Token groups of up to T: their activation rows and scale tables.
            let groups: [TokenGroup<'_>; SMALL_MAX / T] = std::array::from_fn(|gi| {
                let t0 = (gi * T).min(n_tok.saturating_sub(1));
                let nt = T.min(n_tok.saturating_sub(gi * T));
                let last = (t0 + nt.max(1) - 1).min(n_tok.saturating_sub(1));
                // Tokens past `nt` repeat the last one (their results are dropped).
                let a_ptr = std::array::from_fn(|i| {
                    a[(t0 + i).min(last) * a_row + c0 * K::A_BYTES..].as_ptr()
                });
                let sc = std::array::from_fn(|i| &asc[(t0 + i).min(last) * MAX_NB..][..nbc]);
                (t0, nt, a_ptr, sc)
            });
            // Strips outer, token groups inner: the second group finds the strip in L1.
            for s in 0..n_strips {
                let sw = &w[s * STRIP * w_row + c0 * K::PACK_BYTES..][..nbc * K::PACK_BYTES];
                for (t0, nt, a_ptr, sc) in &groups {
                    let (t0, nt) = (*t0, *nt);
                    if nt == 0 {
                        continue;
                    }
                    macro_rules! go {
                        ($n:literal) => {{
                            let mut r = [[0.0f32; STRIP]; T];
                            let ap: [*const u8; $n] = std::array::from_fn(|i| a_ptr[i]);
                            let sc: [&[[f32; 4]]; $n] = std::array::from_fn(|i| sc[i]);
                            // SAFETY: AVX2/FMA/F16C checked (and AVX-512 VNNI/VL when
                            // `vnni`); `sw` holds strip-blocks c0..c0 + nbc of strip s; each
                            // token row at `ap` holds activation blocks c0..c0 + nbc; `sc[i]`
                            // holds nbc scale entries.
                            let x = unsafe {
                                if vnni {
                                    strip_vnni::<K, $n>(nbc, sw.as_ptr(), &ap, &sc)
                                } else {
                                    strip::<K, $n>(nbc, sw.as_ptr(), &ap, &sc)
                                }
                            };
                            r[..$n].copy_from_slice(&x);
                            r
                        }};
                    }
                    let res = match nt {
                        1 => go!(1),
                        2 => go!(2),
                        3 => go!(3),
                        _ => go!(4),
                    };
                    for (i, &lanes) in res.iter().enumerate().take(nt) {
                        let base = (t0 + i) * out_stride + s * STRIP;
                        if let Some(o) = out.get_mut(base..base + STRIP) {
                            if c0 == 0 {
                                o.copy_from_slice(&lanes);
                            } else {
                                o.iter_mut().zip(lanes).for_each(|(o, x)| *o += x);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Defines a strip kernel: one strip (8 rows) against `N <= T` tokens over `nb`
    /// strip-blocks; lane `r` of `res[t]` is row `r`'s dot with token `t`. `strip` multiplies
    /// with `maddubs` summed in i16 then `madd` (AVX2); `strip_vnni` with `vpdpbusd` (the same
    /// integer sums, so the same bits).
    ///
    /// # Safety (of the defined function)
    /// The target features; `nb · K::PACK_BYTES` readable bytes at `w`; at each `a[t]` the
    /// activation blocks `0..nb` are readable; `sc[t]` holds at least `nb` entries.
    macro_rules! strip_kernel {
        ($name:ident, $features:literal, $vnni:literal) => {
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            unsafe fn $name<K: Kind, const N: usize>(
                nb: usize,
                w: *const u8,
                a: &[*const u8; N],
                sc: &[&[[f32; 4]]; N],
            ) -> [[f32; STRIP]; N] {
                let mut acc = [_mm256_setzero_ps(); N];
                let aq = K::act_quants(0);
                for b in 0..nb {
                    // A hint only: the address may lie past the weights (hence
                    // `wrapping_add`).
                    let pf = w.wrapping_add(b * K::PACK_BYTES + PREFETCH);
                    _mm_prefetch::<_MM_HINT_T0>(pf.cast::<i8>());
                    _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(K::PACK_BYTES / 2).cast::<i8>());
                    let mut v = [_mm256_setzero_si256(); 8];
                    // SAFETY (caller): strip-block b is readable.
                    let (d8, m8) = K::unpack(w.add(b * K::PACK_BYTES), &mut v);
                    let u = if K::SIGNED {
                        std::array::from_fn::<__m256i, 8, _>(|k| _mm256_sign_epi8(v[k], v[k]))
                    } else {
                        v
                    };
                    for t in 0..N {
                        // SAFETY (caller): 32 quants at `a[t] + b·A_BYTES + aq`.
                        let [isum, _] =
                            sub_block_sums!($vnni, K, &u, &v, a[t].add(b * K::A_BYTES + aq));
                        let s = &sc[t][b];
                        let da = _mm256_set1_ps(s[0]);
                        acc[t] = add_scaled!(K, acc[t], isum, d8, da, m8, s[1]);
                    }
                }
                let mut res = [[0.0f32; STRIP]; N];
                for (r, a) in res.iter_mut().zip(acc) {
                    // SAFETY: 8 f32 stored to an 8-f32 array.
                    _mm256_storeu_ps(r.as_mut_ptr(), a);
                }
                res
            }
        };
    }
    strip_kernel!(strip, "avx2,fma,f16c", false);
    strip_kernel!(
        strip_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        true
    );
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::tests::{model_path, quantized, random_activations, random_weights};
    use super::super::{dequantize_row as deq, vec_dot_fn_scalar, vec_dot_type, GgmlType};
    use super::*;
    use crate::gguf::GgufFile;

    const TYPES: [GgmlType; 4] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
    ];
    const SENTINEL: f32 = -12345.0;

    /// Packing then unpacking every row gives the original bytes; dequantizing from the packed
    /// layout equals dequantizing the original.
    #[test]
    fn quant_packed_round_trip() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for ty in TYPES {
            for (cols, rows) in [(32, 8), (576, 16), (1536, 24)] {
                let src = random_weights(ty, cols * rows, &mut rng);
                let mut packed = vec![0u8; src.len()];
                pack(ty, cols, rows, &src, &mut packed).unwrap();
                let rb = ty.row_bytes(cols).unwrap();
                let mut row = vec![0u8; rb];
                let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
                for r in 0..rows {
                    unpack_row(ty, cols, &packed, r, &mut row).unwrap();
                    assert_eq!(row, &src[r * rb..(r + 1) * rb], "{ty} row {r}");
                    deq(ty, &src[r * rb..(r + 1) * rb], &mut want).unwrap();
                    dequantize_row(ty, cols, &packed, r, &mut got).unwrap();
                    assert_eq!(want, got, "{ty} row {r}");
                }
            }
        }
        // Not whole strips, wrong lengths, unsupported types: errors, no panic.
        let src = vec![0u8; 7 * 20];
        let mut dst = vec![0u8; 7 * 20];
        assert!(pack(GgmlType::Q4_1, 32, 7, &src, &mut dst).is_err());
        assert!(pack(GgmlType::Q4_1, 32, 8, &src, &mut dst).is_err());
        assert!(pack(GgmlType::Q4_K, 256, 8, &src, &mut dst).is_err());
        let mut out = vec![0f32; 32];
        assert!(dequantize_row(GgmlType::Q4_1, 32, &dst, 9, &mut out).is_err());
    }

    /// The packed tile kernel against scalar dots on the original layout, for 1..=32 tokens
    /// (the small kernel), 33 and 70 (the panel path), rows longer than one column chunk of
    /// either path, an output stride with padding.
    fn check(
        ty: GgmlType,
        cols: usize,
        src: &[u8],
        n_rows: usize,
        n_tok: usize,
        rng: &mut ChaCha8Rng,
    ) {
        let f = tile_fn(ty).expect("packed kernel");
        let mut packed = vec![0u8; src.len()];
        pack(ty, cols, n_rows, src, &mut packed).unwrap();
        let (wb, ab) = (
            ty.row_bytes(cols).unwrap(),
            vec_dot_type(ty).row_bytes(cols).unwrap(),
        );
        let a: Vec<u8> = (0..n_tok)
            .flat_map(|_| quantized(ty, &random_activations(cols, rng)))
            .collect();
        let stride = n_rows + 3;
        let mut out = vec![SENTINEL; stride * n_tok];
        f(cols, &packed, n_rows, &a, n_tok, &mut out, stride);
        let scalar = vec_dot_fn_scalar(ty).unwrap();
        for t in 0..n_tok {
            let arow = &a[t * ab..][..ab];
            let mut ad = vec![0f32; cols];
            deq(vec_dot_type(ty), arow, &mut ad).unwrap();
            for r in 0..n_rows {
                let wr = &src[r * wb..][..wb];
                let want = scalar(cols, wr, arow);
                let mut wd = vec![0f32; cols];
                deq(ty, wr, &mut wd).unwrap();
                let sum_abs: f64 = wd
                    .iter()
                    .zip(&ad)
                    .map(|(x, y)| f64::from((x * y).abs()))
                    .sum();
                let tol = 2e-4 * sum_abs + 1e-5;
                let got = out[t * stride + r];
                assert!(
                    f64::from((got - want).abs()) <= tol,
                    "{ty} cols={cols} rows={n_rows} toks={n_tok} (r={r}, t={t}): packed {got} vs \
                     scalar {want} (tol {tol})"
                );
            }
            assert!(out[t * stride + n_rows..(t + 1) * stride]
                .iter()
                .all(|&v| v == SENTINEL));
        }
    }

    #[test]
    fn quant_packed_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(71);
        for ty in TYPES {
            if tile_fn(ty).is_none() {
                continue;
            }
            for (cols, n_rows) in [(32, 8), (576, 24), (1536, 16), (4160, 8), (1088, 8)] {
                let src = random_weights(ty, cols * n_rows, &mut rng);
                for n_tok in [1, 2, 3, 4, 5, 7, 8, 9, 13, 32, 33, 70] {
                    check(ty, cols, &src, n_rows, n_tok, &mut rng);
                }
            }
        }
    }

    /// Each token alone (the small kernel) and all of them in one call of more than
    /// `SMALL_MAX` tokens (the panel kernel) give identical bits, for every type and for rows
    /// of one and of several column chunks: a sequence's output must not depend on how many
    /// tokens share its engine step.
    #[test]
    fn small_and_panel_give_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(79);
        let n_tok = x86::SMALL_MAX + 5;
        for ty in TYPES {
            let Some(f) = tile_fn(ty) else { continue };
            for (cols, n_rows) in [(576, 24), (1536, 16), (4160, 8)] {
                let src = random_weights(ty, cols * n_rows, &mut rng);
                let mut packed = vec![0u8; src.len()];
                pack(ty, cols, n_rows, &src, &mut packed).unwrap();
                let ab = vec_dot_type(ty).row_bytes(cols).unwrap();
                let a: Vec<u8> = (0..n_tok)
                    .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                    .collect();
                let mut all = vec![0f32; n_rows * n_tok];
                f(cols, &packed, n_rows, &a, n_tok, &mut all, n_rows);
                for group in [1, 3, 8, x86::SMALL_MAX] {
                    for t0 in (0..n_tok).step_by(group) {
                        let nt = group.min(n_tok - t0);
                        let mut few = vec![0f32; n_rows * nt];
                        f(
                            cols,
                            &packed,
                            n_rows,
                            &a[t0 * ab..(t0 + nt) * ab],
                            nt,
                            &mut few,
                            n_rows,
                        );
                        let want = &all[t0 * n_rows..(t0 + nt) * n_rows];
                        assert!(
                            few.iter()
                                .zip(want)
                                .all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{ty} cols={cols}: tokens {t0}..{} in calls of {group} differ from \
                             one call of {n_tok}",
                            t0 + nt
                        );
                    }
                }
            }
        }
    }

    /// The small kernel's AVX-512 VNNI form (`vpdpbusd`) gives exactly its AVX2 form's bits,
    /// for 1 to `SMALL_MAX` tokens, random and extreme activations (every one ±127).
    #[test]
    fn small_vnni_gives_the_avx2_bits() {
        use crate::quant::panel::x86::{Kind, KQ4_0, KQ4_1, KQ5_0, KQ8_0};
        if !crate::quant::avx2::vnni() {
            eprintln!("this CPU has no AVX-512 VNNI: nothing to compare");
            return;
        }
        fn both<K: Kind>(cols: usize, w: &[u8], rows: usize, a: &[u8], n: usize) {
            let mut asc = vec![[0f32; 4]; x86::SMALL_MAX * crate::quant::panel::PG];
            let (mut x, mut y) = (vec![0f32; rows * n], vec![0f32; rows * n]);
            let nb = cols / 32;
            x86::small::<K>(nb, w, rows / STRIP, a, n, &mut x, rows, &mut asc, false);
            x86::small::<K>(nb, w, rows / STRIP, a, n, &mut y, rows, &mut asc, true);
            assert!(x.iter().any(|&v| v != 0.0));
            let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "cols={cols} tokens={n}: VNNI and AVX2 differ");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(89);
        for ty in TYPES {
            let (cols, rows) = (1536, 16);
            let src = random_weights(ty, cols * rows, &mut rng);
            let mut w = vec![0u8; src.len()];
            pack(ty, cols, rows, &src, &mut w).unwrap();
            for n in [1, 3, 8, x86::SMALL_MAX] {
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
                        GgmlType::Q4_0 => both::<KQ4_0>(cols, &w, rows, &a, n),
                        GgmlType::Q4_1 => both::<KQ4_1>(cols, &w, rows, &a, n),
                        GgmlType::Q5_0 => both::<KQ5_0>(cols, &w, rows, &a, n),
                        _ => both::<KQ8_0>(cols, &w, rows, &a, n),
                    }
                }
            }
        }
    }

    /// Throughput of the packed kernel on an L2-resident matrix (run by hand:
    /// `cargo test -p llmsd-engine --release quant_packed_bench -- --ignored --nocapture`).
    #[test]
    #[ignore = "benchmark, run by hand"]
    fn quant_packed_bench() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (cols, rows) = (576, 512);
        for ty in TYPES {
            let Some(f) = tile_fn(ty) else { continue };
            let src = random_weights(ty, cols * rows, &mut rng);
            let mut packed = vec![0u8; src.len()];
            pack(ty, cols, rows, &src, &mut packed).unwrap();
            for n_tok in [1usize, 4, 8, 16, 64] {
                let a: Vec<u8> = (0..n_tok)
                    .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                    .collect();
                let mut out = vec![0f32; rows * n_tok];
                let reps = 4096 / n_tok;
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        f(cols, &packed, rows, &a, n_tok, &mut out, rows);
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let macs = (reps * rows * cols * n_tok) as f64;
                println!(
                    "{ty:>5} n_tok={n_tok:2}: {:6.1} GMAC/s, {:5.2} ns per 8 rows x 32 x token (out {})",
                    macs / best / 1e9,
                    best * 1e9 / (macs / 256.0),
                    out[0]
                );
            }
        }
    }

    /// Real tensors of both models (Q4_1, Q8_0; Q5_0), a random strip-aligned slice each.
    #[test]
    fn quant_packed_real_tensors() {
        let mut rng = ChaCha8Rng::seed_from_u64(73);
        let mut checked = Vec::new();
        for model in [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gemma-3-270m-q4_k_m.gguf",
        ] {
            let file = GgufFile::open(model_path(model)).unwrap();
            for info in file.tensors.iter().filter(|i| i.dims.len() == 2).step_by(5) {
                if tile_fn(info.ty).is_none() || info.n_rows() % STRIP != 0 {
                    continue;
                }
                let (cols, rows) = (info.n_cols(), info.n_rows());
                let rb = info.ty.row_bytes(cols).unwrap();
                let s0 = rng.gen_range(0..rows / STRIP - 1) * STRIP;
                let src = &file.tensor_data(info)[s0 * rb..(s0 + 16) * rb];
                for n_tok in [1, 8, 10] {
                    check(info.ty, cols, src, 16, n_tok, &mut rng);
                }
                checked.push(info.ty);
            }
        }
        for ty in [GgmlType::Q4_1, GgmlType::Q5_0] {
            assert!(checked.contains(&ty), "no real {ty} tensor checked");
        }
    }
}
