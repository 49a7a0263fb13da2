"""Where a compressed prefill's time goes: each method's prefill timed several times in one process (a cost
that vanishes on the repeat is a one-time cost: compilation, autotuning, allocator growth), then one prefill
of the first method under torch.profiler (top ops by CPU and by GPU time).

    python results/perf/kv/profile_prefill.py --context 8192 --batch 1 --methods pyramidkv snapkv
    python results/perf/kv/profile_prefill.py --context 8192 --batch 1 --sdpa no-cudnn    # SDPA without cuDNN
    python results/perf/kv/profile_prefill.py --tiny --methods pyramidkv snapkv    # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from run_kv_benchmark import load, make_method  # noqa: E402
from tokenbench.config import MeasureSettings  # noqa: E402
from tokenbench.lm import LMRunner  # noqa: E402
from tokenbench.registry import load_all  # noqa: E402


def prefill_ms(runner: LMRunner, ids: torch.Tensor, context: int, steps: int) -> float:
    dev = ids.device
    pm = torch.ones(ids.shape[0], context, dtype=torch.bool, device=dev)
    sm = torch.ones(ids.shape[0], ids.shape[1] - context, dtype=torch.bool, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        runner._prefill(ids[:, :context], ids[:, context:], pm, sm, steps)
        sync()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192], help="each a new shape, in turn")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["pyramidkv", "snapkv"])
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sdpa", choices=["default", "no-cudnn"], default="default",
                    help="SDPA backends allowed (no-cudnn: flash, efficient, math)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    if args.sdpa == "no-cudnn":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            run(args)
    else:
        run(args)


def run(args: argparse.Namespace) -> None:
    load_all()
    device = "cpu" if args.tiny else "cuda"
    loaded = load(args.tiny, device)
    runners = {m: LMRunner(loaded, make_method(m, args.keep), MeasureSettings(warmup=0, cuda_graph=False))
               for m in args.methods}
    plain = LMRunner(loaded, make_method("none", 1.0), MeasureSettings(warmup=0))
    for context in args.contexts:
        ids = torch.randint(10, 500, (args.batch, context + 32)).to(device)
        print(f"context {context}: untimed none {prefill_ms(plain, ids, context, 8):.1f} ms", flush=True)
        for rep in range(args.repeats):
            for m, runner in runners.items():
                print(f"context {context} repeat {rep} {m}: prefill {prefill_ms(runner, ids, context, 8):.1f} ms",
                      flush=True)
    if args.no_profile:
        return
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    first = args.methods[0]
    with profile(activities=acts) as prof:
        ms = prefill_ms(runners[first], ids, context, 8)
    print(f"profiled {first}: prefill {ms:.1f} ms")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
    if device == "cuda":
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
