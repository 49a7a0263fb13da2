"""Visual question answering: VQAv2, TextVQA, GQA and POPE as variants of one task, each with its official
metric (``tokenbench.tasks.vqa_metrics``).

Data, in the order tried:

- ``data``: a local JSONL file, one question per line: ``{"image": ..., "question": ..., "answers": [...]}``
  (VQAv2/TextVQA: the human answers, strings or ``{"answer": ...}`` dicts) or ``"answer"``/``"label"`` (GQA's
  gold answer, POPE's yes/no); optional ``"question_id"``. ``image`` is a path (relative paths are resolved
  against ``image_root``, default the JSONL's folder) or ``skimage:<name>`` (a photo shipped with
  scikit-image). ``data=demo`` is the built-in demo set: scikit-image photos with hand-written questions and
  answers (offline, for smoke runs; not a benchmark);
- otherwise the Hugging Face dataset of the variant (``hf_dataset``, ``hf_config``, ``split``; defaults:
  ``lmms-lab/VQAv2`` validation, ``lmms-lab/textvqa`` validation, ``lmms-lab/GQA``
  ``testdev_balanced_instructions`` testdev with its ``testdev_balanced_images``, ``lmms-lab/POPE`` test).
  With no hub (offline, or the dataset not cached) the demo set stands in, with a warning.

Prompt: the question, a newline and the short-answer instruction of LLaVA-1.5's evaluation ("Answer the
question using a single word or phrase.", the suffix of its VQAv2, GQA, TextVQA and POPE question files),
sent with the image through the model's processor and chat template by the runner. LLaVA's TextVQA files
can also carry "Reference OCR token" lines; those are not added here.

Per sample: ``accuracy`` (VQAv2: the official soft accuracy; TextVQA: LLaVA's m4c evaluator; GQA: exact
match; POPE: the yes/no extracted as LLaVA's ``eval_pope.py`` against the label) and, for POPE, ``yes``
(the extracted answer was yes). Aggregates: the mean accuracy (in [0, 1]); POPE adds precision, recall, F1
and the yes ratio over the run, as ``eval_pope.py`` reports them, and with a ``category`` per question
(adversarial / popular / random) the F1 and accuracy of each and LLaVA's mean F1 over them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_task
from tokenbench.task import Sample, Task
from tokenbench.tasks.vqa_metrics import (
    gqa_exact_match,
    pope_scores,
    pope_yes_no,
    textvqa_accuracy,
    vqa_accuracy,
)

if TYPE_CHECKING:
    from tokenbench.models.base import LoadedModel

log = logging.getLogger(__name__)

VARIANTS = ("vqav2", "textvqa", "gqa", "pope")
SHORT_ANSWER = "Answer the question using a single word or phrase."
HF_DEFAULTS = {  # variant -> (dataset id, config, split)
    "vqav2": ("lmms-lab/VQAv2", None, "validation"),
    "textvqa": ("lmms-lab/textvqa", None, "validation"),
    "gqa": ("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
    "pope": ("lmms-lab/POPE", None, "test"),
}

# The demo set: scikit-image photos, questions and ten answers written for this harness.
DEMO = [
    ("astronaut", "What is the woman wearing?",
     ["space suit"] * 5 + ["spacesuit"] * 3 + ["suit", "uniform"]),
    ("coffee", "What drink is in the cup?", ["coffee"] * 8 + ["latte", "cappuccino"]),
    ("chelsea", "What animal is this?", ["cat"] * 9 + ["kitten"]),
    ("rocket", "What is being launched?", ["rocket"] * 7 + ["spacecraft", "missile", "rocket launch"]),
    ("coins", "How many coins are there?", ["24"] * 6 + ["25", "25", "23", "20"]),
    ("camera", "Is this photo in color?", ["no"] * 10),
    ("astronaut", "How many people are in the picture?", ["1"] * 8 + ["one", "1 person"]),
    ("clock", "What object is this?", ["clock"] * 8 + ["wall clock", "clock face"]),
]
DEMO_POPE = [
    ("chelsea", "Is there a cat in the image?", "yes"),
    ("chelsea", "Is there a dog in the image?", "no"),
    ("coffee", "Is there a cup in the image?", "yes"),
    ("rocket", "Is there a car in the image?", "no"),
    ("astronaut", "Is there a person in the image?", "yes"),
    ("coins", "Is there a bird in the image?", "no"),
]


@dataclass
class VQASample(Sample):
    """A sample with its image (a PIL image, a path, ``skimage:<name>`` or a callable returning one); the image
    is not part of ``meta`` (which is written to ``samples.jsonl``)."""

    image: Any = field(default=None, repr=False)


def _answers(row: dict[str, Any]) -> list[str]:
    raw = row.get("answers")
    if raw is None:
        for key in ("answer", "label", "multiple_choice_answer"):
            if row.get(key) is not None:
                return [str(row[key])]
        return []
    if isinstance(raw, (str, int, float)):
        return [str(raw)]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in raw]


@register_task("vqa")
@dataclass
class VQA(Task):
    """VQAv2 / TextVQA / GQA / POPE with the official metric of each."""

    families: ClassVar[tuple[str, ...]] = ("vlm",)

    variant: str = "vqav2"  # vqav2 | textvqa | gqa | pope (decides the metric and the default dataset)
    data: str | None = None  # local JSONL file, or "demo"; None: the variant's Hugging Face dataset
    image_root: str | None = None  # folder for relative image paths of the JSONL (default: its folder)
    hf_dataset: str | None = None  # Hugging Face dataset id (None: the variant's default)
    hf_config: str | None = None  # its configuration (None: the variant's default)
    split: str | None = None  # its split (None: the variant's default)
    limit: int | None = None  # keep the first N questions
    max_new_tokens: int = 16  # generated tokens per answer at most
    instruction: str | None = None  # appended to the question after a newline; None: LLaVA's short-answer one
    chat_template: bool = True  # prompt through the processor's chat template

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise TokenbenchError(f"vqa: unknown variant '{self.variant}' (use {', '.join(VARIANTS)})")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise TokenbenchError(f"vqa: limit must be a positive integer or None, got {self.limit!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise TokenbenchError(f"vqa: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.data not in (None, "demo") and not Path(str(self.data)).expanduser().is_file():
            raise TokenbenchError(f"vqa: data file not found: {self.data}")

    # --- data ----------------------------------------------------------------------------------------------

    def rows(self) -> tuple[list[dict[str, Any]], str]:
        """Every question as ``{"id", "image", "question", "answers"}``, and where they came from."""
        if self.data == "demo":
            return self._demo(), "demo"
        if self.data is not None:
            return self._jsonl(Path(str(self.data)).expanduser()), f"file:{self.data}"
        try:
            return self._hf()
        except _HubUnavailable as exc:
            log.warning("vqa: %s; running the built-in demo set instead (task.data=<jsonl> for real data)", exc)
            return self._demo(), "demo"

    def _demo(self) -> list[dict[str, Any]]:
        if self.variant == "pope":
            return [{"id": f"demo-pope-{i}", "image": f"skimage:{img}", "question": q, "answers": [a]}
                    for i, (img, q, a) in enumerate(DEMO_POPE)]
        out = []
        for i, (img, q, answers) in enumerate(DEMO):
            keep = answers if self.variant in ("vqav2", "textvqa") else [Counter(answers).most_common(1)[0][0]]
            out.append({"id": f"demo-{i}", "image": f"skimage:{img}", "question": q, "answers": keep})
        return out

    def _jsonl(self, path: Path) -> list[dict[str, Any]]:
        root = Path(str(self.image_root)).expanduser() if self.image_root else path.parent
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokenbenchError(f"vqa: {path}:{n + 1} is not JSON ({exc.msg})") from None
                missing = [k for k in ("image", "question") if not row.get(k)]
                answers = _answers(row)
                if missing or not answers:
                    what = ", ".join(missing + ([] if answers else ["answers/answer/label"]))
                    raise TokenbenchError(f"vqa: {path}:{n + 1} lacks {what}")
                image = str(row["image"])
                if not image.startswith("skimage:") and not Path(image).is_absolute():
                    image = str(root / image)
                out.append({"id": str(row.get("question_id", n)), "image": image, "question": row["question"],
                            "answers": answers, "category": row.get("category")})
        if not out:
            raise TokenbenchError(f"vqa: {path} has no questions")
        return out

    def _hf(self) -> tuple[list[dict[str, Any]], str]:
        from tokenbench.models.hf_utils import hub_offline, hub_reachable

        name, config, split = HF_DEFAULTS[self.variant]
        name, config, split = self.hf_dataset or name, self.hf_config or config, self.split or split
        try:
            import datasets
        except ImportError:
            raise TokenbenchError("vqa: the 'datasets' package is missing (pip install datasets), or pass "
                                  "task.data=<jsonl>") from None
        offline = hub_offline() or not hub_reachable()
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # noqa: BLE001  (datasets raises many kinds; all become one line)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if offline:
                raise _HubUnavailable(f"the hub is unreachable and {name} is not cached ({first})") from None
            raise TokenbenchError(f"vqa: cannot load {name} ({config}, {split}): {first}") from None
        n = len(ds) if self.limit is None else min(self.limit, len(ds))
        images = None
        if self.variant == "gqa" and "image" not in ds.column_names:  # GQA keeps images in their own config
            img_ds = datasets.load_dataset(name, config.replace("instructions", "images"), split=split)
            index = {iid: i for i, iid in enumerate(img_ds["id"])}
            images = (img_ds, index)
        info = ds.remove_columns([c for c in ds.column_names if c == "image"])  # no image decoding here
        rows = []
        for i in range(n):
            row = info[i]
            if images is not None:
                img_ds, index = images
                image = (lambda j=index[row["imageId"]], d=img_ds: d[j]["image"])
            else:
                image = (lambda j=i, d=ds: d[j]["image"])
            qid = row.get("question_id", row.get("questionId", row.get("id", i)))
            rows.append({"id": str(qid), "image": image, "question": row["question"], "answers": _answers(row),
                         "category": row.get("category")})
        return rows, f"hub:{name}"

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        rows, source = self.rows()
        if self.limit is not None:
            rows = rows[: self.limit]
        instruction = SHORT_ANSWER if self.instruction is None else self.instruction
        out: list[Sample] = []
        for r in rows:
            answers = r["answers"]
            majority = Counter(answers).most_common(1)[0][0]
            prompt = r["question"] + (f"\n{instruction}" if instruction else "")
            image = r["image"]
            meta = {"variant": self.variant, "answers": answers, "source": source,
                    "image": image if isinstance(image, str) else None, "raw_question": r["question"]}
            if r.get("category") is not None:
                meta["category"] = str(r["category"])
            out.append(VQASample(id=f"{self.variant}-{r['id']}", question=prompt, answer=majority,
                                 max_new_tokens=self.max_new_tokens, meta=meta, image=image))
        ids = [s.id for s in out]
        if len(set(ids)) != len(ids):  # question ids repeat across files merged by hand: number them
            for i, s in enumerate(out):
                s.id = f"{s.id}-{i}"
        return out

    # --- metrics -------------------------------------------------------------------------------------------

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        answers = sample.meta.get("answers") or [sample.answer]
        if self.variant == "vqav2":
            return {"accuracy": vqa_accuracy(prediction, answers)}
        if self.variant == "textvqa":
            return {"accuracy": textvqa_accuracy(prediction, answers)}
        if self.variant == "gqa":
            return {"accuracy": gqa_exact_match(prediction, answers[0])}
        said = pope_yes_no(prediction)
        return {"accuracy": float(said == _pope_label(answers[0])), "yes": float(said == "yes")}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        if self.variant == "pope" and rows:
            def scores(part: list[dict[str, Any]]) -> dict[str, float]:
                said = ["yes" if r["metrics"].get("yes") else "no" for r in part]
                labels = [_pope_label(r.get("answer")) for r in part]
                return pope_scores(said, labels)

            out.update(scores(rows))
            out.pop("yes", None)
            cats = sorted({str((r.get("meta") or {}).get("category")) for r in rows
                           if (r.get("meta") or {}).get("category") is not None})
            if cats:  # POPE's adversarial / popular / random splits, and LLaVA's mean F1 over them
                for cat in cats:
                    part = scores([r for r in rows if str((r.get("meta") or {}).get("category")) == cat])
                    out[f"f1@{cat}"], out[f"accuracy@{cat}"] = part["f1"], part["accuracy"]
                out["f1_mean_categories"] = sum(out[f"f1@{c}"] for c in cats) / len(cats)
        return out


def _pope_label(answer: Any) -> str:
    """A POPE label as ``yes``/``no`` (anything but "no" is a yes, as the reference reads its labels)."""
    return "no" if str(answer).strip().lower() == "no" else "yes"


class _HubUnavailable(Exception):
    pass
