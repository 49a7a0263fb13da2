"""Visual-token pruning on a LLaVA-1.5-7B-sized model: prefill time, time to first token and peak memory per
method, 576 visual tokens -> a budget (64 by default, plus 128 and 192).

    python -m tokenbench.perf.vlm_prefill --out results/perf/vlm
    python -m tokenbench.perf.vlm_prefill --device cpu --quick --out /tmp/vlm   # tiny model, checks the script
    python bench/perf/vlm_prefill.py --out results/perf/vlm   # from a bare checkout: torch + transformers only

The model is the architecture of ``llava-hf/llava-1.5-7b-hf`` (CLIP ViT-L/14-336 vision tower, 24 layers,
features from the penultimate one; 2-layer GELU MLP projector; Llama-2-7B / Vicuna-7B language model, 32 layers,
width 4096, vocabulary 32064) with random bfloat16 weights created directly on the GPU (speed and memory do not
depend on the values; no download). The prompt has LLaVA-1.5's layout: 35 text tokens (its vicuna_v1 system
prompt and ``USER:``), the 576 image tokens, 20 tokens of question, instruction and ``ASSISTANT:``; the image is
one 336 x 336 random tensor (preprocessing is outside every measurement).

Per method (``none`` at 576; every other registered vlm method at each budget, FastV and DART with K = 2):

- ``prefill_ms``: vision tower + the method + projector + language-model prefill up to the last logits, through
  the harness's own path (``VLMSession.prefill``), CUDA events, after ``--warmup`` untimed runs; the median of
  ``--repeats`` runs and the spread (max - min);
- ``ttft_ms`` / ``tpot_ms``: the runner's greedy generation (``VLMRunner.generate``): prefill to the first
  token, and the mean decode step over ``--decode-steps`` tokens (EOS ignored); medians over the repeats;
- ``peak_allocated`` / ``peak_reserved``: peak above the level before one prefill (the weights and whatever
  was alive), reset right before it (``tokenbench.measure.peak_memory``);
- ``lm_tokens``: the tokens every decoder layer processed, counted by hooks on the layers' outputs (not by the
  method): the visual tokens that reached the language model are ``lm_tokens - 55`` at each layer.

Writes ``vlm_prefill.json`` and ``vlm_prefill.md`` under ``--out``. Run as a file it needs torch and
transformers only (``bootstrap``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

VLM_METHOD_MODULES = ("vlm_none", "vlm_random", "fastervlm", "visionzip", "fastv", "dart")


def bootstrap() -> None:
    """Make ``tokenbench`` importable from a bare checkout with only torch and transformers installed (run as
    ``python bench/perf/vlm_prefill.py``): map the package folders as ``pyproject.toml`` does, and stand in for
    Hydra's ConfigStore and OmegaConf's ``MISSING`` (the registry stores config schemas; nothing here reads them)
    when those packages are missing."""
    for name in ("hydra.core.config_store", "omegaconf"):
        try:
            importlib.import_module(name)
        except ImportError:
            if name.startswith("hydra"):
                store = types.SimpleNamespace(store=lambda **kw: None, repo={})
                cs = types.ModuleType("hydra.core.config_store")
                cs.ConfigStore = types.SimpleNamespace(instance=lambda store=store: store)
                for mod in ("hydra", "hydra.core"):
                    sys.modules.setdefault(mod, types.ModuleType(mod))
                sys.modules["hydra.core.config_store"] = cs
            else:
                om = types.ModuleType("omegaconf")
                om.MISSING = "???"
                sys.modules["omegaconf"] = om
    if "tokenbench" in sys.modules or (importlib.util.find_spec("tokenbench") is not None
                                        and not os.environ.get("TOKENBENCH_BOOTSTRAP")):
        return
    repo = Path(__file__).resolve().parents[2]
    for name, folder in (("tokenbench", "bench"), ("tokenbench.methods", "methods"), ("tokenbench.tasks", "tasks")):
        spec = importlib.util.spec_from_file_location(name, repo / folder / "__init__.py",
                                                      submodule_search_locations=[str(repo / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


if __name__ == "__main__" and __package__ in (None, ""):
    bootstrap()

from tokenbench.measure import Timer, peak_memory
from tokenbench.models.hf_utils import count_weight_bytes
from tokenbench.registry import METHODS


def load_vlm_methods() -> None:
    """Register the vlm methods only (not every task and model: their optional dependencies stay out)."""
    for name in VLM_METHOD_MODULES:
        importlib.import_module(f"tokenbench.methods.{name}")

TEXT_BEFORE, TEXT_AFTER = 35, 20  # LLaVA-1.5's vicuna_v1 prompt around the image (FastV's image_token_start_index)
ORDER = ["none", "random", "fastervlm", "visionzip", "fastv", "dart"]


def llava15_config(quick: bool) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if quick:  # a tiny stand-in with the same structure (64 visual tokens)
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=112, patch_size=14, projection_dim=64, hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, tie_word_embeddings=False)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = 1, 2, 32001
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       tie_word_embeddings=False)


def build_model(device: torch.device, dtype: torch.dtype, quick: bool, attn: str) -> Any:
    """Random weights created on the device in the target dtype (no CPU initialisation of 7B parameters)."""
    from transformers import LlavaForConditionalGeneration

    config = llava15_config(quick)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()  # created on the device in its dtype (rotary tables stay float32)


def prompt(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    vc = config.vision_config
    n_visual = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (TEXT_BEFORE + TEXT_AFTER,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[: TEXT_BEFORE - 1], torch.full((n_visual,), config.image_token_id),
                     text[TEXT_BEFORE - 1:]]).view(1, -1)
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device=device, dtype=dtype)}


def kernel_ms(fn: Any, device: torch.device, n: int = 3) -> float | None:
    """GPU kernel time of one ``fn()`` (torch.profiler, mean of ``n``): the device work alone. At batch 1 a 7B
    prefill of ~600 tokens is host-bound (the wall time is Python and kernel launches), so the wall-clock
    prefill barely moves with the token count while this does."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / n / 1e3


