use std::sync::Arc;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::attend::{key_scores_scalar, value_accum_scalar};
use super::format::{decode_layer, encode_layer, pack_group, unpack_group};
use super::*;
use crate::kv::{AttnQuery, ContiguousKv, KvCache, KvError};

fn shape(n_layers: usize, n_kv_heads: usize, head_dim: usize, v_head_dim: usize) -> KvShape {
    KvShape {
        n_layers,
        n_kv_heads,
        head_dim,
        v_head_dim,
    }
}

/// Keys with per-channel offsets and a few outlier channels (as real keys have); plain values.
fn key_value(rng: &mut ChaCha8Rng, s: KvShape) -> (Vec<f32>, Vec<f32>) {
    let k = (0..s.n_kv_heads * s.head_dim)
        .map(|i| {
            let outlier = if i % 7 == 3 { 12.0 } else { 1.0 };
            let offset = (i % 5) as f32 * 0.3 - 0.6;
            offset + outlier * rng.gen_range(-1.0f32..1.0)
        })
        .collect();
    let v = (0..s.n_kv_heads * s.v_head_dim)
        .map(|_| rng.gen_range(-1.5f32..1.5))
        .collect();
    (k, v)
}

fn random_staged(rng: &mut ChaCha8Rng, s: KvShape, n_tokens: usize) -> StagedChunk {
    let mut c = StagedChunk::new(s);
    for l in 0..s.n_layers {
        for t in 0..CHUNK_TOKENS {
            let (k, v) = key_value(rng, s);
            c.write(l, t, &k, &v);
        }
    }
    c.set_tokens(n_tokens);
    c
}

// ---------------------------------------------------------------------------------------------
// Precision and sizes

#[test]
fn precision_names_codes_and_order() {
    assert_eq!(
        Precision::ALL,
        [
            Precision::F16,
            Precision::Int8,
            Precision::Int4,
            Precision::Int2
        ]
    );
    assert!(Precision::Int2 < Precision::Int4 && Precision::Int8 < Precision::F16);
    for p in Precision::ALL {
        assert_eq!(Precision::from_name(p.name()), Some(p));
        assert_eq!(Precision::from_code(p.code()), Some(p));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"{}\"", p.name()));
        assert_eq!(serde_json::from_str::<Precision>(&json).unwrap(), p);
    }
    assert_eq!(Precision::ALL.map(|p| p.bits()), [16, 8, 4, 2]);
    assert_eq!(Precision::from_name("int3"), None);
    assert_eq!(Precision::from_code(3), None);
}

#[test]
fn sizes_match_the_documented_layout() {
    let s = shape(30, 3, 64, 64);
    let per_layer = Precision::ALL.map(|p| layer_bytes(s, p));
    assert_eq!(per_layer, [12288, 7104, 4032, 2496]);
    assert_eq!(chunk_bytes(s, Precision::Int4), 30 * 4032);
    assert_eq!(staged_bytes(s), 30 * 24576);
    // Value rows are padded to whole groups of 16.
    let s = shape(1, 2, 8, 20);
    assert_eq!(layer_bytes(s, Precision::F16), 2 * (32 * 8 + 16 * 2 * 32));
    assert_eq!(
        layer_bytes(s, Precision::Int4),
        2 * (4 * 8 + 8 * 8 + 64 + 16 * 2 * 8)
    );
}

// ---------------------------------------------------------------------------------------------
// Packing and quantization

#[test]
fn packing_round_trips_and_follows_the_documented_bytes() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for bits in [2u32, 4, 8] {
        for _ in 0..200 {
            let codes: [u8; 16] = std::array::from_fn(|_| rng.gen_range(0..(1u32 << bits)) as u8);
            let mut packed = [0u8; 16];
            pack_group(bits, &codes, &mut packed[..2 * bits as usize]);
            assert_eq!(unpack_group(bits, &packed), codes);
        }
    }
    let codes: [u8; 16] = std::array::from_fn(|i| i as u8);
    let mut b = [0u8; 8];
    pack_group(4, &codes, &mut b);
    assert_eq!(b, [0x80, 0x91, 0xA2, 0xB3, 0xC4, 0xD5, 0xE6, 0xF7]);
    let codes: [u8; 16] = std::array::from_fn(|i| (i / 4) as u8);
    let mut b = [0u8; 4];
    pack_group(2, &codes, &mut b);
    // Byte i holds codes i, i+4, i+8, i+12 = 0, 1, 2, 3.
    assert_eq!(b, [0b11_10_01_00; 4]);
}

/// The straightforward reference: quantize one group as the docs say.
fn ref_quant(xs: &[f32], bits: u32) -> (f16, f16, Vec<u8>) {
    let levels = ((1u32 << bits) - 1) as f32;
    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s = f16::from_f32((hi - lo) / levels);
    let m = f16::from_f32(lo);
    let codes = xs
        .iter()
        .map(|&x| {
            if s.to_f32() == 0.0 {
                0
            } else {
                ((x - m.to_f32()) / s.to_f32()).round().clamp(0.0, levels) as u8
            }
        })
        .collect();
    (s, m, codes)
}

fn ref_pack(codes: &[u8], bits: u32) -> Vec<u8> {
    let mut c = [0u8; 16];
    c[..codes.len()].copy_from_slice(codes);
    match bits {
        8 => c.to_vec(),
        4 => (0..8).map(|i| c[i] | (c[i + 8] << 4)).collect(),
        2 => (0..4)
            .map(|i| c[i] | (c[i + 4] << 2) | (c[i + 8] << 4) | (c[i + 12] << 6))
            .collect(),
        _ => unreachable!(),
    }
}

