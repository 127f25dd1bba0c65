//! Weight kinds of the legacy block types and their block sizes, shared by the AVX2 kernels of
//! `gemm_legacy.rs` (the streaming kernels in `gemv_legacy_avx2.rs`).

/// Weight kinds (const generic parameter of the kernels).
pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q5_0: u8 = 2;
pub(super) const Q8_0: u8 = 3;

/// Bytes of one weight block of kind `k`.
pub(super) const fn w_block(k: u8) -> usize {
    match k {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        _ => 34,
    }
}

/// Bytes of one activation block (Q8_1 for Q4_1, else Q8_0).
pub(super) const fn a_block(k: u8) -> usize {
    if k == Q4_1 {
        36
    } else {
        34
    }
}
