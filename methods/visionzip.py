"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv:2412.04467. Reference: https://github.com/dvlab-research/VisionZip — ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) and ``visionzip/utils.py`` (the keys of layer -2 averaged over heads,
``CLIPAttention_forward``'s ``raw_key_states.mean(1)``).

At the vision feature layer (LLaVA's penultimate layer), for a budget of ``n_keep`` tokens:

1. dominant: the [CLS] token itself plus the ``n_dominant - 1`` patch tokens with the highest [CLS] attention
   (summed over heads; the reference's ``dominant`` count includes [CLS]), in their original order, [CLS]
   first;
2. contextual: the remaining tokens' keys (averaged over heads, L2-normalised); ``n_contextual`` targets are
   taken uniformly (every ``step = max(1, n_rest // n_contextual)``-th remaining token); every other remaining
   token is assigned to its most similar target (dot product of normalised keys); a contextual token is the
   target's feature **plus** the mean of the features assigned to it (the reference's
   ``target_hidden + aggregated_hidden``; a target nobody joined stays itself).

The split follows the reference's settings for LLaVA-1.5 (54 + 10 for 64 tokens, 108 + 20 for 128, 162 + 30
for 192): ``n_contextual = round(n_keep * 10 / 64)`` unless ``n_contextual`` is set.

Deviations: the [CLS] attention comes from the layer's own projections rather than ``output_attentions``
(same values up to rounding); only the single-image LLaVA-1.5 path (not the LLaVA-NeXT tiles); the budget
counts [CLS] as one of the kept visual tokens, as the reference's token count does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.errors import TokenbenchError
from tokenbench.families.vlm import VisionContext, VLMMethod
from tokenbench.registry import register_method

CONTEXTUAL_SHARE = 10 / 64  # the reference's LLaVA-1.5 settings: 54+10, 108+20, 162+30


@register_method("visionzip", family="vlm")
@dataclass
class VisionZip(VLMMethod):
    """[CLS] + dominant patch tokens by [CLS] attention, plus contextual tokens merged by key similarity."""

    requires_cls: ClassVar[bool] = True
    needs_vision_attention: ClassVar[bool] = True

    n_contextual: int | None = None  # contextual (merged) tokens; None: round(n_keep * 10 / 64), >= 1

    def validate(self) -> None:
        super().validate()
        self.check_int("n_contextual", 1, optional=True)

    def min_budget(self) -> int:
        return 2 + (self.n_contextual or 1) - 1  # [CLS] + at least one contextual token

    def split(self, n_keep: int) -> tuple[int, int]:
        """(dominant tokens including [CLS], contextual tokens) for a budget of ``n_keep``."""
        ctx = self.n_contextual if self.n_contextual is not None else max(1, round(n_keep * CONTEXTUAL_SHARE))
        if ctx >= n_keep:
            raise TokenbenchError(f"method 'visionzip': n_contextual={ctx} leaves no room for [CLS] in a budget "
                                  f"of {n_keep}")
        return n_keep - ctx, ctx

    def reduce(self, ctx: VisionContext) -> torch.Tensor:
        n_dom, n_ctx = self.split(ctx.n_keep)
        x, keys = ctx.features, ctx.keys()
        b, n, c = x.shape
        # 1. dominant: [CLS] + the top (n_dom - 1) patches by [CLS] attention, original order
        top = ctx.cls_attention().topk(n_dom - 1, dim=-1).indices
        dominant = torch.cat([ctx.cls_features.unsqueeze(1), ctx.gather(top)], dim=1)
        rest_mask = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, top, False)
        rest = x[rest_mask].view(b, n - (n_dom - 1), c)
        rest_keys = torch.nn.functional.normalize(keys[rest_mask].view(b, n - (n_dom - 1), -1).float(), dim=-1)
        # 2. contextual: uniform targets among the remaining tokens, the others merged into the most similar
        m = rest.shape[1]
        step = max(1, m // n_ctx)
        targets = torch.arange(0, m, step, device=x.device)[:n_ctx]
        is_target = torch.zeros(m, dtype=torch.bool, device=x.device)
        is_target[targets] = True
        sim = rest_keys[:, ~is_target] @ rest_keys[:, targets].transpose(1, 2)  # (B, m - n_ctx, n_ctx)
        assign = torch.zeros_like(sim, dtype=x.dtype).scatter_(2, sim.argmax(dim=2, keepdim=True), 1.0)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, n_ctx, 1)
        merged = assign.transpose(1, 2) @ rest[:, ~is_target] / counts
        contextual = rest[:, targets] + merged
        return torch.cat([dominant, contextual], dim=1)
