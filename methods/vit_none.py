"""``none`` for the vit family: every token kept, the model's own timm forward left in place — the baseline
every ViT method is measured against (no patch, so its speed is timm's own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.families.vit import VisionTokenReducer
from tokenbench.registry import register_method


@register_method("none", family="vit")
@dataclass
class NoViT(VisionTokenReducer):
    """Keeps every token. The budget fields stay in the schema so that a sweep with a fixed budget
    (``-m method=none,tome method.r=8``) composes, but only keep-all is accepted."""

    takes_budget: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.r != 0:
            raise TokenbenchError(
                f"method 'none' keeps every token and takes no budget (got r={self.r}); "
                "run it once as the baseline"
            )

    def is_noop(self) -> bool:
        return True

    def nominal_budget(self) -> dict[str, Any]:
        return {"r": 0}

    def select(self, x, ctx):  # never called: nothing is reduced
        raise AssertionError("method 'none' never reduces")
