//! Staged (f32) and sealed (quantized) chunks, and the conversions between them.

use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{layer_bytes, BlockLayout, ChunkError, Precision, CHUNK_TOKENS};
use crate::kv::KvShape;

const T: usize = CHUNK_TOKENS;

/// Full-precision (f32) keys/values of up to 16 tokens, all layers; writable. Used for the open
/// tail chunk of a context and for chunks being recomputed.
#[derive(Clone, Debug)]
pub struct StagedChunk {
    shape: KvShape,
    n_tokens: usize,
    /// Per layer, `[t][kv_head][head_dim]`, 16 rows.
    keys: Vec<f32>,
    /// Per layer, `[t][kv_head][v_head_dim]`, 16 rows.
    values: Vec<f32>,
}

/// `to_bytes` header: magic, then n_tokens, n_layers, n_kv_heads, head_dim, v_head_dim (u32).
const STAGED_MAGIC: &[u8; 4] = b"KVS1";
const STAGED_HEADER: usize = 4 + 5 * 4;

impl StagedChunk {
    pub fn new(shape: KvShape) -> Self {
        StagedChunk {
            shape,
            n_tokens: 0,
            keys: vec![0.0; shape.n_layers * T * k_width(shape)],
            values: vec![0.0; shape.n_layers * T * v_width(shape)],
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Tokens valid.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Sets the number of valid tokens (at most 16).
    pub fn set_tokens(&mut self, n: usize) {
        debug_assert!(n <= T);
        self.n_tokens = n.min(T);
    }

    /// Stores token `t`'s keys (`n_kv_heads * head_dim`) and values of `layer`. Out-of-range
    /// arguments are ignored (and assert in debug builds).
    pub fn write(&mut self, layer: usize, t: usize, k: &[f32], v: &[f32]) {
        let (kw, vw) = (k_width(self.shape), v_width(self.shape));
        debug_assert!(layer < self.shape.n_layers && t < T && k.len() == kw && v.len() == vw);
        if layer >= self.shape.n_layers || t >= T || k.len() != kw || v.len() != vw {
            return;
        }
        let kr = (layer * T + t) * kw;
        self.keys[kr..kr + kw].copy_from_slice(k);
        let vr = (layer * T + t) * vw;
        self.values[vr..vr + vw].copy_from_slice(v);
    }

    /// Keys of `layer`: `[t][kv_head][head_dim]`, 16 rows (empty if `layer` is out of range).
    pub fn keys(&self, layer: usize) -> &[f32] {
        let n = T * k_width(self.shape);
        self.keys.get(layer * n..(layer + 1) * n).unwrap_or(&[])
    }

    /// Values of `layer`: `[t][kv_head][v_head_dim]`, 16 rows.
    pub fn values(&self, layer: usize) -> &[f32] {
        let n = T * v_width(self.shape);
        self.values.get(layer * n..(layer + 1) * n).unwrap_or(&[])
    }

    fn keys_mut(&mut self, layer: usize) -> &mut [f32] {
        let n = T * k_width(self.shape);
        &mut self.keys[layer * n..(layer + 1) * n]
    }

    fn values_mut(&mut self, layer: usize) -> &mut [f32] {
        let n = T * v_width(self.shape);
        &mut self.values[layer * n..(layer + 1) * n]
    }

    /// Exact little-endian serialisation of the valid tokens (for persisting the open tail bit
    /// for bit): a 24-byte header (`KVS1`, then `n_tokens`, `n_layers`, `n_kv_heads`,
    /// `head_dim`, `v_head_dim` as u32), then per layer the keys of tokens `0..n_tokens` and
    /// their values, as f32.
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = self.shape;
        let (kw, vw) = (k_width(s), v_width(s));
        let n = self.n_tokens;
        let mut out = Vec::with_capacity(STAGED_HEADER + s.n_layers * n * (kw + vw) * 4);
        out.extend_from_slice(STAGED_MAGIC);
        for x in [n, s.n_layers, s.n_kv_heads, s.head_dim, s.v_head_dim] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
        for l in 0..s.n_layers {
            for x in &self.keys(l)[..n * kw] {
                out.extend_from_slice(&x.to_le_bytes());
            }
            for x in &self.values(l)[..n * vw] {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    /// Parses [`Self::to_bytes`]; the header must match `shape` and the length be exact.
    pub fn from_bytes(shape: KvShape, bytes: &[u8]) -> Result<Self, ChunkError> {
        let header = bytes.get(..STAGED_HEADER).ok_or(ChunkError::BadHeader)?;
        if &header[..4] != STAGED_MAGIC {
            return Err(ChunkError::BadHeader);
        }
        let field = |i: usize| {
            let b = &header[4 + 4 * i..8 + 4 * i];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        };
        let n = field(0);
        let found = KvShape {
            n_layers: field(1),
            n_kv_heads: field(2),
            head_dim: field(3),
            v_head_dim: field(4),
        };
        if found != shape {
            return Err(ChunkError::Shape {
                expected: shape,
                found,
            });
        }
        if n > T {
            return Err(ChunkError::BadHeader);
        }
        let (kw, vw) = (k_width(shape), v_width(shape));
        let expected = STAGED_HEADER + shape.n_layers * n * (kw + vw) * 4;
        if bytes.len() != expected {
            return Err(ChunkError::ByteLength {
                expected,
                found: bytes.len(),
            });
        }
        let mut chunk = StagedChunk::new(shape);
        chunk.n_tokens = n;
        let mut floats = bytes[STAGED_HEADER..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        for l in 0..shape.n_layers {
            for (d, s) in chunk.keys_mut(l)[..n * kw].iter_mut().zip(&mut floats) {
                *d = s;
            }
            for (d, s) in chunk.values_mut(l)[..n * vw].iter_mut().zip(&mut floats) {
                *d = s;
            }
        }
        Ok(chunk)
    }
}

fn k_width(s: KvShape) -> usize {
    s.n_kv_heads * s.head_dim
}

fn v_width(s: KvShape) -> usize {
    s.n_kv_heads * s.v_head_dim
}

/// An immutable full chunk (exactly 16 tokens) at one precision. Its layers may arrive one by
/// one (pipelined restore from disk while the forward pass is already running), hence
/// `OnceLock`.
pub struct SealedChunk {
    shape: KvShape,
    precision: Precision,
    layers: Box<[OnceLock<Box<[u8]>>]>,
}

impl std::fmt::Debug for SealedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let present = self.layers.iter().filter(|l| l.get().is_some()).count();
        f.debug_struct("SealedChunk")
            .field("shape", &self.shape)
            .field("precision", &self.precision)
            .field("layers_present", &present)
            .finish()
    }
}

impl SealedChunk {
    /// Quantize from full precision (requires `n_tokens == 16`).
    pub fn quantize(src: &StagedChunk, p: Precision) -> Result<Self, ChunkError> {
        if src.n_tokens != T {
            return Err(ChunkError::NotFull(src.n_tokens));
        }
        let chunk = SealedChunk::empty(src.shape, p);
        for l in 0..src.shape.n_layers {
            chunk.set_layer(l, encode_layer(src, l, p)?)?;
        }
        Ok(chunk)
    }

    /// A chunk whose layers will be filled with [`Self::set_layer`].
    pub fn empty(shape: KvShape, p: Precision) -> Self {
        SealedChunk {
            shape,
            precision: p,
            layers: (0..shape.n_layers).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Sets one layer's bytes (exactly [`layer_bytes`] of them), once.
    pub fn set_layer(&self, layer: usize, bytes: Box<[u8]>) -> Result<(), ChunkError> {
        let slot = self.layers.get(layer).ok_or(ChunkError::LayerOutOfRange {
            layer,
            n_layers: self.shape.n_layers,
        })?;
        let expected = layer_bytes(self.shape, self.precision);
        if bytes.len() != expected {
            return Err(ChunkError::ByteLength {
                expected,
                found: bytes.len(),
            });
        }
        slot.set(bytes)
            .map_err(|_| ChunkError::LayerAlreadySet(layer))
    }

    pub fn layer(&self, layer: usize) -> Option<&[u8]> {
        self.layers.get(layer)?.get().map(|b| &**b)
    }

    /// The buffers of the layers present, for reuse: a chunk evicted to make room for one
    /// being read back lends its memory to it instead of freeing it.
    pub fn into_layer_buffers(self) -> Vec<Box<[u8]>> {
        self.layers
            .into_vec()
            .into_iter()
            .filter_map(OnceLock::into_inner)
            .collect()
    }

    /// The first layer not yet set.
    pub fn first_missing(&self) -> Option<usize> {
        self.layers.iter().position(|l| l.get().is_none())
    }

    pub fn is_complete(&self) -> bool {
        self.first_missing().is_none()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Bytes of the layers present.
    pub fn resident_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.get())
            .map(|b| b.len())
            .sum()
    }

    /// Back to f32 (exact for F16; the dequantized values for intN). Used to re-quantize from
    /// an F16 master and in tests. Fails if a layer is missing.
    pub fn dequantize(&self) -> Result<StagedChunk, ChunkError> {
        if let Some(l) = self.first_missing() {
            return Err(ChunkError::Incomplete(l));
        }
        Ok(self.dequantize_present())
    }

    /// Like [`Self::dequantize`], but missing layers read as zeros.
    pub(crate) fn dequantize_present(&self) -> StagedChunk {
        let mut out = StagedChunk::new(self.shape);
        out.n_tokens = T;
        for l in 0..self.shape.n_layers {
            if let Some(bytes) = self.layer(l) {
                // Cannot fail: set_layer checked the length, and `out` has this shape.
                let _ = decode_layer(self.precision, bytes, &mut out, l);
            }
        }
        out
    }
}

/// Largest finite f16: scales and minimums are clamped so they stay finite.
const F16_MAX: f32 = 65504.0;

/// The code of `x` in a group with f32 `scale` and `min` (both already f16-rounded): the
/// definition [`codes_of`] is tested against.
#[cfg(test)]
pub(crate) fn code_of(x: f32, scale: f32, min: f32, levels: u32) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    // clamp(round(v), 0, levels) (round half away from zero), without a libm call: for
    // 0 < v < levels, `v - trunc(v)` is exact. NaN gives 0.
    let v = (x - min) / scale;
    if v.is_nan() || v <= 0.0 {
        return 0;
    }
    if v >= levels as f32 {
        return levels as u8;
    }
    let i = v as u32;
    (i + u32::from(v - i as f32 >= 0.5)) as u8
}

/// [`code_of`] for up to 16 values (codes past `x.len()` are 0), written without branches
/// per element so that it vectorizes; the same codes (`codes_of_matches_code_of`).
#[inline(always)]
pub(crate) fn codes_of(x: &[f32], scale: f32, min: f32, levels: u32) -> [u8; T] {
    let mut out = [0u8; T];
    if scale == 0.0 {
        return out;
    }
    let top = levels as f32;
    for (c, &x) in out.iter_mut().zip(x) {
        let v = (x - min) / scale;
        // NaN and v <= 0 give 0, v >= levels gives levels.
        let r = if v > 0.0 { v } else { 0.0 };
        let r = if r < top { r } else { top };
        let i = r as i32;
        *c = (i + i32::from(r - i as f32 >= 0.5)) as u8;
    }
    out
}

/// Packs 16 codes of `bits` bits into `out` (`2 * bits` bytes): code `i` goes to byte
/// `i % (2 * bits)` at bit `bits * (i / (2 * bits))`.
#[inline(always)]
pub(crate) fn pack_group(bits: u32, codes: &[u8; T], out: &mut [u8]) {
    match bits {
        8 => pack_bits::<8>(codes, out),
        4 => pack_bits::<4>(codes, out),
        2 => pack_bits::<2>(codes, out),
        _ => {
            let gb = 2 * bits as usize;
            out[..gb].fill(0);
            for (i, &c) in codes.iter().enumerate() {
                out[i % gb] |= c << (bits as usize * (i / gb));
            }
        }
    }
}

/// [`pack_group`] with the width known at compile time (the shifts become constants).
#[inline(always)]
fn pack_bits<const B: usize>(codes: &[u8; T], out: &mut [u8]) {
    let gb = 2 * B;
    let out = &mut out[..gb];
    out.copy_from_slice(&codes[..gb]);
    for k in 1..T / gb {
        for (o, &c) in out.iter_mut().zip(&codes[k * gb..(k + 1) * gb]) {
            *o |= c << (B * k);
        }
    }
}

/// Inverse of [`pack_group`].
#[inline(always)]
pub(crate) fn unpack_group(bits: u32, g: &[u8]) -> [u8; T] {
    match bits {
        8 => unpack_bits::<8>(g),
        4 => unpack_bits::<4>(g),
        2 => unpack_bits::<2>(g),
        _ => {
            let gb = 2 * bits as usize;
            let mask = ((1u32 << bits) - 1) as u8;
            std::array::from_fn(|i| (g[i % gb] >> (bits as usize * (i / gb))) & mask)
        }
    }
}

#[inline(always)]
fn unpack_bits<const B: usize>(g: &[u8]) -> [u8; T] {
    let gb = 2 * B;
    let mask = ((1u32 << B) - 1) as u8;
    let g = &g[..gb];
    let mut out = [0u8; T];
    for (k, dst) in out.chunks_exact_mut(gb).enumerate() {
        for (o, &b) in dst.iter_mut().zip(g) {
            *o = (b >> (B * k)) & mask;
        }
    }
    out
}

/// The 16 f16 values of an f16 group.
#[inline]
pub(crate) fn f16_group(g: &[u8]) -> [f32; T] {
    let (mut h, mut out) = ([f16::ZERO; T], [0.0f32; T]);
    get_f16(&g[..2 * T], &mut h, &mut out);
    out
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// Encodes one layer of `src` (all 16 rows, whatever `n_tokens` says) at precision `p`, in the
/// layout described in the module docs.
pub fn encode_layer(
    src: &StagedChunk,
    layer: usize,
    p: Precision,
) -> Result<Box<[u8]>, ChunkError> {
    #[cfg(target_arch = "x86_64")]
    if super::attend::simd_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { encode_layer_avx2(src, layer, p) };
    }
    encode_layer_impl(src, layer, p)
}

/// [`encode_layer`] compiled for AVX2 (the same code, vectorized 8 wide by the compiler; the
/// bit-for-bit tests against the reference encoder run it on such CPUs).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn encode_layer_avx2(
    src: &StagedChunk,
    layer: usize,
    p: Precision,
) -> Result<Box<[u8]>, ChunkError> {
    encode_layer_impl(src, layer, p)
}

#[inline(always)]
fn encode_layer_impl(
    src: &StagedChunk,
    layer: usize,
    p: Precision,
) -> Result<Box<[u8]>, ChunkError> {
    let shape = src.shape;
    if layer >= shape.n_layers {
        return Err(ChunkError::LayerOutOfRange {
            layer,
            n_layers: shape.n_layers,
        });
    }
    let lay = BlockLayout::new(shape, p);
    let (kw, vw) = (k_width(shape), v_width(shape));
    let (dk, dv) = (shape.head_dim, shape.v_head_dim);
    let keys = src.keys(layer);
    let values = src.values(layer);
    let gb = p.group_bytes();
    let bits = p.bits();
    let levels = (1u32 << bits.min(8)) - 1;
    let mut out = vec![0u8; layer_bytes(shape, p)].into_boxed_slice();
    // Keys of one head, channel-major: `kt[c * 16 + t]` (for f16, exactly the key codes).
    let mut kt = vec![0.0f32; dk * T];
    // Per-group extremes, then scales and minimums (f32, f16, f16 read back as f32).
    let n_par = dk.max(T);
    let (mut lo, mut hi) = (vec![0.0f32; n_par], vec![0.0f32; n_par]);
    let mut halves = vec![f16::ZERO; dv.max(dk * T)];
    let (mut sh, mut mh) = (vec![f16::ZERO; n_par], vec![f16::ZERO; n_par]);
    let (mut s32, mut m32) = (vec![0.0f32; n_par], vec![0.0f32; n_par]);
    for (h, block) in out.chunks_exact_mut(lay.bytes).enumerate() {
        // Keys: one group per channel, over the 16 tokens. Extremes are folded token by token
        // for all channels at once (each channel in the same order as a lone fold).
        lo[..dk].fill(f32::INFINITY);
        hi[..dk].fill(f32::NEG_INFINITY);
        for t in 0..T {
            let row = &keys[t * kw + h * dk..t * kw + (h + 1) * dk];
            for (c, &x) in row.iter().enumerate() {
                kt[c * T + t] = x;
            }
            if p.is_int() {
                for ((l, u), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                    *l = l.min(x);
                    *u = u.max(x);
                }
            }
        }
        let key_codes = &mut block[lay.k_codes..lay.k_codes + dk * gb];
        if !p.is_int() {
            put_f16(&kt, &mut halves, key_codes);
        } else {
            group_params_all(
                levels,
                (&lo[..dk], &hi[..dk]),
                (&mut sh[..dk], &mut mh[..dk]),
                (&mut s32[..dk], &mut m32[..dk]),
            );
            for (c, g) in key_codes.chunks_exact_mut(gb).enumerate() {
                let codes = codes_of(&kt[c * T..(c + 1) * T], s32[c], m32[c], levels);
                pack_group(bits, &codes, g);
            }
            put_halves(&sh[..dk], &mut block[lay.k_scale..lay.k_scale + 2 * dk]);
            put_halves(&mh[..dk], &mut block[lay.k_min..lay.k_min + 2 * dk]);
        }
        // Values: per token, groups of 16 channels (the last padded with zeros).
        let row_of = |t: usize| &values[t * vw + h * dv..t * vw + (h + 1) * dv];
        let row_bytes = lay.vg * gb;
        if !p.is_int() {
            for t in 0..T {
                let at = lay.v_codes + t * row_bytes;
                // Padding stays f16 zero (the buffer starts zeroed).
                put_f16(row_of(t), &mut halves, &mut block[at..at + 2 * dv]);
            }
            continue;
        }
        for t in 0..T {
            let row = row_of(t);
            lo[t] = row.iter().copied().fold(f32::INFINITY, f32::min);
            hi[t] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
        group_params_all(
            levels,
            (&lo[..T], &hi[..T]),
            (&mut sh[..T], &mut mh[..T]),
            (&mut s32[..T], &mut m32[..T]),
        );
        put_halves(&sh[..T], &mut block[lay.v_scale..lay.v_scale + 2 * T]);
        put_halves(&mh[..T], &mut block[lay.v_min..lay.v_min + 2 * T]);
        for t in 0..T {
            let at = lay.v_codes + t * row_bytes;
            let dst = &mut block[at..at + row_bytes];
            for (xs, g) in row_of(t).chunks(T).zip(dst.chunks_exact_mut(gb)) {
                // Padding channels of the last group keep code 0.
                pack_group(bits, &codes_of(xs, s32[t], m32[t], levels), g);
            }
        }
    }
    Ok(out)
}

/// Scales and minimums of groups with extremes `lo[i]..=hi[i]`, for `levels + 1` codes:
/// `scale = max((hi − lo) / levels, 0)` and `min = lo` (both clamped to the f16 range first),
/// rounded to f16 (`sh`, `mh`) and read back (`s32`, `m32`). The conversions of whole arrays
/// take F16C 8 at a time where the CPU has it, rounding as `f16::from_f32` does.
fn group_params_all(
    levels: u32,
    (lo, hi): (&[f32], &[f32]),
    (sh, mh): (&mut [f16], &mut [f16]),
    (s32, m32): (&mut [f32], &mut [f32]),
) {
    for (((s, m), &l), &u) in s32.iter_mut().zip(m32.iter_mut()).zip(lo).zip(hi) {
        let l = l.clamp(-F16_MAX, F16_MAX);
        let u = u.clamp(-F16_MAX, F16_MAX);
        *s = ((u - l) / levels as f32).max(0.0);
        *m = l;
    }
    sh.convert_from_f32_slice(s32);
    mh.convert_from_f32_slice(m32);
    sh.convert_to_f32_slice(s32);
    mh.convert_to_f32_slice(m32);
}

/// `x` as little-endian f16 into `out` (`2 * x.len()` bytes), through `halves` (scratch of at
/// least `x.len()`).
fn put_f16(x: &[f32], halves: &mut [f16], out: &mut [u8]) {
    let h = &mut halves[..x.len()];
    h.convert_from_f32_slice(x);
    put_halves(h, out);
}

/// Little-endian f16 `bytes` into `out` (`bytes.len() / 2` values, at most `out.len()`),
/// through `halves` (scratch).
fn get_f16(bytes: &[u8], halves: &mut [f16], out: &mut [f32]) {
    let n = (bytes.len() / 2).min(out.len()).min(halves.len());
    let h = &mut halves[..n];
    for (v, b) in h.iter_mut().zip(bytes.chunks_exact(2)) {
        *v = f16::from_le_bytes([b[0], b[1]]);
    }
    h.convert_to_f32_slice(&mut out[..n]);
}

fn put_halves(h: &[f16], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(2).zip(h) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// Decodes one layer's bytes (at precision `p`, of `dst`'s shape) into rows 0..16 of `dst`'s
/// `layer`.
pub fn decode_layer(
    p: Precision,
    bytes: &[u8],
    dst: &mut StagedChunk,
    layer: usize,
) -> Result<(), ChunkError> {
    #[cfg(target_arch = "x86_64")]
    if super::attend::simd_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { decode_layer_avx2(p, bytes, dst, layer) };
    }
    decode_layer_impl(p, bytes, dst, layer)
}

/// [`decode_layer`] compiled for AVX2, as [`encode_layer_avx2`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_layer_avx2(
    p: Precision,
    bytes: &[u8],
    dst: &mut StagedChunk,
    layer: usize,
) -> Result<(), ChunkError> {
    decode_layer_impl(p, bytes, dst, layer)
}

#[inline(always)]
fn decode_layer_impl(
    p: Precision,
    bytes: &[u8],
    dst: &mut StagedChunk,
    layer: usize,
) -> Result<(), ChunkError> {
    let shape = dst.shape;
    let lay = BlockLayout::new(shape, p);
    if layer >= shape.n_layers {
        return Err(ChunkError::LayerOutOfRange {
            layer,
            n_layers: shape.n_layers,
        });
    }
    let expected = layer_bytes(shape, p);
    if bytes.len() != expected {
        return Err(ChunkError::ByteLength {
            expected,
            found: bytes.len(),
        });
    }
    let (kw, vw) = (k_width(shape), v_width(shape));
    let (dk, dv) = (shape.head_dim, shape.v_head_dim);
    let gb = p.group_bytes();
    let bits = p.bits();
    // One head's keys (channel-major) or one value row, as f32 read from f16.
    let mut wide = vec![0.0f32; (dk * T).max(dv)];
    let mut halves = vec![f16::ZERO; (dk * T).max(dv)];
    for (h, block) in bytes.chunks_exact(lay.bytes).enumerate() {
        let keys = dst.keys_mut(layer);
        if p.is_int() {
            for c in 0..dk {
                let g = &block[lay.k_codes + c * gb..lay.k_codes + (c + 1) * gb];
                let (s, m) = (
                    f16_at(&block[lay.k_scale..], c),
                    f16_at(&block[lay.k_min..], c),
                );
                for (w, q) in wide[c * T..(c + 1) * T]
                    .iter_mut()
                    .zip(unpack_group(bits, g))
                {
                    *w = q as f32 * s + m;
                }
            }
        } else {
            get_f16(
                &block[lay.k_codes..lay.k_codes + dk * gb],
                &mut halves,
                &mut wide,
            );
        }
        for t in 0..T {
            let row = &mut keys[t * kw + h * dk..t * kw + (h + 1) * dk];
            for (c, k) in row.iter_mut().enumerate() {
                *k = wide[c * T + t];
            }
        }
        let values = dst.values_mut(layer);
        let row_bytes = lay.vg * gb;
        for t in 0..T {
            let row = &mut values[t * vw + h * dv..t * vw + (h + 1) * dv];
            let at = lay.v_codes + t * row_bytes;
            if !p.is_int() {
                get_f16(&block[at..at + 2 * dv], &mut halves, row);
                continue;
            }
            let (s, m) = (
                f16_at(&block[lay.v_scale..], t),
                f16_at(&block[lay.v_min..], t),
            );
            for (dst, g) in row
                .chunks_mut(T)
                .zip(block[at..at + row_bytes].chunks_exact(gb))
            {
                for (d, q) in dst.iter_mut().zip(unpack_group(bits, g)) {
                    *d = q as f32 * s + m;
                }
            }
        }
    }
    Ok(())
}
