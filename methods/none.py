"""``none`` for the kv family: the full cache, nothing evicted — the baseline every KV method is measured
against. It runs through the same runner, cache and attention function as every other method, so its
timings carry the same bookkeeping cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.families.kv import PHASES, KVMethod
from tokenbench.method import KeepAll
from tokenbench.registry import register_method


@register_method("none", family="kv")
@dataclass
class NoKV(KeepAll, KVMethod):
    """Keeps every cached token. ``query_aware`` still chooses how the prompt is prefilled (one forward with
    the question, or context then question), so the baseline matches either setting of the other methods."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES
    keep_all: ClassVar[dict[str, Any]] = {"keep_ratio": 1.0, "n_keep": None}

    def nominal_budget(self) -> dict[str, Any]:
        return {**super().nominal_budget(), "phase": None}

    def score(self, ctx):  # never called: nothing is evicted
        raise AssertionError("method 'none' never evicts")
