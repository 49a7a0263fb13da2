"""The run pipeline end to end through the real CLI: records, skip, resume after a kill, bad input, W&B files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["model=tiny-llama", "task.context_lengths=[128,192]", "task.depths=[0.0,0.5,1.0]",
        "task.max_new_tokens=4", "measure.fixed_output_tokens=4", "measure.warmup=0"]


def tokenbench(*args: str, out: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]  # Hydra flags (-m) go before the overrides
    cmd = [sys.executable, "-m", "tokenbench.cli", *flags, f"output_dir={out}", *[a for a in args if a not in flags]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_dirs(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")] if out.exists() else []


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def records(out: Path) -> list[dict]:
    """The result records of every run under ``out`` (Hydra's ``_sweeps`` folder left out)."""
    return [record(d) for d in run_dirs(out)]


def test_run_writes_record_and_skips_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = tokenbench(*TINY, "method=streaming_llm", "method.keep_ratio=0.5", out=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(out)
    rec = record(run_dir)
    assert rec["run_key"] == run_dir.name
    assert rec["status"] == "ok" and rec["error"] is None
    assert rec["n_samples"] == rec["n_samples_expected"] == 6
    assert rec["method"] == "streaming_llm" and rec["family"] == "kv" and rec["task"] == "niah"
    assert rec["budget"]["keep_ratio"] == 0.5
    assert 0.4 < rec["achieved_keep_ratio"] <= 0.55
    assert set(rec["metrics"]) >= {"accuracy", "rouge1_recall"}
    for k in ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms", "prefill_ms_p90"):
        assert rec["latency"][k] > 0
    assert rec["memory"]["kv_cache_bytes"] > 0 and rec["memory"]["weights_bytes"] > 0
    for k in ("torch", "transformers", "git_sha", "host"):
        assert k in rec["env"]
    assert (run_dir / "niah_heatmap.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert "niah × streaming_llm × tiny-llama" in proc.stdout and "accuracy" in proc.stdout  # result table

    before = (run_dir / "samples.jsonl").read_bytes()
    mtime = (run_dir / "result.json").stat().st_mtime_ns
    again = tokenbench(*TINY, "method=streaming_llm", "method.keep_ratio=0.5", out=out)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "samples.jsonl").read_bytes() == before
    assert (run_dir / "result.json").stat().st_mtime_ns == mtime  # complete: skipped, nothing rewritten
    assert len(run_dirs(out)) == 1


def test_kill_midway_then_resume_records_every_sample_once(tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = ["model=tiny-llama", "task.context_lengths=[512,1024]", "task.depths=[0.0,0.2,0.4,0.6,0.8,1.0]",
            "task.max_new_tokens=16", "measure.fixed_output_tokens=16", "measure.warmup=0", "method=random",
            "method.keep_ratio=0.5", "wandb.mode=disabled"]
    cmd = [sys.executable, "-m", "tokenbench.cli", f"output_dir={out}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    log = None
    try:
        while time.time() < deadline and proc.poll() is None:
            dirs = run_dirs(out)
            if dirs and (dirs[0] / "samples.jsonl").exists():
                log = dirs[0] / "samples.jsonl"
                if len(log.read_text().splitlines()) >= 2:
                    break
            time.sleep(0.005)
        assert proc.poll() is None, "run finished before it could be killed; make samples slower"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert log is not None
    killed_at = len(log.read_text().splitlines())
    assert 2 <= killed_at < 12
    assert not (log.parent / "result.json").exists()

    done = tokenbench(*args, out=out)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["sample_id"] for line in log.read_text().splitlines() if line.strip()]
    assert len(ids) == len(set(ids)) == 12  # every sample exactly once
    rec = record(log.parent)
    assert rec["status"] == "ok" and rec["n_samples"] == 12
    assert rec["extra"]["resumed_with"] >= killed_at


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["method=streamingllm"], "unknown method 'streamingllm'. Did you mean 'streaming_llm'?"),
        (["task=nia"], "unknown task 'nia'. Did you mean 'niah'?"),
        (["model=tiny-lama"], "unknown model 'tiny-lama'. Did you mean 'tiny-llama'?"),
        (["method=random", "method.keep_ratio=-0.5"], "keep_ratio"),
        (["method=streaming_llm", "method.keep_ratio=1.5"], "keep_ratio"),
        (["task.haystack_dir=/nonexistent/essays"], "/nonexistent/essays"),
        (["task.haystack_dir={empty}"], "{empty}"),
    ],
)
def test_bad_input_one_clear_line_nonzero_nothing_written(tmp_path: Path, args: list[str], expect: str) -> None:
    empty = tmp_path / "empty_essays"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    args = [a.replace("{empty}", str(empty)) for a in args]
    expect = expect.replace("{empty}", str(empty))
    out = tmp_path / "res"
    proc = tokenbench("model=tiny-llama", *args, out=out, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tokenbench: error: ")
    assert expect in lines[0]
    assert not out.exists()


def test_wrong_type_is_hydras_error(tmp_path: Path) -> None:
    proc = tokenbench("model=tiny-llama", "method=streaming_llm", "method.keep_ratio=half", out=tmp_path / "r",
                      timeout=120)
    assert proc.returncode != 0
    assert "keep_ratio" in proc.stderr and "half" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_wandb_offline_files_hold_config_summary_and_table(tmp_path: Path) -> None:
    from tokenbench.wandb_log import read_offline_run

    out = tmp_path / "res"
    proc = tokenbench(*TINY, "method=none", "sweep_name=wb_test", out=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(out)
    rec = record(run_dir)
    (wb,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert wb.name.endswith(rec["run_key"])
    (run_file,) = list(wb.glob("run-*.wandb"))
    logged = read_offline_run(run_file)
    assert logged["run"]["run_id"] == rec["run_key"]
    assert logged["run"]["group"] == "wb_test" and logged["run"]["name"] == "niah/none/tiny-llama"
    assert logged["config"]["model"]["name"] == "tiny-llama"
    assert logged["config"]["task"]["context_lengths"] == [128, 192]
    assert logged["config"]["run_key"] == rec["run_key"]
    summary = logged["summary"]
    assert summary["status"] == "ok" and summary["n_samples"] == 6
    assert summary["metrics/accuracy"] == pytest.approx(rec["metrics"]["accuracy"])
    assert summary["latency/prefill_ms"] == pytest.approx(rec["latency"]["prefill_ms"])
    assert summary["memory/kv_cache_bytes"] == pytest.approx(rec["memory"]["kv_cache_bytes"])
    assert summary["samples/_type"] == "table-file" and summary["samples/nrows"] == 6
    # The table file itself: one row per sample, with the prediction and the sample's metrics.
    table = json.loads((wb / "files" / summary["samples/path"]).read_text())
    assert len(table["data"]) == 6
    col = table["columns"].index("sample_id")
    rows = {json.loads(line)["sample_id"]: json.loads(line) for line in (run_dir / "samples.jsonl").open()}
    assert {r[col] for r in table["data"]} == set(rows)
    pred = table["columns"].index("prediction")
    for r in table["data"]:
        assert r[pred] == rows[r[col]]["prediction"]
    assert summary["plots/niah_heatmap/_type"] == "image-file"


def test_wandb_failure_keeps_local_result(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = tokenbench(*TINY, "method=none", "wandb.mode=bogus", out=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(out)
    assert record(run_dir)["status"] == "ok"
    assert "W&B logging failed" in proc.stdout + proc.stderr


def test_help_and_cfg_job(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tokenbench.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "streaming_llm" in proc.stdout and "niah" in proc.stdout and "tiny-llama" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tokenbench.cli", "--cfg", "job", "method=streaming_llm",
                           "method.keep_ratio=0.3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "keep_ratio: 0.3" in proc.stdout and "name: streaming_llm" in proc.stdout


def test_local_sweep_records_an_invalid_point_as_failed_and_runs_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = tokenbench("-m", *TINY, "method=random", "method.keep_ratio=0.5,1.5", "wandb.mode=disabled", out=out)
    assert proc.returncode == 0, proc.stderr
    assert "keep_ratio must be in (0, 1], got 1.5" in proc.stderr
    by_ratio = {r["method_params"]["keep_ratio"]: r for r in records(out)}
    assert set(by_ratio) == {0.5, 1.5}
    assert by_ratio[0.5]["status"] == "ok" and by_ratio[0.5]["n_samples"] == 6
    assert by_ratio[1.5]["status"] == "failed" and "keep_ratio" in by_ratio[1.5]["error"]
    assert by_ratio[1.5]["n_samples"] == 0


def test_points_sharing_a_model_load_it_once_per_process(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = tokenbench("-m", *TINY, "method=streaming_llm", "method.keep_ratio=0.25,0.5", "wandb.mode=disabled",
                      out=out)
    assert proc.returncode == 0, proc.stderr
    recs = sorted(records(out),
                  key=lambda r: r["started_at"] + str(r["extra"]["model_reused"]))
    assert [r["extra"]["model_reused"] for r in recs].count(True) == 1
    fresh = next(r for r in recs if not r["extra"]["model_reused"])
    reused = next(r for r in recs if r["extra"]["model_reused"])
    assert fresh["extra"]["model_load_s"] > 0 and reused["extra"]["model_load_s"] == 0
    assert reused["status"] == "ok" and reused["n_samples"] == 6


def test_sweep_preset_expands_into_its_points(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = tokenbench("-m", "+sweep=smoke", "wandb.mode=disabled", out=out)
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    assert sorted((r["method"], r["budget"]["keep_ratio"]) for r in recs) == [
        ("random", 0.25), ("random", 0.5), ("streaming_llm", 0.25), ("streaming_llm", 0.5)]
    assert {r["sweep"] for r in recs} == {"smoke"} and {r["status"] for r in recs} == {"ok"}
    assert (out / "_sweeps" / "smoke").is_dir()


def test_method_sweep_with_one_fixed_budget_composes(tmp_path: Path) -> None:
    """Hydra composes a sweep's base config with the default method (`none`) and the fixed overrides."""
    out = tmp_path / "res"
    proc = tokenbench("-m", *TINY, "method=streaming_llm,random", "method.keep_ratio=0.5", "wandb.mode=disabled",
                      out=out)
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    assert sorted(r["method"] for r in recs) == ["random", "streaming_llm"]
    assert {r["status"] for r in recs} == {"ok"} and {r["budget"]["keep_ratio"] for r in recs} == {0.5}


def test_method_of_another_family_fails_before_loading(tmp_path: Path) -> None:
    """A plugin (entry point `tokenbench.plugins`) registers a vit method; pairing it with an LLM says what fits."""
    site = tmp_path / "site"
    (site / "tb_vit_plugin").mkdir(parents=True)
    (site / "tb_vit_plugin" / "__init__.py").write_text(
        "from dataclasses import dataclass\n"
        "from tokenbench import register_method\n"
        "from tokenbench.method import Method\n\n"
        "@register_method('fake_vit_merge', family='vit')\n"
        "@dataclass\n"
        "class FakeVitMerge(Method):\n"
        "    family = 'vit'\n"
        "    r: int = 8  # tokens merged per layer\n")
    dist = site / "tb_vit_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-vit-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenbench.plugins]\nvit = tb_vit_plugin\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "res"
    proc = tokenbench("model=tiny-llama", "method=fake_vit_merge", "method.r=4", out=out, env=env, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "method 'fake_vit_merge' (family vit) does not fit model 'tiny-llama'" in lines[0]
    works = lines[0].split("Methods that work here: ")[1].split(", ")
    assert {"none", "random", "streaming_llm"} <= set(works) and "fake_vit_merge" not in works
    assert not out.exists()


def test_batched_generation_records_every_sample_like_single_runs(tmp_path: Path) -> None:
    """measure.batch_size=3: samples of different lengths go through as left-padded batches; the run has its
    own key, every sample gets its row with its own compression record, predictions equal batch-1 runs."""
    out = tmp_path / "res"
    args = [*TINY, "method=snapkv", "method.keep_ratio=0.5"]
    assert tokenbench(*args, out=out).returncode == 0
    proc = tokenbench(*args, "measure.batch_size=3", out=out)
    assert proc.returncode == 0, proc.stderr
    dirs = run_dirs(out)
    assert len(dirs) == 2  # batch size 3 is its own run
    by_batch = {record(d)["extra"]["batch_size"]: d for d in dirs}
    single, batched = ([json.loads(x) for x in (by_batch[b] / "samples.jsonl").read_text().splitlines()]
                       for b in (1, 3))
    assert [r["sample_id"] for r in batched] == [r["sample_id"] for r in single]
    for a, b in zip(single, batched):
        assert b["prediction"] == a["prediction"]
        assert b["compression"]["batch_size"] == 3 and "batch_size" not in a["compression"]
        assert b["compression"]["kept_tokens"] == a["compression"]["kept_tokens"]
        assert b["n_context_tokens"] == a["n_context_tokens"]
    assert record(by_batch[3])["n_samples"] == 6
