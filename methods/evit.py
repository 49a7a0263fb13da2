"""EViT: keep the tokens the class token attends to most, fuse the others into one token.

Liang, Ge, Tong, Song, Wang, Xie. "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations", ICLR 2022 (arXiv:2202.07800). Reference code: https://github.com/youweiliang/evit
(``evit.py``: ``Attention.forward`` (top-k by [CLS] attention), ``Block.forward`` (gather the kept tokens,
fuse the rest), ``deit_*_shrink_base`` (keep rate at blocks 3, 6, 9); ``helpers.py``: ``complement_idx``).
Written independently.

At a reducing block, between attention and MLP: the attentiveness of token ``i`` is the class token's
attention to it averaged over heads (the block's own attention; here only that one row is computed). The
``left`` most attentive unprotected tokens are kept, in descending attentiveness (``topk``, sorted); the
others are fused into one new token appended at the end, ``sum_i a_i x_i`` with their attentiveness ``a_i``
as weights (no normalisation, as in the reference). A fused token of an earlier block competes like any other.

Budget: EViT's own ``keep_rate`` at the blocks in ``drop_loc`` (``left = ceil(keep_rate * T)`` with ``T`` the
unprotected tokens), or, when ``r > 0``, ToMe's budget of ``r`` tokens per block (the kept count is chosen so
the block hands ``N - r`` tokens to its MLP, the fused token included) for comparisons at equal token
counts. ``fuse_token=False`` drops the inattentive tokens instead.

Differences from the reference: every prefix token (a distillation token, registers) is protected like the
class token (the reference would rank a distillation token with the patches); a block that would keep every
token is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tokenbench.errors import TokenbenchError
from tokenbench.families.vit import LayerContext, Reduction, VisionTokenReducer
from tokenbench.registry import register_method


@register_method("evit", family="vit")
@dataclass
class EViT(VisionTokenReducer):
    """Top-k by [CLS] attention; inattentive tokens fused into one."""

    keep_rate: float = (
        1.0  # EViT's budget: fraction of unprotected tokens kept at each drop_loc block (r = 0)
    )
    drop_loc: list[int] = field(default_factory=lambda: [3, 6, 9])  # blocks that reduce under keep_rate
    fuse_token: bool = True  # fuse the inattentive tokens into one token (False: drop them)

    def validate(self) -> None:
        super().validate()
        kr = self.keep_rate
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0:
            raise TokenbenchError(f"method '{self.label}': keep_rate must be in (0, 1], got {kr!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.drop_loc):
            raise TokenbenchError(
                f"method '{self.label}': drop_loc must list block indices >= 0, got {list(self.drop_loc)!r}"
            )
        if self.r and float(kr) < 1.0:
            raise TokenbenchError(
                f"method '{self.label}': set either r (tokens per block) or keep_rate, not both"
            )

    def is_noop(self) -> bool:
        return self.r == 0 and (float(self.keep_rate) >= 1.0 or not self.drop_loc)

    def nominal_budget(self) -> dict[str, Any]:
        return {**super().nominal_budget(), "keep_rate": self.keep_rate, "drop_loc": list(self.drop_loc)}

    def max_removable(self, n_tokens: int, n_prefix: int) -> int:
        return max(0, n_tokens - n_prefix - 1 - int(self.fuse_token))  # keep one token (+ the fused one)

    def plan_layer(self, layer: int, depth: int, n_tokens: int, n_prefix: int) -> Optional[int]:
        if self.r:
            return super().plan_layer(layer, depth, n_tokens, n_prefix)
        if layer not in self.drop_loc or float(self.keep_rate) >= 1.0:
            return None
        t = n_tokens - n_prefix
        left = max(1, math.ceil(float(self.keep_rate) * t))
        if left >= t:
            return None
        return n_prefix + left + int(self.fuse_token)

    def select(self, x: torch.Tensor, ctx: LayerContext) -> Reduction:
        p = ctx.n_prefix
        if p == 0:
            raise TokenbenchError(
                f"method '{self.label}' ranks tokens by the class token's attention; this model "
                "has no class token"
            )
        left = ctx.n_out - p - int(self.fuse_token)
        attn = ctx.cls_attention()[:, p:]  # (B, T): attentiveness of each unprotected token
        order = attn.argsort(dim=-1, descending=True)  # top-k, sorted; the rest is the complement
        b = x.shape[0]
        keep = torch.cat([ctx.arange(p).expand(b, p), p + order[:, :left]], dim=1)
        if not self.fuse_token:
            return Reduction(keep=keep)
        rest = order[:, left:]
        slot = torch.full_like(rest, keep.shape[1])
        return Reduction(keep=keep, src=p + rest, dst=slot, weight=attn.gather(1, rest), extra=1)
