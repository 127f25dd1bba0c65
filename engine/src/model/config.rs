//! Hyperparameters of a decoder-only model, read from GGUF metadata.
//!
//! One place knows how each supported architecture spells and defaults its settings; the forward
//! pass only reads the resulting [`ModelConfig`].

use crate::gguf::{GgufError, GgufFile};

/// Supported architectures (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM2: RMSNorm, adjacent-pair RoPE, SwiGLU.
    Llama,
    /// Qwen2: as Llama, with q/k/v biases and half-split (NEOX) RoPE.
    Qwen2,
    /// Gemma 3: embeddings scaled by sqrt(d), q/k norms, post-attention and post-FFN norms,
    /// interleaved sliding-window layers with their own RoPE base, GELU-tanh FFN.
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// How rotary embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): ggml's "normal" mode, used by llama (the converter permutes Q/K).
    Adjacent,
    /// Pairs (i, i + d/2): ggml's NEOX mode.
    HalfSplit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) * up
    SwiGlu,
    /// gelu_tanh(gate) * up
    GeluTanhGlu,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, gemma3)")]
    UnsupportedArch(String),
    #[error("invalid hyperparameter {key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Per-head width of queries and keys.
    pub head_dim: usize,
    /// Per-head width of values.
    pub v_head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_style: RopeStyle,
    /// Dimensions of each head that are rotated (the rest pass through).
    pub rope_dims: usize,
    pub rope_base: f32,
    /// Positions are multiplied by this (linear RoPE scaling: 1 / factor).
    pub rope_scale: f32,
    /// Sliding window (keys visible to a query, itself included) and the RoPE base of
    /// sliding-window layers.
    pub sliding_window: Option<usize>,
    pub rope_base_swa: f32,
    /// Every `swa_period`-th layer (1-based) is global; the others slide. 0 = none slide.
    pub swa_period: usize,
    /// Multiplies the query before attention (scores are q·k with no further scale).
    pub attn_scale: f32,
    /// Multiplies embeddings after lookup.
    pub embed_scale: f32,
    pub activation: Activation,
    pub qk_norm: bool,
    pub post_norms: bool,
}

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ConfigError> {
        let arch_name = g.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            other => return Err(ConfigError::UnsupportedArch(other.to_string())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize, ConfigError> {
            let v = g.get_u64(&key(k))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v < 1 << 24)
                .ok_or_else(|| invalid(&key(k), format!("{v} out of range")))
        };
        let opt_usize = |k: &str| -> Result<Option<usize>, ConfigError> {
            if g.get(&key(k)).is_some() {
                usize_of(k).map(Some)
            } else {
                Ok(None)
            }
        };
        let opt_f32 = |k: &str| -> Result<Option<f32>, ConfigError> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(_) => {
                    let v = g.get_f64(&key(k))? as f32;
                    if v.is_finite() {
                        Ok(Some(v))
                    } else {
                        Err(invalid(&key(k), "not finite".into()))
                    }
                }
            }
        };

        let n_layers = usize_of("block_count")?;
        let d_model = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_heads % n_kv_heads != 0 {
            return Err(invalid(
                &key("attention.head_count_kv"),
                format!("{n_kv_heads} does not divide {n_heads} heads"),
            ));
        }
        let head_dim = opt_usize("attention.key_length")?.unwrap_or(d_model / n_heads);
        let v_head_dim = opt_usize("attention.value_length")?.unwrap_or(head_dim);
        let ffn_dim = usize_of("feed_forward_length")?;
        let vocab_size = match opt_usize("vocab_size")? {
            Some(v) => v,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let context_length = usize_of("context_length")?;
        let rms_eps = opt_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
        let rope_dims = opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(invalid(
                &key("rope.dimension_count"),
                format!("{rope_dims}"),
            ));
        }
        let rope_base = opt_f32("rope.freq_base")?.unwrap_or(10_000.0);
        let rope_scale = match opt_f32("rope.scaling.factor")? {
            Some(f) if f > 0.0 && f != 1.0 => 1.0 / f,
            _ => 1.0,
        };

        let mut cfg = ModelConfig {
            arch,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim,
            ffn_dim,
            vocab_size,
            context_length,
            rms_eps,
            rope_style: RopeStyle::Adjacent,
            rope_dims,
            rope_base,
            rope_scale,
            sliding_window: None,
            rope_base_swa: rope_base,
            swa_period: 0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            embed_scale: 1.0,
            activation: Activation::SwiGlu,
            qk_norm: false,
            post_norms: false,
        };
        match arch {
            Arch::Llama => {}
            Arch::Qwen2 => cfg.rope_style = RopeStyle::HalfSplit,
            Arch::Gemma3 => {
                // As llama.cpp: sliding layers use base 10000, every 6th layer is global.
                cfg.rope_style = RopeStyle::HalfSplit;
                cfg.sliding_window = opt_usize("attention.sliding_window")?;
                cfg.rope_base_swa = 10_000.0;
                cfg.swa_period = 6;
                cfg.embed_scale = (d_model as f32).sqrt();
                cfg.activation = Activation::GeluTanhGlu;
                cfg.qk_norm = true;
                cfg.post_norms = true;
                // Gemma 3 27B scales by d_model / n_heads; the smaller ones by head_dim.
                cfg.attn_scale = if n_layers == 62 {
                    1.0 / ((d_model / n_heads) as f32).sqrt()
                } else {
                    1.0 / (head_dim as f32).sqrt()
                };
            }
        }
        Ok(cfg)
    }

    /// Whether layer `il` attends through the sliding window.
    pub fn is_sliding(&self, il: usize) -> bool {
        self.sliding_window.is_some()
            && self.swa_period > 0
            && !(il + 1).is_multiple_of(self.swa_period)
    }

    /// Width of one token's keys (all kv heads) in one layer.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of one token's values (all kv heads) in one layer.
    pub fn v_dim(&self) -> usize {
        self.n_kv_heads * self.v_head_dim
    }
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason,
    }
}
