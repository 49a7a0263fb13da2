"""Scissorhands: keep the tokens that were persistently important over a history window, and the newest ones.

Liu, Desai, Liao, Wang, Xie, Xu, Kyrillidis, Shrivastava. "Scissorhands: Exploiting the Persistence of
Importance Hypothesis for LLM KV Cache Compression at Test Time", NeurIPS 2023 (arXiv:2305.17118). No official
code exists; this follows the paper's Algorithm 1 (a KV cache held at a fixed budget while generating) and
Algorithm 2 (compression, as we read it: over the attention of the last ``w`` steps, count for each token the
steps at which it was unimportant — attention below the average share — protect the ``r`` newest tokens,
drop the tokens with the largest counts).

The rule, per layer and KV head:

- a token is *important* at a step when the attention it receives exceeds the uniform share ``1/n`` of the
  ``n`` tokens that step's query saw, else *unimportant*;
- its score is the number of unimportant steps among the last ``history_window`` steps (lower = keep); ties go
  to the newer token; the ``recent_window`` newest tokens are always kept (capped at the budget);
- ``phase=prefill``: the steps are the compressed prefill's last ``history_window`` queries;
  ``phase=decode``/``both``: every decode step adds one step (the per-slot history lives in session state,
  a bit per step, so the window slides exactly) and frees the live token with the worst score.

Where the paper leaves a choice, or this harness needs one:

- the average is ``1/n`` over the tokens the query actually attended to (the paper writes ``1/t``, the share
  at step ``t`` of an uncompressed cache; with a compressed cache the softmax runs over ``n`` tokens);
- steps at which a token was not yet in the cache do not count against it (the paper's counter counts only
  recorded scores), so a young token is not evicted for lack of history;
- GQA (the paper used multi-head OPT models): a step's attention for a KV head is the mean over its query
  heads; one flag per KV head and step;
- drop amount ``m = 1``: the base holds the cache at capacity and frees one token per decode step (static
  shapes for CUDA graphs); the paper drops ``m`` at once when the budget is reached, which only amortizes
  the scoring cost;
- ties in the count (frequent: counts are integers) go to the newer token, in the spirit of the paper's
  LRU analogy;
- the defaults ``history_window=128`` and ``recent_window=32`` are ours.

State cost: ``ceil(history_window / 62)`` int64 words + one float per cached slot and KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench import kv_attention
from tokenbench.families.kv import PHASES, KVMethod, ScoreContext
from tokenbench.registry import register_method

_BITS = 62  # history bits per int64 word (the top two bits stay clear: shifts never reach the sign)
_WORD = (1 << _BITS) - 1


@register_method("scissorhands", family="kv")
@dataclass
class Scissorhands(KVMethod):
    """Fewest below-average attention steps over a sliding history window + recent window."""

    supported_phases: ClassVar[tuple[str, ...]] = PHASES
    default_phase: ClassVar[str] = "both"

    history_window: int = 128  # w: the last w steps (decode steps; prefill: the prompt's last w queries)
    recent_window: int = 32  # r: the newest tokens always kept (at most the budget)

    def validate(self) -> None:
        super().validate()
        self.check_int("history_window", 1)
        self.check_int("recent_window", 0)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.phase == "prefill":
            m = min(self.history_window, ctx.queries.shape[2])
            weights = ctx.attention(last=m)  # (B, Hq, m, C)
            qpos, qvalid = ctx.query_positions[:, -m:], ctx.query_valid[:, -m:]
        else:
            weights, qpos, qvalid = ctx.attention(), ctx.query_positions, ctx.query_valid
        count = self._record(ctx, self._unimportant(ctx, weights, qpos, qvalid))
        pos = torch.where(ctx.valid, ctx.positions, 0).float()
        # fewer unimportant steps first, then the newer token (exact while w * newest < 2**24)
        scores = pos - count * (ctx.newest().float() + 1)
        n_recent = self.recent_window if ctx.budget is None else ctx.budget.clamp(max=self.recent_window)
        return ctx.keep_first(scores, ctx.recent(n_recent))  # the window never exceeds the budget: no order

    @staticmethod
    def _unimportant(ctx: ScoreContext, weights: torch.Tensor, qpos: torch.Tensor,
                     qvalid: torch.Tensor) -> torch.Tensor:
        """``(B, H, m, C)`` bool: at each of the ``m`` steps, the tokens the query saw that got at most the
        uniform share of its attention (query heads of a KV head averaged)."""
        att = ctx.kv_heads(weights, "mean")
        # a decode step sees every live token; a prefill query those up to its position
        seen = ctx.valid.unsqueeze(2) if ctx.phase == "decode" else \
            kv_attention.causal_mask(ctx.valid, ctx.positions, qpos)
        n_seen = seen.sum(dim=-1, keepdim=True)
        return seen & (att * n_seen <= 1) & qvalid[:, None, :, None]

    def _record(self, ctx: ScoreContext, flags: torch.Tensor) -> torch.Tensor:
        """Shift each step's flags (oldest first) into the per-slot history bits (bit ``k``: ``k`` steps
        ago) and keep the count of set bits within the window; returns that count ``(B, H, C)``."""
        w = self.history_window
        words = [ctx.state(f"scissorhands_bits{k}", torch.int64) for k in range(-(-w // _BITS))]
        count = ctx.state("scissorhands_count")
        m = flags.shape[2]
        if ctx.phase == "prefill" and ctx.step == 0:  # the session's first scoring: no history yet, so pack
            for k, word in enumerate(words):  # the m <= w steps at once (word k: ages 62k .. 62k + 61)
                hi, lo = m - 1 - k * _BITS, max(0, m - (k + 1) * _BITS)  # steps j with those ages
                if hi >= 0:
                    age = hi - torch.arange(lo, hi + 1, device=flags.device)  # minus 62k
                    word.copy_((flags[:, :, lo:hi + 1].long() << age.view(1, 1, -1, 1)).sum(dim=2))
            return count.copy_(flags.sum(dim=2))
        top_word, top_bit = (w - 1) // _BITS, (w - 1) % _BITS  # where the oldest step of the window sits
        # the last word keeps only the window's bits: the step shifted out of the window is forgotten in the
        # same pass (one write per word and step)
        keeps = [_WORD] * top_word + [(1 << (top_bit + 1)) - 1]
        for step in range(m):
            new = flags[:, :, step].long()
            leaving = (words[top_word] >> top_bit) & 1
            carry = new
            for word, keep in zip(words, keeps):
                out = (word >> (_BITS - 1)) & 1
                word.copy_(((word << 1) & keep) | carry)
                carry = out
            count.add_(new - leaving)
        return count
