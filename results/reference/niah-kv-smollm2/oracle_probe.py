"""Is it SnapKV's choice of tokens or the compressed cache itself that loses the needle? Query-aware snapkv at
keep 25% on the three middle depths, as in ``table.md``, and the same with an oracle: the needle sentence's
tokens raised above every other score in every layer and head (the rest of the budget still SnapKV's ranking,
the budget unchanged). If the oracle answers exactly, decoding over an evicted cache works (positions, masks,
cache) and what fails is which tokens the observation window votes for.

    python results/reference/niah-kv-smollm2/oracle_probe.py --haystack-dir ../shared/data/paul_graham_essays
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tokenbench import registry
from tokenbench.families.kv import ScoreContext
from tokenbench.lm import Prompt
from tokenbench.methods.snapkv import SnapKV

sys.path.insert(0, str(Path(__file__).parent))
from keep_sweep import predict


@dataclass
class OracleSnapKV(SnapKV):
    """SnapKV whose scores put the positions in ``forced`` (class-level, set per sample) first."""

    forced: ClassVar[tuple[int, int]] = (0, 0)  # [start, end) token positions kept in every layer and head

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        scores = super().score(ctx)
        lo, hi = self.forced
        needle = ctx.valid & (ctx.positions >= lo) & (ctx.positions < hi)
        return ctx.keep_first(scores, needle, order=-ctx.positions)


def needle_span(ids: list[int], needle_ids: list[int]) -> tuple[int, int]:
    """[start, end) of the needle's tokens in the prompt (matched on its digits' tokens, then widened to the
    whole sentence's length: the sentence's first tokens depend on what precedes it)."""
    digits = needle_ids[-9:-1]  # " 7192846" and the period excluded: the last tokens before "."
    for i in range(len(ids) - len(digits) + 1):
        if ids[i:i + len(digits)] == digits:
            end = i + len(digits) + 1  # with the period
            return max(0, end - len(needle_ids) - 1), end
    raise ValueError("needle not found in the prompt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--haystack-dir", default="../shared/data/paul_graham_essays")
    ap.add_argument("--keep", type=float, default=0.25)
    args = ap.parse_args()
    registry.load_all()
    loaded = registry.build("model", {"name": "smollm2-135m"}).load()
    task = registry.build("task", {"name": "niah", "haystack_dir": args.haystack_dir, "context_lengths": [2048],
                                   "depths": [0.25, 0.5, 0.75]})
    tok = loaded.tokenizer
    needle_ids = tok.encode(" " + task.needle, add_special_tokens=False)
    samples = task.samples(loaded)
    spans: list[tuple[int, int]] = []

    def force(prompt: Prompt) -> None:  # the needle's span in this sample's prompt, for the oracle
        OracleSnapKV.forced = needle_span(prompt.prefix_ids[0].tolist(), needle_ids)
        spans.append(OracleSnapKV.forced)

    for label, cls in (("snapkv", SnapKV), ("snapkv + needle oracle", OracleSnapKV)):
        spans.clear()
        scored = predict(loaded, task, samples, cls(keep_ratio=args.keep, query_aware=True), before=force)
        for s, span, (score, text) in zip(samples, spans, scored):
            print(f"{label:24s} {s.id}: accuracy {score['accuracy']:.0f}, answer_prefix "
                  f"{score['answer_prefix']:.2f}, forced positions {span}: "
                  f"{' '.join(text.split())[:60]!r}", flush=True)


if __name__ == "__main__":
    main()
