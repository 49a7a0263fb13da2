"""The LongBench (v1) metrics, written anew from the official definitions.

Reference: THUDM/LongBench, ``LongBench/metrics.py`` (the per-sample metrics) and ``LongBench/eval.py``
(``dataset2metric``, ``scorer``, ``scorer_e``). Nothing is copied; every rule below is the official one,
including the quirks, so scores are comparable with published LongBench numbers:

- ``qa_f1``: token F1 after the SQuAD normalisation (lowercase, ASCII punctuation removed, the articles
  a/an/the removed, whitespace collapsed); 0 when nothing overlaps.
- ``qa_f1_zh``: token F1 over jieba tokens (``jieba.cut``, precise mode), each token lowercased with ASCII and
  Chinese punctuation and all whitespace removed, empty tokens dropped.
- ``rouge``: ROUGE-L F of the ``rouge`` package (summary level: sentences split at ``.``, words by
  whitespace, unique words, ``F = 2PR / (P + R + 1e-8)``); any error of the package (an empty prediction, say)
  scores 0, as officially.
- ``rouge_zh``: the same over the jieba tokens joined by spaces.
- ``classification``: the classes of ``all_classes`` found as substrings of the prediction; a found class
  that is a proper substring of the ground truth is dropped (the official loop removes items from the list it
  iterates over, so the item after a removed one is never checked: reproduced); the score is 1 / number of
  found classes when the ground truth is among them, else 0.
- ``retrieval`` / ``retrieval_zh``: the paragraph number of the ground truth (``Paragraph N`` / ``段落N``)
  against every number in the prediction: the fraction of the prediction's numbers equal to it.
- ``count``: the fraction of the prediction's numbers equal to the ground truth.
- ``code_sim``: the first line of the prediction (after leading newlines) that has no ````` ``, ``#`` or
  ``//``, compared with ``fuzzywuzzy.fuzz.ratio`` / 100. fuzzywuzzy's ratio is the rounded indel similarity
  of python-Levenshtein; ``rapidfuzz.fuzz.ratio`` computes the same similarity unrounded, so
  ``round(rapidfuzz.fuzz.ratio(a, b))`` is fuzzywuzzy's value (checked on random strings) without its GPL
  dependency.

``score_sample`` applies the official post-processing (first line only for trec, triviaqa, samsum, lsht) and
takes the maximum over the ground truths, as ``scorer`` does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Optional, Sequence

__all__ = [
    "normalize_answer", "normalize_zh_answer", "f1_tokens", "qa_f1_score", "qa_f1_zh_score", "rouge_score",
    "rouge_zh_score", "classification_score", "retrieval_score", "retrieval_zh_score", "count_score",
    "code_sim_score", "DATASET_METRIC", "FIRST_LINE_TASKS", "postprocess", "score_sample", "length_bucket",
]

# Chinese punctuation removed by the official Chinese normalisation (besides ASCII punctuation).
_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """English: lowercase, drop ASCII punctuation, replace the articles a/an/the by spaces, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese: lowercase, drop ASCII and Chinese punctuation, remove every whitespace character."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def f1_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0.0 without overlap."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba_tokens(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # not the "Building prefix dict" lines on every first use
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(tok) for tok in _jieba_tokens(text)) if t]

    return f1_tokens(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F of the ``rouge`` package; 0.0 where the package raises (empty text, for one)."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except Exception:  # noqa: BLE001 - the official scorer maps every failure of the package to 0
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return rouge_score(" ".join(_jieba_tokens(prediction)), " ".join(_jieba_tokens(ground_truth)))


def classification_score(prediction: str, ground_truth: str, *, all_classes: Optional[Sequence[str]] = None,
                         **_: object) -> float:
    found = [c for c in (all_classes or []) if c in prediction]
    # The official code removes from the list while iterating over it: after a removal the next item is
    # skipped. Index i walks the list exactly as Python's list iterator does.
    i = 0
    while i < len(found):
        term = found[i]
        if term in ground_truth and term != ground_truth:
            found.remove(term)
        i += 1
    return 1.0 / len(found) if ground_truth in found else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _fraction_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _fraction_equal(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    return _fraction_equal(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    from rapidfuzz import fuzz

    line = next((x for x in prediction.lstrip("\n").split("\n")
                 if "`" not in x and "#" not in x and "//" not in x), "")
    return int(round(fuzz.ratio(line, ground_truth))) / 100


DATASET_METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# Few-shot tasks whose prediction is cut to its first line before scoring (eval.py).
FIRST_LINE_TASKS = ("trec", "triviaqa", "samsum", "lsht")


def base_name(dataset: str) -> str:
    """``qasper_e`` (LongBench-E) -> ``qasper``."""
    return dataset[:-2] if dataset.endswith("_e") else dataset


def postprocess(dataset: str, prediction: str) -> str:
    """The official post-processing of a raw prediction: first line only for the few-shot tasks."""
    if base_name(dataset) in FIRST_LINE_TASKS:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def score_sample(dataset: str, prediction: str, answers: Sequence[str],
                 all_classes: Optional[Sequence[str]] = None) -> float:
    """The official per-sample score in [0, 1]: post-processing, then the best score over the answers."""
    metric = DATASET_METRIC[base_name(dataset)]
    prediction = postprocess(dataset, prediction)
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes))
    return float(best)


def length_bucket(length: int) -> str:
    """LongBench-E's length interval of a sample (its ``length`` field): ``0-4k``, ``4-8k`` or ``8k+``."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"
