"""The ``vit`` family: token merging and pruning inside timm ``VisionTransformer`` models.

A method file holds only its idea: which tokens to fold together or drop at one block (``select``), and,
when it has its own notion of budget, how many tokens a block keeps (``plan_layer``). This base does the
rest, once per forward and with no per-module hooks:

- ``attach(model)`` replaces the forward of ``model.blocks`` (the ``nn.Sequential`` that timm's
  ``forward_features`` calls) for the duration of a ``with`` block; the weights, the module tree and the
  state dict are untouched, and everything before and after the blocks (patch embedding, position
  embedding, final norm, pooling, head) is timm's own code;
- each block runs as timm's ``Block``/``Attention`` do, with the reduction between attention and MLP (where
  ToMe, PiToMe and EViT all place it). Attention stays fused: ``F.scaled_dot_product_attention``, with
  proportional attention (``log`` token size added to the logits, ToMe eq. 4) either as one more key
  channel (the default on CUDA: the kernel stays the bias-free one) or as an additive ``attn_mask`` of shape
  ``(B, 1, 1, N)`` (``PROP_ATTN``); the merge metric (keys averaged over heads) and the [CLS] attention row
  (EViT) come from the block's own ``q``/``k``, so no ``N x N`` attention map is built;
- the reduction a method returns (``Reduction``: which input token seeds each output slot, which tokens are
  folded into which slot) is applied with gathers and one ``scatter_add`` to the hidden states, the token
  sizes (how many patches each token stands for) and, if asked, the source map (which input patches each
  token holds; ToMe's ``trace_source``);
- token counts are static given the input size, so a patched forward has no host synchronisation and can
  be compiled or captured in a CUDA graph; the tokens entering and leaving every block are recorded from
  the tensor shapes (``VitSession.stats``).

When the model's attention modules are switched to timm's explicit path (``attn.fused_attn = False``), the
same explicit path runs here (softmax of ``q k^T`` plus the bias), so a patched model at ``r = 0`` gives
exactly the unpatched model's logits either way.

Design follows ToMe's timm patch (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023,
arXiv:2210.09461; https://github.com/facebookresearch/ToMe, ``tome/patch/timm.py``, ``tome/merge.py``),
rewritten around fused attention and index-based merging. Written independently; nothing is copied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from tokenbench.errors import TokenbenchError
from tokenbench.method import Method

# How proportional attention reaches fused attention: "bias" passes log(size) as an additive attn_mask
# (B, 1, 1, N); "channel" appends it as one more key channel (q: a constant 1/scale, k: log(size), v: 0; heads
# padded to a multiple of 8), so SDPA keeps its bias-free kernel (on an H200 the cuDNN kernel with a bias ran
# ~3x slower per token pair than without). Exact either way up to rounding; "auto": channel on CUDA.
PROP_ATTN = "auto"

SUPPORTED = (
    "timm VisionTransformer models built from timm's pre-norm Block and Attention: ViT, DeiT "
    "(distilled too), AugReg, CLIP-style and register-token ViTs"
)


# --- what a method returns ---------------------------------------------------------------------------


@dataclass
class Reduction:
    """One block's reduction, as indices into the block's ``N`` input tokens (batch rows independent).

    Output slot ``j < K`` starts as input token ``keep[:, j]``; slots ``K .. K + extra - 1`` start empty.
    Every ``src`` token is then folded into slot ``dst``: by default the slot becomes the size-weighted mean
    of its members (ToMe's ``merge_wavg``); with ``weight`` the slot gets ``weight * x_src`` added and no
    normalisation (EViT's fused token). Tokens in neither ``keep`` nor ``src`` are dropped.
    """

    keep: torch.Tensor  # (B, K) int64: input token seeding each output slot, in output order
    src: Optional[torch.Tensor] = None  # (B, M) int64: input tokens folded into another slot
    dst: Optional[torch.Tensor] = None  # (B, M) int64: output slot of each src token, in [0, K + extra)
    weight: Optional[torch.Tensor] = None  # (B, M): additive weights instead of the size-weighted mean
    extra: int = 0  # empty output slots appended after the K seeded ones


@dataclass
class LayerContext:
    """What ``select`` may use at one block: the attention's own queries and keys, sizes, the budget."""

    layer: int  # block index
    depth: int  # number of blocks
    n_prefix: int  # leading tokens that are never merged or dropped (class, distillation, register tokens)
    n_out: int  # tokens this block must hand to its MLP (what ``plan_layer`` returned)
    q: torch.Tensor  # (B, heads, N, head_dim) queries after q_norm
    k: torch.Tensor  # (B, heads, N, head_dim) keys after k_norm
    scale: float  # attention scale (head_dim ** -0.5)
    size: Optional[torch.Tensor]  # (B, N, 1) patches per token; None while every token is one patch
    bias: Optional[torch.Tensor]  # (B, 1, 1, N) the proportional-attention bias this block used, if any
    session: VitSession = field(repr=False)
    _metric: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.k.shape[2])

    def metric(self) -> torch.Tensor:
        """ToMe's merge metric: the keys averaged over heads, ``(B, N, head_dim)``."""
        if self._metric is None:
            self._metric = self.k.mean(dim=1)
        return self._metric

    def cls_attention(self) -> torch.Tensor:
        """Attention of the first token's query to every key, averaged over heads, ``(B, N)`` (EViT's
        attentiveness). Only this one row is computed: ``B x heads x N`` logits, not ``N x N``."""
        logits = (self.q[:, :, :1] * self.scale) @ self.k.transpose(-2, -1)  # (B, H, 1, N)
        if self.bias is not None:
            logits = logits + self.bias
        return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]

    def arange(self, n: int) -> torch.Tensor:
        """``torch.arange(n)`` on the block's device, cached for the session."""
        return self.session.arange(n, self.k.device)


