"""LLMLingua: coarse-to-fine prompt compression with a small LM — a budget controller that keeps whole
demonstrations (segments) by perplexity, then iterative token-level compression conditioned on what was kept.

Jiang, Wu, Lin, Yang, Qiu. "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language
Models", EMNLP 2023 (arXiv:2310.05736). Reference code: https://github.com/microsoft/LLMLingua
(``llmlingua/prompt_compressor.py``, ``PromptCompressor.compress_prompt`` with ``rank_method="llmlingua"``,
``control_context_budget``, ``get_rank_results``, ``get_dynamic_compression_ratio``,
``iterative_compress_prompt``, ``get_estimate_threshold_base_distribution``, ``get_compressed_input``).
Written independently (the ``llmlingua`` package is not wrapped: it needs hub models and tokenizers by
default and pins its own dependencies; this file runs on any local causal LM, SmolLM2-135M by default).

The algorithm, as the reference runs it:

1. **segments** ("demonstrations"): the context split at ``segment_separator`` (default a blank line; the
   reference takes a list of demonstrations from the caller);
2. **budget controller** (coarse, ``use_context_level_filter``, when there is more than one segment): each
   segment's perplexity under the compressor (mean token loss of the segment alone after a start token);
   segments are taken from the highest perplexity down, each subtracting its tokens from
   ``budget + context_budget`` (the reference's ``context_budget="+100"``), until that runs below zero (the
   segment that crosses it is kept); the kept segments stay in their original order;
   ``dynamic_context_compression_ratio`` ``d`` > 0 gives the ``N`` kept segments, in rank order, ratio
   offsets spread linearly from ``+d`` down to ``-d`` (the reference's formula), so higher-ranked segments
   keep more of their tokens;
3. **token level** (fine, ``use_token_level_filter``): the kept text, in compressor tokens, is compressed in
   windows of ``iterative_size`` tokens. Each window's token losses are computed **conditioned on the
   already compressed prefix** (the compressor's KV cache holds only kept tokens); the threshold is the value
   at rank ``int(n * tau) - 1`` of the losses of the kept prefix and the window together, sorted high to low
   (``get_estimate_threshold_base_distribution``), and the window's tokens with a loss above it are kept;
   ``tau = budget / (tokens + 1)`` (``get_dynamic_compression_ratio``), clamped to [0, 1] with the segment's
   dynamic offset.

Then the family's ``fit`` brings the result to the budget in target tokens (the reference's result lands
near, not on, its target): kept tokens with the lowest loss are dropped while over budget, and dropped tokens
with the highest loss are added back while there is room. Budget unit: one compressor token.

Deviations: a token is kept by its own loss (the reference's mask is built from ``loss[i] > threshold`` where
``loss[i]`` is the loss of token ``i + 1``, one position off); the coarse stage counts tokens with the target
tokenizer (the reference uses the compressor's; for SmolLM2 as both they are the same); segments are scored
and kept with the separator in front of them instead of being re-joined with ``"\\n\\n"``; no sentence-level
filter, ``keep_split``, ``force_context_ids`` or question-conditioned ranking (LongLLMLingua's
``condition_in_question``, ``condition_compare``, ``reorder_context``), and no KV-cache eviction for
prompts longer than the compressor's context window (the compressor must fit the whole context).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import (
    Fit,
    LMCompressor,
    assign,
    char_starts,
    paragraphs,
    token_nll,
    token_pieces,
)
from tokenbench.models.hf_utils import cache_kwarg
from tokenbench.registry import register_method


def threshold_at(losses: list[float], ratio: float) -> float:
    """The reference's threshold: the value at rank ``int(n * ratio) - 1`` (clamped to [0, n - 1]) of the
    losses sorted from high to low; tokens with a loss above it are kept."""
    ordered = sorted(losses, reverse=True)
    k = max(0, min(len(ordered) - 1, int(len(ordered) * ratio) - 1))
    return ordered[k]


def dynamic_offsets(n: int, d: float) -> list[float]:
    """Ratio offsets of ``n`` ranked segments: linear from ``+d`` (best) to ``-d`` (worst)."""
    if d <= 0 or n == 0:
        return [0.0] * n
    if n == 1:
        return [0.0]
    return [i * (abs(d) / (n - 1)) for i in range(-(n - 1), n, 2)][::-1]


def budget_controller(ppl: list[float], counts: list[int], target: float) -> list[int]:
    """Indices of the segments the coarse stage keeps (in rank order): from the highest perplexity down,
    until ``target`` (budget + context_budget) runs below zero; the crossing segment is kept."""
    used: list[int] = []
    for i in sorted(range(len(ppl)), key=lambda j: (-ppl[j], j)):
        target -= counts[i]
        used.append(i)
        if target < 0:
            break
    return used


@register_method("llmlingua", family="prompt")
@dataclass
class LLMLingua(LMCompressor):
    """Budget controller over segments, then iterative token-level compression, with the compressor LM."""

    segment_separator: str = "\n\n"  # what separates the demonstrations / paragraphs of a context
    context_budget: int = 100  # tokens over the budget the coarse stage may keep (the reference's "+100")
    iterative_size: int = 200  # compressor tokens per window of the token-level stage
    dynamic_context_compression_ratio: float = 0.0  # d: ratio offsets +d..-d over the ranked kept segments
    use_context_level_filter: bool = True  # the coarse stage (budget controller)
    use_token_level_filter: bool = True  # the fine stage (iterative token-level compression)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.context_budget, int) or isinstance(self.context_budget, bool):
            raise TokenbenchError(f"method '{self.label}': context_budget must be an integer (tokens), "
                                  f"got {self.context_budget!r}")
        self.check_int("iterative_size", 1)
        d = self.dynamic_context_compression_ratio
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise TokenbenchError(f"method '{self.label}': dynamic_context_compression_ratio must be in [0, 1], "
                                  f"got {d!r}")

    # --- coarse -----------------------------------------------------------------------------------------

    def perplexity(self, text: str) -> float:
        ids, _ = self.encode(text)
        losses = self.token_losses(ids) if ids else []
        return sum(losses) / len(losses) if losses else 0.0

    def coarse(self, body: str, budget: int) -> tuple[list[str], list[float], list[float]]:
        """The kept segments (original order), their dynamic ratio offsets and all segments' perplexities."""
        segs = paragraphs(body, self.segment_separator)
        if len(segs) <= 1 or not self.use_context_level_filter:
            return segs, [0.0] * len(segs), []
        ppl = [self.perplexity(s) for s in segs]
        used = budget_controller(ppl, self.count_pieces(segs), budget + self.context_budget)
        offsets = dict(zip(used, dynamic_offsets(len(used), float(self.dynamic_context_compression_ratio))))
        kept = sorted(used)
        return [segs[i] for i in kept], [offsets[i] for i in kept], ppl

    # --- fine ---------------------------------------------------------------------------------------------

    def _forward(self, ids: list[int], cache: Any) -> Any:
        import torch

        model = self.lm.model
        kw = cache_kwarg(model)
        x = torch.tensor([ids], dtype=torch.long, device=self.lm.device)
        return model(input_ids=x, use_cache=True, **{kw: cache}).logits[0].float()

    def iterative(self, ids: list[int], ratios: list[float]) -> tuple[list[bool], list[float]]:
        """Keep mask and loss of every token: windows of ``iterative_size``, each scored after the kept
        prefix (a KV cache of kept tokens only), thresholded with the kept prefix's and the window's losses."""
        import torch
        from transformers import DynamicCache

        keep: list[bool] = [False] * len(ids)
        loss_all: list[float] = [0.0] * len(ids)
        history: list[float] = []  # losses of the tokens kept so far (the reference's ``past_loss``)
        step = self.iterative_size
        with torch.inference_mode():
            cache = DynamicCache()
            last = self._forward([self.start_id()], cache)[-1]  # logits predicting the next kept token
            kept_len = 1
            for w0 in range(0, len(ids), step):
                window = ids[w0:w0 + step]
                logits = torch.cat([last.unsqueeze(0), self._forward(window, cache)[:-1]])
                loss = token_nll(logits, torch.tensor(window, device=logits.device)).tolist()
                pool = history + loss
                mask = [False] * len(window)
                # pieces of the window with one ratio each (a window can span segments)
                j = 0
                while j < len(window):
                    r = ratios[w0 + j]
                    k = j
                    while k < len(window) and ratios[w0 + k] == r:
                        k += 1
                    thr = threshold_at(pool, r)
                    for t in range(j, k):
                        mask[t] = loss[t] > thr
                    j = k
                drop = cache.get_seq_length() - kept_len
                if drop > 0:
                    cache.crop(-drop)  # remove the window again (negative: a count, in every transformers)
                kept_ids = [t for t, m in zip(window, mask) if m]
                if kept_ids:
                    last = self._forward(kept_ids, cache)[-1]
                    kept_len += len(kept_ids)
                history += [v for v, m in zip(loss, mask) if m]
                keep[w0:w0 + len(window)] = mask
                loss_all[w0:w0 + len(window)] = loss
        return keep, loss_all

    def select(self, body: str, question: str, budget: int) -> Fit:
        segs, offsets, _ = self.coarse(body, budget)
        text = "".join(segs)
        info = {"segments": len(paragraphs(body, self.segment_separator)), "segments_kept": len(segs)}
        if not self.use_token_level_filter:
            return replace(self.fit(segs, [0.0] * len(segs), budget, keep=[True] * len(segs)), info=info)
        ids, starts = self.encode(text)
        if not ids:
            return Fit("", None, 0, 0, info)
        tau = budget / (len(ids) + 1)
        seg_of = assign(starts, char_starts(segs))
        ratios = [max(0.0, min(1.0, tau + offsets[s])) for s in seg_of]
        keep, loss = self.iterative(ids, ratios)
        pieces, owner = token_pieces(text, starts)
        p_keep, p_score = [False] * len(pieces), [float("-inf")] * len(pieces)
        for o, k, v in zip(owner, keep, loss):
            p_keep[o] = p_keep[o] or k
            p_score[o] = max(p_score[o], v)
        out = self.fit(pieces, p_score, budget, keep=p_keep)
        info["token_level_kept"] = sum(keep)
        info["token_level_total"] = len(keep)
        return replace(out, info=info)
