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


# --- reading offline run files -------------------------------------------------------------------------
# An offline run keeps everything (config, summary, logged rows) in its ``run-<id>.wandb`` file, in the
# LevelDB log format (github.com/google/leveldb/blob/main/doc/log_format.md): a 7-byte header, then 32 KiB
# blocks of records, each ``crc32c:u32 length:u16 type:u8 data``, where a protobuf ``Record`` may be split
# FIRST/MIDDLE/LAST across blocks. This reader lets tests (and users, without syncing) see what W&B got.

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _record_payloads(data: bytes) -> list[bytes]:
    import struct

    if data[4:7] == b"" or data[0:4] != b":W&B":
        raise ValueError("not a W&B run file (bad header)")
    payloads, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer: too small for a record header, zero padded
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            payloads.append(pending + chunk)
            pending = b""
    return payloads


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """Decode a ``run-<id>.wandb`` file into ``{"run": {...}, "config": {...}, "summary": {...},
    "history": [...]}`` (values JSON-decoded; later updates win)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"run": {}, "config": {}, "summary": {}, "history": []}

    def items_to_dict(items) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for item in items:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            d[key] = json.loads(item.value_json) if item.value_json else None
        return d

    for payload in _record_payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"run_id": rec.run.run_id, "project": rec.run.project, "group": rec.run.run_group,
                          "name": rec.run.display_name, "tags": list(rec.run.tags),
                          "job_type": rec.run.job_type}
            out["config"].update(items_to_dict(rec.run.config.update))
        elif kind == "config":
            out["config"].update(items_to_dict(rec.config.update))
        elif kind == "summary":
            out["summary"].update(items_to_dict(rec.summary.update))
        elif kind == "history":
            out["history"].append(items_to_dict(rec.history.item))
    return out
