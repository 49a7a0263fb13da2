"""The base every task dataclass derives from, and the sample it yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tokenbench.models.base import LoadedModel


@dataclass
class Sample:
    """One evaluation item. ``context`` is what a method may compress; ``question`` comes after it."""

    id: str
    context: str = ""
    question: str = ""
    answer: Any = None
    max_new_tokens: int = 32
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A benchmark: it builds samples (possibly with the model's tokenizer), scores predictions and
    aggregates. ``families`` lists the method families whose runs it can evaluate."""

    families: ClassVar[tuple[str, ...]] = ()
    registered_name: ClassVar[str] = ""

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        """All samples, in a fixed order (resume relies on it)."""
        raise NotImplementedError

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        """Per-sample metrics (higher is better), e.g. ``{"accuracy": 1.0}``."""
        raise NotImplementedError

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Task metrics from the per-sample rows (each has ``metrics``); default: the mean of each metric."""
        out: dict[str, float] = {}
        keys = sorted({k for r in rows for k in r.get("metrics", {})})
        for k in keys:
            vals = [r["metrics"][k] for r in rows if k in r.get("metrics", {})]
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def artifacts(self, rows: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        """Files (plots) written from the finished rows; logged to W&B as images when they are PNGs."""
        return []
