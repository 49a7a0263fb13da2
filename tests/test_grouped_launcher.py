"""The grouping launcher (hydra_plugins.tokenbench_launcher, slurm/launcher/): sweep points that share a model
run in one job and load the model once.

Fast tests: the grouping function, the launcher's bookkeeping (one job per group, returns in sweep order, a
dead job fails only its own points) with a stand-in executor, and the presets composing. The SLURM test
(marker ``slurm``) runs a real 4-point sweep on the local single-node cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hydra_plugins.tokenbench_launcher import group_points, model_overrides
from slurm_cluster import SlurmCluster  # the `slurm_cluster` fixture comes from conftest (pytest_plugins)


def ov(*items: str) -> list[str]:
    return list(items)


# ---------------------------------------------------------------------------------------------------------
# grouping


def test_points_with_equal_model_overrides_share_a_group_in_sweep_order() -> None:
    points = [ov("model=tiny-llama", "model.seed=0", "method=a"),
              ov("model=tiny-llama", "model.seed=1", "method=a"),
              ov("method=b", "model.seed=0", "model=tiny-llama"),  # same model, overrides in another order
              ov("model=tiny-llama", "model.seed=1", "method=b"),
              ov("model=smollm2-135m", "method=a")]
    assert group_points(points) == [[0, 2], [1, 3], [4]]


def test_only_model_overrides_decide() -> None:
    assert model_overrides(["model=x", "model.seed=1", "+model.extra=2", "~model.dtype", "method.model=y",
                            "modelx=3", "task=niah", "hydra.launcher.mem_gb=4"]) == (
        ("+model.extra", "2"), ("model", "x"), ("model.seed", "1"), ("~model.dtype", ""))
    # no model override at all: everything shares the config's default model
    assert group_points([ov("method=a"), ov("method=b"), ov("task.depths=[0.5]")]) == [[0, 1, 2]]
    # a different value anywhere in the model overrides separates points
    assert group_points([ov("model.dtype=float32"), ov("model.dtype=bfloat16"), ov("model.dtype=float32")]) \
        == [[0, 2], [1]]


def test_max_points_per_job_splits_groups_into_balanced_chunks() -> None:
    points = [ov("model=a", f"method.keep_ratio=0.{i}") for i in range(1, 6)] + [ov("model=b")]
    assert group_points(points, max_points_per_job=3) == [[0, 1, 2], [3, 4], [5]]
    assert group_points(points, max_points_per_job=2) == [[0, 1], [2, 3], [4], [5]]
    assert group_points(points, max_points_per_job=1) == [[i] for i in range(6)]
    assert group_points(points, max_points_per_job=10) == [[0, 1, 2, 3, 4], [5]]
    with pytest.raises(ValueError, match="max_points_per_job"):
        group_points(points, max_points_per_job=0)


def test_group_by_model_off_is_one_point_per_job() -> None:
    points = [ov("model=a"), ov("model=a"), ov("model=b")]
    assert group_points(points, group_by_model=False) == [[0], [1], [2]]


# ---------------------------------------------------------------------------------------------------------
# the launcher's bookkeeping, with a stand-in for the submitit executor


class _FakeJob:
    def __init__(self, job_id: str, fn: Any, args: tuple, die: bool) -> None:
        self.job_id, self._fn, self._args, self._die = job_id, fn, args, die

    def results(self) -> list:
        if self._die:
            raise RuntimeError(f"job {self.job_id} was killed")
        return [self._fn(*self._args)]


class _FakeExecutor:
    def __init__(self, die: set[int]) -> None:
        self.die, self.submitted = die, []

    def map_array(self, fn: Any, *iterables: Any) -> list[_FakeJob]:
        args = list(zip(*iterables))
        self.submitted.extend(args)
        return [_FakeJob(f"7_{i}", fn, a, i in self.die) for i, a in enumerate(args)]


def _launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, points: list[list[str]], die: frozenset[int] = frozenset(),
            **options: Any) -> tuple[list, _FakeExecutor, list]:
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.tokenbench_launcher import GroupedSlurmLauncher
    from omegaconf import OmegaConf

    calls: list[tuple[int, list[str]]] = []

    def fake_point(self: Any, overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                   state: Any) -> JobReturn:  # stands in for BaseSubmititLauncher.__call__ (run_job)
        calls.append((job_num, overrides))
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=job_num)

    monkeypatch.setattr(GroupedSlurmLauncher, "__call__", fake_point)
    launcher = GroupedSlurmLauncher(submitit_folder=str(tmp_path / "s" / "%j"), timeout_min=5, **options)
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    executor = _FakeExecutor(die)
    monkeypatch.setattr(launcher, "_executor", lambda: executor)
    return list(launcher.launch(points, initial_job_idx=10)), executor, calls


def test_launch_submits_one_job_per_group_and_returns_in_sweep_order(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    points = [ov("model.seed=0", "method=a"), ov("model.seed=1", "method=a"),
              ov("model.seed=0", "method=b"), ov("model.seed=1", "method=b")]
    returns, executor, calls = _launch(tmp_path, monkeypatch, points)
    assert len(executor.submitted) == 2  # one array task per model
    assert [[idx for _, idx in group] for group, _state in executor.submitted] == [[10, 12], [11, 13]]
    assert [job_num for job_num, _ in calls] == [10, 12, 11, 13]  # each group's points in sweep order
    assert [r.return_value for r in returns] == [10, 11, 12, 13]  # Hydra gets them in sweep order
    assert [r.overrides for r in returns] == points


def test_a_dead_job_fails_only_its_own_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.utils import JobStatus

    points = [ov("model.seed=0", "method=a"), ov("model.seed=1", "method=a"),
              ov("model.seed=0", "method=b"), ov("model.seed=1", "method=b")]
    returns, _, _ = _launch(tmp_path, monkeypatch, points, die={1})
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED] * 2
    with pytest.raises(RuntimeError, match="killed"):
        returns[1].return_value  # noqa: B018 - Hydra's sweeper reads it and so reports the failure
    assert returns[2].return_value == 12


def test_options_cap_and_ungrouped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    points = [ov("method=a"), ov("method=b"), ov("method=c")]
    _, executor, _ = _launch(tmp_path, monkeypatch, points, max_points_per_job=2)
    assert [[idx for _, idx in group] for group, _ in executor.submitted] == [[10, 11], [12]]
    with pytest.raises(ValueError, match="max_points_per_job"):
        _launch(tmp_path, monkeypatch, points, max_points_per_job=0)


def test_presets_compose_to_the_grouping_launcher() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra_plugins.tokenbench_launcher import register
    from tokenbench import registry
    from tokenbench.cli import CONF_DIR
    from tokenbench.config import store_base_config

    registry.load_all()
    store_base_config()
    register()
    names = Plugins.instance().class_name_to_class
    assert "hydra_plugins.tokenbench_launcher.grouped.GroupedSlurmLauncher" in names
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            gpu = compose("config", overrides=["hydra/launcher=slurm_grouped"], return_hydra_config=True)
            cpu = compose("config", overrides=["hydra/launcher=slurm_grouped_cpu",
                                               "hydra.launcher.max_points_per_job=4"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert gpu.hydra.launcher._target_.endswith("grouped.GroupedSlurmLauncher")
    assert gpu.hydra.launcher.group_by_model is True and gpu.hydra.launcher.gpus_per_node == 1
    assert cpu.hydra.launcher.gpus_per_node is None and cpu.hydra.launcher.cpus_per_task == 1
    assert cpu.hydra.launcher.max_points_per_job == 4 and cpu.hydra.launcher.group_by_model is True


# ---------------------------------------------------------------------------------------------------------
# on the local SLURM cluster (the session fixture of tests/slurm_cluster.py uses a running cluster or starts
# one; skipped without the SLURM packages unless TOKENBENCH_REQUIRE_SLURM=1)

TINY = ["model=tiny-llama", "task.context_lengths=[128]", "task.depths=[0.5]", "task.max_new_tokens=4",
        "measure.fixed_output_tokens=4", "measure.warmup=0", "wandb.mode=disabled"]



def _submitted_jobs(sweep_dir: Path) -> list[str]:
    """The SLURM job ids submitit submitted for a sweep: one ``<id>_submitted.pkl`` per job or array task
    (in ``.submitit/<array>_<task>/`` for an array, ``.submitit/<id>/`` for a lone job)."""
    return sorted(p.name[: -len("_submitted.pkl")] for p in (sweep_dir / ".submitit").glob("*/*_submitted.pkl"))


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_grouped_sweep_runs_one_slurm_job_per_model(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    name = f"tbgroup-{uuid.uuid4().hex[:8]}"
    out, sweep_dir = tmp_path / "results", tmp_path / "sweep"
    # methods outermost, so that the points sharing a model are not neighbours in the sweep
    cmd = [sys.executable, "-m", "tokenbench.cli", "-m", *TINY, "method=streaming_llm,random", "model.seed=0,1",
           f"output_dir={out}", f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=slurm_grouped_cpu",
           f"hydra.launcher.name={name}"]
    started = time.monotonic()
    proc = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=slurm_cluster.env, cwd=tmp_path,
                              timeout=480, check=False)
    finally:  # nothing of this test outlives it
        if proc is not None:
            slurm_cluster.wait_gone(name, timeout=60)
        slurm_cluster.cancel_named(name)
    wall = time.monotonic() - started
    jobs = _submitted_jobs(sweep_dir)
    logs = {j: "\n".join(p.read_text(errors="replace") for p in (sweep_dir / ".submitit").glob(f"*/{j}_0_log.*"))
            for j in jobs}
    report = (f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}\n"
              + "\n".join(f"--- job {j}\n{text[-2000:]}" for j, text in logs.items()))
    assert proc.returncode == 0, report
    assert "4 points in 2 jobs (grouped by model)" in proc.stdout + proc.stderr, report

    # exactly two SLURM jobs, both completed
    assert len(jobs) == 2, report
    deadline = time.monotonic() + 60
    while True:  # accounting lags the result files by a moment
        rows = slurm_cluster.sacct(",".join(jobs), duplicates=False)
        if sum(r["State"] == "COMPLETED" for r in rows) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(r["JobID"] for r in rows) == jobs and {r["State"] for r in rows} == {"COMPLETED"}, rows
    assert all(r["JobName"] == name for r in rows)

    # each job ran the two points of one model, one after the other
    for text in logs.values():
        points = re.findall(r"\[tokenbench_launcher\] point (\d)/2 of this job: #\d+ .*model\.seed=(\d)", text)
        assert [n for n, _ in points] == ["1", "2"], text[-2000:]
        assert len({seed for _, seed in points}) == 1, text[-2000:]

    # four ok records; per model, the first point loaded it and the second reused it
    records = [json.loads(p.read_text()) for p in out.glob("*/result.json")]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), report
    assert {(r["method"], r["model_params"]["seed"]) for r in records} == {
        (m, s) for m in ("streaming_llm", "random") for s in (0, 1)}
    for seed in (0, 1):
        mine = [r["extra"] for r in records if r["model_params"]["seed"] == seed]
        assert sorted(e["model_reused"] for e in mine) == [False, True], mine
        fresh, reused = sorted(mine, key=lambda e: e["model_reused"])
        assert fresh["model_load_s"] > 0 and reused["model_load_s"] == 0
    print(f"grouped 4-point sweep on SLURM: {wall:.1f} s, jobs {jobs}")
