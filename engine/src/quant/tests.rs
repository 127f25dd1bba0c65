//! Tests of the quantized kernels: gguf-py fixtures as the dequantization oracle, SIMD against
//! the scalar reference, quantized dots against f32 dots, and real model tensors.
//!
//! Every test name contains `quant` (the module path does), so `cargo test -p llmsd-engine
//! --release quant` runs them all.

use std::path::PathBuf;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::gguf::GgufFile;

/// The legacy weight types (the K-quants are tested in `k_quants.rs`).
const TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant"))
}

pub(super) fn model_path(name: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(name);
    assert!(
        p.exists(),
        "model file {} is missing: run scripts/fetch-models",
        p.display()
    );
    p
}

fn put_f16(b: &mut [u8], i: usize, v: f32) {
    b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// A random f32 in roughly N(0, 1) shape with occasional outliers.
fn rand_val(rng: &mut ChaCha8Rng) -> f32 {
    let u: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * 0.87;
    if rng.gen_range(0..64) == 0 {
        u * 8.0
    } else {
        u
    }
}

/// `n` elements of random but valid weights of type `ty`: random quants, sane finite scales.
pub(super) fn random_weights(ty: GgmlType, n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let len = ty.row_bytes(n).expect("whole blocks");
    let mut w = vec![0u8; len];
    match ty {
        GgmlType::F32 => {
            for c in w.chunks_exact_mut(4) {
                c.copy_from_slice(&rand_val(rng).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in w.chunks_exact_mut(2) {
                put_f16(c, 0, rand_val(rng));
            }
        }
        _ => {
            rng.fill(&mut w[..]);
            for b in w.chunks_exact_mut(ty.type_size()) {
                let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
                put_f16(b, 0, sign * rng.gen_range(1e-3f32..5e-2));
                if ty == GgmlType::Q4_1 {
                    put_f16(b, 2, rng.gen_range(-0.4f32..0.1));
                }
            }
        }
    }
    w
}

pub(super) fn random_activations(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rand_val(rng)).collect()
}

pub(super) fn quantized(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let vt = vec_dot_type(ty);
    let mut out = vec![0u8; vt.row_bytes(x.len()).unwrap()];
    quantize_row(vt, x, &mut out).unwrap();
    out
}

fn dequantized(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, data, &mut out).unwrap();
    out
}

/// Σ|w_i·a_i| of the dequantized rows: the scale float-rounding errors are relative to.
fn sum_abs_terms(ty: GgmlType, w: &[u8], a: &[u8], n: usize) -> f64 {
    let wd = dequantized(ty, w, n);
    let ad = dequantized(vec_dot_type(ty), a, n);
    wd.iter()
        .zip(&ad)
        .map(|(x, y)| f64::from((x * y).abs()))
        .sum()
}

/// Sizes to test for `ty`: one block, a few blocks, and row lengths of real models.
fn sizes(ty: GgmlType) -> Vec<usize> {
    if ty.block_size() == 1 {
        vec![1, 7, 8, 31, 32, 33, 100, 128, 129, 576, 1000]
    } else {
        vec![32, 64, 96, 128, 256, 288, 576, 640, 1536]
    }
}

#[test]
fn quant_dequantize_matches_gguf_py_fixtures() {
    for ty in TYPES {
        let dir = fixture_dir();
        let blocks = std::fs::read(dir.join(format!("{ty}.blocks")))
            .unwrap_or_else(|e| panic!("{ty}.blocks: {e} (run scripts/gen-quant-fixtures.py)"));
        let expected: Vec<f32> = std::fs::read(dir.join(format!("{ty}.f32")))
            .unwrap_or_else(|e| panic!("{ty}.f32: {e}"))
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(
            ty.row_bytes(expected.len()),
            Some(blocks.len()),
            "{ty}: fixture sizes disagree"
        );
        let n_rows = 8;
        let n = expected.len() / n_rows;
        let row_bytes = ty.row_bytes(n).unwrap();
        for (r, (data, want)) in blocks
            .chunks_exact(row_bytes)
            .zip(expected.chunks_exact(n))
            .enumerate()
        {
            let got = dequantized(ty, data, n);
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                let ok = g.to_bits() == w.to_bits() || (g - w).abs() <= 1e-6 * w.abs();
                assert!(ok, "{ty} row {r} element {i}: got {g}, gguf-py {w}");
            }
        }
    }
}

#[test]
fn quant_simd_vec_dot_matches_scalar() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for ty in TYPES {
        let simd = vec_dot_fn(ty).unwrap();
        let scalar = vec_dot_fn_scalar(ty).unwrap();
        for n in sizes(ty) {
            for _ in 0..20 {
                let w = random_weights(ty, n, &mut rng);
                let a = quantized(ty, &random_activations(n, &mut rng));
                let (s, r) = (simd(n, &w, &a), scalar(n, &w, &a));
                let tol = 1e-4 * sum_abs_terms(ty, &w, &a, n) + 1e-6;
                assert!(
                    f64::from((s - r).abs()) <= tol,
                    "{ty} n={n}: simd {s} vs scalar {r} (tol {tol})"
                );
            }
        }
    }
}

