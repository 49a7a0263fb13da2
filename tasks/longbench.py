"""LongBench (v1) and LongBench-E with the official protocol (Bai et al., "LongBench: A Bilingual, Multitask
Benchmark for Long Context Understanding", ACL 2024, arXiv:2308.14508).

Reference: THUDM/LongBench, ``LongBench/pred.py``, ``LongBench/eval.py``, ``LongBench/metrics.py`` and
``LongBench/config/dataset2prompt.json`` / ``dataset2maxlen.json``. The prompt templates and generation
lengths below are the official configuration values (they define the protocol, so they are reproduced
exactly); the code is written anew.

The protocol, step by step, as ``pred.py`` runs it:

1. the prompt is the task's template filled with the sample's ``context`` and ``input``;
2. it is tokenised with the target model's tokenizer (``tokenizer(prompt)``, default special tokens); when it
   has more than ``max_length`` tokens it is cut in the middle: the first ``int(max_length / 2)`` and the last
   ``int(max_length / 2)`` tokens are decoded (``skip_special_tokens=True``) and joined;
3. the model's chat template is applied, except for the few-shot and code tasks (trec, triviaqa, samsum,
   lsht, lcc, repobench-p), which chat models do better without (the official skip list);
4. greedy decoding for the task's maximum number of new tokens;
5. scoring (``eval.py``): the first line only for trec, triviaqa, samsum and lsht, the task's metric
   (``tokenbench.tasks.longbench_metrics``), the best over the sample's answers; per task the mean × 100
   rounded to two decimals; LongBench-E also per length interval of the sample's ``length`` field
   (0-4k, 4-8k, 8k+).

Context and question. The runner builds the user message as ``context + question`` and compresses only the
context. The filled template is split where the template's ``{context}`` ends: ``context`` is the
instruction before it plus the document(s), ``question`` the text after it (the question and the answer cue,
e.g. ``"\\n\\nNow, answer the question ...\\n\\nQuestion: ...\\nAnswer:"``), so ``context + question`` is
exactly the official (truncated) prompt. After a middle truncation the tail normally survives unchanged; in
the rare case where it does not (a tail longer than half of ``max_length``), the split is at the truncation
point and ``meta["split"]`` says so. ``meta["instruction_chars"]`` is the length of the instruction at the
start of ``context`` (a prompt compressor may keep it).

Data. From a folder of the official JSONL files (``<task>.jsonl`` and ``<task>_e.jsonl``, as in the
``data.zip`` of the hub repository ``THUDM/LongBench``), or, with ``data_dir`` unset, from the hub: the
repository's ``data.zip`` through ``huggingface_hub`` (its loading script, which ``pred.py`` runs through
``datasets.load_dataset``, reads the same files, and ``datasets`` 4 no longer runs scripts); a hub id without
a ``data.zip`` (a Parquet mirror) is read with ``datasets.load_dataset(hub_id, task, split="test")``. Without
the hub an offline copy stands in when there is one: ``$TOKENBENCH_LONGBENCH_DIR``, else
``../shared/data/longbench`` beside the repository. With ``tasks`` unset, every task the source has is run
(all 21, or the 13 of LongBench-E), in the official order.

Differences from ``pred.py`` worth knowing: the chat template is the tokenizer's own (``build_chat`` has
model-specific formats for the models of the paper); samsum's extra stop token (a newline) and
``min_length`` are not reproduced (its prediction is cut to the first line before scoring anyway); the
runner strips the decoded prediction, which for lcc/repobench-p loses the indentation of the predicted line
(the official code keeps it).

Metrics. Per sample ``score`` (the official score in [0, 1]). Aggregates: ``<task>`` (× 100, two decimals, as
``eval.py`` prints them), ``avg`` (the mean over tasks: the headline number), ``avg@<category>`` (the paper's
six categories), ``score`` (the mean over all samples, in [0, 1]); LongBench-E adds ``<task>@<interval>`` and
``avg@<interval>`` (the mean over tasks per length interval).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_task
from tokenbench.task import Sample, Task
from tokenbench.tasks.longbench_metrics import base_name, length_bucket, score_sample

if TYPE_CHECKING:
    from tokenbench.models.base import LoadedModel

log = logging.getLogger(__name__)

HUB_ID = "THUDM/LongBench"
OFFLINE_ENV = "TOKENBENCH_LONGBENCH_DIR"
# The workplace's offline copy (three tasks), beside the repository: <repo>/../shared/data/longbench.
SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"

# pred.py's dataset lists, in the official order.
DATASETS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
DATASETS_E = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

# Tasks run without the chat template (pred.py: "chat models are better off without build prompts on these").
NO_CHAT_TEMPLATE = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")

# The paper's six categories (README, "Evaluation Result on Each Dataset").
CATEGORIES = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}

# config/dataset2maxlen.json: maximum new tokens per task.
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

# config/dataset2prompt.json: the official templates, verbatim (typos such as "asconcisely" included).
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",  # noqa: E501
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",  # noqa: E501
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

CHAT_TEMPLATE_RULES = ("official", "always", "never")


def category_of(dataset: str) -> str:
    name = base_name(dataset)
    return next(cat for cat, members in CATEGORIES.items() if name in members)


def split_prompt(template: str, row: dict[str, Any]) -> tuple[str, str, str]:
    """``(prompt, instruction, tail)``: the filled template, the text before ``{context}`` and the text after."""
    head, rest = template.split("{context}", 1)
    fields = {"context": row.get("context") or "", "input": row.get("input") or ""}
    return template.format(**fields), head.format(**fields), rest.format(**fields)


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> tuple[str, int, Optional[int]]:
    """pred.py's truncation: ``(prompt, tokens before, characters of the first half or None if not cut)``."""
    ids = list(tokenizer(prompt, truncation=False)["input_ids"])
    if len(ids) <= max_length:
        return prompt, len(ids), None
    half = int(max_length / 2)
    first = tokenizer.decode(ids[:half], skip_special_tokens=True)
    last = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return first + last, len(ids), len(first)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _read_jsonl(lines: Any, where: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise TokenbenchError(f"longbench: {where} line {i} is not JSON: {exc}") from None
    return rows


@register_task("longbench")
@dataclass
class LongBench(Task):
    """The 21 LongBench tasks (or the 13 of LongBench-E) with the official prompts, truncation and metrics."""

    families: ClassVar[tuple[str, ...]] = ("kv", "prompt")
    primary_metric: ClassVar[str] = "avg"

    tasks: Optional[list[str]] = None  # LongBench task names; None: every task the source has, official order
    data_dir: Optional[str] = None  # folder of the official <task>.jsonl files; None: the hub (offline copy as fallback)
    hub_id: str = HUB_ID  # hub dataset repository read when data_dir is None
    longbench_e: bool = False  # LongBench-E: the <task>_e files and per-length-interval scores
    max_length: int = 3500  # prompt tokens (target tokenizer) above which the prompt is cut in the middle
    limit: Optional[int] = None  # samples per task (None: all)
    seed: Optional[int] = None  # None: the first `limit` samples of each task; an int: a seeded random subset
    use_chat_template: str = "official"  # official (skip for trec/triviaqa/samsum/lsht/lcc/repobench-p) | always | never
    max_new_tokens: Optional[int] = None  # None: the official per-task value (dataset2maxlen.json)

    def __post_init__(self) -> None:
        known = DATASETS_E if self.longbench_e else DATASETS
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)) or not self.tasks:
                raise TokenbenchError(f"longbench: tasks must be a non-empty list of task names, got {self.tasks!r}")
            names = [base_name(str(t)) for t in self.tasks]
            unknown = [t for t in names if t not in known]
            if unknown:
                which = "LongBench-E" if self.longbench_e else "LongBench"
                raise TokenbenchError(f"longbench: unknown {which} task(s) {unknown}; tasks are {', '.join(known)}")
            if len(set(names)) != len(names):
                raise TokenbenchError(f"longbench: tasks has duplicates: {names}")
            self.tasks = names
        if not _positive_int(self.max_length) or self.max_length < 2:
            raise TokenbenchError(f"longbench: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.limit is not None and not _positive_int(self.limit):
            raise TokenbenchError(f"longbench: limit must be a positive integer or None, got {self.limit!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TokenbenchError(f"longbench: seed must be an integer or None, got {self.seed!r}")
        if self.use_chat_template not in CHAT_TEMPLATE_RULES:
            raise TokenbenchError(f"longbench: use_chat_template must be one of {', '.join(CHAT_TEMPLATE_RULES)}, "
                                  f"got {self.use_chat_template!r}")
        if self.max_new_tokens is not None and not _positive_int(self.max_new_tokens):
            raise TokenbenchError(
                f"longbench: max_new_tokens must be a positive integer or None, got {self.max_new_tokens!r}")
        if self.data_dir is not None:
            folder = Path(str(self.data_dir)).expanduser()
            if not folder.is_dir():
                raise TokenbenchError(f"longbench: data folder not found: {folder}")

    # --- data --------------------------------------------------------------------------------------

    def file_name(self, task: str) -> str:
        return f"{task}_e.jsonl" if self.longbench_e else f"{task}.jsonl"

    def _task_list(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else list(DATASETS_E if self.longbench_e else DATASETS)

    def _folder_tasks(self, folder: Path) -> list[str]:
        """The requested tasks in the folder; an explicit task without its file is an error naming the folder."""
        wanted = self._task_list()
        present = [t for t in wanted if (folder / self.file_name(t)).is_file()]
        if self.tasks is not None:
            missing = [t for t in wanted if t not in present]
            if missing:
                raise TokenbenchError(
                    f"longbench: no {', '.join(self.file_name(t) for t in missing)} in {folder} "
                    f"(it has: {', '.join(sorted(p.name for p in folder.glob('*.jsonl'))) or 'no .jsonl files'})")
        if not present:
            raise TokenbenchError(f"longbench: no LongBench{'-E' if self.longbench_e else ''} task files in {folder}")
        return present

    def load_rows(self) -> tuple[dict[str, list[dict[str, Any]]], str]:
        """Every requested task's rows in file order, and where they came from."""
        if self.data_dir is not None:
            folder = Path(str(self.data_dir)).expanduser()
            return self._read_folder(folder), f"dir:{folder}"
        try:
            return {t: self._read_hub(t) for t in self._task_list()}, f"hub:{self.hub_id}"
        except _HubUnavailable as exc:
            folder = self._offline_copy()
            if folder is None:
                raise TokenbenchError(
                    f"longbench: {exc}, and no offline copy (set ${OFFLINE_ENV} or task.data_dir to a folder of "
                    "the official JSONL files)") from None
            log.warning("longbench: %s; reading the offline copy in %s", exc, folder)
            return self._read_folder(folder), f"dir:{folder}"

    def _read_folder(self, folder: Path) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for task in self._folder_tasks(folder):
            path = folder / self.file_name(task)
            try:
                with path.open(encoding="utf-8") as f:
                    out[task] = _read_jsonl(f, str(path))
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenbenchError(f"longbench: cannot read {path}: {exc}") from None
        return out

    def _offline_copy(self) -> Optional[Path]:
        for candidate in (os.environ.get(OFFLINE_ENV), SHARED_COPY):
            if candidate and Path(candidate).is_dir():
                return Path(candidate)
        return None

    def _read_hub(self, task: str) -> list[dict[str, Any]]:
        """One task from the hub: ``data.zip`` of the repository, else ``datasets`` (Parquet mirrors)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        from tokenbench.models.hf_utils import hub_reachable

        try:  # already in the Hugging Face cache: no network needed
            archive = hf_hub_download(self.hub_id, "data.zip", repo_type="dataset", local_files_only=True)
        except (LocalEntryNotFoundError, EntryNotFoundError, OSError):
            archive = None
        if archive is None:
            if not hub_reachable():
                raise _HubUnavailable(f"the hub is not reachable for {self.hub_id}")
            try:
                archive = hf_hub_download(self.hub_id, "data.zip", repo_type="dataset")
            except EntryNotFoundError:
                return self._read_datasets(task)
        import zipfile

        name = f"data/{self.file_name(task)}"
        with zipfile.ZipFile(archive) as zf:
            if name not in zf.namelist():
                raise TokenbenchError(f"longbench: {name} is not in {self.hub_id}'s data.zip")
            with zf.open(name) as f:
                return _read_jsonl(f, f"{self.hub_id}:{name}")

    def _read_datasets(self, task: str) -> list[dict[str, Any]]:
        try:
            import datasets
        except ImportError:
            raise TokenbenchError(f"longbench: {self.hub_id} has no data.zip; reading it needs `pip install "
                                  "datasets`") from None
        config = f"{task}_e" if self.longbench_e else task
        return [dict(r) for r in datasets.load_dataset(self.hub_id, config, split="test")]

    def _select(self, n: int) -> list[int]:
        if self.limit is None or self.limit >= n:
            return list(range(n))
        if self.seed is None:
            return list(range(self.limit))
        return sorted(random.Random(self.seed).sample(range(n), self.limit))

    # --- samples -----------------------------------------------------------------------------------

    def _chat_template(self, task: str) -> bool:
        if self.use_chat_template == "official":
            return task not in NO_CHAT_TEMPLATE
        return self.use_chat_template == "always"

    def build_sample(self, tokenizer: Any, task: str, row: dict[str, Any], source: str = "") -> Sample:
        """One sample with the official (possibly truncated) prompt split into context and question."""
        dataset = f"{task}_e" if self.longbench_e else task
        prompt, instruction, tail = split_prompt(PROMPTS[task], row)
        text, n_tokens, cut = truncate_middle(tokenizer, prompt, self.max_length)
        split = "template"
        if cut is None or (text.endswith(tail) and len(text) - len(tail) >= cut):
            context, question = text[: len(text) - len(tail)], tail
        else:  # the tail itself was cut: split where the two halves meet
            context, question, split = text[:cut], text[cut:], "truncation_point"
        answers = row.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        return Sample(
            id=f"{dataset}/{row.get('_id')}",
            context=context,
            question=question,
            answer=list(answers or []),
            max_new_tokens=self.max_new_tokens or MAX_NEW_TOKENS[task],
            meta={
                "dataset": dataset,
                "category": category_of(task),
                "language": row.get("language"),
                "length": row.get("length"),
                "all_classes": row.get("all_classes"),
                "prompt_tokens": n_tokens,  # of the untruncated prompt, as pred.py counts them
                "truncated": cut is not None,
                "split": split,
                "instruction_chars": len(instruction),
                "chat_template": self._chat_template(task),
                "source": source,
            },
        )

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        tok = loaded.tokenizer
        if tok is None:
            raise TokenbenchError("longbench: the model has no tokenizer; truncation is measured in its tokens")
        rows_by_task, source = self.load_rows()
        out: list[Sample] = []
        for task, rows in rows_by_task.items():
            for i in self._select(len(rows)):
                out.append(self.build_sample(tok, task, rows[i], source))
        ids = [s.id for s in out]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
            raise TokenbenchError(f"longbench: duplicate sample ids (_id) in the data: {dup}")
        return out

    # --- scoring -----------------------------------------------------------------------------------

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        answers = sample.answer if isinstance(sample.answer, (list, tuple)) else [str(sample.answer)]
        dataset = sample.meta.get("dataset") or sample.id.split("/", 1)[0]
        return {"score": score_sample(dataset, prediction or "", answers, sample.meta.get("all_classes"))}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        by_task: dict[str, list[float]] = defaultdict(list)
        by_bucket: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            meta, value = r.get("meta") or {}, (r.get("metrics") or {}).get("score")
            if value is None:
                continue
            dataset = meta.get("dataset") or str(r.get("sample_id", "")).split("/", 1)[0]
            by_task[dataset].append(float(value))
            if dataset.endswith("_e") and isinstance(meta.get("length"), (int, float)):
                by_bucket[dataset][length_bucket(int(meta["length"]))].append(float(value))
        if not by_task:
            return {}
        order = {name: i for i, name in enumerate(DATASETS)}
        tasks = sorted(by_task, key=lambda d: order.get(base_name(d), len(order)))
        per_task = {t: round(100 * fmean(by_task[t]), 2) for t in tasks}
        out: dict[str, float] = {"avg": round(fmean(per_task.values()), 2),
                                 "score": fmean(v for t in tasks for v in by_task[t])}
        out.update(per_task)
        for cat in CATEGORIES:
            members = [per_task[t] for t in tasks if category_of(t) == cat]
            if members:
                out[f"avg@{cat}"] = round(fmean(members), 2)
        bucket_scores: dict[str, list[float]] = defaultdict(list)
        for t in tasks:
            for bucket in ("0-4k", "4-8k", "8k+"):
                vals = by_bucket[t].get(bucket) if t in by_bucket else None
                if vals:
                    out[f"{t}@{bucket}"] = round(100 * fmean(vals), 2)
                    bucket_scores[bucket].append(out[f"{t}@{bucket}"])
        for bucket, vals in bucket_scores.items():
            out[f"avg@{bucket}"] = round(fmean(vals), 2)
        return out


class _HubUnavailable(Exception):
    """The hub cannot be reached (offline mode, no network) and nothing is cached."""
