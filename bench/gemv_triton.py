"""Weight products of a decode step (a few rows against a large weight) in Triton (``measure.fuse_kernels``).

At decode a linear layer reads its whole weight to produce a few output rows: it is a GEMV, bound by HBM
bandwidth. cuBLAS picks GEMM tilings for these shapes that reach 3.3-3.9 TB/s of the H200's 4.8 TB/s inside a
Llama-3.1-8B decode step (``results/perf/kv/profile_*``), and the smaller products (q/k/v, o_proj, down with its
split-K reduction kernel) the least. This kernel gives each program a block of output features, streams that
block's weight rows once over the whole reduction dimension (no split-K, no second kernel) and multiplies by
the rows of ``x`` on tensor cores (``x`` padded to 16 rows inside the kernel, never in memory). Optionally it
applies the gated MLP's ``silu(gate) * up`` to a concatenated gate/up weight in its epilogue, so the MLP's
intermediate is written once and its activation needs no kernel of its own.

The technique is the standard memory-bound GEMV (e.g. Triton's split-K matmul tutorial and gemlite,
https://github.com/mobiusml/gemlite); written here for the decode step. Numerics: float32 accumulation,
rounded once to the output dtype like cuBLAS; the summation order differs (as between cuBLAS algorithms).
The gated epilogue rounds gate and up to the input dtype first and the activation before the product, as
``F.silu(gate) * up`` on bfloat16 tensors does.

On CPU tensors the kernel runs only in Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tokenbench.triton_support import runs_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None

MAX_ROWS = 16  # rows of x one program multiplies (the tensor-core tile's smallest side)


@dataclass(frozen=True)
class Config:
    """A launch configuration of the GEMV kernel."""

    block_n: int  # output features per program
    block_k: int  # reduction elements per loop iteration
    num_warps: int = 4
    num_stages: int = 3  # software-pipelined loads in flight


# weight (rows, columns) -> config, the fastest at 8 rows on an H200 (results/perf/kv/gemv_triton_h200.json,
# bench_gemv.py --triton): Llama-3.1-8B's q/k/v, o_proj, gate/up (gated), down, lm_head
TUNED: dict[tuple[int, int], Config] = {
    (6144, 4096): Config(64, 128, 4, 5), (4096, 4096): Config(32, 256, 4, 5), (28672, 4096): Config(64, 128, 4, 3),
    (4096, 14336): Config(32, 256, 4, 5), (128256, 4096): Config(64, 256, 4, 3)}


def config_for(n: int, k: int) -> Config:
    """The tuned configuration of a weight shape, else by analogy: wide weights (many programs) take the
    gate/up's, narrow ones the o_proj/down's."""
    return TUNED.get((n, k)) or (Config(64, 128, 4, 3) if n >= 16384 else Config(32, 256, 4, 5))


def _gemv(X, W, Y, M, N, K, sx, sw, sy, HALF,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    k = tl.arange(0, BK)
    nm = n < N
    mm = m < M
    acc = tl.zeros([BM, BN], tl.float32)
    acc_up = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + k
        if EVEN:  # N % BN == 0 and K % BK == 0: the weight loads need no mask
            w = tl.load(W + n[:, None] * sw + kk[None, :])
        else:
            w = tl.load(W + n[:, None] * sw + kk[None, :], mask=nm[:, None] & (kk < K)[None, :], other=0.0)
        x = tl.load(X + m[:, None] * sx + kk[None, :], mask=mm[:, None] & (kk < K)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        if GATED:  # the up projection's rows sit HALF rows below the gate's
            if EVEN:
                u = tl.load(W + (n[:, None] + HALF) * sw + kk[None, :])
            else:
                u = tl.load(W + (n[:, None] + HALF) * sw + kk[None, :], mask=nm[:, None] & (kk < K)[None, :],
                            other=0.0)
            acc_up += tl.dot(x, tl.trans(u))
    dt = Y.dtype.element_ty
    if GATED:
        g = acc.to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        out = (act * acc_up.to(dt).to(tl.float32)).to(dt)
    else:
        out = acc.to(dt)
    tl.store(Y + m[:, None] * sy + n[None, :], out, mask=mm[:, None] & nm[None, :])


@lru_cache(maxsize=None)
def _kernel() -> Any:
    return triton.jit(_gemv)  # the interpreter's jit when TRITON_INTERPRET=1 was set before triton's import


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this product: a GPU (or the interpreter), at most ``MAX_ROWS`` rows, a 2-D
    row-major weight of the input's dtype (half precision)."""
    if not runs_on(x):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return (0 < rows <= MAX_ROWS and weight.dim() == 2 and weight.stride(-1) == 1 and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and weight.shape[1] == x.shape[-1])


def _launch(x: torch.Tensor, weight: torch.Tensor, n_out: int, gated: bool, config: Optional[Config]) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    cfg = config or config_for(weight.shape[0], k)
    even = n_out % cfg.block_n == 0 and k % cfg.block_k == 0
    _kernel()[(triton.cdiv(n_out, cfg.block_n),)](
        x2, weight, y, rows, n_out, k, x2.stride(0), weight.stride(0), y.stride(0), n_out if gated else 0,
        BM=MAX_ROWS, BN=cfg.block_n, BK=cfg.block_k, EVEN=even, GATED=gated,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(*x.shape[:-1], n_out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           config: Optional[Config] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; the Triton GEMV when ``supported``, else ``F.linear`` itself."""
    if not supported(x, weight):
        return F.linear(x, weight, bias)
    y = _launch(x, weight, weight.shape[0], False, config)
    return y if bias is None else y + bias


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, config: Optional[Config] = None) -> torch.Tensor:
    """``silu(gate) * up`` with ``gate, up = F.linear(x, weight).chunk(2, -1)`` (``weight`` = gate rows over up
    rows), in one kernel when ``supported``."""
    if weight.shape[0] % 2:
        raise ValueError(f"gated GEMV: the weight stacks gate over up rows, an even count; got {weight.shape[0]}")
    half = weight.shape[0] // 2
    if not supported(x, weight):
        gate, up = F.linear(x, weight).split(half, dim=-1)
        return F.silu(gate) * up
    return _launch(x, weight, half, True, config)
