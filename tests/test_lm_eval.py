"""lm_eval: tokenbench's model+method as an lm-eval model (checked against lm-eval's own HF backend), one
sample per document, hand-checked per-document scores with filters, lm-eval's aggregation (perplexity from the
recorded predictions), the run pipeline end to end with resume, under a KV method. Offline: the tasks are the
local YAML tasks in tests/data/lm_eval_tasks (multiple choice with few-shot, generation with two filters,
rolling perplexity) and the built-in demo task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from hydra import compose, initialize_config_dir  # noqa: E402

from tokenbench import registry  # noqa: E402
from tokenbench.cli import CONF_DIR  # noqa: E402
from tokenbench.config import store_base_config  # noqa: E402
from tokenbench.errors import TokenbenchError  # noqa: E402
from tokenbench.models.base import LoadedModel  # noqa: E402
from tokenbench.models.tiny import tiny_tokenizer  # noqa: E402
from tokenbench.tasks.lm_eval_task import LMEval, tokenbench_lm_class  # noqa: E402

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
LOCAL = ["tb_test_mc", "tb_test_gen", "tb_test_ppl"]
PPL_TEXTS = ["The grass is green. The sky is blue. The sun is yellow.",
             "Here we go. There and back again, and again, and again."]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    from tokenbench.models.tiny import TinyLlama

    return TinyLlama().load()


def local(**kwargs) -> LMEval:
    return LMEval(tasks=LOCAL, include_path=str(TASKS_DIR), **kwargs)


def test_registered_for_the_kv_family() -> None:
    entry = registry.TASKS.get("lm_eval")
    assert entry.cls is LMEval and entry.families == ("kv",)


def test_default_is_the_offline_demo_task() -> None:
    task = LMEval()
    samples = task.samples(LoadedModel(model=None, tokenizer=tiny_tokenizer()))
    assert [s.id for s in samples] == [f"tokenbench_capitals/{i}" for i in range(10)]
    assert samples[0].context == "The capital of France is" and samples[0].answer == "Paris"
    assert samples[0].max_new_tokens == 5 and samples[0].meta["request_type"] == "generate_until"
    assert task.score(samples[0], " paris.") == {"tokenbench_capitals/exact_match": 1.0}
    assert task.score(samples[0], "Lyon") == {"tokenbench_capitals/exact_match": 0.0}


def test_one_sample_per_document() -> None:
    task = local()
    samples = task.samples(LoadedModel(model=None, tokenizer=tiny_tokenizer()))
    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.meta["lm_eval_task"], []).append(s)
    assert sorted(by_task) == sorted(LOCAL)
    assert [s.id for s in by_task["tb_test_mc"]] == [f"tb_test_mc/{i}" for i in range(4)]
    assert [s.meta["n_requests"] for s in by_task["tb_test_mc"]] == [3, 4, 3, 2]  # one request per choice
    assert [s.answer for s in by_task["tb_test_mc"]] == [0, 1, 2, 0]
    assert by_task["tb_test_mc"][0].context == "Question: What colour is the sky on a clear day?\nAnswer:"
    assert [s.meta["request_type"] for s in samples] == [
        {"tb_test_mc": "loglikelihood", "tb_test_gen": "generate_until",
         "tb_test_ppl": "loglikelihood_rolling"}[s.meta["lm_eval_task"]] for s in samples]
    assert [s.answer for s in by_task["tb_test_gen"]] == ["Paris", "four", "red"]
    assert all(s.meta["chat_template"] is False for s in samples)  # lm-eval formats the prompts itself
    shot = local(num_fewshot=1, limit=2).samples(LoadedModel(model=None, tokenizer=tiny_tokenizer()))
    mc = [s for s in shot if s.meta["lm_eval_task"] == "tb_test_mc"]
    assert len(mc) == 2
    # one example from the train split, then the question
    assert mc[0].context.endswith("\n\nQuestion: What colour is the sky on a clear day?\nAnswer:")
    assert mc[0].context.startswith(("Question: What is frozen water called?\nAnswer: ice\n\n",
                                     "Question: What colour is grass?\nAnswer: green\n\n"))


# --- the lm-eval model ------------------------------------------------------------------------------


def test_same_results_as_lm_evals_own_hf_backend(tiny: LoadedModel) -> None:
    """lm-eval's HFLM on the same weights is the reference: log-likelihoods, greedy flags, rolling windows
    (max_length 16 forces several windows and left truncation), generations with stop strings."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tokenbench.lm import LMRunner

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    ours = tokenbench_lm_class()(LMRunner(tiny), max_length=16)
    reference = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=1, max_length=16, device="cpu")
    got = lm_eval.simple_evaluate(model=ours, tasks=LOCAL, task_manager=manager, bootstrap_iters=0, num_fewshot=1)
    want = lm_eval.simple_evaluate(model=reference, tasks=LOCAL, task_manager=manager, bootstrap_iters=0,
                                   num_fewshot=1)
    for name in LOCAL:
        for a, b in zip(got["samples"][name], want["samples"][name], strict=True):
            assert a["arguments"] == b["arguments"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if name == "tb_test_gen":
                    assert ra == rb
                elif name == "tb_test_mc":
                    assert ra[0][1] == rb[0][1] and ra[0][0] == pytest.approx(rb[0][0], abs=1e-4)
                else:
                    assert ra[0] == pytest.approx(rb[0], rel=1e-5)
        metrics = {k: v for k, v in want["results"][name].items() if "," in k and "stderr" not in k}
        assert metrics
        for k, v in metrics.items():
            assert got["results"][name][k] == pytest.approx(v, rel=1e-5), (name, k)


def test_registered_in_lm_eval() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("tokenbench") is tokenbench_lm_class()


def test_encode_pair_and_empty_context() -> None:
    lm = tokenbench_lm_class()(runner=None, tokenizer=tiny_tokenizer(), max_length=64)
    ctx, cont = lm.encode_pair("The sky is ", "blue")
    assert ctx == lm.tok_encode("The sky is") and ctx + cont == lm.tok_encode("The sky is blue")
    ctx, cont = lm.encode_pair("", "blue")
    assert ctx == [tiny_tokenizer().bos_token_id] and cont == lm.tok_encode("blue")


# --- scoring and aggregation (hand-checked) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def built() -> tuple[LMEval, dict]:
    task = local()
    samples = {s.id: s for s in task.samples(LoadedModel(model=None, tokenizer=tiny_tokenizer()))}
    return task, samples


def test_score_multiple_choice(built) -> None:
    task, samples = built
    spider = samples["tb_test_mc/1"]  # choices six, eight, ten, four; label 1 (eight)
    # raw: six (-1.2) wins -> acc 0; per character: -0.4, -0.3, -0.467, -0.5 -> eight wins -> acc_norm 1
    pred = json.dumps([[[-1.2, False]], [[-1.5, False]], [[-1.4, False]], [[-2.0, False]]])
    assert task.score(spider, pred) == {"tb_test_mc/acc": 0.0, "tb_test_mc/acc_norm": 1.0}
    pred = json.dumps([[[-3.0, False]], [[-1.0, True]], [[-2.0, False]], [[-4.0, False]]])
    assert task.score(spider, pred) == {"tb_test_mc/acc": 1.0, "tb_test_mc/acc_norm": 1.0}
    assert task.score(spider, "") == {"tb_test_mc/acc": 0.0, "tb_test_mc/acc_norm": 0.0}
    assert task.score(spider, "[1, 2]") == {"tb_test_mc/acc": 0.0, "tb_test_mc/acc_norm": 0.0}


def test_score_generation_under_each_filter(built) -> None:
    task, samples = built
    paris = samples["tb_test_gen/0"]
    assert task.score(paris, "Paris is nice") == {"tb_test_gen/exact_match": 0.0,
                                                  "tb_test_gen/exact_match,first-word": 1.0}
    assert task.score(paris, "paris!") == {"tb_test_gen/exact_match": 1.0,
                                           "tb_test_gen/exact_match,first-word": 1.0}


def test_aggregate_uses_lm_evals_aggregation(built) -> None:
    task, samples = built
    rows = [
        {"sample_id": "tb_test_ppl/0", "prediction": "[[-90.0]]", "metrics": {}},
        {"sample_id": "tb_test_ppl/1", "prediction": "[[-100.0]]", "metrics": {}},
        {"sample_id": "tb_test_mc/0", "prediction": json.dumps([[[-1.0, True]], [[-2.0, False]], [[-3.0, False]]]),
         "metrics": {}},
        {"sample_id": "tb_test_mc/2", "prediction": json.dumps([[[-1.0, True]], [[-2.0, False]], [[-3.0, False]]]),
         "metrics": {}},
    ]
    out = task.aggregate(rows)
    words = 12 + 11  # lm-eval counts words by splitting on white space ("green." is a word)
    n_bytes = sum(len(t.encode("utf-8")) for t in PPL_TEXTS)
    assert n_bytes == 55 + 55
    assert out["tb_test_ppl/word_perplexity"] == pytest.approx(math.exp(190.0 / words), rel=1e-12)
    assert out["tb_test_ppl/byte_perplexity"] == pytest.approx(math.exp(190.0 / n_bytes), rel=1e-12)
    assert out["tb_test_ppl/bits_per_byte"] == pytest.approx(190.0 / n_bytes / math.log(2), rel=1e-12)
    assert out["tb_test_mc/acc"] == 0.5  # doc 0 (label 0) right, doc 2 (label 2) wrong
    assert task.score(samples["tb_test_ppl/0"], "[[-90.0]]") == {}  # (loglikelihood, words): aggregate only


def test_bad_parameters_and_unknown_task(tmp_path: Path, monkeypatch) -> None:
    import lm_eval.tasks

    class LocalOnly(lm_eval.tasks.TaskManager):  # lm-eval's own index takes seconds to minutes to build
        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            super().__init__(include_path=include_path, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    with pytest.raises(TokenbenchError, match="include_path not found"):
        LMEval(include_path=str(tmp_path / "nope"))
    with pytest.raises(TokenbenchError, match="tasks must be a non-empty list"):
        LMEval(tasks=[])
    with pytest.raises(TokenbenchError, match="limit must be"):
        LMEval(limit=0)
    with pytest.raises(TokenbenchError, match=r"unknown lm-eval task\(s\) \['tb_test_mcq'\]. Did you mean tb_test_mc"):
        LMEval(tasks=["tb_test_mcq"], include_path=str(TASKS_DIR)).load_tasks()


# --- the run pipeline ---------------------------------------------------------------------------------


def execute(out: Path, *overrides: str):
    from tokenbench.run import execute as run_execute
    from tokenbench.run import plan

    registry.load_all()
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny-llama", "task=lm_eval", f"task.include_path={TASKS_DIR}", f"task.tasks={LOCAL}",
            "task.max_length=16", "task.num_fewshot=1", f"output_dir={out}", "wandb.mode=disabled",
            "measure.warmup=0", "measure.fixed_output_tokens=2", *overrides])
    return run_execute(plan(cfg), progress=False)


