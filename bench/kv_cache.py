"""The eviction cache of the ``kv`` family: one preallocated buffer per layer, slots with a validity mask.

Why not transformers' ``DynamicCache``: after eviction, rows of a batch (left padding, per-row budgets), layers
(PyramidKV) and KV heads (Ada-style allocation) hold different numbers of tokens, which a rectangular cache
plus one shared causal mask cannot express, and a cache that grows by ``torch.cat`` every step can never be
captured in a CUDA graph. Here every layer owns

- ``keys``/``values``: ``(batch, kv_heads, capacity, head_dim)`` buffers, allocated once;
- ``valid``: ``(batch, kv_heads, capacity)`` bool — which slots hold a live token (padding and evicted or
  never-written slots are ``False``; attention masks them, nothing counts them);
- ``pos``: the true position of the token in each slot (RoPE is applied before caching, so a token keeps its
  rotary phase wherever it sits; the attention mask is ``valid & pos_k <= pos_q``, so slot order is free).

Writes go to slots ``[fill, fill + q)`` (one offset for the whole layer) or, while decoding, to one slot per
row and head (``slot``: ``(batch, kv_heads)`` device tensor), which eviction points at the entry it just
freed. Nothing in the decode-step path reads a device value on the host, so the step can be graph-captured.

Compaction (``compact``) gathers the surviving slots into a new, smaller buffer with room for the tokens still
to come (``reserve``), so an eviction frees memory for real.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_FAR = 2**62  # position of an empty slot: after every query, so the causal test alone already masks it
# Slot counts are rounded up to a multiple of this: decode attention multiplies (B, H, g, C) weights by the
# (B, H, C, D) values, and with C not a multiple of 8 the rows are not 16-byte aligned, so cuBLAS falls back
# to non-tensor-core kernels (seen on an H200: 120-130 us per product instead of ~30 us)
SLOT_ALIGN = 8


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of ``SLOT_ALIGN`` (the empty slots are invalid: never attended)."""
    return -(-int(n) // SLOT_ALIGN) * SLOT_ALIGN


def write_decode(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor,
                 slot: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, qvalid: torch.Tensor,
                 qpos: torch.Tensor, advance: bool = False) -> None:
    """A decode step's write, in place: the new key/value of every row and head into its ``slot`` ``(B, H)``,
    with its validity and position (``qvalid``/``qpos``: ``(B, 1)``). ``advance``: then point ``slot`` at the
    next slot (a cache that does not evict while decoding fills its slots in order). A pure function so that
    ``measure.fuse_kernels`` can swap in one kernel for the four scatters and the increment
    (``kv_decode_triton.write_decode``)."""
    b, h = slot.shape
    idx = slot.unsqueeze(-1)
    keys.scatter_(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]), key_states)
    values.scatter_(2, idx.unsqueeze(-1).expand(-1, -1, -1, values.shape[-1]), value_states)
    valid.scatter_(2, idx, qvalid.view(b, 1, 1).expand(b, h, 1))
    pos.scatter_(2, idx, qpos.view(b, 1, 1).expand(b, h, 1))
    if advance:
        slot.add_(1)


WRITE_IMPL = [write_decode]  # tokenbench.fused_decode swaps in the Triton kernel


