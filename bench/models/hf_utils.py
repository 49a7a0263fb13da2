"""Small helpers shared by the model entries: device and dtype resolution, weight accounting."""

from __future__ import annotations

from tokenbench.errors import TokenbenchError

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TokenbenchError(f"device '{device}' requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise TokenbenchError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)")
    return device


def resolve_dtype(dtype: str, device: str):
    """``auto`` is bfloat16 on a GPU that supports it, float32 elsewhere."""
    import torch

    if dtype not in _DTYPES:
        raise TokenbenchError(f"unknown dtype '{dtype}' (use {', '.join(_DTYPES)})")
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def count_weight_bytes(model) -> int:
    """Bytes held by parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