fn f16_bytes(xs: &[f32], pad_to: usize) -> Vec<u8> {
    let mut out: Vec<u8> = xs
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    out.resize(2 * pad_to, 0);
    out
}

fn reference_layer(src: &StagedChunk, layer: usize, p: Precision) -> Vec<u8> {
    let s = src.shape();
    let (h, dk, dv) = (s.n_kv_heads, s.head_dim, s.v_head_dim);
    let keys = src.keys(layer);
    let values = src.values(layer);
    let mut out = Vec::new();
    for head in 0..h {
        let channel =
            |c: usize| -> Vec<f32> { (0..16).map(|t| keys[t * h * dk + head * dk + c]).collect() };
        let row = |t: usize| &values[t * h * dv + head * dv..t * h * dv + (head + 1) * dv];
        if p == Precision::F16 {
            for c in 0..dk {
                out.extend(f16_bytes(&channel(c), 16));
            }
            for t in 0..16 {
                for g in row(t).chunks(16) {
                    out.extend(f16_bytes(g, 16));
                }
            }
            continue;
        }
        let bits = p.bits();
        let kq: Vec<_> = (0..dk).map(|c| ref_quant(&channel(c), bits)).collect();
        out.extend(kq.iter().flat_map(|q| q.0.to_le_bytes()));
        out.extend(kq.iter().flat_map(|q| q.1.to_le_bytes()));
        for q in &kq {
            out.extend(ref_pack(&q.2, bits));
        }
        let vq: Vec<_> = (0..16).map(|t| ref_quant(row(t), bits)).collect();
        out.extend(vq.iter().flat_map(|q| q.0.to_le_bytes()));
        out.extend(vq.iter().flat_map(|q| q.1.to_le_bytes()));
        for q in &vq {
            for g in q.2.chunks(16) {
                out.extend(ref_pack(g, bits));
            }
        }
    }
    out
}

#[test]
fn quantization_matches_the_reference_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for s in [shape(2, 3, 64, 64), shape(1, 2, 8, 20), shape(1, 1, 3, 33)] {
        let mut src = random_staged(&mut rng, s, 16);
        // A constant key channel and a constant value row (max == min).
        for t in 0..16 {
            let (mut k, mut v) = key_value(&mut rng, s);
            k[1] = 0.75;
            if t == 5 {
                v.iter_mut().for_each(|x| *x = -0.25);
            }
            src.write(0, t, &k, &v);
        }
        for p in Precision::ALL {
            let sealed = SealedChunk::quantize(&src, p).unwrap();
            for l in 0..s.n_layers {
                let want = reference_layer(&src, l, p);
                assert_eq!(sealed.layer(l).unwrap(), &want[..], "{s:?} {p} layer {l}");
            }
        }
    }
}

/// Dequantized values are within half a step (plus f16 rounding of the scale and minimum) of
/// the originals; f16 within f16 rounding.
#[test]
fn dequantization_error_is_bounded() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let s = shape(2, 2, 24, 40);
    let src = random_staged(&mut rng, s, 16);
    for p in Precision::ALL {
        let back = SealedChunk::quantize(&src, p)
            .unwrap()
            .dequantize()
            .unwrap();
        assert_eq!(back.n_tokens(), 16);
        for l in 0..s.n_layers {
            // Groups: key channels over tokens, value rows over channels.
            let (h, dk, dv) = (s.n_kv_heads, s.head_dim, s.v_head_dim);
            let mut groups: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
            for head in 0..h {
                for c in 0..dk {
                    let idx = |t: usize| t * h * dk + head * dk + c;
                    groups.push((
                        (0..16).map(|t| src.keys(l)[idx(t)]).collect(),
                        (0..16).map(|t| back.keys(l)[idx(t)]).collect(),
                    ));
                }
                for t in 0..16 {
                    let r = t * h * dv + head * dv..t * h * dv + (head + 1) * dv;
                    groups.push((
                        src.values(l)[r.clone()].to_vec(),
                        back.values(l)[r].to_vec(),
                    ));
                }
            }
            for (x, y) in groups {
                let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let bound = if p == Precision::F16 {
                    f32::EPSILON
                } else {
                    let levels = ((1u32 << p.bits()) - 1) as f32;
                    let scale = (hi - lo) / levels;
                    let sf = f16::from_f32(scale).to_f32();
                    let mf = f16::from_f32(lo).to_f32();
                    sf / 2.0 + levels * (scale - sf).abs() + (lo - mf).abs() + 1e-5
                };
                for (a, b) in x.iter().zip(&y) {
                    let tol = if p == Precision::F16 {
                        a.abs() / 2048.0 + 1e-7
                    } else {
                        bound + 1e-6 * a.abs()
                    };
                    assert!((a - b).abs() <= tol, "{p}: {a} vs {b}, bound {tol}");
                }
            }
        }
    }
}

#[test]
fn f16_chunks_requantize_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let s = shape(2, 2, 16, 16);
    let src = random_staged(&mut rng, s, 16);
    let f16c = SealedChunk::quantize(&src, Precision::F16).unwrap();
    let master = f16c.dequantize().unwrap();
    // Dequantized f16 is exact: sealing it again gives the same bytes.
    let again = SealedChunk::quantize(&master, Precision::F16).unwrap();
    for l in 0..2 {
        assert_eq!(f16c.layer(l), again.layer(l));
    }
    // And decode_layer writes exactly what dequantize gives.
    let mut one = StagedChunk::new(s);
    let bytes = encode_layer(&master, 1, Precision::Int4).unwrap();
    decode_layer(Precision::Int4, &bytes, &mut one, 1).unwrap();
    assert!(matches!(
        decode_layer(Precision::Int8, &bytes, &mut one, 1),
        Err(ChunkError::ByteLength { .. })
    ));
    assert!(matches!(
        decode_layer(Precision::Int4, &bytes, &mut one, 2),
        Err(ChunkError::LayerOutOfRange { .. })
    ));
    let int4 = SealedChunk::quantize(&master, Precision::Int4)
        .unwrap()
        .dequantize()
        .unwrap();
    assert_eq!(one.keys(1), int4.keys(1));
    assert_eq!(one.values(1), int4.values(1));
}

