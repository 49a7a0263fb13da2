"""SnapKV: keep what the observation window — the last queries of the prompt — attends to.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen. "SnapKV: LLM Knows What You are Looking for
Before Generation", NeurIPS 2024 (arXiv:2404.14469). Reference code: https://github.com/FasterDecoding/SnapKV
(``snapkv/monkeypatch/snapkv_utils.py``, ``SnapKVCluster``; its LongBench configs use window 32, kernel 7,
max pooling) and kvpress ``SnapKVPress`` (https://github.com/NVIDIA/kvpress,
``kvpress/presses/snapkv_press.py``).
Written independently.

Rule, per row, layer and KV head, after the compressed prefill:

1. the observation window is the row's last ``window_size`` real (non-padding) queries of the forward — the
   end of the context (query-agnostic) or the question and what precedes it (query-aware);
2. every token before the window scores the attention the window's queries give it, summed over the window
   (softmax over the whole causal row, as the model computes it) and averaged over the query heads of the
   KV group;
3. these scores are pooled along the sequence (``max``/``avg``, ``kernel_size``, stride 1, zero padding), so
   a selected token brings its neighbours — the window's own scores are left out of the pooling (pooling
   runs over the slots, which at the compressed prefill hold the prompt in position order; padding slots
   count as zeros, like the zero padding at the ends);
4. ties — max pooling gives a peak's neighbours the peak's exact score — go to the token with more votes of
   its own (``+ 0.001 x`` its own votes; the references leave them to ``topk``, which a padded batch and a
   single row can then resolve differently);
5. the window's tokens are always kept (above every other score; if a budget is smaller than the window,
   its latest tokens).

Choices where the references differ: the window is excluded from the pooled scores and ranked first, as in
the original (kvpress does the same); the window is summed as in the original (kvpress averages: the same
ranking); group scores are averaged before pooling (KVCache-Factory; kvpress pools per query head, which
differs for max pooling only). Unlike the original, the window's context tokens count against the budget,
which is the segment's (the question, when query-aware, is never evicted and never counted), and rows of a
padded batch each use their own last real queries. Scores are comparable across heads (attention mass), so
Ada-KV allocation (``head_allocation="adaptive"``, Ada-SnapKV) is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod, ScoreContext
from tokenbench.registry import register_method

POOLINGS = ("maxpool", "avgpool")
TIE_BREAK = 1e-3  # weight of a token's own votes added to its pooled score (in effect it orders ties only)


def _int_at_least(v: object, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@register_method("snapkv", family="kv")
@dataclass
class SnapKV(KVMethod):
    """Observation-window attention, pooled; the window is always kept."""

    supports_adaptive_heads: ClassVar[bool] = True

    window_size: int = 32  # last real queries of the prompt that vote (the observation window)
    kernel_size: int = 7  # pooling width along the sequence (odd; 1 = no pooling)
    pooling: str = "maxpool"  # maxpool | avgpool

    def validate(self) -> None:
        super().validate()
        self.check_int("window_size", 1)
        if not _int_at_least(self.kernel_size, 1) or self.kernel_size % 2 == 0:
            raise TokenbenchError(f"method '{self.label}': kernel_size must be an odd integer >= 1, "
                                  f"got {self.kernel_size!r}")
        if self.pooling not in POOLINGS:
            raise TokenbenchError(f"method '{self.label}': pooling must be one of {', '.join(POOLINGS)}, "
                                  f"got {self.pooling!r}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, _, q, _ = ctx.queries.shape
        qv = ctx.query_valid
        # each row's last `window_size` real queries (rows of a batch are padded differently)
        later = qv.flip(-1).cumsum(dim=-1).flip(-1)  # real queries at or after each index
        window = qv & (later <= self.window_size)  # (B, q)
        span = q - int(window.any(dim=0).nonzero()[0])  # prefill only: a host sync is fine here
        votes = ctx.attention(last=span) * window[:, q - span:].view(b, 1, span, 1)
        votes = ctx.kv_heads(votes.sum(dim=2), "mean")  # (B, H, C)
        first = ctx.query_positions.masked_fill(~window, torch.iinfo(torch.long).max).amin(dim=-1)
        in_window = ctx.valid & (ctx.positions >= first.view(b, 1, 1))
        votes = votes.masked_fill(in_window | ~ctx.valid, 0.0)
        pad = self.kernel_size // 2
        if self.pooling == "maxpool":  # votes are >= 0, so zeros pad like -inf would
            pooled = F.max_pool1d(votes, self.kernel_size, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(votes, self.kernel_size, stride=1, padding=pad)
        pooled = pooled + TIE_BREAK * votes  # max pooling copies a peak onto its neighbours: the peak first
        return ctx.keep_first(pooled, in_window, order=ctx.positions)
