//! Decoder-only transformer forward pass for the llama, qwen2 and gemma3 architectures.
//!
//! One forward call takes a batch of sequences, each a run of new tokens at consecutive
//! positions with its own [`KvCache`]. All tokens of the batch go through every matmul together
//! (the weights are read once per call), while attention reads each token's own cache: this is
//! how the daemon decodes many apps' contexts at once.

mod config;
mod ops;
mod weights;

use std::path::Path;
use std::sync::{Mutex, TryLockError};

pub use config::{Activation, Arch, ConfigError, ModelConfig, RopeStyle};
pub use ops::Matrix;
pub use weights::{LayerWeights, Weights};

use crate::gguf::{GgufError, GgufFile};
use crate::kv::{AttnQuery, KvCache, KvError, KvShape};
use crate::pool::{DisjointSlice, ThreadPool};
use crate::quant::{GgmlType, QuantError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {tensor:?} has type {ty}, which the engine cannot compute with")]
    UnsupportedType { tensor: String, ty: GgmlType },
    #[error("tensor {0:?} holds NaN or infinite values")]
    NonFinite(String),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence {seq}: starts at position {start} but its cache holds {len} positions")]
    BadPosition {
        seq: usize,
        start: usize,
        len: usize,
    },
    #[error("cache shape {found:?} does not match the model's {expected:?}")]
    CacheShape { expected: KvShape, found: KvShape },
}

/// Token counts up to this (decode, batched decode) prefetch the next layer's cache during the
/// feed-forward products.
const PREFETCH_MAX_TOKENS: usize = 8;

/// Which positions of a sequence need next-token logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// One sequence's share of a batch: `tokens` at positions `start_pos..`, appended to `kv`.
pub struct SeqBatch<'a> {
    pub tokens: &'a [u32],
    /// Must not exceed `kv.len()`; positions from here on are overwritten.
    pub start_pos: usize,
    pub kv: &'a mut dyn KvCache,
    pub logits: Logits,
}

/// Reusable buffers of the forward pass, so steady-state decoding does not allocate.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: ops::ActBuffers,
    logits: Vec<f32>,
    cos_sin: Vec<(f32, f32)>,
    /// Per-thread attention scores.
    scores: Vec<Mutex<Vec<f32>>>,
    /// (sequence index, position) of each token of the batch.
    tokens: Vec<(usize, usize)>,
    logit_rows: Vec<usize>,
}

/// A loaded model: its file (mapped), hyperparameters and checked weights.
pub struct Model {
    file: GgufFile,
    pub config: ModelConfig,
    pub weights: Weights,
    inv_freq: Vec<f32>,
    inv_freq_swa: Vec<f32>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

/// Repacks every matrix that can be (`quant::packed`; a tensor shared by two matrices, the
/// tied embeddings, is packed once) and releases the file pages of the packed tensors, so the
/// resident size stays that of the file. Set `LLMSD_REPACK=0` to keep the file layout (A/B
/// measurements).
fn pack_weights(file: &GgufFile, w: &mut Weights) {
    let bytes = file.bytes();
    let mut done: Vec<(usize, Matrix)> = Vec::new();
    for m in w.matrices_mut() {
        if let Some((_, p)) = done.iter().find(|(off, _)| *off == m.offset) {
            if p.packed.is_some() {
                m.packed.clone_from(&p.packed);
                m.gemm = p.gemm;
            }
            continue;
        }
        m.pack(bytes, &mut |r| file.release(r));
        done.push((m.offset, m.clone()));
    }
}

impl Model {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file)?;
        let mut weights = Weights::load(&file, &config)?;
        if std::env::var("LLMSD_REPACK").map_or(true, |v| v != "0") {
            pack_weights(&file, &mut weights);
        }
        let factors = weights.rope_freqs.as_deref();
        let inv_freq = ops::rope_inv_freqs(config.rope_base, config.rope_dims, factors);
        let inv_freq_swa = ops::rope_inv_freqs(config.rope_base_swa, config.rope_dims, factors);
        Ok(Model {
            file,
            config,
            weights,
            inv_freq,
            inv_freq_swa,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The shape a cache must have to serve this model.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            v_head_dim: self.config.v_head_dim,
        }
    }

