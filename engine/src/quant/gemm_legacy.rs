//! Tile kernels (see [`super::TileFn`]) for the legacy block types: Q4_0, Q4_1, Q5_0 and Q8_0
//! weights against Q8_0 / Q8_1 activations, on AVX2 + FMA + F16C CPUs.
//!
//! Up to [`STREAM_MAX_TOK`] tokens (decode, batched decode) take the streaming kernels of
//! `gemv_legacy_avx2.rs` (each weight row read once, front to back); more tokens (prefill) take
//! the row-interleaved panel kernel of `panel.rs`, shared with the K-quants.

use super::{GgmlType, TileFn};

#[cfg(target_arch = "x86_64")]
#[path = "gemm_legacy_avx2.rs"]
mod kernels;

#[cfg(target_arch = "x86_64")]
#[path = "gemv_legacy_avx2.rs"]
mod stream;

/// Token counts up to this take the streaming kernels (`gemv_legacy_avx2.rs`): one weight row
/// at a time, front to back, every token of the call against it.
pub(crate) const STREAM_MAX_TOK: usize = 8;

/// The tile kernel for `ty`, if this file has one for this CPU.
pub(crate) fn tile_fn(ty: GgmlType) -> Option<TileFn> {
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        use kernels::{Q4_0, Q4_1, Q5_0, Q8_0};
        return match ty {
            GgmlType::Q4_0 => Some(tile::<Q4_0>),
            GgmlType::Q4_1 => Some(tile::<Q4_1>),
            GgmlType::Q5_0 => Some(tile::<Q5_0>),
            GgmlType::Q8_0 => Some(tile::<Q8_0>),
            _ => None,
        };
    }
    let _ = ty;
    None
}

#[cfg(target_arch = "x86_64")]
fn ggml_type(k: u8) -> GgmlType {
    match k {
        kernels::Q4_0 => GgmlType::Q4_0,
        kernels::Q4_1 => GgmlType::Q4_1,
        kernels::Q5_0 => GgmlType::Q5_0,
        _ => GgmlType::Q8_0,
    }
}

/// The [`TileFn`] for weight kind `K`. Counts are clamped to what the slices hold: rows to
/// `w.len() / row_bytes`, tokens to `a.len() / act_row_bytes`, and outputs falling outside `out`
/// are not computed; a partial trailing block of `cols` is ignored (as the dot kernels do).
#[cfg(target_arch = "x86_64")]
fn tile<const K: u8>(
    cols: usize,
    w: &[u8],
    n_rows: usize,
    a: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    use kernels::{a_block, w_block};
    let ty = ggml_type(K);
    let nb = cols / 32;
    let (w_row, a_row) = (nb * w_block(K), nb * a_block(K));
    debug_assert_eq!(cols % 32, 0, "{ty}: {cols} columns is not whole blocks");
    debug_assert!(w.len() >= n_rows * w_row, "{ty}: weight tile too short");
    debug_assert!(a.len() >= n_tok * a_row, "{ty}: activation tile too short");
    debug_assert!(
        n_tok <= 1 || out_stride >= n_rows,
        "{ty}: out_stride < n_rows"
    );
    debug_assert!(
        n_tok == 0 || n_rows == 0 || out.len() > (n_tok - 1) * out_stride + n_rows - 1,
        "{ty}: output too short"
    );
    let (n_rows, n_tok) = if nb == 0 {
        (n_rows, n_tok)
    } else {
        (n_rows.min(w.len() / w_row), n_tok.min(a.len() / a_row))
    };
    if !super::avx2::available() {
        // Unreachable through `tile_fn`; kept so this safe function is sound for any caller.
        let dot = super::vec_dot_fn_scalar(ty).expect("legacy type");
        for t in 0..n_tok {
            for r in 0..n_rows {
                if let Some(o) = out.get_mut(t * out_stride + r) {
                    *o = dot(cols, &w[r * w_row..][..w_row], &a[t * a_row..][..a_row]);
                }
            }
        }
        return;
    }
    if nb == 0 {
        // Rows shorter than a block: every dot is 0.
        for t in 0..n_tok {
            for r in 0..n_rows {
                if let Some(o) = out.get_mut(t * out_stride + r) {
                    *o = 0.0;
                }
            }
        }
        return;
    }
    if n_tok > STREAM_MAX_TOK {
        if let Some(f) = super::panel::panel_fn(ty) {
            f(cols, w, n_rows, a, n_tok, out, out_stride);
        }
        return;
    }
    let (w, a) = (&w[..n_rows * w_row], &a[..n_tok * a_row]);
    macro_rules! go {
        ($($n:literal)*) => {
            match n_tok {
                $($n => tile_stream::<K, $n>(nb, w, n_rows, a, out, out_stride),)*
                _ => {}
            }
        };
    }
    go!(1 2 3 4 5 6 7 8);
}

