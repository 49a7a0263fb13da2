"""``random`` for the prompt family: drop words uniformly at random down to the budget — the floor any
scoring compressor has to beat (LLMLingua, Jiang et al., EMNLP 2023, arXiv:2310.05736, and Selective Context,
Li et al., EMNLP 2023, arXiv:2310.06201, both report a random-drop baseline).

A word is a whitespace-separated piece with the whitespace before it; every word draws a uniform score from a
generator seeded by ``seed`` and a hash of the context, so a sample's selection is reproducible and does not
depend on the order samples run in; the best-scored words are kept up to the budget (``fit``), in their
original order. Budget unit: one word.

Registered as ``random`` of the prompt family (every family answers to ``random``) and as ``prompt_random``:
on a causal LM the shared name resolves to the kv family's ``random``; ``method=prompt_random`` names this one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from tokenbench.families.prompt import Fit, PromptCompressor, words
from tokenbench.registry import register_method


@register_method("random", family="prompt")
@dataclass
class RandomPrompt(PromptCompressor):
    """Random word dropping at the budget."""

    seed: int = 0  # same seed and context, same kept words

    def select(self, body: str, question: str, budget: int) -> Fit:
        pieces = words(body)
        digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        rng = random.Random(f"{int(self.seed)}:{digest}")
        return self.fit(pieces, [rng.random() for _ in pieces], budget)


@register_method("prompt_random", family="prompt")
@dataclass
class PromptRandom(RandomPrompt):
    """``random`` of the prompt family under a name that does not collide with the kv family's."""
