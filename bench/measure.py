"""Measurement utilities: timers, peak memory, KV-cache accounting and the quantile helpers.

Protocol (DESIGN.md, "Measurement protocol"):

- GPU: CUDA events recorded on the current stream, read after a ``torch.cuda.synchronize``; the caller
  synchronises before the first stamp so earlier queued work is not charged to the region.
- CPU: ``time.perf_counter``.
- Memory on CUDA: peak statistics are reset right before the region; the record is the peak *above* the
  allocated / reserved bytes at the start of the region (the weights plus whatever was alive then).
- Memory on CPU: the kernel's peak-RSS mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` (value
  ``5``); the record is the peak RSS during the region minus the RSS at its start, reported as
  ``peak_allocated``. CPU has no allocator "reserved" notion, so ``peak_reserved`` is ``None``. Where
  ``/proc`` is not writable (macOS, locked-down containers) both are ``None``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import torch

T = TypeVar("T")

# --- timing -------------------------------------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    return torch.device(device).type == "cuda"


class Timer:
    """Stamps points in time on a device and measures the milliseconds between two stamps.

    On CUDA a stamp is a ``torch.cuda.Event`` recorded on the current stream (no host sync at stamp time);
    ``elapsed_ms`` synchronises on the later event. On CPU a stamp is ``time.perf_counter()``.
    """

    def __init__(self, device: Any = "cpu"):
        self.device = torch.device(device)
        self.cuda = _is_cuda(self.device)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end))
        return (end - start) * 1e3

    @contextmanager
    def region(self) -> Iterator[Elapsed]:
        """``with timer.region() as r: ...`` then ``r.ms``; synchronises before starting."""
        self.synchronize()
        result = Elapsed(self)
        result.start = self.stamp()
        try:
            yield result
        finally:
            result.end = self.stamp()


@dataclass
class Elapsed:
    """The result of ``Timer.region``; ``ms`` is resolved (and the device synchronised) on first access."""

    timer: Timer
    start: Any = None
    end: Any = None
    _ms: Optional[float] = None

    @property
    def ms(self) -> float:
        if self._ms is None:
            if self.end is None:
                raise RuntimeError("region still running")
            self._ms = self.timer.elapsed_ms(self.start, self.end)
        return self._ms


# --- memory -------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak memory of a region above its starting level; filled when the ``peak_memory`` block exits."""

    device: str
    peak_allocated: Optional[int] = None
    peak_reserved: Optional[int] = None
    _base_alloc: int = 0
    _base_reserved: int = 0
    _cpu_ok: bool = False

    def as_dict(self) -> dict[str, Optional[int]]:
        return {"peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved}


def start_peak_memory(device: Any) -> PeakMemory:
    """Reset peak statistics and remember the starting level (call right before the measured region)."""
    dev = torch.device(device)
    rec = PeakMemory(str(dev))
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # so that "reserved" starts from what is actually in use
        torch.cuda.reset_peak_memory_stats(dev)
        rec._base_alloc = torch.cuda.memory_allocated(dev)
        rec._base_reserved = torch.cuda.memory_reserved(dev)
    else:
        rec._cpu_ok = _reset_cpu_peak()
        rss = _proc_status_kib("VmRSS")
        rec._cpu_ok = rec._cpu_ok and rss is not None
        rec._base_alloc = (rss or 0) * 1024
    return rec


def stop_peak_memory(rec: PeakMemory) -> PeakMemory:
    """Read the peaks of the region started by ``start_peak_memory`` into ``rec``."""
    dev = torch.device(rec.device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        rec.peak_allocated = max(0, torch.cuda.max_memory_allocated(dev) - rec._base_alloc)
        rec.peak_reserved = max(0, torch.cuda.max_memory_reserved(dev) - rec._base_reserved)
    elif rec._cpu_ok:
        hwm = _proc_status_kib("VmHWM")
        rec.peak_allocated = None if hwm is None else max(0, hwm * 1024 - rec._base_alloc)
        rec.peak_reserved = None
    return rec


@contextmanager
def peak_memory(device: Any) -> Iterator[PeakMemory]:
    """``with peak_memory(dev) as m: ...`` then ``m.peak_allocated`` / ``m.peak_reserved`` (bytes)."""
    rec = start_peak_memory(device)
    try:
        yield rec
    finally:
        stop_peak_memory(rec)


# --- KV cache accounting ------------------------------------------------------------------------------


def _cache_layers(cache: Any) -> list[Any]:
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return list(layers)
    # legacy tuple-of-tuples format: ((k, v), ...)
    return [_Pair(*pair[:2]) for pair in cache]


@dataclass
class _Pair:
    keys: Any
    values: Any


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def cache_bytes(cache: Any) -> int:
    """Bytes held by the cache's key and value tensors, summed over layers (measured, not estimated).

    Works with transformers 5.x caches (``cache.layers[i].keys/.values``) and the legacy tuple format.
    Quantised layers also count their ``_quantized_keys``/``_quantized_values`` when present.
    """
    total = 0
    for layer in _cache_layers(cache):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total


def cache_lengths(cache: Any) -> list[int]:
    """Tokens held per layer (the sequence dimension of each layer's keys; 0 for an empty layer)."""
    out = []
    for layer in _cache_layers(cache):
        keys = getattr(layer, "keys", None)
        out.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() >= 2 else 0)
    return out


# --- statistics ---------------------------------------------------------------------------------------


def quantile(values: Iterable[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default); NaN for no values."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return float("nan")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    pos = (len(vals) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def p50(values: Iterable[float]) -> float:
    return quantile(values, 0.5)


def p90(values: Iterable[float]) -> float:
    return quantile(values, 0.9)


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """(median, max - min) of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.median(vals), max(vals) - min(vals)


def summarize_repeats(runs: Sequence[dict[str, Optional[float]]]) -> dict[str, Optional[float]]:
    """Per key: the median over repeats; with more than one repeat also ``<key>_spread`` (max - min).

    ``None`` values (a quantity that does not apply) stay ``None``.
    """
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r if k not in keys]
    out: dict[str, Optional[float]] = {}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        if not vals:
            out[k] = None
            continue
        med, spread = median_spread(vals)
        out[k] = med
        if len(runs) > 1:
            out[f"{k}_spread"] = spread
    return out


def measured_repeats(run: Callable[[], T], device: Any, repeats: int,
                     warmup: int = 0) -> tuple[list[T], dict[str, Optional[int]]]:
    """``run()`` ``warmup`` times untimed, then ``repeats`` times (at least once), each inside ``peak_memory``.
    Returns the results and the worst ``peak_allocated``/``peak_reserved`` over the repeats (None: unknown)."""
    for _ in range(max(0, int(warmup))):
        run()
    results: list[T] = []
    peaks: list[dict[str, Optional[int]]] = []
    for _ in range(max(1, int(repeats))):
        with peak_memory(device) as mem:
            results.append(run())
        peaks.append(mem.as_dict())
    worst = {k: max((p[k] for p in peaks if p[k] is not None), default=None)
             for k in ("peak_allocated", "peak_reserved")}
    return results, worst


__all__ = [
    "Timer", "Elapsed", "PeakMemory", "peak_memory", "start_peak_memory", "stop_peak_memory", "measured_repeats",
    "cache_bytes", "cache_lengths", "quantile", "p50", "p90", "median_spread", "summarize_repeats",
]
