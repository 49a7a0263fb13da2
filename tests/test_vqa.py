"""VQA task: the official metrics against hand-computed values on the normalisation cases that trip people up,
the JSONL / demo loaders, and one run through the command line on tiny-llava with a method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenbench.errors import TokenbenchError
from tokenbench.registry import build, load_all
from tokenbench.tasks.vqa_metrics import (
    evalai_normalize,
    gqa_exact_match,
    leave_one_out_accuracy,
    pope_scores,
    pope_yes_no,
    textvqa_accuracy,
    vqa_accuracy,
    vqa_official_accuracy,
)

load_all()

# --- the VQA accuracy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(k: int, want: float) -> None:
    """k of 10 humans agree with the prediction: leaving out one of them leaves k-1 matches, leaving out one of
    the others leaves k; min(matches / 3, 1) averaged over the 10 subsets."""
    answers = ["x"] * k + ["y"] * (10 - k)
    assert leave_one_out_accuracy("x", answers) == pytest.approx(want)


@pytest.mark.parametrize("prediction, answers, official, llava", [
    # the humans agree: the official script normalises nothing, so a raw "Two" misses ten "2"s; LLaVA's
    # submission step (EvalAI processing) turns it into "2" first
    ("Two", ["2"] * 10, 0.0, 1.0),
    # they disagree: both sides get number words -> digits, lower case
    ("Two", ["2"] * 9 + ["two"], 1.0, 1.0),
    # period stripped, article dropped: "the dog." -> "dog", which 3 of 10 gave -> 0.9
    ("the dog.", ["dog"] * 3 + ["cat"] * 7, 0.9, 0.9),
    # "cant" -> "can't" by the contraction map; the apostrophe is no punctuation mark: 2 of 10 -> 0.6
    ("can't", ["cant"] * 2 + ["no"] * 8, 0.6, 0.6),
    ("cant", ["can't"] * 2 + ["no"] * 8, 0.6, 0.6),
    # a digit-comma-digit anywhere deletes the commas: "1,000" -> "1000"; 3 of 10 -> 0.9
    ("1,000", ["1000"] * 3 + ["thousand"] * 7, 0.9, 0.9),
    # without digits a comma with no space next to it becomes a space: "red,blue" -> "red blue"
    # ... but LLaVA's EvalAI step deletes every comma first: "redblue" matches nobody
    ("red,blue", ["red blue"] * 3 + ["red"] * 7, 0.9, 0.0),
    # a period followed by a digit survives: "3.5" is not "35"
    ("3.5", ["3.5"] * 4 + ["35"] * 6, 1.0, 1.0),
    ("35", ["3.5"] * 4 + ["35"] * 6, 1.0, 1.0),
    ("3", ["3.5"] * 4 + ["35"] * 6, 0.0, 0.0),
    # trailing period and capitals, humans agreeing: only LLaVA's processing rescues "Yes."
    ("Yes.", ["yes"] * 10, 0.0, 1.0),
    # a sentence is not the answer
    ("yes, it is", ["yes"] * 10, 0.0, 0.0),
    # newlines and outer spaces are cleaned on both sides even when the humans agree
    ("  dog\n", ["dog"] * 10, 1.0, 1.0),
])
def test_vqa_accuracy_hand_computed(prediction, answers, official, llava) -> None:
    assert vqa_official_accuracy(prediction, answers) == pytest.approx(official)
    assert vqa_accuracy(prediction, answers) == pytest.approx(llava)


def test_vqa_official_normalises_nothing_else_when_humans_agree() -> None:
    assert vqa_official_accuracy("dog", ["dog"] * 10) == 1.0
    assert vqa_official_accuracy("Dog", ["dog"] * 10) == 0.0
    assert vqa_official_accuracy("a dog", ["dog"] * 10) == 0.0
    assert vqa_official_accuracy("a dog", ["dog"] * 9 + ["puppy"]) == 1.0  # they disagree: articles go


@pytest.mark.parametrize("text, want", [
    ("Two", "2"), ("the dog.", "dog"), ("can't", "can't"), ("cant", "can't"), ("1,000", "1000"),
    ("It's a DOG!", "it 's dog"),  # word_tokenize splits "'s"; "!" next to nothing -> space, stripped
    ("Mr. Smith", "mr smith"), ("e.g. this", "eg this"), ("red-white", "red white"), ("(red)", "red"),
    ("none", "0"), ("An Apple", "apple"), ("yes, it is", "yes it is"), ("won't", "won't"), ("wont", "won't"),
])
def test_evalai_normalisation(text: str, want: str) -> None:
    assert evalai_normalize(text) == want


def test_textvqa_accuracy_normalises_both_sides() -> None:
    answers = ["Coca-Cola"] * 3 + ["coke"] * 7
    assert textvqa_accuracy("the coca cola", answers) == pytest.approx(0.9)  # both -> "coca cola"
    assert textvqa_accuracy("COKE.", answers) == pytest.approx(1.0)
    assert textvqa_accuracy("pepsi", answers) == 0.0


def test_gqa_exact_match() -> None:
    assert gqa_exact_match("Yes.", "yes") == 1.0  # rstrip('.') and lower case, as LLaVA's conversion
    assert gqa_exact_match("the cat", "cat") == 0.0  # nothing else: exact match
    assert gqa_exact_match("yes it is", "yes") == 0.0


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is not.", "no"), ("There is no dog", "no"),
    ("It is not there", "no"), ("Yes. No.", "yes"),  # only the first sentence counts
    ("I cannot see one.", "yes"),  # 'cannot' is not 'not': the reference calls it a yes
    ("NO", "yes"),  # case-sensitive, as the reference
    ("", "yes"),
])
def test_pope_yes_no(text: str, want: str) -> None:
    assert pope_yes_no(text) == want


def test_pope_scores_hand_computed() -> None:
    got = pope_scores(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # TP 2, FP 1, TN 1, FN 1
    assert got == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                 "yes_ratio": 0.6})
    assert pope_scores(["no", "no"], ["no", "no"])["f1"] == 0.0  # undefined ratios are 0, not an error


# --- the task -----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def photo_jsonl(tmp_path: Path) -> Path:
    """Real photos: one saved to a relative path, the others named from scikit-image."""
    from PIL import Image
    from skimage import data

    (tmp_path / "img").mkdir()
    Image.fromarray(data.coffee()).save(tmp_path / "img" / "coffee.png")
    return write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "img/coffee.png", "question": "What drink is this?",
         "answers": ["coffee"] * 8 + ["tea", "latte"]},
        {"question_id": 2, "image": "skimage:chelsea", "question": "What animal is this?",
         "answers": [{"answer": "cat"}] * 10},
        {"question_id": 3, "image": "skimage:astronaut", "question": "How many people are there?",
         "answers": ["1"] * 6 + ["one"] * 4},
    ])


def test_jsonl_loader_and_scoring(photo_jsonl: Path) -> None:
    from tokenbench.vlm import load_image

    task = build("task", {"name": "vqa", "data": str(photo_jsonl)})
    samples = task.samples(None)
    assert [s.id for s in samples] == ["vqav2-1", "vqav2-2", "vqav2-3"]
    s = samples[0]
    assert s.question == "What drink is this?\nAnswer the question using a single word or phrase."
    assert s.answer == "coffee" and len(s.meta["answers"]) == 10
    assert Path(s.image).is_file() and load_image(s.image).size == (600, 400)
    assert load_image(samples[1].image).size == (451, 300)
    assert task.score(s, "Coffee.") == {"accuracy": 1.0}
    assert task.score(samples[2], "One") == {"accuracy": 1.0}  # "one" -> "1": all ten agree after processing
    assert task.score(samples[1], "a cat") == {"accuracy": 1.0}
    rows = [{"metrics": task.score(x, p)} for x, p in zip(samples, ["tea", "cat", "two"])]
    assert task.aggregate(rows)["accuracy"] == pytest.approx((0.3 + 1.0 + 0.0) / 3)


def test_variants_scores_and_pope_aggregate(tmp_path: Path) -> None:
    pope = build("task", {"name": "vqa", "variant": "pope", "data": "demo"})
    samples = pope.samples(None)
    preds = ["Yes", "Yes, there is.", "No", "no", "yes", "There is no bird."]
    rows = [{"metrics": pope.score(s, p), "answer": s.answer, "prediction": p} for s, p in zip(samples, preds)]
    labels = [s.answer for s in samples]
    assert labels == ["yes", "no", "yes", "no", "yes", "no"]
    agg = pope.aggregate(rows)  # TP 2, FP 1, TN 2, FN 1
    assert agg == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                 "yes_ratio": 0.5})
    for r, cat in zip(rows, ["random", "random", "random", "popular", "popular", "popular"]):
        r["meta"] = {"category": cat}
    agg = pope.aggregate(rows)  # random: TP 1, FP 1, FN 1 -> F1 1/2; popular: TP 1, TN 2 -> F1 1
    assert agg["f1@random"] == pytest.approx(0.5) and agg["f1@popular"] == 1.0
    assert agg["f1_mean_categories"] == pytest.approx(0.75) and agg["accuracy@random"] == pytest.approx(1 / 3)
    gqa = build("task", {"name": "vqa", "variant": "gqa", "data": "demo"})
    s = gqa.samples(None)[2]
    assert s.meta["answers"] == ["cat"] and gqa.score(s, "Cat.") == {"accuracy": 1.0}
    custom = build("task", {"name": "vqa", "data": "demo", "instruction": "", "limit": 2})
    assert [x.question for x in custom.samples(None)] == ["What is the woman wearing?", "What drink is in the cup?"]


def test_bad_task_input_fails_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenbenchError, match="unknown variant 'okvqa'"):
        build("task", {"name": "vqa", "variant": "okvqa"})
    with pytest.raises(TokenbenchError, match="data file not found"):
        build("task", {"name": "vqa", "data": str(tmp_path / "nope.jsonl")})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": "skimage:coffee", "question": "What?"}])
    with pytest.raises(TokenbenchError, match="bad.jsonl:1 lacks answers"):
        build("task", {"name": "vqa", "data": str(bad)}).samples(None)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(TokenbenchError, match="broken.jsonl:1 is not JSON"):
        build("task", {"name": "vqa", "data": str(tmp_path / "broken.jsonl")}).samples(None)


def test_offline_hub_falls_back_to_the_demo_set() -> None:
    task = build("task", {"name": "vqa"})  # the hub dataset; HF_HUB_OFFLINE=1 in the tests
    samples = task.samples(None)
    assert samples and samples[0].meta["source"] == "demo"


def test_cli_run_tiny_llava_fastv_on_photos(photo_jsonl: Path, tmp_path: Path) -> None:
    """`tokenbench model=tiny-llava method=fastv method.keep_ratio=0.25 task=vqa task.data=...` end to end."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tokenbench.cli", f"output_dir={out}", "model=tiny-llava", "method=fastv",
           "method.keep_ratio=0.25", "task=vqa", f"task.data={photo_jsonl}", "task.max_new_tokens=3",
           "measure.fixed_output_tokens=3", "measure.warmup=0", "wandb.mode=disabled", "progress=false"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["status"] == "ok" and rec["family"] == "vlm" and rec["n_samples"] == 3
    assert rec["achieved_keep_ratio"] == 0.25 and rec["budget"]["keep_ratio"] == 0.25
    assert 0.0 <= rec["metrics"]["accuracy"] <= 1.0
    for k in ("prefill_ms", "ttft_ms", "e2e_ms"):
        assert rec["latency"][k] > 0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["compression"]["visual_tokens_kept"] == 16 and r["compression"]["prune_layer"] == 2 for r in rows)


