"""Leaderboards: real records from the pipeline (tiny model) plus hand-built ones whose answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tokenbench.leaderboard import (bootstrap_ci, build_leaderboard, load_records, main, main_metric,
                                    pareto_front)

TINY = ["model=tiny-llama", "task.context_lengths=[128]", "task.depths=[0.0,0.5,1.0]",
        "task.max_new_tokens=4", "measure.fixed_output_tokens=4", "measure.warmup=0", "wandb.mode=disabled"]
POINTS = {  # label -> method overrides
    "none": ["method=none"],
    "streaming_llm@0.25": ["method=streaming_llm", "method.keep_ratio=0.25"],
    "streaming_llm@0.5": ["method=streaming_llm", "method.keep_ratio=0.5"],
    "random@0.5": ["method=random", "method.keep_ratio=0.5"],
}
FAILED_ERROR = "method 'streaming_llm': keep_ratio must be in (0, 1], got 1.5"
PNG = b"\x89PNG\r\n\x1a\n"


def _failed_record(root: Path) -> Path:
    """What a sweep writes for an invalid point (tokenbench.run.record_invalid), by hand."""
    # Same resolved task/model config as the sweep's other points (record_invalid writes the full config).
    sibling = json.loads(next(root.glob("*/result.json")).read_text())
    run_dir = root / "deadbeef00000000"
    run_dir.mkdir(parents=True)
    record = {
        "run_key": run_dir.name, "sweep": "default", "status": "failed", "error": FAILED_ERROR,
        "model": "tiny-llama", "model_params": sibling["model_params"], "method": "streaming_llm", "family": "",
        "method_params": {"keep_ratio": 1.5, "n_keep": None, "query_aware": False, "phase": None,
                          "n_sink": 4},
        "task": "niah", "task_params": sibling["task_params"], "budget": {}, "achieved_keep_ratio": None,
        "metrics": {}, "latency": {}, "memory": {}, "flops": None, "n_samples": 0, "n_samples_expected": 0,
        "env": {}, "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:00+00:00",
        "run_dir": str(run_dir), "extra": {"invalid_config": True},
    }
    (run_dir / "result.json").write_text(json.dumps(record))
    return run_dir


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """4 real runs of the pipeline on the tiny model, one failed record, and Hydra's sweep folder."""
    from hydra import compose, initialize_config_dir

    from tokenbench import registry
    from tokenbench.cli import CONF_DIR
    from tokenbench.config import store_base_config
    from tokenbench.run import execute, plan

    root = tmp_path_factory.mktemp("results") / "runs"
    registry.load_all()
    store_base_config()
    for overrides in POINTS.values():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*TINY, *overrides, f"output_dir={root}"])
        assert execute(plan(cfg), progress=False).status == "ok"
    _failed_record(root)
    sweep = root / "_sweeps" / "default" / "2026-01-01_00-00-00"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "0" / ".hydra" / "config.yaml").write_text("model: {}\n")
    (sweep / "0" / "result.json").write_text(json.dumps({"not": "a record"}))
    return root


