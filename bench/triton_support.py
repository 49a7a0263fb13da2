"""Where tokenbench's Triton kernels can run (``gemv_triton``, ``kv_accumulated_triton``, the decode write of
``kv_decode_triton``)."""

from __future__ import annotations

import os

import torch


def runs_on(t: torch.Tensor) -> bool:
    """A CUDA tensor; or a CPU tensor under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
    imported: tests) unless it is bfloat16, which the interpreter mangles."""
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
        return False
    if t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and t.dtype != torch.bfloat16
