"""PiToMe: protect isolated tokens by an energy score, merge the tokens of large clusters.

Tran, Nguyen, Nguyen, Nguyen, Le, Xie, Sonntag, Zou, Nguyen, Niepert. "Accelerating Transformers with
Spectrum-Preserving Token Merging", NeurIPS 2024 (arXiv:2405.16148). Reference code:
https://github.com/hchautran/PiToMe (``algo/pitome/merge.py``: ``pitome_vision``, ``pitome``,
``pitome_bsm``, ``merge_wavg``; ``algo/pitome/patch/deit.py`` and ``timm.py``: the ViT patch). Written
independently.

At every block, between attention and MLP, on the unprotected tokens only (the reference excludes the class
token; here every prefix token: class, distillation, registers):

1. metric: the keys averaged over heads (as ToMe), L2-normalised; ``sim`` = cosine similarities, ``T x T``;
2. energy score (paper eq. 4): ``E_i = mean_j elu(sim_ij - margin, alpha)``: high for tokens in large
   clusters of similar tokens, low for isolated (informative) ones; the margin falls linearly over depth,
   ``margin_l = margin (1 - l / depth)`` (reference: 0.75 for DeiT, 0.9 in its AugReg patch);
3. tokens sorted by energy, descending. In the first ``ceil(bsm_layers x depth)`` blocks (reference: half)
   ToMe's bipartite matching runs on sets alternating in that order (``pitome_bsm``); in the later blocks
   the ``2r`` highest-energy tokens are split alternately into A and B, every A token merges into its most
   similar B token, and the rest — the low-energy tokens — are protected (``pitome``);
4. merging is size-weighted (``merge_wavg``); output order: prefix, unmerged or protected tokens, B tokens.

Budget: ``r`` tokens per block as in ToMe, or PiToMe's own ``ratio`` (tokens kept per block,
``r = floor(T - T * ratio)`` with ``T`` the unprotected tokens), capped at ``T // 2``. The reference ViT
patch does not pass token sizes to attention (no proportional attention); ``prop_attn`` turns it on.

Differences from the reference: prefix tokens other than the class token (DeiT's distillation token,
registers) are protected too (the reference would merge a distillation token); the ratio budget is capped so
that ``2r`` never exceeds the unprotected tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tokenbench.errors import TokenbenchError
from tokenbench.families.vit import LayerContext, Reduction, VisionTokenReducer, bipartite_match
from tokenbench.registry import register_method


@register_method("pitome", family="vit")
@dataclass
class PiToMe(VisionTokenReducer):
    """Energy-protected token merging."""

    ratio: Optional[float] = (
        None  # PiToMe's budget: fraction of unprotected tokens kept per block; overrides r
    )
    margin: float = 0.75  # energy margin at the first block; falls linearly to 0 over depth
    alpha: float = 1.0  # ELU alpha of the energy score
    bsm_layers: float = 0.5  # fraction of the first blocks that use energy-ordered bipartite matching
    prop_attn: bool = False  # add log(token size) to attention logits (the reference does not)

    def validate(self) -> None:
        super().validate()
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise TokenbenchError(
                f"method '{self.label}': ratio must be in (0, 1] (or unset), got {self.ratio!r}"
            )
        if not 0.0 <= float(self.bsm_layers) <= 1.0:
            raise TokenbenchError(
                f"method '{self.label}': bsm_layers must be in [0, 1], got {self.bsm_layers!r}"
            )

    def proportional_attention(self) -> bool:
        return self.prop_attn

    def is_noop(self) -> bool:
        return self.ratio >= 1.0 if self.ratio is not None else super().is_noop()

    def nominal_budget(self) -> dict[str, Any]:
        return {**super().nominal_budget(), "ratio": self.ratio}

    def max_removable(self, n_tokens: int, n_prefix: int) -> int:
        return max(0, (n_tokens - n_prefix) // 2)

    def plan_layer(self, layer: int, depth: int, n_tokens: int, n_prefix: int) -> Optional[int]:
        if self.ratio is None:
            return super().plan_layer(layer, depth, n_tokens, n_prefix)
        t = n_tokens - n_prefix
        r = min(math.floor(t - t * float(self.ratio)), self.max_removable(n_tokens, n_prefix))
        return n_tokens - r if r > 0 else None

    def select(self, x: torch.Tensor, ctx: LayerContext) -> Reduction:
        p, r = ctx.n_prefix, ctx.n_tokens - ctx.n_out
        t = ctx.n_tokens - p
        metric = F.normalize(ctx.metric()[:, p:], p=2, dim=-1)
        sim = metric @ metric.transpose(-1, -2)  # (B, T, T)
        margin = float(self.margin) * (1.0 - ctx.layer / ctx.depth)
        energy = F.elu(sim - margin, alpha=float(self.alpha)).mean(dim=-1)
        order = energy.argsort(dim=-1, descending=True)
        b = x.shape[0]
        prefix = ctx.arange(p).expand(b, p)
        if ctx.layer < math.ceil(float(self.bsm_layers) * ctx.depth):  # bipartite matching in energy order
            a_idx, b_idx = order[:, ::2], order[:, 1::2]
            unm, src, dst = bipartite_match(_cross(sim, a_idx, b_idx), r)
            keep = torch.cat([prefix, p + a_idx.gather(1, unm), p + b_idx], dim=1)
            return Reduction(keep=keep, src=p + a_idx.gather(1, src), dst=p + unm.shape[1] + dst)
        # energy protection: only the 2r highest-energy tokens take part in the matching
        a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
        dst = _cross(sim, a_idx, b_idx).argmax(dim=-1)
        keep = torch.cat([prefix, p + order[:, 2 * r :], p + b_idx], dim=1)
        return Reduction(keep=keep, src=p + a_idx, dst=p + (t - 2 * r) + dst)


def _cross(sim: torch.Tensor, rows_idx: torch.Tensor, cols_idx: torch.Tensor) -> torch.Tensor:
    """``sim[b, rows_idx[b, i], cols_idx[b, j]]``: ``(B, |rows|, |cols|)``."""
    out = sim.gather(1, rows_idx.unsqueeze(-1).expand(-1, -1, sim.shape[-1]))
    return out.gather(2, cols_idx.unsqueeze(1).expand(-1, rows_idx.shape[1], -1))
