//! Quantized tensor formats and their kernels.
//!
//! One entry point per job, each a plain `match` on the weight type so new formats (the
//! K-quants) slot in with one line each:
//! - [`vec_dot_type`]: what the activations must be quantized to before a dot with weights.
//! - [`quantize_row`] / [`dequantize_row`]: length-checked row conversions.
//! - [`vec_dot_fn`] / [`vec_dot_fn_scalar`]: the hot-path dot product of one weight row with one
//!   quantized activation row; the SIMD variant is picked once from CPU features at run time,
//!   and the scalar one is the reference every SIMD path is tested against.
//!
//! Block layouts are those of llama.cpp's ggml-common.h; the scalar code follows ggml-quants.c
//! (`legacy`), the AVX2 code follows ggml-cpu's x86 paths (`avx2`).

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
mod gemm_k;
mod gemm_legacy;
mod k_quants;
mod k_quants_avx2;
mod legacy;
pub mod packed;
mod panel;
#[cfg(test)]
mod tests;
mod types;

pub use types::GgmlType;

/// Why a row could not be converted or dotted.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// No kernel for this type (or, for [`quantize_row`], not an activation type).
    #[error("no kernel for tensor type {0}")]
    Unsupported(GgmlType),
    /// A buffer length does not match the element count for this type.
    #[error("{ty}: {n} elements need {expected} bytes, got {got}")]
    BadLength {
        ty: GgmlType,
        n: usize,
        expected: usize,
        got: usize,
    },
    /// The element count is not a whole number of blocks of this type.
    #[error("{ty}: {n} elements is not a multiple of the block size {block}")]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
}

/// Signature of a dot-product kernel: one weight row (`n` elements of the weight type, as bytes)
/// with one activation row already quantized to [`vec_dot_type`] of the weight type.
///
/// Kernels never allocate and never panic in release builds; they `debug_assert!` the lengths
/// (validated by the caller at model load) and never read out of bounds: a wrong length at
/// worst truncates the dot to the whole blocks present in both rows.
pub type VecDotFn = fn(n: usize, w: &[u8], a: &[u8]) -> f32;

/// Type the activations must be quantized to before dotting with weights of `ty`:
/// F32->F32, F16->F16, Q4_0/Q5_0/Q8_0 -> Q8_0, Q4_1 -> Q8_1, Q4_K/Q5_K/Q6_K -> Q8_K.
/// Other types map to themselves (they have no kernels; [`vec_dot_fn`] rejects them).
pub fn vec_dot_type(ty: GgmlType) -> GgmlType {
    use GgmlType::*;
    match ty {
        F32 => F32,
        F16 => F16,
        Q4_0 | Q5_0 | Q8_0 => Q8_0,
        Q4_1 => Q8_1,
        Q4_K | Q5_K | Q6_K => Q8_K,
        other => other,
    }
}

/// Checks that `bytes` holds exactly `n` elements of `ty`.
fn check_len(ty: GgmlType, n: usize, bytes: usize) -> Result<(), QuantError> {
    match ty.row_bytes(n) {
        None => Err(QuantError::PartialBlock {
            ty,
            n,
            block: ty.block_size(),
        }),
        Some(expected) if expected != bytes => Err(QuantError::BadLength {
            ty,
            n,
            expected,
            got: bytes,
        }),
        Some(_) => Ok(()),
    }
}

/// Quantizes one row of f32 activations into `out` (length `ty.row_bytes(x.len())`); `ty` is a
/// vec_dot type (F32, F16, Q8_0, Q8_1, Q8_K).
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), QuantError> {
    use GgmlType::*;
    let f: fn(&[f32], &mut [u8]) = match ty {
        F32 => legacy::quantize_row_f32,
        F16 => legacy::quantize_row_f16,
        Q8_0 => {
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                check_len(ty, x.len(), out.len())?;
                avx2::quantize_row_q8_0(x, out);
                return Ok(());
            }
            legacy::quantize_row_q8_0
        }
        Q8_1 => {
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                check_len(ty, x.len(), out.len())?;
                avx2::quantize_row_q8_1(x, out);
                return Ok(());
            }
            legacy::quantize_row_q8_1
        }
        Q8_K => k_quants::quantize_row_q8_k,
        other => return Err(QuantError::Unsupported(other)),
    };
    check_len(ty, x.len(), out.len())?;
    f(x, out);
    Ok(())
}

/// The scalar reference of [`quantize_row`] (tests compare the SIMD quantizers against it).
pub fn quantize_row_scalar(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), QuantError> {
    use GgmlType::*;
    let f: fn(&[f32], &mut [u8]) = match ty {
        F32 => legacy::quantize_row_f32,
        F16 => legacy::quantize_row_f16,
        Q8_0 => legacy::quantize_row_q8_0,
        Q8_1 => legacy::quantize_row_q8_1,
        Q8_K => k_quants::quantize_row_q8_k,
        other => return Err(QuantError::Unsupported(other)),
    };
    check_len(ty, x.len(), out.len())?;
    f(x, out);
    Ok(())
}

