"""ToMe: merge the ``r`` most similar token pairs in every block, by bipartite soft matching.

Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. "Token Merging: Your ViT but Faster", ICLR 2023
(arXiv:2210.09461). Reference code: https://github.com/facebookresearch/ToMe (``tome/merge.py``:
``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``; ``tome/patch/timm.py``; ``tome/utils.py``:
``parse_r``). Written independently.

At every block, between attention and MLP:

1. metric: the block's keys averaged over heads, L2-normalised;
2. alternate tokens into sets A (even positions) and B (odd positions); cosine similarity A x B;
3. protected tokens (class token, distillation token, registers) can be neither merged away (their A rows
   are -inf) nor merged into (their B columns are -inf);
4. every A token picks its most similar B token; the ``r`` A tokens with the most similar partners are merged
   into them (size-weighted average, ``merge_wavg``), at most half of the unprotected tokens per block;
5. output order as in the reference: protected tokens, unmerged A tokens (in position order when there is a
   protected token, else in descending similarity), then the B tokens;
6. proportional attention: later blocks add ``log(size)`` to the attention logits (``prop_attn``).

``r`` may follow ToMe's ``(r, inflection)`` schedule (``inflection``); ``trace_source`` keeps the source map
for visualisations (``VitSession.patch_groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tokenbench.families.vit import LayerContext, Reduction, VisionTokenReducer, bipartite_match
from tokenbench.registry import register_method


@register_method("tome", family="vit")
@dataclass
class ToMe(VisionTokenReducer):
    """Bipartite soft matching on the mean keys; size-weighted merging; proportional attention."""

    prop_attn: bool = True  # add log(token size) to attention logits (ToMe eq. 4); off for MAE-style models

    def proportional_attention(self) -> bool:
        return self.prop_attn

    def max_removable(self, n_tokens: int, n_prefix: int) -> int:
        return max(0, (n_tokens - n_prefix) // 2)  # bipartite matching merges at most half

    def nominal_budget(self) -> dict[str, Any]:
        return {**super().nominal_budget(), "prop_attn": self.prop_attn}

    def select(self, x: torch.Tensor, ctx: LayerContext) -> Reduction:
        n, p, r = ctx.n_tokens, ctx.n_prefix, ctx.n_tokens - ctx.n_out
        metric = ctx.metric()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # A = even positions, B = odd positions
        n_a, n_b = (n + 1) // 2, n // 2
        p_a, p_b = (p + 1) // 2, p // 2  # protected tokens in A (positions 0, 2, ...) and in B (1, 3, ...)
        if p_a:
            scores[:, :p_a, :] = -math.inf
        if p_b:
            scores[:, :, :p_b] = -math.inf
        unm, src, dst = bipartite_match(scores, r)
        if p:
            unm = unm.sort(dim=-1).values  # protected A tokens (never merged) come first
        b = x.shape[0]
        b_tokens = ctx.session.constant(("tome_b", n, p, x.device), lambda: 2 * ctx.arange(n_b)[p_b:] + 1)
        keep = torch.cat(
            [
                ctx.arange(p).expand(b, p),  # protected tokens, in their original order
                2 * unm[:, p_a:],  # unmerged A tokens
                b_tokens.expand(b, n_b - p_b),  # B tokens
            ],
            dim=1,
        )
        n_unm = n_a - r - p_a
        return Reduction(keep=keep, src=2 * src, dst=dst + (p + n_unm - p_b))
