"""The decode step's weight products alone: ``F.linear`` at a few rows (the decode batch) against the
Llama-3.1-8B layer's weight shapes, under cuBLAS and cuBLASLt, each captured in a CUDA graph of 20 calls and
replayed (median of 5 replays); bandwidth = weight bytes / time. What the decode step's GEMVs can reach.

    python results/perf/kv/bench_gemv.py --out results/perf/kv/gemv_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_attention import timed  # noqa: E402
from tokenbench.env import environment  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 1, 16])
    ap.add_argument("--libraries", nargs="+", default=["cublas", "cublaslt"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    out_rows: list[dict[str, Any]] = []
    for lib in args.libraries:
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device=dev, dtype=dtype)
            for m in args.rows:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                us = timed(lambda: F.linear(x, w))
                nbytes = w.numel() * w.element_size()
                out_rows.append({"library": lib, "shape": name, "n": n, "k": k, "rows": m, "us": us,
                                 "tb_per_s": nbytes / us / 1e6})
                print(f"{lib} {name} {n}x{k} rows={m}: {us:.1f} us, {nbytes / us / 1e6:.2f} TB/s", flush=True)
            del w
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": environment(dev), "rows": out_rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
