"""Plain-text answer metrics shared by tasks: normalisation, answer containment, ROUGE-1 recall.

No third-party dependency: the definitions are short and fixed here so that every task (and every
reader of a result) knows exactly what a number means.

- ``normalize_whitespace``: lowercase, every run of whitespace collapsed to one space, ends stripped.
- ``normalize_tokens``: lowercase, punctuation (every Unicode ``P*`` character) deleted, split on whitespace.
  Deleting rather than spacing out punctuation follows the SQuAD/LongBench answer normalisation, so
  ``"7,192,846"`` and ``"7192846"`` compare equal.
- ``contains_answer``: 1.0 when the whitespace-normalised answer is a substring of the whitespace-normalised
  prediction (case-insensitive), else 0.0 — the exact-match retrieval score of RULER's ``string_match``.
- ``rouge1_recall``: ROUGE-1 recall of the reference's unigrams in the prediction with clipped counts,
  ``sum_w min(count_pred(w), count_ref(w)) / len(ref)``, on ``normalize_tokens`` (no stemming, no stopword
  removal). 0.0 when the reference has no tokens.
- ``answer_prefix``: partial credit for a retrieval answer recalled only in part: the longest prefix of the
  (whitespace-normalised) answer that occurs anywhere in the prediction, as a fraction of the answer's length
  (``"... is 719."`` for ``7192846`` scores 3/7). 1.0 exactly when ``contains_answer`` is 1.0.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

__all__ = ["normalize_whitespace", "normalize_tokens", "contains_answer", "rouge1_recall", "answer_prefix"]


def normalize_whitespace(text: str) -> str:
    """Lowercase and collapse whitespace: ``"  The  Sky\\nis "`` -> ``"the sky is"``."""
    return " ".join(text.lower().split())


def _strip_punctuation(text: str) -> str:
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))


def normalize_tokens(text: str) -> list[str]:
    """Lowercased, punctuation-free whitespace tokens: ``"Hello, World!"`` -> ``["hello", "world"]``."""
    return _strip_punctuation(text.lower()).split()


def contains_answer(prediction: str, answer: str) -> float:
    """1.0 if ``answer`` occurs in ``prediction`` (case-insensitive, whitespace-normalised), else 0.0.

    An empty (or all-whitespace) answer never counts as found.
    """
    needle = normalize_whitespace(answer)
    if not needle:
        return 0.0
    return 1.0 if needle in normalize_whitespace(prediction) else 0.0


def rouge1_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference's unigrams found in the prediction, with counts clipped per word."""
    ref = Counter(normalize_tokens(reference))
    total = sum(ref.values())
    if total == 0:
        return 0.0
    pred = Counter(normalize_tokens(prediction))
    overlap = sum(min(count, pred[word]) for word, count in ref.items())
    return overlap / total


def answer_prefix(prediction: str, answer: str) -> float:
    """Longest prefix of ``answer`` found in ``prediction`` (case-insensitive, whitespace-normalised), as a
    fraction of the answer's length; 0.0 for an empty answer."""
    ans, pred = normalize_whitespace(answer), normalize_whitespace(prediction)
    if not ans:
        return 0.0
    lo, hi = 0, len(ans)  # the longest k with ans[:k] in pred (a prefix found implies all shorter ones)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ans[:mid] in pred else (lo, mid - 1)
    return lo / len(ans)
