"""Split-KV decode attention over the eviction cache's slots, in Triton (``kv_attention.DECODE_BACKEND="triton"``).

A decode step is memory-bound: every step reads all of a layer's cached keys and values once. The explicit
path (two cuBLAS batched products with 4 query rows each, plus a float32 softmax between them) reached ~50% of
HBM bandwidth on an H200 (``results/perf/kv``). This kernel follows flash-decoding (Dao, Haziza, Massa, Sizov,
"Flash-Decoding for long-context inference", 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html;
the split-KV scheme of ``flash_attn_with_kvcache``, https://github.com/Dao-AILab/flash-attention): each program
takes one (row, KV head, slice of slots), loads the GQA group's queries once, streams its keys and values in
blocks with an online softmax, and writes a partial output with its running max and sum; a second kernel
combines the slices. Written here for this cache: the mask is the slots' validity (evicted, padding, never
written), so rows and heads holding different tokens need no padding to a common length.

For decode-time methods (H2O, TOVA, ...) the kernel also writes the step's masked logits; the attention
weights are then ``exp(logit - logsumexp)``, the combine kernel's second output — the same weights the
explicit path returns, without a second pass over the keys.

On CPU tensors the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported;
slow, for tests).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Optional

import torch
from tokenbench.triton_support import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None

BLOCK = 64  # slots per inner iteration
# split the slots until about this many programs per streaming multiprocessor: 2.5 gives 6 slices per (row, KV
# head) at 8 rows x 8 KV heads on 132 SMs, the fastest of 3-8 at 3.4k and 32k slots (bench_decode_attention.py)
PROGRAMS_PER_SM = 2.5
NUM_WARPS, NUM_STAGES = 4, 3  # launch configuration of the split kernel (results/perf/kv/bench_decode_attention.py)


def available() -> bool:
    return triton is not None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _partial(Q, K, V, VALID, O, M, L, LOGITS,
             sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sl_b, sl_h,
             C, split_len, NSPLIT, scale,
             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
             WRITE_LOGITS: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    qh = h * G + g  # the group's query heads
    q = tl.load(Q + b * sq_b + qh[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, C)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < hi
        k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=nm[:, None], other=0.0)
        ok = tl.load(VALID + b * sm_b + h * sm_h + n, mask=nm, other=0) != 0
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        x = tl.where(ok[None, :], x, float("-inf"))
        if WRITE_LOGITS:
            tl.store(LOGITS + b * sl_b + qh[:, None] * sl_h + n[None, :], x, mask=gmask[:, None] & nm[None, :])
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing live yet: keep exp() finite
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(x - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=nm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row = (b * tl.num_programs(1) * G + qh) * NSPLIT + s  # partials laid out (B, Hq, NSPLIT)
    tl.store(M + row, m_i, mask=gmask)
    tl.store(L + row, l_i, mask=gmask)
    tl.store(O + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])


def _combine(O, M, L, OUT, LSE, NSPLIT, NSP: tl.constexpr, D: tl.constexpr):
    r = tl.program_id(0)  # one (row, query head)
    s = tl.arange(0, NSP)
    d = tl.arange(0, D)
    sm = s < NSPLIT
    m = tl.load(M + r * NSPLIT + s, mask=sm, other=float("-inf"))
    l_s = tl.load(L + r * NSPLIT + s, mask=sm, other=0.0)
    mx = tl.max(m, 0)
    mx_use = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(m - mx_use)
    total = tl.sum(l_s * w, 0)
    o = tl.load(O + (r * NSPLIT + s[:, None]) * D + d[None, :], mask=sm[:, None], other=0.0)
    safe = tl.where(total > 0, total, 1.0)  # a query that sees no live slot outputs zeros
    out = tl.sum(o * w[:, None], 0) / safe
    tl.store(OUT + r * D + d, out.to(OUT.dtype.element_ty))
    tl.store(LSE + r, mx_use + tl.log(safe))


def _write(K, V, VALID, POS, SLOT, KS, VS, QVALID, QPOS,
           sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sp_b, sp_h, sks_b, sks_h, svs_b, svs_h, sqv_b, sqp_b,
           H, D: tl.constexpr, ADVANCE: tl.constexpr):
    b = tl.program_id(0)  # one (row, KV head): its new key/value, validity and position into its slot
    h = tl.program_id(1)
    slot = tl.load(SLOT + b * H + h)
    d = tl.arange(0, D)
    tl.store(K + b * sk_b + h * sk_h + slot * sk_n + d, tl.load(KS + b * sks_b + h * sks_h + d))
    tl.store(V + b * sv_b + h * sv_h + slot * sv_n + d, tl.load(VS + b * svs_b + h * svs_h + d))
    tl.store(VALID + b * sm_b + h * sm_h + slot, tl.load(QVALID + b * sqv_b))
    tl.store(POS + b * sp_b + h * sp_h + slot, tl.load(QPOS + b * sqp_b))
    if ADVANCE:  # each program owns its (row, head) slot: no race
        tl.store(SLOT + b * H + h, slot + 1)


@lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any, Any]:
    # with TRITON_INTERPRET=1 in the environment before triton is imported, triton.jit gives the interpreter
    return triton.jit(_partial), triton.jit(_combine), triton.jit(_write)


def write_decode(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor,
                 slot: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, qvalid: torch.Tensor,
                 qpos: torch.Tensor, advance: bool = False) -> None:
    """``kv_cache.write_decode`` in one kernel instead of four scatters (~3 µs each per layer on an H200) and,
    with ``advance``, the slot increment; the same arguments and effect. Where the kernel cannot run
    (``triton_support.runs_on``), the eager version does."""
    from tokenbench import kv_cache

    d = keys.shape[-1]
    if not runs_on(keys) or d & (d - 1) or values.shape[-1] != d \
            or key_states.stride(-1) != 1 or value_states.stride(-1) != 1 or not slot.is_contiguous():
        kv_cache.write_decode(keys, values, valid, pos, slot, key_states, value_states, qvalid, qpos, advance)
        return
    b, h = slot.shape
    qv = qvalid.to(torch.bool).view(torch.uint8)
    _kernels()[2][(b, h)](
        keys, values, valid.view(torch.uint8), pos, slot, key_states, value_states, qv, qpos,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        valid.stride(0), valid.stride(1), pos.stride(0), pos.stride(1), key_states.stride(0),
        key_states.stride(1), value_states.stride(0), value_states.stride(1), qv.stride(0), qpos.stride(0),
        h, D=d, ADVANCE=advance)


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def n_splits(batch: int, kv_heads: int, slots: int, device: torch.device) -> int:
    """Slices of the slots per (row, KV head): enough programs to fill the GPU, at least one block each."""
    want = math.ceil(PROGRAMS_PER_SM * _sm_count(device) / max(1, batch * kv_heads))
    return max(1, min(want, _cdiv(slots, BLOCK)))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kvalid: torch.Tensor,
                     scaling: float, want_weights: bool = False, splits: Optional[int] = None,
                     normalize: bool = True) -> tuple[torch.Tensor, Any]:
    """``query`` ``(B, Hq, 1, D)``, ``key``/``value`` ``(B, H, C, D)`` (any strides with a contiguous last
    dimension), ``kvalid`` ``(B, H, C)`` bool. Returns the output ``(B, Hq, 1, D)`` in the value dtype and, if
    ``want_weights``, the attention weights ``(B, Hq, 1, C)`` float32 (0 on masked slots), as
    ``kv_attention.decode_attention``; with ``normalize=False`` instead the masked logits ``(B, Hq, C)``
    (-inf on masked slots) and their logsumexp ``(B, Hq)``, weights = ``exp(logits - lse)``, for a consumer
    that fuses the exponential into its own kernel (``ScoreContext.attention`` under ``measure.fuse_kernels``)."""
    b, hq, q, d = query.shape
    _, h, c, _ = key.shape
    if q != 1 or hq % h or d & (d - 1) or d < 16 or value.shape[-1] != d:
        raise ValueError(f"triton decode attention: one query token, GQA groups, a power-of-two head dim >= 16; "
                         f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("triton decode attention: the last dimension must be contiguous")
    g = hq // h
    dev = query.device
    split_len = _cdiv(_cdiv(c, splits or n_splits(b, h, c, dev)), BLOCK) * BLOCK  # whole blocks per slice
    ns = _cdiv(c, split_len)  # no empty slice
    part_o = torch.empty(b, hq, ns, d, dtype=torch.float32, device=dev)
    part_m = torch.empty(b, hq, ns, dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    logits = torch.empty(b, hq, c, dtype=torch.float32, device=dev) if want_weights else part_m
    valid = kvalid.view(torch.uint8) if kvalid.dtype == torch.bool else kvalid
    partial, combine, _ = _kernels()
    partial[(b, h, ns)](
        query, key, value, valid, part_o, part_m, part_l, logits,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), valid.stride(0), valid.stride(1),
        logits.stride(0) if want_weights else 0, logits.stride(1) if want_weights else 0,
        c, split_len, ns, float(scaling),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BLOCK_N=BLOCK, WRITE_LOGITS=want_weights,
        PRECISION="ieee" if value.dtype == torch.float32 else "tf32",  # float32 caches: no TF32 rounding
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    out = torch.empty(b, hq, 1, d, dtype=value.dtype, device=dev)
    lse = torch.empty(b, hq, dtype=torch.float32, device=dev)
    combine[(b * hq,)](part_o, part_m, part_l, out, lse, ns, NSP=triton.next_power_of_2(ns), D=d)
    if not want_weights:
        return out, None
    if not normalize:
        return out, (logits, lse)
    return out, (logits - lse.unsqueeze(-1)).exp_().unsqueeze(2)
