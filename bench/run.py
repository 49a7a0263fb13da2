"""One run: resolve → run key → skip/resume → load → apply method → samples → record → W&B.

``plan`` does everything that can fail on bad input (names, families, parameter validation) without
loading a model or writing a file; ``execute`` does the work.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenbench import registry
from tokenbench.errors import TokenbenchError
from tokenbench.measure import quantile
from tokenbench.results import ResultRecord, SampleLog, read_result, run_key, write_json_atomic

log = logging.getLogger(__name__)

# Which runner drives a model for each method family (module:attribute, imported lazily).
RUNNERS = {"kv": "tokenbench.lm:LMRunner", "vit": "tokenbench.vision:VisionRunner",
           "prompt": "tokenbench.prompt_runner:PromptRunner",
           "vlm": "tokenbench.vlm:VLMRunner"}


class RunFailed(Exception):
    """The run ended with status failed/oom; its record was written."""

    def __init__(self, record: ResultRecord):
        super().__init__(f"run {record.run_key} {record.status}: {record.error}")
        self.record = record


@dataclass
class RunPlan:
    cfg: DictConfig
    family: str
    model_spec: Any
    method: Any
    task: Any
    model_cfg: dict
    method_cfg: dict
    task_cfg: dict
    key: str
    run_dir: Path

    @property
    def names(self) -> tuple[str, str, str]:
        return self.model_cfg["name"], self.method_cfg["name"], self.task_cfg["name"]


def plan(cfg: DictConfig) -> RunPlan:
    """Resolve and validate a config; nothing is loaded or written."""
    registry.load_all()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    family = registry.check_compatible(method_cfg["name"], model_cfg["name"], task_cfg["name"])
    model_spec = registry.build("model", model_cfg)
    method = registry.build("method", method_cfg, family)
    task = registry.build("task", task_cfg)
    key = run_key(registry.key_fields("model", model_cfg), registry.key_fields("method", method_cfg, family),
                  registry.key_fields("task", task_cfg), _batch_size(cfg, task))
    return RunPlan(cfg, family, model_spec, method, task, model_cfg, method_cfg, task_cfg, key,
                   Path(cfg.output_dir) / key)


def _batch_size(cfg: DictConfig, task: Any = None) -> int:
    """Samples run together: the task's own ``batch_size`` (images) or ``measure.batch_size``."""
    own = getattr(task, "batch_size", None) if task is not None else None
    return 1 if own is not None else int(cfg.get("measure", {}).get("batch_size", 1) or 1)


def record_invalid(cfg: DictConfig, error: str) -> Path | None:
    """In a sweep, a point whose config is invalid (an impossible budget, say) is recorded as failed with
    its error, so the sweep's leaderboard shows it; a single run writes nothing on bad input."""
    from tokenbench.env import environment

    try:
        model_cfg, method_cfg, task_cfg = (OmegaConf.to_container(cfg[k], resolve=True)
                                           for k in ("model", "method", "task"))
    except Exception:  # not even resolvable: nothing meaningful to record
        return None
    run_dir = Path(cfg.output_dir) / run_key(model_cfg, method_cfg, task_cfg)
    now = _now()
    record = ResultRecord(
        run_key=run_dir.name, sweep=str(cfg.get("sweep_name", "default")), status="failed", error=error,
        model=model_cfg["name"], model_params=_params(model_cfg), method=method_cfg["name"], family="",
        method_params=_params(method_cfg), task=task_cfg["name"], task_params=_params(task_cfg), budget={},
        achieved_keep_ratio=None, metrics={}, latency={}, memory={}, flops=None, n_samples=0,
        n_samples_expected=0, env=environment("cpu"), started_at=now, finished_at=now, run_dir=str(run_dir),
        extra={"invalid_config": True},
    )
    write_json_atomic(run_dir / "result.json", record.to_dict())
    return run_dir


# One loaded model per process: sweep points that share a model (same model config) run in the same process
# under the local launcher, or in one job under a grouping launcher, and load it once. Methods attach to
# the model only for the duration of a run (hooks are removed afterwards), so reuse is safe.
_MODEL_CACHE: dict[str, Any] = {}


def model_key(model_cfg: dict[str, Any]) -> str:
    """The process-wide model cache's key for a model config: its key fields."""
    import json

    return json.dumps(registry.key_fields("model", model_cfg), sort_keys=True, default=str)


