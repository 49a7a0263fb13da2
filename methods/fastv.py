"""FastV: drop the visual tokens the last prompt token attends to least, inside the language model after
layer K.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024, arXiv:2403.06764. Reference: https://github.com/pkunlp-icler/FastV —
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py`` (``fastv_forward``): the
attention map of layer ``K - 1`` (``output_attentions`` for that layer only), averaged over heads, the last
token's row, restricted to the image span; the top ``round(N * (1 - R))`` image tokens are kept; the kept
indices (system prompt, kept image tokens, the rest) are sorted, the hidden states gathered, and the
positions of the kept tokens stay their original ones (``position_ids = keep_indexs``). Layers before K
keep every token (in the cache too); the paper's default is K = 2, R = 50 %.

Here the budget is the number of visual tokens kept after layer K (``n_keep``, or ``keep_ratio`` = 1 - R);
the last token's attention at layer K - 1 is computed from that layer's query projection of the last token
and its cached keys (one ``1 x L`` row per head; the model's attention stays SDPA, nothing forces eager).
Decoding continues at the original next position, the cache of layers >= K holding only the kept tokens (as
the reference's inplace version with a KV cache).

On LLaVA-NeXT the image span is every packed tile token (newline tokens included), as in the references'
LLaVA-NeXT runs.

Deviations: none in the selection rule. The reference's ``round`` on the ratio becomes the family's budget
(``floor(keep_ratio * N)``, or ``n_keep`` exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenbench.families.vlm import LLMContext, LLMStageMethod
from tokenbench.registry import register_method


@register_method("fastv", family="vlm")
@dataclass
class FastV(LLMStageMethod):
    """Keep the ``n_keep`` visual tokens with the highest last-token attention at layer ``prune_layer - 1``."""

    def select(self, ctx: LLMContext) -> torch.Tensor:
        scores = ctx.last_attention()[:, ctx.visual]
        return scores.topk(ctx.n_keep, dim=-1).indices