def test_pipeline_records_lm_eval_metrics_and_resumes(tiny: LoadedModel, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tokenbench.lm import LMRunner

    rec = execute(tmp_path, "method=none")
    assert rec.status == "ok" and rec.n_samples == rec.n_samples_expected == 9
    reference = lm_eval.simple_evaluate(
        model=tokenbench_lm_class()(LMRunner(tiny), max_length=16), tasks=LOCAL, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), num_fewshot=1)
    expected = {f"{t}/{k.replace(',none', '')}": v for t in LOCAL for k, v in reference["results"][t].items()
                if "," in k and "stderr" not in k}
    assert set(rec.metrics) == set(expected)
    for k, v in expected.items():
        assert rec.metrics[k] == pytest.approx(v, rel=1e-5), k
    run_dir = Path(rec.run_dir)
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["sample_id"] for r in rows) == sorted(
        [f"tb_test_mc/{i}" for i in range(4)] + [f"tb_test_gen/{i}" for i in range(3)] + ["tb_test_ppl/0", "tb_test_ppl/1"])
    mc = next(r for r in rows if r["sample_id"] == "tb_test_mc/1")
    assert len(json.loads(mc["prediction"])) == 4 and mc["latency"]["e2e_ms"] > 0 and mc["n_prompt_tokens"] > 0
    gen = next(r for r in rows if r["sample_id"] == "tb_test_gen/0")
    assert gen["latency"]["prefill_ms"] > 0 and gen["n_generated"] >= 1  # the runner's own measurements

    # cut short: the last three documents and the record are lost; the rerun answers only those
    (run_dir / "samples.jsonl").write_text("".join(line + "\n" for line in
                                                   (run_dir / "samples.jsonl").read_text().splitlines()[:-3]))
    (run_dir / "result.json").unlink()
    again = execute(tmp_path, "method=none")
    assert again.status == "ok" and again.extra["resumed_with"] == 6 and again.n_samples == 9
    assert again.metrics == pytest.approx(rec.metrics, rel=1e-6)