def cached_model(model_cfg: dict[str, Any]) -> Any:
    """The model this process already loaded for ``model_cfg``, or None."""
    return _MODEL_CACHE.get(model_key(model_cfg))


def load_model(p: RunPlan) -> tuple[Any, float, bool]:
    """The plan's model, loaded or reused; returns (loaded, seconds spent loading, reused?)."""
    import gc
    import time

    key = model_key(p.model_cfg)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key], 0.0, True
    if _MODEL_CACHE:  # free the previous model before loading the next one
        _MODEL_CACHE.clear()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    start = time.perf_counter()
    loaded = p.model_spec.load()
    _MODEL_CACHE[key] = loaded
    return loaded, time.perf_counter() - start, False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _import(path: str) -> Any:
    import importlib

    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def make_runner(family: str, loaded: Any, method: Any, measure: Any) -> Any:
    if family not in RUNNERS:
        raise TokenbenchError(f"no runner for method family '{family}' yet (have: {', '.join(RUNNERS)})")
    return _import(RUNNERS[family])(loaded, method, measure)


def summarize_latency(rows: list[dict]) -> dict[str, float]:
    """Median (the headline value), p50, p90 and mean of every per-sample latency key."""
    keys = sorted({k for r in rows for k, v in (r.get("latency") or {}).items() if isinstance(v, (int, float))})
    out: dict[str, float] = {}
    for k in keys:
        vals = [r["latency"][k] for r in rows if isinstance((r.get("latency") or {}).get(k), (int, float))]
        if not vals or k.endswith("_spread"):
            continue
        out[k] = out[f"{k}_p50"] = quantile(vals, 0.5)  # the median is the headline value
        out[f"{k}_p90"] = quantile(vals, 0.9)
        out[f"{k}_mean"] = statistics.fmean(vals)
    return out


def summarize_memory(rows: list[dict], weights_bytes: int | None) -> dict[str, Any]:
    """Peaks are maxima over samples; cache bytes are the median and the maximum."""
    out: dict[str, Any] = {"weights_bytes": weights_bytes}
    keys = sorted({k for r in rows for k, v in (r.get("memory") or {}).items() if isinstance(v, (int, float))})
    for k in keys:
        vals = [r["memory"][k] for r in rows if isinstance((r.get("memory") or {}).get(k), (int, float))]
        if k.startswith("peak"):
            out[k] = max(vals)
        else:
            out[k] = statistics.median(vals)
            out[f"{k}_max"] = max(vals)
    return out


def achieved_keep_ratio(rows: list[dict]) -> float | None:
    vals = [r["compression"]["achieved_keep_ratio"] for r in rows
            if isinstance((r.get("compression") or {}).get("achieved_keep_ratio"), (int, float))]
    return statistics.fmean(vals) if vals else None


