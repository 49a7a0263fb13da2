"""Expected attention: the attention that future queries are expected to pay each key, from the statistics of
the prompt's queries.

Reference: kvpress ``ExpectedAttentionPress`` (NVIDIA; https://github.com/NVIDIA/kvpress,
``kvpress/presses/expected_attention_press.py``; Devoto, Jeblick, Jégou, "Expected Attention: KV Cache
Compression by Estimating Attention from Future Queries Distribution", arXiv:2510.00636). Written
independently; the rule follows kvpress's code step by step:

1. the queries of the compressed prefill, before RoPE, except those of the first ``n_sink`` positions (outlier
   "sink" tokens): their mean ``mu`` and covariance ``S`` (divided by the count), per query head;
2. ``R`` = the RoPE rotation averaged over the ``n_future_positions`` positions that follow the prompt;
   ``mu <- R mu``, ``S <- R S R^T`` (the distribution of a future query, after RoPE);
3. for a Gaussian query, ``E[exp(s q.k)] = exp(s k.mu + s^2/2 k^T S k)`` (``s`` the softmax scale:
   ``1/sqrt(d)`` for the models kvpress supports): this exponent, softmaxed over the keys that are not sinks,
   averaged over the query heads of the KV group; ``use_covariance=False`` drops the quadratic term;
4. ``use_vnorm``: times the value's L2 norm, as ``(p + epsilon) * ||v||_2``;
5. the first ``n_sink`` tokens are always kept (kvpress: max score + 1; here above every other slot, the
   earliest first).

Adaptations to the slot cache: pre-RoPE queries are recovered by un-rotating the cached post-RoPE ones with
the model's own cos/sin (``ctx.rope``; exact, also for scaled RoPE variants, where kvpress recomputes the
projection from hidden states); positions are each row's true positions, so padding queries are left out of
the statistics, padding keys out of the softmax, and the future positions follow each row's last token.
With the question inside the prefill (query-aware) its queries join the statistics. kvpress's leaderboard
entry ``expected_attention`` wraps it in Ada-KV with ``epsilon=1e-2``: here ``head_allocation="adaptive"``
and ``epsilon=0.01`` (the class defaults are kvpress's class defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod, ScoreContext
from tokenbench.registry import register_method

CHUNK = 4096  # queries un-rotated at a time while accumulating the statistics


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@register_method("expected_attention", family="kv")
@dataclass
class ExpectedAttention(KVMethod):
    """Expected attention of future queries (Gaussian model of the prompt's queries), times value norms."""

    supports_adaptive_heads: ClassVar[bool] = True

    n_future_positions: int = 512  # future positions the RoPE rotation is averaged over
    n_sink: int = 4  # first positions: always kept, and left out of the query statistics
    use_covariance: bool = True  # include the query covariance term
    use_vnorm: bool = True  # rescale by the value L2 norm
    epsilon: float = 0.0  # added to the expected attention before the value-norm rescaling

    def validate(self) -> None:
        super().validate()
        self.check_int("n_future_positions", 1)
        self.check_int("n_sink", 0)
        e = self.epsilon
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not e >= 0:
            raise TokenbenchError(f"method '{self.label}': epsilon must be a number >= 0, got {e!r}")

    def _prerope(self, ctx: ScoreContext, s: int, e: int) -> torch.Tensor:
        """Queries ``s:e`` of the forward before RoPE, float32: ``(B, Hq, e - s, D)``."""
        q = ctx.queries[:, :, s:e].float()
        cos, sin = (t.float().unsqueeze(1) for t in ctx.rope(ctx.query_positions[:, s:e]))
        return (q * cos - rotate_half(q) * sin) / (cos * cos + sin * sin)

    def query_statistics(self, ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``(B, Hq, D)`` and covariance ``(B, Hq, D, D)`` of the future queries (post-RoPE)."""
        b, _, q, d = ctx.queries.shape
        use = ctx.query_valid & (ctx.query_positions >= self.n_sink)  # (B, q)
        n = use.sum(dim=-1).clamp(min=1).view(b, 1, 1).float()
        chunks = [(s, min(q, s + CHUNK)) for s in range(0, q, CHUNK)]
        w = use.float()[:, None, :, None]  # (B, 1, q, 1)
        mu = sum((self._prerope(ctx, s, e) * w[:, :, s:e]).sum(dim=2) for s, e in chunks) / n
        cov = None
        if self.use_covariance:
            cov = 0
            for s, e in chunks:
                c = (self._prerope(ctx, s, e) - mu.unsqueeze(2)) * w[:, :, s:e]
                cov = cov + c.transpose(-1, -2) @ c
            cov = cov / n.unsqueeze(-1)
        # RoPE rotation averaged over each row's next positions: R = diag(cos) + P diag(sin), P = rotate_half
        last = ctx.query_positions.masked_fill(~ctx.query_valid, -1).amax(dim=-1, keepdim=True)
        future = last + 1 + torch.arange(self.n_future_positions, device=last.device)
        cos, sin = (t.float().mean(dim=1) for t in ctx.rope(future))  # (B, D)
        eye = torch.eye(d, device=cos.device)
        p = rotate_half(eye).T  # column j of P is rotate_half(e_j)
        r = torch.diag_embed(cos) + p * sin.unsqueeze(-2)  # (B, D, D)
        mu = torch.einsum("bij,bhj->bhi", r, mu)
        if cov is not None:
            cov = r.unsqueeze(1) @ cov @ r.transpose(-1, -2).unsqueeze(1)
        return mu, cov

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        b, h, _, d = ctx.keys.shape
        g = ctx.groups
        mu, cov = self.query_statistics(ctx)
        k = ctx.keys.float()
        s = ctx.scaling
        logits = torch.einsum("bhcd,bhgd->bhgc", k, mu.view(b, h, g, d)) * s
        if cov is not None:
            ks = torch.einsum("bhcd,bhgde->bhgce", k, cov.view(b, h, g, d, d))
            logits = logits + (ks * k.unsqueeze(2)).sum(dim=-1) * (s * s / 2)
        sink = ctx.valid & (ctx.positions < self.n_sink)
        scored = (ctx.valid & ~sink).unsqueeze(2)
        probs = logits.masked_fill(~scored, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        scores = probs.mean(dim=2)  # (B, H, C)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * ctx.values.float().norm(dim=-1)
        return ctx.keep_first(scores, sink, order=-ctx.positions)
