"""The ``kv`` family: KV-cache eviction on Hugging Face causal LMs through the transformers Cache API.

A method file holds only its idea, a ``score``: per cached token, per layer and per KV head, how much it is
worth keeping. This base does everything else:

- forward hooks on every attention module (``register_forward_hook(..., with_kwargs=True)``); after the
  attention of a marked forward has run, the hook scores the layer's cache, keeps the ``budget`` best entries
  of the compressible segment (``torch.topk``, then sorted so the cache keeps its order) and *replaces*
  ``cache.layers[i].keys/.values`` with the gathered tensors, so the evicted entries are freed;
- the budget from ``keep_ratio`` or ``n_keep`` and the segment length; the phase (evict once after the
  compressed prefill, keep the cache at a fixed capacity during decoding, or both);
- bookkeeping the runner reports: per-layer cache length after the compressed prefill, tokens kept, the true
  position of every surviving entry, the cache length held during decoding.

Keys handed to ``score`` are exactly what the cache holds: post-RoPE, at KV-head granularity (with GQA they
are never expanded to the query heads). Since every entry keeps the rotary phase of its true position, a
shortened cache no longer tells the model where the next token is: the runner passes explicit
``position_ids`` (true positions) for everything fed after a compression; the causal mask is derived from
the cache length, which is what it should be (every cached entry precedes the new tokens).

Design follows NVIDIA kvpress (``kvpress/presses/base_press.py``: forward hook on ``self_attn``, replacing
the cache layer's tensors; ``scorer_press.py``: top-k over per-head scores; ``pipeline.py``: decoding with
explicit ``position_ids`` after compression), https://github.com/NVIDIA/kvpress. Written independently.

Usage::

    with method.attach(model) as session:
        with session.compressing(n_context_tokens):   # the next forward's first n tokens are compressible
            model(input_ids=prefix, position_ids=..., past_key_values=cache, use_cache=True)
        model(input_ids=question, position_ids=..., past_key_values=cache)  # plain: no eviction
        with session.decoding():                      # decode steps: eviction if the phase says so
            for ...: model(input_ids=tok, position_ids=..., past_key_values=cache)
    session.stats()

Limits (TODO for the lead): left padding is not handled — pad tokens of a padded batch would count in the
segment and compete for the budget (the runner runs one sample at a time, so rows never carry padding).
Sliding-window cache layers (Gemma/Mistral-style ``DynamicSlidingWindowLayer``) are left untouched.
Per-layer budgets that differ between layers would break the shared causal mask (transformers sizes it from
one layer); every method here uses one budget for all layers and heads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from tokenbench.errors import TokenbenchError
from tokenbench.method import Method

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode", "both")


@dataclass
class EvictionInfo:
    """What ``KVMethod.score`` may need besides the tensors."""

    layer_idx: int
    phase: str  # "prefill" (the compressed prefill forward) or "decode" (a decode step)
    segment: tuple[int, int]  # [start, end) cache indices that may be evicted; the rest is always kept
    budget: int  # how many of the segment's entries survive
    positions: torch.Tensor  # (batch, kv_heads, cache_len) int64: the true position of each cache entry
    step: int  # how many evictions this layer had before in this session
    kwargs: dict[str, Any] = field(repr=False, default_factory=dict)  # the attention forward's kwargs


@dataclass
class KVMethod(Method):
    """Base of every KV-cache method. A subclass implements ``score`` and, if it can evict during decoding,
    widens ``supported_phases``."""

    family: ClassVar[str] = "kv"
    supported_phases: ClassVar[tuple[str, ...]] = ("prefill",)  # which of PHASES the method implements
    default_phase: ClassVar[str] = "prefill"  # the phase used when ``phase`` is not set
    needs_attentions: ClassVar[bool] = False  # score() needs attention weights (model must run eager)
    takes_budget: ClassVar[bool] = True  # False for the keep-all baseline

    keep_ratio: float = 1.0  # fraction of the compressed segment's tokens kept, in (0, 1]
    n_keep: Optional[int] = None  # absolute token budget for the segment; overrides keep_ratio when set
    # True: the question is inside the compressed prefill; False: context compressed alone, question fed after
    query_aware: bool = False
    phase: Optional[str] = None  # when to evict: prefill | decode | both; None = the method's default_phase

    def __post_init__(self) -> None:
        self.validate()

    # --- configuration -------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def validate(self) -> None:
        """Raise ``TokenbenchError`` (one line) on a bad budget or phase. Subclasses extend it."""
        kr = self.keep_ratio
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not (0.0 < float(kr) <= 1.0):
            raise TokenbenchError(f"method '{self.label}': keep_ratio must be in (0, 1], got {kr!r}")
        if self.n_keep is not None and (isinstance(self.n_keep, bool) or not isinstance(self.n_keep, int)
                                        or self.n_keep < 1):
            raise TokenbenchError(f"method '{self.label}': n_keep must be an integer >= 1 (or unset), "
                                  f"got {self.n_keep!r}")
        if self.phase is not None and self.phase not in self.supported_phases:
            why = "unknown phase" if self.phase not in PHASES else "unsupported phase"
            raise TokenbenchError(f"method '{self.label}': {why} '{self.phase}'; it supports "
                                  f"{', '.join(self.supported_phases)}")

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
        """Tokens of a segment of ``segment_len`` tokens that survive the compressed prefill.

        ``n_keep`` (capped at the segment length) when set, else ``floor(keep_ratio * segment_len)``,
        at least 1.
        """
        if segment_len <= 0:
            return 0
        if self.n_keep is not None:
            return min(int(self.n_keep), segment_len)
        return max(1, min(segment_len, int(math.floor(float(self.keep_ratio) * segment_len + 1e-9))))

    def decode_budget(self, segment_len: int) -> int:
        """Tokens the segment may occupy during decoding: ``n_keep`` as given (not capped, so a budget above
        the prompt lets the cache grow up to it), else the prefill budget."""
        return int(self.n_keep) if self.n_keep is not None else self.budget(segment_len)

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio, "n_keep": self.n_keep, "phase": self.resolved_phase}

    def is_noop(self) -> bool:
        return self.n_keep is None and float(self.keep_ratio) >= 1.0

    # --- the method's idea ---------------------------------------------------------------------------

    def score(
        self,
        module: torch.nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: Optional[torch.Tensor],
        info: EvictionInfo,
    ) -> torch.Tensor:
        """Per-entry scores, shape ``(batch, num_kv_heads, cache_len)``; higher = keep.

        ``module``: the attention layer (``module.layer_idx``, ``module.head_dim``, projections).
        ``hidden_states``: that layer's input for this forward, ``(batch, q_len, hidden)``.
        ``keys``/``values``: the layer's whole cache, ``(batch, num_kv_heads, cache_len, head_dim)``,
        post-RoPE.
        ``attentions``: ``(batch, num_heads, q_len, cache_len)`` when the model runs eager, else ``None``
        (see ``attention_per_kv_head`` to fold query heads onto KV heads).
        Only ``info.segment`` is selected from; scores outside it are ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    # --- applying it ---------------------------------------------------------------------------------

    @contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[KVSession]:
        """Install the hooks on ``model`` for the duration of the block; yields the ``KVSession``."""
        session = KVSession(self, model)
        session.install()
        try:
            yield session
        finally:
            session.remove()