/// `N <= STREAM_MAX_TOK` tokens through the streaming kernels: per chunk of at most
/// `CHUNK_BLOCKS` blocks, every token's activations are re-laid once, then each weight row is
/// streamed once per group of up to `MAX_T` tokens (with more than `MAX_T` tokens, rows go in
/// groups of `ROWS` that stay in L1 while the token groups pass over them).
///
/// `w` holds exactly `n_rows` rows of `nb` blocks, `a` exactly `N` rows; AVX2 is available.
#[cfg(target_arch = "x86_64")]
fn tile_stream<const K: u8, const N: usize>(
    nb: usize,
    w: &[u8],
    n_rows: usize,
    a: &[u8],
    out: &mut [f32],
    out_stride: usize,
) {
    use kernels::{a_block, w_block};
    use stream::{arrange, rows, Acts, CHUNK_BLOCKS, MAX_T};
    const ROWS: usize = 32;
    let (wb, ab) = (w_block(K), a_block(K));
    let (w_row, a_row) = (nb * wb, nb * ab);
    if w.len() < n_rows * w_row || a.len() < N * a_row || !super::avx2::available() {
        return;
    }
    let mut acts: [Acts; N] = std::array::from_fn(|_| Acts::default());
    let group = if N <= MAX_T { n_rows.max(1) } else { ROWS };
    for c0 in (0..nb).step_by(CHUNK_BLOCKS) {
        let nbc = CHUNK_BLOCKS.min(nb - c0);
        for (t, acts) in acts.iter_mut().enumerate() {
            // SAFETY: AVX2/FMA/F16C checked; token t's row holds blocks c0..c0 + nbc
            // (c0 + nbc <= nb), nbc <= CHUNK_BLOCKS.
            unsafe { arrange::<K>(nbc, a[t * a_row + c0 * ab..].as_ptr(), acts) };
        }
        for r0 in (0..n_rows).step_by(group) {
            let nr = group.min(n_rows - r0);
            let wp = w[r0 * w_row + c0 * wb..].as_ptr();
            for t0 in (0..N).step_by(MAX_T) {
                let o = out.get_mut(t0 * out_stride + r0..).unwrap_or_default();
                let add = c0 > 0;
                macro_rules! run {
                    ($t:literal) => {{
                        let acts: &[Acts; $t] = acts[t0..t0 + $t].try_into().expect("tokens");
                        // SAFETY: AVX2/FMA/F16C checked; rows r0..r0 + nr of `w` hold blocks
                        // c0..c0 + nbc; `acts` were filled for nbc blocks.
                        unsafe { rows::<K, $t>(nbc, wp, w_row, nr, acts, o, out_stride, add) }
                    }};
                }
                match (N - t0).min(MAX_T) {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::tests::{model_path, quantized, random_activations, random_weights};
    use super::super::{vec_dot_fn_scalar, vec_dot_type, GgmlType, TileFn};
    use super::tile_fn;
    use crate::gguf::GgufFile;

    const TYPES: [GgmlType; 4] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
    ];
    const SENTINEL: f32 = -12345.0;

    fn tile(ty: GgmlType) -> Option<TileFn> {
        let f = tile_fn(ty);
        assert_eq!(f.is_some(), super::super::avx2::available(), "{ty}");
        f
    }

    /// Runs the tile kernel on `n_rows` rows of `w` × `n_tok` rows of `a` with an out_stride of
    /// `n_rows + pad` and checks every output against the scalar dot, and the padding untouched.
    #[allow(clippy::too_many_arguments)]
    fn check(
        ty: GgmlType,
        f: TileFn,
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        pad: usize,
        what: &str,
    ) {
        let (wb, ab) = (
            ty.row_bytes(cols).unwrap(),
            vec_dot_type(ty).row_bytes(cols).unwrap(),
        );
        let stride = n_rows + pad;
        let mut out = vec![SENTINEL; stride * n_tok + pad];
        f(cols, w, n_rows, a, n_tok, &mut out, stride);
        let scalar = vec_dot_fn_scalar(ty).unwrap();
        let wd: Vec<Vec<f32>> = (0..n_rows)
            .map(|r| dequant(ty, &w[r * wb..][..wb], cols))
            .collect();
        for t in 0..n_tok {
            let arow = &a[t * ab..][..ab];
            let ad = dequant(vec_dot_type(ty), arow, cols);
            for r in 0..n_rows {
                let want = scalar(cols, &w[r * wb..][..wb], arow);
                let got = out[t * stride + r];
                let sum_abs: f64 = wd[r]
                    .iter()
                    .zip(&ad)
                    .map(|(x, y)| f64::from((x * y).abs()))
                    .sum();
                let tol = 1e-4 * sum_abs + 1e-6;
                assert!(
                    f64::from((got - want).abs()) <= tol,
                    "{ty} {what} cols={cols} rows={n_rows} toks={n_tok} (r={r}, t={t}): \
                     tile {got} vs scalar {want} (tol {tol})"
                );
            }
            for p in n_rows..stride {
                assert_eq!(out[t * stride + p], SENTINEL, "{ty}: padding written");
            }
        }
        assert!(out[stride * n_tok..].iter().all(|&v| v == SENTINEL));
    }

    fn dequant(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        super::super::dequantize_row(ty, data, &mut out).unwrap();
        out
    }

    #[test]
    fn quant_gemm_legacy_tile_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        for ty in TYPES {
            let Some(f) = tile(ty) else { continue };
            for cols in [32, 576, 640, 1536] {
                let w = random_weights(ty, cols * 17, &mut rng);
                let a: Vec<u8> = (0..9)
                    .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                    .collect();
                for n_rows in 1..=17 {
                    for n_tok in 1..=9 {
                        let pad = (n_rows + n_tok) % 3;
                        check(ty, f, cols, &w, n_rows, &a, n_tok, pad, "random");
                    }
                }
            }
        }
    }

    /// Streaming path (1..=8 tokens): odd block counts (a tail pair), rows longer than one
    /// activation chunk (2048 columns, the last chunk odd), and row groups (more than 4 tokens
    /// and more than 32 rows).
    #[test]
    fn quant_gemm_legacy_stream_chunks_and_tails() {
        let mut rng = ChaCha8Rng::seed_from_u64(43);
        for ty in TYPES {
            let Some(f) = tile(ty) else { continue };
            for (cols, n_rows) in [(96, 5), (2144, 3), (4160, 2), (224, 37), (64, 70)] {
                let w = random_weights(ty, cols * n_rows, &mut rng);
                let a: Vec<u8> = (0..8)
                    .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                    .collect();
                for n_tok in 1..=8 {
                    check(ty, f, cols, &w, n_rows, &a, n_tok, n_tok % 2, "stream");
                }
            }
        }
    }

    /// Panel path through the legacy dispatch: several column chunks (cols > 1024) and token
    /// chunks (> 64 tokens).
    #[test]
    fn quant_gemm_legacy_tile_q4_1_chunks() {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let ty = GgmlType::Q4_1;
        let Some(f) = tile(ty) else { return };
        for (cols, n_rows, n_tok) in [(1600, 6, 37), (3136, 5, 33), (1568, 9, 70)] {
            let w = random_weights(ty, cols * n_rows, &mut rng);
            let a: Vec<u8> = (0..n_tok)
                .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                .collect();
            check(ty, f, cols, &w, n_rows, &a, n_tok, 1, "chunks");
        }
    }

    /// Extreme quants: every Q8_0 weight -128 or 127, activations ±127, so an i16 saturation or
    /// a wrong sign would show.
    #[test]
    fn quant_gemm_legacy_tile_extremes() {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        for ty in TYPES {
            let Some(f) = tile(ty) else { continue };
            let cols = 256;
            let mut w = random_weights(ty, cols * 5, &mut rng);
            let (bs, qs) = match ty {
                GgmlType::Q8_0 => (34, 2),
                GgmlType::Q5_0 => (22, 2),
                GgmlType::Q4_1 => (20, 4),
                _ => (18, 2),
            };
            for (i, blk) in w.chunks_exact_mut(bs).enumerate() {
                let v = if i % 2 == 0 { 0x80 } else { 0x7F };
                let v = if ty == GgmlType::Q8_0 {
                    v
                } else {
                    [0x00, 0xFF][i % 2]
                };
                blk[qs..].fill(v);
            }
            let x: Vec<f32> = (0..cols * 3)
                .map(|i| if (i / 7) % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let a: Vec<u8> = x.chunks(cols).flat_map(|c| quantized(ty, c)).collect();
            check(ty, f, cols, &w, 5, &a, 3, 1, "extremes");
        }
    }

    /// Release builds: short slices clamp the counts, never panic or write out of bounds.
    #[cfg(not(debug_assertions))]
    #[test]
    fn quant_gemm_legacy_tile_clamps_short_slices() {
        let mut rng = ChaCha8Rng::seed_from_u64(29);
        for ty in TYPES {
            let Some(f) = tile(ty) else { continue };
            let cols = 64;
            let w = random_weights(ty, cols * 4, &mut rng);
            let a: Vec<u8> = (0..3)
                .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                .collect();
            let mut out = vec![SENTINEL; 5];
            // 4 rows × 3 tokens asked, only 5 outputs: rows 0..4 of token 0 and row 0 of token 1.
            f(cols, &w[..w.len() - 1], 4, &a, 3, &mut out, 4);
            assert!(out.iter().all(|v| v.is_finite()));
            assert_eq!(
                out[3], SENTINEL,
                "{ty}: row 3 is incomplete, must stay untouched"
            );
            f(cols, &w, 4, &a[..10], 3, &mut out, 4);
            f(cols, &[], 4, &[], 3, &mut [], 4);
        }
    }

    #[test]
    fn quant_gemm_legacy_tile_real_tensors() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let mut checked = Vec::new();
        for (model, want) in [
            (
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                &[GgmlType::Q4_1, GgmlType::Q8_0][..],
            ),
            (
                "gemma-3-270m-q4_k_m.gguf",
                &[GgmlType::Q5_0, GgmlType::Q8_0][..],
            ),
        ] {
            let file = GgufFile::open(model_path(model)).unwrap();
            for info in &file.tensors {
                if !want.contains(&info.ty) {
                    continue;
                }
                let Some(f) = tile(info.ty) else { continue };
                let (cols, rows) = (info.n_cols(), info.n_rows());
                let rb = info.ty.row_bytes(cols).unwrap();
                let data = file.tensor_data(info);
                let n_rows = rows.min(11);
                let r0 = rng.gen_range(0..=rows - n_rows);
                let w = &data[r0 * rb..(r0 + n_rows) * rb];
                let a: Vec<u8> = (0..5)
                    .flat_map(|_| quantized(info.ty, &random_activations(cols, &mut rng)))
                    .collect();
                check(info.ty, f, cols, w, n_rows, &a, 5, 2, &info.name);
                checked.push(info.ty);
            }
        }
        if super::super::avx2::available() {
            for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0] {
                assert!(checked.contains(&ty), "no real {ty} tensor checked");
            }
        }
    }

    /// Throughput of the tile kernel against per-pair dots (run by hand:
    /// `cargo test -p llmsd-engine --release gemm_legacy_bench -- --ignored --nocapture`).
    #[test]
    #[ignore = "benchmark, run by hand"]
    fn quant_gemm_legacy_bench() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let cols = 576;
        for ty in TYPES {
            let Some(f) = tile(ty) else { continue };
            let vd = super::super::vec_dot_fn(ty).unwrap();
            let (wb, ab) = (
                ty.row_bytes(cols).unwrap(),
                vec_dot_type(ty).row_bytes(cols).unwrap(),
            );
            let rows = 1536;
            let w = random_weights(ty, cols * rows, &mut rng);
            for n_tok in [1usize, 8, 32] {
                let a: Vec<u8> = (0..n_tok)
                    .flat_map(|_| quantized(ty, &random_activations(cols, &mut rng)))
                    .collect();
                let mut out = vec![0f32; 16 * n_tok];
                let reps = 2048 / n_tok;
                for (name, use_tile) in [("tile", true), ("vec_dot", false)] {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        for wblk in w.chunks_exact(16 * wb) {
                            if use_tile {
                                f(cols, wblk, 16, &a, n_tok, &mut out, 16);
                            } else {
                                for (tk, arow) in a.chunks_exact(ab).enumerate() {
                                    for (r, wr) in wblk.chunks_exact(wb).enumerate() {
                                        out[tk * 16 + r] = vd(cols, wr, arow);
                                    }
                                }
                            }
                        }
                    }
                    let secs = t.elapsed().as_secs_f64();
                    let pairs = (reps * rows * n_tok * cols / 32) as f64;
                    println!(
                        "{ty:>5} n_tok={n_tok:2} {name:>7}: {:6.2} ns/block-pair, {:6.2} GB/s \
                         weights (out {})",
                        secs * 1e9 / pairs,
                        (reps * w.len()) as f64 / secs / 1e9,
                        out[0]
                    );
                }
            }
        }
    }
}
