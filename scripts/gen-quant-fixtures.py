#!/usr/bin/env python3
"""Generate quantization test fixtures with gguf-py as the oracle.

For each requested ggml type this writes, under engine/tests/fixtures/quant/:
  <TYPE>.blocks  raw quantized rows (ROWS rows of COLS elements, ggml block layout)
  <TYPE>.f32     gguf-py's dequantization of those rows (little-endian f32)

Blocks come from gguf-py's own `quantize` of seeded random normal floats with a few outliers
where gguf-py can quantize the type; otherwise from seeded random bytes whose f16 scale fields
are overwritten with sane finite values. Output is reproducible for a given seed.

Usage: scripts/gen-quant-fixtures.py [--types Q4_0,Q8_0] [--seed 1234] [--out DIR]
Requires: pip install gguf numpy
"""

import argparse
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

ROWS, COLS = 8, 256
ALL_TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# Byte offsets of the f16 scale fields inside one block, for types built from random bytes.
F16_FIELDS = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_floats(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    # A few outliers, as real weights have.
    idx = rng.integers(0, x.size, size=x.size // 64)
    x.flat[idx] *= rng.uniform(4.0, 12.0, size=idx.size).astype(np.float32)
    return x


def random_blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    n_blocks = ROWS * COLS // 256
    size = BLOCK_BYTES[name]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scale = rng.uniform(1e-4, 2e-2, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(ROWS, -1)


def make(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    qtype = T[name]
    # Per-type stream so adding a type does not change the others.
    rng = np.random.default_rng([seed, int(qtype)])
    if name in BLOCK_BYTES:
        data = random_blocks(name, rng)
    else:
        data = quants.quantize(random_floats(rng), qtype)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(ROWS, -1)
    deq = quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS)
    assert np.all(np.isfinite(deq)), name
    return raw, deq


def main() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(ALL_TYPES), help="comma-separated ggml type names")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=pathlib.Path, default=root / "engine/tests/fixtures/quant")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.types.split(","):
        name = name.strip().upper()
        if name not in ALL_TYPES:
            ap.error(f"unknown type {name!r} (known: {', '.join(ALL_TYPES)})")
        raw, deq = make(name, args.seed)
        (args.out / f"{name}.blocks").write_bytes(raw.tobytes())
        (args.out / f"{name}.f32").write_bytes(deq.astype("<f4").tobytes())
        print(f"{name}: {raw.nbytes} bytes of blocks, {deq.size} values")


if __name__ == "__main__":
    main()
