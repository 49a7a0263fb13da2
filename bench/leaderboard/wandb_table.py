"""W&B: the leaderboard as one W&B run (job_type ``leaderboard``): a ``wandb.Table`` per task, the plots."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .build import Leaderboard

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


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
