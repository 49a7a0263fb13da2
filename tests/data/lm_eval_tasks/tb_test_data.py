"""Data of tokenbench's local lm-eval test tasks: the JSON lines beside this file."""

from __future__ import annotations

import json
from pathlib import Path


def _split(name: str):
    import datasets

    path = Path(__file__).with_name(f"{name}.jsonl")
    return datasets.Dataset.from_list([json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x])


def load_mc(**_: object) -> dict:
    return {"train": _split("tb_test_mc_train"), "test": _split("tb_test_mc")}


def load_gen(**_: object) -> dict:
    return {"test": _split("tb_test_gen")}


def load_ppl(**_: object) -> dict:
    return {"test": _split("tb_test_ppl")}