def test_a_kv_method_changes_the_log_likelihoods(tmp_path: Path) -> None:
    full = execute(tmp_path / "full", "method=none", "task.tasks=[tb_test_mc]", "task.max_length=4096")
    evicted = execute(tmp_path / "random", "method=random", "method.keep_ratio=0.3", "task.tasks=[tb_test_mc]",
                      "task.max_length=4096")
    assert full.status == evicted.status == "ok"

    def preds(rec) -> list:
        return [json.loads(json.loads(line)["prediction"]) for line in
                (Path(rec.run_dir) / "samples.jsonl").read_text().splitlines()]

    assert preds(full) != preds(evicted)  # the few-shot context was compressed before scoring


@pytest.mark.real_model
def test_smollm2_end_to_end_on_the_demo_and_a_multiple_choice_task(tmp_path: Path) -> None:
    from tokenbench.run import execute as run_execute
    from tokenbench.run import plan

    registry.load_all()
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=smollm2-135m", "method=none", "task=lm_eval", f"task.include_path={TASKS_DIR}",
            "task.tasks=[tokenbench_capitals,tb_test_mc]", "task.limit=4", f"output_dir={tmp_path}",
            "wandb.mode=disabled", "measure.warmup=0", "measure.fixed_output_tokens=2"])
    rec = run_execute(plan(cfg), progress=False)
    assert rec.status == "ok" and rec.n_samples == 8
    assert set(rec.metrics) == {"tokenbench_capitals/exact_match", "tb_test_mc/acc", "tb_test_mc/acc_norm"}
    # Measured on the 2-core CPU: capitals 4/4 (Paris, Berlin, Rome, Madrid); the floor allows one miss.
    assert rec.metrics["tokenbench_capitals/exact_match"] >= 0.75
