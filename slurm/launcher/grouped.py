"""A submitit launcher that runs the sweep points sharing a model inside one job.

hydra-submitit-launcher submits one job (array task) per sweep point, so a sweep of N methods/budgets over
one model loads that model N times, each time in a fresh process on a freshly allocated GPU. tokenbench keeps
one loaded model per process (``tokenbench.run.load_model``) and reuses it for consecutive runs with the same
model config, so points that share a model can share a job:

- ``launch`` partitions the points by their model overrides (``model=…`` and every ``model.…`` override;
  points whose model overrides are identical go together; order-independent), optionally splits a group
  into chunks of at most ``max_points_per_job`` points, and submits one array task per group;
- the task runs its points one after another in one process through the same per-point code the stock
  launcher uses (Hydra's sweep config, job number, output dir, ``run_job`` with its callbacks), so each point
  is exactly what it would be under ``submitit_slurm``, and the model is loaded by the first point only;
- ``launch`` returns one ``JobReturn`` per point, in the original order. A point that raises is a failed
  ``JobReturn`` and the group goes on; a task that dies (killed, out of memory) fails the points of its
  group only, after every other task has finished.

Grouping only changes where points run. A point whose model config ends up different from its group's (a
swept preset that sets the model, say) still runs correctly: it loads its own model.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

MODEL_GROUP = "model"  # the config group (and key prefix) whose overrides decide which points share a job


# ---------------------------------------------------------------------------------------------------------
# grouping (pure functions, no Hydra state)


def _parse_key(override: str) -> tuple[str, str]:
    """(key, value) of one command-line override; ``+``/``++``/``~`` prefixes and ``@package`` kept in key."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        (o,) = OverridesParser.create().parse_overrides([override])
        prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
        key = prefix + o.key_or_group + (f"@{o.package}" if o.package is not None else "")
        value = o.get_value_element_as_str() if o.value() is not None else ""
        return key, value
    except Exception:  # anything Hydra itself would reject later; fall back to the text
        key, _, value = override.partition("=")
        return key.strip(), value.strip()


