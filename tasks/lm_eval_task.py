"""Any lm-evaluation-harness task under any KV method: ``task=lm_eval task.tasks=[...]``.

Reference: EleutherAI/lm-evaluation-harness (``lm_eval/api/model.py``: the ``LM`` interface and
``register_model``; ``lm_eval/evaluator.py``: ``simple_evaluate``/``evaluate``, whose steps are followed here;
``lm_eval/models/huggingface.py``: how a causal LM answers the three request types; ``lm_eval/utils.py``:
the rolling windows). Written anew against that interface.

The model. ``TokenbenchLM`` (registered in lm-eval as ``tokenbench``; ``tokenbench_lm_class()`` returns the
class) wraps an ``LMRunner``, so every request goes through the run's model with its KV method applied:

- ``loglikelihood``: the pair is tokenised as lm-eval's HF backend does (trailing spaces of the context move to
  the continuation; the continuation's tokens are those of ``context + continuation`` after the context's; an
  empty context becomes the prefix token, BOS or else EOS), cut to the last ``max_length`` tokens, and scored by
  ``LMRunner.loglikelihood`` (the context is the compressed, query-agnostic prefill);
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens (``context_len=1``),
  the log-likelihoods summed;
- ``generate_until``: greedy generation with the runner (measured like any sample), at most ``max_gen_toks``
  tokens (the request's, else ``max_gen_toks`` of the task config), the context cut to its last
  ``max_length - max_gen_toks`` tokens, the text cut at the first stop string (and at EOS). Sampling requests
  (``do_sample``) are answered greedily, with a warning.

It also works on its own: ``lm_eval.simple_evaluate(model=tokenbench_lm_class()(runner), tasks=[...])``.

The pipeline. One sample per lm-eval *document* (not per request): its id is ``<task>/<doc_id>``, so a
resumed run skips whole documents, each JSONL row holds one document's responses and metrics, and the
per-document metrics are exactly the values lm-eval's ``process_results`` gives. ``samples()`` builds the
requests the way ``evaluate`` does (``build_all_requests`` with ``limit``, ``num_fewshot``, the few-shot seed,
``apply_chat_template``, ``fewshot_as_multiturn``, ``system_instruction``); ``run_sample`` answers one
document's requests (the run pipeline calls it instead of ``runner.run``); the prediction recorded is the
generated text for a document with one generation request, else the JSON list of every request's responses
(``[loglikelihood, is_greedy]`` pairs, rolling log-likelihoods, texts); ``score`` applies the task's filters and
``process_results``; ``aggregate`` recomputes the per-document results from the recorded predictions and applies
the task's own aggregation functions (so corpus-level metrics such as perplexity or BLEU are right too).

Metrics: ``<task>/<metric>`` for lm-eval's ``none`` filter and ``<task>/<metric>,<filter>`` otherwise, the
names and values lm-eval reports. Per-document values that are not numbers (the ``(loglikelihood, words)``
pairs of perplexities) appear only in the aggregate. lm-eval marks some metrics lower-is-better (perplexity,
bits per byte): their values are lm-eval's, not negated. Group scores (e.g. the ``mmlu`` average) are not
computed; the subtasks' are.

Latency and memory of a document: a generation request records the runner's measurements; log-likelihood
requests record ``e2e_ms`` (the wall time of all the document's requests), the tokens scored, and no memory or
compression figures (``LMRunner.loglikelihood`` returns none).

The chat template: lm-eval applies it itself when ``apply_chat_template`` is set (with the model's template),
so the samples ask the runner for none.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_task
from tokenbench.task import Sample, Task

if TYPE_CHECKING:
    from tokenbench.models.base import LoadedModel

log = logging.getLogger(__name__)

# The built-in demo task (a few capital-city questions, generated answers, exact match): runs offline.
DEMO_TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend default


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise TokenbenchError("lm_eval: the task needs lm-evaluation-harness: pip install 'tokenbench[lm-eval]'") \
            from None
    return lm_eval


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _number(value: Any) -> Optional[float]:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


@lru_cache(maxsize=None)
def tokenbench_lm_class() -> type:
    """The lm-eval model class of tokenbench (registered in lm-eval as ``tokenbench``), built on first use so
    that importing this module does not import lm-eval."""
    _require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class TokenbenchLM(LM):
        """An lm-eval model backed by a tokenbench ``LMRunner`` (the model with its KV method)."""

        def __init__(self, runner: Any = None, tokenizer: Any = None, max_length: Optional[int] = None,
                     max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
            super().__init__()
            self.runner = runner
            self.tokenizer = tokenizer if tokenizer is not None else getattr(runner, "tokenizer", None)
            if self.tokenizer is None:
                raise TokenbenchError("lm_eval: the model has no tokenizer")
            config = getattr(getattr(runner, "model", None), "config", None)
            self.max_length = int(max_length or getattr(config, "max_position_embeddings", 0) or 2048)
            self.max_gen_toks = int(max_gen_toks)
            self.outputs: list[Any] = []  # GenerationOutput of each generate_until request, in order
            self.scored_tokens = 0  # context + continuation tokens of the log-likelihood requests
            self.context_tokens = 0

        # --- tokens --------------------------------------------------------------------------------

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "") or "tokenizer").replace("/", "__")

        @property
        def prefix_token_id(self) -> int:
            for tid in (getattr(self.tokenizer, "bos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
                if tid is not None:
                    return int(tid)
            raise TokenbenchError("lm_eval: the tokenizer has neither BOS nor EOS for an empty context")

        def tok_encode(self, text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if context == "":
                return [self.prefix_token_id], self.tok_encode(continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tok_encode(context + continuation)
            ctx = self.tok_encode(context)
            return ctx, whole[len(ctx):]

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            text = self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
            return text[0] if isinstance(text, list) else text

        def chat_template(self, chat_template: Any = False) -> Optional[str]:
            return getattr(self.tokenizer, "chat_template", None)

        # --- requests ------------------------------------------------------------------------------

        def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            if not cont:
                return 0.0, True
            whole = ctx + cont
            if len(whole) > self.max_length + 1:  # the model sees at most max_length tokens, as in lm-eval
                whole = whole[-(self.max_length + 1):]
                n_ctx = max(1, len(whole) - len(cont))
                ctx, cont = whole[:n_ctx], whole[n_ctx:]
            self.scored_tokens += len(ctx) + len(cont)
            self.context_tokens += len(ctx)
            ll, greedy = self.runner.loglikelihood(ctx, cont)
            return float(ll), bool(greedy)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            out = []
            for req in requests:
                context, continuation = req.args
                result = self._score(*self.encode_pair(context, continuation))
                self.cache_hook.add_partial("loglikelihood", req.args, result)
                out.append(result)
            return out

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                (text,) = req.args
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
            return out

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            from tokenbench.task import Sample as _Sample

            out = []
            for req in requests:
                context, gen_kwargs = req.args
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                eos = getattr(self.tokenizer, "eos_token", None)
                if eos and eos not in until:
                    until.append(eos)
                max_new = int(kwargs.pop("max_gen_toks", None) or self.max_gen_toks)
                if kwargs.get("do_sample"):
                    log.warning("lm_eval: do_sample requested; tokenbench decodes greedily")
                ids = self.tok_encode(context)
                room = max(1, self.max_length - max_new)
                if len(ids) > room:
                    context = self.tokenizer.decode(ids[-room:], skip_special_tokens=False)
                sample = _Sample(id="lm_eval", context=context, question="", max_new_tokens=max_new)
                result = self.runner.run(sample, use_chat_template=False)
                self.outputs.append(result)
                text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", req.args, text)
                out.append(text)
            return out

    register_model("tokenbench")(TokenbenchLM)
    return TokenbenchLM


@register_task("lm_eval")
@dataclass
class LMEval(Task):
    """lm-evaluation-harness tasks run through the run's model and KV method, one sample per document."""

    families: ClassVar[tuple[str, ...]] = ("kv",)

    tasks: list[str] = field(default_factory=lambda: ["tokenbench_capitals"])  # lm-eval task (or group) names
    include_path: Optional[str] = None  # extra folder of lm-eval task YAMLs (local tasks)
    limit: Optional[int] = None  # documents per task (None: all)
    num_fewshot: Optional[int] = None  # None: the task's own default (0 if it has none)
    fewshot_seed: int = 1234  # lm-eval's default fewshot_random_seed
    apply_chat_template: bool = False  # lm-eval formats the prompts with the model's chat template
    fewshot_as_multiturn: bool = False  # few-shot examples as chat turns (with apply_chat_template)
    system_instruction: Optional[str] = None  # a system message for every prompt
    max_length: Optional[int] = None  # tokens of context the model sees; None: the model's max_position_embeddings
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS  # generation budget when a task does not set one

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise TokenbenchError(f"lm_eval: tasks must be a non-empty list of lm-eval task names, got {self.tasks!r}")
        for name, value, low in (("limit", self.limit, 1), ("num_fewshot", self.num_fewshot, 0),
                                 ("max_length", self.max_length, 2)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise TokenbenchError(f"lm_eval: {name} must be an integer >= {low} or None, got {value!r}")
        if isinstance(self.max_gen_toks, bool) or not isinstance(self.max_gen_toks, int) or self.max_gen_toks < 1:
            raise TokenbenchError(f"lm_eval: max_gen_toks must be a positive integer, got {self.max_gen_toks!r}")
        if self.include_path is not None:
            path = Path(str(self.include_path)).expanduser()
            if not path.exists():
                raise TokenbenchError(f"lm_eval: include_path not found: {path}")
        self._tasks: dict[str, Any] = {}
        self._docs: dict[str, tuple[str, Any, list[Any]]] = {}  # sample id -> (task name, doc, instances)
        self._lms: dict[int, Any] = {}

    # --- tasks and requests --------------------------------------------------------------------------

    def _paths(self) -> list[str]:
        paths = [str(DEMO_TASKS_DIR)]
        if self.include_path is not None:
            paths.append(str(Path(str(self.include_path)).expanduser()))
        return paths

    def load_tasks(self) -> dict[str, Any]:
        """The lm-eval task objects, configured as ``simple_evaluate`` configures them. lm-eval's own index
        (thousands of YAML files, seconds) is built only when a name is not in the local folders."""
        if self._tasks:
            return self._tasks
        _require_lm_eval()
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=self._paths(), include_defaults=False)
        if any(name not in manager.all_tasks for name in self.tasks):
            manager = TaskManager(include_path=self._paths())
        unknown = [name for name in self.tasks if name not in manager.all_tasks]
        if unknown:
            import difflib

            hints = [m for n in unknown for m in difflib.get_close_matches(n, manager.all_tasks, n=1)]
            hint = f" Did you mean {', '.join(hints)}?" if hints else ""
            raise TokenbenchError(f"lm_eval: unknown lm-eval task(s) {unknown}.{hint}")
        loaded = manager.load(list(self.tasks)) if hasattr(manager, "load") else None
        if loaded is not None:
            tasks = loaded["tasks"]
        else:  # lm-eval before TaskManager.load
            from lm_eval.tasks import get_task_dict

            tasks = _flatten(get_task_dict(list(self.tasks), manager))
        for name, task in tasks.items():
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.fewshot_seed)
        self._tasks = dict(tasks)
        return self._tasks

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        tok = loaded.tokenizer
        if tok is None:
            raise TokenbenchError("lm_eval: the model has no tokenizer")
        lm = tokenbench_lm_class()(runner=None, tokenizer=tok, max_length=self.max_length or 2048)
        out: list[Sample] = []
        self._docs.clear()
        for name, task in self.load_tasks().items():
            task.build_all_requests(
                limit=self.limit, rank=0, world_size=1, system_instruction=self.system_instruction,
                apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn,
                chat_template=lm.apply_chat_template if self.apply_chat_template else None,
                tokenizer_name=lm.tokenizer_name if self.apply_chat_template else "")
            by_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:
                by_doc[inst.doc_id].append(inst)
            for doc_id in sorted(by_doc):
                insts = sorted(by_doc[doc_id], key=lambda x: x.idx)
                first = insts[0]
                sid = f"{name}/{doc_id}"
                self._docs[sid] = (name, first.doc, insts)
                target = task.doc_to_target(first.doc)
                gen = [i for i in insts if i.request_type == "generate_until"]
                max_new = max((int((i.args[1] or {}).get("max_gen_toks") or self.max_gen_toks) for i in gen),
                              default=0)
                out.append(Sample(
                    id=sid,
                    context=str(first.args[0]),
                    question="",
                    answer=target if isinstance(target, (str, int, float, list)) else str(target),
                    max_new_tokens=max(1, max_new),
                    meta={"lm_eval_task": name, "doc_id": doc_id, "request_type": first.request_type,
                          "n_requests": sum(i.repeats for i in insts), "chat_template": False},
                ))
        return out

    # --- one document ----------------------------------------------------------------------------------

    def _lm(self, runner: Any) -> Any:
        if id(runner) not in self._lms:
            self._lms = {id(runner): tokenbench_lm_class()(runner=runner, max_length=self.max_length,
                                                           max_gen_toks=self.max_gen_toks)}
        return self._lms[id(runner)]

    def run_sample(self, runner: Any, sample: Sample, use_chat_template: bool = False) -> Any:
        """Answer one document's requests with the runner; the prediction is its responses (see the module doc)."""
        from tokenbench.lm import GenerationOutput

        if sample.id not in self._docs:
            raise TokenbenchError(f"lm_eval: unknown sample {sample.id} (samples() builds the requests)")
        _, _, insts = self._docs[sample.id]
        lm = self._lm(runner)
        lm.outputs, lm.scored_tokens, lm.context_tokens = [], 0, 0
        start = time.perf_counter()
        responses = [[getattr(lm, inst.request_type)([inst])[0] for _ in range(inst.repeats)] for inst in insts]
        elapsed = 1000 * (time.perf_counter() - start)
        if self._is_text(insts):
            text = responses[0][0]
        else:
            text = json.dumps(_jsonable(responses), ensure_ascii=False)
        outs = lm.outputs
        if len(outs) == 1 and len(insts) == 1:  # one generation: the runner's own measurements
            o = outs[0]
            return GenerationOutput(text=text, n_prompt_tokens=o.n_prompt_tokens, n_context_tokens=o.n_context_tokens,
                                    n_generated=o.n_generated, latency=o.latency, memory=o.memory,
                                    compression=o.compression, token_ids=o.token_ids)
        return GenerationOutput(
            text=text,
            n_prompt_tokens=lm.scored_tokens + sum(o.n_prompt_tokens for o in outs),
            n_context_tokens=lm.context_tokens + sum(o.n_context_tokens for o in outs),
            n_generated=sum(o.n_generated for o in outs),
            latency={"e2e_ms": elapsed},
        )

    @staticmethod
    def _is_text(insts: list[Any]) -> bool:
        return len(insts) == 1 and insts[0].request_type == "generate_until" and insts[0].repeats == 1

    def _responses(self, sample_id: str, prediction: str) -> Optional[list[list[Any]]]:
        """The responses recorded in a prediction, per request and repeat (None if it is not one)."""
        _, _, insts = self._docs[sample_id]
        if self._is_text(insts):
            return [[prediction]]
        try:
            data = json.loads(prediction)
        except (TypeError, ValueError):
            return None
        if not isinstance(data, list) or len(data) != len(insts):
            return None
        out = []
        for inst, resps in zip(insts, data):
            if not isinstance(resps, list) or len(resps) != inst.repeats:
                return None
            if inst.request_type == "loglikelihood":
                if not all(isinstance(r, list) and len(r) == 2 for r in resps):
                    return None
                resps = [(float(r[0]), bool(r[1])) for r in resps]
            elif inst.request_type == "loglikelihood_rolling":
                resps = [float(r) for r in resps]
            out.append(resps)
        return out

    def _results(self, sample_id: str, prediction: str) -> Optional[dict[str, Any]]:
        """lm-eval's per-document metric values (``<task>/<metric>[,<filter>]``), or None for an unreadable
        prediction."""
        name, doc, insts = self._docs[sample_id]
        task = self._tasks[name]
        responses = self._responses(sample_id, prediction)
        if responses is None:
            return None
        fresh = []
        for inst, resps in zip(insts, responses):
            c = copy.copy(inst)
            c.resps, c.filtered_resps = list(resps), {}
            fresh.append(c)
        filters = getattr(task, "_filters", None) or []
        for f in filters:
            f.apply(fresh)
        out: dict[str, Any] = {}
        for key in fresh[0].filtered_resps:
            values = task.process_results(doc, [c.filtered_resps[key] for c in fresh])
            for metric, value in values.items():
                out[f"{name}/{metric}" if key == "none" else f"{name}/{metric},{key}"] = value
        return out

    def _metric_keys(self, name: str) -> list[str]:
        task = self._tasks[name]
        filters = [f.name for f in (getattr(task, "_filters", None) or [])] or ["none"]
        return [f"{name}/{m}" if key == "none" else f"{name}/{m},{key}"
                for key in filters for m in task.aggregation()]

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        if sample.id not in self._docs:
            raise TokenbenchError(f"lm_eval: unknown sample {sample.id} (samples() builds the requests)")
        results = self._results(sample.id, prediction or "")
        if results is None:  # not a recorded response list: every metric of the document fails
            name = self._docs[sample.id][0]
            higher = self._tasks[name].higher_is_better()
            return {k: 0.0 for k in self._metric_keys(name) if higher.get(k.split("/", 1)[1].split(",")[0], True)}
        return {k: v for k, v in ((k, _number(v)) for k, v in results.items()) if v is not None}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """lm-eval's aggregation of each task's per-document results (recomputed from the predictions)."""
        if not self._tasks or any(r.get("sample_id") not in self._docs for r in rows):
            return super().aggregate(rows)  # the documents are not built (a failed run): per-sample means
        values: dict[str, list[Any]] = defaultdict(list)
        for r in rows:
            results = self._results(r["sample_id"], r.get("prediction") or "")
            if results is None:
                results = {k: v for k, v in (r.get("metrics") or {}).items()}
            for k, v in results.items():
                values[k].append(v)
        out: dict[str, float] = {}
        for key, vals in values.items():
            name, metric = key.split("/", 1)
            agg = self._tasks[name].aggregation().get(metric.split(",")[0])
            value = agg(vals) if agg is not None else None
            number = _number(value)
            if number is None:
                nums = [_number(v) for v in vals]
                number = sum(nums) / len(nums) if nums and None not in nums else None
            if number is not None:
                out[key] = number
        return out


def _flatten(task_dict: dict) -> dict[str, Any]:
    """An older lm-eval's nested {group: {task: Task}} as {task name: Task}."""
    out: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return out
