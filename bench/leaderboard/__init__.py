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

Modules
-------
``records`` (reading records and samples; the frame: labels, main metric, columns), ``stats`` (bootstrap
intervals, Pareto fronts, a task's fronts and rank), ``tables`` (the display table; Markdown, CSV, HTML, the
index), ``plots`` (Pareto and heatmap PNGs), ``wandb_table`` (the W&B run), ``build`` (``build_leaderboard``,
``Leaderboard``, ``TaskBoard``), ``cli`` (``tokenbench-leaderboard``). Everything public is re-exported here.
"""

from __future__ import annotations

from .build import Leaderboard, TaskBoard, build_leaderboard
from .cli import main
from .plots import HEATMAP_TASKS, has_heatmap, plot_heatmaps, plot_pareto
from .records import (
    LATENCY_KEYS,
    MEMORY_KEYS,
    base_label,
    budget_of,
    load_records,
    main_metric,
    read_samples,
    records_frame,
)
from .stats import (
    FRONTS,
    KEEP_AXIS,
    LATENCY_AXIS,
    MEMORY_AXIS,
    add_fronts,
    bootstrap_ci,
    pareto_front,
    pick_axis,
)
from .tables import display_table
from .wandb_table import WANDB_MODES, log_wandb

__all__ = [
    "FRONTS", "HEATMAP_TASKS", "KEEP_AXIS", "LATENCY_AXIS", "LATENCY_KEYS", "MEMORY_AXIS", "MEMORY_KEYS",
    "WANDB_MODES", "Leaderboard", "TaskBoard", "add_fronts", "base_label", "bootstrap_ci", "budget_of",
    "build_leaderboard", "display_table", "has_heatmap", "load_records", "log_wandb", "main", "main_metric",
    "pareto_front", "pick_axis", "plot_heatmaps", "plot_pareto", "read_samples", "records_frame",
]
