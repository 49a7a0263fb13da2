"""Accumulated attention of a prefill in Triton: the attention each cached slot received, summed over all of the
forward's queries (``ScoreContext.accumulated_attention``: H2O's heavy hitters, observed attention, VATP),
without the ``q x C`` weight matrix in memory (``kv_attention.ACCUMULATED_BACKEND = "triton"``).

The eager path forms float32 weights in query chunks of ~1 GiB: at 32k tokens and batch 8 that is 32 queries a
chunk, a thousand chunks a layer, and the prefill of H2O took 110 s on an H200 against ~10 s for methods that
need no weights (``results/perf/kv``). Here two passes over the keys, flash-attention style (Dao et al.,
"FlashAttention", 2022, https://arxiv.org/abs/2205.14135: blockwise scores with an online softmax, nothing
quadratic stored): the first finds each query's logsumexp, the second recomputes each block of scores and sums
``exp(score - logsumexp)`` over the queries into each slot's total. Twice the score FLOPs of one attention
pass, float32 scores from bfloat16/float16 inputs (the eager path rounds the scores to the input dtype first).

Mask: a live slot at or before the query's position (``kv_attention.causal_mask``); padding queries add
nothing. A query that sees no slot adds nothing (the eager path's softmax over everything only ever serves
padding queries, which it weighs by zero). The forward's own tokens fill the cache's last ``q`` slots in order,
so each query's pass stops at its own slot and each slot's pass starts at its own query.

On CPU tensors the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from tokenbench.triton_support import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None

BLOCK_M, BLOCK_N = 64, 64  # queries x slots per score block
NUM_WARPS, NUM_STAGES = 4, 2


def _lse(Q, K, VALID, POS, QPOS, LSE, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sp_b, sp_h, sqp_b, sl_b, sl_h,
         NQ, C, FIRST, G, scale,
         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    m = tl.program_id(2) * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    h = hq // G
    mm = m < NQ
    q = tl.load(Q + b * sq_b + hq * sq_h + m[:, None] * sq_m + d[None, :], mask=mm[:, None], other=0.0)
    qpos = tl.load(QPOS + b * sqp_b + m, mask=mm, other=-1)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    end = C
    if FIRST >= 0:  # slots after the block's last query hold later tokens of this forward: all masked
        end = tl.minimum(C, FIRST + (tl.program_id(2) + 1) * BM)
    for n0 in range(0, end, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < C
        k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=nm[:, None], other=0.0)
        ok = tl.load(VALID + b * sv_b + h * sv_h + n, mask=nm, other=0) != 0
        kp = tl.load(POS + b * sp_b + h * sp_h + n, mask=nm, other=0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(ok[None, :] & (kp[None, :] <= qpos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("inf"))  # no live slot: every weight exp(-inf) = 0
    tl.store(LSE + b * sl_b + hq * sl_h + m, lse, mask=mm)


def _colsum(Q, K, VALID, POS, QPOS, QVALID, LSE, OUT, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sp_b, sp_h,
            sqp_b, sqv_b, sl_b, sl_h, so_b, so_h,
            NQ, C, FIRST, G, scale,
            D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    d = tl.arange(0, D)
    h = hq // G
    nm = n < C
    k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=nm[:, None], other=0.0)
    ok = tl.load(VALID + b * sv_b + h * sv_h + n, mask=nm, other=0) != 0
    kp = tl.load(POS + b * sp_b + h * sp_h + n, mask=nm, other=0)
    acc = tl.zeros([BN], tl.float32)
    start = 0
    if FIRST >= 0:  # queries before the block's first slot's own query are earlier tokens: all masked
        start = (tl.maximum(tl.program_id(2) * BN - FIRST, 0) // BM) * BM
    for m0 in range(start, NQ, BM):
        m = m0 + tl.arange(0, BM)
        mm = m < NQ
        q = tl.load(Q + b * sq_b + hq * sq_h + m[:, None] * sq_m + d[None, :], mask=mm[:, None], other=0.0)
        qpos = tl.load(QPOS + b * sqp_b + m, mask=mm, other=-1)
        qv = tl.load(QVALID + b * sqv_b + m, mask=mm, other=0) != 0
        lse = tl.load(LSE + b * sl_b + hq * sl_h + m, mask=mm, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        live = ok[None, :] & (kp[None, :] <= qpos[:, None]) & qv[:, None]
        p = tl.where(live, tl.exp(s - lse[:, None]), 0.0)
        acc += tl.sum(p, 0)
    tl.store(OUT + b * so_b + hq * so_h + n, acc, mask=nm)


@lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    return triton.jit(_lse), triton.jit(_colsum)  # the interpreter's jit under TRITON_INTERPRET=1


def supported(queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """A GPU (or the interpreter, not in bfloat16), a power-of-two head dim >= 16, GQA groups."""
    if not runs_on(keys):
        return False
    d = keys.shape[-1]
    return (d >= 16 and not d & (d - 1) and queries.shape[-1] == d and queries.shape[1] % keys.shape[1] == 0
            and queries.stride(-1) == 1 and keys.stride(-1) == 1 and queries.dtype == keys.dtype)


def accumulated_attention(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                          query_positions: torch.Tensor, query_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """``queries`` ``(B, Hq, q, D)`` of this forward (its tokens in the last ``q`` of the ``C`` slots, in order),
    ``keys`` ``(B, H, C, D)``, ``valid``/``positions`` ``(B, H, C)``, ``query_positions``/``query_valid``
    ``(B, q)``. Returns ``(B, Hq, C)`` float32: per slot, the softmax weight it got summed over the valid
    queries."""
    if not supported(queries, keys):
        raise ValueError(f"triton accumulated attention: unsupported queries {tuple(queries.shape)} "
                         f"{queries.dtype} / keys {tuple(keys.shape)} on {keys.device}")
    b, hq, nq, d = queries.shape
    h, c = keys.shape[1], keys.shape[2]
    first = c - nq  # >= 0: this forward's tokens are the last nq slots
    pos = positions.contiguous()
    val = valid.to(torch.uint8)
    qpos = query_positions.to(torch.int64).contiguous()
    qval = query_valid.to(torch.uint8).contiguous()
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=keys.device)
    out = torch.empty(b, hq, c, dtype=torch.float32, device=keys.device)
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"
    lse_k, col_k = _kernels()
    lse_k[(b, hq, triton.cdiv(nq, BLOCK_M))](
        queries, keys, val, pos, qpos, lse, queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), val.stride(0), val.stride(1), pos.stride(0), pos.stride(1),
        qpos.stride(0), lse.stride(0), lse.stride(1), nq, c, first, hq // h, float(scaling),
        D=d, BM=BLOCK_M, BN=BLOCK_N, PRECISION=precision, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    col_k[(b, hq, triton.cdiv(c, BLOCK_N))](
        queries, keys, val, pos, qpos, qval, lse, out, queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), val.stride(0), val.stride(1), pos.stride(0), pos.stride(1),
        qpos.stride(0), qval.stride(0), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        nq, c, first, hq // h, float(scaling),
        D=d, BM=BLOCK_M, BN=BLOCK_N, PRECISION=precision, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
