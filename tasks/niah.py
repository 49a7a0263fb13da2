"""Needle in a haystack (NIAH): one fact hidden at a chosen depth in a long context, then asked for.

The construction follows the two public references (this code is written anew, nothing is copied):

- Greg Kamradt's LLMTest_NeedleInAHaystack (github.com/gkamradt/LLMTest_NeedleInAHaystack,
  ``needlehaystack/llm_needle_haystack_tester.py``): read the essays of a folder (Paul Graham's by default),
  cycling through them until the longest context is covered; cut the haystack to the context length minus
  the needle's tokens with the target tokenizer; insert the needle at ``depth`` × haystack tokens, moved back
  to the nearest preceding sentence end (the reference walks back to a ``.`` token) — at depth 100 % it is
  appended; sweep a grid of context lengths × depths and plot accuracy as a depth × length heatmap.
- RULER's ``niah`` (github.com/hsiehjackson/RULER, ``scripts/data/synthetic/niah.py``): the "special magic
  number" needle with a 7-digit value, the repeated-sentence haystack (``type_haystack=repeat``: "The grass is
  green. The sky is blue. ...") used here when no folder is given, and exact string matching of the answer.

Differences worth knowing: essays are stripped and joined with a blank line (the reference concatenates the
raw files); a sentence end is ``.``, ``!`` or ``?`` (optionally followed by closing quotes/brackets)
followed by whitespace, found in the decoded text rather than as a token id; and the haystack budget is
re-tuned after the needle is inserted so that the final context never exceeds ``context_length`` tokens and
usually hits it exactly (re-tokenising the joins can move the count by a token or two). The reference also
reserves a ``final_context_length_buffer`` for the prompt around the context; here ``context_length`` counts
the context (haystack + needle) alone, and the harness adds the chat template and ``question`` around it.

The sample's ``context`` (what a prompt-compression method may compress) is the haystack with the needle;
its ``question`` is the retrieval question, after a blank line. Metrics per sample: ``accuracy`` (the answer
string occurs in the prediction, case-insensitive), ``answer_prefix`` (partial credit: the longest prefix of
the answer found) and ``rouge1_recall`` (see ``tokenbench.text_metrics``);
aggregates add per-length and per-depth means (``accuracy@len512``, ``accuracy@depth0.25``); the artifact
is ``niah_heatmap.png``.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_task
from tokenbench.task import Sample, Task
from tokenbench.text_metrics import answer_prefix, contains_answer, rouge1_recall

if TYPE_CHECKING:
    from tokenbench.models.base import LoadedModel

# RULER's "repeat" haystack (also the classic LLMTest filler): used when no haystack folder is given.
SYNTHETIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HEATMAP_NAME = "niah_heatmap.png"

# End of a sentence: terminal punctuation, optional closing quotes/brackets, then whitespace (not consumed).
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*(?=\s)")
_MAX_FIT_ROUNDS = 8  # re-tuning rounds of the haystack budget (it converges in one or two)


def depth_label(depth: float) -> str:
    """``0.25`` -> ``"0.25"``, ``1.0`` -> ``"1"``: the depth as it appears in sample ids and metric keys."""
    return f"{depth:g}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def sample_id(context_length: int, depth: float) -> str:
    return f"len{context_length}_depth{depth_label(depth)}"


@register_task("niah")
@dataclass
class NeedleInAHaystack(Task):
    """Retrieve one needle sentence hidden at each depth of haystacks of each context length."""

    families: ClassVar[tuple[str, ...]] = ("kv", "prompt")

    haystack_dir: Optional[str] = None  # folder of .txt files (e.g. PG essays); None: synthetic filler
    context_lengths: list[int] = field(default_factory=lambda: [256, 512])  # tokens of haystack + needle
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle position, 0..1
    needle: str = "The special magic number is 7192846."  # the sentence hidden in the haystack
    question: str = "What is the special magic number mentioned in the text above?"  # asked after the context
    answer: str = "7192846"  # expected answer; must occur in the needle
    max_new_tokens: int = 24  # generation budget per sample
    limit: Optional[int] = None  # keep only the first N samples of the length × depth grid

    def __post_init__(self) -> None:
        for name in ("needle", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise TokenbenchError(f"niah: {name} must be a non-empty string, got {value!r}")
        if not contains_answer(self.needle, self.answer):
            raise TokenbenchError(
                f"niah: answer {self.answer!r} does not occur in the needle {self.needle!r}"
            )
        self.context_lengths = self._check_lengths(self.context_lengths)
        self.depths = self._check_depths(self.depths)
        if not _positive_int(self.max_new_tokens):
            raise TokenbenchError(
                f"niah: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if self.limit is not None and not _positive_int(self.limit):
            raise TokenbenchError(f"niah: limit must be a positive integer or None, got {self.limit!r}")
        if self.haystack_dir is not None:
            self._haystack_files()  # path checks now, before any model loads

    # --- validation --------------------------------------------------------------------------------

    def _check_lengths(self, lengths: Any) -> list[int]:
        if not isinstance(lengths, (list, tuple)) or not lengths:
            raise TokenbenchError(
                f"niah: context_lengths must be a non-empty list of token counts, got {lengths!r}"
            )
        out = []
        # Every whitespace-separated word of the needle is at least one token: a tokenizer-free lower bound.
        needle_floor = len(self.needle.split())
        for n in lengths:
            if isinstance(n, float) and n.is_integer():
                n = int(n)
            if not _positive_int(n):
                raise TokenbenchError(f"niah: context lengths must be positive integers, got {n!r}")
            if n <= needle_floor:
                raise TokenbenchError(
                    f"niah: context length {n} leaves no room for a haystack: the needle alone is at least "
                    f"{needle_floor} tokens"
                )
            out.append(n)
        if len(set(out)) != len(out):
            raise TokenbenchError(f"niah: context_lengths has duplicates: {out}")
        return out

    def _check_depths(self, depths: Any) -> list[float]:
        if not isinstance(depths, (list, tuple)) or not depths:
            raise TokenbenchError(
                f"niah: depths must be a non-empty list of fractions in [0, 1], got {depths!r}"
            )
        out = []
        for d in depths:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
                raise TokenbenchError(
                    f"niah: depths must be fractions in [0, 1] (0 = start, 1 = end), got {d!r}"
                )
            out.append(float(d))
        labels = [depth_label(d) for d in out]
        if len(set(labels)) != len(labels):
            raise TokenbenchError(f"niah: depths has duplicates: {labels}")
        return out

    def _haystack_files(self) -> list[tuple[Path, str]]:
        """The folder's .txt files in sorted order with their text; every failure names the path."""
        folder = Path(str(self.haystack_dir)).expanduser()
        if not folder.exists():
            raise TokenbenchError(f"niah: haystack folder not found: {folder}")
        if not folder.is_dir():
            raise TokenbenchError(f"niah: haystack_dir is not a folder: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise TokenbenchError(f"niah: no .txt files in haystack folder {folder}")
        out = []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenbenchError(f"niah: cannot read haystack file {path}: {exc}") from None
            if not text.strip():
                raise TokenbenchError(f"niah: haystack file has no text: {path}")
            out.append((path, text.strip()))
        return out

    # --- samples -----------------------------------------------------------------------------------

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        tok = loaded.tokenizer
        if tok is None:
            raise TokenbenchError(
                "niah: the model has no tokenizer; context lengths are counted in its tokens"
            )

        def encode(text: str) -> list[int]:
            return list(tok.encode(text, add_special_tokens=False))

        def decode(ids: list[int]) -> str:
            # A cut through a multi-byte character decodes to U+FFFD at the end: drop that partial character.
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            return text.rstrip("\ufffd")

        needle_tokens = len(encode(self.needle))
        for n in self.context_lengths:
            if n <= needle_tokens + 1:
                raise TokenbenchError(
                    f"niah: context length {n} leaves no room for a haystack: "
                    f"the needle is {needle_tokens} tokens"
                )
        grid = [(n, d) for n in self.context_lengths for d in self.depths]
        if self.limit is not None:
            grid = grid[: self.limit]
        haystack_ids = encode(self._haystack_text(encode, max(n for n, _ in grid)))
        question = f"\n\n{self.question}"
        out = []
        for n, depth in grid:
            context, before, count = self._fit(haystack_ids, n, depth, needle_tokens, encode, decode)
            out.append(Sample(
                id=sample_id(n, depth),
                context=context,
                question=question,
                answer=self.answer,
                max_new_tokens=self.max_new_tokens,
                meta={
                    "context_length": n,
                    "depth": depth,
                    "context_tokens": count,
                    # where the needle really starts, as a fraction of the context's tokens (after snapping)
                    "needle_depth": round(len(encode(before)) / count, 4) if before else 0.0,
                },
            ))
        return out

    def _haystack_text(self, encode: Any, min_tokens: int) -> str:
        """Enough haystack text for ``min_tokens`` tokens (with a margin), cycling through the sources."""
        target = min_tokens + max(32, min_tokens // 20)
        if self.haystack_dir is None:
            sources = [SYNTHETIC_FILLER]
            sep = " "
        else:
            sources = [text for _, text in self._haystack_files()]
            sep = "\n\n"
        counts: dict[int, int] = {}  # tokens per source, counted only for the sources actually used
        pieces: list[str] = []
        total, i = 0, 0
        while total < target:
            j = i % len(sources)
            if j not in counts:
                counts[j] = max(1, len(encode(sources[j])))
            pieces.append(sources[j])
            total += counts[j] + 1
            i += 1
        text = sep.join(pieces)
        while len(encode(text)) < target:  # joins can merge tokens; top up (rarely needed)
            text += sep + sources[i % len(sources)]
            i += 1
        return text

    def _place(self, haystack: str, cut: int, depth: float) -> tuple[str, str]:
        """Insert the needle at the last sentence end <= char ``cut``; returns (context, text before it)."""
        if depth >= 1.0:
            before = haystack.rstrip()
            return f"{before} {self.needle}", f"{before} "
        ends = [m.end() for m in _SENTENCE_END.finditer(haystack)]
        k = bisect.bisect_right(ends, cut)
        if k == 0:  # no sentence ends before the cut: put the needle first (as the reference does)
            return f"{self.needle} {haystack.lstrip()}", ""
        pos = ends[k - 1]
        return f"{haystack[:pos]} {self.needle}{haystack[pos:]}", f"{haystack[:pos]} "

    def _fit(self, haystack_ids: list[int], length: int, depth: float, needle_tokens: int,
             encode: Any, decode: Any) -> tuple[str, str, int]:
        """Context of at most ``length`` tokens (usually exactly): haystack cut to a budget + needle."""
        budget = length - needle_tokens
        best: tuple[str, str, int] | None = None
        tried: set[int] = set()
        for _ in range(_MAX_FIT_ROUNDS):
            budget = max(1, min(budget, len(haystack_ids)))
            if budget in tried:
                break
            tried.add(budget)
            ids = haystack_ids[:budget]
            haystack = decode(ids)
            cut = len(decode(ids[: int(len(ids) * depth)])) if depth < 1.0 else len(haystack)
            context, before = self._place(haystack, cut, depth)
            count = len(encode(context))
            if count <= length and (best is None or count > best[2]):
                best = (context, before, count)
            if count == length:
                break
            budget += length - count
        if best is None:
            raise TokenbenchError(
                f"niah: cannot fit the needle into {length} tokens with this tokenizer; "
                "use longer context_lengths"
            )
        return best

    # --- scoring -----------------------------------------------------------------------------------

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        answer = str(sample.answer)
        prediction = prediction or ""
        return {
            "accuracy": contains_answer(prediction, answer),
            "rouge1_recall": rouge1_recall(prediction, answer),
            "answer_prefix": answer_prefix(prediction, answer),
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Overall means, then per context length (``metric@len512``) and per depth (``metric@depth0.25``)."""
        out = super().aggregate(rows)
        metrics = list(out)
        by_len: dict[int, list[dict]] = defaultdict(list)
        by_depth: dict[float, list[dict]] = defaultdict(list)
        for r in rows:
            meta = r.get("meta") or {}
            if "context_length" in meta:
                by_len[int(meta["context_length"])].append(r)
            if "depth" in meta:
                by_depth[float(meta["depth"])].append(r)
        for key, groups in (("len", by_len), ("depth", by_depth)):
            for value in sorted(groups):
                label = str(value) if key == "len" else depth_label(value)
                for m in metrics:
                    vals = [g["metrics"][m] for g in groups[value] if m in g.get("metrics", {})]
                    if vals:
                        out[f"{m}@{key}{label}"] = sum(vals) / len(vals)
        return out

    def artifacts(self, rows: list[dict[str, Any]], run_dir: Path) -> list[Path]:
        path = Path(run_dir) / HEATMAP_NAME
        plot_heatmap(rows, path)
        return [path]


def _title(rows: list[dict[str, Any]]) -> str:
    def one(key: str) -> str | None:
        values = sorted({str(r["meta"][key]) for r in rows if (r.get("meta") or {}).get(key) is not None})
        return ", ".join(values) if values else None

    model, method = one("model"), one("method")
    parts = [f"model: {model}" if model else None, f"method: {method}" if method else None]
    subtitle = " · ".join(p for p in parts if p)
    accs = [r["metrics"]["accuracy"] for r in rows if "accuracy" in r.get("metrics", {})]
    head = "Needle in a haystack: accuracy"
    if accs:
        head += f" (mean {sum(accs) / len(accs):.2f})"
    return f"{head}\n{subtitle}" if subtitle else head


def plot_heatmap(rows: list[dict[str, Any]], path: Path) -> Path:
    """Depth (y, 0 % at the top) × context length (x) heatmap of mean accuracy, values written in the cells.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Cells without a sample are
    grey and marked with a dash.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in rows:
        meta, metrics = r.get("meta") or {}, r.get("metrics") or {}
        if "context_length" in meta and "depth" in meta and "accuracy" in metrics:
            cells[(int(meta["context_length"]), float(meta["depth"]))].append(float(metrics["accuracy"]))
    lengths = sorted({n for n, _ in cells})
    depths = sorted({d for _, d in cells})
    grid = np.full((max(len(depths), 1), max(len(lengths), 1)), np.nan)
    for (n, d), vals in cells.items():
        grid[depths.index(d), lengths.index(n)] = sum(vals) / len(vals)

    cmap = colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    norm = Normalize(vmin=0.0, vmax=1.0)
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(min(3.4 + 0.75 * n_cols, 24), min(2.2 + 0.42 * n_rows, 18)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto",
                      interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    cbar.set_label("accuracy")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d * 100:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if n_cols > 8:
        ax.tick_params(axis="x", labelrotation=45)
    if n_rows * n_cols <= 400:
        size = 9 if n_rows * n_cols <= 100 else 6
        for i in range(len(depths)):
            for j in range(len(lengths)):
                v = grid[i, j]
                if np.isnan(v):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=size, color="#555555")
                    continue
                red, green, blue, _ = cmap(norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                        color="white" if dark else "black")
    ax.set_title(_title(rows), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
