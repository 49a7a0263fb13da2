"""A pytest fixture for a real single-node SLURM cluster (slurm/start.sh), for tests marked ``slurm``.

``slurm_cluster`` (session scope) makes sure a cluster is up and hands the test a ``SlurmCluster``: the
environment its commands need (``SLURM_CONF``), and small wrappers over ``sacct``, ``squeue``, ``scontrol``.

- A cluster that is already running (started by hand, by CI, by another test session) is used as it is and
  left running. Otherwise the fixture starts one with ``slurm/start.sh`` and stops it (``slurm/stop.sh``,
  which also deletes its state) when the session ends.
- Without the SLURM/munge binaries, or without root (slurmd must run as root), the tests are skipped —
  unless ``TOKENBENCH_REQUIRE_SLURM=1`` (CI): then missing packages are installed with ``slurm/install.sh``
  and anything that keeps the cluster from coming up fails the tests instead of skipping them.
- ``TOKENBENCH_SLURM_DIR`` picks the cluster (state directory), as for the scripts.

Use it from a test module with ``from slurm_cluster import slurm_cluster  # noqa: F401`` (or register the
module once as a plugin in conftest.py: ``pytest_plugins = ["slurm_cluster"]``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db")
CLIENTS = ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel")


def required() -> bool:
    return os.environ.get("TOKENBENCH_REQUIRE_SLURM", "") not in ("", "0", "false", "no")


def state_dir() -> Path:
    return Path(os.environ.get("TOKENBENCH_SLURM_DIR", "/tmp/tokenbench-slurm"))


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]


@dataclass
class SlurmCluster:
    """A running cluster: ``env`` is what subprocesses need to reach it."""

    dir: Path
    env: dict[str, str]
    started_here: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "slurm.conf"

    def cmd(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        proc = subprocess.run(list(args), check=False, capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sacct(self, job: str, *, duplicates: bool = True, allocations: bool = True) -> list[dict[str, str]]:
        """Accounting rows of a job (an array's tasks included); with ``duplicates``, every attempt of a
        requeued job is a row of its own."""
        fields = ["JobID", "JobName", "State", "Start", "End", "ExitCode"]
        args = ["sacct", "-j", job, "-n", "-P", "-o", ",".join(fields)]
        if duplicates:
            args.append("--duplicates")
        if allocations:
            args.append("-X")
        return [dict(zip(fields, line.split("|"))) for line in self.cmd(*args).splitlines() if line.strip()]

    def squeue(self, *args: str) -> list[str]:
        return [line.strip() for line in self.cmd("squeue", "-h", *args).splitlines() if line.strip()]

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the controller has forgotten the job)."""
        out = self.cmd("scontrol", "-o", "show", "job", job, check=False)
        info: dict[str, str] = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def cancel_named(self, name: str) -> None:
        """Cancel every job with this job name (a test's own jobs, never anyone else's)."""
        self.cmd("scancel", f"--name={name}", check=False)

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.squeue(f"--name={name}"):
            time.sleep(0.5)


def _fail_or_skip(message: str) -> None:
    if required():
        pytest.fail(f"TOKENBENCH_REQUIRE_SLURM=1 but {message}", pytrace=False)
    pytest.skip(message)


def _script(name: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_DIR / name)], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _is_up(env: dict[str, str]) -> bool:
    """The cluster in this state directory answers and its node takes jobs."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True,
                              env=env, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = proc.stdout.split()
    return proc.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")
                                        for s in states)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    d = state_dir()
    env = {**os.environ, "SLURM_CONF": str(d / "etc" / "slurm.conf"), "TOKENBENCH_SLURM_DIR": str(d)}
    cluster = SlurmCluster(dir=d, env=env)
    if (d / "etc" / "slurm.conf").exists() and _is_up(env):
        yield cluster  # someone else's cluster (or a developer's): use it, leave it running
        return

    missing = missing_binaries()
    if missing and required():
        proc = _script("install.sh", env, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"slurm/install.sh failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        missing = missing_binaries()
    if missing:
        _fail_or_skip(f"SLURM/munge/MariaDB binaries missing ({', '.join(missing)}); "
                      "run: bash slurm/install.sh")
    if os.geteuid() != 0:
        _fail_or_skip("a local SLURM cluster needs root (slurmd runs jobs as their users)")

    proc = _script("start.sh", env, timeout=300)
    cluster.started_here = True
    cluster.log.append(proc.stdout + proc.stderr)
    try:
        if proc.returncode != 0:
            pytest.fail(f"slurm/start.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
                        pytrace=False)
        yield cluster
    finally:
        stop = _script("stop.sh", env, timeout=300)
        if stop.returncode != 0:  # reported, but a test result must not hinge on the teardown
            print(f"slurm/stop.sh failed ({stop.returncode}):\n{stop.stdout}\n{stop.stderr}")
