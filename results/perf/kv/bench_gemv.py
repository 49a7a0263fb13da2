"""The decode step's weight products alone: ``F.linear`` at a few rows (the decode batch) against the
Llama-3.1-8B layer's weight shapes, under cuBLAS and cuBLASLt, and (``--triton``) tokenbench's Triton GEMV
(``gemv_triton``) over a grid of launch configurations; each captured in a CUDA graph of 20 calls and replayed
(median of 5 replays); bandwidth = weight bytes / time. The calls rotate over enough copies of each weight
(>= 256 MB) that none is served from the 50 MB L2 cache. ``--chain`` times a layer's four products in
sequence over 32 layers' distinct weights, as in a decode step (cuBLAS + the fused activation kernel vs the
Triton GEMVs with the activation in the gate/up epilogue).

    python results/perf/kv/bench_gemv.py --out results/perf/kv/gemv_h200.json
    python results/perf/kv/bench_gemv.py --libraries --triton --rows 8 1 --chain --out gemv_triton_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_attention import timed  # noqa: E402
from tokenbench import gemv_triton  # noqa: E402
from tokenbench.env import environment  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
GRID = [gemv_triton.Config(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (3, 5)]


def rotating(make: Callable[[], torch.Tensor], nbytes: int) -> Any:
    """Copies of one weight, cycled through call by call (>= 256 MB in all)."""
    return itertools.cycle([make() for _ in range(max(1, math.ceil(256e6 / nbytes)))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 1, 16])
    ap.add_argument("--libraries", nargs="*", default=["cublas", "cublaslt"])
    ap.add_argument("--triton", action="store_true", help="also the Triton GEMV over its configuration grid")
    ap.add_argument("--chain", action="store_true", help="also a layer's products in sequence, 32 layers")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    out_rows: list[dict[str, Any]] = []

    def record(kind: str, name: str, n: int, k: int, m: int, us: float, **extra: Any) -> None:
        tbs = n * k * 2 / us / 1e6
        out_rows.append({"library": kind, "shape": name, "n": n, "k": k, "rows": m, "us": us, "tb_per_s": tbs,
                         **extra})
        print(f"{kind} {name} {n}x{k} rows={m} {extra or ''}: {us:.1f} us, {tbs:.2f} TB/s", flush=True)

    for lib in args.libraries:
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (n, k) in SHAPES.items():
            ws = rotating(lambda: torch.randn(n, k, device=dev, dtype=dtype), n * k * 2)
            for m in args.rows:
                x = torch.randn(m, k, device=dev, dtype=dtype)
                record(lib, name, n, k, m, timed(lambda: F.linear(x, next(ws))))
            del ws
    torch.backends.cuda.preferred_blas_library("cublas")
    best: dict[tuple[str, int], gemv_triton.Config] = {}
    if args.triton:
        for name, (n, k) in SHAPES.items():
            ws = rotating(lambda: torch.randn(n, k, device=dev, dtype=dtype), n * k * 2)
            for gated in ((False, True) if name == "gate_up" else (False,)):
                fn = gemv_triton.silu_mul_linear if gated else gemv_triton.linear
                for m in args.rows:
                    x = torch.randn(m, k, device=dev, dtype=dtype)
                    timings = []
                    for cfg in GRID:
                        try:
                            w0 = next(ws)
                            got, want = fn(x, w0, config=cfg), fn(x, w0, config=None)
                            us = timed(lambda: fn(x, next(ws), config=cfg))
                        except Exception as e:  # noqa: BLE001 - a configuration that does not fit: skip it
                            print(f"  {cfg}: {type(e).__name__}: {str(e)[:80]}")
                            continue
                        timings.append((us, cfg))
                        record("triton" + ("_gated" if gated else ""), name, n, k, m, us,
                               config=cfg.__dict__, max_diff_vs_default=(got - want).abs().max().item())
                    us, cfg = min(timings, key=lambda t: t[0])
                    best[(name + ("_gated" if gated else ""), m)] = cfg
                    diff = "-" if gated else (fn(x, w0, config=cfg) - F.linear(x, w0)).abs().max().item()
                    print(f"BEST {name}{'_gated' if gated else ''} rows={m}: {cfg} {us:.1f} us; "
                          f"max |diff| vs cuBLAS {diff}", flush=True)
            del ws
    if args.chain:
        layers = [{name: torch.randn(n, k, device=dev, dtype=dtype) for name, (n, k) in SHAPES.items()
                   if name != "lm_head"} for _ in range(32)]
        silu_mul = torch.compile(lambda g, u: F.silu(g) * u, dynamic=False)
        for m in args.rows:
            x = torch.randn(m, 4096, device=dev, dtype=dtype)

            def cublas() -> None:
                for w in layers:
                    F.linear(x, w["qkv"]), F.linear(x, w["o_proj"])
                    g, u = F.linear(x, w["gate_up"]).chunk(2, -1)
                    F.linear(silu_mul(g, u), w["down"])

            def tri() -> None:
                for w in layers:
                    cf = lambda s: best.get((s, m))  # noqa: E731
                    gemv_triton.linear(x, w["qkv"], config=cf("qkv"))
                    gemv_triton.linear(x, w["o_proj"], config=cf("o_proj"))
                    h = gemv_triton.silu_mul_linear(x, w["gate_up"], config=cf("gate_up_gated"))
                    gemv_triton.linear(h, w["down"], config=cf("down"))

            nbytes = sum(w.numel() * 2 for lay in layers for w in lay.values())
            for kind, fn in (("chain_cublas", cublas), ("chain_triton", tri)):
                us = timed(fn, reps=2)
                out_rows.append({"library": kind, "rows": m, "us_per_layer": us / 32, "tb_per_s": nbytes / us / 1e6})
                print(f"{kind} rows={m}: {us / 32:.1f} us per layer, {nbytes / us / 1e6:.2f} TB/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": environment(dev), "rows": out_rows,
                                    "best": {f"{k[0]}@{k[1]}": v.__dict__ for k, v in best.items()}},
                                   indent=1, default=str))


if __name__ == "__main__":
    main()