    fn job<'a>(&'a self, m: &'a Matrix, out: &'a mut [f32]) -> ops::MatJob<'a> {
        ops::MatJob {
            w: m,
            data: self.data(m),
            out,
        }
    }

    /// The bytes `m.gemm` multiplies (see [`Matrix::data`]).
    pub fn data<'a>(&'a self, m: &'a Matrix) -> &'a [u8] {
        m.data(self.file.bytes())
    }

    /// Runs the batch and returns the requested logits, `vocab_size` per row: for each sequence
    /// in order, its last token's row (`Logits::Last`) or one row per token (`Logits::All`).
    pub fn forward<'s>(
        &self,
        pool: &ThreadPool,
        batch: &mut [SeqBatch<'_>],
        s: &'s mut Scratch,
    ) -> Result<&'s [f32], ModelError> {
        let cfg = &self.config;
        let w = &self.weights;
        let d = cfg.d_model;
        let shape = self.kv_shape();

        // Validate everything before touching any cache.
        s.tokens.clear();
        s.logit_rows.clear();
        for (i, seq) in batch.iter_mut().enumerate() {
            if seq.kv.shape() != shape {
                return Err(ModelError::CacheShape {
                    expected: shape,
                    found: seq.kv.shape(),
                });
            }
            if seq.start_pos > seq.kv.len() {
                return Err(ModelError::BadPosition {
                    seq: i,
                    start: seq.start_pos,
                    len: seq.kv.len(),
                });
            }
            if let Some(&id) = seq.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: cfg.vocab_size,
                });
            }
            seq.kv.reserve(seq.start_pos + seq.tokens.len())?;
        }
        for (i, seq) in batch.iter().enumerate() {
            let first = s.tokens.len();
            s.tokens
                .extend((0..seq.tokens.len()).map(|j| (i, seq.start_pos + j)));
            match seq.logits {
                Logits::None => {}
                Logits::Last if !seq.tokens.is_empty() => s.logit_rows.push(s.tokens.len() - 1),
                Logits::Last => {}
                Logits::All => s.logit_rows.extend(first..s.tokens.len()),
            }
        }
        let n = s.tokens.len();
        if n == 0 {
            s.logits.clear();
            return Ok(&s.logits);
        }
        if s.scores.len() < pool.n_threads() {
            s.scores
                .resize_with(pool.n_threads(), || Mutex::new(Vec::new()));
        }

        // Embeddings.
        s.x.resize(n * d, 0.0);
        for (t, row) in s.x.chunks_exact_mut(d).enumerate() {
            let (seq, pos) = s.tokens[t];
            let id = batch[seq].tokens[pos - batch[seq].start_pos] as usize;
            w.tok_embd.dequantize_row(self.file.bytes(), id, row)?;
            if cfg.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= cfg.embed_scale);
            }
        }

        let q_dim = cfg.n_heads * cfg.head_dim;
        let (kv_dim, v_dim) = (cfg.kv_dim(), cfg.v_dim());
        let att_dim = cfg.n_heads * cfg.v_head_dim;
        for (il, lw) in w.layers.iter().enumerate() {
            // Attention block.
            s.xn.resize(n * d, 0.0);
            let x = &s.x;
            ops::par_rows(pool, &mut s.xn, d, &|xn, r| {
                ops::rms_norm_into(xn, &x[r.start * d..r.end * d], &lw.attn_norm, cfg.rms_eps)
            });
            s.q.resize(n * q_dim, 0.0);
            s.k.resize(n * kv_dim, 0.0);
            s.v.resize(n * v_dim, 0.0);
            ops::matmul_many(
                pool,
                &mut [
                    self.job(&lw.wq, &mut s.q),
                    self.job(&lw.wk, &mut s.k),
                    self.job(&lw.wv, &mut s.v),
                ],
                &s.xn,
                n,
                &mut s.acts,
            )?;
            if let Some(b) = &lw.bq {
                ops::add_bias_rows(&mut s.q, b);
            }
            if let Some(b) = &lw.bk {
                ops::add_bias_rows(&mut s.k, b);
            }
            if let Some(b) = &lw.bv {
                ops::add_bias_rows(&mut s.v, b);
            }
            if let Some(qn) = &lw.q_norm {
                ops::par_rows(pool, &mut s.q, qn.len(), &|rows, _| {
                    ops::rms_norm_rows(rows, qn, cfg.rms_eps)
                });
            }
            if let Some(kn) = &lw.k_norm {
                ops::par_rows(pool, &mut s.k, kn.len(), &|rows, _| {
                    ops::rms_norm_rows(rows, kn, cfg.rms_eps)
                });
            }
            let sliding = cfg.is_sliding(il);
            let inv_freq = if sliding {
                &self.inv_freq_swa
            } else {
                &self.inv_freq
            };
            let rope_scale = if sliding { 1.0 } else { cfg.rope_scale };
            for seq in batch.iter() {
                seq.kv.wait_layer(il)?;
            }
            for t in 0..n {
                let pos = s.tokens[t].1 as f32 * rope_scale;
                let q = &mut s.q[t * q_dim..(t + 1) * q_dim];
                ops::rope(
                    q,
                    cfg.head_dim,
                    pos,
                    inv_freq,
                    cfg.rope_style,
                    &mut s.cos_sin,
                );
                q.iter_mut().for_each(|v| *v *= cfg.attn_scale);
                let k = &mut s.k[t * kv_dim..(t + 1) * kv_dim];
                ops::rope(
                    k,
                    cfg.head_dim,
                    pos,
                    inv_freq,
                    cfg.rope_style,
                    &mut s.cos_sin,
                );
                let (seq, p) = s.tokens[t];
                batch[seq].kv.write(
                    il,
                    p,
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * v_dim..(t + 1) * v_dim],
                );
            }
            s.att.resize(n * att_dim, 0.0);
            self.attention(pool, &*batch, s, il, sliding);
            s.proj.resize(n * d, 0.0);
            ops::matmul(
                pool,
                &lw.wo,
                self.data(&lw.wo),
                &s.att,
                n,
                &mut s.acts,
                &mut s.proj,
            )?;
            if let Some(pn) = &lw.post_attn_norm {
                ops::par_rows(pool, &mut s.proj, d, &|rows, _| {
                    ops::rms_norm_rows(rows, pn, cfg.rms_eps)
                });
            }
            let proj = &s.proj;
            ops::par_rows(pool, &mut s.x, d, &|x, r| {
                ops::add_in_place(x, &proj[r.start * d..r.end * d])
            });

            // Feed-forward block.
            let x = &s.x;
            ops::par_rows(pool, &mut s.xn, d, &|xn, r| {
                ops::rms_norm_into(xn, &x[r.start * d..r.end * d], &lw.ffn_norm, cfg.rms_eps)
            });
            s.gate.resize(n * cfg.ffn_dim, 0.0);
            s.up.resize(n * cfg.ffn_dim, 0.0);
            // Batched decode: the next layer's cache streams in while these (compute-bound)
            // products run.
            let next = il + 1;
            let prefetch = |part: usize, parts: usize| {
                for seq in batch.iter() {
                    seq.kv.prefetch_layer(next, part, parts);
                }
            };
            let side: Option<ops::SideFn<'_>> =
                (n <= PREFETCH_MAX_TOKENS && next < cfg.n_layers).then_some(&prefetch);
            ops::matmul_many_pf(
                pool,
                &mut [
                    self.job(&lw.ffn_gate, &mut s.gate),
                    self.job(&lw.ffn_up, &mut s.up),
                ],
                &s.xn,
                n,
                &mut s.acts,
                side,
            )?;
            let (up, ff) = (&s.up, cfg.ffn_dim);
            ops::par_rows(pool, &mut s.gate, ff, &|gate, r| {
                let up = &up[r.start * ff..r.end * ff];
                match cfg.activation {
                    Activation::SwiGlu => ops::swiglu(gate, up),
                    Activation::GeluTanhGlu => ops::geglu(gate, up),
                }
            });
            ops::matmul(
                pool,
                &lw.ffn_down,
                self.data(&lw.ffn_down),
                &s.gate,
                n,
                &mut s.acts,
                &mut s.proj,
            )?;
            if let Some(pn) = &lw.post_ffn_norm {
                ops::par_rows(pool, &mut s.proj, d, &|rows, _| {
                    ops::rms_norm_rows(rows, pn, cfg.rms_eps)
                });
            }
            let proj = &s.proj;
            ops::par_rows(pool, &mut s.x, d, &|x, r| {
                ops::add_in_place(x, &proj[r.start * d..r.end * d])
            });
        }
        for seq in batch.iter_mut() {
            let end = seq.start_pos + seq.tokens.len();
            seq.kv.set_len(end);
        }

        // Output head, only for the rows asked for.
        let m = s.logit_rows.len();
        s.xn.resize(m * d, 0.0);
        for (dst, &t) in s.xn.chunks_exact_mut(d).zip(&s.logit_rows) {
            dst.copy_from_slice(&s.x[t * d..(t + 1) * d]);
            ops::rms_norm(dst, &w.output_norm, cfg.rms_eps);
        }
        s.logits.resize(m * cfg.vocab_size, 0.0);
        if m > 0 {
            let out = &w.output;
            ops::matmul(
                pool,
                out,
                self.data(out),
                &s.xn,
                m,
                &mut s.acts,
                &mut s.logits,
            )?;
        }
        Ok(&s.logits)
    }

    /// Attention of every token of the batch over its own cache, split across threads by
    /// token, or by head when there are fewer tokens than threads (decode).
    fn attention(
        &self,
        pool: &ThreadPool,
        batch: &[SeqBatch<'_>],
        s: &mut Scratch,
        layer: usize,
        sliding: bool,
    ) {
        let cfg = &self.config;
        let n = s.tokens.len();
        let q_dim = cfg.n_heads * cfg.head_dim;
        let att_dim = cfg.n_heads * cfg.v_head_dim;
        let splits = if n >= pool.n_threads() {
            1
        } else {
            pool.n_threads().min(cfg.n_heads)
        };
        let window = if sliding { cfg.sliding_window } else { None };
        let (q, tokens, scores) = (&s.q, &s.tokens, &s.scores);
        let out = DisjointSlice::new(s.att.as_mut_slice());
        // One task per (token, head part), claimed by whichever thread is free, so a thread
        // that is late or slowed takes fewer; tasks are in token order and, under the causal
        // mask, later tokens see more keys, so the largest come last and even out the end.
        pool.run_tasks(n * splits, &|item, _| {
            // At most `n_threads` tasks run at once and there are as many scratch buffers, so
            // one is always free.
            let mut scratch = loop {
                let free = scores.iter().find_map(|m| match m.try_lock() {
                    Ok(g) => Some(g),
                    Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                    Err(TryLockError::WouldBlock) => None,
                });
                if let Some(g) = free {
                    break g;
                }
                std::hint::spin_loop();
            };
            let (t, part) = (item / splits, item % splits);
            let (seq, pos) = tokens[t];
            let heads = crate::pool::split_range(cfg.n_heads, splits, part);
            let query = AttnQuery {
                layer,
                pos,
                window,
                heads: heads.clone(),
                q: &q[t * q_dim..(t + 1) * q_dim],
                n_heads: cfg.n_heads,
                // A sequence's lone decode token reads its cache once.
                prefetch: batch[seq].tokens.len() == 1,
            };
            let vhd = cfg.v_head_dim;
            let span = t * att_dim + heads.start * vhd..t * att_dim + heads.end * vhd;
            // SAFETY: work item (t, part) is owned by one thread, and its span (the heads
            // of `part` within token t's row) overlaps no other item's.
            let dst = unsafe { out.slice_mut(span) };
            batch[seq].kv.attend(&query, dst, &mut scratch);
        });
    }
}