def _unique_rows(rows: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r.get("sample_id") in seen:
            continue
        seen.add(r.get("sample_id"))
        out.append(r)
    return out


def _params(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "name"}


def execute(p: RunPlan, *, progress: bool = True) -> ResultRecord:
    """Run (or resume, or skip) the planned run and return its record."""
    from tqdm.auto import tqdm

    from tokenbench.env import environment

    model_name, method_name, task_name = p.names
    previous = read_result(p.run_dir)
    if previous and previous.get("status") == "ok":
        log.info("run %s is complete (%s); skipping", p.key, p.run_dir)
        return ResultRecord(**{k: v for k, v in previous.items() if k in ResultRecord.__dataclass_fields__})

    p.run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = p.run_dir / "config.yaml"
    if not cfg_path.exists():
        OmegaConf.save(OmegaConf.create({"model": p.model_cfg, "method": p.method_cfg, "task": p.task_cfg}),
                       cfg_path)
    sample_log = SampleLog(p.run_dir / "samples.jsonl")
    done = {r.get("sample_id") for r in sample_log.read()}
    started = _now()
    status, error, weights_bytes, device, n_expected = "ok", None, None, "cpu", 0
    loaded, load_s, reused, runner = None, None, False, None
    try:
        loaded, load_s, reused = load_model(p)
        weights_bytes, device = loaded.weights_bytes, loaded.device
        samples = p.task.samples(loaded)
        n_expected = len(samples)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise TokenbenchError(f"task '{task_name}' produced duplicate sample ids")
        todo = [(i, s) for i, s in enumerate(samples) if s.id not in done]
        if done and todo:
            log.info("resuming run %s after %d recorded samples", p.key, len(samples) - len(todo))
        runner = make_runner(p.family, loaded, p.method, p.cfg.measure)
        use_template = getattr(p.task, "chat_template", True)

        def row(idx: int, sample: Any, out: Any) -> dict[str, Any]:
            return {
                "sample_id": sample.id,
                "idx": idx,
                "prediction": out.text,
                "answer": sample.answer,
                "metrics": p.task.score(sample, out.text),
                "latency": out.latency,
                "memory": out.memory,
                "compression": out.compression,
                "n_prompt_tokens": out.n_prompt_tokens,
                "n_context_tokens": out.n_context_tokens,
                "n_generated": out.n_generated,
                "meta": {**sample.meta, "model": model_name, "method": method_name},
            }

        bar = tqdm(todo, desc=f"{task_name} × {method_name} × {model_name}", unit="sample",
                   disable=not progress, dynamic_ncols=True)
        run_one = getattr(p.task, "run_sample", None)  # a task that drives the runner itself (lm_eval)
        if hasattr(runner, "run_batches") and run_one is None:
            # Batched runners take the samples in chunks of the task's batch size and yield one chunk's
            # outputs at a time (they may run the next chunk while this loop records the previous one).
            size = max(1, int(getattr(p.task, "batch_size", 0) or _batch_size(p.cfg)))
            chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
            batches = [[s for _, s in c] for c in chunks]
            with contextlib.closing(runner.run_batches(p.task, batches)) as stream:
                for i, outs in enumerate(stream):  # the stream ends itself (its closing work runs)
                    sample_log.extend([row(idx, sample, out) for (idx, sample), out in zip(chunks[i], outs)])
                    bar.update(len(chunks[i]))
            bar.close()
        else:
            for idx, sample in bar:
                # a sample may say whether it takes the chat template (LongBench's per-task rule)
                template = sample.meta.get("chat_template")
                chat = use_template if template is None else bool(template)
                out = run_one(runner, sample, chat) if run_one else runner.run(sample, use_chat_template=chat)
                sample_log.append(row(idx, sample, out))
    except Exception as exc:  # the record must say what happened; KeyboardInterrupt/kill leave a resumable run
        import torch

        status = "oom" if isinstance(exc, torch.OutOfMemoryError) else "failed"
        error = f"{type(exc).__name__}: {exc}"
        log.exception("run %s failed", p.key)

    rows = _unique_rows(sample_log.read())
    metrics = p.task.aggregate(rows) if rows else {}
    artifacts: list[Path] = []
    if rows and status == "ok":
        try:
            artifacts = p.task.artifacts(rows, p.run_dir)
        except Exception as exc:  # a plot must not cost the result
            log.warning("artifacts for %s failed: %s", p.key, exc)
    record = ResultRecord(
        run_key=p.key,
        sweep=str(p.cfg.get("sweep_name", "default")),
        status=status,
        error=error,
        model=model_name,
        model_params=_params(p.model_cfg),
        method=method_name,
        family=p.family,
        method_params=_params(p.method_cfg),
        task=task_name,
        task_params=_params(p.task_cfg),
        budget=p.method.nominal_budget(),
        achieved_keep_ratio=achieved_keep_ratio(rows),
        metrics=metrics,
        latency=summarize_latency(rows),
        memory=summarize_memory(rows, weights_bytes),
        flops=getattr(runner, "flops", None),  # a runner that counts them: forward FLOPs per sample
        n_samples=len(rows),
        n_samples_expected=n_expected,
        env=environment(device),
        started_at=started,
        finished_at=_now(),
        run_dir=str(p.run_dir),
        extra={"artifacts": [str(a) for a in artifacts], "resumed_with": len(done),
               "model_load_s": load_s, "model_reused": reused,
               "model_source": getattr(loaded, "source", None),
               "query_aware": getattr(p.method, "query_aware", None),
               "batch_size": int(getattr(p.task, "batch_size", 0) or _batch_size(p.cfg)),
               **(runner.summary() if hasattr(runner, "summary") else {})},
    )
    write_json_atomic(p.run_dir / "result.json", record.to_dict())

    from tokenbench.wandb_log import log_run

    log_run(p.cfg, record, rows, artifacts, p.run_dir)
    if status != "ok":
        raise RunFailed(record)
    return record
