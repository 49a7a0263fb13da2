"""The KV benchmark script (results/perf/kv/run_kv_benchmark.py) end to end on its tiny CPU config: the rows and
fields it commits, the untimed warm-up of each shape before its first row, and ``--resume`` measuring only what
an earlier output lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "perf" / "kv" / "run_kv_benchmark.py"
ARGS = ["--tiny", "--contexts", "64", "--batches", "2", "--keeps", "0.5", "--new-tokens", "4"]


def run(tmp_path: Path, name: str, *extra: str) -> tuple[dict, str]:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, *extra, "--out", str(out)], capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(out.read_text()), proc.stdout


def test_rows_fields_and_resume(tmp_path: Path) -> None:
    first, stdout = run(tmp_path, "a.json", "--methods", "streaming_llm")
    assert stdout.count("warm-up ctx=64 b=2 (untimed)") == 1  # the shape, once, before its first row
    assert [(r["method"], r["keep_ratio"]) for r in first["rows"]] == [("none", None), ("streaming_llm", 0.5)]
    none, stream = first["rows"]
    for r in first["rows"]:
        assert r["tpot_ms"] > 0 and r["prefill_ms"] > 0 and r["ttft_ms"] >= r["prefill_ms"]
        assert r["gemv"] == "cublas" and r["accumulated_backend"] == "eager"  # no --fuse: F.linear
    assert stream["kv_cache_bytes"] < none["kv_cache_bytes"] and stream["achieved_keep_ratio"] < 1
    assert "| streaming_llm | 0.5 |" in first["markdown"] and not first["errors"]

    second, stdout = run(tmp_path, "b.json", "--methods", "streaming_llm", "tova", "--resume",
                         str(tmp_path / "a.json"))
    measured = [line.split()[2] for line in stdout.splitlines() if line.startswith("ctx=")]
    assert measured == ["tova"]  # none and streaming_llm came from a.json
    assert second["rows"][:2] == first["rows"] and second["rows"][2]["method"] == "tova"
    assert second["resumed_from"] == str(tmp_path / "a.json")
    third, stdout = run(tmp_path, "c.json", "--methods", "streaming_llm", "tova", "--resume",
                        str(tmp_path / "b.json"))
    assert third["rows"] == second["rows"] and "warm-up" not in stdout  # nothing left: no shape warm-up
