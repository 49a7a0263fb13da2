"""Optional kernel fusion for LLM decoding (``measure.fuse_kernels``): ``torch.compile`` the elementwise parts
of a decoder layer — RMSNorm, rotary embedding, the gated MLP's activation, the decode attention's
scaling/mask/softmax, the decode-time methods' scoring and eviction — merge the gate/up and the query/key/value
GEMMs, and write a decode step's key/value into the eviction cache with one Triton kernel, so a decode step is
not dominated by hundreds of tiny kernels. Profiling a Llama-3.1-8B decode step on an H200 (batch 8, 32k context,
``results/perf/kv/profile_decode.py``) showed ~3.5 ms of its ~10 ms in elementwise kernels of 1-3 µs each,
next to 4.5 ms of weight GEMVs. The matrix products stay cuBLAS; only the glue between them is fused.

Same numerics as the transformers modules they replace (float32 RMSNorm, weight multiplied in the input dtype);
applied to every method alike, the baseline included. Patches the model *instances* (and, process-wide, the
modeling module's ``apply_rotary_pos_emb``, the kv decode attention and the decode-time methods' scoring and
eviction step, ``families.kv.decode_evict``), so it
works for Llama, Qwen2/3, Mistral and other models built from the same parts.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

_compiled: dict[str, Callable] = {}


def _compile(name: str, fn: Callable, dynamic: bool | None = True) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=dynamic, fullgraph=True)
    return _compiled[name]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _fused_mlp(m: torch.nn.Module, silu_mul: Callable) -> Callable:
    """One GEMM for gate and up: their weights become two views of one concatenated matrix (no copy kept)."""
    n = m.gate_proj.weight.shape[0]
    w = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
    m.gate_proj.weight.data, m.up_proj.weight.data = w[:n], w[n:]

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w).split(n, dim=-1)
        return m.down_proj(silu_mul(gate, up))

    return forward


def _fused_qkv(attn: torch.nn.Module) -> bool:
    """One GEMM for the query, key and value projections (their weights become views of one matrix): the
    attention module calls ``q_proj``, ``k_proj``, ``v_proj`` on the same input in turn, so ``q_proj`` computes
    all three and hands ``k_proj``/``v_proj`` their parts; called on any other input they compute their own.
    On an H200 at batch 8 the separate 8 MB key/value GEMVs ran at a third of the bandwidth."""
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projs):
        return False
    biases = [p.bias for p in projs]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return False
    sizes = [p.weight.shape[0] for p in projs]
    w = torch.cat([p.weight.data for p in projs])
    bias = None if biases[0] is None else torch.cat([b.data for b in biases])
    for p, wv, bv in zip(projs, w.split(sizes), bias.split(sizes) if bias is not None else [None] * 3):
        p.weight.data = wv
        if bv is not None:
            p.bias.data = bv
    stash: dict[str, Any] = {}

    def q_forward(x: torch.Tensor) -> torch.Tensor:
        qo, ko, vo = F.linear(x, w, bias).split(sizes, dim=-1)
        stash.update(x=x, k=ko, v=vo)
        return qo

    def part(name: str, proj: torch.nn.Linear) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if stash.get("x") is x and name in stash:
                out = stash.pop(name)
                if "k" not in stash and "v" not in stash:
                    stash.clear()  # hold no activations between forwards
                return out
            return F.linear(x, proj.weight, proj.bias)

        return forward

    projs[0].forward = q_forward
    projs[1].forward, projs[2].forward = part("k", projs[1]), part("v", projs[2])
    return True


def fuse(model: torch.nn.Module) -> dict[str, int]:
    """Patch ``model`` in place; returns how many modules of each kind were fused. Idempotent."""
    if getattr(model, "_tokenbench_fused", None) is not None:
        return model._tokenbench_fused
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0, "qkv": 0}
    rms = _compile("rms", _rms_norm)
    silu_mul = _compile("silu_mul", _silu_mul)
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None:
            m.forward = (lambda mod: lambda x: rms(x, mod.weight, mod.variance_epsilon))(m)
            counts["rms_norm"] += 1
        elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            act = getattr(getattr(m, "config", None), "hidden_act", None)
            if act in ("silu", "swish") and m.gate_proj.bias is None and m.up_proj.bias is None:
                m.forward = _fused_mlp(m, silu_mul)
                counts["mlp"] += 1
        elif name.endswith("Attention") and hasattr(m, "layer_idx"):
            counts["qkv"] += _fused_qkv(m)
            module = sys.modules.get(type(m).__module__)
            if module is not None and hasattr(module, "apply_rotary_pos_emb"):
                if not getattr(module.apply_rotary_pos_emb, "_tokenbench", False):
                    fused: Any = _compile("rope", _rope)
                    fused._tokenbench = True
                    module.apply_rotary_pos_emb = fused
                counts["rope"] += 1
    from tokenbench import kv_attention

    kv_attention.DECODE_IMPL[0] = _compile("decode_attention", kv_attention.decode_attention)
    from tokenbench import kv_cache, kv_decode_triton

    if kv_decode_triton.available():  # not torch.compile: inductor copies a mutated input whole (the cache!)
        kv_cache.WRITE_IMPL[0] = kv_decode_triton.write_decode
    from tokenbench.families import kv as kv_family

    # dynamic=None: a method's integer settings (scissorhands' history window, used in bit masks) stay
    # constants; shapes become symbolic once they change (a compiled ``2 ** s`` fails in inductor on GPU)
    kv_family.EVICT_IMPL[0] = _compile("decode_evict", kv_family.decode_evict, dynamic=None)
    model._tokenbench_fused = counts
    return counts
