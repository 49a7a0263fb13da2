"""Data of the tokenbench_capitals lm-eval task: the JSON lines beside this file, as a test split."""

from __future__ import annotations

import json
from pathlib import Path


def load(**_: object) -> dict:
    import datasets

    path = Path(__file__).with_name("tokenbench_capitals.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