def attention_per_kv_head(attentions: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Fold ``(batch, num_heads, q, k)`` attention onto KV heads (mean over each GQA group)."""
    b, h, q, k = attentions.shape
    return attentions.view(b, num_kv_heads, h // num_kv_heads, q, k).mean(dim=2)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    base = model
    try:
        base = model.get_decoder()
    except Exception:  # exotic wrappers: fall back to scanning the module tree
        pass
    mods: list[Any] = []
    layers = getattr(base, "layers", None)
    if layers is not None:
        mods = [getattr(layer, "self_attn", None) for layer in layers]
    if not mods or any(m is None or not hasattr(m, "layer_idx") for m in mods):
        mods = [m for m in model.modules()
                if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not mods:
        raise TokenbenchError(f"no attention layers with a layer_idx found in {type(model).__name__}; "
                              "the kv family needs a transformers decoder-only LM")
    return mods


class KVSession:
    """Hooks of one ``KVMethod`` on one model, and what they measured. One session per generation: it
    assumes the cache starts empty and that token positions run 0, 1, 2, … across the forwards."""

    def __init__(self, method: KVMethod, model: torch.nn.Module):
        self.method = method
        self.model = model
        self.modules = attention_modules(model)
        self.layer_ids = [int(m.layer_idx) for m in self.modules]
        self._handles: list[Any] = []
        self._mode: Optional[str] = None  # None (plain forward) | "prefill" | "decode"
        self._n_segment = 0
        self._cache: Any = None
        self._seen: dict[int, int] = {}  # tokens seen per layer
        self._positions: dict[int, tuple[torch.Tensor, int]] = {}  # after an eviction: (positions, seen then)
        self._steps: dict[int, int] = {}
        self._warned_sliding = False
        # measurements
        self.segment_len: Optional[int] = None  # compressible tokens of the compressed prefill
        self.prefill_cache_len: dict[int, int] = {}  # per layer, after the compressed prefill
        self.prefill_kept: dict[int, int] = {}  # per layer, segment tokens that survived it
        self.decode_capacity: Optional[int] = None  # cache length held during decoding (decode phase)
        self.decode_outside: int = 0  # tokens outside the segment when decoding started
        self.decode_max_len: dict[int, int] = {}  # per layer, largest cache length after a decode step
        self.prefill_evictions = 0
        self.decode_evictions = 0

    # --- hooks ---------------------------------------------------------------------------------------

    def install(self) -> None:
        if self.method.needs_attentions and not self.method.is_noop():
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            if impl != "eager":
                raise TokenbenchError(f"method '{self.method.label}' needs attention weights; load the model "
                                      f"with attn_implementation=eager (it runs '{impl}')")
        for m in self.modules:
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache = None

    @contextmanager
    def compressing(self, n_tokens: int) -> Iterator[KVSession]:
        """Mark the forward inside the block as the compressed prefill: the first ``n_tokens`` of its input
        form the compressible segment; its remaining tokens (the question, query-aware) are always kept."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        self._mode, self._n_segment = "prefill", int(n_tokens)
        try:
            yield self
        finally:
            self._mode = None

    @contextmanager
    def decoding(self) -> Iterator[KVSession]:
        """Mark the forwards inside the block as decode steps. With a decode phase, the cache is held at the
        capacity it would have right after a compressed prefill: the segment's decode budget plus every token
        outside the segment seen so far (template, question)."""
        seen = max(self._seen.values(), default=0)
        seg = self.segment_len if self.segment_len is not None else seen
        self.decode_outside = seen - seg
        self.decode_capacity = self.method.decode_budget(seg) + self.decode_outside if seg > 0 else None
        self._mode = "decode"
        try:
            yield self
        finally:
            self._mode = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        idx = int(module.layer_idx)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q_len = int(hidden.shape[1])
        self._seen[idx] = self._seen.get(idx, 0) + q_len
        if self._mode is None:
            return None
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise TokenbenchError("KV compression needs a cache: call the model with "
                                  "past_key_values=DynamicCache()")
        self._cache = cache
        layer = cache.layers[idx]
        if getattr(layer, "is_sliding", False):
            if not self._warned_sliding:
                log.warning("%s: sliding-window cache layers are left uncompressed", self.method.label)
                self._warned_sliding = True
            return None
        attentions = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        cache_len = int(layer.keys.shape[-2])
        if self._mode == "prefill":
            start = cache_len - q_len
            seg = min(self._n_segment, q_len)
            self.segment_len = seg
            if self.method.evicts_at_prefill:
                budget = self.method.budget(seg)
                if budget < seg:
                    self._evict(module, layer, idx, hidden, attentions, kwargs, (start, start + seg), budget,
                                "prefill")
                    self.prefill_evictions += 1
            new_len = int(layer.keys.shape[-2])
            self.prefill_cache_len[idx] = new_len
            self.prefill_kept[idx] = seg - (cache_len - new_len)
        else:  # decode
            cap = self.decode_capacity
            if self.method.evicts_at_decode and cap is not None and cache_len > cap:
                self._evict(module, layer, idx, hidden, attentions, kwargs, (0, cache_len), cap, "decode")
                self.decode_evictions += 1
            self.decode_max_len[idx] = max(self.decode_max_len.get(idx, 0), int(layer.keys.shape[-2]))
        return None

    def _evict(self, module, layer, idx, hidden, attentions, kwargs, segment, budget, phase) -> None:
        keys, values = layer.keys, layer.values
        b, h, cache_len, _ = keys.shape
        start, end = segment
        positions = self.positions(idx)
        info = EvictionInfo(layer_idx=idx, phase=phase, segment=segment, budget=budget, positions=positions,
                            step=self._steps.get(idx, 0), kwargs=kwargs)
        scores = self.method.score(module, hidden, keys, values, attentions, info)
        if tuple(scores.shape) != (b, h, cache_len):
            raise TokenbenchError(f"method '{self.method.label}': score() returned shape "
                                  f"{tuple(scores.shape)}, "
                                  f"expected (batch, kv_heads, cache_len) = {(b, h, cache_len)}")
        chosen = scores[..., start:end].topk(budget, dim=-1, sorted=False).indices
        keep = chosen.sort(dim=-1).values + start  # preserve cache (= position) order
        if start > 0 or end < cache_len:
            before = torch.arange(start, device=keep.device).expand(b, h, start)
            after = torch.arange(end, cache_len, device=keep.device).expand(b, h, cache_len - end)
            keep = torch.cat([before, keep, after], dim=-1)
        layer.keys = keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
        layer.values = values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]))
        self._positions[idx] = (positions.gather(2, keep.to(positions.device)), self._seen[idx])
        self._steps[idx] = self._steps.get(idx, 0) + 1

    # --- what the runner and the tests read -----------------------------------------------------------

    def positions(self, layer_idx: int) -> torch.Tensor:
        """True position of every entry in the layer's cache, ``(batch, kv_heads, cache_len)`` int64."""
        if self._cache is None:
            raise RuntimeError("no cache seen yet")
        keys = self._cache.layers[layer_idx].keys
        b, h, cache_len = keys.shape[0], keys.shape[1], keys.shape[-2]
        seen = self._seen.get(layer_idx, 0)
        if layer_idx in self._positions:
            kept, seen_then = self._positions[layer_idx]
            fresh = torch.arange(seen_then, seen, device=kept.device).expand(b, h, seen - seen_then)
            pos = torch.cat([kept, fresh], dim=-1) if seen > seen_then else kept
        else:
            pos = torch.arange(seen, device=keys.device).expand(b, h, seen)
        if pos.shape[-1] != cache_len:
            raise RuntimeError(f"layer {layer_idx}: position bookkeeping ({pos.shape[-1]}) out of step with "
                               "the "
                               f"cache ({cache_len}); a session must start from an empty cache")
        return pos

    def _per_layer(self, d: dict[int, int]) -> list[int]:
        return [d[i] for i in self.layer_ids if i in d]

    def achieved_keep_ratio(self) -> float:
        """Measured fraction of the segment held in the cache, averaged over layers: after the compressed
        prefill, or, where only decoding evicted, while decoding."""
        seg = self.segment_len
        if not seg:
            return 1.0
        if self.decode_evictions and not self.prefill_evictions:
            lens = self._per_layer(self.decode_max_len)
            return sum(min(seg, n - self.decode_outside) / seg for n in lens) / len(lens)
        kept = self._per_layer(self.prefill_kept)
        return sum(k / seg for k in kept) / len(kept) if kept else 1.0

    def stats(self) -> dict[str, Any]:
        """The compression record of this session (plain JSON types)."""
        kept = self._per_layer(self.prefill_kept)
        decode_lens = self._per_layer(self.decode_max_len)
        return {
            "phase": self.method.resolved_phase,
            "context_tokens": self.segment_len,
            "cache_len_per_layer": self._per_layer(self.prefill_cache_len),
            # mean over layers (an int when every layer kept the same number, as with the methods here)
            "kept_tokens": ((kept[0] if len(set(kept)) == 1 else sum(kept) / len(kept)) if kept
                            else self.segment_len),
            "kept_tokens_per_layer": kept,
            "achieved_keep_ratio": self.achieved_keep_ratio(),
            "decode_capacity": self.decode_capacity if self.method.evicts_at_decode else None,
            "decode_max_cache_len_per_layer": decode_lens,
        }
