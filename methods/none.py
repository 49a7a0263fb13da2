"""``none`` for the kv family: the full cache, nothing evicted — the baseline every KV method is measured
against. It runs through the same runner, cache and attention function as every other method, so its
timings carry the same bookkeeping cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import PHASES, KVMethod
from tokenbench.registry import register_method


@register_method("none", family="kv")
@dataclass
class NoKV(KVMethod):
    """Keeps every cached token. ``query_aware`` still chooses how the prompt is prefilled (one forward with
    the question, or context then question), so the baseline matches either setting of the other methods."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES
    takes_budget: ClassVar[bool] = False

    # The budget fields stay in the schema (so a sweep `-m method=a,b method.keep_ratio=0.5`, whose base config
    # Hydra composes with this default method, is valid), but the baseline accepts only keep-all.
    def validate(self) -> None:
        super().validate()
        if float(self.keep_ratio) != 1.0 or self.n_keep is not None:
            raise TokenbenchError(
                f"method 'none' keeps every token and takes no budget (got keep_ratio={self.keep_ratio}, "
                f"n_keep={self.n_keep}); run it once as the baseline"
            )

    def is_noop(self) -> bool:
        return True

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": 1.0, "n_keep": None, "phase": None}

    def score(self, ctx):  # never called: nothing is evicted
        raise AssertionError("method 'none' never evicts")
