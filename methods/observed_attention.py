"""Observed attention: the average attention a token received from the queries of the prefill.

Reference: kvpress ``ObservedAttentionPress`` (https://github.com/NVIDIA/kvpress,
``kvpress/presses/observed_attention_press.py``), related to H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048), which sums instead.
Written independently.

Rule: for each cached token, the attention weights it received, summed over every real query of the
compressed prefill, divided by the number of real queries that could attend to it (those at or after its
position) — kvpress's ``n_tokens - i`` for an unpadded prompt, which stops the sum from favouring early tokens
only because more queries see them. Query heads of a KV group are averaged (as kvpress).

kvpress needs eager attention to get the full weight matrix; here the column sums come from
``ctx.accumulated_attention()``, computed in query chunks next to the model's own (SDPA) attention. With the
question inside the prefill (query-aware) its queries count too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenbench.families.kv import KVMethod, ScoreContext
from tokenbench.registry import register_method


def seen_by(ctx: ScoreContext) -> torch.Tensor:
    """How many real queries of this forward are at or after each slot's position: ``(B, H, C)``."""
    b, h, c = ctx.positions.shape
    qpos = ctx.query_positions.masked_fill(~ctx.query_valid, -1).sort(dim=-1).values.contiguous()
    before = torch.searchsorted(qpos, ctx.positions.reshape(b, h * c).contiguous(), side="left")
    return (qpos.shape[1] - before).view(b, h, c)


@register_method("observed_attention", family="kv")
@dataclass
class ObservedAttention(KVMethod):
    """Average attention received over the prefill's queries."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # the count is the same for every query head of a KV group: fold, then divide
        return ctx.kv_heads(ctx.accumulated_attention(), "mean") / seen_by(ctx).clamp(min=1)
