"""The needle-in-a-haystack task: grid, construction (token counts, needle position), errors, metrics,
heatmap."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel
from tokenbench.models.tiny import tiny_tokenizer
from tokenbench.registry import TASKS
from tokenbench.task import Sample
from tokenbench.tasks.niah import SYNTHETIC_FILLER, NeedleInAHaystack
from tokenbench.text_metrics import contains_answer, normalize_tokens, normalize_whitespace, rouge1_recall

PG_ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paul_graham_essays"
NEEDLE = NeedleInAHaystack.__dataclass_fields__["needle"].default
SF_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
SF_ANSWER = "eat a sandwich and sit in Dolores Park"

_WORDS = ("market startup founders investors users product growth idea essay school city office software "
          "language hacker design taste money time work question answer").split()


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(model=None, tokenizer=tiny_tokenizer())


def ntok(loaded: LoadedModel, text: str) -> int:
    return len(loaded.tokenizer.encode(text, add_special_tokens=False))


def _essay(seed: int, n_sentences: int) -> str:
    """Deterministic prose: 6-13-word sentences ending in '.', '?' or '!', paragraphs, some non-ASCII."""
    out = []
    for i in range(n_sentences):
        k = 6 + (seed * 7 + i * 5) % 8
        words = [_WORDS[(seed * 13 + i * 3 + j * 11) % len(_WORDS)] for j in range(k)]
        if i % 9 == 4:
            words[2] = "café"
        end = "?" if i % 7 == 3 else "!" if i % 11 == 5 else "."
        out.append(" ".join(words).capitalize() + end)
        if i % 6 == 5:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


@pytest.fixture
def essays(tmp_path: Path) -> Path:
    folder = tmp_path / "essays"
    folder.mkdir()
    # written out of order: the task must read them sorted by name
    (folder / "b_second.txt").write_text("Beta essay opens here. " + _essay(2, 120), encoding="utf-8")
    (folder / "a_first.txt").write_text("Alpha essay opens here. " + _essay(1, 120), encoding="utf-8")
    (folder / "notes.md").write_text("not part of the haystack", encoding="utf-8")
    return folder


# --- registration and grid -------------------------------------------------------------------------


def test_registered_for_kv_and_prompt_families() -> None:
    entry = TASKS.get("niah")
    assert entry.cls is NeedleInAHaystack
    assert entry.families == ("kv", "prompt")


def test_grid_is_lengths_times_depths_in_fixed_order(loaded: LoadedModel) -> None:
    task = NeedleInAHaystack(context_lengths=[128, 200, 320], depths=[0.0, 0.25, 1.0])
    samples = task.samples(loaded)
    assert [s.id for s in samples] == [
        "len128_depth0", "len128_depth0.25", "len128_depth1",
        "len200_depth0", "len200_depth0.25", "len200_depth1",
        "len320_depth0", "len320_depth0.25", "len320_depth1",
    ]
    for s in samples:
        assert s.question == "\n\n" + task.question
        assert s.answer == "7192846" and s.max_new_tokens == 24
        assert set(s.meta) >= {"context_length", "depth", "context_tokens", "needle_depth"}
        assert s.id == f"len{s.meta['context_length']}_depth{s.meta['depth']:g}"
    assert len(NeedleInAHaystack().samples(loaded)) == 2 * 5  # defaults: [256, 512] × 5 depths


def test_limit_keeps_the_first_samples(loaded: LoadedModel) -> None:
    full = NeedleInAHaystack(context_lengths=[128, 256], depths=[0.0, 0.5, 1.0]).samples(loaded)
    part = NeedleInAHaystack(context_lengths=[128, 256], depths=[0.0, 0.5, 1.0], limit=4).samples(loaded)
    assert [s.id for s in part] == [s.id for s in full[:4]]
    assert [s.context for s in part] == [s.context for s in full[:4]]


@pytest.mark.parametrize("source", ["synthetic", "essays"])
def test_deterministic(loaded: LoadedModel, essays: Path, source: str) -> None:
    kwargs = {"haystack_dir": str(essays)} if source == "essays" else {}
    a = NeedleInAHaystack(context_lengths=[160, 400], depths=[0.0, 0.3, 0.7, 1.0], **kwargs).samples(loaded)
    b = NeedleInAHaystack(context_lengths=[160, 400], depths=[0.0, 0.3, 0.7, 1.0], **kwargs).samples(loaded)
    def key(s: Sample) -> tuple:
        return s.id, s.context, s.question, s.meta

    assert [key(s) for s in a] == [key(s) for s in b]


# --- construction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["synthetic", "essays"])
def test_token_counts_close_to_target(loaded: LoadedModel, essays: Path, source: str) -> None:
    kwargs = {"haystack_dir": str(essays)} if source == "essays" else {}
    lengths = [64, 128, 333, 700]
    task = NeedleInAHaystack(context_lengths=lengths, depths=[0.0, 0.1, 0.5, 0.9, 1.0], **kwargs)
    for s in task.samples(loaded):
        n = ntok(loaded, s.context)
        assert s.meta["context_tokens"] == n
        target = s.meta["context_length"]
        assert target - 3 <= n <= target, (s.id, n)


@pytest.mark.parametrize("source", ["synthetic", "essays"])
def test_needle_position_follows_depth(loaded: LoadedModel, essays: Path, source: str) -> None:
    kwargs = {"haystack_dir": str(essays)} if source == "essays" else {}
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    length = 1500
    samples = NeedleInAHaystack(context_lengths=[length], depths=depths, **kwargs).samples(loaded)
    needle_tokens = ntok(loaded, NEEDLE)
    # the needle moves back to the previous sentence end: at most one sentence (<= ~110 tiny-tokenizer tokens)
    slack = 120 / length
    positions = []
    for s, depth in zip(samples, depths):
        assert s.context.count(NEEDLE) == 1
        i = s.context.index(NEEDLE)
        pos = ntok(loaded, s.context[:i]) / ntok(loaded, s.context)  # measured independently of the task
        assert s.meta["needle_depth"] == pytest.approx(pos, abs=0.01)
        positions.append(pos)
        if depth == 0.0:
            assert i == 0
        elif depth == 1.0:
            assert s.context.endswith(NEEDLE)
            assert pos >= 1 - (needle_tokens + 2) / length
        else:
            # snapped back to the end of a sentence, never forward
            assert s.context[:i].rstrip()[-1] in ".!?"
            assert depth - slack <= pos <= depth + 0.01, (s.id, pos)
    assert positions == sorted(positions)


def test_synthetic_haystack_is_the_repeated_filler(loaded: LoadedModel) -> None:
    (s,) = NeedleInAHaystack(context_lengths=[200], depths=[0.5]).samples(loaded)
    hay = s.context.replace(" " + NEEDLE, "")
    assert hay.startswith(SYNTHETIC_FILLER + " " + SYNTHETIC_FILLER)
    sentences = {x.strip() for x in SYNTHETIC_FILLER.split(".") if x.strip()}
    assert {x.strip() for x in hay.split(".")[:-1] if x.strip()} <= sentences  # the cut end may be partial


def test_essays_read_in_sorted_order_and_cycle_when_short(loaded: LoadedModel, tmp_path: Path,
                                                          essays: Path) -> None:
    (s,) = NeedleInAHaystack(haystack_dir=str(essays), context_lengths=[400], depths=[1.0]).samples(loaded)
    assert s.context.startswith("Alpha essay opens here.")
    short = tmp_path / "short"
    short.mkdir()
    (short / "only.txt").write_text("One short essay. It has three sentences. That is all.\n",
                                    encoding="utf-8")
    (s,) = NeedleInAHaystack(haystack_dir=str(short), context_lengths=[300], depths=[0.5]).samples(loaded)
    assert s.context.count("One short essay.") >= 5  # repeated, as the reference cycles through the files
    assert 297 <= ntok(loaded, s.context) <= 300


def test_custom_needle_question_answer(loaded: LoadedModel) -> None:
    task = NeedleInAHaystack(needle=SF_NEEDLE, question="What is the best thing to do in San Francisco?",
                             answer=SF_ANSWER, context_lengths=[256], depths=[0.5], max_new_tokens=40)
    (s,) = task.samples(loaded)
    assert SF_NEEDLE in s.context and s.answer == SF_ANSWER and s.max_new_tokens == 40
    assert s.question == "\n\nWhat is the best thing to do in San Francisco?"


@pytest.mark.skipif(not PG_ESSAYS.is_dir(), reason=f"{PG_ESSAYS} not present")
def test_real_paul_graham_essays(loaded: LoadedModel) -> None:
    task = NeedleInAHaystack(haystack_dir=str(PG_ESSAYS), context_lengths=[256, 1500], depths=[0.0, 0.5, 1.0])
    samples = task.samples(loaded)
    assert len(samples) == 6
    first = sorted(PG_ESSAYS.glob("*.txt"))[0].read_text(encoding="utf-8").strip()
    for s in samples:
        n = ntok(loaded, s.context)
        assert s.meta["context_length"] - 3 <= n <= s.meta["context_length"]
        assert s.context.count(NEEDLE) == 1
        hay = s.context.replace(NEEDLE, "")
        assert hay.strip()[:40] in first
    assert samples[-1].context.startswith(first[:200])


# --- errors -----------------------------------------------------------------------------------------


def test_bad_haystack_folders_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TokenbenchError, match="not found") as err:
        NeedleInAHaystack(haystack_dir=str(missing))
    assert str(missing) in str(err.value)

    afile = tmp_path / "file.txt"
    afile.write_text("text", encoding="utf-8")
    with pytest.raises(TokenbenchError, match="not a folder") as err:
        NeedleInAHaystack(haystack_dir=str(afile))
    assert str(afile) in str(err.value)

    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "essay.md").write_text("Some text.", encoding="utf-8")
    with pytest.raises(TokenbenchError, match="no .txt files") as err:
        NeedleInAHaystack(haystack_dir=str(no_txt))
    assert str(no_txt) in str(err.value)

    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "good.txt").write_text("A real sentence.", encoding="utf-8")
    (blank / "empty.txt").write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(TokenbenchError, match="no text") as err:
        NeedleInAHaystack(haystack_dir=str(blank))
    assert str(blank / "empty.txt") in str(err.value)

    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "junk.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(TokenbenchError, match="cannot read") as err:
        NeedleInAHaystack(haystack_dir=str(binary))
    assert str(binary / "junk.txt") in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"context_lengths": []}, "context_lengths must be a non-empty list"),
        ({"context_lengths": [0]}, "positive integers"),
        ({"context_lengths": [-256]}, "positive integers"),
        ({"context_lengths": [128.5]}, "positive integers"),
        ({"context_lengths": [4]}, "no room for a haystack"),
        ({"context_lengths": [256, 256]}, "duplicates"),
        ({"depths": []}, "depths must be a non-empty list"),
        ({"depths": [-0.1]}, r"fractions in \[0, 1\]"),
        ({"depths": [0.5, 1.5]}, r"fractions in \[0, 1\]"),
        ({"depths": [50]}, r"fractions in \[0, 1\]"),
        ({"depths": [0.5, 0.5]}, "duplicates"),
        ({"needle": "  "}, "needle must be a non-empty string"),
        ({"question": ""}, "question must be a non-empty string"),
        ({"answer": ""}, "answer must be a non-empty string"),
        ({"answer": "1234"}, "does not occur in the needle"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"limit": 0}, "limit must be a positive integer"),
    ],
)
def test_bad_parameters_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(TokenbenchError, match=match) as err:
        NeedleInAHaystack(**kwargs)
    assert "\n" not in str(err.value)  # one clear line


def test_length_not_above_needle_tokens_fails_with_the_tokenizer(loaded: LoadedModel) -> None:
    needle_tokens = ntok(loaded, NEEDLE)
    assert needle_tokens > len(NEEDLE.split())  # construction can only check the word count
    task = NeedleInAHaystack(context_lengths=[needle_tokens], depths=[0.5])
    with pytest.raises(TokenbenchError, match=f"the needle is {needle_tokens} tokens"):
        task.samples(loaded)


def test_model_without_tokenizer_fails_clearly() -> None:
    with pytest.raises(TokenbenchError, match="no tokenizer"):
        NeedleInAHaystack().samples(LoadedModel(model=None, tokenizer=None))


# --- metrics ----------------------------------------------------------------------------------------


def test_normalisation() -> None:
    assert normalize_whitespace("  The  Sky\n\tis BLUE ") == "the sky is blue"
    assert normalize_tokens("Hello, World! It's 7,192,846.") == ["hello", "world", "its", "7192846"]
    assert normalize_tokens("«Quoted» (text) — here") == ["quoted", "text", "here"]
    assert normalize_tokens(" ... ") == []


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("The special magic number is 7192846.", "7192846", 1.0),
        ("7192846", "7192846", 1.0),
        ("It is\n  EAT a Sandwich  and sit in dolores park!", "eat a sandwich and sit in Dolores Park", 1.0),
        ("719 2846", "7192846", 0.0),
        ("The number is 7192845.", "7192846", 0.0),
        ("", "7192846", 0.0),
        ("anything", "   ", 0.0),
    ],
)
def test_contains_answer(prediction: str, answer: str, expected: float) -> None:
    assert contains_answer(prediction, answer) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The cat sat on the mat", "the cat the dog", 3 / 4),  # the×2 + cat of 4 reference unigrams
        ("the the the", "the cat", 1 / 2),  # clipped: 'the' counts once, as in the reference
        ("the", "the the cat", 1 / 3),  # clipped the other way
        ("It's 7,192,846!", "7192846", 1.0),  # punctuation stripped
        ("Eat a sandwich.", SF_ANSWER, 3 / 8),
        ("eat a sandwich in the park", SF_ANSWER, 5 / 8),
        ("", SF_ANSWER, 0.0),
        ("some words", "", 0.0),
        ("DOLORES park, eat; sit", "Eat sit Dolores PARK", 1.0),
    ],
)
def test_rouge1_recall(prediction: str, reference: str, expected: float) -> None:
    assert rouge1_recall(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_score() -> None:
    task = NeedleInAHaystack()
    sample = Sample(id="len256_depth0", answer="7192846")
    hit = task.score(sample, "The special magic number is 7192846.")
    assert hit == {"accuracy": 1.0, "rouge1_recall": 1.0, "answer_prefix": 1.0}
    assert task.score(sample, "I do not know.") == {"accuracy": 0.0, "rouge1_recall": 0.0, "answer_prefix": 0.0}
    assert task.score(sample, "7,192,846") == {"accuracy": 0.0, "rouge1_recall": 1.0, "answer_prefix": 1 / 7}
    # a needle recalled in part: the digits' prefix counts, a stray digit elsewhere does not help
    assert task.score(sample, "It is 1, or 719.")["answer_prefix"] == 3 / 7
    assert task.score(sample, "It is 1.")["answer_prefix"] == 0.0
    sf = Sample(id="x", answer=SF_ANSWER)
    assert task.score(sf, "Eat a sandwich in the park.")["answer_prefix"] == len("eat a sandwich ") / len(SF_ANSWER)
    assert {k: v for k, v in task.score(sf, "Eat a sandwich in the park.").items() if k != "answer_prefix"} == {
        "accuracy": 0.0, "rouge1_recall": 5 / 8}


def _rows(cells: dict[tuple[int, float], float], **meta: str) -> list[dict]:
    return [{"sample_id": f"len{n}_depth{d:g}", "metrics": {"accuracy": a, "rouge1_recall": a / 2},
             "meta": {"context_length": n, "depth": d, **meta}} for (n, d), a in cells.items()]


def test_aggregate_overall_per_length_per_depth() -> None:
    rows = _rows({(256, 0.0): 1.0, (256, 0.5): 0.0, (512, 0.0): 1.0, (512, 0.5): 1.0})
    assert NeedleInAHaystack().aggregate(rows) == {
        "accuracy": 0.75, "rouge1_recall": 0.375,
        "accuracy@len256": 0.5, "rouge1_recall@len256": 0.25,
        "accuracy@len512": 1.0, "rouge1_recall@len512": 0.5,
        "accuracy@depth0": 1.0, "rouge1_recall@depth0": 0.5,
        "accuracy@depth0.5": 0.5, "rouge1_recall@depth0.5": 0.25,
    }


# --- heatmap ----------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("with_names", [True, False])
def test_heatmap_is_a_png_of_sensible_size(tmp_path: Path, with_names: bool) -> None:
    cells = {(n, d): float((n + int(d * 100)) % 3 != 0)
             for n in (256, 512, 1024) for d in (0.0, 0.25, 0.5, 1.0)}
    del cells[(1024, 0.5)]  # a missing cell is drawn, not an error
    meta = {"model": "tiny-llama", "method": "streaming_llm"} if with_names else {}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    paths = NeedleInAHaystack().artifacts(_rows(cells, **meta), run_dir)
    assert paths == [run_dir / "niah_heatmap.png"]
    width, height = _png_size(paths[0])
    assert 300 <= width <= 3000 and 250 <= height <= 3000
    assert paths[0].stat().st_size > 5000
