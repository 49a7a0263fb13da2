"""The README cannot go stale: its "Add a method" file is executed and checked, its commands match CI."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import test_kv_methods as kv_checks
from tokenbench import registry
from tokenbench.cli import CONF_DIR
from tokenbench.config import store_base_config
from tokenbench.models.tiny import TinyLlama

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_main_job_then_tests_and_ci_runs_the_same_test_command() -> None:
    first = code_blocks("bash")[0]
    commands = [line for line in first.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("&& tokenbench")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


@pytest.fixture(scope="module")
def example():
    (source,) = [b for b in code_blocks("python") if b.startswith("# methods/")]
    name = source.splitlines()[0].removeprefix("# methods/").removesuffix(".py")
    path = ROOT / "methods" / f"{name}.py"
    assert not path.exists(), "the README's example must be a *new* file"
    # Import the block exactly as a file under methods/ would be imported, without touching the tree.
    spec = importlib.util.spec_from_loader(f"tokenbench.methods.{name}", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"methods/{name}.py", "exec"), module.__dict__)
    sys.modules[spec.name] = module
    entry = registry.METHODS.get("recent_window", "kv")
    yield entry.cls
    registry.METHODS._entries.pop("recent_window")
    sys.modules.pop(spec.name)


@pytest.fixture(scope="module")
def loaded():
    return TinyLlama(num_hidden_layers=2, attn_implementation="eager").load()


def test_example_registers_with_a_typed_config(example) -> None:
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["model=tiny-llama", "method=recent_window", "method.keep_ratio=0.25"])
    assert cfg.method.name == "recent_window" and cfg.method.keep_ratio == 0.25
    assert registry.check_compatible("recent_window", "tiny-llama", "niah") == "kv"


def test_example_passes_the_generic_kv_checks(example, loaded) -> None:
    # The same checks every registered kv method gets in test_kv_methods.py.
    for query_aware in (False, True):
        kv_checks.test_noop_at_keep_all_matches_none(loaded, example, query_aware)
        for budget in ({"keep_ratio": 0.5}, {"n_keep": 7}):
            kv_checks.test_budget_per_row_and_layer_with_padding(loaded, example, budget, query_aware)
        kv_checks.test_batch_of_four_equals_four_single_runs(loaded, example, query_aware)
    kv_checks.test_kept_entries_are_the_full_cache_entries(loaded, example)
    kv_checks.test_cache_bytes_drop_in_proportion(loaded, example)
    for phase in ("decode", "both"):
        kv_checks.test_decode_phase_holds_cache_at_capacity(loaded, example, phase)


def test_example_keeps_exactly_the_most_recent_tokens(example, loaded) -> None:
    p = kv_checks.prompt(seed=3)
    cache = kv_checks.prefill(loaded, example(n_keep=10), p)
    n = p.prefix_ids.shape[1]
    for layer in cache.layers:
        assert kv_checks.live_positions(layer) == [[list(range(n - 10, n))] * layer.keys.shape[1]]


def test_example_runs_end_to_end(example, tmp_path) -> None:
    from tokenbench.run import execute, plan

    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny-llama", "method=recent_window", "method.keep_ratio=0.25", f"output_dir={tmp_path}",
            "task.context_lengths=[128]", "task.depths=[0.0,1.0]", "task.max_new_tokens=4",
            "measure.fixed_output_tokens=4", "wandb.mode=disabled"])
    record = execute(plan(cfg), progress=False)
    assert record.status == "ok" and record.n_samples == 2
    assert record.method == "recent_window"
    assert 0.2 <= record.achieved_keep_ratio <= 0.25
