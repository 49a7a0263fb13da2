"""Run keys, the append-only sample log and atomic result writes."""

from __future__ import annotations

import json
import os

import pytest

from tokenbench.results import SampleLog, run_key, write_json_atomic


def test_run_key_depends_on_config_only() -> None:
    a = run_key({"name": "m", "dtype": "float32"}, {"name": "none"}, {"name": "niah", "depths": [0.5]})
    b = run_key({"dtype": "float32", "name": "m"}, {"name": "none"}, {"depths": [0.5], "name": "niah"})
    c = run_key({"name": "m", "dtype": "float32"}, {"name": "none"}, {"name": "niah", "depths": [0.25]})
    assert a == b  # key order does not matter
    assert a != c
    assert len(a) == 16


def test_sample_log_appends_and_survives_a_torn_line(tmp_path) -> None:
    log = SampleLog(tmp_path / "samples.jsonl")
    log.append({"sample_id": "a", "x": 1})
    # A process killed mid-write leaves half a line without a newline.
    with open(log.path, "a") as f:
        f.write('{"sample_id": "b", "x"')
    assert [r["sample_id"] for r in log.read()] == ["a"]
    log.append({"sample_id": "b", "x": 2})
    assert [r["sample_id"] for r in log.read()] == ["a", "b"]
    lines = log.path.read_text().splitlines()
    assert lines[0] == '{"sample_id": "a", "x": 1}'  # earlier lines are never rewritten
    assert len(lines) == 3


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "result.json"
    write_json_atomic(path, {"status": "ok", "v": float("nan")})
    assert json.loads(path.read_text()) == {"status": "ok", "v": None}  # NaN never reaches the file

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(path, {"status": "failed", "obj": Boom()})
    assert json.loads(path.read_text())["status"] == "ok"
    assert [p for p in os.listdir(tmp_path) if p != "result.json"] == []  # no temp file left behind
