"""The LLM generation runner of the ``kv`` family: chat template, compressed prefill, greedy decoding with
explicit positions, and the measurements of DESIGN.md ("Measurement protocol").

One sample, one generation in ``run``; ``generate`` takes a batch: prompts of different lengths are left
padded (``Prompt.batch``), padding is never cached as a live token nor counted in a budget, and every row
gets its own positions and budget. ``prefill_rows`` prefills (and compresses) a few rows at a time and then
decodes all of them together, so only those rows' full caches ever coexist. Decoding runs over the
``EvictionCache`` with static shapes; on CUDA its steps replay a captured CUDA graph (``measure.cuda_graph``)
and ``measure.fuse_kernels`` compiles the decoder's elementwise glue (``tokenbench.fused_decode``).

Prompt layout. The user message is ``sample.context + sample.question``; with a chat template the formatted
prompt is cut where the context text ends:

    prefix = [template header][context]          -> the compressible segment (``n_context_tokens``)
    suffix = [question][end of turn, assistant header]

Each part is tokenised on its own (``add_special_tokens=False``: the template carries the special tokens;
without a template the prefix gets the special tokens the tokenizer adds by default, e.g. BOS). Every method,
``none`` included, sees the same split, so tokens are identical across methods.

Query-agnostic (``method.query_aware=False``): prefill the prefix with compression on, then feed the suffix,
whose last logits give the first token. Query-aware: prefill prefix + suffix in one forward with compression
on (the suffix is never evicted). Everything after a compression is fed with explicit ``position_ids`` (the
true positions): transformers derives positions from the cache length otherwise, which eviction shortened.

Timing (milliseconds, CUDA events on GPU, ``perf_counter`` on CPU):

- ``prefill_ms``: the compressed prefill forward, including the method's scoring and eviction;
- ``ttft_ms``: start of the prefill to the first token (query-agnostic: prefill + question forward);
- ``tpot_ms``: mean time per decode step over ``measure.fixed_output_tokens`` tokens, EOS ignored (decoding
  continues past the prediction's natural end until that many tokens exist); with at least 8 such steps the
  first three (eager steps, a decode-phase bulk eviction, the CUDA-graph capture) are left out and reported
  as ``decode_setup_ms`` — TPOT is the steady-state step;
- ``e2e_ms``: start to the prediction's natural end (EOS or ``sample.max_new_tokens``).

With ``measure.repeats > 1`` each key is the median over the repeats and ``<key>_spread`` is max - min.
Memory: see ``tokenbench.measure`` (peak above the level at the start of the generation; on CPU peak RSS
growth reported as ``peak_allocated``, ``peak_reserved`` is ``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod, KVSession, attention_modules
from tokenbench.kv_cache import EvictionCache
from tokenbench.measure import Timer, measured_repeats, summarize_repeats
from tokenbench.models.hf_utils import cache_kwarg

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """Tokenised prompts split into the compressible prefix and the suffix; ids are ``(batch, len)``, left
    padded; the masks mark real tokens (``None``: no padding)."""

    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    text: str = ""
    prefix_mask: Optional[torch.Tensor] = None
    suffix_mask: Optional[torch.Tensor] = None

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        pm = self.prefix_mask if self.prefix_mask is not None else torch.ones_like(self.prefix_ids, dtype=torch.bool)
        sm = self.suffix_mask if self.suffix_mask is not None else torch.ones_like(self.suffix_ids, dtype=torch.bool)
        return pm.to(torch.bool), sm.to(torch.bool)

    @property
    def n_context(self) -> int:
        """Context tokens of the first row."""
        return int(self.masks()[0][0].sum())

    @property
    def n_prompt(self) -> int:
        pm, sm = self.masks()
        return int(pm[0].sum() + sm[0].sum())

    @staticmethod
    def batch(prompts: list[Prompt]) -> Prompt:
        """Left-pad single-row prompts into one batch."""
        def pad(rows: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            n = max(int(r.shape[1]) for r in rows)
            ids = torch.zeros(len(rows), n, dtype=torch.long, device=rows[0].device)
            mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
            for i, (r, m) in enumerate(zip(rows, masks)):
                k = int(r.shape[1])
                if k:
                    ids[i, n - k:], mask[i, n - k:] = r[0], m[0]
            return ids, mask

        ms = [p.masks() for p in prompts]
        pre, pm = pad([p.prefix_ids for p in prompts], [m[0] for m in ms])
        suf, sm = pad([p.suffix_ids for p in prompts], [m[1] for m in ms])
        return Prompt(pre, suf, "", pm, sm)


@dataclass
class Generation:
    """One greedy generation (possibly batched) with its raw measurements."""

    tokens: torch.Tensor  # (batch, n) every generated token, including the fixed-length tail past the stop
    lengths: list[int]  # per row: tokens of the prediction (up to and including EOS, or max_new_tokens)
    latency: dict[str, Optional[float]]
    kv_cache_bytes: int  # cache buffers allocated at the start of decoding (after prefill and question)
    kv_cache_bytes_end: int  # cache buffers when generation ended
    cache_len_start: list[int]  # per layer, at the start of decoding
    cache_len_end: list[int]  # per layer, at the end
    compression: dict[str, Any]
    logits: Optional[list[torch.Tensor]] = None  # per generated token, (batch, vocab) float32


@dataclass
class GenerationOutput:
    """What the run pipeline records for one sample."""

    text: str
    n_prompt_tokens: int
    n_context_tokens: int
    n_generated: int
    latency: dict[str, Optional[float]] = field(default_factory=dict)
    memory: dict[str, Optional[int]] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)


def prediction_lengths(tokens: torch.Tensor, eos: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Per row of ``tokens`` ``(B, n)``: tokens of the prediction, up to and including the first of the ``eos``
    ids, at most ``max_new_tokens``."""
    t = tokens[:, :max_new_tokens]
    is_eos = torch.isin(t, eos)
    first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1) + 1,
                        torch.full_like(is_eos[:, 0], t.shape[1], dtype=torch.long))
    return [int(x) for x in first.tolist()]


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    ids: set[int] = set()

    def add(v: Any) -> None:
        if v is None:
            return
        if isinstance(v, (list, tuple, set)):
            for x in v:
                add(x)
        else:
            ids.add(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    add(getattr(getattr(model, "config", None), "eos_token_id", None))
    return sorted(ids)


def _context_end(text: str, context: str, question: str) -> int:
    """Character index in the formatted prompt where the context ends."""
    if not context:
        i = text.find(question) if question else -1
        return max(i, 0)
    for needle, keep in ((context + question, len(context)), (context, len(context))):
        i = text.find(needle)
        if i >= 0:
            return i + keep
    stripped = context.strip()
    i = text.find(stripped) if stripped else -1
    if i >= 0:
        return i + len(stripped)
    raise TokenbenchError("the chat template altered the context text; cannot find where it ends "
                          "(run the task without the chat template)")


_SETUP_STEPS = 3  # decode steps before the captured graph replays (see ``generate``)


class LMRunner:
    """Runs samples through a causal LM with a KV method attached, and measures them."""

    def __init__(self, loaded: Any, method: Optional[KVMethod] = None,
                 measure: Optional[MeasureSettings] = None):
        if method is None:
            method = KVMethod()  # keep-all: the full cache
        if not isinstance(method, KVMethod):
            raise TokenbenchError(f"LMRunner runs kv-family methods; got '{getattr(method, 'name', method)}' "
                                  f"of family '{getattr(method, 'family', '?')}'")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.method = method
        self.measure = measure if measure is not None else MeasureSettings()
        self.eos_ids = _eos_ids(self.tokenizer, self.model)
        self._eos = torch.tensor(self.eos_ids or [-1], device=self.device, dtype=torch.long)
        self._warmed = False
        self.n_layers = len(attention_modules(self.model))
        self._greedy: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits.argmax(dim=-1)
        if getattr(self.measure, "fuse_kernels", False):
            from tokenbench.fused_decode import fuse, greedy

            self.fused = fuse(self.model)
            self._greedy = greedy()
        # transformers >= 5.24 names the argument ``cache`` (``past_key_values`` is deprecated)
        self._cache_kw = cache_kwarg(self.model)

    # --- prompt ----------------------------------------------------------------------------------------

    def build_prompt(self, sample: Any, use_chat_template: bool = True) -> Prompt:
        tok = self.tokenizer
        context, question = sample.context or "", sample.question or ""
        if use_chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": context + question}],
                                           add_generation_prompt=True, tokenize=False)
            if isinstance(text, list):
                text = text[0]
            cut = _context_end(text, context, question)
            prefix, suffix = text[:cut], text[cut:]
            prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        else:
            text, prefix, suffix = context + question, context, question
            prefix_ids = tok(prefix, add_special_tokens=True)["input_ids"]
        suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"]
        as_tensor = lambda ids: torch.tensor([ids], dtype=torch.long, device=self.device)  # noqa: E731
        return Prompt(as_tensor(prefix_ids), as_tensor(suffix_ids), text)

    # --- generation ------------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: EvictionCache,
                 keep: int = 1) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=keep,
                         **{self._cache_kw: cache})
        return out.logits

    def _use_graph(self) -> bool:
        return bool(getattr(self.measure, "cuda_graph", False)) and self.device.type == "cuda"

    def _prefill(self, prefix: torch.Tensor, suffix: torch.Tensor, pm: torch.Tensor, sm: torch.Tensor,
                 steps: int) -> tuple[EvictionCache, KVSession, torch.Tensor, torch.Tensor]:
        """Compressed prefill (+ question) of some rows; returns their cache, session, last logits and the
        position of their first generated token."""
        n_prefix, n_suffix = prefix.shape[1], suffix.shape[1]
        len_pre, len_suf = pm.sum(dim=1), sm.sum(dim=1)
        pos_pre = (pm.cumsum(dim=1) - 1).clamp(min=0)
        pos_suf = len_pre.unsqueeze(1) + (sm.cumsum(dim=1) - 1).clamp(min=0)
        one_forward = self.method.query_aware or n_prefix == 0 or n_suffix == 0
        cache = EvictionCache(self.n_layers, reserve=(0 if one_forward else n_suffix) + steps)
        with self.method.attach(self.model, cache) as session:
            if one_forward:
                cache.set_inputs(torch.cat([pos_pre, pos_suf], dim=1), torch.cat([pm, sm], dim=1))
                with session.compressing(torch.cat([pm, torch.zeros_like(sm)], dim=1), reserve=steps):
                    logits = self._forward(torch.cat([prefix, suffix], dim=1), cache.query_positions, cache)
            else:
                cache.set_inputs(pos_pre, pm)
                with session.compressing(pm, reserve=n_suffix + steps):
                    self._forward(prefix, pos_pre, cache)
                cache.set_inputs(pos_suf, sm)
                logits = self._forward(suffix, pos_suf, cache)
        return cache, session, logits[:, -1], (len_pre + len_suf).view(-1, 1)

    def generate(self, prompt: Prompt, max_new_tokens: int, fixed_tokens: int = 0,
                 return_logits: bool = False, prefill_rows: Optional[int] = None) -> Generation:
        """Greedy generation of a (left-padded) batch of prompts, one budget rule per row.

        The prediction of a row stops at EOS or ``max_new_tokens``; decoding goes on (EOS ignored) until at
        least ``fixed_tokens`` tokens exist, for the fixed-length time per output token. ``prefill_rows``:
        prefill (and compress) that many rows at a time, then decode all rows as one batch — the full cache
        of only those rows ever exists at once. On CUDA (with ``measure.cuda_graph``) decode steps after the
        first two replay one captured graph.
        """
        prefix, suffix = prompt.prefix_ids.to(self.device), prompt.suffix_ids.to(self.device)
        pm, sm = (m.to(self.device) for m in prompt.masks())
        batch, n_prefix, n_suffix = prefix.shape[0], prefix.shape[1], suffix.shape[1]
        if suffix.shape[0] != batch:
            raise ValueError("prefix and suffix batch sizes differ")
        if n_prefix + n_suffix == 0:
            raise TokenbenchError("empty prompt")
        if n_suffix and not bool(sm[:, -1].all()) and bool(sm.any()):
            raise TokenbenchError("rows of a batch must all have a question (suffix) or none")
        max_new_tokens = max(1, int(max_new_tokens))
        fixed_tokens = max(0, int(fixed_tokens))
        steps = max(max_new_tokens, fixed_tokens)
        timer = Timer(self.device)
        logits_seen: Optional[list[torch.Tensor]] = [] if return_logits else None
        tokens = torch.zeros(batch, steps, dtype=torch.long, device=self.device)
        group = max(1, int(prefill_rows or batch))

        with torch.inference_mode():
            timer.synchronize()
            t0 = timer.stamp()
            parts = [self._prefill(prefix[i:i + group], suffix[i:i + group], pm[i:i + group], sm[i:i + group],
                                   steps) for i in range(0, batch, group)]
            t_prefill = timer.stamp()
            cache = parts[0][0] if len(parts) == 1 else EvictionCache.merge([x[0] for x in parts])
            logits = torch.cat([x[2] for x in parts])
            first_pos = torch.cat([x[3] for x in parts])
            tok = logits.argmax(dim=-1)
            tokens[:, 0] = tok
            stamps = [timer.stamp()]
            if logits_seen is not None:
                logits_seen.append(logits.float().clone())
            kv_start, kv_used_start, len_start = cache.nbytes(), cache.used_bytes(), cache.lengths()
            sessions = [x[1] for x in parts]
            del parts, logits  # the merged cache holds everything now

        with torch.inference_mode(), self.method.attach(self.model, cache) as session:
            session.adopt(sessions)
            # static decode inputs: the graph (if any) reads these tensors, updated in place
            tok_in = tok.view(batch, 1).clone()
            pos_in = first_pos.clone()
            cache.query_positions, cache.query_valid = pos_in, torch.ones_like(pos_in, dtype=torch.bool)
            cache.unpadded = True
            step_logits: Optional[torch.Tensor] = None
            graph = None
            stop_n: Optional[int] = None
            n = 1
            with session.decoding(steps):
                while n < steps and (stop_n is None or n < fixed_tokens):
                    # the token fed now is generated token n, at true position first_pos + n - 1
                    pos_in.copy_(first_pos + (n - 1))
                    if graph is not None:
                        graph.replay()
                    elif self._use_graph() and n == 3:  # steps 1-2 ran eagerly (bulk eviction, warm-up)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            step_logits = self._forward(tok_in, pos_in, cache)[:, -1]
                        graph.replay()
                    else:
                        step_logits = self._forward(tok_in, pos_in, cache)[:, -1]
                    nxt = self._greedy(step_logits)
                    tokens[:, n] = nxt
                    tok_in.copy_(nxt.view(batch, 1))
                    n += 1
                    stamps.append(timer.stamp())
                    if logits_seen is not None:
                        logits_seen.append(step_logits.float().clone())
                    if stop_n is None and n >= fixed_tokens and (n % 8 == 0 or n in (max_new_tokens, fixed_tokens)):
                        stop_n = self._stop(tokens[:, :n], max_new_tokens)  # a host sync, every 8 steps
            timer.synchronize()
            compression = session.stats()
            kv_end, len_end = cache.nbytes(), cache.lengths()
            del graph

        lengths = self._lengths(tokens[:, :n], max_new_tokens)
        stop_n = max(lengths)
        ttft = timer.elapsed_ms(t0, stamps[0])
        tpot_n = min(n, fixed_tokens) if fixed_tokens >= 2 else stop_n
        # steady state: with enough steps, skip the first three (eager steps, bulk eviction, graph capture)
        k0 = _SETUP_STEPS if tpot_n >= 2 * _SETUP_STEPS + 2 else 0
        tpot = timer.elapsed_ms(stamps[k0], stamps[tpot_n - 1]) / (tpot_n - 1 - k0) if tpot_n >= 2 else None
        latency = {
            "prefill_ms": timer.elapsed_ms(t0, t_prefill),
            "ttft_ms": ttft,
            "tpot_ms": tpot,
            "e2e_ms": timer.elapsed_ms(t0, stamps[stop_n - 1]),
            "decode_setup_ms": timer.elapsed_ms(stamps[0], stamps[k0]) if k0 else None,
        }
        compression["decode_graph"] = bool(self._use_graph() and n > 3)
        compression["kv_cache_bytes_used"] = kv_used_start
        return Generation(
            tokens=tokens[:, :n],
            lengths=lengths,
            latency=latency,
            kv_cache_bytes=kv_start,
            kv_cache_bytes_end=kv_end,
            cache_len_start=len_start,
            cache_len_end=len_end,
            compression=compression,
            logits=logits_seen,
        )

    def _lengths(self, tokens: torch.Tensor, max_new_tokens: int) -> list[int]:
        return prediction_lengths(tokens, self._eos, max_new_tokens)

    def _stop(self, tokens: torch.Tensor, max_new_tokens: int) -> Optional[int]:
        """The step at which every row's prediction has ended, or None."""
        if tokens.shape[1] >= max_new_tokens:
            return max(self._lengths(tokens, max_new_tokens))
        done = torch.isin(tokens, self._eos).any(dim=1)
        return max(self._lengths(tokens, max_new_tokens)) if bool(done.all()) else None

    def loglikelihood(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        """Sum of log-probabilities of ``continuation_ids`` after ``context_ids`` (compressed by the method as
        a query-agnostic prefill), and whether the continuation is the greedy one."""
        if not context_ids or not continuation_ids:
            raise TokenbenchError("loglikelihood needs a non-empty context and continuation")
        ctx = torch.tensor([context_ids], dtype=torch.long, device=self.device)
        cont = torch.tensor([continuation_ids], dtype=torch.long, device=self.device)
        n, m = ctx.shape[1], cont.shape[1]
        cache = EvictionCache(self.n_layers, reserve=m)
        with torch.inference_mode(), self.method.attach(self.model, cache) as session:
            pos = torch.arange(n, device=self.device).view(1, n)
            cache.set_inputs(pos, torch.ones_like(pos, dtype=torch.bool))
            with session.compressing(torch.ones_like(pos, dtype=torch.bool), reserve=m):
                logits = [self._forward(ctx, pos, cache)[:, -1:]]
            if m > 1:
                pos2 = torch.arange(n, n + m - 1, device=self.device).view(1, -1)
                cache.set_inputs(pos2, torch.ones_like(pos2, dtype=torch.bool))
                logits.append(self._forward(cont[:, :-1], pos2, cache, keep=0))
        logp = torch.cat(logits, dim=1)[0].float().log_softmax(dim=-1)
        picked = logp.gather(1, cont[0].unsqueeze(1)).squeeze(1)
        return float(picked.sum()), bool((logp.argmax(dim=-1) == cont[0]).all())

    # --- one sample, measured --------------------------------------------------------------------------

    def run(self, sample: Any, use_chat_template: bool = True) -> GenerationOutput:
        return self.run_many([sample], [use_chat_template])[0]

    def run_batches(self, task: Any, chunks: list[list[Any]]) -> Iterator[list[GenerationOutput]]:
        """The pipeline's batched interface (``measure.batch_size``): one left-padded generation per chunk.
        A sample's ``meta["chat_template"]`` overrides the task's ``chat_template``."""
        default = getattr(task, "chat_template", True)
        for chunk in chunks:
            flags = [default if s.meta.get("chat_template") is None else bool(s.meta["chat_template"])
                     for s in chunk]
            yield self.run_many(chunk, flags)

    def run_many(self, samples: list[Any], chat: list[bool]) -> list[GenerationOutput]:
        """Generate for several samples as one left-padded batch and measure it; one output per sample
        (latency and memory are the batch's, ``compression["batch_size"]`` says how many rows shared them)."""
        prompts = [self.build_prompt(s, c) for s, c in zip(samples, chat)]
        prompt = prompts[0] if len(prompts) == 1 else Prompt.batch(prompts)
        limits = [max(1, int(getattr(s, "max_new_tokens", 32) or 1)) for s in samples]
        max_new = max(limits)
        fixed = max(0, int(self.measure.fixed_output_tokens))
        gens, peaks = measured_repeats(lambda: self.generate(prompt, max_new, fixed), self.device,
                                       self.measure.repeats, 0 if self._warmed else self.measure.warmup)
        self._warmed = True
        g = gens[0]
        latency = summarize_repeats([x.latency for x in gens])
        memory = {
            **peaks,
            "kv_cache_bytes": g.kv_cache_bytes,
            "kv_cache_bytes_used": g.compression.get("kv_cache_bytes_used"),
            "kv_cache_bytes_end": g.kv_cache_bytes_end,
        }
        outs = []
        for row, (p, limit) in enumerate(zip(prompts, limits)):
            n_gen = min(g.lengths[row], limit)
            ids = g.tokens[row, :n_gen].tolist()
            outs.append(GenerationOutput(
                # the decoded text as generated (LongBench's pred.py and lm-eval keep it raw; code similarity
                # reads the first line's indentation); tasks normalise what their metric needs
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                n_prompt_tokens=p.n_prompt,
                n_context_tokens=p.n_context,
                n_generated=n_gen,
                latency=dict(latency),
                memory=dict(memory),
                compression=_row_stats(g.compression, row, len(prompts)),
                token_ids=ids,
            ))
        return outs


def _row_stats(stats: dict[str, Any], row: int, batch: int) -> dict[str, Any]:
    """One row's view of a batch's compression record."""
    if batch == 1:
        return dict(stats)
    out = dict(stats)
    for key in ("context_tokens", "kept_tokens", "decode_capacity"):
        if isinstance(stats.get(key), list):
            out[key] = stats[key][row]
    per_layer = stats.get("kept_tokens_per_layer_row") or []
    out["kept_tokens_per_layer"] = [layer[row] for layer in per_layer]
    out.pop("kept_tokens_per_layer_row", None)
    seg = out.get("context_tokens")
    if per_layer and seg:
        out["achieved_keep_ratio"] = sum(k / seg for k in out["kept_tokens_per_layer"]) / len(per_layer)
    out["batch_size"], out["batch_row"] = batch, row
    return out