// ---------------------------------------------------------------------------------------------
// Chunk objects

#[test]
fn staged_bytes_round_trip_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let s = shape(3, 2, 8, 4);
    for n in [0, 1, 7, 16] {
        let mut c = random_staged(&mut rng, s, 16);
        c.set_tokens(n);
        let bytes = c.to_bytes();
        assert_eq!(bytes.len(), 24 + 3 * n * (16 + 8) * 4);
        let back = StagedChunk::from_bytes(s, &bytes).unwrap();
        assert_eq!(back.n_tokens(), n);
        for l in 0..3 {
            let (kn, vn) = (n * 16, n * 8);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back.keys(l)[..kn]), bits(&c.keys(l)[..kn]));
            assert_eq!(bits(&back.values(l)[..vn]), bits(&c.values(l)[..vn]));
            assert!(back.keys(l)[kn..].iter().all(|&x| x == 0.0));
        }
        assert_eq!(back.to_bytes(), bytes);
        assert!(matches!(
            StagedChunk::from_bytes(s, &bytes[..bytes.len() - 1]),
            Err(ChunkError::ByteLength { .. }) | Err(ChunkError::BadHeader)
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            StagedChunk::from_bytes(s, &longer),
            Err(ChunkError::ByteLength { .. })
        ));
        assert!(matches!(
            StagedChunk::from_bytes(shape(3, 2, 8, 8), &bytes),
            Err(ChunkError::Shape { .. })
        ));
    }
    assert!(matches!(
        StagedChunk::from_bytes(s, b"KVS"),
        Err(ChunkError::BadHeader)
    ));
    assert!(matches!(
        StagedChunk::from_bytes(s, &[0u8; 24]),
        Err(ChunkError::BadHeader)
    ));
}

#[test]
fn sealed_chunk_layers_are_checked_and_set_once() {
    fn assert_send_sync<X: Send + Sync>() {}
    assert_send_sync::<SealedChunk>();
    assert_send_sync::<ChunkedKv>();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let s = shape(3, 1, 16, 16);
    let src = random_staged(&mut rng, s, 15);
    assert_eq!(
        SealedChunk::quantize(&src, Precision::Int8).err(),
        Some(ChunkError::NotFull(15))
    );
    let mut src = src;
    src.set_tokens(16);
    let full = SealedChunk::quantize(&src, Precision::Int8).unwrap();
    assert!(full.is_complete());
    assert_eq!(full.resident_bytes(), chunk_bytes(s, Precision::Int8));
    let c = SealedChunk::empty(s, Precision::Int8);
    assert!(!c.is_complete() && c.resident_bytes() == 0 && c.layer(0).is_none());
    assert_eq!(c.dequantize().err(), Some(ChunkError::Incomplete(0)));
    let lb = layer_bytes(s, Precision::Int8);
    assert_eq!(
        c.set_layer(0, vec![0; lb - 1].into()),
        Err(ChunkError::ByteLength {
            expected: lb,
            found: lb - 1
        })
    );
    assert_eq!(
        c.set_layer(3, vec![0; lb].into()),
        Err(ChunkError::LayerOutOfRange {
            layer: 3,
            n_layers: 3
        })
    );
    for l in [2, 0] {
        c.set_layer(l, full.layer(l).unwrap().into()).unwrap();
    }
    assert_eq!(
        c.set_layer(2, vec![0; lb].into()),
        Err(ChunkError::LayerAlreadySet(2))
    );
    assert_eq!(c.dequantize().err(), Some(ChunkError::Incomplete(1)));
    c.set_layer(1, full.layer(1).unwrap().into()).unwrap();
    assert!(c.is_complete());
    assert_eq!(c.resident_bytes(), full.resident_bytes());
    let (a, b) = (c.dequantize().unwrap(), full.dequantize().unwrap());
    for l in 0..3 {
        assert_eq!(a.keys(l), b.keys(l));
        assert_eq!(a.values(l), b.values(l));
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels

/// Scores and value sums of the scalar kernels equal plain f32 math on the dequantized chunk.
#[test]
fn scalar_kernels_match_dequantized_math() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let s = shape(1, 2, 24, 20);
    let src = random_staged(&mut rng, s, 16);
    for p in Precision::ALL {
        let sealed = SealedChunk::quantize(&src, p).unwrap();
        let deq = sealed.dequantize().unwrap();
        let lay = BlockLayout::new(s, p);
        for head in 0..2 {
            let block = &sealed.layer(0).unwrap()[head * lay.bytes..(head + 1) * lay.bytes];
            let nh = 3;
            let q: Vec<f32> = (0..nh * 24).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut sc = vec![0.0; nh * 16];
            key_scores_scalar(&lay, block, &q, nh, &mut sc);
            let probs: Vec<f32> = (0..nh * 16).map(|_| rng.gen_range(0.0..1.0)).collect();
            let mut o = vec![0.5; nh * 20];
            value_accum_scalar(&lay, block, &probs, nh, 3..14, &mut o);
            for j in 0..nh {
                for t in 0..16 {
                    let k = &deq.keys(0)[t * 48 + head * 24..t * 48 + head * 24 + 24];
                    let want: f32 = q[j * 24..j * 24 + 24]
                        .iter()
                        .zip(k)
                        .map(|(a, b)| a * b)
                        .sum();
                    let got = sc[j * 16 + t];
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{p} {got} {want}"
                    );
                }
                for c in 0..20 {
                    let want: f32 = 0.5
                        + (3..14)
                            .map(|t| probs[j * 16 + t] * deq.values(0)[t * 40 + head * 20 + c])
                            .sum::<f32>();
                    let got = o[j * 20 + c];
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{p} {got} {want}"
                    );
                }
            }
        }
    }
}

