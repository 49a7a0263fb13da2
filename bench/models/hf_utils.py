"""Small helpers shared by the model entries: device and dtype resolution, weight accounting."""

from __future__ import annotations

import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenbench.errors import TokenbenchError

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def cache_kwarg(module: Any) -> str:
    """The keyword under which a transformers model's ``forward`` takes its KV cache: ``cache`` in recent
    releases, ``past_key_values`` before."""
    return _cache_kwarg_of(type(module).forward)


@lru_cache(maxsize=None)
def _cache_kwarg_of(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def check_dtype_device(name: str, dtype: str, device: str) -> None:
    """A model spec's ``dtype``/``device`` settings, checked when the spec is built (one line each)."""
    if dtype not in _DTYPES:
        raise TokenbenchError(f"{name}: unknown dtype '{dtype}' (use {', '.join(_DTYPES)})")
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise TokenbenchError(f"{name}: unknown device '{device}' (use auto, cpu, cuda or cuda:N)")


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


# --- Hugging Face Hub access (fast failure when offline) --------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_reachable_cache: dict[str, bool] = {}


def hub_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    The environment is read at call time: huggingface_hub reads it only once, at import.
    """
    import os

    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().lower() in _TRUE for v in env) or bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    import os

    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub endpoint answers an HTTP request within ``timeout`` seconds (memoised per process).

    transformers retries an unreachable hub for most of a minute before giving up; this check costs
    milliseconds when DNS fails and at most ``timeout`` seconds otherwise (DNS included, via a thread).
    """
    import threading

    if hub_offline():
        return False
    endpoint = hub_endpoint()
    if endpoint in _reachable_cache:
        return _reachable_cache[endpoint]
    answer: list[bool] = []

    def probe() -> None:
        import httpx

        try:  # any HTTP answer below 500 means the hub is there (httpx honours HTTPS_PROXY and friends)
            answer.append(httpx.head(endpoint, timeout=timeout, follow_redirects=False).status_code < 500)
        except Exception:  # noqa: BLE001 (DNS, TLS, proxy, timeout: all mean "not reachable")
            answer.append(False)

    thread = threading.Thread(target=probe, name="tokenbench-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _reachable_cache[endpoint] = bool(answer and answer[0])
    return _reachable_cache[endpoint]


def tokenbench_cache_dir() -> Path:
    """Where tokenbench keeps converted models and other derived files: ``$TOKENBENCH_CACHE`` or
    ``~/.cache/tokenbench``."""
    import os

    return Path(os.environ.get("TOKENBENCH_CACHE") or Path.home() / ".cache" / "tokenbench").expanduser()