def test_hub_loaders_read_the_lmms_lab_layouts(monkeypatch) -> None:
    """The Hugging Face path with in-memory datasets shaped like lmms-lab's VQAv2 (answers as dicts, images in
    the rows) and GQA (instructions and images in two configs joined by imageId): no network."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    from skimage import data

    cat, cup = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())
    vqav2 = datasets.Dataset.from_dict({
        "question_id": [7, 8], "question": ["What animal?", "What drink?"],
        "answers": [[{"answer": "cat", "answer_id": i} for i in range(10)],
                    [{"answer": "coffee", "answer_id": i} for i in range(10)]],
        "image": [cat, cup]}).cast_column("image", datasets.Image())
    gqa_q = datasets.Dataset.from_dict({"id": ["g1"], "imageId": ["n2"], "question": ["What is in the cup?"],
                                        "answer": ["coffee"]})
    gqa_img = datasets.Dataset.from_dict({"id": ["n1", "n2"], "image": [cat, cup]}).cast_column("image", datasets.Image())
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "lmms-lab/VQAv2":
            return vqav2
        return gqa_q if config.endswith("instructions") else gqa_img

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    samples = build("task", {"name": "vqa"}).samples(None)
    assert calls[0] == ("lmms-lab/VQAv2", None, "validation")
    assert [s.id for s in samples] == ["vqav2-7", "vqav2-8"] and samples[1].meta["answers"] == ["coffee"] * 10
    assert samples[0].meta["source"] == "hub:lmms-lab/VQAv2" and samples[0].image().size == (451, 300)
    gqa = build("task", {"name": "vqa", "variant": "gqa"}).samples(None)
    assert calls[1:] == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
                         ("lmms-lab/GQA", "testdev_balanced_images", "testdev")]
    assert gqa[0].id == "gqa-g1" and gqa[0].answer == "coffee" and gqa[0].image().size == (600, 400)
