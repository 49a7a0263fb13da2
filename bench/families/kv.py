"""The ``kv`` family: KV-cache eviction on Hugging Face causal LMs.

A method file holds only its idea, a ``score(ctx)``: per cached token, per layer and per KV head, how much it
is worth keeping (higher = keep). This base does everything else:

- **where it runs.** ``attach`` switches the model to the ``tokenbench_kv`` attention function
  (``tokenbench.kv_attention``) over an ``EvictionCache`` (``tokenbench.kv_cache``): per-layer slot buffers
  with a validity mask and the true position of every token. After a marked forward's attention has run, the
  session builds a ``ScoreContext`` (queries, keys, values, validity, positions, and helpers that compute only
  the attention a method needs: the last queries' weights, column sums over all queries, chunked, or the
  decode step's weights, which decode attention yields anyway), asks the method for scores, and keeps the best.
- **budgets.** ``keep_ratio`` or ``n_keep`` of each row's compressible segment (padding is never part of it),
  per layer (``layer_budget``, e.g. PyramidKV) and per KV head: ``head_allocation="uniform"`` gives every
  head the layer budget, ``"adaptive"`` (Ada-KV) lets heads compete for the layer's total, with a floor.
- **phases.** ``prefill``: one eviction after the compressed prefill, the survivors gathered into a smaller
  buffer (memory really freed). ``decode``: the cache is held at capacity while generating — each step writes
  the new token into a free slot, attends, scores, and frees the lowest-scoring slot, all on the device with
  static shapes, so the decode step can be captured in a CUDA graph. ``both``: the two.
- **GQA.** The cache stays at KV-head granularity; query-head scores are folded onto KV heads
  (``ctx.kv_heads``) by the method, which defines how (mean, max, ...).

Design follows NVIDIA kvpress (``ScorerPress``: per-head top-k over scores after the prefill; explicit
positions after compression; https://github.com/NVIDIA/kvpress) and Ada-KV (Feng et al., 2024,
arXiv:2407.11550, https://github.com/FFY0/AdaKV) for the adaptive head budgets. Written independently.

Usage (what ``tokenbench.lm.LMRunner`` does)::

    cache = EvictionCache(n_layers, reserve=...)
    with method.attach(model, cache) as session:
        cache.set_inputs(positions, valid)
        with session.compressing(segment_mask, reserve=...):   # marked: evict after this forward
            model(input_ids=..., position_ids=positions, past_key_values=cache)
        ...                                                    # plain forwards: nothing evicted
        with session.decoding(steps):                          # decode steps (decode-phase eviction)
            ...
    session.stats()
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from tokenbench import kv_attention
from tokenbench.errors import TokenbenchError
from tokenbench.kv_cache import _FAR, EvictionCache, EvictionLayer
from tokenbench.method import Method

PHASES = ("prefill", "decode", "both")
HEAD_ALLOCATIONS = ("uniform", "adaptive")


def first_free(valid: torch.Tensor) -> torch.Tensor:
    """The first empty slot of every row/head, ``(B, H)``: where the next decode step writes."""
    return (~valid).to(torch.uint8).argmax(dim=-1)


def evict_lowest(scores: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """One steady-state decode eviction, in place: every row/head holding more than ``cap`` (``(B, 1)``) live
    tokens frees its lowest-scoring live slot (``valid`` cleared, ``pos`` set to the empty marker). Returns the
    next write slot per row/head, ``(B, H)``: the first free one. A pure tensor function so that
    ``measure.fuse_kernels`` can compile it into a few kernels (eager: ~15 small ones per layer and step); the
    three reductions over the slots (live count, lowest score, first free slot) read the same rows, so they can
    share one."""
    b, h, c = valid.shape
    # the reductions in two stages, over s chunks of each row: one program per row/head is 64 programs at
    # batch 8 x 8 KV heads, and they also run the scoring fused before them (H200: a third of the SMs idle)
    s = _row_chunks(c)
    v = valid.view(b, h, s, c // s)
    over = v.sum(dim=-1).sum(dim=-1) > cap  # (B, H)
    low, where = scores.float().masked_fill(~valid, float("inf")).view(b, h, s, c // s).min(dim=-1)
    chunk = low.argmin(dim=-1, keepdim=True)  # the first chunk holding the minimum: argmin's first index
    victim = (where.gather(-1, chunk) + chunk * (c // s)).squeeze(-1)
    slots = torch.arange(c, device=valid.device).view(s, c // s)
    free = torch.where(v, c, slots).amin(dim=-1).amin(dim=-1)  # before this eviction; C: the row is full
    # one element per row/head, written by advanced indexing (index_put): inductor lowers a tensor-valued
    # scatter_ into bool/int64 buffers on a GPU as an eager fallback kernel each
    at = _rows_heads(b, h, valid.device) + (victim,)
    was = valid[at]
    evicted = was & over
    valid[at] = was & ~evicted
    pos[at] = torch.where(evicted, _FAR, pos[at])
    # (a full row is always over its cap, since capacity > cap; the clamp only keeps a write in bounds)
    return torch.where(evicted, torch.minimum(victim, free), free).clamp(max=c - 1)


ROW_CHUNKS = 16  # evict_lowest's first-stage chunks per row (fewer when the slots do not divide)
MIN_CHUNK = 256  # ... and slots per chunk at least


def _row_chunks(c: int) -> int:
    s = ROW_CHUNKS
    while s > 1 and (c % s or c // s < MIN_CHUNK):
        s //= 2
    return s


def _rows_heads(b: int, h: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(b, device=device).view(b, 1), torch.arange(h, device=device).view(1, h)


def decode_evict(method: KVMethod, ctx: ScoreContext, cap: torch.Tensor) -> torch.Tensor:
    """A steady-state decode step of a decode-time method: the slot this step wrote starts with a clean method
    state, then the method's ``score`` and ``evict_lowest``, in place on the layer. One function so that
    ``measure.fuse_kernels`` compiles the method's scoring together with the eviction (eager,
    tova/h2o/scissorhands run 15-40 small kernels per layer and step)."""
    written = _rows_heads(*ctx.valid.shape[:2], ctx.valid.device) + (ctx.layer.slot,)
    for t in ctx.states():
        t[written] = 0
    return evict_lowest(method.score(ctx), ctx.valid, ctx.positions, cap)


EVICT_IMPL = [decode_evict]  # tokenbench.fused_decode swaps in a compiled version

_UNROLL_GROUPS = 8  # ScoreContext.kv_heads: compiled, GQA groups up to this size are folded slice by slice
RAISED = 1e30  # ScoreContext.keep_first's score for protected slots (below the Ada-KV floor's boost, 3e38)
ADA_FLOOR = 0.2  # Ada-KV's safeguard: every head keeps at least this fraction of the uniform head budget


@dataclass
class ScoreContext:
    """What ``KVMethod.score`` sees for one layer. Shapes: ``B`` rows, ``H`` KV heads, ``Hq`` query heads,
    ``C`` slots, ``q`` tokens of this forward, ``D`` head dim."""

    module: torch.nn.Module  # the attention module (``layer_idx``, projections, ``head_dim``)
    layer_idx: int
    n_layers: int
    phase: str  # "prefill" (after the compressed forward) or "decode" (after a decode step)
    keys: torch.Tensor  # (B, H, C, D) post-RoPE, as cached
    values: torch.Tensor  # (B, H, C, D)
    valid: torch.Tensor  # (B, H, C) bool: slot holds a live token
    positions: torch.Tensor  # (B, H, C) int64: true position of each slot's token
    queries: torch.Tensor  # (B, Hq, q, D) post-RoPE queries of this forward
    query_positions: torch.Tensor  # (B, q)
    query_valid: torch.Tensor  # (B, q) bool (False: left padding)
    scaling: float  # softmax scale of the attention
    layer: EvictionLayer = field(repr=False)
    rotary: Any = field(default=None, repr=False)  # the model's rotary embedding module, if any
    attn_weights: Optional[torch.Tensor] = field(default=None, repr=False)  # decode: (B, Hq, 1, C) float32
    # or, from the Triton decode kernel, its masked logits (B, Hq, C) and their logsumexp (B, Hq): the weights
    # are then formed where a method reads them, inside its compiled scoring (one pass fewer over them)
    attn_logits: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    step: int = 0  # evictions this layer had before in this session (frozen inside a captured graph)
    # what this eviction compares, for methods whose rule depends on it (e.g. a recent window of the budget):
    candidates: Optional[torch.Tensor] = field(default=None, repr=False)  # (B, H, C) bool; None: all valid
    budget: Optional[torch.Tensor] = None  # (B, 1) int64: candidate slots each row/head keeps; None: unknown

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def kv_heads(self, x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Fold ``(B, Hq, ...)`` onto KV heads ``(B, H, ...)`` (``mean`` or ``max`` over each GQA group)."""
        b, hq = x.shape[:2]
        g = x.view(b, hq // self.groups, self.groups, *x.shape[2:])
        if torch.compiler.is_compiling() and self.groups <= _UNROLL_GROUPS:
            # compiled (decode steps under measure.fuse_kernels): inductor gives a mean over this strided axis a
            # looped reduction kernel of its own (24 us per layer for scissorhands at 16k slots, H200); as a sum
            # of slices it is pointwise and fuses into the kernel that reads it
            parts = g.unbind(2)
            out = parts[0]
            for part in parts[1:]:
                out = out + part if reduce == "mean" else torch.maximum(out, part)
            return out / self.groups if reduce == "mean" else out
        return g.mean(dim=2) if reduce == "mean" else g.amax(dim=2)

    def _weights(self, q_idx: slice, keys_upto: Optional[int] = None) -> torch.Tensor:
        b, hq, _, d = self.queries.shape
        h, g = self.keys.shape[1], self.groups
        q = self.queries[:, :, q_idx]
        w = q.shape[2]
        n = self.keys.shape[2] if keys_upto is None else keys_upto
        keys = self.keys[:, :, :n]
        scores = torch.matmul(q.reshape(b, h, g * w, d), keys.transpose(-1, -2)).float() * self.scaling
        mask = kv_attention.causal_mask(self.valid[..., :n], self.positions[..., :n],
                                        self.query_positions[:, q_idx])
        probs = kv_attention.masked_softmax(scores.view(b, h, g, w, -1), mask.unsqueeze(2))
        probs = probs * self.query_valid[:, q_idx].view(b, 1, 1, w, 1)  # padding queries weigh nothing
        return probs.view(b, hq, w, -1)

    def _step_weights(self) -> Optional[torch.Tensor]:
        """The weights the attention itself produced (a decode step), ``(B, Hq, 1, C)``, or None."""
        if self.attn_logits is not None:
            logits, lse = self.attn_logits
            return (logits - lse.unsqueeze(-1)).exp().unsqueeze(2)
        return self.attn_weights

    def attention(self, last: Optional[int] = None) -> torch.Tensor:
        """Softmax attention ``(B, Hq, w, C)`` (float32) of this forward's last ``last`` queries (all if
        None); at a decode step, that step's weights. Padding queries have all-zero rows."""
        step = self._step_weights()
        if step is not None and (last is None or last >= step.shape[2]):
            return step
        q = self.queries.shape[2]
        return self._weights(slice(q - min(q, last or q), q))

    def accumulated_attention(self, chunk: Optional[int] = None) -> torch.Tensor:
        """Attention each slot received, summed over all of this forward's (valid) queries: ``(B, Hq, C)``,
        computed in query chunks (by default sized to ~1 GiB of float32 weights) so the ``q x C`` matrix
        never exists whole."""
        step = self._step_weights()
        if step is not None:
            return step.sum(dim=2)
        b, hq, q, _ = self.queries.shape
        if kv_attention.accumulated_backend(self.keys.device) == "triton" and self.keys.shape[2] >= q:
            from tokenbench import kv_accumulated_triton

            if kv_accumulated_triton.supported(self.queries, self.keys):
                return kv_accumulated_triton.accumulated_attention(
                    self.queries, self.keys, self.valid, self.positions, self.query_positions, self.query_valid,
                    self.scaling)
        if chunk is None:
            chunk = max(1, min(q, (1 << 30) // max(1, b * hq * self.keys.shape[2] * 4)))
        total = torch.zeros(b, hq, self.keys.shape[2], dtype=torch.float32, device=self.keys.device)
        first = self.keys.shape[2] - q  # this forward's tokens fill the last q slots, in order
        for s in range(0, q, chunk):
            e = min(q, s + chunk)
            # keys after the chunk's last query are in its future (masked): leave them out, half the work
            total[..., : first + e] += self._weights(slice(s, e), keys_upto=first + e if first >= 0 else None).sum(2)
        return total

    @classmethod
    def synthetic(cls, queries: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor] = None,
                  positions: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
                  query_positions: Optional[torch.Tensor] = None, phase: str = "prefill",
                  attn_weights: Optional[torch.Tensor] = None, layer_idx: int = 0, n_layers: int = 1,
                  scaling: Optional[float] = None, step: int = 0, candidates: Optional[torch.Tensor] = None,
                  budget: Optional[torch.Tensor | int] = None) -> ScoreContext:
        """A context from hand-built tensors (tests of a method's idea, no model). Defaults: every slot
        live, slot ``i`` at position ``i``, the queries the last ``q`` positions."""
        b, h, c, d = keys.shape
        q = queries.shape[2]
        dev = keys.device
        positions = positions if positions is not None else torch.arange(c, device=dev).expand(b, h, c)
        valid = valid if valid is not None else torch.ones(b, h, c, dtype=torch.bool, device=dev)
        qpos = query_positions if query_positions is not None else torch.arange(c - q, c, device=dev).expand(b, q)
        layer = EvictionLayer(None, layer_idx)  # holds the method state only
        layer.keys = keys
        return cls(module=None, layer_idx=layer_idx, n_layers=n_layers, phase=phase, keys=keys,
                   values=values if values is not None else torch.ones_like(keys), valid=valid,
                   positions=positions, queries=queries, query_positions=qpos,
                   query_valid=torch.ones(b, q, dtype=torch.bool, device=dev),
                   scaling=scaling if scaling is not None else d ** -0.5, layer=layer,
                   attn_weights=attn_weights, step=step, candidates=candidates,
                   budget=torch.full((b, 1), budget, device=dev) if isinstance(budget, int) else budget)

    def newest(self) -> torch.Tensor:
        """``(B, H, 1)``: the position of the newest candidate slot (-1 where there is none). At a decode
        step that is the step's own token, written before scoring (decode queries are never padding), so no
        reduction over the slots is needed."""
        if self.phase == "decode" and self.candidates is None:
            return self.query_positions[:, -1].view(-1, 1, 1).expand(*self.valid.shape[:2], 1)
        cand = self.valid if self.candidates is None else self.candidates
        return self.positions.masked_fill(~cand, -1).amax(dim=-1, keepdim=True)

    def recent(self, n: torch.Tensor | int) -> torch.Tensor:
        """``(B, H, C)`` bool: the candidate slots among the last ``n`` positions of the candidates (``n``: an
        int or a ``(B, 1)`` tensor). Positions are contiguous, so these are the ``n`` newest candidates unless
        some of them were evicted before. On the device, no sync."""
        cand = self.valid if self.candidates is None else self.candidates
        newest = self.newest()
        n = torch.as_tensor(n, device=newest.device).view(-1, 1, 1) if not isinstance(n, int) else n
        return cand & (self.positions > newest - n)

    def state(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A per-slot tensor ``(B, H, C)`` that persists across forwards of this session (e.g. accumulated
        attention). It follows its slots through evictions, and a freshly written slot starts at 0."""
        t = self.layer.state.get(name)
        if t is None:
            t = torch.zeros(self.layer.keys.shape[:3], dtype=dtype, device=self.keys.device)
            self.layer.state[name] = t
        return t[:, :, : self.keys.shape[2]]

    def states(self) -> tuple[torch.Tensor, ...]:
        """Every per-slot state of this layer, over the slots scored (``decode_evict`` zeroes a written slot's)."""
        return tuple(t[:, :, : self.keys.shape[2]] for t in self.layer.state.values())

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of the model's rotary embedding at ``positions`` (``(B, n)``): ``(B, n, D)``."""
        if self.rotary is None:
            raise TokenbenchError("this model has no rotary embedding module")
        return self.rotary(self.keys[:, 0, :1], positions)

    def keep_first(self, scores: torch.Tensor, mask: torch.Tensor,
                   order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scores`` ``(B, H, C)`` with the slots in ``mask`` raised above every live slot of their row (all
        heads, so also under Ada-KV allocation): any budget takes them first, the higher ``order`` first
        (e.g. a window, ``order=positions``; sinks, ``order=-positions``). Distinct values, so no ties.
        ``order=None``: all raised to one value, ``RAISED``, no sort (for a mask never larger than what is
        kept; a constant, so no reduction over the row: live scores stay far below it)."""
        s = scores.float()
        if order is None:
            return torch.where(mask, RAISED, s)
        top = s.masked_fill(~self.valid | mask, 0).abs().amax(dim=(1, 2), keepdim=True) + 1
        rank = order.float().masked_fill(~mask, float("-inf")).argsort(dim=-1).argsort(dim=-1)
        rank = rank - (~mask).sum(dim=-1, keepdim=True)  # 0 for the lowest ``order`` among ``mask``
        return torch.where(mask, top + rank.float(), s)


@dataclass
class KVMethod(Method):
    """Base of every KV-cache method. A subclass implements ``score`` and, if it can evict during decoding,
    widens ``supported_phases``."""

    family: ClassVar[str] = "kv"
    supported_phases: ClassVar[tuple[str, ...]] = ("prefill",)  # which of PHASES the method implements
    default_phase: ClassVar[str] = "prefill"  # the phase used when ``phase`` is not set
    takes_budget: ClassVar[bool] = True  # False for the keep-all baseline
    supports_adaptive_heads: ClassVar[bool] = False  # scores comparable across heads (Ada-KV allocation)

    keep_ratio: float = 1.0  # fraction of the compressed segment's tokens kept, in (0, 1]
    n_keep: Optional[int] = None  # absolute token budget for the segment; overrides keep_ratio when set
    # True: the question is inside the compressed prefill; False: context compressed alone, question fed after
    query_aware: bool = False
    phase: Optional[str] = None  # when to evict: prefill | decode | both; None = the method's default_phase
    head_allocation: str = "uniform"  # uniform: every KV head keeps the budget; adaptive: Ada-KV allocation

    # --- configuration ---------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``TokenbenchError`` (one line) on a bad budget, phase or allocation. Subclasses extend it."""
        kr = self.keep_ratio
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not (0.0 < float(kr) <= 1.0):
            raise TokenbenchError(f"method '{self.label}': keep_ratio must be in (0, 1], got {kr!r}")
        self.check_int("n_keep", 1, optional=True)
        if self.phase is not None and self.phase not in self.supported_phases:
            why = "unknown phase" if self.phase not in PHASES else "unsupported phase"
            raise TokenbenchError(f"method '{self.label}': {why} '{self.phase}'; it supports "
                                  f"{', '.join(self.supported_phases)}")
        if self.head_allocation not in HEAD_ALLOCATIONS:
            raise TokenbenchError(f"method '{self.label}': head_allocation must be one of "
                                  f"{', '.join(HEAD_ALLOCATIONS)}, got {self.head_allocation!r}")
        if self.head_allocation == "adaptive" and not self.supports_adaptive_heads:
            raise TokenbenchError(f"method '{self.label}': head_allocation=adaptive needs scores comparable "
                                  "across heads, which this method does not define")

    @property
    def resolved_phase(self) -> str:
        return self.phase or self.default_phase

    @property
    def evicts_at_prefill(self) -> bool:
        return not self.is_noop() and self.resolved_phase in ("prefill", "both")

    @property
    def evicts_at_decode(self) -> bool:
        return not self.is_noop() and self.resolved_phase in ("decode", "both")

    def budget(self, segment_len: int) -> int:
        """Tokens of a segment of ``segment_len`` tokens that survive the compressed prefill:
        ``n_keep`` (capped at the segment length) when set, else ``floor(keep_ratio * segment_len)``, >= 1."""
        if segment_len <= 0:
            return 0
        if self.n_keep is not None:
            return min(int(self.n_keep), segment_len)
        return max(1, min(segment_len, int(math.floor(float(self.keep_ratio) * segment_len + 1e-9))))

    def decode_budget(self, segment_len: int) -> int:
        """Tokens the segment may occupy during decoding: ``n_keep`` as given (not capped, so a budget above
        the prompt lets the cache grow up to it), else the prefill budget."""
        return int(self.n_keep) if self.n_keep is not None else self.budget(segment_len)

    def layer_budget(self, budget: int, segment_len: int, layer_idx: int, n_layers: int) -> int:
        """This layer's share of a row's ``budget`` (the same for every layer unless a method says
        otherwise; the mean over layers should stay ``budget``)."""
        return budget

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio, "n_keep": self.n_keep, "phase": self.resolved_phase}

    def is_noop(self) -> bool:
        return self.n_keep is None and float(self.keep_ratio) >= 1.0

    # --- the method's idea ---------------------------------------------------------------------------

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """Per-slot scores ``(B, H, C)``; higher = keep. Only the compressible live slots are compared;
        the base ignores the rest. Must not sync with the host at decode (the step may be graph-captured)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    # --- applying it ---------------------------------------------------------------------------------

    @contextmanager
    def attach(self, model: torch.nn.Module, cache: EvictionCache) -> Iterator[KVSession]:
        """Run ``model`` through the eviction attention for the duration of the block."""
        session = KVSession(self, model, cache)
        session.install()
        try:
            yield session
        finally:
            session.remove()


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not mods:
        raise TokenbenchError(f"no attention layers with a layer_idx found in {type(model).__name__}; "
                              "the kv family needs a transformers decoder-only LM")
    return sorted(mods, key=lambda m: int(m.layer_idx))


def _rotary(model: torch.nn.Module) -> Any:
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def check_model(model: torch.nn.Module) -> None:
    """A clear error for a model the eviction cache cannot serve."""
    cfg = getattr(model, "config", None)
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or getattr(cfg, "use_sliding_window", False):
        raise TokenbenchError(f"{type(model).__name__} has sliding-window or non-attention layers "
                              f"({sorted(set(types))}); the kv family supports full-attention decoders only")


class KVSession:
    """One method on one model and one cache, for one generation; also what it measured."""

    def __init__(self, method: KVMethod, model: torch.nn.Module, cache: EvictionCache):
        self.method = method
        self.model = model
        self.cache = cache
        self.modules = attention_modules(model)
        self.n_layers = len(self.modules)
        self.rotary = _rotary(model)
        self._saved_impl: Optional[str] = None
        self._mode: Optional[str] = None  # None (plain) | "prefill" | "decode"
        self._segment: Optional[torch.Tensor] = None  # (B, q) bool: compressible tokens of the marked forward
        self._reserve = 0
        self._steps: dict[int, int] = {}
        self._decode_cap: Optional[torch.Tensor] = None  # (B, 1) live tokens a row may hold while decoding
        self._bulk_done: set[int] = set()
        # measurements (host values, taken outside the decode steps)
        self.segment_lens: Optional[list[int]] = None  # per row
        self.outside_lens: Optional[list[int]] = None  # per row: live tokens outside the segment at decode
        self.kept: dict[int, torch.Tensor] = {}  # per layer: (B, H) segment tokens after the compressed prefill
        self.decode_caps: Optional[list[int]] = None
        self.prefill_evictions = 0

    @property
    def needs_decode_weights(self) -> bool:
        """Decode steps must produce attention weights (the method scores with them while decoding)."""
        return self._mode == "decode" and self.method.evicts_at_decode

    # --- install / remove ----------------------------------------------------------------------------

    def install(self) -> None:
        check_model(self.model)
        kv_attention.register()
        self._saved_impl = self.model.config._attn_implementation
        self.model.config._attn_implementation = kv_attention.NAME
        kv_attention._ACTIVE.append(self)

    def remove(self) -> None:
        if self in kv_attention._ACTIVE:
            kv_attention._ACTIVE.remove(self)
        self.model.config._attn_implementation = self._saved_impl

    def adopt(self, parts: list[KVSession]) -> None:
        """Take over what the prefill sessions of these rows (in order) measured: decoding continues here."""
        self.segment_lens = [n for p in parts for n in (p.segment_lens or [])]
        self.kept = {i: torch.cat([p.kept[i] for p in parts]) for i in parts[0].kept}
        self.prefill_evictions = max(p.prefill_evictions for p in parts)
        self._steps = dict(parts[0]._steps)

    # --- marking forwards ----------------------------------------------------------------------------

    @contextmanager
    def compressing(self, segment: torch.Tensor, reserve: int = 0) -> Iterator[KVSession]:
        """The forward inside the block is the compressed prefill: ``segment`` ``(B, q)`` marks its
        compressible tokens (a row's context, never padding); after eviction each layer keeps room for
        ``reserve`` more tokens."""
        self._mode, self._segment, self._reserve = "prefill", segment.to(torch.bool), int(reserve)
        self.segment_lens = [int(x) for x in self._segment.sum(dim=1).tolist()]
        try:
            yield self
        finally:
            self._mode, self._segment = None, None

    @contextmanager
    def decoding(self, steps: int) -> Iterator[KVSession]:
        """Decode steps follow (``steps`` at most). With a decode phase each row holds its segment's decode
        budget plus the live tokens outside the segment (template, question) seen so far."""
        first = self.cache.layers[0]
        live = first.valid.sum(dim=-1)[:, 0] if first.valid is not None else None  # (B,) before decoding
        seg = self.segment_lens
        if live is not None:
            kept0 = self.kept.get(0)
            seg_live = kept0[:, 0] if kept0 is not None else torch.tensor(seg or [0] * live.shape[0],
                                                                         device=live.device)
            self.outside_lens = [int(x) for x in (live - seg_live).tolist()]
        if self.method.evicts_at_decode and seg is not None and self.outside_lens is not None:
            caps = [self.method.decode_budget(s) + o for s, o in zip(seg, self.outside_lens)]
            self.decode_caps = caps
            self._decode_cap = torch.tensor(caps, device=first.keys.device).unsqueeze(1)
            need = max(caps) + 1
            for layer in self.cache.layers:
                layer.start_decoding(max(1, need - layer.fill))
        else:
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.start_decoding(steps, advance=True)
        self._mode = "decode"
        try:
            yield self
        finally:
            self._mode = None

    # --- called by the attention function ------------------------------------------------------------

    def _context(self, module: torch.nn.Module, layer: EvictionLayer, query: torch.Tensor,
                 weights: Optional[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], scale: float, phase: str,
                 candidates: Optional[torch.Tensor] = None,
                 budget: Optional[torch.Tensor] = None) -> ScoreContext:
        n = layer.attend_len
        return ScoreContext(
            module=module, layer_idx=layer.layer_idx, n_layers=self.n_layers, phase=phase,
            keys=layer.keys[:, :, :n], values=layer.values[:, :, :n], valid=layer.valid[:, :, :n],
            positions=layer.pos[:, :, :n], queries=query, query_positions=self.cache.query_positions,
            query_valid=self.cache.query_valid, scaling=scale, layer=layer, rotary=self.rotary,
            attn_weights=None if isinstance(weights, tuple) else weights,
            attn_logits=weights if isinstance(weights, tuple) else None,
            step=self._steps.get(layer.layer_idx, 0), candidates=candidates, budget=budget)

    def _scores(self, ctx: ScoreContext) -> torch.Tensor:
        scores = self.method.score(ctx)
        want = tuple(ctx.valid.shape)
        if tuple(scores.shape) != want:
            raise TokenbenchError(f"method '{self.method.label}': score() returned shape {tuple(scores.shape)}, "
                                  f"expected (batch, kv_heads, slots) = {want}")
        self._steps[ctx.layer_idx] = self._steps.get(ctx.layer_idx, 0) + 1
        return scores

    def after_attention(self, module: torch.nn.Module, layer: EvictionLayer, query: torch.Tensor,
                        weights: Optional[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        """``weights``: the decode step's attention weights, or its ``(logits, logsumexp)`` (Triton kernel)."""
        if self._mode == "prefill":
            self._after_prefill(module, layer, query, weights, scale)
        elif self._mode == "decode":
            if self.method.evicts_at_decode:
                self._after_decode_step(module, layer, query, weights, scale)
            # (without eviction decode tokens fill [fill, capacity) in order: the write advanced the slot)

    def _after_prefill(self, module, layer, query, weights, scale) -> None:
        q = query.shape[2]
        n = layer.attend_len
        evictable = torch.zeros_like(layer.valid[:, :, :n])
        evictable[:, :, n - q:] = self._segment.unsqueeze(1)
        evictable &= layer.valid[:, :, :n]
        seg = self.segment_lens
        idx = layer.layer_idx
        budgets = [self.method.layer_budget(self.method.budget(s), s, idx, self.n_layers) for s in seg]
        if self.method.evicts_at_prefill and any(k < s for k, s in zip(budgets, seg)):
            ctx = self._context(module, layer, query, weights, scale, "prefill", candidates=evictable,
                                budget=torch.tensor(budgets, device=evictable.device).view(-1, 1))
            scores = self._scores(ctx)
            self.kept[idx] = self._select(layer, scores, evictable, budgets, self._reserve)
            self.prefill_evictions += 1
        else:
            self.kept[idx] = evictable.sum(dim=-1)

    def _select(self, layer: EvictionLayer, scores: torch.Tensor, evictable: torch.Tensor, budgets: list[int],
                reserve: int) -> torch.Tensor:
        """Keep every live non-evictable slot plus each row/head's budget of best evictable slots; returns
        how many evictable slots each row/head kept, ``(B, H)``."""
        valid = layer.valid[:, :, : scores.shape[-1]]
        b, h, _ = valid.shape
        protected = valid & ~evictable
        cand = valid & evictable
        s = scores.float().nan_to_num(nan=float("-inf"))
        s = s.masked_fill(~cand, float("-inf")).masked_fill(protected, float("inf"))
        k_b = torch.tensor(budgets, device=s.device, dtype=torch.long)
        if self.method.head_allocation == "adaptive":
            k_bh = self._adaptive_budgets(s.masked_fill(protected, float("-inf")), k_b)
        else:
            k_bh = k_b.view(b, 1).expand(b, h)
        k_bh = torch.minimum(k_bh, cand.sum(dim=-1))
        n_keep = k_bh + protected.sum(dim=-1)
        width = max(1, int(n_keep.max()))
        top = s.topk(width, dim=-1)
        ok = (torch.arange(width, device=s.device) < n_keep.unsqueeze(-1)) & (top.values > float("-inf"))
        order = top.indices.masked_fill(~ok, scores.shape[-1]).argsort(dim=-1)  # keep slot (= time) order
        keep, ok = top.indices.gather(-1, order), ok.gather(-1, order)
        kept = (ok & cand.gather(-1, keep)).sum(dim=-1)
        layer.compact(keep, ok, reserve)
        return kept

    def _adaptive_budgets(self, s: torch.Tensor, k_b: torch.Tensor) -> torch.Tensor:
        """Ada-KV: a row's total budget ``k * H`` goes to the best (head, slot) pairs over all heads, each
        head guaranteed ``ADA_FLOOR * k`` slots. Returns per-head budgets ``(B, H)``."""
        b, h, c = s.shape
        floor = (k_b.float() * ADA_FLOOR).long().view(b, 1, 1)
        rank = s.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = the head's best slot
        boosted = torch.where(rank < floor, torch.full_like(s, 3e38), s)  # the floor is taken first
        flat = boosted.reshape(b, h * c)
        total = (k_b * h).view(b, 1)
        order = flat.argsort(dim=-1, descending=True)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen.scatter_(1, order, torch.arange(h * c, device=s.device).expand(b, -1) < total)
        chosen &= flat > float("-inf")
        return chosen.view(b, h, c).sum(dim=-1)

    def _after_decode_step(self, module, layer, query, weights, scale) -> None:
        idx = layer.layer_idx
        ctx = self._context(module, layer, query, weights, scale, "decode", budget=self._decode_cap)
        cap = self._decode_cap
        if idx not in self._bulk_done:  # first step, eager (scores checked): the cache may be far over capacity
            self._bulk_done.add(idx)
            scores = self._scores(ctx)
            if bool((layer.n_valid() > cap).any()):  # one bulk eviction down to capacity
                self._select(layer, scores, layer.valid.clone(), [int(c) for c in cap.view(-1).tolist()], reserve=1)
                layer.slot = first_free(layer.valid)
            else:
                layer.slot.copy_(evict_lowest(scores, layer.valid, layer.pos, cap))
            return
        # steady state, static shapes: free the lowest-scoring live slot of every row/head over capacity
        layer.slot.copy_(EVICT_IMPL[0](self.method, ctx, cap))
        self._steps[idx] = self._steps.get(idx, 0) + 1

    # --- what the runner and the tests read -----------------------------------------------------------

    def achieved_keep_ratio(self) -> float:
        """Measured fraction of the segment held in the cache, averaged over rows, layers and heads: after
        the compressed prefill, or, where only decoding evicted, at the end of decoding."""
        seg = self.segment_lens
        if not seg or not any(seg):
            return 1.0
        segt = torch.tensor(seg, dtype=torch.float32).clamp(min=1).view(-1, 1)
        if self.prefill_evictions == 0 and self.method.evicts_at_decode and self.outside_lens is not None:
            outside = torch.tensor(self.outside_lens, dtype=torch.float32).view(-1, 1)
            ratios = [((layer.n_valid().float().cpu() - outside).clamp(min=0).minimum(segt) / segt).mean()
                      for layer in self.cache.layers if layer.valid is not None]
        else:
            ratios = [(k.float().cpu() / segt).mean() for k in self.kept.values()]
        return float(sum(ratios) / len(ratios)) if ratios else 1.0

    def stats(self) -> dict[str, Any]:
        """The compression record of this session (plain JSON types)."""
        kept = [self.kept[i].float().mean(dim=1).tolist() for i in sorted(self.kept)]  # [layer][row]
        kept_rows = [sum(k[r] for k in kept) / len(kept) for r in range(len(kept[0]))] if kept else []
        lens = self.cache.lengths()
        return {
            "phase": self.method.resolved_phase,
            "head_allocation": self.method.head_allocation,
            "context_tokens": self.segment_lens[0] if self.segment_lens and len(self.segment_lens) == 1
            else self.segment_lens,
            # mean over layers and heads of the segment tokens kept after the compressed prefill
            "kept_tokens": (kept_rows[0] if len(kept_rows) == 1 else kept_rows) if kept_rows
            else self.segment_lens,
            "kept_tokens_per_layer": [sum(k) / len(k) for k in kept],
            "kept_tokens_per_layer_row": kept,  # [layer][row], mean over KV heads
            "achieved_keep_ratio": self.achieved_keep_ratio(),
            "decode_capacity": (self.decode_caps[0] if len(self.decode_caps) == 1 else self.decode_caps)
            if self.decode_caps else None,
            "cache_len_per_layer": lens,
            "attention": kv_attention.NAME,
        }
