"""Decode attention alone, on the GPU: the explicit GQA-packed path (eager and compiled, as ``measure.fuse_kernels``
runs it) against the split-KV Triton kernel (``tokenbench.kv_decode_triton``) over its launch settings, at the
Llama-3.1-8B layer shape (32 query / 8 KV heads, head dim 128, bf16) and the slot counts the KV benchmark
decodes over. Each variant is captured in a CUDA graph of 20 calls and replayed (no launch overhead), median of
5 replays; bandwidth = key + value bytes / time. Also checks each output against the explicit path.

    python results/perf/kv/bench_decode_attention.py --out results/perf/kv/decode_attention_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from tokenbench import kv_attention, kv_decode_triton
from tokenbench.env import environment


def timed(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median µs per call over 5 replays of a CUDA graph holding ``reps`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[3408, 32928, 848, 8336])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--configs", nargs="+", default=None, metavar="BLOCK,WARPS,STAGES,PER_SM",
                    help="Triton launch settings to measure (default: the eight of the first study)")
    ap.add_argument("--splits", type=int, nargs="+", default=[0],
                    help="slices of the slots per (row, KV head) to measure; 0: the kernel's own plan")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev, dtype, hq, h, d = "cuda", torch.bfloat16, 32, 8, 128
    compiled = torch.compile(kv_attention.decode_attention, dynamic=True, fullgraph=True)
    configs = [(64, 4, 3, 4), (64, 4, 4, 4), (128, 4, 3, 4), (128, 8, 3, 4), (64, 4, 3, 8), (32, 4, 4, 4),
               (64, 4, 3, 2), (128, 4, 2, 4)]  # (BLOCK, warps, stages, programs per SM)
    if args.configs:
        configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    rows: list[dict[str, Any]] = []
    for b in args.batches:
        for c in args.slots:
            g = torch.Generator(device=dev).manual_seed(c + b)
            q = torch.randn(b, hq, 1, d, device=dev, dtype=dtype, generator=g)
            k = torch.randn(b, h, c, d, device=dev, dtype=dtype, generator=g)
            v = torch.randn(b, h, c, d, device=dev, dtype=dtype, generator=g)
            valid = torch.rand(b, h, c, device=dev, generator=g) < 0.97
            kv_bytes = 2 * k.numel() * k.element_size()
            ref, ref_w = kv_attention.decode_attention(q, k, v, valid, d ** -0.5)

            def add(name: str, us: float, err: float, **extra: Any) -> None:
                rows.append({"batch": b, "slots": c, "variant": name, "us": us, "kv_bytes": kv_bytes,
                             "tb_per_s": kv_bytes / us / 1e6, "max_abs_err": err, **extra})
                print(f"b={b} C={c} {name}: {us:.1f} us, {kv_bytes / us / 1e6:.2f} TB/s, err {err:.2e}",
                      flush=True)

            add("matmul eager", timed(lambda: kv_attention.decode_attention(q, k, v, valid, d ** -0.5)), 0.0)
            out_c, _ = compiled(q, k, v, valid, d ** -0.5)
            add("matmul compiled", timed(lambda: compiled(q, k, v, valid, d ** -0.5)),
                float((out_c.float() - ref.float()).abs().max()))
            for block, warps, stages, per_sm in configs:
                kv_decode_triton.BLOCK, kv_decode_triton.NUM_WARPS = block, warps
                kv_decode_triton.NUM_STAGES, kv_decode_triton.PROGRAMS_PER_SM = stages, per_sm
                for want, sp in ((w_, s_) for s_ in args.splits for w_ in (False, True)):
                    sp = sp or None
                    try:
                        out, w = kv_decode_triton.decode_attention(q, k, v, valid, d ** -0.5, want_weights=want,
                                                                   splits=sp)
                        err = float((out.float() - ref.float()).abs().max())
                        if want:
                            err = max(err, float((w - ref_w).abs().max()))
                        us = timed(lambda: kv_decode_triton.decode_attention(q, k, v, valid, d ** -0.5,
                                                                             want_weights=want, splits=sp))
                        add(f"triton B{block} w{warps} s{stages} p{per_sm}" + (f" splits{sp}" if sp else "")
                            + (" +weights" if want else ""), us, err, block=block, warps=warps, stages=stages,
                            programs_per_sm=per_sm, weights=want, splits=sp)
                    except Exception as exc:  # a launch setting the GPU cannot run: record, go on
                        print(f"b={b} C={c} B{block} w{warps} s{stages}: {type(exc).__name__}: {exc}"[:300])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"env": environment(dev), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
