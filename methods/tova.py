"""TOVA (Token Omission Via Attention): keep the tokens the current query attends to most, averaged over all
heads of the layer.

Oren et al. "Transformers are Multi-State RNNs" (arXiv:2401.06104, 2024).
Reference code: https://github.com/schwartz-lab-NLP/TOVA (``src/tova_cache.py``, ``TOVACache.reduce``: after
each forward, when the layer holds more than its multi-state size, keep the top tokens by the last query's
attention weights averaged over the heads; the same tokens for every head).

- ``phase=prefill``: the score is the attention of the compressed forward's last query (the context's last
  token, or with ``query_aware`` the question's last token).
- ``phase=decode``/``both``: each decode step scores the live tokens by that step's attention and frees the
  lowest (possibly the token just written, as in the reference).

No recent window and no sinks: the rule is the attention of the newest query alone. GQA: the mean runs over
every query head of the layer (the reference averages the ``repeat_kv``-expanded heads, the same thing), so
all KV heads keep the same slots. The reference re-assigns cache positions after eviction; here tokens keep
their true positions (see ``streaming_llm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.families.kv import PHASES, KVMethod, ScoreContext
from tokenbench.registry import register_method


@register_method("tova", family="kv")
@dataclass
class TOVA(KVMethod):
    """Last query's attention, mean over the layer's heads; every head keeps the same tokens."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES
    default_phase: ClassVar[str] = "both"

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        last = ctx.attention(last=1)[:, :, -1]  # (B, Hq, C): the newest query of this forward
        return last.mean(dim=1, keepdim=True).expand_as(ctx.valid)
