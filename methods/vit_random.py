"""``random`` for the vit family: drop tokens uniformly at random at the same token counts as the other
methods (``r`` per block, ToMe's schedule) — the floor a merging or pruning rule has to beat.

Each image draws its own selection at every block, from a generator on the model's device seeded with
``seed`` when the method is attached, so a run is reproducible for a given batch order; a row's selection
depends on its place in the batch (``batch_consistent`` is False). Prefix tokens (class, distillation,
registers) are never dropped; the kept tokens stay in their original order.

The random-drop baseline of token-pruning papers (e.g. EViT, Liang et al., ICLR 2022, arXiv:2202.07800,
Table 6; DynamicViT, Rao et al., NeurIPS 2021, arXiv:2106.02034).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.families.vit import LayerContext, Reduction, VisionTokenReducer
from tokenbench.registry import register_method


@register_method("random", family="vit")
@dataclass
class RandomViT(VisionTokenReducer):
    """Random token dropping at ToMe's token counts."""

    batch_consistent: ClassVar[bool] = False

    seed: int = 0  # seed of the selection; same seed and batch order, same dropped tokens

    def select(self, x: torch.Tensor, ctx: LayerContext) -> Reduction:
        p, b = ctx.n_prefix, x.shape[0]
        gens = ctx.session.scratch().setdefault("generators", {})
        key = str(x.device)
        if key not in gens:
            gens[key] = torch.Generator(device=x.device)
            gens[key].manual_seed(int(self.seed))
        scores = torch.rand(b, ctx.n_tokens - p, device=x.device, generator=gens[key])
        kept = scores.topk(ctx.n_out - p, dim=-1).indices.sort(dim=-1).values
        return Reduction(keep=torch.cat([ctx.arange(p).expand(b, p), p + kept], dim=1))
