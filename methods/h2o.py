"""H2O: keep the heavy hitters (the tokens with the largest attention accumulated over every query so far) and
a window of the most recent tokens.

Zhang et al. "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv:2306.14048). Reference code:
https://github.com/FMInference/H2O (``h2o_hf/utils_real_drop/modify_llama.py``, ``H2OKVCache_LayerWise``: the
score of a cached token is the sum of the attention it received from every query so far, per head; the
cache keeps ``hh_size`` top-scoring tokens outside the recent window plus the ``recent_size`` newest);
the prefill-only form is KVCache-Factory's ``H2OKVCluster`` (https://github.com/Zefan-Cai/KVCache-Factory).

- ``phase=prefill``: the score is the attention summed over all the prompt's queries of the compressed prefill
  (with ``query_aware`` the question's queries too); each row keeps its ``recent_ratio`` share of the budget
  as the newest context tokens and fills the rest with the best-scoring older ones.
- ``phase=decode``/``both``: the sums live in a per-slot session state; every decode step adds its query's
  attention and frees the lowest-scoring live token outside the recent window, whose size is the
  ``recent_ratio`` share of the row's decode capacity (budget + question), as the reference's
  ``recent_size`` is a share of its ``cache_size``.

GQA: a KV head's score is the mean over its query heads (the reference runs on multi-head models; kvpress
and Ada-KV fold GQA groups by the mean). The mean ranks exactly as the sum (a constant factor per model).
Differences from the reference: its split is ``hh_size`` + ``recent_size`` tokens, here a fraction of the
budget (the paper's experiments use half and half, the default); the recent count is
``floor(recent_ratio * budget)``. Forwards that do not evict (the question fed after a query-agnostic
prefill) are not seen by the method, so the question's queries add nothing to the sums, and with
``phase=decode`` the sums start at the first decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import PHASES, KVMethod, ScoreContext
from tokenbench.registry import register_method


@register_method("h2o", family="kv")
@dataclass
class H2O(KVMethod):
    """Heavy hitters (accumulated attention) + recent window."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES
    default_phase: ClassVar[str] = "both"
    supports_adaptive_heads: ClassVar[bool] = True  # attention sums are comparable across heads

    recent_ratio: float = 0.5  # share of the budget kept for the newest tokens; the rest are heavy hitters

    def validate(self) -> None:
        super().validate()
        r = self.recent_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= float(r) <= 1.0):
            raise TokenbenchError(f"method '{self.label}': recent_ratio must be in [0, 1], got {r!r}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # attention received from this forward's queries (decode: the step's query), folded onto KV heads
        seen = ctx.accumulated_attention() if ctx.phase == "prefill" else ctx.attention()[:, :, -1]
        total = ctx.state("h2o_attention")
        total.add_(ctx.kv_heads(seen, "mean"))
        if ctx.budget is None or float(self.recent_ratio) == 0.0:
            return total.clone()
        n_recent = (ctx.budget * float(self.recent_ratio) + 1e-6).floor().long()
        return ctx.keep_first(total, ctx.recent(n_recent))  # the window never exceeds the budget: no order
