"""Leaderboards: a pandas view over the result records, as tables, Pareto plots and a W&B leaderboard run.

``build_leaderboard(results_dir, out_dir)`` reads every ``result.json`` under ``results_dir`` (a record is a
JSON object with ``run_key``, ``status`` and ``task``; anything else, such as Hydra's files under
``_sweeps/``, is ignored) and writes, per task::

    <out>/<task>.md | .csv | .html     method × budget → metrics with bootstrap CIs, achieved keep ratio,
                                       latency, memory, Pareto membership (failed runs with their error)
    <out>/<task>_pareto.png            main metric vs latency, vs memory, vs achieved keep ratio
    <out>/<task>_heatmaps.png          needle-in-a-haystack tasks: every run's depth × length heatmap
    <out>/README.md, index.html        an index linking all of it
    <out>/runs.csv                     the whole frame (every run of every task, all columns)
    <out>/wandb/                       the W&B leaderboard run (offline by default; ``wandb sync`` uploads it)

Definitions
-----------
- One row per run. The same run key found twice (results copied between folders) is kept once: the ``ok``
  copy, else the latest ``finished_at``. ``run_dir`` is the folder the record was found in.
- Columns: identity (``task, model, method, family, label, keep_ratio, n_keep, phase, query_aware, status,
  error``), ``metrics.<name>`` for every metric of the record (per-bucket ones such as ``accuracy@len512``
  included), ``metrics.<name>.ci_lo/.ci_hi`` for every per-sample metric, ``achieved_keep_ratio``, the latency
  headline values (median over samples) and p90s (``prefill_ms, ttft_ms, tpot_ms, e2e_ms, images_per_s`` and
  ``<key>_p90``, those present), memory (``peak_allocated, kv_cache_bytes, weights_bytes``, bytes),
  ``n_samples, n_samples_expected``, ``pareto_latency, pareto_memory, pareto_keep_ratio`` (bools), ``rank``
  (by the main metric, 1 = best, ties share a rank), ``run_key, sweep, finished_at, run_dir``.
- ``label``: ``method@keep_ratio`` (``@n=<n_keep>`` for absolute budgets; the bare method name at keep-all);
  when two runs of a task would share a label, the config fields that tell them apart are appended.
- Main metric of a task: the task class's ``primary_metric`` attribute when it has one (looked up in
  ``tokenbench.registry.TASKS``), else the first metric key of the task's records that is not per-bucket (no
  ``@``). Higher is better (the task contract: every metric is higher-is-better).
- Confidence intervals: percentile bootstrap of the per-sample mean over the run's ``samples.jsonl`` (each
  sample once, as the run aggregated them), ``bootstrap`` resamples (default 1000) at ``confidence``
  (default 95 %), seeded: the same seed gives the same intervals whatever else is in the leaderboard. Tables
  show ``value [lo, hi]``, where ``value`` is the record's metric (the task's own aggregate).
- Pareto fronts (ok runs only; a run without the axis' value is off that front): the main metric (higher is
  better) against latency (``e2e_ms``, else ``ttft_ms`` — lower is better — else ``images_per_s`` — higher
  is better), memory (``kv_cache_bytes``, else ``peak_allocated``; lower is better) and achieved keep ratio
  (lower = more compression). A run is on a front when no other run is at least as good on both axes and
  strictly better on one; identical points are all on it.
- W&B: a run with ``job_type="leaderboard"``, in group ``sweep`` (or the records' one sweep name), holding
  a ``wandb.Table`` per task (``leaderboard/<task>``) and the plots (``pareto/<task>``, ``heatmaps/<task>``).
  The local files are written first; a W&B failure is reported and never loses them.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenbench.results import SampleLog

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")
LATENCY_KEYS = ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms", "images_per_s")
MEMORY_KEYS = ("peak_allocated", "kv_cache_bytes", "weights_bytes")
# Pareto axes: candidates in order of preference, with "higher is better" for each.
LATENCY_AXIS = (("e2e_ms", False), ("ttft_ms", False), ("images_per_s", True))
MEMORY_AXIS = (("kv_cache_bytes", False), ("peak_allocated", False))
KEEP_AXIS = (("achieved_keep_ratio", False),)
FRONTS = {"latency": LATENCY_AXIS, "memory": MEMORY_AXIS, "keep_ratio": KEEP_AXIS}
HEATMAP_TASKS = ("niah",)  # also any task whose samples carry meta.context_length and meta.depth

_IDENTITY = ["task", "model", "method", "family", "label", "keep_ratio", "n_keep", "phase", "query_aware",
             "status", "error", "rank"]
_TEXT_COLUMNS = ("task", "model", "method", "family", "label", "phase", "status", "error", "run_key", "sweep",
                 "finished_at", "run_dir")
_TAIL = ["n_samples", "n_samples_expected", "run_key", "sweep", "finished_at", "run_dir"]


# --- reading -------------------------------------------------------------------------------------------


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in ("run_key", "status", "task"))


def load_records(results_dir: str | Path, *, sweep: str | None = None,
                 tasks: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every result record under ``results_dir`` (recursively), one per run key, filtered by sweep/tasks.

    Each record gets ``run_dir`` set to the folder it was found in (the recorded path may be stale after a
    copy). Files that are not records (unreadable JSON, other shapes) are skipped with a warning.
    """
    root = Path(results_dir)
    wanted = set(tasks) if tasks else None
    by_key: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("result.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("unreadable result record %s (%s); skipped", path, exc)
            continue
        if not _is_record(rec):
            log.warning("%s is not a result record; skipped", path)
            continue
        if sweep is not None and rec.get("sweep") != sweep:
            continue
        if wanted is not None and rec.get("task") not in wanted:
            continue
        rec = {**rec, "run_dir": str(path.parent)}
        key = str(rec["run_key"])
        if key in by_key:
            old = by_key[key]
            log.warning("run %s found twice (%s, %s); keeping one", key, old["run_dir"], rec["run_dir"])
            rank = lambda r: (r.get("status") == "ok", str(r.get("finished_at") or ""))
            if rank(rec) <= rank(old):
                continue
        by_key[key] = rec
    return list(by_key.values())


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's per-sample rows, each sample once (the first row of an id wins, as the run aggregated)."""
    rows, seen = [], set()
    for r in SampleLog(Path(run_dir) / "samples.jsonl").read():
        sid = r.get("sample_id")
        if sid in seen:
            continue
        seen.add(sid)
        rows.append(r)
    return rows


# --- statistics ----------------------------------------------------------------------------------------


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


# --- the frame -----------------------------------------------------------------------------------------


def _num(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _fmt_budget_value(v: float) -> str:
    return f"{v:g}"


def budget_of(rec: dict[str, Any]) -> dict[str, Any]:
    """Nominal keep_ratio / n_keep / phase (from ``budget``, else from the method params of e.g. an invalid
    config)."""
    budget = rec.get("budget") or {}
    params = rec.get("method_params") or {}
    out = {}
    for k in ("keep_ratio", "n_keep", "phase"):
        out[k] = budget[k] if k in budget else params.get(k)
    return out


def base_label(method: str, keep_ratio: Any, n_keep: Any) -> str:
    if n_keep is not None and not (isinstance(n_keep, float) and math.isnan(n_keep)):
        return f"{method}@n={int(n_keep)}"
    kr = _num(keep_ratio)
    if math.isnan(kr) or kr == 1.0:  # keep-all (an invalid ratio such as 1.5 stays visible)
        return method
    return f"{method}@{_fmt_budget_value(kr)}"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


def _distinguishing(recs: list[dict[str, Any]]) -> list[str]:
    """Short ``k=v`` suffixes that tell same-labelled runs apart (model, method and task params)."""
    flats = []
    for r in recs:
        f = {"model": r.get("model")}
        f.update({k: v for k, v in _flat(r.get("method_params") or {}).items()
                  if k not in ("keep_ratio", "n_keep")})
        f.update(_flat(r.get("task_params") or {}, "task."))
        flats.append(f)
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
    out = []
    for r, f in zip(recs, flats):
        parts = [f"{k}={f.get(k)}" for k in varying]
        out.append(", ".join(parts) if parts else str(r["run_key"])[:8])
    return out


def _assign_labels(records: list[dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        b = budget_of(r)
        groups.setdefault((r["task"], base_label(r.get("method", "?"), b["keep_ratio"], b["n_keep"])),
                          []).append(r)
    for (_, label), recs in groups.items():
        if len(recs) == 1:
            labels[recs[0]["run_key"]] = label
            continue
        for r, suffix in zip(recs, _distinguishing(recs)):
            labels[r["run_key"]] = f"{label} ({suffix})"
    return labels


def _sample_metric_values(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in rows:
        for k, v in (r.get("metrics") or {}).items():
            if isinstance(v, (int, float)):  # bools count as 0/1
                out.setdefault(k, []).append(float(v))
    return out


def main_metric(task: str, metric_keys: Iterable[str]) -> str | None:
    """The task's ``primary_metric`` attribute (registered task class), else the first key without ``@``."""
    keys = list(metric_keys)
    primary = _primary_metric_attr(task)
    if primary:
        return primary
    for k in keys:
        if "@" not in k:
            return k
    return keys[0] if keys else None


def _primary_metric_attr(task: str) -> str | None:
    from tokenbench import registry

    def lookup() -> str | None:
        if task not in registry.TASKS:
            return None
        for entry in registry.TASKS.entries(task):
            value = getattr(entry.cls, "primary_metric", None)
            if isinstance(value, str) and value:
                return value
        return ""

    try:
        found = lookup()
        if found is None:  # not imported yet: the built-in task modules (light), then everything (plugins)
            registry._import_all("tokenbench.tasks")
            found = lookup()
        if found is None:
            registry.load_all()
            found = lookup()
        return found or None
    except Exception as exc:  # an unimportable task module must not stop the leaderboard
        log.warning("could not look up task '%s' in the registry (%s); using its first metric", task, exc)
        return None


def records_frame(records: list[dict[str, Any]], *, bootstrap: int = 1000, seed: int = 0,
                  confidence: float = 0.95, samples: dict[str, list[dict[str, Any]]] | None = None
                  ) -> pd.DataFrame:
    """One row per record (see the module docstring for the columns), without the Pareto/rank columns.

    ``samples`` (run_key -> rows) is filled with the runs' sample rows when given (so callers can reuse
    them); CI columns are computed when ``bootstrap > 0``.
    """
    import pandas as pd

    labels = _assign_labels(records)
    rows: list[dict[str, Any]] = []
    metric_order: list[str] = []
    latency_cols: list[str] = []
    for rec in records:
        for k in rec.get("metrics") or {}:
            if k not in metric_order:
                metric_order.append(k)
        for k in LATENCY_KEYS:
            for col in (k, f"{k}_p90"):
                if col in (rec.get("latency") or {}) and col not in latency_cols:
                    latency_cols.append(col)
    latency_cols.sort(key=lambda c: (LATENCY_KEYS.index(c.removesuffix("_p90")), c.endswith("_p90")))

    for rec in records:
        b = budget_of(rec)
        extra = rec.get("extra") or {}
        query_aware = extra.get("query_aware", (rec.get("method_params") or {}).get("query_aware"))
        row: dict[str, Any] = {
            "task": rec.get("task"),
            "model": rec.get("model"),
            "method": rec.get("method"),
            "family": rec.get("family") or None,
            "label": labels[rec["run_key"]],
            "keep_ratio": _num(b["keep_ratio"]),
            "n_keep": _num(b["n_keep"]),
            "phase": b["phase"],
            "query_aware": bool(query_aware) if isinstance(query_aware, (bool, int)) else math.nan,
            "status": rec.get("status"),
            "error": rec.get("error"),
        }
        metrics = rec.get("metrics") or {}
        rows_of_run: list[dict[str, Any]] = []
        if (bootstrap > 0 or samples is not None) and rec.get("run_dir"):
            rows_of_run = read_samples(rec["run_dir"])
            if samples is not None:
                samples[rec["run_key"]] = rows_of_run
        per_sample = _sample_metric_values(rows_of_run)
        for k in metric_order:
            row[f"metrics.{k}"] = _num(metrics.get(k))
            if bootstrap > 0 and "@" not in k:
                _, lo, hi = bootstrap_ci(per_sample.get(k, []), n_resamples=bootstrap, confidence=confidence,
                                         seed=seed)
                row[f"metrics.{k}.ci_lo"], row[f"metrics.{k}.ci_hi"] = lo, hi
        row["achieved_keep_ratio"] = _num(rec.get("achieved_keep_ratio"))
        lat, mem = rec.get("latency") or {}, rec.get("memory") or {}
        for col in latency_cols:
            row[col] = _num(lat.get(col))
        for col in MEMORY_KEYS:
            row[col] = _num(mem.get(col))
        row["n_samples"] = int(rec.get("n_samples") or 0)
        row["n_samples_expected"] = int(rec.get("n_samples_expected") or 0)
        row["run_key"] = str(rec["run_key"])
        row["sweep"] = rec.get("sweep")
        row["finished_at"] = rec.get("finished_at")
        row["run_dir"] = rec.get("run_dir")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for col in _TEXT_COLUMNS:  # text with gaps: pandas' string dtype (missing = NaN), as read_csv gives back
        frame[col] = frame[col].astype("str")
    for col in MEMORY_KEYS:  # byte counts stay integers next to a failed run's gap
        values = frame[col].dropna()
        if len(values) and (values == values.round()).all():
            frame[col] = frame[col].astype("Int64")
    # Rows where every metric is NaN keep their CI columns NaN too; drop all-NaN CI columns (a metric only
    # present in records, e.g. a corpus-level score with no per-sample value).
    ci_cols = [c for c in frame.columns if c.endswith((".ci_lo", ".ci_hi"))]
    frame = frame.drop(columns=[c for c in ci_cols if frame[c].isna().all()])
    return frame


def _floats(series: Any) -> np.ndarray:
    """A column as a float array (missing values, nullable integers' NA included, as NaN)."""
    return np.array([_num(v) for v in series], dtype=float)


def _sort_key(frame: pd.DataFrame) -> pd.DataFrame:
    order = frame.assign(
        _failed=frame["status"] != "ok",
        _baseline=frame["method"] != "none",
        _kr=-frame["keep_ratio"].fillna(1.0),
        _nk=-frame["n_keep"].fillna(math.inf),
    )
    order = order.sort_values(["_failed", "model", "_baseline", "method", "_nk", "_kr", "label"],
                              kind="stable")
    return order.drop(columns=["_failed", "_baseline", "_kr", "_nk"])


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


def _order_columns(frame: pd.DataFrame, main: str | None) -> pd.DataFrame:
    metric_cols = [c for c in frame.columns if c.startswith("metrics.")]
    main_cols = [c for c in metric_cols if main and c in (f"metrics.{main}", f"metrics.{main}.ci_lo",
                                                           f"metrics.{main}.ci_hi")]
    rest = [c for c in metric_cols if c not in main_cols]
    headline = [c for c in rest if "@" not in c]
    buckets = [c for c in rest if "@" in c]
    lat = [c for c in frame.columns if c.removesuffix("_p90") in LATENCY_KEYS]
    pareto = [c for c in frame.columns if c.startswith("pareto_")]
    cols = ([c for c in _IDENTITY if c in frame.columns] + main_cols + headline + ["achieved_keep_ratio"]
            + lat + [c for c in MEMORY_KEYS if c in frame.columns] + pareto + buckets
            + [c for c in _TAIL if c in frame.columns])
    cols += [c for c in frame.columns if c not in cols]
    return frame[cols]


# --- display -------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    f = _num(v)
    if math.isnan(f):
        return ""
    return f"{f:.{digits}f}"


def _fmt_mag(v: Any) -> str:
    f = _num(v)
    if math.isnan(f):
        return ""
    a = abs(f)
    if a >= 100:
        return f"{f:.0f}"
    if a >= 10:
        return f"{f:.1f}"
    if a >= 0.1 or a == 0:
        return f"{f:.2f}"
    return f"{f:.3g}"


def _bytes_unit(values: Iterable[float]) -> tuple[str, float]:
    finite = [abs(v) for v in values if not math.isnan(_num(v))]
    top = max(finite) if finite else 0.0
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= scale:
            return unit, float(scale)
    return "B", 1.0


def _with_ci(row: Any, metric: str) -> str:
    value = _fmt(row.get(f"metrics.{metric}"))
    lo, hi = row.get(f"metrics.{metric}.ci_lo"), row.get(f"metrics.{metric}.ci_hi")
    if value and not math.isnan(_num(lo)) and not math.isnan(_num(hi)):
        return f"{value} [{_fmt(lo)}, {_fmt(hi)}]"
    return value


_LAT_NAMES = {"prefill_ms": "prefill ms", "ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms", "e2e_ms": "e2e ms",
              "images_per_s": "images/s"}
_FRONT_NAMES = {"latency": "latency", "memory": "memory", "keep_ratio": "keep ratio"}


def display_table(frame: pd.DataFrame, main: str | None, *, max_error: int = 80) -> pd.DataFrame:
    """The human table of one task: strings, headline metrics as ``value [lo, hi]``, latency as
    ``p50 / p90``, memory in a readable unit, the fronts a run is on, failed runs with their error."""
    import pandas as pd

    metrics = [c.removeprefix("metrics.") for c in frame.columns
               if c.startswith("metrics.") and not c.endswith((".ci_lo", ".ci_hi")) and "@" not in c]
    if main in metrics:
        metrics = [main] + [m for m in metrics if m != main]
    show_model = frame["model"].nunique(dropna=True) > 1
    budgeted = frame[frame["method"] != "none"]
    show_phase = budgeted["phase"].dropna().astype(str).nunique() > 1
    show_qa = frame["query_aware"].dropna().astype(str).nunique() > 1
    show_error = frame["error"].notna().any()
    mem_units = {k: _bytes_unit(frame[k]) for k in MEMORY_KEYS if k in frame.columns}
    out = []
    for _, row in frame.iterrows():
        label = str(row["label"])
        head, _, suffix = label.partition(" (")  # "method@budget (what tells it apart)"
        method, _, budget = head.partition("@")
        if not budget:
            kr = _num(row["keep_ratio"])
            budget = "full" if math.isnan(kr) or kr == 1.0 else ""
        d: dict[str, Any] = {"rank": "" if pd.isna(row.get("rank")) else str(row["rank"]),
                             "method": method + (f" ({suffix}" if suffix else "")}
        if show_model:
            d["model"] = row["model"]
        d["budget"] = budget
        if show_phase:
            d["phase"] = row["phase"] if isinstance(row["phase"], str) else ""
        if show_qa:
            d["query aware"] = "" if pd.isna(row["query_aware"]) else str(bool(row["query_aware"]))
        d["status"] = row["status"]
        for m in metrics:
            d[m + (" (main)" if m == main else "")] = _with_ci(row, m)
        d["achieved keep"] = _fmt(row["achieved_keep_ratio"])
        for k in LATENCY_KEYS:
            if k in frame.columns:
                p50, p90 = _fmt_mag(row[k]), _fmt_mag(row.get(f"{k}_p90"))
                d[f"{_LAT_NAMES[k]} (p50 / p90)"] = f"{p50} / {p90}" if p50 and p90 else p50
        for k, (unit, scale) in mem_units.items():
            name = {"peak_allocated": "peak", "kv_cache_bytes": "KV cache", "weights_bytes": "weights"}[k]
            d[f"{name} {unit}"] = _fmt_mag(_num(row[k]) / scale)
        fronts = [_FRONT_NAMES[n] for n in FRONTS if bool(row.get(f"pareto_{n}", False))]
        d["Pareto"] = ", ".join(fronts)
        d["n"] = f"{row['n_samples']}/{row['n_samples_expected']}"
        if show_error:
            err = "" if pd.isna(row["error"]) else " ".join(str(row["error"]).split())
            d["error"] = err if len(err) <= max_error else err[: max_error - 1] + "…"
        out.append(d)
    return pd.DataFrame(out)


# --- plots ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas (no pyplot, no global backend change), with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_AXIS_NAMES = {"e2e_ms": "end-to-end latency (ms, median)", "ttft_ms": "time to first token (ms, median)",
               "images_per_s": "throughput (images/s, higher is better)",
               "kv_cache_bytes": "KV cache", "peak_allocated": "peak memory above weights",
               "achieved_keep_ratio": "achieved keep ratio (lower = more compression)"}


def plot_pareto(frame: pd.DataFrame, main: str | None, axes: dict[str, tuple], path: Path,
                title: str) -> Path | None:
    """One panel per Pareto axis: every ok run labelled, front members filled, the front drawn as steps."""
    from matplotlib import colormaps

    if not main or f"metrics.{main}" not in frame.columns or not axes:
        return None
    ok = frame[frame["status"] == "ok"]
    methods = sorted(frame["method"].dropna().unique(), key=lambda m: (m != "none", m))
    palette = colormaps["tab10"]
    colors = {m: palette(i % 10) for i, m in enumerate(methods)}
    n = len(axes)
    fig = _figure(5.2 * n, 4.6)
    excluded = frame[frame["status"] != "ok"]
    for i, (name, (col, higher)) in enumerate(axes.items()):
        ax = fig.add_subplot(1, n, i + 1)
        scale, unit = 1.0, ""
        if col in MEMORY_KEYS:
            unit, scale = _bytes_unit(ok[col])
        x = _floats(ok[col]) / scale
        y = _floats(ok[f"metrics.{main}"])
        lo = ok.get(f"metrics.{main}.ci_lo")
        hi = ok.get(f"metrics.{main}.ci_hi")
        on = ok[f"pareto_{name}"].to_numpy(dtype=bool)
        has = np.isfinite(x) & np.isfinite(y)
        for j in np.flatnonzero(has):
            c = colors.get(ok["method"].iloc[j], "grey")
            if lo is not None and np.isfinite(lo.iloc[j]) and np.isfinite(hi.iloc[j]):
                ax.errorbar(x[j], y[j], yerr=[[max(0.0, y[j] - lo.iloc[j])], [max(0.0, hi.iloc[j] - y[j])]],
                            fmt="none", ecolor=c, alpha=0.35, capsize=2, lw=1, zorder=1)
            ax.scatter([x[j]], [y[j]], s=46, zorder=3, color=c if on[j] else "white", edgecolors=[c],
                       linewidths=1.5)
        # The front as a staircase: the best main metric reachable at each cost.
        fx, fy = x[on & has], y[on & has]
        if fx.size:
            order = np.lexsort((fy, fx))
            fx, fy = fx[order], fy[order]
            if fx.size > 1:
                ax.step(fx, fy, where="pre" if higher else "post", color="black", lw=1.2, ls="--", zorder=2,
                        label="Pareto front")
            else:
                ax.plot(fx, fy, color="black", lw=0, label="Pareto front")
        # Labels; points at the same coordinates share one label; labels of nearby points stack upwards.
        spots: dict[tuple[float, float], list[str]] = {}
        for j in np.flatnonzero(has):
            spot = (round(float(x[j]), 9), round(float(y[j]), 9))
            spots.setdefault(spot, []).append(str(ok["label"].iloc[j]))
        placed: list[tuple[float, float, int, int]] = []  # x, y, first line level, lines
        xr = float(np.ptp(x[has])) if has.any() else 0.0
        yr = float(np.ptp(y[has])) if has.any() else 0.0
        for (px, py), names in sorted(spots.items()):
            near = [(lv, n) for qx, qy, lv, n in placed
                    if abs(qx - px) <= 0.3 * xr + 1e-12 and abs(qy - py) <= 0.08 * max(yr, 1e-12) + 1e-12]
            level = max((lv + n for lv, n in near), default=0)
            placed.append((px, py, level, len(names)))
            ax.annotate("\n".join(names), (px, py), xytext=(5, 5 + 9 * level), textcoords="offset points",
                        fontsize=7, va="bottom", ha="left", color="#222222", zorder=4,
                        bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6},
                        arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6} if level else None)
        yvals = [float(v) for v in y[has]]
        for bound in (lo, hi):
            if bound is not None:
                yvals += [v for v in _floats(bound) if np.isfinite(v)]
        if yvals and 0.0 <= min(yvals) and max(yvals) <= 1.0:  # a score in [0, 1]: show the whole scale
            ax.set_ylim(-0.06, 1.1)
        ax.set_xlabel(_AXIS_NAMES.get(col, col) + (f" ({unit})" if unit else ""), fontsize=9)
        ax.set_ylabel(f"{main} (higher is better)", fontsize=9)
        ax.set_title(f"{main} vs {_FRONT_NAMES[name]}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.2, y=0.15)
        ax.tick_params(labelsize=8)
    handles = [fig.axes[0].scatter([], [], color=colors[m], s=40, label=m) for m in methods
               if m in set(ok["method"])]
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", ls="--", label="Pareto front (filled = on it)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    note = ""
    if len(excluded):
        note = "not plotted (" + ", ".join(f"{r.label}: {r.status}" for r in excluded.itertuples()) + ")"
        if len(note) > 160:
            note = note[:159] + "…"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _heatmap_cells(rows: list[dict[str, Any]], metric: str) -> dict[tuple[int, float], float]:
    cells: dict[tuple[int, float], list[float]] = {}
    for r in rows:
        meta, metrics = r.get("meta") or {}, r.get("metrics") or {}
        if "context_length" in meta and "depth" in meta and isinstance(metrics.get(metric), (int, float)):
            cell = (int(meta["context_length"]), float(meta["depth"]))
            cells.setdefault(cell, []).append(float(metrics[metric]))
    return {k: sum(v) / len(v) for k, v in cells.items()}


def has_heatmap(task: str, samples: Iterable[list[dict[str, Any]]]) -> bool:
    if task in HEATMAP_TASKS:
        return True
    return any("context_length" in (r.get("meta") or {}) and "depth" in (r.get("meta") or {})
               for rows in samples for r in rows[:1])


def plot_heatmaps(frame: pd.DataFrame, samples: dict[str, list[dict[str, Any]]], metric: str, path: Path,
                  title: str) -> Path | None:
    """Every ok run's depth × context length heatmap of ``metric``, side by side on one colour scale,
    redrawn from the runs' samples (the same layout as ``niah_heatmap.png``)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    panels = []
    for r in frame[frame["status"] == "ok"].itertuples():
        cells = _heatmap_cells(samples.get(r.run_key, []), metric)
        if cells:
            panels.append((r, cells))
    if not panels:
        return None
    lengths = sorted({n for _, c in panels for n, _ in c})
    depths = sorted({d for _, c in panels for _, d in c})
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    cell_w, cell_h = 0.62, 0.36
    w = max(2.6, 1.3 + cell_w * len(lengths))
    h = max(2.0, 1.2 + cell_h * len(depths))
    fig = _figure(min(w * ncols + 1.0, 30), min(h * nrows + 0.9, 30))
    cmap = colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    norm = Normalize(vmin=0.0, vmax=1.0)
    image = None
    main_col = f"metrics.{metric}"
    for i, (r, cells) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), v in cells.items():
            grid[depths.index(d), lengths.index(n)] = v
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d * 100:g}%" for d in depths], fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        if i >= (nrows - 1) * ncols or i + ncols >= len(panels):
            ax.set_xlabel("context length (tokens)", fontsize=8)
        if len(lengths) > 8:
            ax.tick_params(axis="x", labelrotation=45)
        if len(lengths) * len(depths) <= 100:
            for a in range(len(depths)):
                for b in range(len(lengths)):
                    v = grid[a, b]
                    if np.isnan(v):
                        ax.text(b, a, "–", ha="center", va="center", fontsize=7, color="#555555")
                        continue
                    red, green, blue, _ = cmap(norm(v))
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        mean = frame.loc[frame["run_key"] == r.run_key, main_col] if main_col in frame.columns else []
        mean_v = _num(mean.iloc[0]) if len(mean) else math.nan
        sub = f"{r.label}" + (f" ({r.model})" if frame["model"].nunique() > 1 else "")
        ax.set_title(sub + ("" if math.isnan(mean_v) else f"\nmean {metric} {mean_v:.2f}"), fontsize=8)
    if image is not None:
        cbar = fig.colorbar(image, ax=fig.axes, fraction=0.025, pad=0.02)
        cbar.set_label(metric, fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --- writing -------------------------------------------------------------------------------------------


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _markdown_table(table: pd.DataFrame) -> str:
    from tabulate import tabulate

    cells = [[_md_cell(v) for v in row] for row in table.itertuples(index=False)]
    return tabulate(cells, headers=[_md_cell(c) for c in table.columns], tablefmt="github",
                    disable_numparse=True)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
       margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; }
td:nth-child(2), td:nth-child(3) { text-align: left; }
td.front { font-weight: 600; }
td.failed { background: #fde8e8; color: #8a1f1f; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; max-width: 70em; }
"""


def _html_table(table: pd.DataFrame, frame: pd.DataFrame) -> str:
    """The display table as HTML; cells of runs on a front are bold, failed runs red (pandas Styler when
    jinja2 is available, plain ``to_html`` otherwise)."""
    import pandas as pd

    front = frame[[c for c in frame.columns if c.startswith("pareto_")]].any(axis=1).to_numpy()
    failed = (frame["status"] != "ok").to_numpy()
    row_class = ["failed" if f else "front" if o else "" for f, o in zip(failed, front)]
    try:
        classes = pd.DataFrame({c: row_class for c in table.columns}, index=table.index)
        styler = table.style.hide(axis="index").format(escape="html").set_td_classes(classes)
        return styler.to_html(doctype_html=False)
    except ImportError:  # jinja2 missing: plain table
        return table.to_html(index=False, escape=True, border=0)


def _note(main: str | None, axes: dict[str, tuple], bootstrap: int, confidence: float, seed: int) -> str:
    parts = []
    if main:
        parts.append(f"Main metric: `{main}` (higher is better); rank 1 = best ok run.")
    if bootstrap > 0:
        parts.append(f"`value [lo, hi]`: the run's metric with a {confidence:.0%} percentile-bootstrap "
                     f"interval of the per-sample mean ({bootstrap} resamples, seed {seed}).")
    parts.append("Latency: median over samples / 90th percentile. Memory: peak allocated above the weights, "
                 "KV-cache bytes from the cache tensors (median over samples), model weights.")
    if axes:
        desc = ", ".join(f"{_FRONT_NAMES[n]} = `{c}` ({'higher' if h else 'lower'} is better)"
                         for n, (c, h) in axes.items())
        parts.append(f"Pareto column: the fronts (main metric vs {desc}) the run is on; "
                     "failed runs are on none.")
    return " ".join(parts)


@dataclass
class TaskBoard:
    task: str
    main_metric: str | None
    frame: pd.DataFrame  # the task's rows, all columns (what the CSV holds)
    table: pd.DataFrame  # the human table (what Markdown/HTML/terminal show)
    axes: dict[str, tuple]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Leaderboard:
    """What ``build_leaderboard`` produced."""

    frame: pd.DataFrame  # every run of every task, with Pareto/rank columns
    tasks: dict[str, TaskBoard]
    out_dir: Path
    files: list[Path]
    wandb_dir: Path | None = None  # the W&B run folder (offline-run-… / run-…), None when disabled/failed


def _task_title(task: str, frame: pd.DataFrame) -> str:
    models = sorted(frame["model"].dropna().astype(str).unique())
    sweeps = sorted(frame["sweep"].dropna().astype(str).unique())
    parts = [f"model: {', '.join(models)}"] if models else []
    if sweeps:
        parts.append(f"sweep: {', '.join(sweeps)}")
    return f"{task} — " + " · ".join(parts) if parts else task


def _write_task(board: TaskBoard, out: Path, *, bootstrap: int, confidence: float, seed: int) -> None:
    task, frame = board.task, board.frame
    csv_path = out / f"{task}.csv"
    frame.to_csv(csv_path, index=False)
    board.files["csv"] = csv_path
    images = [p for k, p in board.files.items() if k in ("pareto", "heatmaps")]
    note = _note(board.main_metric, board.axes, bootstrap, confidence, seed)
    title = _task_title(task, frame)
    n_ok = int((frame["status"] == "ok").sum())

    md = [f"# {task}", "", f"{title}. {n_ok} ok run(s) of {len(frame)}.", "",
          _markdown_table(board.table), "", note, ""]
    for p in images:
        md += [f"![{p.stem}]({p.name})", ""]
    link = f"[{csv_path.name}]({csv_path.name})"
    md += [f"All columns (CIs, per-bucket metrics, p90s, bytes, run directories): {link}", ""]
    md_path = out / f"{task}.md"
    md_path.write_text("\n".join(md))
    board.files["md"] = md_path

    body = [f"<h1>{html.escape(task)}</h1>",
            f"<p>{html.escape(title)}. {n_ok} ok run(s) of {len(frame)}.</p>",
            _html_table(board.table, frame), f"<p class='note'>{html.escape(note)}</p>"]
    body += [f"<p><img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'></p>" for p in images]
    body.append(f"<p><a href='{html.escape(csv_path.name)}'>{html.escape(csv_path.name)}</a> (all columns) · "
                "<a href='index.html'>all tasks</a></p>")
    html_path = out / f"{task}.html"
    html_path.write_text(_page(f"tokenbench leaderboard: {task}", "\n".join(body)))
    board.files["html"] = html_path


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _best(board: TaskBoard) -> str:
    m = board.main_metric
    col = f"metrics.{m}" if m else None
    ok = board.frame[board.frame["status"] == "ok"]
    if not col or col not in ok.columns or ok[col].isna().all():
        return ""
    top = ok.loc[ok[col].idxmax()]
    return f"{top['label']} ({m} {_fmt(top[col])})"


def _write_index(boards: dict[str, TaskBoard], out: Path, sweep: str | None) -> list[Path]:
    from tabulate import tabulate

    rows = []
    for task, b in boards.items():
        f = b.frame
        links = " · ".join(f"[{k}]({p.name})" for k, p in b.files.items())
        rows.append([task, str(int((f["status"] == "ok").sum())), str(int((f["status"] != "ok").sum())),
                     b.main_metric or "", _md_cell(_best(b)), links])
    headers = ["task", "ok runs", "failed runs", "main metric", "best", "files"]
    head = "# tokenbench leaderboard" + (f" — sweep {sweep}" if sweep else "")
    md = [head, "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
          "Every run of every task, all columns: [runs.csv](runs.csv).", ""]
    md_path = out / "README.md"
    md_path.write_text("\n".join(md))

    trs = []
    for task, b in boards.items():
        f = b.frame
        links = " · ".join(f"<a href='{html.escape(p.name)}'>{k}</a>" for k, p in b.files.items())
        trs.append(f"<tr><td><a href='{html.escape(task)}.html'>{html.escape(task)}</a></td>"
                   f"<td>{int((f['status'] == 'ok').sum())}</td><td>{int((f['status'] != 'ok').sum())}</td>"
                   f"<td>{html.escape(b.main_metric or '')}</td><td>{html.escape(_best(b))}</td>"
                   f"<td>{links}</td></tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr></thead><tbody>"
             + "".join(trs) + "</tbody></table>")
    body = (f"<h1>{html.escape(head.lstrip('# '))}</h1>\n{table}\n"
            "<p>Every run of every task, all columns: <a href='runs.csv'>runs.csv</a>.</p>")
    html_path = out / "index.html"
    html_path.write_text(_page("tokenbench leaderboard", body))
    return [md_path, html_path]


# --- W&B -----------------------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    """A JSON/W&B-friendly Python scalar (NaN/NA -> None, numpy -> Python)."""
    if v is None:
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    try:
        import pandas as pd

        if v is pd.NA or (not isinstance(v, str) and pd.isna(v)):
            return None
    except (TypeError, ValueError):
        pass
    return v


def log_wandb(lb: Leaderboard, *, mode: str = "offline", sweep: str | None = None,
              project: str = "tokenbench", entity: str | None = None,
              config: dict[str, Any] | None = None) -> Path | None:
    """Log the leaderboard as one W&B run (job_type ``leaderboard``) under ``<out>/wandb``; returns the run's
    local folder, or None when disabled or when W&B failed (the failure is logged, never raised)."""
    if mode == "disabled" or not lb.tasks:
        return None
    try:
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got '{mode}'")
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        lb.out_dir.mkdir(parents=True, exist_ok=True)  # W&B writes into <out>/wandb/
        sweeps = sorted(lb.frame["sweep"].dropna().astype(str).unique()) if len(lb.frame) else []
        group = sweep or (sweeps[0] if len(sweeps) == 1 else None)
        run = wandb.init(project=project, entity=entity, group=group, job_type="leaderboard",
                         name=f"leaderboard/{group or 'all'}", dir=str(lb.out_dir), mode=mode,
                         tags=["leaderboard", *lb.tasks], config=config or {}, reinit="create_new")
        try:
            payload: dict[str, Any] = {}
            for task, board in lb.tasks.items():
                cols = list(board.frame.columns)
                data = [[_plain(v) for v in row] for row in board.frame.itertuples(index=False)]
                payload[f"leaderboard/{task}"] = wandb.Table(columns=cols, data=data)
                for kind in ("pareto", "heatmaps"):
                    if kind in board.files:
                        payload[f"{kind}/{task}"] = wandb.Image(str(board.files[kind]))
            run.log(payload)
            for task, board in lb.tasks.items():
                run.summary[f"main_metric/{task}"] = board.main_metric
                run.summary[f"runs/{task}"] = len(board.frame)
        finally:
            run.finish()
        return Path(run.dir).parent
    except Exception as exc:  # the local leaderboard is already written; W&B must not cost it
        log.warning("W&B logging of the leaderboard failed (%s: %s); the local files in %s are kept",
                    type(exc).__name__, exc, lb.out_dir)
        return None


# --- building ------------------------------------------------------------------------------------------


def build_leaderboard(results_dir: str | Path, out_dir: str | Path, wandb_mode: str = "offline",
                      sweep: str | None = None, *, tasks: Iterable[str] | None = None,
                      bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                      wandb_project: str = "tokenbench", wandb_entity: str | None = None) -> Leaderboard:
    """Read the records under ``results_dir`` (only those of ``sweep`` / ``tasks`` when given), write the
    leaderboard files into ``out_dir`` and log them to W&B (see the module docstring)."""
    import pandas as pd

    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got '{wandb_mode}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(results_dir, sweep=sweep, tasks=tasks)
    samples: dict[str, list[dict[str, Any]]] = {}
    frame = records_frame(records, bootstrap=bootstrap, seed=seed, confidence=confidence, samples=samples)

    boards: dict[str, TaskBoard] = {}
    files: list[Path] = []
    parts = []
    for task in sorted(frame["task"].unique()) if len(frame) else []:
        sub = frame[frame["task"] == task]
        # Columns of other tasks (their metrics, images_per_s, ...) go; identity columns stay.
        empty = [c for c in sub.columns if c not in _IDENTITY and c not in _TAIL and sub[c].isna().all()]
        sub = sub.drop(columns=empty)
        keys = [c.removeprefix("metrics.") for c in sub.columns
                if c.startswith("metrics.") and not c.endswith((".ci_lo", ".ci_hi"))]
        ordered = [k for r in records if r["task"] == task for k in (r.get("metrics") or {})]
        keys = sorted(keys, key=lambda k: ordered.index(k) if k in ordered else len(ordered))
        main = main_metric(task, keys)
        if main and f"metrics.{main}" not in sub.columns:
            log.warning("task %s: main metric '%s' is in no record", task, main)
        sub, axes = add_fronts(sub, main)
        sub = _order_columns(_sort_key(sub), main).reset_index(drop=True)
        board = TaskBoard(task, main, sub, display_table(sub, main), axes)
        title = _task_title(task, sub)
        try:
            p = plot_pareto(sub, main, axes, out / f"{task}_pareto.png", f"Pareto fronts — {title}")
            if p:
                board.files["pareto"] = p
        except Exception as exc:  # a plot must not cost the tables
            log.warning("Pareto plot for %s failed: %s", task, exc)
        if has_heatmap(task, [samples.get(k, []) for k in sub["run_key"]]):
            try:
                metric = main if main and any(main in (r.get("metrics") or {}) for k in sub["run_key"]
                                              for r in samples.get(k, [])[:1]) else "accuracy"
                p = plot_heatmaps(sub, samples, metric, out / f"{task}_heatmaps.png",
                                  f"{metric} by needle depth × context length — {title}")
                if p:
                    board.files["heatmaps"] = p
            except Exception as exc:
                log.warning("heatmaps for %s failed: %s", task, exc)
        _write_task(board, out, bootstrap=bootstrap, confidence=confidence, seed=seed)
        boards[task] = board
        parts.append(sub)
        files += list(board.files.values())

    full = pd.concat(parts, ignore_index=True) if parts else frame
    if len(full):
        full = _order_columns(full, None)
    runs_csv = out / "runs.csv"
    full.to_csv(runs_csv, index=False)
    files += [runs_csv, *_write_index(boards, out, sweep)]
    lb = Leaderboard(full, boards, out, files)
    lb.wandb_dir = log_wandb(
        lb, mode=wandb_mode, sweep=sweep, project=wandb_project, entity=wandb_entity,
        config={"results_dir": str(results_dir), "sweep": sweep, "tasks": list(boards),
                "n_runs": len(full), "bootstrap": bootstrap, "seed": seed, "confidence": confidence,
                "main_metrics": {t: b.main_metric for t, b in boards.items()},
                "pareto_axes": {t: {n: c for n, (c, _) in b.axes.items()} for t, b in boards.items()}},
    )
    return lb


# --- command line --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenbench-leaderboard",
        description="Build leaderboards (tables with bootstrap CIs, Pareto plots, niah heatmaps; Markdown, "
                    "CSV, HTML, PNG; a W&B leaderboard run) from tokenbench result records.")
    p.add_argument("results_dir", nargs="?", default="results/runs",
                   help="folder searched recursively for result.json records (default: results/runs)")
    p.add_argument("--out", default="results/leaderboard",
                   help="output folder (default: results/leaderboard)")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default="offline",
                   help="offline (default: files under <out>/wandb for `wandb sync`), online or disabled")
    p.add_argument("--wandb-project", default="tokenbench")
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--sweep", default=None,
                   help="only records of this sweep (its sweep_name); also the W&B group")
    p.add_argument("--task", action="append", default=None,
                   help="only this task (repeat or comma-separate for several)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the confidence intervals (0: no intervals; default 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``tokenbench-leaderboard``: build the leaderboard and print one table per task."""
    from tabulate import tabulate

    args = _parser().parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        print("tokenbench-leaderboard: error: --confidence must be in (0, 1)", file=sys.stderr)
        return 2
    tasks = [t.strip() for arg in args.task or [] for t in arg.split(",") if t.strip()] or None
    if not Path(args.results_dir).is_dir():
        print(f"tokenbench-leaderboard: error: results folder not found: {args.results_dir}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    lb = build_leaderboard(args.results_dir, args.out, wandb_mode=args.wandb_mode, sweep=args.sweep,
                           tasks=tasks, bootstrap=args.bootstrap, seed=args.seed, confidence=args.confidence,
                           wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)
    if not lb.tasks:
        what = [f"sweep {args.sweep}"] if args.sweep else []
        what += [f"task(s) {', '.join(tasks)}"] if tasks else []
        print(f"tokenbench-leaderboard: no result records under {args.results_dir}"
              + (f" for {' and '.join(what)}" if what else ""), file=sys.stderr)
        return 1
    for task, board in lb.tasks.items():
        print(f"\n{task}  (main metric: {board.main_metric or '-'})")
        print(tabulate(board.table.values.tolist(), headers=list(board.table.columns),
                       tablefmt="simple_outline", disable_numparse=True))
    print(f"\nleaderboard written to {lb.out_dir}/ (README.md, index.html, <task>.md|.csv|.html, PNGs)")
    if lb.wandb_dir is not None:
        hint = f"; upload with: wandb sync {lb.wandb_dir}" if args.wandb_mode == "offline" else ""
        print(f"W&B leaderboard run: {lb.wandb_dir}{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
