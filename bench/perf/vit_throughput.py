"""ViT token-reduction throughput on a GPU, ToMe-style, plus the harness overhead of the imagenet task loop.

    python -m tokenbench.perf.vit_throughput --out results/perf/vit

For ViT-S/16, ViT-B/16 and ViT-L/16 (timm, random weights: speed does not depend on them), batch 256, float16
autocast over float32 weights, every vit method at the ToMe README's r values (S: 13; B: 13, 16; L: 7, 8):

- throughput: ToMe's benchmark protocol (``tome/utils.py: benchmark``: random input, warm-up batches thrown
  out, synchronised timing over the rest), here with CUDA events, ``--repeats`` timed rounds of ``--iters``
  batches each; the median round is reported with the spread (max - min) of the rounds;
- FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention; the
  gathers and scatters of merging are not FLOPs it counts), and the achieved token keep ratio;
- what each ingredient contributes on ViT-B (r = 16): timm's explicit softmax attention (as in the official
  ToMe patch) instead of fused SDPA, CUDA graphs, ``torch.compile``;
- harness overhead: the real pipeline (``tokenbench.run.execute`` with the imagenet task on a folder of
  generated JPEGs, decoded before the loop: ``task.preload=true``) against the bare model's throughput.

Writes ``vit_throughput.json`` and ``vit_throughput.md`` under ``--out``. ``--device cpu --quick`` runs a
tiny configuration end to end (to check the script without a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tokenbench.families.vit import input_tokens
from tokenbench.registry import METHODS, MODELS, load_all
from tokenbench.families import vit as vit_family
from tokenbench.vision import autocast, count_flops, make_forward

R_VALUES = {"vit-s16": [13], "vit-b16": [13, 16], "vit-l16": [7, 8]}  # the ToMe README's
LABEL = {"vit-s16": "ViT-S/16", "vit-b16": "ViT-B/16", "vit-l16": "ViT-L/16", "tiny-vit": "tiny-vit"}
METHOD_ORDER = ["tome", "pitome", "evit", "random"]
PROFILES: dict[str, str] = {}
T0 = time.time()
STATE: dict[str, Any] = {}


def save(args, **parts: Any) -> None:
    """Write what is known so far (a run cut short still leaves its numbers)."""
    STATE.update(parts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_throughput.json").write_text(json.dumps({**STATE, "profiles": PROFILES}, indent=1))


def timed(fn: Callable, x: torch.Tensor, warmup: int, iters: int, repeats: int, device: torch.device) -> dict:
    """Images per second over ``repeats`` rounds of ``iters`` forwards after ``warmup`` forwards."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        rates = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn(x)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                ms = (time.perf_counter() - t0) * 1e3
            rates.append(iters * x.shape[0] * 1e3 / ms)
    return {
        "images_per_s": statistics.median(rates),
        "spread": max(rates) - min(rates),
        "rounds": rates,
        "ms_per_batch": x.shape[0] * 1e3 / statistics.median(rates),
    }


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "qkv"):
            m.fused_attn = fused


def measure(model, method, x, device, amp, execution: str, args) -> dict:
    """Throughput, FLOPs and token counts of one (model, method, execution)."""
    with method.attach(model) as session:
        fwd = make_forward(model, execution, device, amp)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fwd(x)  # first call: compilation / capture
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_s = time.perf_counter() - t0
        res = timed(fwd, x, args.warmup, args.iters, args.repeats, device)
        with torch.inference_mode(), autocast(device, amp):
            model(x[:1])  # eager forward, so the session's token counts are fresh
            stats = session.stats(input_tokens(model))
            flops = count_flops(model, x[:1])
    return {
        **res,
        "flops_per_image": flops,
        "tokens_per_layer": stats["tokens_per_layer"],
        "achieved_keep_ratio": stats["achieved_keep_ratio"],
        "first_call_s": first_s,
    }


