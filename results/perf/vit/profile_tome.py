"""Kernel-level profile of ViT-B/16 baseline vs ToMe r=16 (eager, fp16 autocast, batch 256) and the
patch-embedding convolution in NCHW vs channels_last. Diagnostic only; throughput numbers come from
``python -m tokenbench.perf.vit_throughput``.

    python results/perf/vit/profile_tome.py --out results/perf/vit/profile_tome.txt
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from tokenbench.registry import METHODS, MODELS, load_all
from tokenbench.vision import make_forward


def events_ms(fn, n=10):
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile_tome.txt")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rows", type=int, default=60)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    load_all()
    loaded = MODELS.get("vit-b16").cls(device="cuda", amp="float16").load()
    model = loaded.model
    x = torch.rand(256, 3, 224, 224, device="cuda").half()
    out = open(args.out, "w")

    def say(s: str) -> None:
        print(s, flush=True)
        out.write(s + "\n")

    conv = model.patch_embed.proj
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            conv(x)
        say(f"patch-embed conv NCHW: {events_ms(lambda: conv(x)):.3f} ms")
        xc = x.contiguous(memory_format=torch.channels_last)
        conv_cl = torch.nn.Conv2d(3, 768, 16, 16).cuda().to(memory_format=torch.channels_last)
        for _ in range(3):
            conv_cl(xc)
        say(f"patch-embed conv channels_last (input + weight): {events_ms(lambda: conv_cl(xc)):.3f} ms")
        say(f"input NCHW -> channels_last copy: {events_ms(lambda: x.contiguous(memory_format=torch.channels_last)):.3f} ms")
        w16 = conv.weight.half().reshape(768, -1)
        def as_gemm():
            p = x.unfold(2, 16, 16).unfold(3, 16, 16)  # B,3,14,14,16,16
            p = p.permute(0, 2, 3, 1, 4, 5).reshape(256 * 196, -1)
            return p @ w16.t()
        for _ in range(3):
            as_gemm()
        say(f"patch-embed as unfold + GEMM: {events_ms(as_gemm):.3f} ms")
    for name, r in (("none", 0), ("tome", args.r)):
        method = METHODS.get(name, "vit").cls(**({"r": r} if r else {}))
        with method.attach(model), torch.inference_mode():
            fwd = make_forward(model, "eager", torch.device("cuda"), "float16")
            for _ in range(5):
                fwd(x)
            say(f"{name} r={r}: {events_ms(lambda: fwd(x)):.3f} ms per batch of 256")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fwd(x)
                torch.cuda.synchronize()
        say(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    out.close()


if __name__ == "__main__":
    sys.exit(main())
