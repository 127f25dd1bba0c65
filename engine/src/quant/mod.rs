//! Quantized tensor formats and their kernels.

mod types;

pub use types::GgmlType;