def build(name: str, device: str, quick: bool):
    load_all()
    kw = {"device": device, "amp": "float16" if device.startswith("cuda") else "none"}
    if name == "tiny-vit":
        kw.update(img_size=64, patch_size=8, depth=4)
    return MODELS.get(name).cls(**kw).load()


def throughput_table(
    args, device: torch.device, deadline: float, compile_pass: bool = False, rows: Optional[list[dict]] = None
) -> list[dict]:
    rows = [] if rows is None else rows
    for name in [args.ablate] if compile_pass else args.models:
        loaded = build(name, str(device), args.quick)
        model, amp = loaded.model, loaded.info["amp"]
        size = loaded.info["data_config"]["input_size"]
        x = torch.rand(args.batch, *size, device=device)
        if amp:
            x = x.to(getattr(torch, amp))
        r_values = [4] if args.quick else R_VALUES[name]
        points = [("none", 0, "eager", True)]
        points += [(m, r, "eager", True) for r in r_values for m in METHOD_ORDER]
        r = max(r_values)
        if device.type == "cuda" and args.graphs:  # launch overhead removed, at the largest r
            points += [("none", 0, "cuda_graph", True), ("tome", r, "cuda_graph", True)]
        if name == args.ablate:
            # proportional attention as an attn_mask bias instead of a key channel; timm's explicit softmax
            # attention (the official ToMe patch's path) for the baseline and ToMe
            points += [("tome", r, "eager", "bias"), ("none", 0, "eager", False), ("tome", r, "eager", False)]
        if compile_pass:
            points = [("none", 0, "compile", True), ("tome", r, "compile", True)]
        for method_name, r, execution, fused in points:
            if time.time() > deadline and execution == "compile":
                print(f"skip {name} {method_name} r={r} {execution}: out of time", flush=True)
                continue
            method = METHODS.get(method_name, "vit").cls(**({"r": r} if r else {}))
            attention = (
                "fused" if fused is True else "explicit" if fused is False else "fused, attn_mask bias"
            )
            set_fused(model, fused is not False)
            vit_family.PROP_ATTN = "bias" if fused == "bias" else "auto"
            try:
                res = measure(model, method, x, device, amp, execution, args)
                err = None
            except Exception as exc:  # one failing point must not cost the table
                res, err = {}, f"{type(exc).__name__}: {exc}"
            finally:
                set_fused(model, True)
                vit_family.PROP_ATTN = "auto"
            row = {
                "model": name,
                "method": method_name,
                "r": r,
                "execution": execution,
                "attention": attention,
                "batch": args.batch,
                "error": err,
                "at_s": round(time.time() - T0, 1),
                **res,
            }
            rows.append(row)
            print(
                json.dumps({k: v for k, v in row.items() if k not in ("rounds", "tokens_per_layer")}),
                flush=True,
            )
            save(args, throughput=rows)
        if profile_point := next((p for p in args.profile if p[0] == name), None):
            if not compile_pass:
                rows_profile(args, model, amp, x, device, profile_point)
        del model, loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {
        (r["model"]): r
        for r in rows
        if r["method"] == "none"
        and r["execution"] == "eager"
        and r["attention"] == "fused"
        and not r["error"]
    }
    for r in rows:
        b = base.get(r["model"])
        if b and not r["error"]:
            r["speedup"] = r["images_per_s"] / b["images_per_s"]
            r["flop_ratio"] = r["flops_per_image"] / b["flops_per_image"]
    return rows


