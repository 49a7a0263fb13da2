"""``none`` for the vlm family: every visual token reaches the language model — the baseline every
visual-token method is measured against. It runs through the same runner (vision tower, projector, spliced
prompt embeddings, language-model prefill) as every method, so its timings carry the same bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.families.vlm import VLMMethod
from tokenbench.registry import register_method


@register_method("none", family="vlm")
@dataclass
class NoVLM(VLMMethod):
    """Keeps every visual token. The budget fields stay in the schema (a sweep's shared budget composes) but
    only keep-all is accepted."""

    takes_budget: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if float(self.keep_ratio) != 1.0 or self.n_keep is not None:
            raise TokenbenchError(
                f"method 'none' keeps every token and takes no budget (got keep_ratio={self.keep_ratio}, "
                f"n_keep={self.n_keep}); run it once as the baseline")

    def is_noop(self) -> bool:
        return True

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": 1.0, "n_keep": None}

    def reduce(self, ctx):  # never called: nothing is reduced
        raise AssertionError("method 'none' never reduces")
