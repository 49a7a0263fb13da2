"""The LLM generation runner of the ``kv`` family: chat template, compressed prefill, greedy decoding with
explicit positions, and the measurements of DESIGN.md ("Measurement protocol").

One sample, one generation (batch 1) in ``run``; ``generate`` also takes a batch of equal-length prompts.

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
  continues past the prediction's natural end until that many tokens exist);
- ``e2e_ms``: start to the prediction's natural end (EOS or ``sample.max_new_tokens``).

With ``measure.repeats > 1`` each key is the median over the repeats and ``<key>_spread`` is max - min.
Memory: see ``tokenbench.measure`` (peak above the level at the start of the generation; on CPU peak RSS
growth reported as ``peak_allocated``, ``peak_reserved`` is ``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod
from tokenbench.measure import Timer, cache_bytes, cache_lengths, peak_memory, summarize_repeats

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A tokenised prompt split into the compressible prefix and the suffix; ids are ``(batch, len)``."""

    prefix_ids: torch.Tensor
    suffix_ids: torch.Tensor
    text: str = ""

    @property
    def n_context(self) -> int:
        return int(self.prefix_ids.shape[1])

    @property
    def n_prompt(self) -> int:
        return int(self.prefix_ids.shape[1] + self.suffix_ids.shape[1])


