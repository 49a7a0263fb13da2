"""StreamingLLM: keep the first ``n_sink`` tokens ("attention sinks") and the most recent ones.

Xiao, Tian, Chen, Han, Lewis. "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). Reference code: https://github.com/mit-han-lab/streaming-llm
(``streaming_llm/kv_cache.py``, ``StartRecentKVCache``: start_size sinks + recent_size window); the prefill
form follows kvpress ``StreamingLLMPress`` (https://github.com/NVIDIA/kvpress).

- ``phase=prefill``: after the compressed prefill the segment keeps its ``n_sink`` first and its
  ``budget - n_sink`` last tokens.
- ``phase=decode``/``both``: the paper's streaming setting — the cache is a rolling window at fixed capacity;
  each decode step evicts the oldest non-sink entry.

Difference from the paper: cached keys keep the rotary phase of their true position (as kvpress without its
key re-rotation wrapper); the paper re-assigns positions inside the cache. The model still sees the correct
relative distances to every kept token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.families.kv import PHASES, KVMethod, ScoreContext
from tokenbench.registry import register_method


@register_method("streaming_llm", family="kv")
@dataclass
class StreamingLLM(KVMethod):
    """Sinks + recency window."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES

    n_sink: int = 4  # first tokens always kept (attention sinks)

    def validate(self) -> None:
        super().validate()
        self.check_int("n_sink", 0)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        pos = ctx.positions
        # Recency: later positions score higher. Sinks score above everything, the earliest highest, so a
        # budget smaller than n_sink keeps the first tokens.
        top = 2**40  # above any position
        return torch.where(pos < self.n_sink, top - pos, pos).float()
