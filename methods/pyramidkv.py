"""PyramidKV: SnapKV's selection with per-layer budgets that shrink linearly from the bottom to the top layer.

Cai, Zhang, Gao, Liu, Li, Liu, Lu, Xiong, Dong, Hu, Xiao. "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling" (arXiv:2406.02069). Reference code:
https://github.com/Zefan-Cai/KVCache-Factory (``pyramidkv/pyramidkv_utils.py``, ``PyramidKVCluster``); also
kvpress ``PyramidKVPress`` (https://github.com/NVIDIA/kvpress). Written independently.

Scores: exactly ``snapkv`` (this class extends it). Budgets, for a row whose segment has ``n`` tokens and a
nominal budget ``k`` per layer, over ``L`` layers:

- ``f`` window tokens are kept in every layer on top of the pyramid (the paper's "last alpha tokens retained
  across all layers"): ``f = min(window_size, k)`` query-agnostic (the window is the context's end);
  ``f = 0`` query-aware, where the window is taken to be the question, which is never counted;
- the rest, ``m = k - f`` per layer on average, follows the reference's arithmetic sequence: the top layer
  gets ``m / beta``, the bottom layer ``2 m - m / beta``; if that exceeds the ``n - f`` tokens there are, the
  bottom layer gets ``n - f`` and the top ``2 m - (n - f)`` (the reference's cap); layers in between are
  linear in depth;
- rounding: exact (rational) layer shares are floored and the missing tokens go one each to the layers with
  the largest fractional parts (ties: the lower layer), so the budgets still decrease with depth and their
  mean over the layers is exactly ``k``.

Deviations from KVCache-Factory: its integer divisions (``//``) make the mean drift from the nominal budget,
and for prompts shorter than ``2 * (max_capacity - window)`` it falls back to SnapKV's uniform budget; here
the (capped) pyramid is used whenever the budget is below the segment. kvpress applies the pyramid to the
whole budget (window included) and falls back to uniform when the top layer cannot hold the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from tokenbench.errors import TokenbenchError
from tokenbench.methods.snapkv import SnapKV
from tokenbench.registry import register_method


@lru_cache(maxsize=4096)
def pyramid(mean: int, avail: int, n_layers: int, beta: float) -> tuple[int, ...]:
    """Per-layer integer budgets, bottom to top, decreasing linearly, averaging exactly ``mean``, none above
    ``avail``."""
    m = Fraction(mean)
    lo = m / Fraction(beta)
    hi = 2 * m - lo
    if hi > avail:
        hi = Fraction(avail)
        lo = 2 * m - hi
    step = (hi - lo) / (n_layers - 1)
    shares = [hi - i * step for i in range(n_layers)]
    out = [math.floor(x) for x in shares]
    missing = mean * n_layers - sum(out)
    for i in sorted(range(n_layers), key=lambda i: (out[i] - shares[i], i))[:missing]:
        out[i] += 1
    return tuple(out)


@register_method("pyramidkv", family="kv")
@dataclass
class PyramidKV(SnapKV):
    """SnapKV scores; more budget in lower layers, less in higher ones, the same on average."""

    beta: float = 20.0  # steepness: the top layer gets 1/beta of the mean budget beyond the window

    def validate(self) -> None:
        super().validate()
        b = self.beta
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b >= 1:
            raise TokenbenchError(f"method '{self.label}': beta must be a number >= 1, got {b!r}")

    def layer_budget(self, budget: int, segment_len: int, layer_idx: int, n_layers: int) -> int:
        if n_layers <= 1 or budget >= segment_len:
            return budget
        fixed = 0 if self.query_aware else min(self.window_size, budget)
        return fixed + pyramid(budget - fixed, segment_len - fixed, n_layers, float(self.beta))[layer_idx]