#[test]
fn quant_simd_quantize_row_matches_scalar() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rows: Vec<Vec<f32>> = (0..50)
        .map(|i| random_activations(32 * (1 + i % 9), &mut rng))
        .collect();
    // Scale exactly 1 (amax 127): every half-way case of roundf, both signs, and zeros.
    let mut halves: Vec<f32> = (0..31).map(|k| k as f32 * 4.0 - 62.5).collect();
    halves.push(127.0);
    rows.push(halves.clone());
    rows.push(halves.iter().map(|v| -v).collect());
    rows.push(vec![0.0; 64]);
    rows.push(vec![-1e-30; 32]);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::F16, GgmlType::F32] {
        for x in &rows {
            let len = ty.row_bytes(x.len()).unwrap();
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            quantize_row(ty, x, &mut a).unwrap();
            quantize_row_scalar(ty, x, &mut b).unwrap();
            assert_eq!(a, b, "{ty}: SIMD and scalar quantization differ for {x:?}");
        }
    }
}

#[test]
fn quant_q8_reference_values() {
    // amax 127 -> d = 1: quants are roundf(x), half away from zero.
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 0.49;
    x[4] = -3.7;
    let mut q0 = [0u8; 34];
    quantize_row(GgmlType::Q8_0, &x, &mut q0).unwrap();
    assert_eq!(f16::from_le_bytes([q0[0], q0[1]]).to_f32(), 1.0);
    assert_eq!(&q0[2..7], &[127u8, 3, (-3i8) as u8, 0, (-4i8) as u8]);
    let mut q1 = [0u8; 36];
    quantize_row(GgmlType::Q8_1, &x, &mut q1).unwrap();
    assert_eq!(&q1[4..], &q0[2..]);
    // s = d * sum(qs) = 127 + 3 - 3 + 0 - 4
    assert_eq!(f16::from_le_bytes([q1[2], q1[3]]).to_f32(), 123.0);
    // All-zero block: d = 0, quants 0.
    let mut z = [0xAAu8; 36];
    quantize_row(GgmlType::Q8_1, &[0.0; 32], &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
}

#[test]
fn quant_vec_dot_close_to_f32_dot() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for ty in TYPES {
        let dot = vec_dot_fn(ty).unwrap();
        let vt = vec_dot_type(ty);
        for n in sizes(ty) {
            for _ in 0..10 {
                let w = random_weights(ty, n, &mut rng);
                let wd = dequantized(ty, &w, n);
                let x = random_activations(n, &mut rng);
                let a = quantized(ty, &x);
                let exact: f64 = wd.iter().zip(&x).map(|(p, q)| f64::from(p * q)).sum();
                let got = f64::from(dot(n, &w, &a));
                // Error bound of activation quantization: each element is off by at most half a
                // step plus the f16 rounding of the scale (127·d·2⁻¹¹), and Q4_1's offset term
                // uses s = f16(d·Σq); plus float rounding.
                let sum_abs: f64 = wd
                    .iter()
                    .zip(&x)
                    .map(|(p, q)| f64::from((p * q).abs()))
                    .sum();
                let mut bound = 1e-5 * sum_abs + 1e-6;
                match vt {
                    GgmlType::F32 => {}
                    GgmlType::F16 => bound += sum_abs * 2f64.powi(-11),
                    _ => {
                        for (i, (wb, xb)) in wd.chunks(32).zip(x.chunks(32)).enumerate() {
                            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                            let d = f64::from(amax) / 127.0;
                            let sw: f64 = wb.iter().map(|v| f64::from(v.abs())).sum();
                            bound += sw * d * (0.5 + 127.0 * 2f64.powi(-11)) * 1.01;
                            if ty == GgmlType::Q4_1 {
                                let blk = &w[i * 20..];
                                let m = f64::from(f16::from_le_bytes([blk[2], blk[3]]).to_f32());
                                bound += m.abs() * 32.0 * 127.0 * d * 2f64.powi(-10);
                            }
                        }
                    }
                }
                assert!(
                    (got - exact).abs() <= bound,
                    "{ty} n={n}: quantized dot {got} vs f32 dot {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn quant_rejects_bad_lengths_and_unsupported_types() {
    let mut out = vec![0f32; 64];
    assert!(matches!(
        dequantize_row(GgmlType::Q4_0, &[0u8; 35], &mut out),
        Err(QuantError::BadLength {
            expected: 36,
            got: 35,
            ..
        })
    ));
    assert!(matches!(
        dequantize_row(GgmlType::Q8_0, &[0u8; 34], &mut out[..33]),
        Err(QuantError::PartialBlock { .. })
    ));
    let mut q = vec![0u8; 10];
    assert!(matches!(
        quantize_row(GgmlType::Q8_0, &[0.0; 32], &mut q),
        Err(QuantError::BadLength { .. })
    ));
    assert!(matches!(
        quantize_row(GgmlType::Q4_0, &[0.0; 32], &mut q),
        Err(QuantError::Unsupported(GgmlType::Q4_0))
    ));
    for ty in [GgmlType::Q5_1, GgmlType::Q2_K, GgmlType::BF16] {
        assert!(matches!(vec_dot_fn(ty), Err(QuantError::Unsupported(t)) if t == ty));
        assert!(matches!(
            vec_dot_fn_scalar(ty),
            Err(QuantError::Unsupported(_))
        ));
        assert!(matches!(
            dequantize_row(ty, &[0u8; 210], &mut vec![0f32; 256]),
            Err(QuantError::Unsupported(_))
        ));
    }
    assert_eq!(vec_dot_type(GgmlType::Q4_1), GgmlType::Q8_1);
    assert_eq!(vec_dot_type(GgmlType::Q5_0), GgmlType::Q8_0);
    assert_eq!(vec_dot_type(GgmlType::Q6_K), GgmlType::Q8_K);
    assert_eq!(vec_dot_type(GgmlType::F16), GgmlType::F16);
}

/// Release builds: a too-short row truncates the dot to the whole blocks present, no panic.
#[cfg(not(debug_assertions))]
#[test]
fn quant_vec_dot_truncates_short_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for ty in TYPES {
        let n = 128;
        let w = random_weights(ty, n, &mut rng);
        let a = quantized(ty, &random_activations(n, &mut rng));
        for f in [vec_dot_fn(ty).unwrap(), vec_dot_fn_scalar(ty).unwrap()] {
            let short = f(n, &w[..w.len() - 1], &a);
            assert!(short.is_finite(), "{ty}");
            let _ = f(n, &w, &a[..a.len() / 2]);
            let _ = f(n, &[], &[]);
        }
    }
}

#[test]
fn quant_real_tensors_simd_matches_scalar() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut checked = std::collections::HashMap::<GgmlType, usize>::new();
    for model in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let file = GgufFile::open(model_path(model)).unwrap();
        for info in &file.tensors {
            if !TYPES.contains(&info.ty) {
                continue;
            }
            let (n, rows) = (info.n_cols(), info.n_rows());
            let row_bytes = info.ty.row_bytes(n).expect("whole blocks");
            let data = file.tensor_data(info);
            assert_eq!(data.len(), row_bytes * rows, "{}", info.name);
            let simd = vec_dot_fn(info.ty).unwrap();
            let scalar = vec_dot_fn_scalar(info.ty).unwrap();
            let picks = [0, rows / 3, rows / 2, rows - 1, rng.gen_range(0..rows)];
            for r in picks {
                let w = &data[r * row_bytes..(r + 1) * row_bytes];
                let wd = dequantized(info.ty, w, n);
                assert!(
                    wd.iter().all(|v| v.is_finite()),
                    "{model} {} row {r}: non-finite dequantized value",
                    info.name
                );
                let a = quantized(info.ty, &random_activations(n, &mut rng));
                let (s, c) = (simd(n, w, &a), scalar(n, w, &a));
                let tol = 1e-4 * sum_abs_terms(info.ty, w, &a, n) + 1e-6;
                assert!(
                    f64::from((s - c).abs()) <= tol,
                    "{model} {} row {r}: simd {s} vs scalar {c}",
                    info.name
                );
            }
            *checked.entry(info.ty).or_default() += 1;
        }
    }
    // Both models together hold Q4_1, Q5_0, Q8_0 and F32 tensors.
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::F32,
    ] {
        assert!(
            checked.get(&ty).copied().unwrap_or(0) > 0,
            "no {ty} tensor checked"
        );
    }
}

/// Throughput of the dot kernels over a matrix larger than the caches (run by hand:
/// `cargo test -p llmsd-engine --release quant_bench -- --ignored --nocapture`).
#[test]
#[ignore = "benchmark, run by hand"]
fn quant_bench_vec_dot() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let n = 1536;
    for ty in TYPES {
        let rows = (64 << 20) / ty.row_bytes(n).unwrap();
        let w = random_weights(ty, n * rows, &mut rng);
        let a = quantized(ty, &random_activations(n, &mut rng));
        let rb = ty.row_bytes(n).unwrap();
        for (name, f) in [
            ("simd", vec_dot_fn(ty).unwrap()),
            ("scalar", vec_dot_fn_scalar(ty).unwrap()),
        ] {
            let t = std::time::Instant::now();
            let mut s = 0.0f32;
            for _ in 0..3 {
                for row in w.chunks_exact(rb) {
                    s += f(n, row, &a);
                }
            }
            let secs = t.elapsed().as_secs_f64() / 3.0;
            println!(
                "{ty:>5} {name:>6}: {:6.2} GB/s of weights, {:7.1} ns/row of {n} (sum {s})",
                w.len() as f64 / secs / 1e9,
                secs * 1e9 / rows as f64
            );
        }
    }
}
