//! KV chunks: a context's keys and values as 16-token chunks at one of several precisions, and a
//! [`KvCache`](crate::kv::KvCache) made of them ([`ChunkedKv`]) that attends over the chunks
//! directly, dequantizing in registers.
//!
//! A chunk holds [`CHUNK_TOKENS`] consecutive positions, all layers, keys and values. It is
//! either *staged* ([`StagedChunk`]: f32, writable; the open tail of a context and chunks being
//! recomputed) or *sealed* ([`SealedChunk`]: immutable, exactly 16 tokens, at a [`Precision`]).
//! A sealed chunk's layers are independent byte strings (so a chunk can be restored from disk
//! layer by layer while the forward pass already runs, see [`LayerGate`]).
//!
//! # Byte layout of one layer of a sealed chunk
//!
//! All numbers are little-endian. Let `H = n_kv_heads`, `Dk = head_dim`, `Dv = v_head_dim`,
//! `G = ceil(Dv / 16)` and `N` the code width in bits ([`Precision::bits`]).
//!
//! The unit of storage is a **group of 16 codes** of `2N` bytes. For `N = 16` (f16) it is 16
//! little-endian f16 values. For `N = 8, 4, 2`, code `i` (`0..16`) is stored in byte `i % 2N` at
//! bit `N * (i / 2N)`:
//!
//! * int8: byte `i` = code `i`;
//! * int4: byte `i` (`0..8`) = code `i` | code `i + 8` << 4;
//! * int2: byte `i` (`0..4`) = code `i` | code `i + 4` << 2 | code `i + 8` << 4 | code `i + 12` << 6.
//!
//! (So a group unpacks to its 16 codes in order with one zero-extension or broadcast and a
//! shift per lane, see `avx2.rs`.)
//!
//! A layer is `H` head blocks, head 0 first. A head block is its keys then its values:
//!
//! | part | f16 | int8 / int4 / int2 |
//! |---|---|---|
//! | key scales | — | `Dk` × f16 (one per channel) |
//! | key minimums | — | `Dk` × f16 |
//! | key codes | `Dk` groups: group `c` = channel `c` of tokens 0..16 | same |
//! | value scales | — | 16 × f16 (one per token) |
//! | value minimums | — | 16 × f16 |
//! | value codes | 16 × `G` groups: group `(t, g)` = channels `16g..16g+16` of token `t` | same |
//!
//! Value channels past `Dv` in the last group are padding (code 0 / f16 zero).
//!
//! Keys are quantized **per channel** (one scale/minimum per channel over the chunk's 16 tokens:
//! outlier channels, which keys have, then cost only their own precision) and stored
//! channel-major, so the attention scores of the 16 tokens are 16 lanes accumulated over the
//! channels: `score[t] = Σ_c (q[c]·scale[c])·code[c][t] + Σ_c q[c]·min[c]`, with `q∘scale` and the
//! bias computed once per chunk and head, and no horizontal sums. Values are quantized **per
//! token** (one scale/minimum per token and head, over its `Dv` channels) and stored token-major:
//! `out[c] += (p_t·scale_t)·code[t][c]`, plus `Σ_t p_t·min_t` once per chunk.
//!
//! Integer formats are asymmetric: `scale = (max − min) / (2^N − 1)`, `min` and `scale` rounded
//! to f16 first, `code = clamp(round((x − min) / scale), 0, 2^N − 1)` (0 when the f16 scale is 0),
//! and `x ≈ code · scale + min`.
//!
//! Layer sizes: f16 `H · 32 · (Dk + 16G)`; intN `H · (4Dk + 2N·Dk + 64 + 2N·16G)` bytes.
//! For SmolLM2-135M (`H = 3`, `Dk = Dv = 64`) one layer of a chunk is 12288 bytes at f16,
//! 7104 at int8, 4032 at int4, 2496 at int2; staged (f32) it is 24576. The per-channel key
//! scales cost 2 bits per key element (4 bytes per channel per 16 tokens), the per-token value
//! scales 0.5 bits per value element: int4 averages 5.25 bits per element there, int2 3.25.
//!
//! # Measured (SmolLM2-135M, `engine/tests/kvchunk_model.rs`)
//!
//! Relative RMS error of the reconstruction on real keys/values (GPL-3, 8 chunks × 30 layers),
//! and the mean KL divergence of 128 next-token distributions when a 256-token history is held
//! at the precision (the forward pass's own noise floor, history jittered by 1e-6, is 0.003):
//!
//! | format | K rel. RMS | V rel. RMS | KL |
//! |---|---|---|---|
//! | f16 | 0.0002 | 0.0002 | 0.003 |
//! | int8 | 0.0019 | 0.0055 | 0.004 |
//! | int4 | 0.032 | 0.093 | 0.008 |
//! | int2 | 0.16 | 0.47 | 0.11 |
//!
//! Keys per token instead of per channel would be 4× worse (int4: 0.13). Single-thread attention
//! of one decode query over 1024 positions (9 heads on 3 kv heads): f32 `ContiguousKv` about
//! 250 µs per layer when cache-resident, 500 µs cycling through 30 layers; sealed chunks
//! 80–100 µs and 80–135 µs (int4 fastest once memory-bound).