class EvictionLayer(CacheLayerMixin):
    """One layer's slots. ``update`` is called by the attention module with the new keys/values."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: Optional[EvictionCache], layer_idx: int):
        super().__init__()
        # a weak reference: cache <-> layers would be a cycle that holds GPU memory until Python's cycle GC
        self._cache = weakref.ref(cache) if cache is not None else (lambda: None)
        self.layer_idx = layer_idx
        self.valid: Optional[torch.Tensor] = None
        self.pos: Optional[torch.Tensor] = None
        self.fill = 0  # slots [0, fill) have been written (prefill / multi-token forwards)
        self.slot: Optional[torch.Tensor] = None  # (batch, kv_heads) next decode write slot, decode mode only
        self.advance = False  # decode writes move ``slot`` on by one (no eviction picks the next slot)
        # method state; (B, H, capacity, ...) tensors follow the slots. Slots at or after ``fill`` always hold
        # zeros (created, grown and compacted with zeros), so a multi-token write needs no reset; a decode
        # write into a slot an eviction freed is reset by the step that scores it (families.kv.decode_evict)
        self.state: dict[str, torch.Tensor] = {}
        self.uniform_heads = True  # every KV head holds the same slots (until a per-head eviction)

    @property
    def cache(self) -> EvictionCache:
        return self._cache()

    # --- transformers' CacheLayerMixin -------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, q, d = key_states.shape
        cap = aligned(q + self.cache.reserve)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(b, h, cap, d)
        self.values = value_states.new_zeros(b, h, cap, value_states.shape[-1])
        self.valid = torch.zeros(b, h, cap, dtype=torch.bool, device=self.device)
        self.pos = torch.full((b, h, cap), _FAR, dtype=torch.long, device=self.device)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        qpos, qvalid = self.cache.query_positions, self.cache.query_valid  # (B, q) each, set by the runner
        if self.slot is not None and q == 1:  # decode: one slot per row and head
            WRITE_IMPL[0](self.keys, self.values, self.valid, self.pos, self.slot, key_states, value_states,
                          qvalid, qpos, self.advance)
        else:
            if self.slot is not None:
                raise RuntimeError("multi-token forward after decoding started")
            if self.fill + q > self.capacity:
                self._grow(self.fill + q + self.cache.reserve)
            s = slice(self.fill, self.fill + q)
            self.keys[:, :, s] = key_states
            self.values[:, :, s] = value_states
            self.valid[:, :, s] = qvalid.unsqueeze(1)
            self.pos[:, :, s] = torch.where(qvalid, qpos, _FAR).unsqueeze(1)
            self.fill += q
        return self.keys[:, :, : self.attend_len], self.values[:, :, : self.attend_len]

    @property
    def attend_len(self) -> int:
        """How many slots attention looks at: all of them once decoding (static shapes), else the written."""
        return self.capacity if self.slot is not None else self.fill

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.attend_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.fill if self.slot is None else self.capacity

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.pos = self.slot = None
        self.fill, self.state, self.is_initialized, self.uniform_heads, self.advance = 0, {}, False, True, False

    # --- views for attention and scoring -------------------------------------------------------------------

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``valid`` and ``pos`` over the slots attention sees."""
        n = self.attend_len
        return self.valid[:, :, :n], self.pos[:, :, :n]

    def n_valid(self) -> torch.Tensor:
        """Live tokens per row and head, ``(B, H)``."""
        return self.valid.sum(dim=-1)

    # --- reshaping the buffer --------------------------------------------------------------------------------

    def _state_index(self, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return idx.view(*idx.shape, *([1] * (t.dim() - 3))).expand(*idx.shape, *t.shape[3:])

    def _grow(self, new_cap: int) -> None:
        """Widen the buffers to at least ``new_cap`` slots (rounded up to ``SLOT_ALIGN``)."""
        extra = aligned(new_cap) - self.capacity
        pad = lambda t, v: torch.cat([t, t.new_full((*t.shape[:2], extra, *t.shape[3:]), v)], dim=2)  # noqa: E731
        self.keys, self.values = pad(self.keys, 0), pad(self.values, 0)
        self.valid, self.pos = pad(self.valid, False), pad(self.pos, _FAR)
        self.state = {k: pad(t, 0) for k, t in self.state.items()}

    def compact(self, keep: torch.Tensor, keep_ok: torch.Tensor, reserve: int) -> None:
        """Keep the slots ``keep`` (``(B, H, W)`` indices; ``keep_ok`` marks the real ones) in a new buffer
        of ``aligned(W + reserve)`` slots; everything else is freed."""
        b, h, w = keep.shape
        cap = aligned(w + reserve)

        def take(t: torch.Tensor, empty: Any) -> torch.Tensor:
            out = t.new_full((b, h, cap, *t.shape[3:]), empty)
            out[:, :, :w] = t.gather(2, self._state_index(keep, t))
            return out

        ok = keep_ok & self.valid.gather(2, keep)
        self.keys, self.values = take(self.keys, 0), take(self.values, 0)
        pos = take(self.pos, _FAR)
        pos[:, :, :w] = torch.where(ok, pos[:, :, :w], _FAR)
        self.pos = pos
        self.valid = torch.zeros(b, h, cap, dtype=torch.bool, device=keep.device)
        self.valid[:, :, :w] = ok
        self.state = {k: take(t, 0) for k, t in self.state.items()}
        self.fill = w
        self.uniform_heads = h == 1
        if self.slot is not None:  # decoding: the next token goes to the first free slot
            self.slot = torch.full((b, h), w, dtype=torch.long, device=keep.device)

    def start_decoding(self, steps: int, advance: bool = False) -> None:
        """Switch to per-slot writes with room for ``steps`` more tokens per row and head; ``advance``: each
        write moves on to the next slot (nothing evicts while decoding)."""
        self.advance = advance
        if self.capacity < self.fill + steps:
            self._grow(self.fill + steps)
        self.slot = torch.full((self.keys.shape[0], self.keys.shape[1]), self.fill, dtype=torch.long,
                               device=self.device)

    def nbytes(self) -> int:
        """Bytes of the key/value buffers as allocated."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def used_bytes(self) -> int:
        """Bytes of the live entries only."""
        if self.keys is None:
            return 0
        per = (self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size())
        return int(self.valid.sum()) * per


class EvictionCache(Cache):
    """A transformers ``Cache`` of ``EvictionLayer`` s. The runner sets ``query_positions``/``query_valid``
    (``(B, q)``: true positions and non-padding of the tokens fed next) before every forward."""

    def __init__(self, num_layers: int, reserve: int = 0):
        self.reserve = int(reserve)  # free slots kept after the written ones (tokens still to come)
        self.query_positions: Optional[torch.Tensor] = None
        self.query_valid: Optional[torch.Tensor] = None
        self.unpadded = True  # no padding among the tokens fed next (lets a fresh prefill run is_causal SDPA)
        super().__init__(layers=[EvictionLayer(self, i) for i in range(num_layers)])

    def set_inputs(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Positions and non-padding ``(B, q)`` of the next forward's tokens (a host sync: not for decode
        steps, whose static tensors the runner updates in place)."""
        self.query_positions, self.query_valid = positions, valid.to(torch.bool)
        self.unpadded = bool(self.query_valid.all())

    @classmethod
    def merge(cls, caches: list[EvictionCache]) -> EvictionCache:
        """Stack the rows of several caches (each prefilled on its own) into one for batched decoding; every
        layer gets the largest capacity among them, the extra slots empty."""
        out = cls(len(caches[0].layers), reserve=max(c.reserve for c in caches))
        for i, layer in enumerate(out.layers):
            parts = [c.layers[i] for c in caches]
            cap = max(p.capacity for p in parts)

            def cat(get: Any, empty: Any) -> torch.Tensor:
                ts = []
                for p in parts:
                    t = get(p)
                    extra = cap - t.shape[2]
                    ts.append(torch.cat([t, t.new_full((*t.shape[:2], extra, *t.shape[3:]), empty)], dim=2)
                              if extra else t)
                return torch.cat(ts, dim=0)

            layer.keys, layer.values = cat(lambda p: p.keys, 0), cat(lambda p: p.values, 0)
            layer.valid, layer.pos = cat(lambda p: p.valid, False), cat(lambda p: p.pos, _FAR)
            names = {k: t for p in parts for k, t in p.state.items()}  # a group that never evicted has none
            layer.state = {k: cat(lambda p, k=k, t=t: p.state[k] if k in p.state else
                                  t.new_zeros((*p.keys.shape[:3], *t.shape[3:])), 0) for k, t in names.items()}
            layer.fill = max(p.fill for p in parts)
            layer.uniform_heads = all(p.uniform_heads for p in parts)
            layer.device, layer.dtype, layer.is_initialized = parts[0].device, parts[0].dtype, True
        return out

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def used_bytes(self) -> int:
        return sum(layer.used_bytes() for layer in self.layers)

    def lengths(self) -> list[int]:
        """Live tokens per layer (maximum over rows and heads)."""
        return [int(layer.n_valid().max()) if layer.valid is not None else 0 for layer in self.layers]
