"""``random`` for the kv family: evict uniformly at random at the same budget — the floor any scoring
method has to beat. A score is a hash of ``(seed, layer, eviction step, KV head, token position)`` mapped to
[0, 1): reproducible across devices and batch sizes, different for every layer and head, and computed on the
device (a decode step stays graph-capturable; there the step comes from the token's arrival, so each step
still draws afresh).

Reference: kvpress ``RandomPress`` (NVIDIA, https://github.com/NVIDIA/kvpress,
``kvpress/presses/random_press.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.families.kv import PHASES, KVMethod, ScoreContext
from tokenbench.registry import register_method

_M1, _M2 = 0x5851F42D4C957F2D, 0x14057B7EF767814F  # odd 63-bit multipliers (PCG / splitmix style)
_MASK = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An integer hash on int64 that stays non-negative (no overflow into the sign bit)."""
    x = (x * (_M1 & _MASK)) & _MASK
    x = x ^ (x >> 29)
    x = (x * (_M2 & _MASK)) & _MASK
    return x ^ (x >> 32)


@register_method("random", family="kv")
@dataclass
class RandomKV(KVMethod):
    """Random selection at the budget; at decode it evicts a random entry each step once at capacity."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES

    seed: int = 0  # seed of the selection; same seed, same evicted positions

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, h, _ = ctx.positions.shape
        head = torch.arange(h, device=ctx.positions.device).view(1, h, 1)
        # at decode the newest position stands in for the step number (static under graph capture)
        step = ctx.step if ctx.phase == "prefill" else ctx.query_positions.view(b, 1, 1)
        key = ((int(self.seed) * 1_000_003 + ctx.layer_idx) * 1_000_003 + step) * 64 + head
        x = _mix(_mix(key & _MASK) ^ ctx.positions.clamp(min=0, max=_MASK))
        return (x >> 38).float() / float(1 << 24)