mod attend;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod cache;
mod format;
#[cfg(test)]
mod tests;

pub use cache::{ChunkSlot, ChunkedKv, Density, LayerGate};
pub use format::{decode_layer, encode_layer, SealedChunk, StagedChunk};

use crate::kv::KvShape;

/// Positions per chunk.
pub const CHUNK_TOKENS: usize = 16;

/// Storage precision of a sealed chunk, ordered by bits.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Int2,
    Int4,
    Int8,
    F16,
}

impl Precision {
    /// Most bits first.
    pub const ALL: [Precision; 4] = [
        Precision::F16,
        Precision::Int8,
        Precision::Int4,
        Precision::Int2,
    ];

    /// Code width per element.
    pub fn bits(self) -> u32 {
        match self {
            Precision::Int2 => 2,
            Precision::Int4 => 4,
            Precision::Int8 => 8,
            Precision::F16 => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Int2 => "int2",
            Precision::Int4 => "int4",
            Precision::Int8 => "int8",
            Precision::F16 => "f16",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Stable on-disk tag (the bit width).
    pub fn code(self) -> u8 {
        self.bits() as u8
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.code() == c)
    }

    /// Whether the format stores scales and minimums (the integer formats).
    fn is_int(self) -> bool {
        self != Precision::F16
    }

    /// Bytes of one group of 16 codes.
    fn group_bytes(self) -> usize {
        2 * self.bits() as usize
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkError {
    #[error("wrong byte length: expected {expected}, found {found}")]
    ByteLength { expected: usize, found: usize },
    #[error("layer {layer} out of range: the chunk has {n_layers} layers")]
    LayerOutOfRange { layer: usize, n_layers: usize },
    #[error("layer {0} is already set")]
    LayerAlreadySet(usize),
    #[error("chunk not full: {0} of 16 tokens")]
    NotFull(usize),
    #[error("chunk incomplete: layer {0} is missing")]
    Incomplete(usize),
    #[error("chunk shape {found:?} does not match {expected:?}")]
    Shape { expected: KvShape, found: KvShape },
    #[error("bad staged chunk header")]
    BadHeader,
    #[error("{slots} slots cannot hold exactly {len} positions")]
    SlotCount { slots: usize, len: usize },
    #[error("{len} positions exceed the capacity of {capacity}")]
    Capacity { len: usize, capacity: usize },
    #[error("slot {slot}: {reason}")]
    Slot { slot: usize, reason: String },
}

/// Layout of one head block of a layer (offsets in bytes from the block's start).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockLayout {
    pub p: Precision,
    pub dk: usize,
    pub dv: usize,
    /// Value groups per token.
    pub vg: usize,
    pub k_scale: usize,
    pub k_min: usize,
    pub k_codes: usize,
    pub v_scale: usize,
    pub v_min: usize,
    pub v_codes: usize,
    pub bytes: usize,
}

impl BlockLayout {
    pub fn new(shape: KvShape, p: Precision) -> Self {
        let (dk, dv) = (shape.head_dim, shape.v_head_dim);
        let vg = dv.div_ceil(CHUNK_TOKENS);
        let gb = p.group_bytes();
        let params = if p.is_int() { 2 } else { 0 };
        let k_scale = 0;
        let k_min = k_scale + params * dk;
        let k_codes = k_min + params * dk;
        let v_scale = k_codes + dk * gb;
        let v_min = v_scale + params * CHUNK_TOKENS;
        let v_codes = v_min + params * CHUNK_TOKENS;
        let bytes = v_codes + CHUNK_TOKENS * vg * gb;
        BlockLayout {
            p,
            dk,
            dv,
            vg,
            k_scale,
            k_min,
            k_codes,
            v_scale,
            v_min,
            v_codes,
            bytes,
        }
    }
}

/// Bytes of one layer of a sealed chunk at precision `p`.
pub fn layer_bytes(shape: KvShape, p: Precision) -> usize {
    shape.n_kv_heads * BlockLayout::new(shape, p).bytes
}

/// Bytes of all layers of a sealed chunk at precision `p`.
pub fn chunk_bytes(shape: KvShape, p: Precision) -> usize {
    shape.n_layers * layer_bytes(shape, p)
}

/// Resident bytes of a staged (f32) chunk.
pub fn staged_bytes(shape: KvShape) -> usize {
    shape.n_layers * CHUNK_TOKENS * shape.n_kv_heads * (shape.head_dim + shape.v_head_dim) * 4
}