@pytest.fixture(scope="module")
def board(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("leaderboard")
    return build_leaderboard(results, out, wandb_mode="offline", bootstrap=200, seed=0)


# --- the real records ----------------------------------------------------------------------------------


def test_one_row_per_run_and_the_failed_run_is_flagged(board, results) -> None:
    frame = board.tasks["niah"].frame
    assert len(frame) == 5 and len(board.frame) == 5
    ok = frame[frame["status"] == "ok"]
    assert set(ok["label"]) == set(POINTS)
    (failed,) = frame[frame["status"] == "failed"].itertuples()
    assert failed.error == FAILED_ERROR and failed.keep_ratio == 1.5 and failed.label == "streaming_llm@1.5"
    assert not (failed.pareto_latency or failed.pareto_memory or failed.pareto_keep_ratio)
    assert pd.isna(failed.rank) and frame.loc[frame["status"] == "failed", "metrics.accuracy"].isna().all()
    assert frame["status"].iloc[-1] == "failed"  # failed runs last
    # Each ok row is its record, flattened.
    records = {r["run_key"]: r for r in load_records(results)}
    for row in ok.to_dict("records"):
        rec = records[row["run_key"]]
        assert row["metrics.accuracy"] == pytest.approx(rec["metrics"]["accuracy"])
        assert row["metrics.accuracy@depth0.5"] == pytest.approx(rec["metrics"]["accuracy@depth0.5"])
        assert row["achieved_keep_ratio"] == pytest.approx(rec["achieved_keep_ratio"])
        for k in ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms", "e2e_ms_p90"):
            assert row[k] == pytest.approx(rec["latency"][k])
        for k in ("peak_allocated", "kv_cache_bytes", "weights_bytes"):
            assert row[k] == pytest.approx(rec["memory"][k])
        assert row["query_aware"] is False or row["query_aware"] == False
        assert row["n_samples"] == 3 and row["sweep"] == "default" and Path(row["run_dir"]).is_dir()
        assert row["keep_ratio"] == pytest.approx(rec["budget"]["keep_ratio"])
        for m in ("accuracy", "rouge1_recall"):
            assert row[f"metrics.{m}.ci_lo"] <= row[f"metrics.{m}"] <= row[f"metrics.{m}.ci_hi"]
    assert frame.loc[frame["label"] == "streaming_llm@0.25", "achieved_keep_ratio"].item() <= 0.25
    # Hydra's sweep folder contributes nothing.
    assert not any("_sweeps" in d for d in frame["run_dir"])


def test_fronts_on_real_records_follow_the_definition(board) -> None:
    frame = board.tasks["niah"].frame
    assert board.tasks["niah"].main_metric == "accuracy"
    assert board.tasks["niah"].axes == {"latency": ("e2e_ms", False), "memory": ("kv_cache_bytes", False),
                                        "keep_ratio": ("achieved_keep_ratio", False)}
    ok = frame[frame["status"] == "ok"]
    axes = (("latency", "e2e_ms"), ("memory", "kv_cache_bytes"), ("keep_ratio", "achieved_keep_ratio"))
    for name, col in axes:
        expected = pareto_front(ok[col], ok["metrics.accuracy"])
        assert list(ok[f"pareto_{name}"]) == list(expected)
        assert ok[f"pareto_{name}"].any()


def test_every_file_is_written_and_the_csv_round_trips(board) -> None:
    out = board.out_dir
    for name in ("niah.md", "niah.csv", "niah.html", "niah_pareto.png", "niah_heatmaps.png", "README.md",
                 "index.html", "runs.csv"):
        assert (out / name).is_file(), name
    for png in ("niah_pareto.png", "niah_heatmaps.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    back = pd.read_csv(out / "niah.csv")
    pd.testing.assert_frame_equal(back, board.tasks["niah"].frame, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(out / "runs.csv"), board.frame, check_dtype=False)

    md = (out / "niah.md").read_text()
    for label in ("none", "streaming_llm", "random"):
        assert f"| {label} " in md
    assert "| 0.25 " in md and "| full " in md
    assert "failed" in md and "keep_ratio must be in (0, 1], got 1.5" in md
    assert "](niah_pareto.png)" in md and "](niah_heatmaps.png)" in md
    assert md.count("[") > 8 and " [" in md  # value [lo, hi] cells
    html = (out / "niah.html").read_text()
    assert "<table" in html and "niah_pareto.png" in html and "streaming_llm" in html
    assert "keep_ratio must be in (0, 1], got 1.5" in html
    index = (out / "README.md").read_text()
    assert "(niah.md)" in index and "(niah.csv)" in index and "(niah.html)" in index
    assert "niah.html" in (out / "index.html").read_text()


def test_wandb_offline_run_holds_the_leaderboard_table_and_plots(board) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    from tokenbench.wandb_log import _record_payloads, read_offline_run

    wb = board.wandb_dir
    assert wb is not None and wb.parent == board.out_dir / "wandb" and wb.name.startswith("offline-run-")
    (run_file,) = wb.glob("run-*.wandb")
    logged = read_offline_run(run_file)
    job_types = set()
    for payload in _record_payloads(run_file.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "run":
            job_types.add(rec.run.job_type)
    assert job_types == {"leaderboard"}
    assert logged["run"]["group"] == "default" and "leaderboard" in logged["run"]["tags"]
    assert logged["config"]["main_metrics"] == {"niah": "accuracy"}
    summary = logged["summary"]
    assert summary["leaderboard/niah/_type"] == "table-file" and summary["leaderboard/niah/nrows"] == 5
    table = json.loads((wb / "files" / summary["leaderboard/niah/path"]).read_text())
    cols = table["columns"]
    assert {"label", "status", "error", "metrics.accuracy", "metrics.accuracy.ci_lo", "e2e_ms",
            "kv_cache_bytes", "achieved_keep_ratio", "pareto_latency", "run_key"} <= set(cols)
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert {r["label"] for r in rows if r["status"] == "ok"} == set(POINTS)
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["error"] == FAILED_ERROR and failed["metrics.accuracy"] is None
    frame = board.tasks["niah"].frame.set_index("run_key")
    for r in rows:
        if r["status"] == "ok":
            assert r["e2e_ms"] == pytest.approx(frame.loc[r["run_key"], "e2e_ms"])
    for key in ("pareto/niah", "heatmaps/niah"):
        assert summary[f"{key}/_type"] == "image-file"
        assert (wb / "files" / summary[f"{key}/path"]).stat().st_size > 10_000


def test_same_seed_same_intervals(board, results, tmp_path) -> None:
    again = build_leaderboard(results, tmp_path, wandb_mode="disabled", bootstrap=200, seed=0)
    cols = [c for c in board.frame.columns if c.endswith((".ci_lo", ".ci_hi"))]
    assert cols
    pd.testing.assert_frame_equal(again.frame[cols], board.frame[cols])


def test_cli_prints_tables_and_filters(results, tmp_path, capsys) -> None:
    out = tmp_path / "lb"
    assert main([str(results), "--out", str(out), "--wandb-mode", "disabled", "--task", "niah",
                 "--bootstrap", "50", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "niah" in printed and "accuracy (main)" in printed and "streaming_llm" in printed
    assert "failed" in printed and (out / "niah.md").exists() and not (out / "wandb").exists()
    assert main([str(results), "--out", str(tmp_path / "none"), "--wandb-mode", "disabled",
                 "--sweep", "no_such_sweep"]) == 1
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--wandb-mode", "disabled"]) == 2


def test_wandb_failure_keeps_the_local_files(results, tmp_path, monkeypatch) -> None:
    import wandb

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    lb = build_leaderboard(results, tmp_path, wandb_mode="offline", bootstrap=20)
    assert lb.wandb_dir is None
    for name in ("niah.md", "niah.csv", "niah.html", "niah_pareto.png", "README.md", "index.html"):
        assert (tmp_path / name).is_file()


# --- Pareto fronts and intervals, where the answer is known --------------------------------------------


def test_pareto_front_lower_cost_higher_score() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5]
    y = [0.5, 0.6, 0.55, 0.9, 0.9, 0.1]
    # 2 is beaten by 1 (cheaper, better); 4 by 3 (same score, cheaper); 5 is the cheapest.
    assert set(np.flatnonzero(pareto_front(x, y))) == {0, 1, 3, 5}


def test_pareto_front_ties_missing_values_and_directions() -> None:
    # Identical points are both on the front; a point missing a coordinate is on none and beats nothing.
    assert list(pareto_front([1, 1, 2, None, 0.1], [0.8, 0.8, 0.7, 0.99, math.nan])) == [
        True, True, False, False, False]
    # Throughput: higher x is better.
    assert list(pareto_front([10, 20, 30, 30], [0.9, 0.8, 0.8, 0.5], x_higher_better=True)) == [
        True, False, True, False]
    # Both axes lower-is-better (e.g. error vs latency).
    assert list(pareto_front([1, 2, 3], [0.3, 0.1, 0.2], y_higher_better=False)) == [True, True, False]
    assert list(pareto_front([], [])) == []
    assert list(pareto_front([1.0], [0.0])) == [True]


def test_bootstrap_ci_contains_the_mean_and_is_seeded() -> None:
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0.5, 0.25]
    mean, lo, hi = bootstrap_ci(values, n_resamples=1000, seed=7)
    assert mean == pytest.approx(np.mean(values))
    assert lo < mean < hi and 0.0 <= lo and hi <= 1.0
    assert bootstrap_ci(values, n_resamples=1000, seed=7) == (mean, lo, hi)
    assert bootstrap_ci(values, n_resamples=1000, seed=8) != (mean, lo, hi)
    assert bootstrap_ci(values, n_resamples=1000, seed=7, confidence=0.5)[1] > lo  # narrower at 50 %
    # Width matches the normal approximation for a large Bernoulli(0.5) sample: 2 * 1.96 * 0.5 / 20.
    big = [1.0, 0.0] * 200
    _, blo, bhi = bootstrap_ci(big, n_resamples=2000, seed=0)
    assert bhi - blo == pytest.approx(0.098, abs=0.015)


def test_bootstrap_ci_degenerate_cases() -> None:
    assert bootstrap_ci([0.1] * 7, seed=1) == (0.1, 0.1, 0.1)
    assert bootstrap_ci([True, True], seed=1) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([0.42]) == (0.42, 0.42, 0.42)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([None, math.nan]))
    mean, lo, hi = bootstrap_ci([0.0, 1.0], n_resamples=0)
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)


def test_main_metric_rule(monkeypatch) -> None:
    from tokenbench.tasks.niah import NeedleInAHaystack

    assert main_metric("niah", ["accuracy", "rouge1_recall", "accuracy@len128"]) == "accuracy"
    assert main_metric("not_a_registered_task", ["accuracy@len128", "f1", "accuracy"]) == "f1"
    monkeypatch.setattr(NeedleInAHaystack, "primary_metric", "rouge1_recall", raising=False)
    assert main_metric("niah", ["accuracy", "rouge1_recall"]) == "rouge1_recall"


# --- hand-built records: labels, directions, several tasks ---------------------------------------------


def _record(root: Path, key: str, task: str, method: str, *, keep_ratio: float | None = None,
            scores: list[float], latency: dict[str, float], memory: dict[str, float], kept: float | None,
            method_params: dict[str, Any] | None = None, sweep: str = "s1", metric: str = "accuracy",
            status: str = "ok", finished_at: str = "2026-01-02T00:00:00+00:00") -> Path:
    run_dir = root / key
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "samples.jsonl", "w") as f:
        f.writelines(json.dumps({"sample_id": f"s{i}", "metrics": {metric: s}}) + "\n"
                     for i, s in enumerate(scores))
    budget = {"keep_ratio": keep_ratio if keep_ratio is not None else 1.0, "n_keep": None, "phase": None}
    record = {
        "run_key": key, "sweep": sweep, "status": status, "error": None if status == "ok" else "CUDA OOM",
        "model": "m", "model_params": {}, "method": method, "family": "vit",
        "method_params": {**budget, **(method_params or {})}, "task": task, "task_params": {},
        "budget": budget,
        "achieved_keep_ratio": kept, "metrics": {metric: float(np.mean(scores)) if scores else None,
                                                 f"{metric}@bucket1": 0.5},
        "latency": latency, "memory": memory, "flops": None, "n_samples": len(scores),
        "n_samples_expected": len(scores), "env": {}, "started_at": finished_at, "finished_at": finished_at,
        "run_dir": "/somewhere/else", "extra": {},
    }
    (run_dir / "result.json").write_text(json.dumps(record))
    return run_dir


