"""Where a decode step's GPU time goes: torch.profiler over eager decode steps (kernel times are the same as
in the captured graph; the graph removes the launch gaps). Prints the top kernels and the GPU time per step.

    python results/perf/kv/profile_decode.py --context 8192 --batch 1 --method none
    python results/perf/kv/profile_decode.py --context 32768 --batch 8 --method h2o --fuse --decode-backend triton
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from run_kv_benchmark import load, make_method  # noqa: E402
from tokenbench import fused_decode, kv_attention  # noqa: E402
from tokenbench.config import MeasureSettings  # noqa: E402
from tokenbench.lm import LMRunner  # noqa: E402
from tokenbench.registry import load_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--method", default="none")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--fuse", action="store_true", help="measure.fuse_kernels, as the benchmark's --fuse")
    ap.add_argument("--decode-backend", default="auto", choices=kv_attention.DECODE_BACKENDS)
    ap.add_argument("--gemv", default="triton", choices=["cublas", "triton"], help="with --fuse: fused_decode.GEMV")
    args = ap.parse_args()
    load_all()
    fused_decode.GEMV[0] = args.gemv
    kv_attention.DECODE_BACKEND = args.decode_backend
    device = "cpu" if args.tiny else "cuda"
    loaded = load(args.tiny, device)
    ids = torch.randint(10, 500, (args.batch, args.context + 32)).to(device)
    runner = LMRunner(loaded, make_method(args.method, args.keep), MeasureSettings(warmup=0, cuda_graph=False,
                                                                                     fuse_kernels=args.fuse))
    pm = torch.ones(args.batch, args.context, dtype=torch.bool, device=device)
    sm = torch.ones(args.batch, 32, dtype=torch.bool, device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        cache, session, logits, first = runner._prefill(ids[:, :args.context], ids[:, args.context:], pm, sm,
                                                        2 * args.steps)
        with runner.method.attach(loaded.model, cache) as s2:
            s2.adopt([session])
            tok = logits.argmax(-1, keepdim=True)
            with s2.decoding(2 * args.steps):
                for half in range(2):  # the first half warms up, the second is profiled
                    with profile(activities=acts) as prof:
                        for step in range(args.steps):
                            pos = first + half * args.steps + step
                            cache.set_inputs(pos, torch.ones_like(pos, dtype=torch.bool))
                            tok = runner._forward(tok, pos, cache)[:, -1].argmax(-1, keepdim=True)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=60))


if __name__ == "__main__":
    main()
