"""Run directories, the append-only sample log and the atomic result record.

A run directory holds:
  config.yaml     the resolved model/method/task config (what the run key hashes)
  samples.jsonl   one JSON line per finished sample, appended and flushed, never rewritten
  result.json     the aggregated record (see RESULT_FIELDS), written via temp file + rename
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "oom", "timeout")


def run_key(model: dict, method: dict, task: dict, batch_size: int = 1) -> str:
    """Hash of the resolved model/method/task config: equal configs share a run directory. A batch size
    other than 1 changes what is measured (rows share a generation), so it gets its own key."""
    key: dict[str, Any] = {"model": model, "method": method, "task": task}
    if int(batch_size) != 1:
        key["batch_size"] = int(batch_size)
    payload = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ResultRecord:
    """One flat record per run, the same schema for every family; the leaderboard is a view over these."""

    run_key: str
    sweep: str
    status: str
    error: Optional[str]
    model: str
    model_params: dict[str, Any]
    method: str
    family: str
    method_params: dict[str, Any]
    task: str
    task_params: dict[str, Any]
    budget: dict[str, Any]  # nominal, as configured
    achieved_keep_ratio: Optional[float]  # measured, mean over samples
    metrics: dict[str, float]
    latency: dict[str, Any]
    memory: dict[str, Any]
    flops: Optional[float]
    n_samples: int
    n_samples_expected: int
    env: dict[str, Any]
    started_at: str
    finished_at: str
    run_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None so files stay valid JSON for every reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _json_line(row: dict[str, Any]) -> str:
    """One JSON line; the common case (no NaN/inf anywhere) skips the recursive copy of ``_jsonable``."""
    try:
        return json.dumps(row, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_jsonable(row)) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SampleLog:
    """The append-only per-sample log of one run."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """All complete rows; a line cut short by a killed process is skipped (and left in place)."""
        if not self.path.exists():
            return []
        rows = []
        with open(self.path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s:%d is not a complete JSON line (a run died while writing it); skipped",
                                self.path, lineno)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (one line each) with one write and one fsync: a batch of samples costs one flush."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            # A previous process may have died mid-line: start on a fresh line so this row stays parseable.
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write("".join(_json_line(row) for row in rows).encode())
            f.flush()
            os.fsync(f.fileno())


def read_result(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / "result.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
