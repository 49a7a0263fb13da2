"""``none`` for the prompt family: the context goes to the target untouched — the baseline every prompt
compressor is measured against, through the same runner (so its latency has the same bookkeeping and a
``compress_ms`` of about zero).

Registered twice: as ``none`` of the prompt family (every family answers to ``none``, DESIGN.md) and as
``prompt_none``. A model that takes both kv and prompt methods (every causal LM here) resolves the shared name
``none`` to its first family, kv (the full cache); ``method=prompt_none`` names the prompt family's baseline
explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.families.prompt import Fit, PromptCompressor
from tokenbench.method import KeepAll
from tokenbench.registry import register_method


@register_method("none", family="prompt")
@dataclass
class NoPrompt(KeepAll, PromptCompressor):
    """Keeps the whole context (the budget fields stay in the schema so ``-m method=prompt_none,truncate
    method.keep_ratio=...`` composes in a sweep; see ``KeepAll``)."""

    keep_all: ClassVar[dict[str, Any]] = {"keep_ratio": 1.0, "target_tokens": None}

    def select(self, body: str, question: str, budget: int) -> Fit:  # never called: nothing is compressed
        raise AssertionError("method 'none' never compresses")


@register_method("prompt_none", family="prompt")
@dataclass
class PromptNone(NoPrompt):
    """``none`` of the prompt family under a name that does not collide with the kv family's."""
