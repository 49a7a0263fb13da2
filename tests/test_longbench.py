"""LongBench: loading the three real task files, the official prompts and truncation, the chat-template rule,
every official metric on hand-checked pairs, aggregation (tasks, categories, LongBench-E intervals), the hub
path and its offline fallback."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel
from tokenbench.models.tiny import tiny_tokenizer
from tokenbench.registry import TASKS
from tokenbench.task import Sample
from tokenbench.tasks import longbench as lb
from tokenbench.tasks.longbench import PROMPTS, LongBench
from tokenbench.tasks.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_sample,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"
SHARED = ["multifieldqa_zh", "multi_news", "passage_retrieval_zh"]  # the official order
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(model=None, tokenizer=tiny_tokenizer())


def rows(task: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_registered() -> None:
    entry = TASKS.get("longbench")
    assert entry.cls is LongBench and entry.families == ("kv", "prompt")
    assert LongBench.primary_metric == "avg"
    assert len(lb.DATASETS) == 21 and len(lb.DATASETS_E) == 13
    assert set(PROMPTS) == set(lb.MAX_NEW_TOKENS) == set(lb.DATASETS)
    assert sorted(t for members in lb.CATEGORIES.values() for t in members) == sorted(lb.DATASETS)


# --- loading ----------------------------------------------------------------------------------------


@needs_data
def test_loads_the_three_real_files_in_official_order(loaded: LoadedModel) -> None:
    task = LongBench(data_dir=str(DATA), max_length=100_000)
    samples = task.samples(loaded)
    assert len(samples) == 600
    assert [s.meta["dataset"] for s in samples[::200]] == SHARED
    first = rows("multifieldqa_zh")[0]
    s = samples[0]
    assert s.id == f"multifieldqa_zh/{first['_id']}"
    assert s.answer == first["answers"] == ["厦门大学。"]
    assert s.meta["length"] == first["length"] and s.meta["language"] == "zh"
    assert s.meta["source"] == f"dir:{DATA}"


@needs_data
def test_subset_by_task_count_and_seed(loaded: LoadedModel) -> None:
    ids = [f"multi_news/{r['_id']}" for r in rows("multi_news")]
    first = LongBench(data_dir=str(DATA), tasks=["multi_news"], limit=5).samples(loaded)
    assert [s.id for s in first] == ids[:5]
    a = LongBench(data_dir=str(DATA), tasks=["multi_news"], limit=5, seed=3).samples(loaded)
    b = LongBench(data_dir=str(DATA), tasks=["multi_news"], limit=5, seed=3).samples(loaded)
    c = LongBench(data_dir=str(DATA), tasks=["multi_news"], limit=5, seed=4).samples(loaded)
    assert [s.id for s in a] == [s.id for s in b] != [s.id for s in c]
    assert [s.id for s in a] != ids[:5]
    positions = [ids.index(s.id) for s in a]
    assert positions == sorted(positions) and len(set(positions)) == 5  # file order kept
    two = LongBench(data_dir=str(DATA), tasks=["passage_retrieval_zh", "multi_news"], limit=2).samples(loaded)
    assert [s.meta["dataset"] for s in two] == ["passage_retrieval_zh"] * 2 + ["multi_news"] * 2


@needs_data
def test_missing_and_unknown_tasks_fail_clearly(loaded: LoadedModel) -> None:
    with pytest.raises(TokenbenchError, match=r"no hotpotqa.jsonl in .*it has: multi_news.jsonl"):
        LongBench(data_dir=str(DATA), tasks=["hotpotqa"]).samples(loaded)
    with pytest.raises(TokenbenchError, match="unknown LongBench task"):
        LongBench(tasks=["hotpot_qa"])
    with pytest.raises(TokenbenchError, match="unknown LongBench-E task"):
        LongBench(tasks=["multifieldqa_zh"], longbench_e=True)  # not part of LongBench-E
    with pytest.raises(TokenbenchError, match="data folder not found"):
        LongBench(data_dir="/nonexistent/longbench")
    with pytest.raises(TokenbenchError, match="use_chat_template"):
        LongBench(use_chat_template="sometimes")
    with pytest.raises(TokenbenchError, match="max_length"):
        LongBench(max_length=1)


# --- prompts and truncation ---------------------------------------------------------------------------

TAILS = {
    "multi_news": "\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "multifieldqa_zh": "\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "passage_retrieval_zh": "\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
}
HEADS = {
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n",
}


@needs_data
@pytest.mark.parametrize("name", SHARED)
def test_prompt_is_the_official_template_split_at_the_context(loaded: LoadedModel, name: str) -> None:
    task = LongBench(data_dir=str(DATA), tasks=[name], limit=3, max_length=1_000_000)
    for s, row in zip(task.samples(loaded), rows(name)):
        assert not s.meta["truncated"]
        assert s.context + s.question == PROMPTS[name].format(context=row["context"], input=row["input"])
        assert s.context == HEADS[name] + row["context"]
        assert s.question == TAILS[name].replace("{input}", row["input"])
        assert s.meta["instruction_chars"] == len(HEADS[name])
        assert s.max_new_tokens == {"multi_news": 512, "multifieldqa_zh": 64, "passage_retrieval_zh": 32}[name]
        assert s.meta["chat_template"] is True  # none of the three is on the skip list


@needs_data
@pytest.mark.parametrize("name", SHARED)
def test_truncation_in_the_middle_by_target_tokens(loaded: LoadedModel, name: str) -> None:
    tok = loaded.tokenizer
    max_length = 3000  # half of it holds the longest tail (an abstract of passage_retrieval_zh in byte tokens)
    task = LongBench(data_dir=str(DATA), tasks=[name], limit=4, max_length=max_length)
    for s, row in zip(task.samples(loaded), rows(name)):
        prompt = PROMPTS[name].format(context=row["context"], input=row["input"])
        ids = tok(prompt)["input_ids"]
        assert s.meta["prompt_tokens"] == len(ids) > max_length and s.meta["truncated"]
        # pred.py, written out: the first and the last int(max_length / 2) tokens, decoded and joined
        expected = (tok.decode(ids[:1500], skip_special_tokens=True)
                    + tok.decode(ids[-1500:], skip_special_tokens=True))
        assert s.context + s.question == expected
        assert s.question == TAILS[name].replace("{input}", row["input"])  # the tail survived intact
        assert s.context.startswith(HEADS[name])
        n = len(tok(s.context + s.question)["input_ids"])
        # re-tokenising may merge tokens at the joint, and a cut through a multi-byte character decodes to
        # U+FFFD (as in pred.py), which takes a few more byte tokens
        assert max_length - 4 <= n <= max_length + 8, n


@needs_data
def test_truncation_threshold_is_exact(loaded: LoadedModel) -> None:
    row = rows("multi_news")[0]
    n = len(loaded.tokenizer(PROMPTS["multi_news"].format(**row))["input_ids"])
    at = LongBench(data_dir=str(DATA), tasks=["multi_news"], limit=1, max_length=n).samples(loaded)[0]
    below = LongBench(data_dir=str(DATA), tasks=["multi_news"], limit=1, max_length=n - 1).samples(loaded)[0]
    assert not at.meta["truncated"] and below.meta["truncated"]
    assert at.meta["prompt_tokens"] == below.meta["prompt_tokens"] == n


def test_truncation_that_cuts_the_tail_splits_at_the_cut(loaded: LoadedModel) -> None:
    row = {"_id": "x", "context": "words " * 200, "input": "a long question " * 100, "answers": ["a"],
           "length": 500, "language": "en", "all_classes": None}
    s = LongBench(max_length=100).build_sample(loaded.tokenizer, "multifieldqa_en", row)
    assert s.meta["truncated"] and s.meta["split"] == "truncation_point"
    ids = loaded.tokenizer(PROMPTS["multifieldqa_en"].format(**row))["input_ids"]
    assert s.context == loaded.tokenizer.decode(ids[:50], skip_special_tokens=True)
    assert s.context + s.question == s.context + loaded.tokenizer.decode(ids[-50:], skip_special_tokens=True)


def test_chat_template_rule(loaded: LoadedModel) -> None:
    row = {"_id": "q1", "context": "Q: Who? Type: Human being", "input": "Q: Where is Paris?", "answers": ["Location"],
           "length": 10, "language": "en", "all_classes": ["Human being", "Location"]}

    def flag(rule: str, task: str) -> bool:
        return LongBench(use_chat_template=rule).build_sample(loaded.tokenizer, task, row).meta["chat_template"]

    for task in lb.DATASETS:
        assert flag("official", task) is (task not in ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"))
        assert flag("always", task) is True and flag("never", task) is False
    trec = LongBench().build_sample(loaded.tokenizer, "trec", row)
    assert trec.context + trec.question == ("Please determine the type of the question below. Here are some examples "
                                            "of questions.\n\nQ: Who? Type: Human being\nQ: Where is Paris?")
    assert trec.question == "\nQ: Where is Paris?" and trec.max_new_tokens == 64


def test_longbench_e_reads_the_e_files(tmp_path: Path, loaded: LoadedModel) -> None:
    lines = [{"_id": f"id{i}", "context": f"Passage {i}.", "input": "", "answers": ["summary"], "length": n,
              "dataset": "multi_news_e", "language": "en", "all_classes": None}
             for i, n in enumerate([100, 5000, 9000])]
    (tmp_path / "multi_news_e.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    (tmp_path / "multi_news.jsonl").write_text(json.dumps(lines[0]), encoding="utf-8")
    samples = LongBench(data_dir=str(tmp_path), longbench_e=True).samples(loaded)
    assert [s.id for s in samples] == ["multi_news_e/id0", "multi_news_e/id1", "multi_news_e/id2"]
    assert {s.meta["dataset"] for s in samples} == {"multi_news_e"}
    assert len(LongBench(data_dir=str(tmp_path)).samples(loaded)) == 1


# --- metrics (hand-checked) ------------------------------------------------------------------------------


def test_normalisation() -> None:
    assert normalize_answer("The Eiffel Tower, in  Paris!") == "eiffel tower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_zh_answer("厦门 大学。") == "厦门大学"
    assert normalize_zh_answer("“ABC”，（x）") == "abcx"


@pytest.mark.parametrize(("pred", "truth", "expected"), [
    ("The Eiffel Tower, in Paris.", "Eiffel tower", 2 / 3),  # 2 shared of 4 predicted / 2 true tokens
    ("Eiffel Tower", "the eiffel tower", 1.0),
    ("a the an", "Eiffel", 0.0),
    ("", "Eiffel", 0.0),
    ("Paris Paris", "Paris", 2 * 0.5 * 1 / 1.5),  # counts clipped: 1 shared of 2 predicted
])
def test_qa_f1(pred: str, truth: str, expected: float) -> None:
    assert qa_f1_score(pred, truth) == pytest.approx(expected, abs=1e-12)


def test_qa_f1_zh_over_jieba_tokens() -> None:
    # jieba: 在 / 厦门大学 / 举办 / 。 against 厦门大学 / 。 -> punctuation tokens vanish: P = 1/3, R = 1
    assert qa_f1_zh_score("在厦门大学举办。", "厦门大学。") == pytest.approx(0.5, abs=1e-12)
    assert qa_f1_zh_score("厦门大学", "厦门大学。") == 1.0
    assert qa_f1_zh_score("北京", "厦门大学。") == 0.0


def test_rouge_l_of_the_rouge_package() -> None:
    # one sentence each; unique words 5 and 5; LCS words {the, cat, on, mat}: P = R = 4/5
    assert rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(
        2 * (0.8 * 0.8) / (0.8 + 0.8 + 1e-8), abs=1e-12)
    # summary level: sentences split at '.', union LCS over the reference's sentences = 4 of 4 / 5 words
    assert rouge_score("The cat. The dog sat.", "The dog sat. A cat.") == pytest.approx(
        2 * (1.0 * 0.8) / (1.0 + 0.8 + 1e-8), abs=1e-12)
    assert rouge_score("", "anything") == 0.0  # the package raises on an empty hypothesis


def test_rouge_zh_over_jieba_tokens() -> None:
    # 会议 / 讨论 / 了 / 预算 / 问题 vs 会议 / 讨论 / 预算: LCS 3, P = 3/5, R = 1
    assert rouge_zh_score("会议讨论了预算问题", "会议讨论预算") == pytest.approx(
        2 * (0.6 * 1.0) / (0.6 + 1.0 + 1e-8), abs=1e-12)


def test_classification_keeps_the_official_iteration_quirk() -> None:
    classes = ["Location", "Human being", "Entity", "Numeric value"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Location or Entity", "Location", all_classes=classes) == 0.5
    assert classification_score("Entity", "Location", all_classes=classes) == 0.0
    # found [a, ab, abc]; 'a' is removed, so 'ab' is skipped by the official loop and stays: 1/2, not 1/1
    assert classification_score("abc ab a", "abc", all_classes=["a", "ab", "abc"]) == 0.5


@pytest.mark.parametrize(("fn", "pred", "truth", "expected"), [
    (retrieval_zh_score, "段落27", "段落27", 1.0),
    (retrieval_zh_score, "答案是段落2或段落27", "段落27", 0.5),
    (retrieval_zh_score, "我不知道", "段落27", 0.0),
    (retrieval_score, "Paragraph 3, not Paragraph 30", "Paragraph 3", 0.5),
    (retrieval_score, "Paragraph 3", "Paragraph 3", 1.0),
    (count_score, "There are 12 unique paragraphs out of 20", "12", 0.5),
    (count_score, "twelve", "12", 0.0),
])
def test_retrieval_and_count(fn, pred: str, truth: str, expected: float) -> None:
    assert fn(pred, truth) == expected


def test_code_similarity() -> None:
    # first line without #, ` or //: "return x + 1" (12 chars) vs "return x+1" (10): indel distance 2,
    # similarity 20/22 = 90.9 % -> fuzzywuzzy rounds to 91
    assert code_sim_score("\n# comment\nreturn x + 1\n", "return x+1") == 0.91
    assert code_sim_score("```python", "return x") == 0.0  # no usable line: '' against the truth
    assert code_sim_score("return x", "return x") == 1.0
    # indentation is part of the line (lcc / repobench-p answers are indented code): the runner hands the
    # metric the raw generated text, so a stripped prediction would lose 0.95 -> 0.67 here
    assert code_sim_score("        return x + 1\n", "        return x+1") == 0.95
    assert code_sim_score("return x + 1", "        return x+1") == 0.67


def test_score_sample_post_processing_and_best_answer() -> None:
    classes = ["Location", "Human being"]
    # few-shot tasks keep only the first line: 'Location' alone, not 'Location' + 'Human being' (0.5)
    assert score_sample("trec", "\nLocation\nHuman being", ["Location"], classes) == 1.0
    # other tasks score the whole prediction: tokens location/human/being vs location, P = 1/3, R = 1
    assert score_sample("qasper", "Location\nHuman being", ["Location"], classes) == pytest.approx(0.5, abs=1e-12)
    assert score_sample("hotpotqa", "Paris", ["London", "paris"]) == 1.0  # the best answer counts
    assert score_sample("multi_news_e", "", ["text"]) == 0.0  # LongBench-E names map to their metric


@needs_data
def test_score_on_real_samples(loaded: LoadedModel) -> None:
    task = LongBench(data_dir=str(DATA), limit=1, max_length=200)
    zh_qa, news, retrieval = task.samples(loaded)
    assert task.score(zh_qa, "在厦门大学举办。") == {"score": pytest.approx(0.5, abs=1e-12)}
    assert task.score(retrieval, "段落27") == {"score": 1.0}
    assert task.score(retrieval, "段落1") == {"score": 0.0}
    assert task.score(news, news.answer[0]) == {"score": pytest.approx(1.0, abs=1e-6)}
    assert task.score(news, "") == {"score": 0.0}


def test_aggregate_tasks_categories_and_intervals() -> None:
    def row(dataset: str, score: float, length: int = 100) -> dict:
        return {"sample_id": f"{dataset}/x", "metrics": {"score": score}, "meta": {"dataset": dataset, "length": length}}

    rows = [row("multi_news", 0.25), row("multi_news", 0.5), row("multifieldqa_zh", 1 / 3),
            row("passage_retrieval_zh", 1.0), row("passage_retrieval_zh", 0.0), row("passage_retrieval_zh", 0.0)]
    out = LongBench().aggregate(rows)
    assert out["multi_news"] == 37.5 and out["multifieldqa_zh"] == 33.33 and out["passage_retrieval_zh"] == 33.33
    assert out["avg"] == round((37.5 + 33.33 + 33.33) / 3, 2) == 34.72
    assert out["avg@summarization"] == 37.5 and out["avg@single_doc_qa"] == 33.33 and out["avg@synthetic"] == 33.33
    assert out["score"] == pytest.approx((0.25 + 0.5 + 1 / 3 + 1.0) / 6)
    assert not any(k.endswith(("0-4k", "4-8k", "8k+")) for k in out)

    e_rows = [row("qasper_e", 1.0, 3999), row("qasper_e", 0.0, 4000), row("qasper_e", 0.5, 7999),
              row("qasper_e", 0.2, 12000), row("trec_e", 0.5, 100)]
    out = LongBench(longbench_e=True).aggregate(e_rows)
    assert out["qasper_e"] == 42.5 and out["trec_e"] == 50.0
    assert (out["qasper_e@0-4k"], out["qasper_e@4-8k"], out["qasper_e@8k+"]) == (100.0, 25.0, 20.0)
    assert out["avg@0-4k"] == 75.0 and out["avg@4-8k"] == 25.0 and out["avg@8k+"] == 20.0
    assert LongBench().aggregate([]) == {}


# --- hub and offline fallback ---------------------------------------------------------------------


def test_hub_unreachable_without_offline_copy_says_what_to_do(monkeypatch, loaded: LoadedModel) -> None:
    monkeypatch.setattr(lb, "SHARED_COPY", Path("/nonexistent/shared"))
    monkeypatch.delenv(lb.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenbenchError, match=r"hub is not reachable for THUDM/LongBench.*task.data_dir"):
        LongBench(tasks=["multi_news"]).samples(loaded)


@needs_data
def test_hub_unreachable_falls_back_to_the_offline_copy(monkeypatch, tmp_path: Path, loaded: LoadedModel) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "multi_news.jsonl").write_text((DATA / "multi_news.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv(lb.OFFLINE_ENV, str(copy))
    samples = LongBench(limit=2).samples(loaded)
    assert [s.meta["source"] for s in samples] == [f"dir:{copy}"] * 2
    assert [s.meta["dataset"] for s in samples] == ["multi_news"] * 2


@needs_data
def test_hub_reads_the_official_data_zip(monkeypatch, tmp_path: Path, loaded: LoadedModel) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/multi_news.jsonl", (DATA / "multi_news.jsonl").read_text(encoding="utf-8"))
    calls = []

    def fake_download(repo_id, filename, repo_type=None, local_files_only=False):
        calls.append((repo_id, filename, repo_type, local_files_only))
        return str(archive)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    samples = LongBench(tasks=["multi_news"], limit=3).samples(loaded)
    assert calls == [("THUDM/LongBench", "data.zip", "dataset", True)]  # found in the cache: no download
    assert [s.id for s in samples] == [f"multi_news/{r['_id']}" for r in rows("multi_news")[:3]]
    assert samples[0].meta["source"] == "hub:THUDM/LongBench"


def test_score_of_a_plain_sample_without_meta() -> None:
    s = Sample(id="passage_retrieval_zh/x", answer=["段落3"])
    assert LongBench().score(s, "段落3") == {"score": 1.0}


# --- real model ----------------------------------------------------------------------------------------


@needs_data
@pytest.mark.real_model
def test_smollm2_end_to_end_on_two_real_tasks(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, full cache, one sample of each short-answer task, prompts cut to 512 tokens."""
    from hydra import compose, initialize_config_dir

    from tokenbench import registry
    from tokenbench.cli import CONF_DIR
    from tokenbench.config import store_base_config
    from tokenbench.run import execute, plan

    registry.load_all()
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=smollm2-135m", "method=none", "task=longbench", f"task.data_dir={DATA}",
            "task.tasks=[multifieldqa_zh,passage_retrieval_zh]", "task.limit=1", "task.max_length=512",
            f"output_dir={tmp_path}", "wandb.mode=disabled", "measure.warmup=0", "measure.fixed_output_tokens=2"])
    rec = execute(plan(cfg), progress=False)
    assert rec.status == "ok" and rec.n_samples == 2
    assert {"avg", "score", "multifieldqa_zh", "passage_retrieval_zh", "avg@single_doc_qa", "avg@synthetic"} <= set(
        rec.metrics)
    assert 0.0 <= rec.metrics["avg"] <= 100.0
    rows = [json.loads(line) for line in (Path(rec.run_dir) / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["meta"]["truncated"] and r["meta"]["chat_template"] is True
        # the cut prompt (512 tokens) plus SmolLM2's chat template (system prompt and turn markers)
        assert 512 < r["n_prompt_tokens"] < 512 + 40
        assert r["n_generated"] <= {"multifieldqa_zh": 64, "passage_retrieval_zh": 32}[r["meta"]["dataset"]]
