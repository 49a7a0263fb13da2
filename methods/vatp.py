"""VATP, value-aware token pruning: accumulated attention times the value vector's L1 norm.

Guo, Kamigaito, Watanabe. "Attention Score is not All You Need for Token Importance Indicator in KV Cache
Reduction: Value Also Matters", EMNLP 2024 (arXiv:2406.12335). Reference code:
https://github.com/guozhiyu/vatp (``utils_hh/modify_llama.py``, built on H2O's ``h2o_hf``). Written
independently.

The paper's point: attention-sink tokens draw much attention but carry values of tiny norm, so attention alone
misjudges what a token contributes to the output ``sum_k a_k v_k``; VATP scores a token by
``attention x ||v||_1`` on top of an accumulated-attention method (H2O or Scissorhands), and keeps the sinks
explicitly since the product would now evict them.

The form here is the reference's H2O variant at the prefill (``--h2o --apval``), as a one-shot eviction:

- attention accumulated over the prefill: the weights each token received, summed over every real query of
  the compressed forward (H2O's heavy-hitter score; query heads of a KV group averaged), times the L1 norm of
  the token's value in that KV head;
- the first ``n_sink`` tokens are always kept (the reference's ``sink_len``; its LongBench runs use 20);
- H2O's recent window: the latest ``recent_ratio`` of the budget (rounded) is always kept — the reference
  sets ``recent_ratio = heavy_ratio``, half of the budget; sinks and heavy hitters share the rest.

The reference keeps accumulating during decoding; this method evicts once, after the prefill (decode-time
eviction belongs to a decode-phase method such as H2O). With the question inside the prefill (query-aware)
its queries vote too, and the recent window is the context's end (the question is never evicted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod, ScoreContext
from tokenbench.registry import register_method


@register_method("vatp", family="kv")
@dataclass
class VATP(KVMethod):
    """Accumulated attention x value L1 norm; sinks and a recent window kept."""

    n_sink: int = 20  # first tokens always kept (the reference's sink_len)
    recent_ratio: float = 0.5  # share of the budget kept as the latest tokens (H2O's recent window)

    def validate(self) -> None:
        super().validate()
        self.check_int("n_sink", 0)
        r = self.recent_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise TokenbenchError(f"method '{self.label}': recent_ratio must be in [0, 1], got {r!r}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        attention = ctx.kv_heads(ctx.accumulated_attention(), "mean")  # (B, H, C)
        scores = attention * ctx.values.float().abs().sum(dim=-1)
        pos = ctx.positions
        if ctx.budget is not None and self.recent_ratio > 0:
            n_recent = (ctx.budget.float() * self.recent_ratio).round().long()  # (B, 1)
            scores = ctx.keep_first(scores, ctx.recent(n_recent), order=pos)
        return ctx.keep_first(scores, ctx.valid & (pos < self.n_sink), order=-pos)