def model_overrides(overrides: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The overrides of one point that decide its model: ``model=…``, ``model.x=…`` (with any ``+``/``++``/``~``
    prefix or ``@package``), as a sorted tuple of (key, value) — points with equal tuples share a model."""
    out = []
    for ov in overrides:
        key, value = _parse_key(ov)
        bare = key.lstrip("+~").split("@", 1)[0]
        if bare == MODEL_GROUP or bare.startswith(MODEL_GROUP + "."):
            out.append((key, value))
    return tuple(sorted(out))


def group_points(job_overrides: Sequence[Sequence[str]], *, group_by_model: bool = True,
                 max_points_per_job: int | None = None) -> list[list[int]]:
    """Partition point indices (0-based, into ``job_overrides``) into jobs.

    Groups are ordered by their first point and points keep their sweep order inside a group. A group larger
    than ``max_points_per_job`` is split into the fewest consecutive chunks under the cap, balanced (sizes
    differ by at most one: 5 points at most 3 per job -> 3 + 2). ``group_by_model=False``: one point per job.
    """
    if max_points_per_job is not None and max_points_per_job < 1:
        raise ValueError(f"max_points_per_job must be a positive integer or null, got {max_points_per_job}")
    if not group_by_model:
        return [[i] for i in range(len(job_overrides))]
    groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, ov in enumerate(job_overrides):
        groups.setdefault(model_overrides(ov), []).append(i)
    out: list[list[int]] = []
    for idxs in groups.values():
        if max_points_per_job is None or len(idxs) <= max_points_per_job:
            out.append(idxs)
            continue
        n_chunks = -(-len(idxs) // max_points_per_job)
        base, extra = divmod(len(idxs), n_chunks)  # balanced: sizes differ by at most one, none above the cap
        start = 0
        for c in range(n_chunks):
            size = base + (1 if c < extra else 0)
            out.append(idxs[start:start + size])
            start += size
    return out


# ---------------------------------------------------------------------------------------------------------
# the job function


class GroupJob:
    """What one submitit task runs: the group's points, one after another, in this process.

    Each point goes through ``BaseSubmititLauncher.__call__`` — Hydra's singleton state restored (a fresh
    copy per point, as a job of its own would see it), the point's sweep config loaded, ``hydra.job.num`` and
    ``hydra.job.id`` set, ``run_job`` — so output dirs, callbacks and return values are those of the stock
    launcher. Module state survives between points, which is the point: tokenbench's loaded model.
    """

    def __init__(self, launcher: BaseSubmititLauncher) -> None:
        self.launcher = launcher

    def __call__(self, points: list[tuple[list[str], int]], singleton_state: dict[Any, Any]) -> list[JobReturn]:
        results = []
        for n, (overrides, idx) in enumerate(points):
            # print, not log: Hydra configures logging only inside the first point's run_job
            print(f"[tokenbench_launcher] point {n + 1}/{len(points)} of this job: #{idx} "
                  f"{' '.join(filter_overrides(overrides))}", flush=True)
            results.append(self.launcher(list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                         copy.deepcopy(singleton_state)))
        return results

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """On preemption or time limit: requeue the whole group. Finished points are skipped on the rerun and
        a partial one resumes from its ``samples.jsonl`` (tokenbench's run pipeline)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# the launcher


class _GroupingMixin:
    """Adds ``group_by_model`` / ``max_points_per_job`` to a hydra-submitit launcher."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any

    def __init__(self, group_by_model: bool = True, max_points_per_job: int | None = None,
                 **params: Any) -> None:
        super().__init__(**params)  # type: ignore[call-arg]
        if max_points_per_job is not None and int(max_points_per_job) < 1:
            raise ValueError(f"hydra.launcher.max_points_per_job must be a positive integer or null, "
                             f"got {max_points_per_job}")
        self.group_by_model = bool(group_by_model)
        self.max_points_per_job = None if max_points_per_job is None else int(max_points_per_job)

    def _executor(self) -> Any:
        """The submitit executor, configured exactly as ``BaseSubmititLauncher.launch`` configures it."""
        import submitit

        params = self.params
        init_keys = {"max_num_timeout", "submitit_folder"}
        init_params: dict[str, Any] = {"folder": params["submitit_folder"]}
        if "max_num_timeout" in params:
            init_params[f"{self._EXECUTOR}_max_num_timeout"] = params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                                      for x, y in params.items() if x not in init_keys})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not self.group_by_model:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        assert self.config is not None
        assert len(job_overrides) > 0
        groups = group_points(job_overrides, max_points_per_job=self.max_points_per_job)
        executor = self._executor()

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        log.info(f"{len(job_overrides)} points in {len(groups)} jobs (grouped by model"
                 + (f", at most {self.max_points_per_job} per job)" if self.max_points_per_job else ")"))
        for j, idxs in enumerate(groups):
            shared = " ".join(f"{k}={v}" for k, v in model_overrides(job_overrides[idxs[0]])) or "(default model)"
            log.info(f"\tjob {j}: {shared}")
            for i in idxs:
                log.info(f"\t\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")

        state = Singleton.get_state()
        points = [[(list(job_overrides[i]), initial_job_idx + i) for i in idxs] for idxs in groups]
        jobs = executor.map_array(GroupJob(self), points, [state] * len(points))  # type: ignore[arg-type]

        results: list[JobReturn | None] = [None] * len(job_overrides)
        for job, idxs in zip(jobs, groups):
            try:
                returns = job.results()[0]
            except Exception as exc:  # the task died: its points failed, the other tasks' points stand
                log.error(f"job {job.job_id} (points {[initial_job_idx + i for i in idxs]}) failed: {exc}")
                returns = [_failed(job_overrides[i], exc) for i in idxs]
            for i, ret in zip(idxs, returns):
                results[i] = ret
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def _failed(overrides: Sequence[str], exc: BaseException) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = exc
    return ret


class GroupedSlurmLauncher(_GroupingMixin, BaseSubmititLauncher):
    """hydra-submitit-launcher's SLURM launcher with points grouped by model (``hydra/launcher=tokenbench_slurm``)."""

    _EXECUTOR = "slurm"


class GroupedLocalLauncher(_GroupingMixin, BaseSubmititLauncher):
    """The same on submitit's local executor (subprocesses on this machine; ``hydra/launcher=tokenbench_local``)."""

    _EXECUTOR = "local"


# ---------------------------------------------------------------------------------------------------------
# configs


@dataclass
class TokenbenchSlurmConf(SlurmQueueConf):
    """``submitit_slurm``'s fields plus grouping. ``timeout_min`` is per job, that is per group of points."""

    _target_: str = "hydra_plugins.tokenbench_launcher.grouped.GroupedSlurmLauncher"
    # run the points that share a model overrides (model=…, model.…=…) in one job, loading the model once
    group_by_model: bool = True
    # split larger groups into jobs of at most this many points (more parallelism, shorter jobs); null: no cap
    max_points_per_job: int | None = None


@dataclass
class TokenbenchLocalConf(LocalQueueConf):
    """``submitit_local``'s fields plus grouping."""

    _target_: str = "hydra_plugins.tokenbench_launcher.grouped.GroupedLocalLauncher"
    group_by_model: bool = True
    max_points_per_job: int | None = None


def store_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="tokenbench_slurm", node=TokenbenchSlurmConf(), provider="tokenbench")
    cs.store(group="hydra/launcher", name="tokenbench_local", node=TokenbenchLocalConf(), provider="tokenbench")


store_configs()  # at import, as Hydra's plugin scan expects of a plugin module