def test_hand_built_leaderboard(tmp_path) -> None:
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)

    def scores(p: float, n: int = 40) -> list[float]:
        return [float(v) for v in rng.random(n) < p]

    # Vision task: throughput (higher is better) instead of a latency.
    vit = [("base", "none", None, 0.9, 100.0, 1.0), ("a", "tome", 0.5, 0.85, 180.0, 0.5),
           ("b", "tome", 0.25, 0.7, 150.0, 0.25), ("c", "random", 0.5, 0.6, 170.0, 0.5)]
    for key, method, kr, p, ips, kept in vit:
        _record(root, key, "imagenet", method, keep_ratio=kr, scores=scores(p), kept=kept,
                latency={"images_per_s": ips, "images_per_s_p90": ips * 1.1},
                memory={"peak_allocated": 1e9 * (kept or 1), "weights_bytes": 3e8})
    # Same method and budget, told apart by a parameter; one OOM run; a duplicate of a run key (older copy).
    _record(root, "d", "imagenet", "tome", keep_ratio=0.5, scores=scores(0.8), kept=0.5,
            latency={"images_per_s": 160.0}, memory={"peak_allocated": 5e8},
            method_params={"prop_attn": False})
    _record(root, "e", "imagenet", "tome", keep_ratio=0.1, scores=[], kept=None, latency={}, memory={},
            status="oom")
    _record(root / "copy", "a", "imagenet", "tome", keep_ratio=0.5, scores=[0.0], kept=0.5,
            latency={"images_per_s": 1.0}, memory={}, finished_at="2025-01-01T00:00:00+00:00")
    # A second task whose main metric is its first metric.
    _record(root, "t1", "qa", "none", scores=[0.2, 0.4], metric="f1", kept=1.0, latency={"e2e_ms": 10.0},
            memory={"kv_cache_bytes": 4096})
    _record(root, "t2", "qa", "snapkv", keep_ratio=0.5, scores=[0.2, 0.4], metric="f1", kept=0.5,
            latency={"ttft_ms": 5.0}, memory={"kv_cache_bytes": 2048})
    _record(root, "other", "qa", "none", scores=[1.0], metric="f1", kept=1.0, latency={"e2e_ms": 1.0},
            memory={}, sweep="s2")

    lb = build_leaderboard(root, tmp_path / "lb", wandb_mode="disabled", sweep="s1", bootstrap=500, seed=0)
    assert set(lb.tasks) == {"imagenet", "qa"}
    img = lb.tasks["imagenet"].frame.set_index("run_key")
    assert len(img) == 6  # the older copy of "a" is dropped, the OOM run kept
    assert img.loc["a", "images_per_s"] == 180.0 and img.loc["a", "run_dir"] == str(root / "a")
    assert img.loc["a", "label"] == "tome@0.5 (prop_attn=None)"
    assert img.loc["d", "label"] == "tome@0.5 (prop_attn=False)"
    assert img.loc["base", "label"] == "none" and img.loc["e", "status"] == "oom"
    assert lb.tasks["imagenet"].axes["latency"] == ("images_per_s", True)
    assert lb.tasks["imagenet"].axes["memory"] == ("peak_allocated", False)
    acc = img["metrics.accuracy"]
    for name, col, higher in (("latency", "images_per_s", True), ("memory", "peak_allocated", False),
                              ("keep_ratio", "achieved_keep_ratio", False)):
        ok = img["status"] == "ok"
        expected = pareto_front(img[col].where(ok), acc.where(ok), x_higher_better=higher)
        assert list(img[f"pareto_{name}"]) == list(expected), name
    assert not img.loc["e", ["pareto_latency", "pareto_memory", "pareto_keep_ratio"]].any()
    # CIs straight from the samples, with the same seed.
    lines = [json.loads(line) for line in (root / "b" / "samples.jsonl").read_text().splitlines()]
    _, lo, hi = bootstrap_ci([r["metrics"]["accuracy"] for r in lines], n_resamples=500, seed=0)
    assert (img.loc["b", "metrics.accuracy.ci_lo"], img.loc["b", "metrics.accuracy.ci_hi"]) == (lo, hi)
    assert img["rank"].dropna().min() == 1 and pd.isna(img.loc["e", "rank"])

    qa = lb.tasks["qa"]
    assert qa.main_metric == "f1" and len(qa.frame) == 2  # sweep s2 left out
    assert qa.axes["latency"] == ("e2e_ms", False)
    assert "images_per_s" not in qa.frame.columns and "metrics.accuracy" not in qa.frame.columns
    assert "f1 (main)" in qa.table.columns
    assert not (tmp_path / "lb" / "qa_heatmaps.png").exists()
    assert not (tmp_path / "lb" / "imagenet_heatmaps.png").exists()
    assert (tmp_path / "lb" / "imagenet_pareto.png").read_bytes().startswith(PNG)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "lb" / "imagenet.csv"), lb.tasks["imagenet"].frame,
                                  check_dtype=False)


def test_runs_of_different_task_settings_get_separate_boards() -> None:
    from tokenbench.leaderboard.build import task_settings

    def rec(key: str, lengths: list[int], method: str = "none") -> dict:
        return {"run_key": key, "task": "niah", "method": method, "task_params": {"context_lengths": lengths,
                                                                                  "depths": [0.5]}}

    boards = task_settings([rec("a", [1024]), rec("b", [256, 512]), rec("c", [1024], "random"),
                            {"run_key": "d", "task": "other", "method": "none", "task_params": {}}])
    assert list(boards) == ["niah-1", "niah-2", "other"]
    assert [r["run_key"] for r in boards["niah-1"][2]] == ["a", "c"]
    assert boards["niah-1"][1] == "context_lengths=[1024]"
    assert boards["niah-2"][1] == "context_lengths=[256, 512]"
    assert boards["other"][:2] == ("other", "")