/// The AVX2 kernels equal the scalar ones, for every format, 1..7 heads (so batches of four
/// and remainders), odd head sizes and partial token ranges.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_kernels_match_scalar() {
    if !super::attend::simd_available() {
        eprintln!("no AVX2/FMA/F16C: skipped");
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for s in [
        shape(1, 2, 64, 64),
        shape(1, 1, 40, 20),
        shape(1, 1, 17, 48),
        shape(1, 1, 256, 256),
    ] {
        let src = random_staged(&mut rng, s, 16);
        for p in Precision::ALL {
            let sealed = SealedChunk::quantize(&src, p).unwrap();
            let lay = BlockLayout::new(s, p);
            let block = &sealed.layer(0).unwrap()[..lay.bytes];
            let (dk, dv) = (s.head_dim, s.v_head_dim);
            for nh in 1..=7 {
                let q: Vec<f32> = (0..nh * dk).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut a = vec![0.0; nh * 16];
                let mut b = vec![0.0; nh * 16];
                let mut qs = vec![0.0; 4 * dk];
                key_scores_scalar(&lay, block, &q, nh, &mut a);
                // SAFETY: the CPU features were checked above.
                unsafe { super::avx2::key_scores(&lay, block, &q, nh, &mut b, &mut qs) };
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                        "{p} nh {nh}: {x} vs {y}"
                    );
                }
                for ts in [0..16, 0..1, 5..16, 3..9, 15..16] {
                    let probs: Vec<f32> = (0..nh * 16).map(|_| rng.gen_range(0.0..1.0)).collect();
                    let init: Vec<f32> = (0..nh * dv).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    let (mut a, mut b) = (init.clone(), init);
                    value_accum_scalar(&lay, block, &probs, nh, ts.clone(), &mut a);
                    // SAFETY: as above.
                    unsafe {
                        super::avx2::value_accum(&lay, block, &probs, nh, ts.clone(), &mut b)
                    };
                    for (x, y) in a.iter().zip(&b) {
                        assert!(
                            (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                            "{p} nh {nh} {ts:?}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ChunkedKv

/// (layer, pos, window, heads, q)
type Q = (
    usize,
    usize,
    Option<usize>,
    std::ops::Range<usize>,
    Vec<f32>,
);

struct Fixture {
    shape: KvShape,
    n_heads: usize,
    len: usize,
    /// Per layer and position, the f32 keys and values written.
    rows: Vec<Vec<(Vec<f32>, Vec<f32>)>>,
}

impl Fixture {
    fn new(rng: &mut ChaCha8Rng, shape: KvShape, n_heads: usize, len: usize) -> Self {
        let rows = (0..shape.n_layers)
            .map(|_| (0..len).map(|_| key_value(rng, shape)).collect())
            .collect();
        Fixture {
            shape,
            n_heads,
            len,
            rows,
        }
    }

    fn chunked(&self) -> ChunkedKv {
        let mut kv = ChunkedKv::new(self.shape, 4096);
        kv.reserve(self.len).unwrap();
        for (l, rows) in self.rows.iter().enumerate() {
            for (p, (k, v)) in rows.iter().enumerate() {
                kv.write(l, p, k, v);
            }
        }
        kv.set_len(self.len);
        kv
    }

    /// Seals the full slots with the given precisions (`None`: keep staged), cycling.
    fn seal(&self, kv: &mut ChunkedKv, formats: &[Option<Precision>]) {
        for i in 0..self.len / 16 {
            if let Some(p) = formats[i % formats.len()] {
                let ChunkSlot::Staged(st) = &kv.slots()[i] else {
                    continue;
                };
                let sealed = SealedChunk::quantize(st, p).unwrap();
                kv.replace_slot(i, ChunkSlot::Sealed(Arc::new(sealed)))
                    .unwrap();
            }
        }
    }

    /// A contiguous cache holding what `kv` holds (sealed slots dequantized).
    fn contiguous_of(&self, kv: &ChunkedKv) -> ContiguousKv {
        let mut c = ContiguousKv::new(self.shape, 4096);
        c.reserve(self.len).unwrap();
        for (i, slot) in kv.slots().iter().enumerate() {
            let st = match slot {
                ChunkSlot::Staged(s) => (**s).clone(),
                ChunkSlot::Sealed(s) => s.dequantize().unwrap(),
            };
            let (kw, vw) = (
                self.shape.n_kv_heads * self.shape.head_dim,
                self.shape.n_kv_heads * self.shape.v_head_dim,
            );
            for l in 0..self.shape.n_layers {
                for t in 0..16 {
                    let p = i * 16 + t;
                    if p < self.len {
                        c.write(
                            l,
                            p,
                            &st.keys(l)[t * kw..(t + 1) * kw],
                            &st.values(l)[t * vw..(t + 1) * vw],
                        );
                    }
                }
            }
        }
        c.set_len(self.len);
        c
    }

    fn contiguous(&self) -> ContiguousKv {
        let mut c = ContiguousKv::new(self.shape, 4096);
        c.reserve(self.len).unwrap();
        for (l, rows) in self.rows.iter().enumerate() {
            for (p, (k, v)) in rows.iter().enumerate() {
                c.write(l, p, k, v);
            }
        }
        c.set_len(self.len);
        c
    }

    fn queries(&self, rng: &mut ChaCha8Rng) -> Vec<Q> {
        let hd = self.shape.head_dim;
        let mut out = Vec::new();
        let last = self.len - 1;
        for (pos, window, heads) in [
            (last, None, 0..self.n_heads),
            (last, Some(21), 1..self.n_heads - 1),
            (37.min(last), None, 2..5.min(self.n_heads)),
            (last, Some(40), 0..1),
            (20.min(last), Some(7), 0..self.n_heads),
            (0, None, 0..self.n_heads),
            (
                31.min(last),
                Some(16),
                3.min(self.n_heads - 1)..self.n_heads,
            ),
        ] {
            for layer in 0..self.shape.n_layers {
                let q: Vec<f32> = (0..self.n_heads * hd)
                    .map(|_| rng.gen_range(-0.4..0.4))
                    .collect();
                out.push((layer, pos, window, heads.clone(), q));
            }
        }
        out
    }
}

fn run(kv: &dyn KvCache, n_heads: usize, dv: usize, q: &Q) -> Vec<f32> {
    let (layer, pos, window, heads, qv) = q;
    let query = AttnQuery {
        layer: *layer,
        pos: *pos,
        window: *window,
        heads: heads.clone(),
        q: qv,
        n_heads,
        prefetch: true,
    };
    let mut out = vec![f32::NAN; heads.len() * dv];
    kv.attend(&query, &mut out, &mut Vec::new());
    out
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn staged_attention_equals_contiguous() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for (s, n_heads, len) in [
        (shape(2, 3, 64, 64), 9, 77),
        (shape(1, 2, 24, 20), 6, 48),
        (shape(1, 1, 8, 8), 4, 5),
    ] {
        let f = Fixture::new(&mut rng, s, n_heads, len);
        let (a, b) = (f.chunked(), f.contiguous());
        for q in f.queries(&mut rng) {
            assert_close(
                &run(&a, n_heads, s.v_head_dim, &q),
                &run(&b, n_heads, s.v_head_dim, &q),
                1e-5,
                "staged",
            );
        }
    }
}

/// Mixed slots (staged and every format) attend like a contiguous cache holding the same
/// (dequantized) data; f16 slots like the original data within f16 tolerance. Both the AVX2
/// and the scalar build of the loop.
#[test]
fn mixed_slots_attend_like_contiguous() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mixed = [
        Some(Precision::F16),
        Some(Precision::Int4),
        None,
        Some(Precision::Int2),
        Some(Precision::Int8),
    ];
    for (s, n_heads, len) in [
        (shape(2, 3, 64, 64), 9, 90),
        (shape(1, 2, 40, 20), 6, 64),
        (shape(1, 1, 256, 256), 4, 50),
    ] {
        let f = Fixture::new(&mut rng, s, n_heads, len);
        let mut kv = f.chunked();
        f.seal(&mut kv, &mixed);
        let reference = f.contiguous_of(&kv);
        let mut f16_only = f.chunked();
        f.seal(&mut f16_only, &[Some(Precision::F16)]);
        let original = f.contiguous();
        for q in f.queries(&mut rng) {
            let want = run(&reference, n_heads, s.v_head_dim, &q);
            assert_close(&run(&kv, n_heads, s.v_head_dim, &q), &want, 1e-4, "mixed");
            let (layer, pos, window, heads, qv) = &q;
            let query = AttnQuery {
                layer: *layer,
                pos: *pos,
                window: *window,
                heads: heads.clone(),
                q: qv,
                n_heads,
                prefetch: true,
            };
            let mut out = vec![0.0; heads.len() * s.v_head_dim];
            kv.attend_scalar(&query, &mut out, &mut Vec::new());
            assert_close(&out, &want, 1e-4, "mixed scalar");
            #[cfg(target_arch = "x86_64")]
            if super::attend::simd_available() {
                // SAFETY: checked just above.
                unsafe { kv.attend_avx2(&query, &mut out, &mut Vec::new()) };
                assert_close(&out, &want, 1e-4, "mixed avx2");
                // All-f16 caches take the row kernels for full chunks: against the scalar
                // loop on the same cache.
                let mut scalar = vec![0.0; out.len()];
                f16_only.attend_scalar(&query, &mut scalar, &mut Vec::new());
                // SAFETY: checked just above.
                unsafe { f16_only.attend_avx2(&query, &mut out, &mut Vec::new()) };
                assert_close(&out, &scalar, 1e-5, "f16 avx2 vs scalar");
            }
            assert_close(
                &run(&f16_only, n_heads, s.v_head_dim, &q),
                &run(&original, n_heads, s.v_head_dim, &q),
                3e-3,
                "f16 vs original",
            );
        }
    }
}

#[test]
fn densities_sum_to_one_per_head() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let s = shape(2, 3, 64, 64);
    let f = Fixture::new(&mut rng, s, 9, 70);
    let mut kv = f.chunked();
    f.seal(&mut kv, &[Some(Precision::Int4), None]);
    assert_eq!(kv.densities(), vec![Density::default(); 5]);
    let q: Vec<f32> = (0..9 * 64).map(|_| rng.gen_range(-0.4..0.4)).collect();
    let attend = |kv: &ChunkedKv, layer, pos, window, heads: std::ops::Range<usize>| {
        let mut out = vec![0.0; heads.len() * 64];
        let query = AttnQuery {
            layer,
            pos,
            window,
            heads,
            q: &q,
            n_heads: 9,
            prefetch: true,
        };
        kv.attend(&query, &mut out, &mut Vec::new());
    };
    attend(&kv, 0, 69, None, 0..9);
    let d = kv.densities();
    assert!(d.iter().all(|d| d.observations == 9));
    let total: f64 = d.iter().map(|d| d.mass).sum();
    assert!((total - 9.0).abs() < 1e-4, "{total}");
    // A window over slots 2..4 only, two heads.
    attend(&kv, 1, 60, Some(20), 2..4);
    let d2 = kv.densities();
    assert_eq!(
        d2.iter().map(|d| d.observations).collect::<Vec<_>>(),
        vec![9, 9, 11, 11, 9]
    );
    let added: f64 = d2.iter().zip(&d).map(|(a, b)| a.mass - b.mass).sum();
    assert!((added - 2.0).abs() < 1e-4, "{added}");
    assert!(d2[2].mean() > 0.0 && Density::default().mean() == 0.0);
    // Sampling: only layers 0, 2, ... count.
    kv.reset_densities();
    kv.set_density_layers(2);
    attend(&kv, 1, 69, None, 0..9);
    assert_eq!(kv.densities(), vec![Density::default(); 5]);
    attend(&kv, 0, 69, None, 0..9);
    assert!(kv.densities().iter().all(|d| d.observations == 9));
    kv.set_density_layers(0);
    kv.reset_densities();
    attend(&kv, 0, 69, None, 0..9);
    assert_eq!(kv.densities(), vec![Density::default(); 5]);
}

#[test]
fn layer_gate_wakes_and_fails() {
    let gate = Arc::new(LayerGate::new());
    let g = gate.clone();
    let waiter = std::thread::spawn(move || (g.wait(0), g.wait(2)));
    std::thread::sleep(std::time::Duration::from_millis(20));
    gate.advance(1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    gate.advance(3);
    assert_eq!(waiter.join().unwrap(), (Ok(()), Ok(())));
    gate.advance(2); // never moves backwards
    assert_eq!(gate.ready(), 3);
    let g = gate.clone();
    let waiter = std::thread::spawn(move || g.wait(5));
    std::thread::sleep(std::time::Duration::from_millis(20));
    gate.fail("disk error".into());
    assert_eq!(
        waiter.join().unwrap(),
        Err(KvError::Unavailable("disk error".into()))
    );
    // Layers already ready stay readable.
    assert_eq!(gate.wait(2), Ok(()));
    assert!(gate.wait(3).is_err());
}

/// A restore pipelined with attention: slots filled layer by layer on another thread, the
/// reader waits per layer through `wait_layer`.
#[test]
fn pipelined_restore_through_the_gate() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let s = shape(4, 2, 16, 16);
    let f = Fixture::new(&mut rng, s, 4, 40);
    let mut full = f.chunked();
    f.seal(&mut full, &[Some(Precision::Int8)]);
    let reference = f.contiguous_of(&full);
    let sources: Vec<Arc<SealedChunk>> = full.slots()[..2]
        .iter()
        .map(|s| match s {
            ChunkSlot::Sealed(c) => c.clone(),
            ChunkSlot::Staged(_) => unreachable!(),
        })
        .collect();
    let mut slots: Vec<ChunkSlot> = full.into_slots();
    let empties: Vec<Arc<SealedChunk>> = (0..2)
        .map(|_| Arc::new(SealedChunk::empty(s, Precision::Int8)))
        .collect();
    for (i, e) in empties.iter().enumerate() {
        slots[i] = ChunkSlot::Sealed(e.clone());
    }
    let mut kv = ChunkedKv::from_slots(s, 64, slots, 40).unwrap();
    assert!(matches!(kv.wait_layer(0), Err(KvError::Unavailable(_))));
    let gate = Arc::new(LayerGate::new());
    kv.set_gate(Some(gate.clone()));
    let loader = std::thread::spawn(move || {
        for l in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            for (e, src) in empties.iter().zip(&sources) {
                e.set_layer(l, src.layer(l).unwrap().into()).unwrap();
            }
            gate.advance(l + 1);
        }
    });
    for l in 0..4 {
        kv.wait_layer(l).unwrap();
        let q = (
            l,
            39,
            None,
            0..4,
            (0..4 * 16).map(|_| rng.gen_range(-0.4..0.4)).collect(),
        );
        assert_close(
            &run(&kv, 4, 16, &q),
            &run(&reference, 4, 16, &q),
            1e-5,
            "restored",
        );
    }
    loader.join().unwrap();
}

#[test]
fn from_slots_and_into_slots_round_trip() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let s = shape(2, 1, 8, 8);
    let f = Fixture::new(&mut rng, s, 2, 40);
    let mut kv = f.chunked();
    f.seal(&mut kv, &[Some(Precision::Int4)]);
    let q = (
        1,
        39,
        None,
        0..2,
        (0..16).map(|_| rng.gen_range(-1.0..1.0)).collect(),
    );
    let before = run(&kv, 2, 8, &q);
    let slots = kv.into_slots();
    assert!(matches!(slots[1], ChunkSlot::Sealed(_)) && matches!(slots[2], ChunkSlot::Staged(_)));
    let back = ChunkedKv::from_slots(s, 64, slots, 40).unwrap();
    assert_eq!(back.len(), 40);
    assert_eq!(run(&back, 2, 8, &q), before);
    let slots = back.into_slots();

    let staged = |n| {
        ChunkSlot::Staged(Box::new(random_staged(
            &mut ChaCha8Rng::seed_from_u64(1),
            s,
            n,
        )))
    };
    let sealed = || {
        ChunkSlot::Sealed(Arc::new(
            SealedChunk::quantize(
                &random_staged(&mut ChaCha8Rng::seed_from_u64(1), s, 16),
                Precision::Int8,
            )
            .unwrap(),
        ))
    };
    assert_eq!(
        ChunkedKv::from_slots(s, 32, slots, 40).err(),
        Some(ChunkError::Capacity {
            len: 40,
            capacity: 32
        })
    );
    assert_eq!(
        ChunkedKv::from_slots(s, 64, vec![staged(16)], 17).err(),
        Some(ChunkError::SlotCount { slots: 1, len: 17 })
    );
    assert!(matches!(
        ChunkedKv::from_slots(s, 64, vec![sealed(), sealed()], 20),
        Err(ChunkError::Slot { slot: 1, .. })
    ));
    assert!(matches!(
        ChunkedKv::from_slots(s, 64, vec![sealed(), staged(3)], 20),
        Err(ChunkError::Slot { slot: 1, .. })
    ));
    let other = ChunkSlot::Staged(Box::new(StagedChunk::new(shape(2, 1, 8, 16))));
    assert!(matches!(
        ChunkedKv::from_slots(s, 64, vec![other], 1),
        Err(ChunkError::Shape { .. })
    ));
    // A staged tail holding more tokens than needed is trimmed.
    let kv = ChunkedKv::from_slots(s, 64, vec![sealed(), staged(16)], 20).unwrap();
    let ChunkSlot::Staged(t) = &kv.slots()[1] else {
        unreachable!()
    };
    assert_eq!(t.n_tokens(), 4);
    assert_eq!(
        ChunkedKv::from_slots(s, 64, Vec::new(), 0).unwrap().len(),
        0
    );
}

#[test]
fn writing_into_a_sealed_slot_unseals_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let s = shape(2, 2, 16, 16);
    let f = Fixture::new(&mut rng, s, 4, 48);
    let mut kv = f.chunked();
    f.seal(&mut kv, &[Some(Precision::Int4)]);
    let ChunkSlot::Sealed(old) = &kv.slots()[1] else {
        unreachable!()
    };
    let old = old.dequantize().unwrap();
    let (k, v) = key_value(&mut rng, s);
    kv.write(1, 20, &k, &v);
    let ChunkSlot::Staged(st) = &kv.slots()[1] else {
        panic!("slot 1 still sealed")
    };
    assert_eq!(st.n_tokens(), 16);
    assert_eq!(&st.keys(1)[4 * 32..5 * 32], &k[..]);
    assert_eq!(&st.values(1)[4 * 32..5 * 32], &v[..]);
    assert_eq!(&st.keys(1)[..4 * 32], &old.keys(1)[..4 * 32]);
    assert_eq!(st.keys(0), old.keys(0));
    assert!(matches!(kv.slots()[0], ChunkSlot::Sealed(_)));
    // A sealed slot cannot be put where positions past the length would be sealed.
    let sealed = SealedChunk::quantize(&old, Precision::Int8).unwrap();
    kv.truncate(40);
    assert!(kv
        .replace_slot(2, ChunkSlot::Sealed(Arc::new(sealed)))
        .is_err());
}

#[test]
fn truncate_and_set_len() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let s = shape(1, 1, 8, 8);
    let f = Fixture::new(&mut rng, s, 1, 64);
    let mut kv = f.chunked();
    f.seal(&mut kv, &[Some(Precision::Int8)]);
    assert!(kv.slots().iter().all(|s| matches!(s, ChunkSlot::Sealed(_))));
    kv.truncate(70);
    assert_eq!(kv.len(), 64);
    kv.truncate(40);
    assert_eq!(kv.len(), 40);
    assert_eq!(kv.slots().len(), 3);
    assert!(matches!(kv.slots()[1], ChunkSlot::Sealed(_)));
    let ChunkSlot::Staged(t) = &kv.slots()[2] else {
        panic!("slot 2 still sealed")
    };
    assert_eq!(t.n_tokens(), 8);
    kv.set_len(32);
    assert_eq!(kv.len(), 32);
    let ChunkSlot::Staged(t) = &kv.slots()[2] else {
        unreachable!()
    };
    assert_eq!(t.n_tokens(), 0);
    kv.set_len(20);
    assert!(matches!(kv.slots()[1], ChunkSlot::Staged(_)));
    assert_eq!(kv.densities().len(), 3);
    // Growing again appends staged slots; the capacity holds.
    kv.reserve(100).unwrap();
    assert_eq!(kv.slots().len(), 7);
    assert_eq!(
        kv.reserve(4097),
        Err(KvError::Full {
            needed: 4097,
            capacity: 4096
        })
    );
    kv.truncate(0);
    assert!(kv.is_empty() && kv.slots().is_empty());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_exp_and_softmax_match_scalar() {
    if !super::attend::simd_available() {
        return;
    }
    let mut worst = 0.0f32;
    let mut x = -87.0f32;
    while x <= 0.0 {
        let (a, b) = (super::avx2::exp_one(x), x.exp());
        worst = worst.max((a - b).abs() / b);
        x += 0.0137;
    }
    assert!(worst < 4e-7, "relative error {worst}");
    assert_eq!(super::avx2::exp_one(-100.0), 0.0);
    assert_eq!(super::avx2::exp_one(0.0), 1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    for n in [1, 5, 8, 13, 64, 77] {
        let rows: Vec<f32> = (0..3 * n).map(|_| rng.gen_range(-30.0..30.0)).collect();
        let mut a = rows.clone();
        // SAFETY: checked above.
        unsafe { super::avx2::softmax_rows(&mut a, n) };
        for (r, ar) in rows.chunks(n).zip(a.chunks(n)) {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = r.iter().map(|x| (x - max).exp()).collect();
            let s: f32 = e.iter().sum();
            for (x, y) in e.iter().zip(ar) {
                assert!(
                    (x / s - y).abs() <= 1e-6 * (1.0 + x / s),
                    "{} vs {y}",
                    x / s
                );
            }
        }
    }
}

#[test]
fn codes_round_half_away_from_zero() {
    use super::format::code_of;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for levels in [3u32, 15, 255] {
        let l = levels as f32;
        let mut cases: Vec<f32> = (0..20000).map(|_| rng.gen_range(-2.0..l + 2.0)).collect();
        cases.extend((0..=2 * levels + 2).map(|k| k as f32 * 0.5 - 0.5));
        cases.extend([0.49999997, 0.5, 1.4999999, f32::NAN, f32::INFINITY, -0.0]);
        for v in cases {
            let want = if v.is_nan() {
                0
            } else {
                v.round().clamp(0.0, l) as u8
            };
            assert_eq!(code_of(v, 1.0, 0.0, levels), want, "{v} levels {levels}");
        }
    }
}

#[test]
fn codes_of_matches_code_of() {
    use super::format::{code_of, codes_of};
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let specials = [
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-30,
    ];
    for levels in [3u32, 15, 255] {
        for round in 0..4000 {
            let scale = match round % 5 {
                0 => 0.0,
                1 => f16::from_f32(rng.gen_range(1e-6f32..1e-3)).to_f32(),
                _ => f16::from_f32(rng.gen_range(0.01f32..2.0)).to_f32(),
            };
            let min = f16::from_f32(rng.gen_range(-3.0f32..1.0)).to_f32();
            let n = if round % 7 == 0 {
                rng.gen_range(1..16)
            } else {
                16
            };
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.gen_range(0..10) == 0 {
                        specials[rng.gen_range(0..specials.len())]
                    } else {
                        min + scale * rng.gen_range(-2.0f32..levels as f32 + 2.0)
                    }
                })
                .collect();
            let got = codes_of(&x, scale, min, levels);
            for (i, &c) in got.iter().enumerate() {
                let want = x.get(i).map_or(0, |&v| code_of(v, scale, min, levels));
                assert_eq!(c, want, "x={:?} scale={scale} min={min}", x.get(i));
            }
        }
    }
}