def measure_point(model: Any, method: Any, inputs: dict, args: Any, device: torch.device) -> dict[str, Any]:
    from tokenbench.config import MeasureSettings
    from tokenbench.models.base import LoadedModel
    from tokenbench.vlm import VLMRunner

    loaded = LoadedModel(model=model, tokenizer=SimpleNamespace(eos_token_id=2), device=str(device))
    runner = VLMRunner(loaded, method, MeasureSettings(warmup=0, repeats=1))
    timer = Timer(device)

    def prefill_once() -> float:
        with timer.region() as r:
            runner.prefill_logits(inputs)
        return r.ms

    for _ in range(args.warmup):
        prefill_once()
    times = [prefill_once() for _ in range(args.repeats)]
    gpu_ms = kernel_ms(lambda: runner.prefill_logits(inputs), device)
    with peak_memory(device) as mem:
        _, stats = runner.prefill_logits(inputs)
    lengths = stats["lm_tokens_per_layer"]  # tokens entering each decoder layer, counted by the session
    gens = [runner.generate(inputs, 1, args.decode_steps) for _ in range(max(1, args.repeats // 2))]
    med = lambda k: statistics.median(g["latency"][k] for g in gens if g["latency"][k] is not None)
    return {
        "method": method.name, "budget": stats["visual_tokens_kept"] if method.name != "none" else None,
        "visual_tokens_in": stats["visual_tokens_in"], "visual_tokens_kept": stats["visual_tokens_kept"],
        "prune_layer": stats["prune_layer"], "lm_tokens": lengths,
        "prefill_ms": statistics.median(times), "prefill_ms_spread": max(times) - min(times),
        "prefill_ms_all": times, "prefill_gpu_kernel_ms": gpu_ms, "ttft_ms": med("ttft_ms"), "tpot_ms": med("tpot_ms"),
        "peak_allocated": mem.peak_allocated, "peak_reserved": mem.peak_reserved,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = result["points"]
    base = next((r for r in rows if r["method"] == "none"), None)
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"
    lines = [f"# VLM visual-token pruning: {result['model']}", "",
             (f"{result['device_name']}, {result['dtype']}, attention {result['attn']}; torch {result['torch']}, "
             f"transformers {result['transformers']}; prompt {result['prompt_tokens']} tokens "
             f"({result['visual_tokens']} visual); warm-up {result['warmup']}, median of {result['repeats']}."), "",
             ("| method | visual tokens → LM (per layer) | prefill ms (spread) | speed-up | prefill GPU kernel ms "
             "| kernel speed-up | TTFT ms | TPOT ms | peak alloc MiB | peak reserved MiB |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        text = result["prompt_tokens"] - result["visual_tokens"]
        per_layer = sorted({n - text for n in r["lm_tokens"]}, reverse=True)
        where = "→".join(str(v) for v in per_layer) + (f" (after layer {r['prune_layer']})" if r["prune_layer"] else "")
        speed = f"{base['prefill_ms'] / r['prefill_ms']:.2f}x" if base else "-"
        tpot = "-" if r["tpot_ms"] is None else f"{r['tpot_ms']:.2f}"
        gpu, base_gpu = r.get("prefill_gpu_kernel_ms"), (base or {}).get("prefill_gpu_kernel_ms")
        gpu_s = "-" if gpu is None else f"{gpu:.2f}"
        gpu_x = f"{base_gpu / gpu:.2f}x" if gpu and base_gpu else "-"
        lines.append(f"| {r['method']} | {where} | {r['prefill_ms']:.2f} ({r['prefill_ms_spread']:.2f}) | {speed} "
                     f"| {gpu_s} | {gpu_x} | {r['ttft_ms']:.2f} | {tpot} | {mib(r['peak_allocated'])} "
                     f"| {mib(r['peak_reserved'])} |")
    lines += ["", ("Peak memory is above the level before the prefill (the weights are not included). \"prefill ms\" is "
              "wall time (CUDA events around the call); \"GPU kernel ms\" is the summed kernel time of one prefill "
              "(torch.profiler): at batch 1 the wall time is bound by the host (launches), the kernel time is "
              "the device work the pruning saves. Written by `python -m tokenbench.perf.vlm_prefill`.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf/vlm")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a tiny model (64 visual tokens), for checking the script")
    ap.add_argument("--budgets", default=None, help="visual tokens kept (default 64,128,192; quick: 8,16)")
    ap.add_argument("--methods", default=",".join(ORDER[1:]))
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--decode-steps", type=int, default=16)
    args = ap.parse_args(argv)
    load_vlm_methods()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budgets = [int(b) for b in (args.budgets or ("8,16" if args.quick else "64,128,192")).split(",")]
    t0 = time.time()
    model = build_model(device, dtype, args.quick, args.attn)
    inputs = prompt(model.config, device, dtype)
    import transformers

    result: dict[str, Any] = {
        "model": "tiny LLaVA (quick)" if args.quick else "LLaVA-1.5-7B architecture (random bf16 weights)",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "attn": args.attn, "torch": torch.__version__,
        "transformers": transformers.__version__, "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "warmup": args.warmup, "repeats": args.repeats, "decode_steps": args.decode_steps,
        "weights_bytes": count_weight_bytes(model),
        "build_s": time.time() - t0, "points": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = [("none", {})] + [(m, {"n_keep": b}) for b in budgets for m in args.methods.split(",") if m != "none"]
    for name, kw in points:
        method = METHODS.get(name, "vlm").cls(**kw)
        point = measure_point(model, method, inputs, args, device)
        result["points"].append(point)
        print(f"{name:10s} {kw or ''!s:16s} kept {point['visual_tokens_kept']:4d}  prefill {point['prefill_ms']:8.2f} ms"
              f"  ttft {point['ttft_ms']:8.2f} ms  peak {point['peak_allocated']}", flush=True)
        (out / "vlm_prefill.json").write_text(json.dumps(result, indent=1))
    result["total_s"] = time.time() - t0
    (out / "vlm_prefill.json").write_text(json.dumps(result, indent=1))
    (out / "vlm_prefill.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
