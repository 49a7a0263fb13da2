"""Statistics: numeric coercion, percentile-bootstrap intervals, Pareto fronts, a task's fronts and rank."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# Pareto axes: candidates in order of preference, with "higher is better" for each.
LATENCY_AXIS = (("e2e_ms", False), ("ttft_ms", False), ("images_per_s", True))
MEMORY_AXIS = (("kv_cache_bytes", False), ("peak_allocated", False))
KEEP_AXIS = (("achieved_keep_ratio", False),)
FRONTS = {"latency": LATENCY_AXIS, "memory": MEMORY_AXIS, "keep_ratio": KEEP_AXIS}


def _num(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _floats(series: Any) -> np.ndarray:
    """A column as a float array (missing values, nullable integers' NA included, as NaN)."""
    return np.array([_num(v) for v in series], dtype=float)


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: percentile bootstrap interval of the mean of ``values``.

    Non-finite values are dropped. No values: all NaN. All values equal (or one value): ``lo == hi == mean``
    exactly. ``n_resamples <= 0``: the interval is NaN. Deterministic for a given ``seed``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(arr.mean())
    if np.all(arr == arr[0]):
        value = float(arr[0])
        return (value, value, value)
    if n_resamples <= 0:
        return (mean, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // arr.size)  # bound memory for very large sample sets
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))
        means[start:stop] = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (mean, float(lo), float(hi))


def pareto_front(x: Sequence[float], y: Sequence[float], *, x_higher_better: bool = False,
                 y_higher_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    ``j`` dominates ``i`` when it is at least as good on both axes and strictly better on one. Points with a
    missing (NaN/None) coordinate are never on the front and dominate nothing; identical points are all on
    the front.
    """
    xs = np.array([_num(v) for v in x], dtype=float)
    ys = np.array([_num(v) for v in y], dtype=float)
    if xs.shape != ys.shape:
        raise ValueError("x and y must have the same length")
    # Orient both axes so that larger is better.
    gx = xs if x_higher_better else -xs
    gy = ys if y_higher_better else -ys
    valid = np.isfinite(gx) & np.isfinite(gy)
    on = valid.copy()
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        ge = (gx >= gx[i]) & (gy >= gy[i])
        gt = (gx > gx[i]) | (gy > gy[i])
        if np.any(others & ge & gt):
            on[i] = False
    return on


def pick_axis(frame: pd.DataFrame, candidates: Sequence[tuple[str, bool]]) -> tuple[str, bool] | None:
    """The first candidate column with a value for some ok run."""
    ok = frame[frame["status"] == "ok"]
    for col, higher in candidates:
        if col in ok.columns and ok[col].notna().any():
            return col, higher
    return None


def add_fronts(frame: pd.DataFrame, main: str | None) -> tuple[pd.DataFrame, dict[str, tuple]]:
    """``pareto_<axis>`` columns (bool) and ``rank`` for one task's rows; returns the axes used."""
    frame = frame.copy()
    axes: dict[str, tuple] = {}
    metric = f"metrics.{main}" if main else None
    ok = (frame["status"] == "ok").to_numpy()
    y = _floats(frame[metric]) if metric in frame.columns else np.full(len(frame), math.nan)
    y = np.where(ok, y, math.nan)
    for name, candidates in FRONTS.items():
        axis = pick_axis(frame, candidates)
        if axis is None:
            frame[f"pareto_{name}"] = False
            continue
        col, higher = axis
        axes[name] = axis
        x = np.where(ok, _floats(frame[col]), math.nan)
        frame[f"pareto_{name}"] = pareto_front(x, y, x_higher_better=higher, y_higher_better=True)
    if metric in frame.columns:
        ranked = frame[metric].where(frame["status"] == "ok").rank(method="min", ascending=False)
        frame["rank"] = ranked.astype("Int64")
    else:
        frame["rank"] = None
    return frame, axes
