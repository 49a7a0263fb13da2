"""RULER: the generated prompts of every task (needles, chains, word lists, templates), lengths in target
tokens, seeding, the chat/base formats, metrics and aggregation."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel
from tokenbench.models.tiny import tiny_tokenizer
from tokenbench.registry import TASKS
from tokenbench.task import Sample
from tokenbench.tasks.ruler import (
    REPEAT_HAYSTACK,
    TASK_CONFIGS,
    Ruler,
    postprocess,
    string_match_all,
    string_match_part,
)

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paul_graham_essays"
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
KEY_WORD = re.compile(r"^[^\s-]+(-[^\s-]+)+$")  # adjective-noun (either may itself hold a hyphen)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(model=None, tokenizer=tiny_tokenizer())


def ntok(loaded: LoadedModel, text: str) -> int:
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def one(loaded: LoadedModel, task: str, length: int = 1500, **kwargs) -> Sample:
    return Ruler(tasks=[task], lengths=[length], num_samples=1, **kwargs).samples(loaded)[0]


def test_registered() -> None:
    entry = TASKS.get("ruler")
    assert entry.cls is Ruler and entry.families == ("kv", "prompt") and Ruler.primary_metric == "avg"
    assert list(TASK_CONFIGS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                  "vt", "cwe"]


# --- grid, seeding, lengths --------------------------------------------------------------------------


def test_grid_ids_and_seeding(loaded: LoadedModel) -> None:
    task = Ruler(tasks=["niah_single_1", "vt"], lengths=[1024, 1500], num_samples=3)
    samples = task.samples(loaded)
    assert [s.id for s in samples] == [f"{t}/len{n}/{i}" for t in ("niah_single_1", "vt") for n in (1024, 1500)
                                       for i in range(3)]
    again = Ruler(tasks=["niah_single_1", "vt"], lengths=[1024, 1500], num_samples=3).samples(loaded)
    assert [(s.context, s.question, s.answer) for s in samples] == [(s.context, s.question, s.answer) for s in again]
    # each sample has its own seed: fewer samples, or other tasks beside it, leave it unchanged
    fewer = Ruler(tasks=["vt"], lengths=[1500], num_samples=2).samples(loaded)
    by_id = {s.id: s for s in samples}
    assert [(s.context, s.answer) for s in fewer] == [(by_id[s.id].context, by_id[s.id].answer) for s in fewer]
    other_seed = Ruler(tasks=["niah_single_1"], lengths=[1024], num_samples=3, seed=7).samples(loaded)
    assert [s.answer for s in other_seed] != [s.answer for s in samples[:3]]
    assert len({s.answer[0] for s in samples[:3]}) == 3  # different needles per sample


@pytest.mark.parametrize("name", list(TASK_CONFIGS))
def test_prompt_fits_the_length_closely(loaded: LoadedModel, name: str) -> None:
    length = 1800
    s = one(loaded, name, length)
    n = ntok(loaded, s.context + s.question)
    assert s.meta["prompt_tokens"] == n
    assert n + s.max_new_tokens <= length
    # the largest haystack that fits: one more unit (a sentence, a line, a word) would not
    assert n + s.max_new_tokens > length - 80, (name, n)
    assert s.max_new_tokens == {"vt": 30, "cwe": 120}.get(name, 128)


def test_too_short_a_length_fails_clearly(loaded: LoadedModel) -> None:
    with pytest.raises(TokenbenchError, match="length 300 is too short for cwe"):
        one(loaded, "cwe", 300)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tasks": ["niah_single_4"]}, "unknown task"),
    ({"tasks": []}, "non-empty list"),
    ({"tasks": ["vt", "vt"]}, "duplicates"),
    ({"lengths": [0]}, "positive integers"),
    ({"lengths": 4096}, "non-empty list"),
    ({"num_samples": 0}, "num_samples"),
    ({"haystack_dir": "/nonexistent/essays"}, "haystack folder not found"),
])
def test_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(TokenbenchError, match=match):
        Ruler(**kwargs)


# --- niah ----------------------------------------------------------------------------------------------


def needles(text: str) -> list[tuple[str, str, str]]:
    return NEEDLE.findall(text)


def test_niah_single_base_template_is_rulers(loaded: LoadedModel) -> None:
    s = one(loaded, "niah_single_1", chat_template=False)
    ((kind, key, value),) = needles(s.context)
    assert kind == "numbers" and s.answer == [value] and re.fullmatch(r"[1-9]\d{6}", value)
    assert KEY_WORD.match(key)
    head = ("A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards.\n")
    assert s.context.startswith(head)
    lines = s.context[len(head):].split("\n")
    assert lines.count(f"One of the special magic numbers for {key} is: {value}.") == 1
    assert set(lines) - {REPEAT_HAYSTACK} == {f"One of the special magic numbers for {key} is: {value}."}
    assert len(lines) == s.meta["haystack_size"] + 1
    assert s.question == (f"\nWhat is the special magic number for {key} mentioned in the provided text?"
                          f" The special magic number for {key} mentioned in the provided text is")
    assert s.meta["prompt_format"] == "base" and s.meta["chat_template"] is False


def test_chat_format_puts_the_answer_prefix_after_the_assistant_header(loaded: LoadedModel) -> None:
    s = one(loaded, "niah_single_1")
    key = needles(s.context)[0][1]
    assert s.context.startswith("<|im_start|>user\nA special magic number is hidden")
    assert s.question == (f"\nWhat is the special magic number for {key} mentioned in the provided text?"
                          "<|im_end|>\n<|im_start|>assistant\n"
                          f" The special magic number for {key} mentioned in the provided text is")
    assert s.meta["prompt_format"] == "chat" and s.meta["chat_template"] is False  # the runner adds nothing


def test_niah_single_3_has_uuid_values(loaded: LoadedModel) -> None:
    s = one(loaded, "niah_single_3")
    ((kind, _key, value),) = needles(s.context)
    assert kind == "uuids" and UUID.match(value) and s.answer == [value]
    assert "special magic uuid for" in s.question


def test_essay_tasks_fall_back_to_the_filler_without_essays(loaded: LoadedModel) -> None:
    s = one(loaded, "niah_single_2")
    assert s.meta["haystack"] == "repeat" and REPEAT_HAYSTACK in s.context


@pytest.mark.skipif(not ESSAYS.is_dir(), reason=f"{ESSAYS} not present")
def test_essay_haystack_with_four_keys(loaded: LoadedModel) -> None:
    s = one(loaded, "niah_multikey_1", 2000, haystack_dir=str(ESSAYS))
    assert s.meta["haystack"] == "essay" and REPEAT_HAYSTACK not in s.context
    found = needles(s.context)
    assert len(found) == 4 and len({k for _, k, _ in found}) == 4
    asked = re.search(r"special magic number for (\S+) mentioned", s.question).group(1)
    assert s.answer == [v for _, k, v in found if k == asked]
    first = sorted(ESSAYS.glob("*.txt"))[0].read_text(encoding="utf-8").split()
    body = NEEDLE.sub("", s.context.split("afterwards.\n", 1)[1]).split()
    assert body[:20] == first[:20]  # the essays, in file-name order, white space collapsed


def test_multivalue_and_multiquery(loaded: LoadedModel) -> None:
    mv = one(loaded, "niah_multivalue")
    found = needles(mv.context)
    assert len(found) == 4 and len({k for _, k, _ in found}) == 1
    assert sorted(mv.answer) == sorted(v for _, _, v in found)
    assert f"What are all the special magic numbers for {found[0][1]} mentioned" in mv.question
    assert mv.question.endswith("mentioned in the provided text are")

    mq = one(loaded, "niah_multiquery")
    found = dict((k, v) for _, k, v in needles(mq.context))
    assert len(found) == 4
    asked = re.search(r"numbers for (.+) mentioned in the provided text\?", mq.question).group(1)
    keys = asked.replace(", and ", ", ").split(", ")
    assert sorted(keys) == sorted(found) and mq.answer == [found[k] for k in keys]


def test_needle_haystack_tasks(loaded: LoadedModel) -> None:
    s = one(loaded, "niah_multikey_2")
    lines = s.context.split("afterwards.\n", 1)[1].split("\n")
    assert all(NEEDLE.fullmatch(line) for line in lines)  # every line a needle: distractors with other keys
    asked = re.search(r"number for (\S+) mentioned", s.question).group(1)
    assert [v for _, k, v in needles(s.context) if k == asked] == s.answer

    s3 = one(loaded, "niah_multikey_3")
    asked = re.search(r"uuid for (\S+) mentioned", s3.question).group(1)
    assert UUID.match(asked) and UUID.match(s3.answer[0])
    assert [v for _, k, v in needles(s3.context) if k == asked] == s3.answer


# --- variable tracking and common words -----------------------------------------------------------------


def follow_chain(text: str, value: str) -> list[str]:
    assigned: dict[str, str] = {}
    for name, source in re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", text):
        assigned[name] = source
    out = [n for n, s in assigned.items() if s == value]
    while True:
        nxt = [n for n, s in assigned.items() if s == f"VAR {out[-1]}"]
        if not nxt:
            return out
        out += nxt


def test_variable_tracking(loaded: LoadedModel) -> None:
    s = one(loaded, "vt", chat_template=False)
    example, task_text = s.context.split("\n\n\n\n", 1)  # the example ends with its answer and a blank line
    assert example.startswith(" Memorize and track the chain(s) of variable assignment hidden in the following "
                              "text. VAR ")  # RULER's example template: white space collapsed
    ex_value = re.search(r"assigned the value (\d+) in the text Answer:", example).group(1)
    ex_chain = follow_chain(example, ex_value)
    assert len(ex_chain) == 5 and all(len(v) == 3 for v in ex_chain)
    assert example.endswith(f"they are:  {' '.join(ex_chain)}")
    assert task_text.startswith("Memorize and track the chain(s) of variable assignment hidden in the following "
                                "text.\n\n")
    value = re.search(r"assigned the value (\d+) in the text above\.", s.question).group(1)
    assert 10000 <= int(value) <= 99998
    assert follow_chain(task_text, value) == s.answer and len(s.answer) == 5
    assert all(len(v) == 5 for v in s.answer)
    assert s.question.endswith(f" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                               f"variables are assgined the value {value}, they are: ")


@pytest.mark.parametrize(("length", "common", "rare"), [(1800, 6, 1), (7000, 30, 3)])
def test_common_words(loaded: LoadedModel, length: int, common: int, rare: int) -> None:
    s = one(loaded, "cwe", length, chat_template=False)
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    example, task_text = s.context.split(prefix, 1)
    ex_words = re.findall(r"\d+\. (\S+)", example)
    ex_counts = Counter(ex_words)
    top = re.findall(r"\d+\. (\S+)", task_text.split("\n", 1)[0])  # the example's answer list
    assert len(top) == 10 and {ex_counts[w] for w in top} == {3 if length < 4096 else 10}
    words = re.findall(r"\d+\. (\S+)", task_text.split("\n", 1)[1])
    numbers = [int(n) for n in re.findall(r"(\d+)\. \S+", task_text.split("\n", 1)[1])]
    assert numbers == list(range(1, len(words) + 1))
    counts = Counter(words)
    assert sorted(s.answer) == sorted(w for w, c in counts.items() if c == common)
    assert {c for w, c in counts.items() if w not in s.answer} == {rare}
    assert s.question == "\nQuestion: What are the 10 most common words in the above list?" + prefix


# --- metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pred", "refs", "all_", "part"), [
    ("The numbers are 1234567 and 7654321.", ["1234567", "7654321"], 1.0, 1.0),
    ("The number is 1234567.", ["1234567", "7654321"], 0.5, 1.0),
    ("ABC-def", ["abc-DEF"], 1.0, 1.0),  # case-insensitive
    ("nothing", ["1234567", "7654321", "1111111", "2222222"], 0.0, 0.0),
    ("1111111 2222222 7654321", ["1234567", "7654321", "1111111", "2222222"], 0.75, 1.0),
])
def test_string_match(pred: str, refs: list[str], all_: float, part: float) -> None:
    assert string_match_all(pred, refs) == all_
    assert string_match_part(pred, refs) == part


def test_postprocess_and_score() -> None:
    assert postprocess("  a\tb\x00c \n") == "a\nb\nc"
    s = Sample(id="vt/len1024/0", answer=["ABCDE", "FGHIJ"])
    task = Ruler()
    assert task.score(s, " ABCDE, FGHIJ ") == {"string_match_all": 1.0, "string_match_part": 1.0}
    assert task.score(s, "abcde") == {"string_match_all": 0.5, "string_match_part": 1.0}
    assert task.score(s, "") == {"string_match_all": 0.0, "string_match_part": 0.0}


def test_aggregate() -> None:
    def row(task: str, length: int, value: float) -> dict:
        return {"sample_id": f"{task}/len{length}/0", "meta": {"task": task, "length": length},
                "metrics": {"string_match_all": value, "string_match_part": float(value > 0)}}

    rows = [row("niah_single_1", 1024, 1.0), row("niah_single_1", 1024, 0.0), row("niah_single_1", 2048, 1.0),
            row("vt", 1024, 0.4), row("vt", 2048, 0.2)]
    out = Ruler().aggregate(rows)
    assert out["niah_single_1"] == 66.67 and out["vt"] == 30.0
    assert out["niah_single_1@len1024"] == 50.0 and out["niah_single_1@len2048"] == 100.0
    assert out["vt@len1024"] == 40.0 and out["vt@len2048"] == 20.0
    assert out["avg"] == 48.34  # (66.67 + 30) / 2 = 48.335, rounded half to even in binary: 48.34
    assert out["avg@len1024"] == 45.0 and out["avg@len2048"] == 60.0
    assert out["string_match_all"] == pytest.approx(2.6 / 5) and out["string_match_part"] == pytest.approx(1.0 * 4 / 5)


# --- real model ----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_end_to_end_niah_and_vt(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, full cache: niah_single_1 and vt at 1024 tokens, two samples each."""
    import json

    from hydra import compose, initialize_config_dir

    from tokenbench import registry
    from tokenbench.cli import CONF_DIR
    from tokenbench.config import store_base_config
    from tokenbench.run import execute, plan

    registry.load_all()
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=smollm2-135m", "method=none", "task=ruler", "task.tasks=[niah_single_1,vt]", "task.lengths=[1024]",
            "task.num_samples=2", f"output_dir={tmp_path}", "wandb.mode=disabled", "measure.warmup=0",
            "measure.fixed_output_tokens=2"])
    rec = execute(plan(cfg), progress=False)
    assert rec.status == "ok" and rec.n_samples == 4
    assert {"avg", "niah_single_1", "vt", "niah_single_1@len1024", "avg@len1024", "string_match_all"} <= set(rec.metrics)
    rows = [json.loads(line) for line in (Path(rec.run_dir) / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        # the task built the chat prompt itself; the runner tokenised it as it stands
        assert r["n_prompt_tokens"] == r["meta"]["prompt_tokens"]
        assert r["n_prompt_tokens"] + {"niah_single_1": 128, "vt": 30}[r["meta"]["task"]] <= 1024
