//! Tile kernels (see [`super::TileFn`]) for the K-quant types.

use super::{GgmlType, TileFn};

/// The tile kernel for `ty`, if this file has one for this CPU.
pub(crate) fn tile_fn(_ty: GgmlType) -> Option<TileFn> {
    None
}
