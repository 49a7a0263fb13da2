"""The ``tokenbench`` command: Hydra composes ``model × method × task``; each job plans, runs and reports."""

from __future__ import annotations

import logging
import re
import sys
from importlib.resources import files
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tokenbench import registry
from tokenbench.config import store_base_config
from tokenbench.errors import TokenbenchError

log = logging.getLogger("tokenbench")

CONF_DIR = str(files("tokenbench.conf"))
_GROUP_OVERRIDE = re.compile(r"^[+~]{0,2}(model|method|task)=(.*)$")


def check_override_names(argv: list[str]) -> None:
    """Fail on unknown model/method/task names with the registered names and the closest match.

    Hydra would also fail, but without the closest match and after printing its own noise; this check
    runs first. Sweep values (``a,b``) are checked one by one; Hydra sweep functions are left to Hydra.
    """
    for arg in argv:
        m = _GROUP_OVERRIDE.match(arg)
        if not m or "(" in m.group(2):
            continue
        kind, value = m.groups()
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in registry.REGISTRIES[kind]:
                raise TokenbenchError(registry.unknown_name_message(kind, name, registry.REGISTRIES[kind].names()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def result_table(record: dict[str, Any]) -> str:
    from tabulate import tabulate

    rows = [("run", f"{record['task']} × {record['method']} × {record['model']}"),
            ("status", record["status"] + (f" ({record['error']})" if record.get("error") else "")),
            ("samples", f"{record['n_samples']}/{record['n_samples_expected']}"),
            ("budget (nominal)", record.get("budget") or "-"),
            ("achieved keep ratio", _fmt(record.get("achieved_keep_ratio")))]
    metrics = record.get("metrics") or {}
    rows += [(k, _fmt(v)) for k, v in metrics.items() if "@" not in k]
    lat = record.get("latency") or {}
    for k in ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms"):
        if k in lat:
            rows.append((f"{k} (p50 / p90)", f"{_fmt(lat[k])} / {_fmt(lat.get(k + '_p90'))}"))
    mem = record.get("memory") or {}
    for k in ("peak_allocated", "kv_cache_bytes", "weights_bytes"):
        if mem.get(k) is not None:
            rows.append((f"{k} (MiB)", _fmt(mem[k] / 2**20)))
    rows.append(("run dir", record.get("run_dir", "")))
    return tabulate(rows, tablefmt="simple_outline")


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _fail(message: str, code: int) -> None:
    print(f"tokenbench: error: {message}", file=sys.stderr)
    if not _is_multirun():  # in a sweep, one bad job must not stop the others
        sys.exit(code)


def job(cfg: DictConfig) -> dict[str, Any] | None:
    """One Hydra job: plan (validates, loads nothing), execute, print the result table."""
    from tokenbench.run import RunFailed, execute, plan, record_invalid

    logging.getLogger("tokenbench").setLevel(logging.INFO)
    try:
        p = plan(cfg)
    except TokenbenchError as exc:
        if _is_multirun():
            record_invalid(cfg, str(exc))
        _fail(str(exc), 2)
        return None
    try:
        record = execute(p, progress=bool(cfg.get("progress", True)))
    except RunFailed as exc:
        print(result_table(exc.record.to_dict()), file=sys.stderr)
        _fail(str(exc), 1)
        return None
    except TokenbenchError as exc:  # bad input found once data or model are at hand (e.g. a tokenizer issue)
        _fail(str(exc), 2)
        return None
    rec = record.to_dict()
    print(result_table(rec))
    return rec


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> dict[str, Any] | None:
    return job(cfg)


def main() -> None:
    if sys.argv[1:2] == ["leaderboard"]:  # `tokenbench leaderboard ...` == `tokenbench-leaderboard ...`
        from tokenbench import leaderboard

        sys.exit(leaderboard.main(sys.argv[2:]))
    registry.load_all()
    store_base_config()
    # Our Hydra launchers (grouping sweep points by model); an editable install hides them from Hydra's
    # plugin scan, so they are registered explicitly.
    from hydra_plugins.tokenbench_launcher import register

    register()
    try:
        check_override_names(sys.argv[1:])
    except TokenbenchError as exc:
        print(f"tokenbench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
