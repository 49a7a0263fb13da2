"""Sweeps on a real single-node SLURM cluster (slurm/start.sh) through the real CLI and the `slurm_cpu`
launcher preset: a sweep runs as a SLURM job array; a point requeued midway (``scontrol requeue``, and
submitit's own checkpoint-and-requeue on USR2) resumes from its samples.jsonl with every sample exactly once;
an invalid point does not stop the others.

Skipped without the SLURM packages unless TOKENBENCH_REQUIRE_SLURM=1 (then they are installed and a cluster
that does not come up fails). A few minutes on two cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster  # the `slurm_cluster` fixture comes from conftest (pytest_plugins)
from tokenbench.results import SampleLog

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

TINY = ["model=tiny-llama", "task.context_lengths=[128]", "task.depths=[0.0,1.0]", "task.max_new_tokens=4",
        "measure.fixed_output_tokens=4", "measure.warmup=0", "wandb.mode=offline"]


@dataclass
class Sweep:
    name: str  # the SLURM job name, unique to this sweep
    out: Path  # output_dir: one run directory per point
    sweep_dir: Path  # hydra.sweep.dir: multirun.yaml and .submitit/
    cmd: list[str]

    def command(self) -> list[str]:
        return self.cmd

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("*/result.json"))]

    def array_tasks(self) -> dict[int, str]:
        """Sweep point index -> SLURM job id (``<array>_<index>``), from submitit's per-task folders."""
        tasks = {}
        for p in (self.sweep_dir / ".submitit").glob("*_*"):
            m = re.fullmatch(r"(\d+)_(\d+)", p.name)
            if m:
                tasks[int(m.group(2))] = p.name
        return tasks

    def task_log(self, job_id: str) -> str:
        logs = [self.sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.{ext}" for ext in ("out", "err")]
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())


def make_sweep(tmp: Path, *overrides: str, launcher: str = "slurm_cpu") -> Sweep:
    name = f"tbtest-{uuid.uuid4().hex[:8]}"
    out, sweep_dir = tmp / "results", tmp / "sweep"
    cmd = [sys.executable, "-m", "tokenbench.cli", "-m", *overrides, f"output_dir={out}",
           f"hydra.sweep.dir={sweep_dir}", f"hydra/launcher={launcher}", f"hydra.launcher.name={name}"]
    return Sweep(name, out, sweep_dir, cmd)


def run_sweep(cluster: SlurmCluster, sweep: Sweep, timeout: float = 420) -> subprocess.CompletedProcess:
    finished = False
    try:
        proc = subprocess.run(sweep.command(), check=False, capture_output=True, text=True, env=cluster.env,
                              cwd=sweep.out.parent, timeout=timeout)
        finished = True
        return proc
    finally:
        end_sweep(cluster, sweep, finished)


def end_sweep(cluster: SlurmCluster, sweep: Sweep, finished: bool) -> None:
    """Nothing of this sweep outlives the test. The launcher returns once every task has written its result,
    a moment before the tasks exit: let them exit, then cancel whatever is left."""
    if finished:
        cluster.wait_gone(sweep.name, timeout=60)
    cluster.cancel_named(sweep.name)


def report(proc: subprocess.CompletedProcess | None, sweep: Sweep) -> str:
    """Everything useful when an assertion fails: launcher output and the tasks' logs."""
    parts = []
    if proc is not None:
        parts += [f"rc={proc.returncode}", "--- launcher stdout", proc.stdout[-3000:], "--- launcher stderr",
                  proc.stderr[-3000:]]
    for idx, job in sorted(sweep.array_tasks().items()):
        parts += [f"--- task {idx} ({job})", sweep.task_log(job)[-2000:]]
    return "\n".join(parts)


def wait_for_sacct(cluster: SlurmCluster, array_id: str, n: int, timeout: float = 60) -> list[dict]:
    """Accounting lags the result files by a moment: wait until the n tasks' final rows are COMPLETED."""
    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.sacct(array_id, duplicates=False)
        if len([r for r in rows if r["State"] == "COMPLETED"]) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(1)


# --------------------------------------------------------------------------------------------------------
# (a) a 4-point sweep runs as a SLURM job array


