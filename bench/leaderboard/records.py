"""Result records and their frame: reading records and samples, labels, the main metric, one row per run."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenbench.results import SampleLog

from .stats import _num, bootstrap_ci

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

LATENCY_KEYS = ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms", "images_per_s")
MEMORY_KEYS = ("peak_allocated", "kv_cache_bytes", "weights_bytes")

_IDENTITY = ["task", "model", "method", "family", "label", "keep_ratio", "n_keep", "phase", "query_aware",
             "status", "error", "rank"]
_TEXT_COLUMNS = ("task", "model", "method", "family", "label", "phase", "status", "error", "run_key", "sweep",
                 "finished_at", "run_dir")
_TAIL = ["n_samples", "n_samples_expected", "run_key", "sweep", "finished_at", "run_dir"]


# --- reading ------------------------------------------------------------------------------------------------


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


# --- the frame ----------------------------------------------------------------------------------------------


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
    """One row per record (see the package docstring for the columns), without the Pareto/rank columns.

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


def _order_columns(frame: pd.DataFrame, main: str | None) -> pd.DataFrame:
    metric_cols = [c for c in frame.columns if c.startswith("metrics.")]
    main_cols = [c for c in metric_cols if main and c in (f"metrics.{main}", f"metrics.{main}.ci_lo",
                                                           f"metrics.{main}.ci_hi")]
    rest = [c for c in metric_cols if c not in main_cols]
    headline = [c for c in rest if "@" not in c]
    buckets = [c for c in rest if "@" in c]
    lat = [c for c in frame.columns if c.removesuffix("_p90") in LATENCY_KEYS]
    pareto = [c for c in frame.columns if c.startswith("pareto_")]
    keep = ["achieved_keep_ratio"] if "achieved_keep_ratio" in frame.columns else []
    cols = ([c for c in _IDENTITY if c in frame.columns] + main_cols + headline + keep
            + lat + [c for c in MEMORY_KEYS if c in frame.columns] + pareto + buckets
            + [c for c in _TAIL if c in frame.columns])
    cols += [c for c in frame.columns if c not in cols]
    return frame[cols]
