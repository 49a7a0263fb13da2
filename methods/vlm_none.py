"""``none`` for the vlm family: every visual token reaches the language model — the baseline every
visual-token method is measured against. It runs through the same runner (vision tower, projector, spliced
prompt embeddings, language-model prefill) as every method, so its timings carry the same bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.families.vlm import VLMMethod
from tokenbench.method import KeepAll
from tokenbench.registry import register_method


@register_method("none", family="vlm")
@dataclass
class NoVLM(KeepAll, VLMMethod):
    """Keeps every visual token (the budget fields stay in the schema so a sweep's shared budget composes;
    see ``KeepAll``)."""

    keep_all: ClassVar[dict[str, Any]] = {"keep_ratio": 1.0, "n_keep": None}

    def reduce(self, ctx):  # never called: nothing is reduced
        raise AssertionError("method 'none' never reduces")
