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

from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import Fit, PromptCompressor
from tokenbench.registry import register_method


@register_method("none", family="prompt")
@dataclass
class NoPrompt(PromptCompressor):
    """Keeps the whole context. The budget fields stay in the schema (so ``-m method=prompt_none,truncate
    method.keep_ratio=...`` composes in a sweep), but only keep-all is accepted."""

    takes_budget: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.keep_ratio != 1.0 or self.target_tokens is not None:
            raise TokenbenchError(
                f"method '{self.label}' keeps the whole context and takes no budget (got keep_ratio="
                f"{self.keep_ratio}, target_tokens={self.target_tokens}); run it once as the baseline")

    def is_noop(self) -> bool:
        return True

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": 1.0, "target_tokens": None}

    def select(self, body: str, question: str, budget: int) -> Fit:  # never called: nothing is compressed
        raise AssertionError("method 'none' never compresses")


@register_method("prompt_none", family="prompt")
@dataclass
class PromptNone(NoPrompt):
    """``none`` of the prompt family under a name that does not collide with the kv family's."""