/// Dequantizes one row (`data.len() == ty.row_bytes(out.len())`).
pub fn dequantize_row(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    use GgmlType::*;
    let f: fn(&[u8], &mut [f32]) = match ty {
        F32 => legacy::dequantize_row_f32,
        F16 => legacy::dequantize_row_f16,
        Q4_0 => legacy::dequantize_row_q4_0,
        Q4_1 => legacy::dequantize_row_q4_1,
        Q5_0 => legacy::dequantize_row_q5_0,
        Q8_0 => legacy::dequantize_row_q8_0,
        Q8_1 => legacy::dequantize_row_q8_1,
        Q4_K => k_quants::dequantize_row_q4_k,
        Q5_K => k_quants::dequantize_row_q5_k,
        Q6_K => k_quants::dequantize_row_q6_k,
        other => return Err(QuantError::Unsupported(other)),
    };
    check_len(ty, out.len(), data.len())?;
    f(data, out);
    Ok(())
}

/// Best implementation for this CPU (AVX2+FMA+F16C detected once at run time and cached),
/// falling back to the scalar reference.
pub fn vec_dot_fn(ty: GgmlType) -> Result<VecDotFn, QuantError> {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        use GgmlType::*;
        let f: Option<VecDotFn> = match ty {
            F32 => Some(avx2::vec_dot_f32),
            F16 => Some(avx2::vec_dot_f16),
            Q4_0 => Some(avx2::vec_dot_q4_0_q8_0),
            Q4_1 => Some(avx2::vec_dot_q4_1_q8_1),
            Q5_0 => Some(avx2::vec_dot_q5_0_q8_0),
            Q8_0 => Some(avx2::vec_dot_q8_0_q8_0),
            Q4_K => Some(k_quants::vec_dot_q4_k_q8_k),
            Q5_K => Some(k_quants::vec_dot_q5_k_q8_k),
            Q6_K => Some(k_quants::vec_dot_q6_k_q8_k),
            _ => None,
        };
        if let Some(f) = f {
            return Ok(f);
        }
    }
    vec_dot_fn_scalar(ty)
}

/// The scalar reference implementation (always available; tests compare against it).
pub fn vec_dot_fn_scalar(ty: GgmlType) -> Result<VecDotFn, QuantError> {
    use GgmlType::*;
    match ty {
        F32 => Ok(legacy::vec_dot_f32),
        F16 => Ok(legacy::vec_dot_f16),
        Q4_0 => Ok(legacy::vec_dot_q4_0_q8_0),
        Q4_1 => Ok(legacy::vec_dot_q4_1_q8_1),
        Q5_0 => Ok(legacy::vec_dot_q5_0_q8_0),
        Q8_0 => Ok(legacy::vec_dot_q8_0_q8_0),
        Q4_K => Ok(k_quants::vec_dot_q4_k_q8_k_scalar),
        Q5_K => Ok(k_quants::vec_dot_q5_k_q8_k_scalar),
        Q6_K => Ok(k_quants::vec_dot_q6_k_q8_k_scalar),
        other => Err(QuantError::Unsupported(other)),
    }
}

/// Signature of a tile kernel: `out[t * out_stride + r] = dot(w_r, a_t)` for the `n_rows`
/// weight rows in `w` (each `ty.row_bytes(cols)` bytes, back to back) and the `n_tok`
/// activation rows in `a` (each `vec_dot_type(ty).row_bytes(cols)` bytes, back to back).
///
/// Tile kernels decode each weight block once for several tokens and reuse each activation
/// block for several rows, which is what makes prefill and batched decode compute-bound instead
/// of decode-bound. Like [`VecDotFn`] they never allocate, `debug_assert!` their lengths and
/// never read or write out of bounds.
pub type TileFn = fn(
    cols: usize,
    w: &[u8],
    n_rows: usize,
    a: &[u8],
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
);

/// Matrix-product kernels for one weight type: a tile kernel where one exists for this CPU,
/// else one dot product per (row, token).
#[derive(Clone, Copy)]
pub struct Gemm {
    pub ty: GgmlType,
    pub vec_dot: VecDotFn,
    pub tile: Option<TileFn>,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm")
            .field("ty", &self.ty)
            .field("tile", &self.tile.is_some())
            .finish()
    }
}

impl Gemm {
    /// Best kernels for weights of type `ty` on this CPU.
    pub fn new(ty: GgmlType) -> Result<Self, QuantError> {
        Ok(Gemm {
            ty,
            vec_dot: vec_dot_fn(ty)?,
            tile: tile_fn(ty),
        })
    }

    /// The reference: scalar dot products, no tile kernel.
    pub fn scalar(ty: GgmlType) -> Result<Self, QuantError> {
        Ok(Gemm {
            ty,
            vec_dot: vec_dot_fn_scalar(ty)?,
            tile: None,
        })
    }

    /// Runs the tile product described at [`TileFn`].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        cols: usize,
        w: &[u8],
        n_rows: usize,
        a: &[u8],
        n_tok: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        if let Some(tile) = self.tile {
            tile(cols, w, n_rows, a, n_tok, out, out_stride);
            return;
        }
        let (Some(wb), Some(ab)) = (
            self.ty.row_bytes(cols),
            vec_dot_type(self.ty).row_bytes(cols),
        ) else {
            return;
        };
        if wb == 0 || ab == 0 {
            return;
        }
        for (t, arow) in a.chunks_exact(ab).take(n_tok).enumerate() {
            let orow = out.get_mut(t * out_stride..).unwrap_or_default();
            for (o, wrow) in orow.iter_mut().zip(w.chunks_exact(wb).take(n_rows)) {
                *o = (self.vec_dot)(cols, wrow, arow);
            }
        }
    }
}

/// The tile kernel for weights of type `ty` on this CPU, if there is one.
pub fn tile_fn(ty: GgmlType) -> Option<TileFn> {
    gemm_legacy::tile_fn(ty).or_else(|| gemm_k::tile_fn(ty))
}
