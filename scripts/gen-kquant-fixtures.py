#!/usr/bin/env python3
"""Writes K-quant test fixtures: random valid blocks and gguf-py's dequantization of them.

For Q4_K, Q5_K and Q6_K: engine/tests/fixtures/quant/<TYPE>.blocks (raw block bytes,
ROWS rows of COLS elements) and <TYPE>.f32 (gguf-py's dequantized values, little-endian f32).
Blocks are random bytes except the f16 scales, which are set to finite values in [1e-3, 1e-1]
(so the oracle never produces inf/NaN). Seeded: re-running gives identical files.

Usage: python3 scripts/gen-kquant-fixtures.py   (needs `pip install gguf numpy`)
"""
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

ROWS, COLS, QK_K = 8, 256, 256
# type -> (bytes per block, byte offsets of the f16 super-block scales in the block)
TYPES = {
    "Q4_K": (T.Q4_K, 144, [0, 2]),  # d, dmin, scales[12], qs[128]
    "Q5_K": (T.Q5_K, 176, [0, 2]),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": (T.Q6_K, 210, [208]),  # ql[128], qh[64], scales[16], d
}


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "engine/tests/fixtures/quant"
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, (qtype, size, f16_offsets)) in enumerate(TYPES.items()):
        rng = np.random.default_rng(1234 + seed)
        n_blocks = ROWS * COLS // QK_K
        blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for off in f16_offsets:
            vals = rng.uniform(1e-3, 1e-1, size=n_blocks).astype(np.float16)
            blocks[:, off : off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
        raw = blocks.reshape(-1)
        deq = dequantize(raw, qtype).astype("<f4")
        assert deq.size == ROWS * COLS and np.isfinite(deq).all()
        (out / f"{name}.blocks").write_bytes(raw.tobytes())
        (out / f"{name}.f32").write_bytes(deq.tobytes())
        print(f"{name}: {raw.size} bytes of blocks, {deq.size} values")


if __name__ == "__main__":
    main()