def flops_table(args, device: torch.device) -> list[dict]:
    """FLOPs per image, token counts and keep ratio of every (model, method, r) point; no timing, any device."""
    rows = []
    for name in args.models:
        loaded = build(name, str(device), args.quick)
        model = loaded.model
        x = torch.rand(1, *loaded.info["data_config"]["input_size"], device=device)
        base = None
        for method_name, r in [("none", 0)] + [
            (m, r) for r in ([4] if args.quick else R_VALUES[name]) for m in METHOD_ORDER
        ]:
            method = METHODS.get(method_name, "vit").cls(**({"r": r} if r else {}))
            with method.attach(model) as session, torch.inference_mode():
                model(x)
                flops = count_flops(model, x)
                stats = session.stats(input_tokens(model))
            base = flops if base is None else base
            row = {
                "model": name,
                "method": method_name,
                "r": r,
                "flops_per_image": flops,
                "flop_ratio": flops / base,
                "tokens_per_layer": stats["tokens_per_layer"],
                "achieved_keep_ratio": stats["achieved_keep_ratio"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, loaded
    return rows


def rows_profile(args, model, amp, x, device, point) -> None:
    """GPU kernel time of one forward per method (torch.profiler), grouped by kernel, top 25."""
    from torch.profiler import ProfilerActivity, profile

    _, method_name, r = point
    for name, rr in (("none", 0), (method_name, r)):
        method = METHODS.get(name, "vit").cls(**({"r": rr} if rr else {}))
        with method.attach(model), torch.inference_mode():
            fwd = make_forward(model, "eager", device, amp)
            for _ in range(3):
                fwd(x)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(3):
                    fwd(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
        PROFILES[f"{point[0]} {name} r={rr} (3 forwards)"] = table
        print(table, flush=True)


def write_images(root: Path, n: int, classes: int, size: int = 256) -> None:
    """An ImageFolder of ``n`` random-content JPEGs (decoded once before the loop: content is irrelevant)."""
    import numpy as np
    from PIL import Image

    import os

    rng = np.random.default_rng(0)
    distinct = []
    for i in range(n):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:05d}.jpg"
        if len(distinct) < 64:  # 64 distinct files, hard links for the rest: writing costs no device time
            Image.fromarray(rng.integers(0, 256, (size, size + 32, 3), dtype=np.uint8)).save(path, quality=85)
            distinct.append(path)
        else:
            os.link(distinct[i % len(distinct)], path)


def harness_overhead(args, device: torch.device, table: list[dict]) -> list[dict]:
    """The imagenet task through the real pipeline vs the bare model (same model, method, batch)."""
    from hydra import compose, initialize_config_dir

    from tokenbench.cli import CONF_DIR
    from tokenbench.config import store_base_config
    from tokenbench.run import execute, plan

    from tokenbench import registry

    registry.load_all()  # the method/model/task config groups (idempotent)
    store_base_config()
    import tokenbench.vision as vision

    out = []
    n = args.batch * (2 if args.quick else args.overhead_batches)
    saved_depth = vision.PIPELINE_DEPTH  # a process-wide setting: set per point, restored after
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "images"
            write_images(root, n, classes=10)
            points = [(d, p) for d in args.pipeline_depths for p in args.overhead]
            for depth, (name, method, r, execution) in points:
                vision.PIPELINE_DEPTH = depth
                overrides = [
                    f"model={name}",
                    f"model.device={device}",
                    f"model.execution={execution}",
                    f"method={method}",
                    "task=imagenet",
                    f"task.root={root}",
                    "task.preload=true",
                    f"task.batch_size={args.batch}",
                    f"task.limit={n}",
                    f"measure.warmup={args.warmup}",
                    "wandb.mode=disabled",
                    f"output_dir={Path(tmp) / f'runs{depth}'}",
                    "progress=false",
                ]
                if name == "tiny-vit":
                    overrides += ["model.img_size=64", "model.patch_size=8"]
                if r:
                    overrides.append(f"method.r={r}")
                with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                    cfg = compose(config_name="config", overrides=overrides)
                rec = execute(plan(cfg), progress=False)
                bare = next(
                    (
                        t
                        for t in table
                        if t["model"] == name
                        and t["method"] == method
                        and t["r"] == r
                        and t["execution"] == execution
                        and t["attention"] == "fused"
                        and not t["error"]
                    ),
                    None,
                )
                row = {
                    "model": name,
                    "method": method,
                    "r": r,
                    "execution": execution,
                    "pipeline_depth": depth,
                    "n_images": rec.n_samples,
                    "loop_images_per_s": rec.extra.get("stream_images_per_s"),
                    "timed_forward_images_per_s": rec.latency.get("images_per_s"),
                    "bare_images_per_s": bare["images_per_s"] if bare else None,
                    "status": rec.status,
                }
                if row["bare_images_per_s"] and row["loop_images_per_s"]:
                    row["loop_vs_bare"] = row["loop_images_per_s"] / row["bare_images_per_s"]
                out.append(row)
                print(json.dumps(row), flush=True)
    finally:
        vision.PIPELINE_DEPTH = saved_depth
    return out


def markdown(rows: list[dict], overhead: list[dict], env: dict) -> str:
    def f(v: Any, spec: str) -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        f"Device: {env['gpu']} · torch {env['torch']} · timm {env['timm']} · batch {env['batch']} · "
        f"{env['precision']} · random weights",
        "",
    ]
    lines += [
        "| model | method | r | im/s (median ± spread) | speedup | GFLOPs/img | FLOP ratio "
        "| ceiling 1/FLOP ratio | keep ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["execution"] != "eager" or r["attention"] != "fused":
            continue
        if r["error"]:
            lines.append(
                f"| {LABEL[r['model']]} | {r['method']} | {r['r']} | failed: {r['error'][:80]} | | | | | |"
            )
            continue
        fr = r.get("flop_ratio")
        lines.append(
            f"| {LABEL[r['model']]} | {r['method']} | {r['r'] or '—'} | "
            f"{f(r['images_per_s'], '.0f')} ± {f(r['spread'], '.0f')} | {f(r.get('speedup'), '.2f')}× | "
            f"{f(r['flops_per_image'] / 1e9, '.2f')} | {f(fr, '.3f')} | "
            f"{f(1 / fr if fr else None, '.2f')}× | {f(r['achieved_keep_ratio'], '.3f')} |"
        )
    extra = [r for r in rows if r["execution"] != "eager" or r["attention"] != "fused"]
    if extra:
        lines += [
            "",
            "What each ingredient contributes (speedup against the eager timm baseline, fused attention):",
            "",
            "| model | method | r | execution | attention | im/s | speedup | first call (s) |",
            "|---|---|---:|---|---|---:|---:|---:|",
        ]
        for r in [
            r for r in rows if r["method"] in ("none", "tome") and r["model"] in {e["model"] for e in extra}
        ]:
            if (
                r["execution"] == "eager"
                and r["attention"] == "fused"
                and r["method"] == "tome"
                and r["r"] != max(x["r"] for x in extra if x["model"] == r["model"])
            ):
                continue
            if r["error"]:
                lines.append(
                    f"| {LABEL[r['model']]} | {r['method']} | {r['r'] or '—'} | {r['execution']} | "
                    f"{r['attention']} | failed: {r['error'][:60]} | | |"
                )
                continue
            lines.append(
                f"| {LABEL[r['model']]} | {r['method']} | {r['r'] or '—'} | {r['execution']} | "
                f"{r['attention']} | {f(r['images_per_s'], '.0f')} | {f(r.get('speedup'), '.2f')}× | "
                f"{f(r.get('first_call_s'), '.1f')} |"
            )
    if overhead:
        lines += [
            "",
            "Harness overhead: the imagenet task through `tokenbench.run.execute` (images decoded before the "
            "loop) against the bare model:",
            "",
            "| model | method | r | execution | queued forwards | images | loop im/s | bare model im/s "
            "| loop / bare | timed-forward im/s |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for o in overhead:
            lines.append(
                f"| {LABEL[o['model']]} | {o['method']} | {o['r'] or '—'} | {o['execution']} | "
                f"{o.get('pipeline_depth', 1)} | {o['n_images']} | "
                f"{f(o['loop_images_per_s'], '.0f')} | {f(o['bare_images_per_s'], '.0f')} | "
                f"{f(o.get('loop_vs_bare'), '.3f')} | {f(o['timed_forward_images_per_s'], '.0f')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf/vit")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="vit-s16,vit-b16,vit-l16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ablate", default="vit-b16", help="model whose ingredients are measured separately")
    ap.add_argument("--compile", action="store_true", help="include torch.compile in the ablation (last)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="skip the CUDA-graph points")
    ap.add_argument("--profile", default="vit-b16:tome:16", help="model:method:r to profile ('' to skip)")
    ap.add_argument(
        "--overhead",
        default=(
            "vit-b16:none:0,vit-b16:tome:16,vit-b16:tome:16:cuda_graph,"
            "vit-s16:none:0,vit-s16:none:0:cuda_graph,vit-s16:tome:13:cuda_graph"
        ),
        help="model:method:r[:execution] points of the harness-overhead measurement ('' to skip)",
    )
    ap.add_argument("--overhead-batches", type=int, default=64)
    ap.add_argument("--pipeline-depths", default="2", help="vision.PIPELINE_DEPTH values, overhead")
    ap.add_argument("--budget-s", type=float, default=420, help="skip compile points after this many seconds")
    ap.add_argument(
        "--flops-only", action="store_true", help="FLOPs and token counts only (no timing; CPU is fine)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny model, small batch: checks the script on a CPU"
    )
    args = ap.parse_args(argv)
    start = time.time()
    args.models = [m for m in args.models.split(",") if m]

    def point(p: str) -> tuple:
        parts = p.split(":")
        return (parts[0], parts[1], int(parts[2]), parts[3] if len(parts) > 3 else "eager")

    args.overhead = [point(p) for p in args.overhead.split(",") if p]
    args.pipeline_depths = [int(d) for d in args.pipeline_depths.split(",") if d]
    args.profile = [point(p)[:3] for p in args.profile.split(",") if p]
    if args.quick:
        args.models, args.batch, args.warmup, args.iters, args.repeats = ["tiny-vit"], 4, 1, 2, 2
        args.ablate = "tiny-vit"
        args.overhead = [("tiny-vit", "none", 0, "eager"), ("tiny-vit", "tome", 4, "eager")]
        args.profile = [("tiny-vit", "tome", 4)]
    device = torch.device(args.device)
    # cuDNN picks its convolution algorithm by timing (as timm's benchmark.py does): with its default
    # heuristic the 16x16/16 patch-embedding convolution took ~2 ms of a ~28 ms ViT-B/16 batch on the H200
    torch.backends.cudnn.benchmark = True
    import timm

    env = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch": args.batch,
        "precision": "float16 autocast, float32 weights" if device.type == "cuda" else "float32",
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
    }
    out = Path(args.out)
    if args.flops_only:
        rows = flops_table(args, device)
        (out / "vit_flops.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "vit_flops.json").write_text(
            json.dumps({"env": {k: env[k] for k in ("torch", "timm")}, "flops": rows}, indent=1)
        )
        return 0
    save(args, env=env)
    # every model's table first, then the harness overhead (which compares with the bare-model rows)
    rows = throughput_table(args, device, start + args.budget_s)
    overhead = harness_overhead(args, device, rows) if args.overhead else []
    save(args, overhead=overhead)
    (out / "vit_throughput.md").write_text(markdown(rows, overhead, env))
    print(markdown(rows, overhead, env), flush=True)
    if args.compile:
        rows = throughput_table(args, device, start + args.budget_s, compile_pass=True, rows=rows)
    env["wall_s"] = time.time() - start
    save(args, env=env, throughput=rows)
    md = markdown(rows, overhead, env)
    (out / "vit_throughput.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
