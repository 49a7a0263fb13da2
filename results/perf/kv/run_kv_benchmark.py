"""KV-cache eviction on the GPU at Llama-3.1-8B shape: prefill, TTFT, TPOT, memory, decode bandwidth.

Llama-3.1-8B's architecture from its config (no download), random bf16 weights, tokenbench's eviction cache
and attention function, greedy decoding of 128 fixed tokens (EOS ignored) through ``LMRunner.generate`` —
the harness's own measured path, CUDA-graph decode steps included. Per (context, batch, method, keep):
prefill ms, TTFT, steady-state TPOT, peak allocated/reserved above the weights, cache bytes (allocated
buffers and live entries), decode bandwidth = (weight bytes read + cache buffer bytes per step) / TPOT as a
fraction of the GPU's peak HBM bandwidth. Then the largest batch whose decode state fits at the longest
context, for ``none`` and ``streaming_llm`` at the smallest keep ratio, rows prefilled one at a time.

    python results/perf/kv/run_kv_benchmark.py --out results/perf/kv/kv_h200.json   # on the GPU
    python results/perf/kv/run_kv_benchmark.py --tiny --out /tmp/kv_tiny.json          # a CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tokenbench import fused_decode, kv_attention
from tokenbench.config import MeasureSettings
from tokenbench.env import environment
from tokenbench.kv_cache import EvictionCache
from tokenbench.lm import LMRunner, Prompt
from tokenbench.models.base import LoadedModel
from tokenbench.models.tiny import tiny_tokenizer
from tokenbench.registry import METHODS, load_all

FUSE = False  # --fuse: torch.compile the decoder's elementwise glue (tokenbench.fused_decode)
PEAK_HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}  # vendor peak memory bandwidth, TB/s


def llama31_8b_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    # meta-llama/Llama-3.1-8B config.json
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def load(tiny: bool, device: str) -> LoadedModel:
    from transformers import LlamaForCausalLM

    cfg = llama31_8b_config(tiny)
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return LoadedModel.wrap(model, tiny_tokenizer(), device, dtype, source="random init (Llama-3.1-8B config)")


def peak_bandwidth(device: str) -> tuple[float, str]:
    if device == "cpu":
        return float("nan"), "cpu"
    name = torch.cuda.get_device_name()
    for k, v in PEAK_HBM_TBPS.items():
        if k in name:
            return v * 1e12, name
    return float("nan"), name


def copy_bandwidth(device: str) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second), for reference."""
    if device == "cpu":
        return None
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return bw


def make_method(name: str, keep: float) -> Any:
    cls = METHODS.get(name, "kv").cls
    return cls() if name == "none" else cls(keep_ratio=keep)


