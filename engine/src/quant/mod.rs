//! Quantized tensor formats and their kernels.

mod k_quants;
mod k_quants_avx2;
mod types;

pub use types::GgmlType;
