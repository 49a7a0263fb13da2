"""Building: ``build_leaderboard`` (records -> frame -> per-task tables, plots, files, W&B) and its result."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plots import has_heatmap, plot_heatmaps, plot_pareto
from .records import _IDENTITY, _TAIL, _order_columns, _sort_key, load_records, main_metric, records_frame
from .stats import add_fronts
from .tables import _task_title, _write_index, _write_task, display_table
from .wandb_table import WANDB_MODES, log_wandb

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class TaskBoard:
    task: str
    main_metric: str | None
    frame: pd.DataFrame  # the task's rows, all columns (what the CSV holds)
    table: pd.DataFrame  # the human table (what Markdown/HTML/terminal show)
    axes: dict[str, tuple]
    files: dict[str, Path] = field(default_factory=dict)
    setting: str = ""  # the task parameters that set this board apart from the task's other boards


@dataclass
class Leaderboard:
    """What ``build_leaderboard`` produced."""

    frame: pd.DataFrame  # every run of every task, with Pareto/rank columns
    tasks: dict[str, TaskBoard]
    out_dir: Path
    files: list[Path]
    wandb_dir: Path | None = None  # the W&B run folder (offline-run-… / run-…), None when disabled/failed


def task_settings(records: list[dict[str, Any]]) -> dict[str, tuple[str, str, list[dict[str, Any]]]]:
    """Records grouped into boards: one per task and task configuration (runs at other context lengths or
    on another haystack are not comparable). Board names are the task name, or ``<task>-<k>`` (k = 1, 2, …
    in order of first appearance) when a task was run with several configurations; the setting string
    names the task parameters that differ between them."""
    import json

    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        key = json.dumps(r.get("task_params") or {}, sort_keys=True, default=str)
        by_task.setdefault(r["task"], {}).setdefault(key, []).append(r)
    out: dict[str, tuple[str, str, list[dict[str, Any]]]] = {}
    for task in sorted(by_task):
        settings = by_task[task]
        if len(settings) == 1:
            (recs,) = settings.values()
            out[task] = (task, "", recs)
            continue
        params = [json.loads(k) for k in settings]
        varying = sorted({k for p in params for k in p if len({json.dumps(q.get(k), default=str)
                                                                 for q in params}) > 1})
        for i, (key, recs) in enumerate(settings.items(), 1):
            p = json.loads(key)
            desc = ", ".join(f"{k}={p.get(k)}" for k in varying)
            out[f"{task}-{i}"] = (task, desc if len(desc) <= 120 else desc[:117] + "...", recs)
    return out


def build_leaderboard(results_dir: str | Path, out_dir: str | Path, wandb_mode: str = "offline",
                      sweep: str | None = None, *, tasks: Iterable[str] | None = None,
                      bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                      wandb_project: str = "tokenbench", wandb_entity: str | None = None) -> Leaderboard:
    """Read the records under ``results_dir`` (only those of ``sweep`` / ``tasks`` when given), write the
    leaderboard files into ``out_dir`` and log them to W&B (see the package docstring)."""
    import pandas as pd

    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got '{wandb_mode}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(results_dir, sweep=sweep, tasks=tasks)
    samples: dict[str, list[dict[str, Any]]] = {}

    boards: dict[str, TaskBoard] = {}
    files: list[Path] = []
    parts = []
    for name, (task, setting, recs) in task_settings(records).items():
        # Labels are disambiguated within one board only: runs of another task setting are not rivals.
        sub = records_frame(recs, bootstrap=bootstrap, seed=seed, confidence=confidence, samples=samples)
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
        sub.insert(0, "board", name)
        board = TaskBoard(name, main, sub, display_table(sub, main), axes, setting=setting)
        title = _task_title(task, sub) + (f" · {setting}" if setting else "")
        try:
            p = plot_pareto(sub, main, axes, out / f"{name}_pareto.png", f"Pareto fronts — {title}")
            if p:
                board.files["pareto"] = p
        except Exception as exc:  # a plot must not cost the tables
            log.warning("Pareto plot for %s failed: %s", task, exc)
        if has_heatmap(task, [samples.get(k, []) for k in sub["run_key"]]):
            try:
                metric = main if main and any(main in (r.get("metrics") or {}) for k in sub["run_key"]
                                              for r in samples.get(k, [])[:1]) else "accuracy"
                p = plot_heatmaps(sub, samples, metric, out / f"{name}_heatmaps.png",
                                  f"{metric} by needle depth × context length — {title}")
                if p:
                    board.files["heatmaps"] = p
            except Exception as exc:
                log.warning("heatmaps for %s failed: %s", task, exc)
        _write_task(board, out, bootstrap=bootstrap, confidence=confidence, seed=seed)
        boards[name] = board
        parts.append(sub)
        files += list(board.files.values())

    full = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
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
