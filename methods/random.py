"""``random`` for the kv family: evict uniformly at random at the same budget — the floor any scoring
method has to beat. Scores are drawn from a CPU generator seeded by ``(seed, layer, eviction step)`` and
shared by every row of a batch, so a run is reproducible across devices and batch sizes, and each layer
and KV head draws its own selection.

Reference: kvpress ``RandomPress`` (NVIDIA, https://github.com/NVIDIA/kvpress,
``kvpress/presses/random_press.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.families.kv import PHASES, EvictionInfo, KVMethod
from tokenbench.registry import register_method

_MIX = 1_000_003  # a prime to combine seed, layer and step into one generator seed


@register_method("random", family="kv")
@dataclass
class RandomKV(KVMethod):
    """Random selection at the budget; at decode it evicts a random entry each step once at capacity."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES

    seed: int = 0  # seed of the selection; same seed, same evicted positions

    def score(self, module, hidden_states, keys, values, attentions, info: EvictionInfo) -> torch.Tensor:
        b, h, n = keys.shape[0], keys.shape[1], keys.shape[2]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(((int(self.seed) * _MIX + info.layer_idx) * _MIX + info.step) % (2**63 - 1))
        scores = torch.rand(h, n, generator=gen)
        return scores.to(keys.device).unsqueeze(0).expand(b, h, n)