# --- shared selection helpers ------------------------------------------------------------------------


def bipartite_match(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching on a ``(B, |A|, |B|)`` similarity matrix (ToMe, Alg. 1): each A token's best
    B partner; the ``r`` A tokens with the most similar partners are merged into them.

    Returns ``(unmerged, src, dst)``: unmerged A indices ``(B, |A| - r)`` in descending order of their best
    similarity, merged A indices ``(B, r)`` and their B partners ``(B, r)``.
    """
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src = edge_idx[:, :r]
    return edge_idx[:, r:], src, node_idx.gather(1, src)


def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j]]`` for a ``(B, N, C)`` tensor and ``(B, M)`` indices: ``(B, M, C)``."""
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


# --- the method base ---------------------------------------------------------------------------------


@dataclass
class VisionTokenReducer(Method):
    """Base of every ViT token-reduction method.

    The budget is ToMe's: ``r`` tokens removed per block, shaped over depth by ``inflection`` (0: constant,
    -1: ToMe's "decreasing" schedule, +1 increasing), capped per block by ``max_removable``. A method with
    its own budget overrides ``plan_layer``. ``select`` is the idea; the base applies it.
    """

    family: ClassVar[str] = "vit"
    takes_budget: ClassVar[bool] = True  # False for the keep-all baseline
    batch_consistent: ClassVar[bool] = True  # a row's output does not depend on the other rows of its batch

    r: int = 0  # tokens removed per block (ToMe's r); 0 keeps every token
    inflection: float = (
        0.0  # ToMe's (r, inflection) schedule over depth: 0 constant, -1 decreasing, +1 increasing
    )
    trace_source: bool = False  # keep the source map (which input patches each token holds) for visualisation

    def validate(self) -> None:
        """Raise ``TokenbenchError`` (one line) on a bad budget. Subclasses extend it."""
        self.check_int("r", 0)
        inf = self.inflection
        if isinstance(inf, bool) or not isinstance(inf, (int, float)) or not -1.0 <= float(inf) <= 1.0:
            raise TokenbenchError(f"method '{self.label}': inflection must be in [-1, 1], got {inf!r}")

    # --- budget --------------------------------------------------------------------------------------

    def schedule(self, depth: int) -> list[int]:
        """Tokens to remove at each block before capping: ToMe's ``parse_r`` for ``(r, inflection)`` — a
        straight line from ``r (1 - inflection)`` to ``r (1 + inflection)``, truncated to integers."""
        lo = int(self.r * (1.0 - float(self.inflection)))
        hi = 2 * self.r - lo
        if depth <= 1:
            return [lo] * depth
        step = (hi - lo) / (depth - 1)
        return [int(lo + step * i) for i in range(depth)]

    def max_removable(self, n_tokens: int, n_prefix: int) -> int:
        """The most tokens one block can remove (default: all but the prefix and one token)."""
        return max(0, n_tokens - n_prefix - 1)

    def plan_layer(self, layer: int, depth: int, n_tokens: int, n_prefix: int) -> Optional[int]:
        """Tokens block ``layer`` hands to its MLP, or ``None`` to leave the block unreduced."""
        r = min(self.schedule(depth)[layer], self.max_removable(n_tokens, n_prefix))
        return n_tokens - r if r > 0 else None

    def nominal_budget(self) -> dict[str, Any]:
        return {"r": self.r, "inflection": self.inflection}

    def is_noop(self) -> bool:
        return self.r == 0

    def proportional_attention(self) -> bool:
        """Whether attention logits get ``log(size)`` added (ToMe's proportional attention)."""
        return False

    # --- the method's idea ---------------------------------------------------------------------------

    def select(self, x: torch.Tensor, ctx: LayerContext) -> Reduction:
        """Which tokens of ``x`` (``(B, N, C)``, after the block's attention) survive, merge or drop, so that
        ``ctx.n_out`` tokens remain. Prefix tokens (``ctx.n_prefix``) must stay first, in order."""
        raise NotImplementedError(f"{type(self).__name__} must implement select()")

    # --- applying it ---------------------------------------------------------------------------------

    @contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[VitSession]:
        """Patch ``model`` for the duration of the block; yields the ``VitSession``. A no-op method leaves
        the model's own forward in place (the baseline runs timm's code, unpatched)."""
        session = VitSession(self, model)
        if not self.is_noop():
            session.install()
        try:
            yield session
        finally:
            session.remove()


# --- the patched forward ----------------------------------------------------------------------------


def check_patchable(model: Any) -> None:
    """Raise ``TokenbenchError`` unless ``model`` is a timm ``VisionTransformer`` this family can patch."""
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise TokenbenchError(f"the vit family needs timm: {exc}") from None
    if not isinstance(model, VisionTransformer):
        raise TokenbenchError(
            f"cannot apply a vit method to {type(model).__name__}: the vit family patches {SUPPORTED}"
        )
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward:
            raise TokenbenchError(
                f"cannot patch {type(model).__name__}: block {i} is {type(blk).__name__}, "
                f"not timm's pre-norm Block; the vit family patches {SUPPORTED}"
            )
        attn = getattr(blk, "attn", None)
        if attn is None or type(attn).forward is not Attention.forward:
            raise TokenbenchError(
                f"cannot patch {type(model).__name__}: block {i} uses attention "
                f"{type(attn).__name__}, not timm's Attention; the vit family patches "
                f"{SUPPORTED}"
            )


def apply_reduction(
    red: Reduction, x: torch.Tensor, size: Optional[torch.Tensor], source: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Apply ``red`` to the hidden states, the token sizes and the source map; returns the three."""
    b = x.shape[0]
    if size is None:
        size = x.new_ones(b, x.shape[1], 1)  # every token is one patch (ToMe: ones_like(x[..., 0, None]))

    def seed(t: torch.Tensor) -> torch.Tensor:
        out = rows(t, red.keep)
        if red.extra:
            out = torch.cat([out, out.new_zeros(b, red.extra, t.shape[-1])], dim=1)
        return out

    if red.src is None:
        new_x, new_size = seed(x), seed(size)
    else:
        dst = red.dst.unsqueeze(-1)
        src_size = rows(size, red.src)
        new_size = seed(size).scatter_add_(1, dst, src_size)
        new_x = seed(x)
        dst_c = dst.expand(-1, -1, x.shape[-1])
        if red.weight is None:
            # The size-weighted mean of each slot's members (ToMe's merge_wavg), written as an update of the
            # slot's seed: x_slot + sum_i (s_i / s_slot) (x_i - x_seed), with s_slot the merged size. Only the
            # merged rows are touched: one pass over the hidden states (the gather above) instead of three
            # (x * s, gather, divide).
            add = (rows(x, red.src) - new_x.gather(1, dst_c)) * (src_size / new_size.gather(1, dst))
        else:  # additive (EViT): slot + sum of weight * member
            add = rows(x, red.src) * red.weight.unsqueeze(-1).to(x.dtype)
        new_x.scatter_add_(1, dst_c, add)
    if source is not None:
        new_source = seed(source)
        if red.src is not None:
            new_source = new_source.scatter_reduce_(
                1,
                red.dst.unsqueeze(-1).expand(-1, -1, source.shape[-1]),
                rows(source, red.src),
                reduce="amax",
            )
        source = new_source
    return new_x, new_size, source


class VitSession:
    """One method patched into one model: the replacement forward of ``model.blocks`` and what it saw."""

    def __init__(self, method: VisionTokenReducer, model: torch.nn.Module):
        check_patchable(model)
        self.method = method
        self.model = model
        self.blocks = list(model.blocks)
        self.depth = len(self.blocks)
        self.n_prefix = int(
            getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)
        )
        self.prop_attn = method.proportional_attention()
        self.installed = False
        self._aranges: dict[tuple[int, str], torch.Tensor] = {}
        self._constants: dict[Any, torch.Tensor] = {}
        self._state: dict[str, Any] = {}  # per-method scratch (e.g. a random generator), kept across forwards
        # what the last (Python-executed) forward saw
        self.tokens_in: list[int] = []  # tokens entering each block
        self.tokens_out: list[int] = []  # tokens after each block's reduction
        self.size: Optional[torch.Tensor] = None  # (B, N_final, 1) patches per final token
        self.source: Optional[torch.Tensor] = None  # (B, N_final, N_input) with trace_source

    # --- install / remove ----------------------------------------------------------------------------

    def install(self) -> None:
        blocks = self.model.blocks
        if "forward" in vars(blocks):
            raise TokenbenchError("this model already has a vit method attached; detach it first")
        blocks.forward = self._forward_blocks  # instance attribute: shadows nn.Sequential.forward
        self.installed = True

    def remove(self) -> None:
        if self.installed:
            vars(self.model.blocks).pop("forward", None)
            self.installed = False

    def arange(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, str(device))
        if key not in self._aranges:
            self._aranges[key] = torch.arange(n, device=device)
        return self._aranges[key]

    def constant(self, key: Any, make: Any) -> torch.Tensor:
        """A tensor that depends only on ``key`` (index patterns of a token count), made once per session."""
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def scratch(self) -> dict[str, Any]:
        """A dict a method may keep state in across forwards of this session (e.g. a seeded generator)."""
        return self._state

    # --- the forward ---------------------------------------------------------------------------------

    def _forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        method, depth, n_prefix = self.method, self.depth, self.n_prefix
        size: Optional[torch.Tensor] = None
        source: Optional[torch.Tensor] = None
        if method.trace_source:
            source = (
                torch.eye(x.shape[1], device=x.device, dtype=x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            )
        tokens_in, tokens_out = [], []
        for i, blk in enumerate(self.blocks):
            n = int(x.shape[1])
            tokens_in.append(n)
            n_out = method.plan_layer(i, depth, n, n_prefix)
            x, size, source = self._block(blk, i, x, size, source, n_out)
            tokens_out.append(int(x.shape[1]))
        self.tokens_in, self.tokens_out, self.size, self.source = tokens_in, tokens_out, size, source
        return x

    def _block(
        self,
        blk: Any,
        layer: int,
        x: torch.Tensor,
        size: Optional[torch.Tensor],
        source: Optional[torch.Tensor],
        n_out: Optional[int],
    ):
        """timm's ``Block.forward`` and ``Attention.forward`` with the reduction between attention and MLP.
        Identity modules (no layer scale, no drop path, dropout in eval) are skipped, not called."""
        attn = blk.attn
        h = blk.norm1(x)
        b, n, _ = h.shape
        heads, d = attn.num_heads, attn.head_dim
        gate = attn.gate(h).sigmoid() if attn.gate is not None else None
        log_size = size[..., 0].log() if self.prop_attn and size is not None else None
        bias = None
        if log_size is not None and attn.fused_attn and self._channel_ok(attn, x):
            # Proportional attention as one more key channel (see PROP_ATTN): q gets a constant 1/scale, k
            # gets log(size), v zero; SDPA then runs the same bias-free kernel as the unreduced model.
            w, bb = self._padded_qkv(layer, attn)
            qkv = F.linear(h, w, bb).view(b, n, 3, heads, -1)
            qkv[:, :, 1, :, d] = log_size.unsqueeze(-1).to(qkv.dtype)
            qp, kp, vp = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(
                qp, kp, vp, scale=attn.scale, dropout_p=attn.attn_drop.p if attn.training else 0.0
            )[..., :d]
            q, k = qp[..., :d], kp[..., :d]
        else:
            qkv = attn.qkv(h).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = _call(attn.q_norm, q), _call(attn.k_norm, k)
            if log_size is not None:
                bias = log_size.to(q.dtype)[:, None, None, :]  # proportional attention, (B, 1, 1, N)
            if attn.fused_attn:
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
                )
            else:  # timm's explicit path
                a = (q * attn.scale) @ k.transpose(-2, -1)
                if bias is not None:
                    a = a + bias
                o = _call(attn.attn_drop, a.softmax(dim=-1)) @ v
        o = _call(attn.norm, o.transpose(1, 2).reshape(b, n, attn.attn_dim))
        if gate is not None:
            o = o * gate
        x = x + _call(blk.drop_path1, _call(blk.ls1, _call(attn.proj_drop, attn.proj(o))))

        if n_out is not None:
            if log_size is not None and bias is None:
                bias = log_size.to(q.dtype)[:, None, None, :]
            ctx = LayerContext(
                layer=layer,
                depth=self.depth,
                n_prefix=self.n_prefix,
                n_out=n_out,
                q=q,
                k=k,
                scale=attn.scale,
                size=size,
                bias=bias,
                session=self,
            )
            red = self.method.select(x, ctx)
            x, size, source = apply_reduction(red, x, size, source)
        return x + _call(blk.drop_path2, _call(blk.ls2, blk.mlp(blk.norm2(x)))), size, source

    def _channel_ok(self, attn: Any, x: torch.Tensor) -> bool:
        impl = PROP_ATTN
        if impl == "auto":
            impl = "channel" if x.is_cuda else "bias"
        return (
            impl == "channel"
            and type(attn.q_norm) is torch.nn.Identity
            and type(attn.k_norm) is torch.nn.Identity
        )

    def _padded_qkv(self, layer: int, attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's qkv projection with every head widened to a multiple of 8 channels (made once per
        session): extra q channels are 0 except a constant 1/scale, extra k and v channels 0."""
        key = ("padded_qkv", layer)
        if key not in self._constants:
            heads, d = attn.num_heads, attn.head_dim
            dp = (d + 1 + 7) // 8 * 8
            w = attn.qkv.weight.detach()
            bias = attn.qkv.bias.detach() if attn.qkv.bias is not None else w.new_zeros(w.shape[0])
            wp = w.new_zeros(3, heads, dp, w.shape[1])
            wp[:, :, :d] = w.view(3, heads, d, -1)
            bp = bias.new_zeros(3, heads, dp)
            bp[:, :, :d] = bias.view(3, heads, d)
            bp[0, :, d] = 1.0 / attn.scale
            self._constants[key] = (wp.view(3 * heads * dp, -1), bp.view(-1))
        return self._constants[key]

    # --- what the runner and the tests read -----------------------------------------------------------

    def achieved_keep_ratio(self) -> float:
        """Token work kept: per block, the mean of the tokens its attention saw and the tokens its MLP saw,
        relative to the unreduced count; averaged over blocks. 1.0 before any forward or when nothing was
        removed."""
        if not self.tokens_in:
            return 1.0
        n0 = self.tokens_in[0]
        return sum((a + b) / (2 * n0) for a, b in zip(self.tokens_in, self.tokens_out)) / len(self.tokens_in)

    def stats(self, n_tokens: Optional[int] = None) -> dict[str, Any]:
        """The compression record of the last forward (plain JSON types). ``n_tokens``: the model's input
        token count, for a session whose method never patched (the no-op baseline)."""
        tokens_in = self.tokens_in or ([n_tokens] * self.depth if n_tokens else [])
        tokens_out = self.tokens_out or list(tokens_in)
        return {
            "input_tokens": tokens_in[0] if tokens_in else n_tokens,
            "tokens_in_per_layer": tokens_in,
            "tokens_per_layer": tokens_out,  # kept after each block's reduction
            "final_tokens": tokens_out[-1] if tokens_out else n_tokens,
            "achieved_keep_ratio": self.achieved_keep_ratio(),
        }

    def patch_groups(self) -> torch.Tensor:
        """With ``trace_source``: for every input token, the index of the final token that holds it,
        ``(B, N_input)`` — ToMe's visualisation colours patches by this."""
        if self.source is None:
            raise TokenbenchError("patch_groups needs trace_source=true and a forward")
        return self.source.argmax(dim=1)


def _call(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, skipped where it is the identity (``nn.Identity``, dropout in eval)."""
    if type(module) is torch.nn.Identity or (isinstance(module, torch.nn.Dropout) and not module.training):
        return x
    return module(x)


def input_tokens(model: Any) -> int:
    """Tokens a timm ViT feeds its first block for its configured input size."""
    grid = getattr(model.patch_embed, "grid_size", None)
    n = int(math.prod(grid)) if grid is not None else int(model.patch_embed.num_patches)
    return n + int(getattr(model, "num_prefix_tokens", 0))
