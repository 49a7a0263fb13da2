"""Attention over an ``EvictionCache``, registered with transformers as ``attn_implementation="tokenbench_kv"``.

While a ``KVSession`` is attached the model runs this function in every attention layer. It sees the queries
(post-RoPE), the layer's slots and their validity/positions, so

- masks come from the cache itself (``valid & pos_k <= pos_q``): left padding, rows/layers/heads of different
  lengths after eviction and reused slots all just work, with no 2-D mask bookkeeping;
- a fresh, unpadded prefill runs SDPA with ``is_causal`` (flash / cuDNN kernels on GPU); a forward over a
  compressed cache (the question after a query-agnostic compression) runs SDPA without cuDNN, whose
  execution plans are built per shape — once per layer where layers keep different lengths (PyramidKV);
- a decode step runs an explicit GQA-packed attention (queries of a KV group side by side, the cache never
  expanded): it is memory-bound either way, and it yields the step's attention weights for free, which the
  decode-time methods (H2O, TOVA, ...) score with;
- after attention it hands the layer to the session, which scores and evicts when the forward is marked.

transformers builds no mask of its own for an implementation without a registered mask function
(``masking_utils._preprocess_mask_arguments``), so nothing is computed twice.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "tokenbench_kv"
_ACTIVE: list[Any] = []  # the attached KVSession (a stack: sessions do not nest, but a failure must unwind)
_registered = False
# Decode-step attention: "matmul" (explicit, GQA-packed), "triton" (split-KV kernel, tokenbench.kv_decode_triton;
# also yields the weights decode-time methods need), "sdpa" (fused, masked; methods needing no weights only),
# "auto": triton on a GPU (faster at every shape measured on an H200, results/perf/kv), else matmul.
DECODE_BACKEND = "auto"
DECODE_BACKENDS = ("auto", "matmul", "triton", "sdpa")
# A prefill's accumulated attention (ScoreContext.accumulated_attention: h2o, observed_attention, vatp):
# "eager" (float32 weights in query chunks), "triton" (two blockwise passes, nothing quadratic stored;
# tokenbench.kv_accumulated_triton) or "auto": triton on a GPU (H200, Llama-3.1-8B, 32k x 8 rows: 21.7 s
# against 110 s for the eager chunks, results/perf/kv), eager on the CPU (the interpreter is slow there)
ACCUMULATED_BACKEND = "auto"
ACCUMULATED_BACKENDS = ("auto", "eager", "triton")
# SDPA over a compressed cache (keys of another length than the queries): no cuDNN. cuDNN builds an execution
# plan for every new shape, and after PyramidKV's per-layer budgets every layer has one: its first prefill at a
# shape took 4.1 s against 0.33 s on the repeat (H200, 8k x 1 row; 0.53 s first without cuDNN), while these
# calls (a question's few queries) gain nothing from cuDNN's speed (results/perf/kv, sixth session)
COMPRESSED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_backend(device: torch.device | str) -> str:
    """The decode attention that runs on ``device`` under the current ``DECODE_BACKEND``."""
    if DECODE_BACKEND != "auto":
        return DECODE_BACKEND
    from tokenbench import kv_decode_triton

    return "triton" if torch.device(device).type == "cuda" and kv_decode_triton.available() else "matmul"


def accumulated_backend(device: torch.device | str) -> str:
    """The accumulated-attention path that runs on ``device`` under the current ``ACCUMULATED_BACKEND``."""
    if ACCUMULATED_BACKEND != "auto":
        return ACCUMULATED_BACKEND
    return "triton" if torch.device(device).type == "cuda" else "eager"


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    _registered = True


def causal_mask(kvalid: torch.Tensor, kpos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """``(B, H, q, K)`` bool: slot ``k`` holds a live token at or before query ``q``'s position. A query that
    may see nothing (a padding query) sees everything instead, so softmax stays finite; its output is unused."""
    allowed = kvalid[:, :, None, :] & (kpos[:, :, None, :] <= qpos[:, None, :, None])
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kvalid: torch.Tensor,
                      kpos: torch.Tensor, qpos: torch.Tensor, scaling: float, fresh_unpadded: bool) -> torch.Tensor:
    """Multi-token attention through SDPA; ``(B, Hq, q, D)``."""
    groups = query.shape[1] // key.shape[1]
    if fresh_unpadded:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                              enable_gqa=groups > 1)
    mask = causal_mask(kvalid, kpos, qpos)
    if mask.shape[1] > 1 and groups > 1:
        mask = mask.repeat_interleave(groups, dim=1)
    own_keys = key.shape[2] == query.shape[2]  # a (padded) prompt's own keys: one shape for all layers
    with nullcontext() if own_keys else sdpa_kernel(COMPRESSED_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                              enable_gqa=groups > 1)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kvalid: torch.Tensor,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per row, explicit and GQA-packed. Returns the output ``(B, Hq, 1, D)`` and the
    attention weights ``(B, Hq, 1, K)`` (float32)."""
    b, hq, q, d = query.shape
    hk = key.shape[1]
    qg = query.reshape(b, hk, (hq // hk) * q, d)
    scores = torch.matmul(qg, key.transpose(-1, -2)).float() * scaling
    probs = scores.masked_fill_(~kvalid[:, :, None, :], float("-inf")).softmax(dim=-1)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.view(b, hq, q, value.shape[-1]), probs.view(b, hq, q, -1)


DECODE_IMPL = [decode_attention]  # tokenbench.fused_decode swaps in a compiled version


def decode_attention_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kvalid: torch.Tensor,
                          scaling: float) -> torch.Tensor:
    """The same decode attention through SDPA with a boolean mask (GQA-packed), when no weights are needed."""
    b, hq, q, d = query.shape
    hk = key.shape[1]
    qg = query.reshape(b, hk, (hq // hk) * q, d)
    out = F.scaled_dot_product_attention(qg, key, value, attn_mask=kvalid[:, :, None, :], scale=scaling)
    return out.view(b, hq, q, value.shape[-1])


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    if not _ACTIVE:
        raise RuntimeError(f"attn_implementation '{NAME}' runs only inside KVMethod.attach()")
    session = _ACTIVE[-1]
    layer = session.cache.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    kvalid, kpos = layer.views()
    weights = None
    if query.shape[2] == 1 and layer.slot is not None:
        backend = decode_backend(query.device)
        if backend == "triton":
            from tokenbench import kv_decode_triton

            out, weights = kv_decode_triton.decode_attention(query, key, value, kvalid, scale, normalize=False,
                                                             want_weights=session.needs_decode_weights)
        elif session.needs_decode_weights or backend == "matmul":
            out, weights = DECODE_IMPL[0](query, key, value, kvalid, scale)
        else:  # fused SDPA over the masked slots; no weights needed
            out = decode_attention_sdpa(query, key, value, kvalid, scale)
    else:
        fresh = layer.fill == query.shape[2] and session.cache.unpadded
        kvalid_m, kpos_m = (kvalid[:, :1], kpos[:, :1]) if layer.uniform_heads else (kvalid, kpos)
        out = prefill_attention(query, key, value, kvalid_m, kpos_m, session.cache.query_positions, scale, fresh)
    session.after_attention(module, layer, query, weights, scale)
    return out.transpose(1, 2).contiguous(), None
