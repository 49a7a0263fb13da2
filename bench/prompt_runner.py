"""The runner of the ``prompt`` family: compress the context, then generate from the shorter prompt with the
full-cache ``LMRunner``, and measure both.

Per sample:

1. ``method.compress(sample.context, sample.question, protect_prefix)`` — only the context is compressed; the
   question is passed read-only. ``protect_prefix`` is ``sample.meta["instruction_chars"]`` (LongBench's
   instruction at the start of the context, which a compressor keeps, as LLMLingua keeps its ``instruction``)
   or 0. Timed with ``perf_counter`` after synchronising the compressor's and the target's devices, and
   synchronised again at the end (CUDA work is finished inside the region).
2. The sample with the compressed context goes through ``LMRunner.run`` (method ``none`` of the kv family: the
   full cache of the shorter prompt), which builds the chat prompt (context prefix / question suffix) and
   measures prefill, time to first token, time per output token and end-to-end generation.

Latency keys (milliseconds): ``compress_ms``; ``prefill_ms``, ``tpot_ms`` as ``LMRunner`` reports them;
``ttft_ms`` = ``compress_ms`` + the generation's time to first token, ``e2e_ms`` = ``compress_ms`` + the
generation's end-to-end time (the compressor's time is inside the end-to-end figure); the generation's own
values are kept as ``generate_ttft_ms`` / ``generate_e2e_ms``, and ``decode_ms`` = generation end-to-end -
its time to first token. With ``measure.repeats > 1`` the compression is repeated too and its median kept.

Memory: the compressor is loaded once, before any measured region (``compressor_weights_bytes``; 0 when the
compressor is the target model). ``peak_allocated`` is the larger of the compression region's peak and the
generation's peak, each above its own starting level (on CUDA allocator statistics; on CPU the growth of the
process's peak RSS, see ``tokenbench.measure``; ``None`` where the platform does not expose it). A compressor
on another device than the target is reported apart as ``compress_peak_allocated`` only.

Compression record (``compression``): ``achieved_keep_ratio`` (target-tokenizer tokens of the compressed body
/ of the original body), ``original_tokens``, ``compressed_tokens``, ``budget_tokens``, ``context_keep_ratio``
(the whole context including a protected instruction), ``units_total`` / ``units_kept`` and the method's
``info``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import Compressed, PromptCompressor
from tokenbench.lm import GenerationOutput, LMRunner
from tokenbench.measure import Timer, measured_repeats, median_spread


class PromptRunner:
    """Runs samples through a prompt compressor and then the target LM (full cache)."""

    def __init__(self, loaded: Any, method: PromptCompressor, measure: MeasureSettings | None = None):
        if not isinstance(method, PromptCompressor):
            raise TokenbenchError(f"PromptRunner runs prompt-family methods; got '{getattr(method, 'name', method)}' "
                                  f"of family '{getattr(method, 'family', '?')}'")
        self.measure = measure if measure is not None else MeasureSettings()
        if int(getattr(self.measure, "batch_size", 1) or 1) != 1:
            raise TokenbenchError("the prompt family runs one sample at a time (measure.batch_size=1)")
        self.loaded = loaded
        self.method = method
        self.lm = LMRunner(loaded, None, self.measure)
        self.device = torch.device(loaded.device)
        method.prepare(loaded)  # the compressor is loaded here, once, outside every measured region
        lm = method.compressor_model
        self.compressor_device = torch.device(lm.device) if lm is not None else self.device
        self.compressor_weights_bytes = 0 if lm is None or lm is loaded else int(lm.weights_bytes or 0)
        self._warmed = False
        self.last_sample: Any = None  # the sample as the target saw it (compressed context), for inspection
        self.last_compressed: Compressed | None = None

    def _sync(self) -> None:
        for dev in {self.device, self.compressor_device}:
            Timer(dev).synchronize()

    def compress(self, sample: Any) -> tuple[Compressed, float]:
        """The compressed context of ``sample`` and the milliseconds it took."""
        protect = int((getattr(sample, "meta", None) or {}).get("instruction_chars") or 0)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.method.compress(sample.context or "", sample.question or "", protect)
            self._sync()
        return out, (time.perf_counter() - t0) * 1e3

    def run(self, sample: Any, use_chat_template: bool = True) -> GenerationOutput:
        runs, peaks = measured_repeats(lambda: self.compress(sample), self.compressor_device,
                                       self.measure.repeats, 0 if self._warmed else self.measure.warmup)
        self._warmed = True
        comp = runs[0][0]
        times = [ms for _, ms in runs]
        compress_ms, spread = median_spread(times)
        compressed = dataclasses.replace(sample, context=comp.context)
        self.last_sample, self.last_compressed = compressed, comp
        gen = self.lm.run(compressed, use_chat_template=use_chat_template)

        lat = dict(gen.latency)
        g_ttft, g_e2e = lat.get("ttft_ms"), lat.get("e2e_ms")
        lat.update({
            "compress_ms": compress_ms,
            "generate_ttft_ms": g_ttft,
            "generate_e2e_ms": g_e2e,
            "ttft_ms": compress_ms + g_ttft if g_ttft is not None else None,
            "e2e_ms": compress_ms + g_e2e if g_e2e is not None else None,
            "decode_ms": g_e2e - g_ttft if g_e2e is not None and g_ttft is not None else None,
        })
        if len(times) > 1:
            lat["compress_ms_spread"] = spread
        mem = dict(gen.memory)
        c_peak = peaks["peak_allocated"]
        mem["compress_peak_allocated"] = c_peak
        mem["compressor_weights_bytes"] = self.compressor_weights_bytes
        if self.compressor_device == self.device and c_peak is not None:
            g_peak = mem.get("peak_allocated")
            mem["peak_allocated"] = c_peak if g_peak is None else max(g_peak, c_peak)

        compression = {
            "achieved_keep_ratio": comp.keep_ratio,
            "original_tokens": comp.original_tokens,
            "compressed_tokens": comp.compressed_tokens,
            "budget_tokens": comp.budget_tokens,
            "protected_chars": comp.protected_chars,
            "context_keep_ratio": (len(self.lm.tokenizer(comp.context, add_special_tokens=False)["input_ids"])
                                   / max(1, len(self.lm.tokenizer(sample.context or "",
                                                                  add_special_tokens=False)["input_ids"]))),
            "unit_tokens": comp.unit_tokens,
            "units_total": comp.units_total,
            "units_kept": comp.units_kept,
            **({"info": comp.info} if comp.info else {}),
        }
        return dataclasses.replace(gen, latency=lat, memory=mem, compression=compression)

    def summary(self) -> dict[str, Any]:
        m = self.method
        return {
            "compressor": getattr(m, "compressor", None) or getattr(m, "model_path", None),
            "compressor_device": str(self.compressor_device),
            "compressor_load_s": getattr(m, "compressor_load_s", None),
            "compressor_weights_bytes": self.compressor_weights_bytes,
        }