@pytest.fixture(scope="module")
def sweep4(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """The 4-point sweep, run once for the module (other tests may build on its records)."""
    sweep = make_sweep(tmp_path_factory.mktemp("sweep4"), *TINY, "method=streaming_llm,random",
                       "method.keep_ratio=0.25,0.5")
    proc = run_sweep(slurm_cluster, sweep)
    return sweep, proc


def test_sweep_runs_as_slurm_job_array(slurm_cluster: SlurmCluster, sweep4) -> None:  # noqa: F811
    sweep, proc = sweep4
    assert proc.returncode == 0, report(proc, sweep)
    assert "Submitit 'slurm' sweep output dir" in proc.stdout + proc.stderr

    records = sweep.records()
    assert len(records) == 4, report(proc, sweep)
    assert {(r["method"], r["budget"]["keep_ratio"]) for r in records} == {
        ("streaming_llm", 0.25), ("streaming_llm", 0.5), ("random", 0.25), ("random", 0.5)}
    for r in records:
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["n_samples"] == r["n_samples_expected"] == 2
        assert r["sweep"] == "default"

    # They ran as the tasks of one SLURM job array: submitit's folders, its logs, and the accounting.
    tasks = sweep.array_tasks()
    assert sorted(tasks) == [0, 1, 2, 3], report(proc, sweep)
    (array_id,) = {job.split("_")[0] for job in tasks.values()}
    for job in tasks.values():
        log = sweep.task_log(job)
        assert f"JobEnvironment(job_id={job}" in log and "Job completed successfully" in log, log[-2000:]
    rows = wait_for_sacct(slurm_cluster, array_id, 4)
    assert sorted(r["JobID"] for r in rows) == sorted(tasks.values()), rows
    assert all(r["State"] == "COMPLETED" and r["JobName"] == sweep.name for r in rows), rows
    script = next((sweep.sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --requeue" in script and "OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in script


def test_leaderboard_of_the_slurm_sweep(sweep4, tmp_path: Path) -> None:
    """The leaderboard built from the 4 SLURM records: 4 rows, its PNGs, and the W&B leaderboard table."""
    from tokenbench.leaderboard import build_leaderboard
    from tokenbench.wandb_log import read_offline_run

    sweep, proc = sweep4
    assert proc.returncode == 0, report(proc, sweep)
    lb = build_leaderboard(sweep.out, tmp_path / "lb", wandb_mode="offline", bootstrap=200)
    (board,) = lb.tasks.values()
    assert len(board.frame) == 4 and set(board.frame["status"]) == {"ok"}
    for key in ("pareto", "heatmaps"):
        assert board.files[key].read_bytes().startswith(b"\x89PNG")
    (run_file,) = (tmp_path / "lb" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = read_offline_run(run_file)
    assert logged["run"]["job_type"] == "leaderboard"
    assert logged["summary"][f"leaderboard/{board.task}/_type"] == "table-file"
    assert logged["summary"][f"leaderboard/{board.task}/nrows"] == 4


# --------------------------------------------------------------------------------------------------------
# (b) preemption: a requeued point resumes from its samples.jsonl; every sample is recorded exactly once

# Slow enough (~0.6 s a sample here) that a point is still running when SLURM kills it KillWait (5 s) after
# the requeue: submitit ignores SIGTERM, so the point keeps recording samples until the SIGKILL.
SLOW = ["model=tiny-llama", "task.context_lengths=[128,160,192,224]",
        "task.depths=[0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]", "task.max_new_tokens=4",
        "measure.fixed_output_tokens=4", "measure.warmup=0", "measure.repeats=40", "wandb.mode=offline"]
N_SLOW = 4 * 11


def _lines(path: Path) -> int:
    return len(SampleLog(path).read()) if path.exists() else 0


def test_requeued_points_resume_with_every_sample_once(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    # Point 0 is requeued by SLURM (`scontrol requeue`, what preemption with PreemptMode=REQUEUE does:
    # SIGTERM, then SIGKILL after KillWait, then the job starts again). Point 1 gets USR2, SLURM's warning
    # before a time limit: submitit checkpoints the Hydra job and requeues it itself.
    sweep = make_sweep(tmp_path, *SLOW, "method=streaming_llm", "method.keep_ratio=0.25,0.5")
    ratios = {0: 0.25, 1: 0.5}
    proc = subprocess.Popen(sweep.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=slurm_cluster.env, cwd=tmp_path)
    interrupted: dict[int, tuple[str, int]] = {}  # point -> (job id, samples recorded when interrupted)
    try:
        deadline = time.monotonic() + 300
        while len(interrupted) < 2 and proc.poll() is None and time.monotonic() < deadline:
            tasks = sweep.array_tasks()
            for cfg in sweep.out.glob("*/config.yaml"):
                ratio = float(re.search(r"keep_ratio: ([0-9.]+)", cfg.read_text()).group(1))
                idx = next(i for i, r in ratios.items() if r == ratio)
                n = _lines(cfg.parent / "samples.jsonl")
                if idx in interrupted or idx not in tasks or n < 1:
                    continue
                job = tasks[idx]
                if idx == 0:
                    slurm_cluster.cmd("scontrol", "requeue", job)
                else:
                    slurm_cluster.cmd("scancel", "--signal=USR2", job)
                interrupted[idx] = (job, n)
            time.sleep(0.2)
        assert len(interrupted) == 2, f"could not interrupt both points midway: {interrupted}"
        stdout, stderr = proc.communicate(timeout=420)
    finally:
        finished = proc.poll() is not None
        if not finished:
            proc.kill()
            proc.communicate()
        end_sweep(slurm_cluster, sweep, finished)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode == 0, report(done, sweep)

    records = {r["budget"]["keep_ratio"]: r for r in sweep.records()}
    assert sorted(records) == [0.25, 0.5], report(done, sweep)
    for idx, (job, n_before) in interrupted.items():
        rec = records[ratios[idx]]
        assert rec["status"] == "ok", rec
        assert rec["n_samples"] == rec["n_samples_expected"] == N_SLOW
        rows = SampleLog(Path(rec["run_dir"]) / "samples.jsonl").read()
        ids = [r["sample_id"] for r in rows]
        assert len(ids) == len(set(ids)) == N_SLOW, f"point {idx}: {len(ids)} rows, {len(set(ids))} distinct"
        # The last attempt resumed after the samples recorded before the interruption, it did not start over.
        assert n_before <= rec["extra"]["resumed_with"] < N_SLOW, (n_before, rec["extra"])

        # SLURM really ran the task twice: a REQUEUED attempt, then a COMPLETED one.
        states = [r["State"] for r in slurm_cluster.sacct(job)]
        assert "REQUEUED" in states and states[-1] == "COMPLETED", states
        assert int(slurm_cluster.job_info(job).get("Restarts", "1")) >= 1
        log = sweep.task_log(job)  # submitit appends the logs of every attempt
        assert log.count(f"JobEnvironment(job_id={job}") >= 2, log[-3000:]
        assert f"resuming run {rec['run_key']}" in log
        if idx == 1:
            assert "Caught signal SIGUSR2" in log and f"Requeued job {job}" in log, log[-3000:]


# --------------------------------------------------------------------------------------------------------
# (c) a failing point does not stop the others


def test_invalid_point_does_not_stop_the_sweep(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    sweep = make_sweep(tmp_path, *TINY, "method=streaming_llm", "method.keep_ratio=0.5,1.5")
    proc = run_sweep(slurm_cluster, sweep)
    records = sweep.records()
    good = [r for r in records if r["method_params"].get("keep_ratio") == 0.5]
    bad = [r for r in records if r["method_params"].get("keep_ratio") == 1.5]
    assert len(good) == 1 and good[0]["status"] == "ok", report(proc, sweep)
    assert good[0]["n_samples"] == 2
    for r in bad:  # recorded as failed, with its error (one line, naming the parameter)
        assert r["status"] == "failed" and "keep_ratio" in (r["error"] or ""), r
    # Both points ran as SLURM tasks and both tasks ended normally: the bad point failed inside its job.
    tasks = sweep.array_tasks()
    assert sorted(tasks) == [0, 1], report(proc, sweep)
    bad_log = sweep.task_log(tasks[1])
    assert "keep_ratio" in bad_log, bad_log[-2000:]


# --------------------------------------------------------------------------------------------------------
# the presets compose (no cluster needed)


@pytest.mark.parametrize("preset", ["slurm", "slurm_cpu", "local"])
def test_launcher_presets_compose(preset: str) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from tokenbench import registry
    from tokenbench.cli import CONF_DIR
    from tokenbench.config import store_base_config

    registry.load_all()
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={preset}", "output_dir=/tmp/x"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    if preset == "local":
        assert launcher._target_.endswith("BasicLauncher")
        return
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition is None and launcher.account is None and launcher.qos is None
    assert launcher.max_num_timeout >= 1 and launcher.additional_parameters.requeue is True
    assert (launcher.gpus_per_node, launcher.cpus_per_task) == ((1, 8) if preset == "slurm" else (None, 1))
    setup = OmegaConf.to_container(launcher.setup, resolve=True)  # the launcher resolves it once more
    assert any("OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in line for line in setup)
    assert "${" not in " ".join(setup)
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # inside the sweep directory
    assert launcher.submitit_folder.startswith("/tmp/x/_sweeps/default/")
