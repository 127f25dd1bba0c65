//! Finds and checks a model's tensors: names as llama.cpp's converter writes them, shapes
//! against the hyperparameters, types against the kernels we have.

use crate::gguf::GgufFile;
use crate::quant;

use super::config::ModelConfig;
use super::ops::Matrix;
use super::ModelError;

/// Weights of one decoder layer. Vectors (norms, biases) are copied out as f32; matrices stay
/// in the mapped file.
#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn_gate: Matrix,
    pub ffn_up: Matrix,
    pub ffn_down: Matrix,
    pub post_ffn_norm: Option<Vec<f32>>,
}

#[derive(Debug)]
pub struct Weights {
    pub tok_embd: Matrix,
    pub output_norm: Vec<f32>,
    /// The output head; the token embedding when the model ties them.
    pub output: Matrix,
    /// Llama 3.1-style per-frequency RoPE divisors.
    pub rope_freqs: Option<Vec<f32>>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    pub fn load(g: &GgufFile, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let d = cfg.d_model;
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv_dim = cfg.kv_dim();
        let v_dim = cfg.v_dim();
        let att_out_dim = cfg.n_heads * cfg.v_head_dim;

        let tok_embd = matrix(g, "token_embd.weight", cfg.vocab_size, d)?;
        let output = if g.tensor_info("output.weight").is_some() {
            matrix(g, "output.weight", cfg.vocab_size, d)?
        } else {
            tok_embd.clone()
        };
        let rope_freqs = if g.tensor_info("rope_freqs.weight").is_some() {
            Some(vector(g, "rope_freqs.weight", cfg.rope_dims / 2)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let opt_vec = |s: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                if g.tensor_info(&n(s)).is_some() {
                    vector(g, &n(s), len).map(Some)
                } else {
                    Ok(None)
                }
            };
            let required_if = |v: Option<Vec<f32>>, want: bool, s: &str| {
                if want && v.is_none() {
                    Err(ModelError::MissingTensor(n(s)))
                } else {
                    Ok(v)
                }
            };
            layers.push(LayerWeights {
                attn_norm: vector(g, &n("attn_norm.weight"), d)?,
                wq: matrix(g, &n("attn_q.weight"), q_dim, d)?,
                wk: matrix(g, &n("attn_k.weight"), kv_dim, d)?,
                wv: matrix(g, &n("attn_v.weight"), v_dim, d)?,
                wo: matrix(g, &n("attn_output.weight"), d, att_out_dim)?,
                bq: opt_vec("attn_q.bias", q_dim)?,
                bk: opt_vec("attn_k.bias", kv_dim)?,
                bv: opt_vec("attn_v.bias", v_dim)?,
                q_norm: required_if(
                    opt_vec("attn_q_norm.weight", cfg.head_dim)?,
                    cfg.qk_norm,
                    "attn_q_norm.weight",
                )?,
                k_norm: required_if(
                    opt_vec("attn_k_norm.weight", cfg.head_dim)?,
                    cfg.qk_norm,
                    "attn_k_norm.weight",
                )?,
                post_attn_norm: required_if(
                    opt_vec("post_attention_norm.weight", d)?,
                    cfg.post_norms,
                    "post_attention_norm.weight",
                )?,
                ffn_norm: vector(g, &n("ffn_norm.weight"), d)?,
                ffn_gate: matrix(g, &n("ffn_gate.weight"), cfg.ffn_dim, d)?,
                ffn_up: matrix(g, &n("ffn_up.weight"), cfg.ffn_dim, d)?,
                ffn_down: matrix(g, &n("ffn_down.weight"), d, cfg.ffn_dim)?,
                post_ffn_norm: required_if(
                    opt_vec("post_ffw_norm.weight", d)?,
                    cfg.post_norms,
                    "post_ffw_norm.weight",
                )?,
            });
        }
        Ok(Weights {
            tok_embd,
            output_norm: vector(g, "output_norm.weight", d)?,
            output,
            rope_freqs,
            layers,
        })
    }
}

impl Weights {
    /// Every matrix, the output head last (it may share its tensor with `tok_embd`).
    pub fn matrices_mut(&mut self) -> impl Iterator<Item = &mut Matrix> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.wq,
                    &mut l.wk,
                    &mut l.wv,
                    &mut l.wo,
                    &mut l.ffn_gate,
                    &mut l.ffn_up,
                    &mut l.ffn_down,
                ]
            })
            .chain([&mut self.tok_embd, &mut self.output])
    }
}

fn matrix(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
    let info = g
        .tensor_info(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if info.dims.len() != 2 || info.dims[0] != cols || info.dims[1] != rows {
        return Err(ModelError::Shape {
            tensor: name.to_string(),
            expected: vec![cols, rows],
            found: info.dims.clone(),
        });
    }
    let gemm = quant::Gemm::new(info.ty).map_err(|_| ModelError::UnsupportedType {
        tensor: name.to_string(),
        ty: info.ty,
    })?;
    let row_bytes = info.ty.row_bytes(cols).ok_or(ModelError::UnsupportedType {
        tensor: name.to_string(),
        ty: info.ty,
    })?;
    Ok(Matrix {
        name: name.to_string(),
        ty: info.ty,
        rows,
        cols,
        offset: info.offset,
        row_bytes,
        act_ty: quant::vec_dot_type(info.ty),
        gemm,
        packed: None,
    })
}

fn vector(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let (info, data) = g
        .tensor(name)
        .map_err(|_| ModelError::MissingTensor(name.to_string()))?;
    if info.n_elements() != len {
        return Err(ModelError::Shape {
            tensor: name.to_string(),
            expected: vec![len],
            found: info.dims.clone(),
        });
    }
    let mut out = vec![0.0; len];
    quant::dequantize_row(info.ty, data, &mut out).map_err(|_| ModelError::UnsupportedType {
        tensor: name.to_string(),
        ty: info.ty,
    })?;
    if out.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::NonFinite(name.to_string()));
    }
    Ok(out)
}
