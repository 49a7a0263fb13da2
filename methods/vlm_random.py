"""``random`` for the vlm family: keep a uniformly random subset of the visual tokens at the same budget,
before the projector — the floor an importance or duplication rule has to beat (the random baseline of
FasterVLM, Zhang et al. 2024, arXiv:2412.01818, Table 1, and of DART, Wen et al. 2025, arXiv:2502.11494).

Each image draws its own subset on the CPU, from a generator seeded with ``seed`` and a key computed from the
image's preprocessed pixels: the same image and seed give the same tokens on any device, in any sample order
(resumed runs, warm-up, repeats), different images different ones; kept tokens stay in their spatial order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenbench.families.vlm import VisionContext, VLMMethod
from tokenbench.registry import register_method


@register_method("random", family="vlm")
@dataclass
class RandomVLM(VLMMethod):
    """Random visual-token selection at the budget."""

    seed: int = 0  # seed of the selection; same seed, same kept tokens

    def reduce(self, ctx: VisionContext) -> torch.Tensor:
        n = ctx.features.shape[1]
        rows = []
        for key in ctx.image_keys():
            gen = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + key) % (2**63 - 1))
            rows.append(torch.randperm(n, generator=gen)[: ctx.n_keep])
        idx = torch.stack(rows)
        return ctx.gather(idx.to(ctx.features.device))