#[test]
fn slice_f16_conversion_rounds_as_from_f32() {
    use half::slice::HalfFloatSliceExt;
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    // Random bit patterns (every exponent, NaNs included) and values near f16 boundaries.
    let mut xs: Vec<f32> = (0..200_000).map(|_| f32::from_bits(rng.gen())).collect();
    xs.extend((0..=u16::MAX).flat_map(|h| {
        let v = f16::from_bits(h).to_f32();
        [
            v,
            f32::from_bits(v.to_bits().wrapping_add(1)),
            f32::from_bits(v.to_bits().wrapping_sub(1)),
        ]
    }));
    xs.truncate(xs.len() / 16 * 16);
    let mut h = vec![f16::ZERO; xs.len()];
    h.convert_from_f32_slice(&xs);
    for (x, h) in xs.iter().zip(&h) {
        let want = f16::from_f32(*x);
        // NaNs stay NaNs (their payload is not part of the format).
        assert!(
            want.to_bits() == h.to_bits() || (want.is_nan() && h.is_nan()),
            "{x:e}: {:#06x} against {:#06x}",
            h.to_bits(),
            want.to_bits()
        );
    }
    let mut back = vec![0.0f32; h.len()];
    h.convert_to_f32_slice(&mut back);
    for (h, b) in h.iter().zip(&back) {
        assert!(h.to_f32().to_bits() == b.to_bits() || (h.is_nan() && b.is_nan()));
    }
}

