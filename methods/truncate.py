"""``truncate``: cut the context to the budget in target tokens — the positional baseline of prompt
compression (LongBench's ``pred.py`` cuts over-long prompts in the middle, keeping the first and last halves;
Bai et al., ACL 2024, arXiv:2308.14508).

``drop`` says which part goes: ``tail`` keeps the first ``budget`` target tokens, ``head`` keeps the last ones,
``middle`` keeps the first ``budget // 2`` and the last ``budget - budget // 2`` (LongBench's rule). The kept
token ids are decoded with the target tokenizer; decoding and re-encoding can merge tokens at a cut, so the
result is re-counted and shortened token by token while it is over budget. Budget unit: one target token.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import Fit, PromptCompressor
from tokenbench.registry import register_method

DROPS = ("head", "tail", "middle")


@register_method("truncate", family="prompt")
@dataclass
class Truncate(PromptCompressor):
    """Keep the start, the end, or both ends of the context."""

    drop: str = "middle"  # head (keep the end) | tail (keep the start) | middle (keep both ends, LongBench)

    def validate(self) -> None:
        super().validate()
        if self.drop not in DROPS:
            raise TokenbenchError(f"method '{self.label}': drop must be one of {', '.join(DROPS)}, "
                                  f"got {self.drop!r}")

    def cut(self, ids: list[int], k: int) -> str:
        tok = self.tokenizer
        dec = lambda x: tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if k <= 0:
            return ""
        if self.drop == "tail":
            return dec(ids[:k])
        if self.drop == "head":
            return dec(ids[len(ids) - k:])
        first = k // 2
        return dec(ids[:first]) + dec(ids[len(ids) - (k - first):])

    def select(self, body: str, question: str, budget: int) -> Fit:
        ids = self.tokenizer(body, add_special_tokens=False)["input_ids"]
        k = budget
        text = self.cut(ids, k)
        n = self.count(text)
        while k > 0 and n > budget:  # decoded ids can re-tokenize longer: cut one more
            k -= 1
            text = self.cut(ids, k)
            n = self.count(text)
        return Fit(text, None, n, 1, {"kept_ids": k})
