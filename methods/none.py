"""``none`` for the kv family: the full cache, nothing evicted — the baseline every KV method is measured
against. It runs through the same runner and hooks as every other method, so its timings carry the same
(negligible) bookkeeping cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from tokenbench.families.kv import PHASES, KVMethod
from tokenbench.registry import register_method


@register_method("none", family="kv")
@dataclass
class NoKV(KVMethod):
    """Keeps every cached token. ``query_aware`` still chooses how the prompt is prefilled (one forward with
    the question, or context then question), so the baseline matches either setting of the other methods."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES

    # Not parameters of the baseline (init=False keeps them out of the config schema).
    keep_ratio: float = field(default=1.0, init=False)
    n_keep: Optional[int] = field(default=None, init=False)
    phase: Optional[str] = field(default=None, init=False)

    def is_noop(self) -> bool:
        return True

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": 1.0, "n_keep": None, "phase": None}

    def score(self, module, hidden_states, keys, values, attentions, info):  # never called: nothing evicted
        raise AssertionError("method 'none' never evicts")