#[test]
fn layer_buffers_come_back_in_layer_order() {
    let s = shape(3, 2, 8, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let staged = random_staged(&mut rng, s, CHUNK_TOKENS);
    let chunk = SealedChunk::quantize(&staged, Precision::Int4).unwrap();
    let layers: Vec<Vec<u8>> = (0..3).map(|l| chunk.layer(l).unwrap().to_vec()).collect();
    let back = chunk.into_layer_buffers();
    assert_eq!(back.len(), 3);
    for (b, l) in back.iter().zip(&layers) {
        assert_eq!(&**b, l.as_slice());
    }
    // Only the layers present are returned.
    let partial = SealedChunk::empty(s, Precision::Int4);
    partial
        .set_layer(1, layers[1].clone().into_boxed_slice())
        .unwrap();
    assert_eq!(
        partial.into_layer_buffers(),
        vec![layers[1].clone().into_boxed_slice()]
    );
}

/// Speed of sealing and unsealing a SmolLM2-shaped chunk (30 layers, 3 kv heads of 64): run
/// with `cargo test --release -p llmsd-engine quantize_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn quantize_speed() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let s = shape(30, 3, 64, 64);
    let src = random_staged(&mut rng, s, 16);
    let rounds = 50;
    for p in Precision::ALL {
        let t = std::time::Instant::now();
        let mut sealed = None;
        for _ in 0..rounds {
            sealed = Some(SealedChunk::quantize(&src, p).unwrap());
        }
        let q = t.elapsed().as_secs_f64() / rounds as f64;
        let sealed = sealed.unwrap();
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(sealed.dequantize().unwrap());
        }
        let d = t.elapsed().as_secs_f64() / rounds as f64;
        println!(
            "{p}: quantize {:.3} ms, dequantize {:.3} ms a chunk",
            q * 1e3,
            d * 1e3
        );
    }
}
