"""``none`` for the vit family: every token kept, the model's own timm forward left in place — the baseline
every ViT method is measured against (no patch, so its speed is timm's own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.families.vit import VisionTokenReducer
from tokenbench.method import KeepAll
from tokenbench.registry import register_method


@register_method("none", family="vit")
@dataclass
class NoViT(KeepAll, VisionTokenReducer):
    """Keeps every token (the budget fields stay in the schema so that ``-m method=none,tome method.r=8``
    composes; see ``KeepAll``)."""

    keep_all: ClassVar[dict[str, Any]] = {"r": 0}

    def select(self, x, ctx):  # never called: nothing is reduced
        raise AssertionError("method 'none' never reduces")