def one(loaded: LoadedModel, name: str, keep: float, ctx: int, batch: int, new: int, question: int,
        peak_bw: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(ctx + batch)
    ids = torch.randint(10, loaded.model.config.vocab_size - 10, (batch, ctx + question), generator=g)
    prompt = Prompt(ids[:, :ctx], ids[:, ctx:])
    runner = LMRunner(loaded, make_method(name, keep), MeasureSettings(warmup=0, cuda_graph=True, fuse_kernels=FUSE))
    dev = loaded.device
    gc.collect()
    if dev != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_alloc, base_res = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    out = runner.generate(prompt, new, new)
    row: dict[str, Any] = {"method": name, "keep_ratio": None if name == "none" else keep, "context": ctx,
                           "batch": batch, "new_tokens": new, **{k: v for k, v in out.latency.items()}}
    if dev != "cpu":
        row["peak_allocated"] = torch.cuda.max_memory_allocated() - base_alloc
        row["peak_reserved"] = torch.cuda.max_memory_reserved() - base_res
    row["kv_cache_bytes"] = out.kv_cache_bytes  # allocated buffers, what each decode step reads
    row["kv_cache_bytes_used"] = out.compression.get("kv_cache_bytes_used")
    row["achieved_keep_ratio"] = out.compression["achieved_keep_ratio"]
    row["decode_graph"] = out.compression.get("decode_graph")
    step_bytes = weight_bytes_read(loaded.model, batch) + out.kv_cache_bytes
    row["decode_bytes_per_step"] = step_bytes
    row["decode_tokens_per_s"] = batch * 1e3 / out.latency["tpot_ms"]
    row["decode_bw_frac"] = step_bytes / (out.latency["tpot_ms"] * 1e-3) / peak_bw
    return row


def warm_shape(loaded: LoadedModel, ctx: int, batch: int, question: int, peak_bw: float) -> None:
    """One untimed ``none`` prefill (and two decode steps) of a (context, batch) shape before its first
    measured row: one-time costs of a new prefill shape (per-shape kernel plans, allocator growth) must not
    land on whichever method runs first."""
    print(f"warm-up ctx={ctx} b={batch} (untimed)", flush=True)
    try:
        one(loaded, "none", 1.0, ctx, batch, 2, question, peak_bw)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the rows report their own errors
        print(f"ctx={ctx} b={batch}: shape warm-up failed: {type(exc).__name__}"[:200], flush=True)
    if loaded.device != "cpu":
        torch.cuda.empty_cache()


def row_key(method: str, keep: Optional[float], ctx: int, batch: int, backend: Optional[str],
            gemv: str) -> tuple[Any, ...]:
    """What identifies a measured row (``--resume``): ``none``'s keep is 1.0 (stored as None)."""
    return method, 1.0 if keep is None else float(keep), int(ctx), int(batch), backend, gemv


def runs(name: str, device: str) -> bool:
    """Can ``name`` decode under the current ``DECODE_BACKEND``? Decode-time eviction needs the step's
    attention weights, which the SDPA backend does not return."""
    return not (kv_attention.decode_backend(device) == "sdpa" and make_method(name, 0.5).evicts_at_decode)


def weight_bytes_read(model: torch.nn.Module, batch: int) -> int:
    """Weight bytes a decode step reads: every parameter but the input embedding table, of which only the
    ``batch`` rows of the fed tokens are gathered (Llama-3.1-8B: 1.05 GB of its 16.06 GB are never read)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def fits(loaded: LoadedModel, name: str, keep: float, ctx: int, batch: int, question: int) -> bool:
    """Does the decode state of ``batch`` rows fit? One row is prefilled and compressed (a row-by-row
    prefill never holds more than one row's full cache); its cache is replicated to ``batch`` rows (the same
    bytes as distinct rows) and 4 decode steps run."""
    runner = LMRunner(loaded, make_method(name, keep), MeasureSettings(warmup=0, cuda_graph=False))
    dev = loaded.device
    ids = torch.randint(10, 1000, (1, ctx + question)).to(dev)
    pm, sm = torch.ones(1, ctx, dtype=torch.bool, device=dev), torch.ones(1, question, dtype=torch.bool,
                                                                          device=dev)
    merged = None
    try:
        with torch.inference_mode():
            cache, session, logits, first = runner._prefill(ids[:, :ctx], ids[:, ctx:], pm, sm, 4)
            merged = EvictionCache.merge([cache] * batch)
            del cache
            with runner.method.attach(loaded.model, merged) as s2:
                s2.adopt([session] * batch)
                tok = logits.argmax(-1).view(1, 1).expand(batch, 1).contiguous()
                with s2.decoding(4):
                    for step in range(4):
                        pos = (first + step).expand(batch, 1).contiguous()
                        merged.set_inputs(pos, torch.ones_like(pos, dtype=torch.bool))
                        tok = runner._forward(tok, pos, merged)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del merged
        torch.cuda.empty_cache()


def max_batch(loaded: LoadedModel, name: str, keep: float, ctx: int, question: int, start: int) -> int:
    lo, hi = 0, start
    while fits(loaded, name, keep, ctx, hi, question):  # double until it fails
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(loaded, name, keep, ctx, mid, question) else (lo, mid)
    return lo


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| ctx | batch | method | keep | decode attn | prefill ms | TTFT ms | TPOT ms | decode tok/s | × none | "
             "BW % peak | KV alloc GB | peak alloc GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["context"], r["batch"], r.get("decode_backend"), r.get("gemv")): r for r in rows
            if r["method"] == "none"}
    for r in rows:
        b = base.get((r["context"], r["batch"], r.get("decode_backend"), r.get("gemv"))) or base.get(
            (r["context"], r["batch"], "matmul", r.get("gemv")))
        speed = r["decode_tokens_per_s"] / b["decode_tokens_per_s"] if b else float("nan")
        gb = lambda x: f"{x / 1e9:.2f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['keep_ratio'] or 1.0} | "
                     f"{r.get('decode_backend')}{'' if r.get('gemv', 'cublas') == 'cublas' else ' + gemv'} | "
                     f"{r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | {r['tpot_ms']:.2f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {speed:.2f} | {100 * r['decode_bw_frac']:.0f} | "
                     f"{gb(r['kv_cache_bytes'])} | {gb(r.get('peak_allocated'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (smoke test)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--methods", nargs="+", default=None, help="kv methods (default: every registered one)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--question", type=int, default=32, help="question tokens after the compressed context")
    ap.add_argument("--max-batch", action="store_true", help="also search the largest batch at the longest "
                                                             "context")
    ap.add_argument("--decode-backends", nargs="+", default=["auto"], choices=kv_attention.DECODE_BACKENDS,
                    help="decode attention, each measured (sdpa: methods that need no attention weights only)")
    ap.add_argument("--fuse", action="store_true", help="measure.fuse_kernels: compiled RMSNorm/RoPE/MLP glue")
    ap.add_argument("--gemv", nargs="+", default=["triton"], choices=["cublas", "triton"],
                    help="with --fuse: the decode step's weight products, each measured (fused_decode.GEMV)")
    ap.add_argument("--accumulated", default="auto", choices=kv_attention.ACCUMULATED_BACKENDS,
                    help="a prefill's accumulated attention (h2o, observed_attention, vatp): "
                         "kv_attention.ACCUMULATED_BACKEND")
    ap.add_argument("--resume", type=Path, default=None,
                    help="a previous output: its rows are kept (in --out) and not measured again, so a grid can "
                         "run in several calls under a time limit")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    kv_attention.ACCUMULATED_BACKEND = args.accumulated
    global FUSE
    FUSE = args.fuse
    load_all()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    loaded = load(args.tiny, device)
    peak_bw, gpu = peak_bandwidth(device)
    names = args.methods or [c.registered_name for c in METHODS.family("kv")]
    names = ["none"] + [n for n in names if n != "none"]
    result: dict[str, Any] = {"gpu": gpu, "peak_hbm_bytes_per_s": peak_bw, "copy_bw_bytes_per_s":
                              copy_bandwidth(device), "weights_bytes": loaded.weights_bytes,
                              "env": environment(device), "args": {k: str(v) for k, v in vars(args).items()},
                              "rows": [], "errors": []}
    if args.resume is not None:
        result["rows"] = json.loads(args.resume.read_text())["rows"]
        result["resumed_from"] = str(args.resume)
    done = {row_key(r["method"], r["keep_ratio"], r["context"], r["batch"], r.get("decode_backend"),
                    r.get("gemv", "cublas")) for r in result["rows"]}
    for backend, gemv in [(bk, gm) for bk in args.decode_backends for gm in args.gemv]:  # warm-up, untimed:
        kv_attention.DECODE_BACKEND = backend  # every method's kernels once (cuBLAS, triton, ...)
        fused_decode.GEMV[0] = gemv
        for name in names:
            if runs(name, device):
                one(loaded, name, 0.5, 512, 2, 16, args.question, peak_bw)
    if args.max_batch and device != "cpu":  # first: cheap, and its answer exists nowhere else
        ctx, keep = max(args.contexts), min(args.keeps)
        result["max_batch"] = {"context": ctx, "none": max_batch(loaded, "none", 1.0, ctx, args.question, 8),
                               f"streaming_llm_keep{keep}": max_batch(loaded, "streaming_llm", keep, ctx,
                                                                      args.question, 64)}
        print("max batch:", result["max_batch"], flush=True)
    # the smallest keep ratio and the largest shapes first, so a time limit cuts the least informative runs
    blocks = sorted(((k, c, b) for k in sorted(args.keeps) for c in args.contexts for b in args.batches),
                    key=lambda kcb: (kcb[0], -kcb[1] * kcb[2]))
    warmed: set[tuple[int, int]] = set()
    for block_keep, ctx, batch in blocks:
        first_block = block_keep == min(args.keeps)
        for name, keep, backend, gemv in [(n, k, bk, gm) for n in names
                                          for k in (([1.0] if first_block else []) if n == "none" else [block_keep])
                                          for bk in args.decode_backends for gm in args.gemv]:
            kv_attention.DECODE_BACKEND = backend
            fused_decode.GEMV[0] = gemv
            if not runs(name, device) or row_key(name, keep, ctx, batch, kv_attention.decode_backend(device),
                                                 gemv if FUSE else "cublas") in done:
                continue
            if (ctx, batch) not in warmed:
                warmed.add((ctx, batch))
                warm_shape(loaded, ctx, batch, args.question, peak_bw)
            t = time.perf_counter()
            try:
                row = one(loaded, name, keep, ctx, batch, args.new_tokens, args.question, peak_bw)
                row["decode_backend"] = kv_attention.decode_backend(device)
                row["gemv"] = gemv if FUSE else "cublas"
                row["accumulated_backend"] = kv_attention.accumulated_backend(device)
                result["rows"].append(row)
                print(f"ctx={ctx} b={batch} {name} keep={keep} {backend} {gemv}: prefill {row['prefill_ms']:.0f} ms, "
                      f"TPOT {row['tpot_ms']:.2f} ms, BW {100 * row['decode_bw_frac']:.0f}% "
                      f"({time.perf_counter() - t:.1f} s)", flush=True)
            except Exception as exc:  # record and go on: one method's failure must not cost the rest
                result["errors"].append({"method": name, "keep": keep, "context": ctx, "batch": batch,
                                         "decode_backend": backend, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"ctx={ctx} b={batch} {name} keep={keep} {backend}: {type(exc).__name__}: {exc}"[:300],
                      flush=True)
                if device != "cpu":
                    torch.cuda.empty_cache()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))  # nothing lost on a kill
    result["markdown"] = markdown(result["rows"])
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(result["markdown"])


if __name__ == "__main__":
    main()