@dataclass
class Generation:
    """One greedy generation (possibly batched) with its raw measurements."""

    tokens: torch.Tensor  # (batch, n) every generated token, including the fixed-length tail past the stop
    lengths: list[int]  # per row: tokens of the prediction (up to and including EOS, or max_new_tokens)
    latency: dict[str, Optional[float]]
    kv_cache_bytes: int  # cache tensors at the start of decoding (after prefill and question)
    kv_cache_bytes_end: int  # cache tensors when generation ended
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
        if method.needs_attentions and not method.is_noop():
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            if impl != "eager":
                raise TokenbenchError(f"method '{method.label}' needs attention weights; load the model with "
                                      f"attn_implementation=eager (it runs '{impl}')")

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

    def _positions(self, start: int, end: int, batch: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device).unsqueeze(0).expand(batch, -1)

    def _forward(self, ids: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
        positions = self._positions(start, start + ids.shape[1], ids.shape[0])
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def generate(self, prompt: Prompt, max_new_tokens: int, fixed_tokens: int = 0,
                 return_logits: bool = False) -> Generation:
        """Greedy generation of one prompt (or a batch of equal-length prompts, same budget per row).

        The prediction of a row stops at EOS or ``max_new_tokens``; decoding goes on (EOS ignored) until at
        least ``fixed_tokens`` tokens exist, for the fixed-length time per output token.
        """
        from transformers import DynamicCache

        prefix, suffix = prompt.prefix_ids.to(self.device), prompt.suffix_ids.to(self.device)
        batch, n_prefix, n_suffix = prefix.shape[0], prefix.shape[1], suffix.shape[1]
        if suffix.shape[0] != batch:
            raise ValueError("prefix and suffix batch sizes differ")
        if n_prefix + n_suffix == 0:
            raise TokenbenchError("empty prompt")
        max_new_tokens = max(1, int(max_new_tokens))
        fixed_tokens = max(0, int(fixed_tokens))
        timer = Timer(self.device)
        cache = DynamicCache(config=self.model.config)
        logits_seen: Optional[list[torch.Tensor]] = [] if return_logits else None

        with torch.inference_mode(), self.method.attach(self.model) as session:
            timer.synchronize()
            t0 = timer.stamp()
            if self.method.query_aware or n_prefix == 0 or n_suffix == 0:
                with session.compressing(n_prefix):
                    logits = self._forward(torch.cat([prefix, suffix], dim=1), 0, cache)
                t_prefill = timer.stamp()
            else:
                with session.compressing(n_prefix):
                    self._forward(prefix, 0, cache)
                t_prefill = timer.stamp()
                logits = self._forward(suffix, n_prefix, cache)
            tok = logits.argmax(dim=-1)
            stamps = [timer.stamp()]
            if logits_seen is not None:
                logits_seen.append(logits.float().clone())
            kv_start, len_start = cache_bytes(cache), cache_lengths(cache)

            n_prompt = n_prefix + n_suffix
            generated = [tok]
            n = 1
            lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
            done = torch.isin(tok, self._eos) | (n >= max_new_tokens)
            lengths[done] = n
            stop_n = n if bool(done.all()) else None
            with session.decoding():
                while stop_n is None or n < fixed_tokens:
                    # the token fed now is generated token n, at true position n_prompt + n - 1
                    logits = self._forward(tok.unsqueeze(1), n_prompt + n - 1, cache)
                    tok = logits.argmax(dim=-1)
                    n += 1
                    stamps.append(timer.stamp())
                    generated.append(tok)
                    if logits_seen is not None:
                        logits_seen.append(logits.float().clone())
                    if stop_n is None:
                        newly = ~done & (torch.isin(tok, self._eos) | (n >= max_new_tokens))
                        lengths[newly] = n
                        done |= newly
                        if bool(done.all()):
                            stop_n = n
            timer.synchronize()
            compression = session.stats()
            kv_end, len_end = cache_bytes(cache), cache_lengths(cache)

        assert stop_n is not None
        ttft = timer.elapsed_ms(t0, stamps[0])
        tpot_n = fixed_tokens if fixed_tokens >= 2 else stop_n
        tpot = timer.elapsed_ms(stamps[0], stamps[tpot_n - 1]) / (tpot_n - 1) if tpot_n >= 2 else None
        latency = {
            "prefill_ms": timer.elapsed_ms(t0, t_prefill),
            "ttft_ms": ttft,
            "tpot_ms": tpot,
            "e2e_ms": timer.elapsed_ms(t0, stamps[stop_n - 1]),
        }
        return Generation(
            tokens=torch.stack(generated, dim=1),
            lengths=[int(x) for x in lengths.tolist()],
            latency=latency,
            kv_cache_bytes=kv_start,
            kv_cache_bytes_end=kv_end,
            cache_len_start=len_start,
            cache_len_end=len_end,
            compression=compression,
            logits=logits_seen,
        )

    # --- one sample, measured --------------------------------------------------------------------------

    def run(self, sample: Any, use_chat_template: bool = True) -> GenerationOutput:
        prompt = self.build_prompt(sample, use_chat_template)
        max_new = max(1, int(getattr(sample, "max_new_tokens", 32) or 1))
        fixed = max(0, int(self.measure.fixed_output_tokens))
        if not self._warmed:
            for _ in range(max(0, int(self.measure.warmup))):
                self.generate(prompt, max_new, fixed)
            self._warmed = True
        gens: list[Generation] = []
        peaks: list[dict[str, Optional[int]]] = []
        for _ in range(max(1, int(self.measure.repeats))):
            with peak_memory(self.device) as mem:
                gens.append(self.generate(prompt, max_new, fixed))
            peaks.append(mem.as_dict())
        g = gens[0]

        def worst(key: str) -> Optional[int]:
            vals = [p[key] for p in peaks if p[key] is not None]
            return max(vals) if vals else None

        n_gen = g.lengths[0]
        ids = g.tokens[0, :n_gen].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return GenerationOutput(
            text=text,
            n_prompt_tokens=prompt.n_prompt,
            n_context_tokens=prompt.n_context,
            n_generated=n_gen,
            latency=summarize_repeats([x.latency for x in gens]),
            memory={
                "peak_allocated": worst("peak_allocated"),
                "peak_reserved": worst("peak_reserved"),
                "kv_cache_bytes": g.kv_cache_bytes,
                "kv_cache_bytes_end": g.kv_cache_bytes_end,
            },
            compression=g.compression,
            token_ids=ids,
        )
