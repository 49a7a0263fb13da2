"""A/B of inductor options for the compiled scoring + eviction step of decode-time methods, in one process: each
variant recompiles the step (``fused_decode.EVICT_OPTIONS``, dynamo reset in between) and measures the same
rows as ``run_kv_benchmark.py`` (Llama-3.1-8B shape, fused decode, CUDA graphs). Variants are JSON objects of
inductor config names; ``{}`` is the default.

    python results/perf/kv/ab_evict_options.py --methods scissorhands tova \\
        --variants '{}' '{"realize_reads_threshold": 64, "realize_acc_reads_threshold": 64}' --out ab.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import run_kv_benchmark as bench
from tokenbench import fused_decode, kv_attention
from tokenbench.env import environment
from tokenbench.families import kv as kv_family
from tokenbench.registry import load_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (smoke test)")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--methods", nargs="+", default=["scissorhands", "tova"])
    ap.add_argument("--variants", nargs="+", default=["{}"], help="JSON objects: inductor options")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    variants = [json.loads(v) for v in args.variants]
    bench.FUSE = True
    load_all()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    loaded = bench.load(args.tiny, device)
    peak_bw, gpu = bench.peak_bandwidth(device)
    result = {"gpu": gpu, "env": environment(device), "args": vars(args) | {"out": str(args.out)}, "rows": []}
    bench.warm_shape(loaded, args.context, args.batch, 32, peak_bw)
    rows = [("streaming_llm", None)] + [(m, v) for v in variants for m in args.methods]
    current = None
    for name, options in rows:
        if options is not None and options != current:
            fused_decode.EVICT_OPTIONS.clear()
            fused_decode.EVICT_OPTIONS.update(options)
            fused_decode._compiled.clear()
            torch._dynamo.reset()  # the previous variant's compiled step must not serve this one
            current = options
        row = bench.one(loaded, name, args.keep, args.context, args.batch, args.new_tokens, 32, peak_bw)
        row["decode_backend"] = kv_attention.decode_backend(device)
        row["evict_options"] = options
        code = kv_family.decode_evict.__code__
        row["evict_variants"] = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
        result["rows"].append(row)
        print(f"{name} {options}: TPOT {row['tpot_ms']:.2f} ms, BW {100 * row['decode_bw_frac']:.0f}%, "
              f"{row['evict_variants']} compiled step variants", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    fused_decode.EVICT_OPTIONS.clear()


if __name__ == "__main__":
    main()
