//! Tile kernels (see [`super::TileFn`]) for the K-quant types.
//!
//! Why: Gemma-3's Q4_K_M files store the attention output and feed-forward down projections as
//! Q4_K / Q6_K, and in prefill or batched decode one dot per (row, token) re-decodes every weight
//! block for every token. The AVX2+FMA kernels in `avx2` (file `gemm_k_avx2.rs`) unpack each
//! super-block of 2 rows once and dot it with every token of the tile, 2 rows × 4 tokens per
//! register tile. A single token (decode GEMV) goes to the single-row kernels.
//!
//! CPUs without AVX2+FMA get no tile kernel (the caller then uses one dot per pair).

use super::{GgmlType, TileFn};

#[cfg(target_arch = "x86_64")]
#[path = "gemm_k_avx2.rs"]
mod avx2;

/// The tile kernel for `ty`, if this file has one for this CPU.
pub(crate) fn tile_fn(ty: GgmlType) -> Option<TileFn> {
    #[cfg(target_arch = "x86_64")]
    if super::k_quants::has_avx2_fma() {
        return match ty {
            GgmlType::Q4_K => Some(x86::tile_q4_k),
            GgmlType::Q5_K => Some(x86::tile_q5_k),
            GgmlType::Q6_K => Some(x86::tile_q6_k),
            _ => None,
        };
    }
    let _ = ty;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::avx2::{self, TY_Q4_K, TY_Q5_K, TY_Q6_K};
    use crate::quant::k_quants::{self, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BYTES, QK_K};
    use crate::quant::{GgmlType, VecDotFn};

    pub(super) fn tile_q4_k(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        run::<TY_Q4_K>(cols, w, n_rows, a, n_tok, out, out_stride);
    }

    pub(super) fn tile_q5_k(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        run::<TY_Q5_K>(cols, w, n_rows, a, n_tok, out, out_stride);
    }

    pub(super) fn tile_q6_k(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        run::<TY_Q6_K>(cols, w, n_rows, a, n_tok, out, out_stride);
    }

    /// The safe entry: checks lengths (debug), clamps to the whole rows / tokens present
    /// (release), then runs the AVX2 kernel, or the scalar dots if this CPU lacks AVX2+FMA.
    #[allow(clippy::too_many_arguments)]
    fn run<const TY: u8>(
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (wbytes, ty) = match TY {
            TY_Q4_K => (Q4_K_BYTES, GgmlType::Q4_K),
            TY_Q5_K => (Q5_K_BYTES, GgmlType::Q5_K),
            _ => (Q6_K_BYTES, GgmlType::Q6_K),
        };
        debug_assert!(
            cols.is_multiple_of(QK_K),
            "{cols} columns is not a multiple of {QK_K}"
        );
        let nb = cols / QK_K;
        let (wrow, arow) = (nb * wbytes, nb * Q8_K_BYTES);
        debug_assert_eq!(w.len(), n_rows * wrow, "{ty} weight tile length");
        debug_assert_eq!(a.len(), n_tok * arow, "Q8_K activation tile length");
        debug_assert!(n_tok <= 1 || out_stride >= n_rows, "out_stride < n_rows");
        debug_assert!(
            n_tok == 0 || n_rows == 0 || out.len() >= (n_tok - 1) * out_stride + n_rows,
            "output tile too short"
        );
        if nb == 0 {
            // Empty rows: every dot is 0.
            for t in 0..n_tok {
                for r in 0..n_rows {
                    if let Some(o) = out.get_mut(t * out_stride + r) {
                        *o = 0.0;
                    }
                }
            }
            return;
        }
        let n_rows = n_rows.min(w.len() / wrow);
        let n_tok = n_tok.min(a.len() / arow);
        let (w, a) = (&w[..n_rows * wrow], &a[..n_tok * arow]);
        if !k_quants::has_avx2_fma() {
            let dot: VecDotFn = match TY {
                TY_Q4_K => k_quants::vec_dot_q4_k_q8_k_scalar,
                TY_Q5_K => k_quants::vec_dot_q5_k_q8_k_scalar,
                _ => k_quants::vec_dot_q6_k_q8_k_scalar,
            };
            for (t, ar) in a.chunks_exact(arow).enumerate() {
                for (r, wr) in w.chunks_exact(wrow).enumerate() {
                    if let Some(o) = out.get_mut(t * out_stride + r) {
                        *o = dot(cols, wr, ar);
                    }
                }
            }
            return;
        }
        if n_tok > crate::quant::gemm_legacy::STREAM_MAX_TOK {
            if let Some(f) = crate::quant::panel::panel_fn(ty) {
                return f(cols, w, n_rows, a, n_tok, out, out_stride);
            }
        }
        if n_tok == 1 {
            let len = n_rows.min(out.len());
            let out = &mut out[..len];
            // SAFETY: AVX2 and FMA were detected at run time (checked just above); the kernel
            // reads only whole blocks inside `w` and `a`, writes only inside `out`.
            unsafe { avx2::gemv::<TY>(nb, w, n_rows, a, out) };
            return;
        }
        // SAFETY: AVX2 and FMA were detected at run time (checked just above); `w` and `a` hold
        // exactly `n_rows` and `n_tok` whole rows, so every block the kernel slices is present,
        // and it writes `out` only through bounds-checked `get_mut`.
        unsafe { avx2::tile::<TY>(nb, w, n_rows, a, n_tok, out, out_stride) };
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::tile_fn;
    use crate::quant::k_quants::{Q8_K_BYTES, QK_K};
    use crate::quant::{quantize_row, vec_dot_fn_scalar, GgmlType};
    use half::f16;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const SENTINEL: f32 = -12345.5;

    /// Random bytes with finite f16 super-scales in [1e-3, 1e-1] (as the k_quants tests).
    fn random_blocks(ty: GgmlType, n_blocks: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let bytes = ty.row_bytes(QK_K).expect("block bytes");
        let offsets: &[usize] = match ty {
            GgmlType::Q6_K => &[208],
            _ => &[0, 2],
        };
        let mut v = vec![0u8; n_blocks * bytes];
        rng.fill(&mut v[..]);
        for b in v.chunks_exact_mut(bytes) {
            for &off in offsets {
                let x = f16::from_f32(rng.gen_range(1e-3f32..1e-1));
                b[off..off + 2].copy_from_slice(&x.to_le_bytes());
            }
        }
        v
    }

    /// Activation-like values, with a few outliers; quantized to Q8_K rows.
    fn random_acts(cols: usize, n_tok: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let x: Vec<f32> = (0..cols * n_tok)
            .map(|_| {
                let x: f32 = rng.gen_range(-1.0..1.0);
                if rng.gen_bool(0.02) {
                    x * 20.0
                } else {
                    x
                }
            })
            .collect();
        let arow = cols / QK_K * Q8_K_BYTES;
        let mut q = vec![0u8; arow * n_tok];
        for (xr, qr) in x.chunks_exact(cols).zip(q.chunks_exact_mut(arow)) {
            quantize_row(GgmlType::Q8_K, xr, qr).expect("quantize");
        }
        q
    }

    /// Σ|w_i a_i| of one pair, from the dequantized rows (the tolerance scale).
    fn abs_dot(ty: GgmlType, cols: usize, w: &[u8], a: &[u8]) -> f64 {
        let mut wf = vec![0f32; cols];
        crate::quant::dequantize_row(ty, w, &mut wf).expect("dequantize");
        let mut s = 0f64;
        for (ab, wb) in a.chunks_exact(Q8_K_BYTES).zip(wf.chunks_exact(QK_K)) {
            let d = f32::from_le_bytes([ab[0], ab[1], ab[2], ab[3]]);
            for (&q, &wv) in ab[4..4 + QK_K].iter().zip(wb) {
                s += (f64::from(d) * f64::from(q as i8) * f64::from(wv)).abs();
            }
        }
        s
    }

    /// Runs the tile kernel of `ty` and compares every pair with the scalar reference; returns
    /// the failures.
    #[allow(clippy::too_many_arguments)]
    fn check_tile(
        ty: GgmlType,
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out_stride: usize,
        label: &str,
    ) -> Vec<String> {
        let tile = tile_fn(ty).expect("tile kernel on an AVX2+FMA CPU");
        let scalar = vec_dot_fn_scalar(ty).expect("scalar kernel");
        let wrow = ty.row_bytes(cols).expect("row bytes");
        let arow = GgmlType::Q8_K.row_bytes(cols).expect("row bytes");
        let mut out = vec![SENTINEL; (n_tok - 1) * out_stride + n_rows + 3];
        tile(cols, w, n_rows, a, n_tok, &mut out, out_stride);
        let mut failures = Vec::new();
        for (i, &v) in out.iter().enumerate() {
            let (t, r) = (i / out_stride, i % out_stride);
            let wr = &w[r.min(n_rows - 1) * wrow..][..wrow];
            if t < n_tok && r < n_rows {
                let ar = &a[t * arow..(t + 1) * arow];
                let want = scalar(cols, wr, ar);
                let tol = 1e-4 * abs_dot(ty, cols, wr, ar) + 1e-6;
                if (f64::from(v) - f64::from(want)).abs() > tol || !v.is_finite() {
                    failures.push(format!(
                        "{ty} {label} cols={cols} rows={n_rows} toks={n_tok} stride={out_stride} \
                         (r={r}, t={t}): tile {v} scalar {want} (tol {tol})"
                    ));
                }
            } else if v != SENTINEL {
                failures.push(format!(
                    "{ty} {label} cols={cols} rows={n_rows} toks={n_tok} stride={out_stride}: \
                     padding out[{i}] overwritten with {v}"
                ));
            }
        }
        failures
    }

    fn assert_no_failures(failures: &[String]) {
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures[..failures.len().min(20)].join("\n")
        );
    }

    #[test]
    fn tile_matches_scalar_random() {
        if !crate::quant::k_quants::has_avx2_fma() {
            eprintln!("warning: no AVX2+FMA on this CPU, no K-quant tile kernels to test");
            assert!(tile_fn(GgmlType::Q4_K).is_none());
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut failures = Vec::new();
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q5_K] {
            for cols in [256, 512, 2048] {
                let nb = cols / QK_K;
                let w = random_blocks(ty, 17 * nb, &mut rng);
                let a = random_acts(cols, 9, &mut rng);
                let wrow = ty.row_bytes(cols).unwrap();
                let arow = GgmlType::Q8_K.row_bytes(cols).unwrap();
                for n_rows in 1..=17 {
                    for n_tok in 1..=9 {
                        // Vary the starting row / token so every tile sees different data.
                        let r0 = (n_rows * 7 + n_tok) % (18 - n_rows);
                        let t0 = (n_rows + n_tok * 3) % (10 - n_tok);
                        let wt = &w[r0 * wrow..(r0 + n_rows) * wrow];
                        let at = &a[t0 * arow..(t0 + n_tok) * arow];
                        for stride in [n_rows, n_rows + 3] {
                            failures.extend(check_tile(
                                ty, cols, wt, n_rows, at, n_tok, stride, "random",
                            ));
                        }
                    }
                }
            }
        }
        assert_no_failures(&failures);
    }

    #[test]
    fn tile_token_chunks_beyond_32() {
        // More tokens than one stack-accumulator chunk, and an odd row count.
        if !crate::quant::k_quants::has_avx2_fma() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut failures = Vec::new();
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let cols = 512;
            let w = random_blocks(ty, 5 * 2, &mut rng);
            let a = random_acts(cols, 70, &mut rng);
            failures.extend(check_tile(ty, cols, &w, 5, &a, 70, 6, "70 tokens"));
        }
        assert_no_failures(&failures);
    }

    #[test]
    fn tile_clamps_short_inputs() {
        // Lengths shorter than claimed (a caller bug) must clamp, never read or write out of
        // bounds. Only in release: the debug_asserts fire first, by design.
        if cfg!(debug_assertions) || !crate::quant::k_quants::has_avx2_fma() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let tile = tile_fn(ty).unwrap();
            let cols = 512;
            let wrow = ty.row_bytes(cols).unwrap();
            let arow = GgmlType::Q8_K.row_bytes(cols).unwrap();
            let w = random_blocks(ty, 2 * 4, &mut rng);
            let a = random_acts(cols, 5, &mut rng);
            // 4 rows and 5 tokens claimed; 3.5 rows and 2.5 tokens given; output of 7.
            let mut out = vec![SENTINEL; 7];
            tile(
                cols,
                &w[..3 * wrow + 10],
                4,
                &a[..2 * arow + 10],
                5,
                &mut out,
                4,
            );
            let mut want = vec![SENTINEL; 7];
            let scalar = vec_dot_fn_scalar(ty).unwrap();
            for t in 0..2 {
                for r in 0..3 {
                    if t * 4 + r < 7 {
                        want[t * 4 + r] =
                            scalar(cols, &w[r * wrow..][..wrow], &a[t * arow..][..arow]);
                    }
                }
            }
            for (i, (&g, &e)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                    "{ty} out[{i}]: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn tile_real_gemma3_q4_k_q6_k_tensors() {
        use crate::gguf::GgufFile;
        if !crate::quant::k_quants::has_avx2_fma() {
            return;
        }
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/gemma-3-270m-q4_k_m.gguf"
        );
        assert!(
            std::path::Path::new(path).exists(),
            "{path} is missing: run `scripts/fetch-models` first"
        );
        let file = GgufFile::open(path).expect("open gemma-3 gguf");
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let (mut n_q4, mut n_q6) = (0, 0);
        let mut failures = Vec::new();
        for info in &file.tensors {
            match info.ty {
                GgmlType::Q4_K => n_q4 += 1,
                GgmlType::Q6_K => n_q6 += 1,
                _ => continue,
            }
            let ty = info.ty;
            let data = file.tensor_data(info);
            let (cols, rows) = (info.n_cols(), info.n_rows());
            let wrow = ty.row_bytes(cols).expect("row bytes");
            assert_eq!(data.len(), rows * wrow, "{}: data size", info.name);
            let n_tok = 8;
            let a = random_acts(cols, n_tok, &mut rng);
            for _ in 0..2 {
                let n_rows = rng.gen_range(1..=16usize).min(rows);
                let r0 = rng.gen_range(0..=rows - n_rows);
                let w = &data[r0 * wrow..(r0 + n_rows) * wrow];
                failures.extend(check_tile(
                    ty, cols, w, n_rows, &a, n_tok, n_rows, &info.name,
                ));
            }
        }
        assert!(
            n_q4 > 0 && n_q6 > 0,
            "expected Q4_K and Q6_K tensors, got {n_q4} / {n_q6}"
        );
        assert_no_failures(&failures);
    }

    /// Throughput of the tile kernel against one dot per pair, on a caller-sized tile
    /// (16 rows × 32 tokens, and 8 tokens for batched decode). Run with
    /// `cargo test --release -p llmsd-engine --lib tile_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn tile_throughput() {
        use std::time::Instant;
        if !crate::quant::k_quants::has_avx2_fma() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q5_K] {
            for (cols, n_tok) in [(2048, 32), (1024, 32), (2048, 8)] {
                let n_rows = 16;
                let w = random_blocks(ty, n_rows * cols / QK_K, &mut rng);
                let a = random_acts(cols, n_tok, &mut rng);
                let tile = tile_fn(ty).unwrap();
                let dot = crate::quant::vec_dot_fn(ty).unwrap();
                let wrow = ty.row_bytes(cols).unwrap();
                let arow = GgmlType::Q8_K.row_bytes(cols).unwrap();
                let mut out = vec![0f32; n_rows * n_tok];
                let iters = 400;
                let macs = (iters * n_rows * n_tok * cols) as f64;
                let mut best = [f64::MAX; 2];
                for _ in 0..3 {
                    let t = Instant::now();
                    for _ in 0..iters {
                        tile(cols, &w, n_rows, &a, n_tok, &mut out, n_rows);
                        std::hint::black_box(&mut out);
                    }
                    best[0] = best[0].min(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    for _ in 0..iters {
                        for (ti, ar) in a.chunks_exact(arow).enumerate() {
                            for (r, wr) in w.chunks_exact(wrow).enumerate() {
                                out[ti * n_rows + r] = dot(cols, wr, ar);
                            }
                        }
                        std::hint::black_box(&mut out);
                    }
                    best[1] = best[1].min(t.elapsed().as_secs_f64());
                }
                eprintln!(
                    "{ty} cols={cols} 16x{n_tok}: tile {:.2} GMAC/s, per-pair vec_dot {:.2} GMAC/s ({:.2}x)",
                    macs / best[0] / 1e9,
                    macs / best[1] / 1e9,
                    best[1] / best[0]
                );
            }
        }
    }
}
