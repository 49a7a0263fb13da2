"""DART: duplication-aware token reduction — keep a few pivot tokens and the visual tokens least similar to
them, inside the language model after layer K.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
2025, arXiv:2502.11494. Reference: https://github.com/ZichenWen1/DART —
``llava/model/language_model/modeling_llama_self.py`` (``get_retained_image_token`` and ``DART_K_norm``):
at layer ``K`` (default 2) the hidden states leaving layer ``K - 1`` are passed through the final norm; the
keys of layer ``K - 1`` (all heads concatenated) give pivots: the ``pivot_image_token`` visual tokens and
the ``pivot_text_token`` text tokens after the image with the largest key L1 norm; for every pivot, in turn,
the ``TOKEN_TOPK`` not yet chosen visual tokens with the lowest cosine similarity to it (in the normed
hidden space) are kept; text pivots are not part of the kept set; the defaults for LLaVA-1.5 are 4 + 4
pivots. Kept tokens keep their original positions.

Budget: exactly ``n_keep`` visual tokens survive layer K: the image pivots plus
``n_keep - pivot_image_token`` tokens shared over the pivots (``floor`` each, the remainder to the first
pivots). Pivots are visited in the order of their position in the sequence.

On LLaVA-NeXT the image span is every packed tile token (newline tokens included), as in the references'
LLaVA-NeXT runs.

Deviations: the reference keeps ``pivot_image_token + TOKEN_TOPK * (pivots)`` tokens with ``TOKEN_TOPK =
max_num_trunction // pivots`` (132 for its "128"), and iterates a Python ``set`` of pivots (an order that is
an implementation detail); here the count is exactly the budget and the order is by position. Keys are taken
after RoPE, as cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenbench.errors import TokenbenchError
from tokenbench.families.vlm import LLMContext, LLMStageMethod
from tokenbench.registry import register_method


def dart_select(hidden: torch.Tensor, keys: torch.Tensor, visual: slice, n_keep: int, pivot_image: int,
                pivot_text: int) -> torch.Tensor:
    """DART's rule on one sequence: ``hidden`` ``(L, D)`` (normed), ``keys`` ``(L, H*d)``; returns the kept
    visual indices (relative to ``visual.start``), ``n_keep`` of them, sorted."""
    n_visual = visual.stop - visual.start
    pivot_image = min(pivot_image, n_keep, n_visual)
    norms = keys.float().abs().sum(dim=-1)  # L1 norm of every token's keys
    img_piv = norms[visual].topk(pivot_image).indices + visual.start
    text_norms = norms[visual.stop:]
    n_txt = min(pivot_text, int(text_norms.numel()))
    txt_piv = text_norms.topk(n_txt).indices + visual.stop if n_txt else img_piv.new_empty(0)
    pivots = torch.cat([img_piv, txt_piv]).sort().values
    kept = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    kept[img_piv] = True
    available = torch.zeros_like(kept)
    available[visual] = True
    available[img_piv] = False
    quota = n_keep - pivot_image
    n_piv = int(pivots.numel())
    share = [quota // n_piv + (1 if i < quota % n_piv else 0) for i in range(n_piv)] if n_piv else []
    normed = F.normalize(hidden.float(), dim=-1)
    for p, take in zip(pivots.tolist(), share):
        if take == 0:
            continue
        sim = normed[visual] @ normed[p]  # (n_visual,)
        sim = sim.masked_fill(~available[visual], float("inf"))
        chosen = (-sim).topk(take).indices + visual.start  # the least similar (least duplicated) tokens
        kept[chosen] = True
        available[chosen] = False
    return kept[visual].nonzero().flatten()


@register_method("dart", family="vlm")
@dataclass
class DART(LLMStageMethod):
    """Pivots by key L1 norm at layer ``prune_layer - 1``; per pivot, keep the visual tokens least similar to it."""

    pivot_image_token: int = 4  # visual pivots (largest key L1 norm)
    pivot_text_token: int = 4  # text pivots after the image (largest key L1 norm)

    def validate(self) -> None:
        super().validate()
        self.check_int("pivot_image_token", 0)
        self.check_int("pivot_text_token", 0)
        if self.pivot_image_token + self.pivot_text_token == 0:
            raise TokenbenchError("method 'dart': needs at least one pivot (pivot_image_token + pivot_text_token)")

    def select(self, ctx: LLMContext) -> torch.Tensor:
        hidden = ctx.norm(ctx.hidden)
        keys = ctx.prev_keys  # (B, Hkv, L, d)
        b, h, length, d = keys.shape
        flat = keys.permute(0, 2, 1, 3).reshape(b, length, h * d)
        # if the visual pivots take the whole budget, there is nothing left to share
        return torch.stack([dart_select(hidden[i], flat[i], ctx.visual, ctx.n_keep, self.pivot_image_token,
                                        self.pivot_text_token) for i in range(b)])
