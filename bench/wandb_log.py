"""W&B logging of a finished run: config, summary, per-sample table, plots.

Offline by default (files under ``<run_dir>/wandb`` for a later ``wandb sync``). Logging happens after
``result.json`` is on disk, and any W&B failure is reported and swallowed: it never costs the local result.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenbench.results import ResultRecord

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out


def summary_of(record: ResultRecord) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "status": record.status,
        "n_samples": record.n_samples,
        "achieved_keep_ratio": record.achieved_keep_ratio,
    }
    for group in ("metrics", "latency", "memory", "budget"):
        summary.update(flatten(getattr(record, group) or {}, f"{group}/"))
    return {k: v for k, v in summary.items() if v is not None}


def table_of(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Per-sample rows as columns: ids, text, metrics, latency, compression, scalar meta."""
    flat = []
    for r in rows:
        item: dict[str, Any] = {"sample_id": r.get("sample_id"), "prediction": r.get("prediction"),
                                "answer": json.dumps(r.get("answer")) if not isinstance(r.get("answer"), str)
                                else r.get("answer")}
        for group in ("metrics", "latency", "memory"):
            item.update(flatten(r.get(group) or {}, f"{group}/"))
        comp = r.get("compression") or {}
        item.update({f"compression/{k}": v for k, v in comp.items() if isinstance(v, (int, float))})
        for k in ("n_prompt_tokens", "n_context_tokens", "n_generated"):
            item[k] = r.get(k)
        item.update({f"meta/{k}": v for k, v in (r.get("meta") or {}).items()
                     if isinstance(v, (int, float, str, bool))})
        flat.append(item)
    columns: list[str] = []
    for item in flat:
        columns += [c for c in item if c not in columns]
    data = [[item.get(c) for c in columns] for item in flat]
    return columns, data


def log_run(cfg: DictConfig, record: ResultRecord, rows: list[dict[str, Any]], artifacts: list[Path],
            run_dir: Path) -> str | None:
    """Log one run; returns the local W&B run directory, or None when disabled or failed."""
    settings = cfg.get("wandb") or {}
    mode = settings.get("mode", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        if mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode must be one of {WANDB_MODES}, got '{mode}'")
        wandb_dir = Path(settings.get("dir") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=settings.get("project") or "tokenbench",
            entity=settings.get("entity"),
            group=settings.get("group") or record.sweep,
            name=f"{record.task}/{record.method}/{record.model}",
            id=record.run_key,
            dir=str(wandb_dir),
            mode=mode,
            resume="allow",
            job_type=record.family,
            tags=[record.task, record.method, record.model, record.family, record.status],
            config={
                "model": {"name": record.model, **record.model_params},
                "method": {"name": record.method, **record.method_params},
                "task": {"name": record.task, **record.task_params},
                "run_key": record.run_key,
                "sweep": record.sweep,
                "family": record.family,
                "measure": OmegaConf.to_container(cfg.measure, resolve=True) if "measure" in cfg else {},
                "env": record.env,
            },
            reinit="create_new",
        )
        try:
            columns, data = table_of(rows)
            if data:
                run.log({"samples": wandb.Table(columns=columns, data=data)})
            images = {f"plots/{a.stem}": wandb.Image(str(a)) for a in artifacts if a.suffix == ".png"}
            if images:
                run.log(images)
            for k, v in summary_of(record).items():
                run.summary[k] = v
        finally:
            run.finish(exit_code=0 if record.status == "ok" else 1)
        return str(Path(run.dir).parent)
    except Exception as exc:  # W&B must never lose the local result
        log.warning("W&B logging failed (%s: %s); the local result is kept in %s", type(exc).__name__, exc,
                    run_dir)
        return None
