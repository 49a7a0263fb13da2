"""RULER's synthetic tasks, generated offline and seeded (Hsieh et al., "RULER: What's the Real Context Size of
Your Long-Context Language Models?", COLM 2024, arXiv:2404.06654).

Reference: hsiehjackson/RULER, ``scripts/data/synthetic/niah.py``, ``variable_tracking.py``,
``common_words_extraction.py``, ``constants.py`` (templates, answer prefixes, tokens to generate),
``scripts/synthetic.yaml`` (the task configurations), ``scripts/data/prepare.py`` (how the model template and
the answer prefix wrap the task template) and ``scripts/eval/synthetic/constants.py`` / ``evaluate.py``
(metrics, post-processing). The templates and task configurations are reproduced exactly (they define the
benchmark); the code is written anew.

Tasks (``synthetic.yaml`` names): ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``,
``niah_multiquery`` (needles "One of the special magic {numbers|words|uuids} for {key} is: {value}." in a
repeated-sentence, essay or needle haystack), ``vt`` (variable tracking: a chain of ``VAR X = ...``
assignments hidden in filler, with one in-context example) and ``cwe`` (common-words extraction from a
numbered word list, with one in-context example). The QA and frequent-words tasks are not included.

Length. As RULER's ``max_seq_length``: the prompt's tokens (target tokenizer, the model template included,
no BOS) plus the task's tokens to generate are at most ``length``. The haystack size (sentences, words, noise
lines, list words) is the largest that fits, found per sample by bisection (RULER steps by a fixed increment
from a size calibrated once, so its prompts can be a little shorter).

Model template. ``chat_template=True`` wraps the task template in the model's chat template and puts RULER's
answer prefix after the assistant header, as ``prepare.py`` does for chat models (``Templates[model]`` +
``answer_prefix``); the task builds that text itself and marks its samples ``chat_template=False`` so the
runner adds nothing. ``chat_template=False`` is RULER's ``base`` template (task template + answer prefix). In
both, ``context`` ends where the haystack ends and ``question`` is the rest (the question, the end of the user
turn, the assistant header, the answer prefix).

Randomness. One ``random.Random`` per sample, seeded with ``(seed, task, length, index)``, so a sample does
not depend on the others (a subset or a resumed run sees the same prompts); the needle order and the word-list
shuffles use ``random.Random(seed)`` as RULER does. Words are RULER's: adjective-noun keys and the CWE
vocabulary come from the word lists of the ``wonderwords`` package.

Differences worth knowing: sentences of the essay haystack are split with a regular expression (end
punctuation followed by white space) instead of NLTK's punkt, whose data is a download; the essays
(``haystack_dir``, e.g. Paul Graham's) are concatenated in file-name order and cycled when a length needs more
words than they hold (RULER stops at the end of its essay file); without ``haystack_dir`` the tasks configured
with the essay haystack use the repeated-sentence filler instead (``meta["haystack"]`` records which); variable
names within a chain are distinct by construction.

Metrics (``evaluate.py``): the prediction is stripped and control characters become newlines; per sample
``string_match_all`` (the fraction of the references found in the prediction, case-insensitive) and
``string_match_part`` (1 if any is found); every task here is scored with ``string_match_all``. Aggregates:
``<task>`` and ``<task>@len<L>`` (× 100, two decimals, as RULER reports), ``avg`` (the mean over tasks) and
``avg@len<L>`` (the mean over tasks at one length: RULER's per-length average), plus the sample means of the two
string-match metrics (in [0, 1]).
"""

from __future__ import annotations

import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_task
from tokenbench.task import Sample, Task

if TYPE_CHECKING:
    from tokenbench.models.base import LoadedModel

# scripts/data/synthetic/constants.py: task template, answer prefix, tokens to generate.
TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128,
    ),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assgined the value {query}, they are: ",
        30,
    ),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120,
    ),
}

# scripts/synthetic.yaml
TASK_CONFIGS: dict[str, dict[str, Any]] = {
    "niah_single_1": {"task": "niah", "type_haystack": "repeat", "type_needle_k": "words",
                      "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_single_2": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                      "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_single_3": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                      "type_needle_v": "uuids", "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multikey_1": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_k": 4, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multikey_2": {"task": "niah", "type_haystack": "needle", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multikey_3": {"task": "niah", "type_haystack": "needle", "type_needle_k": "uuids",
                        "type_needle_v": "uuids", "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 1},
    "niah_multivalue": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 4, "num_needle_q": 1},
    "niah_multiquery": {"task": "niah", "type_haystack": "essay", "type_needle_k": "words",
                        "type_needle_v": "numbers", "num_needle_k": 1, "num_needle_v": 1, "num_needle_q": 4},
    "vt": {"task": "variable_tracking", "num_chains": 1, "num_hops": 4},
    "cwe": {"task": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_NOISE = REPEAT_HAYSTACK + "\n"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)), no ties to break
VT_ICL_LENGTH = 500  # the in-context example of vt is built for this max_seq_length
_CTX = "\x00RULER-CONTEXT\x00"  # where the haystack goes while the prompt around it is assembled
_SENTENCE = re.compile(r"(?<=[.!?])[\"'\u2019\u201d)\]]*\s+")
_CONTROL = re.compile(r"[\x00-\x1f]")


# --- words and random values ------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """A word list of the ``wonderwords`` package (``nounlist``, ``adjectivelist``, ``verblist``), as read by RULER."""
    from importlib import resources

    text = resources.files("wonderwords.assets").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


@lru_cache(maxsize=None)
def _key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(word_list("adjectivelist")))), tuple(sorted(set(word_list("nounlist"))))


@lru_cache(maxsize=None)
def cwe_vocabulary(seed: int) -> tuple[str, ...]:
    """RULER's CWE vocabulary: nouns, adjectives and verbs, deduplicated, sorted, shuffled with ``seed``."""
    words = sorted(set(word_list("nounlist") + word_list("adjectivelist") + word_list("verblist")))
    random.Random(seed).shuffle(words)
    return tuple(words)


def random_value(kind: str, rng: random.Random) -> str:
    """A needle key or value: a 7-digit number, an adjective-noun word pair or a UUID."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":  # uniform over RULER's sorted adjective-noun pairs, drawn as one adjective and one noun
        adjs, nouns = _key_parts()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def split_sentences(text: str) -> list[str]:
    """Sentences: a cut after ``.``, ``!`` or ``?`` (and closing quotes/brackets) followed by white space."""
    return [s for s in _SENTENCE.split(text.strip()) if s]


# --- metrics ------------------------------------------------------------------------------------------


def postprocess(prediction: str) -> str:
    """``evaluate.py``: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """The fraction of the references that occur in the prediction (case-insensitive)."""
    if not references:
        return 0.0
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 if any reference occurs in the prediction (case-insensitive), else 0.0."""
    pred = prediction.lower()
    return max((1.0 if r.lower() in pred else 0.0 for r in references), default=0.0)


METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "niah": string_match_all, "variable_tracking": string_match_all, "common_words_extraction": string_match_all,
}


# --- the task ------------------------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class _Built:
    """One generated prompt: ``template`` holds the prompt with ``_CTX`` where ``haystack`` goes."""

    template: str
    haystack: str
    answers: list[str]

    @property
    def text(self) -> str:
        return self.template.replace(_CTX, self.haystack)


@register_task("ruler")
@dataclass
class Ruler(Task):
    """RULER's niah, variable-tracking and common-words tasks at lengths counted in the target model's tokens."""

    families: ClassVar[tuple[str, ...]] = ("kv", "prompt")
    primary_metric: ClassVar[str] = "avg"

    tasks: list[str] = field(default_factory=lambda: list(TASK_CONFIGS))  # RULER task names (synthetic.yaml)
    lengths: list[int] = field(default_factory=lambda: [2048])  # max sequence lengths (prompt + tokens to generate)
    num_samples: int = 10  # samples per task and length (RULER's default is 500)
    seed: int = 42  # RULER's random_seed
    haystack_dir: Optional[str] = None  # .txt essays for the essay haystack; None: essay tasks use the repeated filler
    chat_template: bool = True  # the model's chat template with the answer prefix after it; False: RULER's base template

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise TokenbenchError(f"ruler: tasks must be a non-empty list of task names, got {self.tasks!r}")
        unknown = [t for t in self.tasks if t not in TASK_CONFIGS]
        if unknown:
            raise TokenbenchError(f"ruler: unknown task(s) {unknown}; tasks are {', '.join(TASK_CONFIGS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise TokenbenchError(f"ruler: tasks has duplicates: {list(self.tasks)}")
        if isinstance(self.lengths, (str, int)) or not isinstance(self.lengths, (list, tuple)) or not self.lengths:
            raise TokenbenchError(f"ruler: lengths must be a non-empty list of token counts, got {self.lengths!r}")
        for n in self.lengths:
            if not _positive_int(n):
                raise TokenbenchError(f"ruler: lengths must be positive integers, got {n!r}")
        if len(set(self.lengths)) != len(self.lengths):
            raise TokenbenchError(f"ruler: lengths has duplicates: {list(self.lengths)}")
        if not _positive_int(self.num_samples):
            raise TokenbenchError(f"ruler: num_samples must be a positive integer, got {self.num_samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TokenbenchError(f"ruler: seed must be an integer, got {self.seed!r}")
        if self.haystack_dir is not None:
            self._essay_words()  # path checks now, before any model loads

    # --- haystack sources ------------------------------------------------------------------------------

    def _essay_words(self) -> tuple[str, ...]:
        folder = Path(str(self.haystack_dir)).expanduser()
        if not folder.is_dir():
            raise TokenbenchError(f"ruler: haystack folder not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise TokenbenchError(f"ruler: no .txt files in haystack folder {folder}")
        texts = []
        for path in files:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenbenchError(f"ruler: cannot read haystack file {path}: {exc}") from None
        words = tuple(re.sub(r"\s+", " ", " ".join(texts)).strip().split(" "))
        if not words or words == ("",):
            raise TokenbenchError(f"ruler: the haystack files in {folder} have no text")
        return words

    def haystack_type(self, name: str) -> str:
        cfg = TASK_CONFIGS[name]
        if cfg["task"] != "niah":
            return "noise" if cfg["task"] == "variable_tracking" else "words"
        if cfg["type_haystack"] == "essay" and self.haystack_dir is None:
            return "repeat"
        return cfg["type_haystack"]

    # --- prompt assembly -------------------------------------------------------------------------------

    def _wrap(self, task_text: str, answer_prefix: str, chat: tuple[str, str] | None) -> str:
        """prepare.py: the model template around the task template, then the answer prefix."""
        if chat is None:
            return task_text + answer_prefix
        return chat[0] + task_text + chat[1] + answer_prefix

    def _niah(self, cfg: dict[str, Any], n: int, rng: random.Random, chat: tuple[str, str] | None,
              haystack: str, essay: tuple[str, ...]) -> _Built:
        num_k = max(cfg["num_needle_k"], cfg["num_needle_q"])
        type_k, type_v = cfg["type_needle_k"], cfg["type_needle_v"]
        keys, values, needles = [], [], []
        for _ in range(num_k):
            keys.append(random_value(type_k, rng))
            vals = []
            for _ in range(cfg["num_needle_v"]):
                vals.append(random_value(type_v, rng))
                needles.append(NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=vals[-1]))
            values.append(vals)
        random.Random(self.seed).shuffle(needles)
        if haystack == "essay":
            words = essay * (n // len(essay) + 1) if n > len(essay) else essay
            sentences = split_sentences(" ".join(words[:n]))
            cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
            cuts.append(len(sentences))
            pieces = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            context = " ".join(pieces)
        else:
            if haystack == "repeat":
                lines = [REPEAT_HAYSTACK] * n
            else:  # "needle": distractor needles with random keys and values
                lines = [NEEDLE.format(type_needle_v=type_v, key=random_value(type_k, rng),
                                       value=random_value(type_v, rng)) for _ in range(n)]
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                lines.insert(index, needle)
            context = "\n".join(lines)
        picked = rng.sample(range(num_k), cfg["num_needle_q"])
        queries = [keys[i] for i in picked]
        answers = [a for i in picked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, _ = TEMPLATES["niah"]
        if cfg["num_needle_q"] * cfg["num_needle_v"] == 1:  # singular wording, as niah.py rewrites it
            def singular(t: str) -> str:
                return (t.replace("Some", "A").replace("are all", "is").replace("are", "is")
                        .replace("answers", "answer"))

            template, prefix, type_v = singular(template), singular(prefix), type_v[:-1]
        fields = {"type_needle_v": type_v, "query": query, "context": _CTX}
        return _Built(self._wrap(template.format(**fields), prefix.format(**fields), chat), context, answers)

    def _vt_chain(self, cfg: dict[str, Any], rng: random.Random, icl: bool) -> tuple[list[str], list[str]]:
        """One chain (variable_tracking.py's generate_chains with one chain): its variables and statements."""
        letters, hops = (3, min(10, cfg["num_hops"])) if icl else (5, cfg["num_hops"])
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=letters))
            if name not in names:
                names.append(name)
        chain = [f"VAR {names[0]} = {rng.randint(10000, 99998)}"]
        chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
        return names, chain

    def _vt(self, cfg: dict[str, Any], n: int, rng: random.Random, chat: tuple[str, str] | None,
            icl: bool = False, example: str = "") -> _Built:
        if cfg["num_chains"] != 1:
            raise TokenbenchError("ruler: vt with more than one chain is not supported")
        names, chain = self._vt_chain(cfg, rng, icl)
        sentences = [VT_NOISE] * n
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, (pos, statement) in enumerate(zip(positions, chain)):
            sentences.insert(pos + j, statement)
        context = " ".join(sentences).replace(". \n", ".\n")
        template, prefix, _ = TEMPLATES["variable_tracking"]
        if icl:  # the example's template: white space collapsed, last word dropped, as variable_tracking.py does
            template = " ".join(template.split()[:-1])
        fields = {"context": _CTX, "query": chain[0].split("=")[-1].strip(), "num_v": len(names)}
        task_text = template.format(**fields)
        if icl:
            return _Built(task_text + prefix.format(**fields), context, names)
        # the in-context example goes inside the model template, before the task text (one space, two newlines)
        return _Built(self._wrap(" " + example + "\n\n" + task_text, prefix.format(**fields), chat), context, names)

    def _cwe_list(self, rng: random.Random, num_words: int, common: int, uncommon: int,
                  num_cw: int) -> tuple[str, list[str]]:
        chosen = rng.sample(cwe_vocabulary(self.seed), num_words)
        frequent, rare = chosen[:num_cw], chosen[num_cw:]
        words = frequent * common + rare * uncommon
        random.Random(self.seed).shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), frequent

    def _cwe(self, cfg: dict[str, Any], n: int, rng: random.Random, chat: tuple[str, str] | None,
             length: int) -> _Built:
        num_cw = cfg["num_cw"]
        if length < 4096:
            ex_ctx, ex_answer = self._cwe_list(rng, 20, 3, 1, num_cw)
            ctx, answer = self._cwe_list(rng, n, 6, 1, num_cw)
        else:
            ex_ctx, ex_answer = self._cwe_list(rng, 40, 10, 3, num_cw)
            ctx, answer = self._cwe_list(rng, n, cfg["freq_cw"], cfg["freq_ucw"], num_cw)
        template, prefix, _ = TEMPLATES["common_words_extraction"]
        # the example is a whole prompt (model template included) followed by its answer, then a newline
        example = self._wrap(template.format(context=ex_ctx), prefix, chat)
        example += " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
        return _Built(example + "\n" + self._wrap(template.format(context=_CTX), prefix, chat), ctx, answer)

    # --- samples -------------------------------------------------------------------------------------

    def _chat_parts(self, tok: Any) -> tuple[str, str] | None:
        """The model template's text before and after the user message, or None for the base template."""
        if not self.chat_template or not getattr(tok, "chat_template", None):
            return None
        marker = "\x00RULER-USER\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                       tokenize=False)
        if isinstance(text, list):
            text = text[0]
        if marker not in text:
            raise TokenbenchError("ruler: the chat template altered the user message; use task.chat_template=false")
        before, after = text.split(marker, 1)
        # The runner tokenises the context with the tokenizer's default special tokens: no second BOS.
        bos = getattr(tok, "bos_token", None)
        if bos and before.startswith(bos):
            ids = tok("x")["input_ids"]
            if ids and ids[0] == getattr(tok, "bos_token_id", None):
                before = before[len(bos):]
        return before, after

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        tok = loaded.tokenizer
        if tok is None:
            raise TokenbenchError("ruler: the model has no tokenizer; lengths are counted in its tokens")

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        chat = self._chat_parts(tok)
        essay = self._essay_words() if self.haystack_dir is not None else ()
        vt_example = None
        out: list[Sample] = []
        for name in self.tasks:
            cfg = TASK_CONFIGS[name]
            kind = cfg["task"]
            to_generate = TEMPLATES[kind][2]
            haystack = self.haystack_type(name)
            if kind == "variable_tracking" and vt_example is None:
                vt_example = self._vt_example(cfg, count)
            lowest = self._smallest_haystack(cfg)
            for length in self.lengths:
                guess = 0
                for index in range(self.num_samples):
                    seed = f"{self.seed}/{name}/{length}/{index}"

                    def build(n: int) -> _Built:
                        rng = random.Random(seed)
                        if kind == "niah":
                            return self._niah(cfg, n, rng, chat, haystack, essay)
                        if kind == "variable_tracking":
                            return self._vt(cfg, n, rng, chat, example=vt_example)
                        return self._cwe(cfg, n, rng, chat, length)

                    n, built, tokens = self._fit(build, count, length - to_generate, lowest, guess, name, length)
                    guess = n
                    text = built.text
                    cut = built.template.index(_CTX) + len(built.haystack)
                    out.append(Sample(
                        id=f"{name}/len{length}/{index}",
                        context=text[:cut],
                        question=text[cut:],
                        answer=list(built.answers),
                        max_new_tokens=to_generate,
                        meta={
                            "task": name,
                            "length": length,
                            "prompt_tokens": tokens,  # + max_new_tokens <= length
                            "haystack": haystack,
                            "haystack_size": n,
                            "prompt_format": "base" if chat is None else "chat",
                            "chat_template": False,  # the model template, if any, is already in the text
                        },
                    ))
        return out

    @staticmethod
    def _smallest_haystack(cfg: dict[str, Any]) -> int:
        """The fewest haystack units a prompt can have: room for every needle, every chain statement, every
        frequent word."""
        if cfg["task"] == "niah":
            return max(cfg["num_needle_k"], cfg["num_needle_q"]) * cfg["num_needle_v"]
        if cfg["task"] == "variable_tracking":
            return cfg["num_hops"] + 1
        return cfg["num_cw"]

    def _vt_example(self, cfg: dict[str, Any], count: Callable[[str], int]) -> str:
        """vt's in-context example (built once, for a 500-token sequence), its answer and a blank line."""
        def build(n: int) -> _Built:
            return self._vt(cfg, n, random.Random(f"{self.seed}/vt/icl"), None, icl=True)

        limit = VT_ICL_LENGTH - TEMPLATES["variable_tracking"][2]
        _, built, _ = self._fit(build, count, limit, self._smallest_haystack(cfg), 0, "vt (in-context example)",
                                VT_ICL_LENGTH)
        return built.text + " " + " ".join(built.answers) + "\n\n"


    @staticmethod
    def _fit(build: Callable[[int], _Built], count: Callable[[str], int], budget: int, lowest: int, guess: int,
             name: str, length: int) -> tuple[int, _Built, int]:
        """The largest haystack size whose prompt has at most ``budget`` tokens (bisection)."""
        built = build(lowest)
        tokens = count(built.text)
        if tokens > budget:
            raise TokenbenchError(f"ruler: length {length} is too short for {name}: the smallest prompt has {tokens} "
                                  f"tokens plus the tokens to generate")
        best = (lowest, built, tokens)
        hi = max(guess, lowest + 1)
        while True:  # grow an upper bound that does not fit
            built = build(hi)
            tokens = count(built.text)
            if tokens > budget:
                break
            best = (hi, built, tokens)
            hi *= 2
        lo = best[0]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            built = build(mid)
            tokens = count(built.text)
            if tokens <= budget:
                lo, best = mid, (mid, built, tokens)
            else:
                hi = mid
        return best

    # --- scoring -------------------------------------------------------------------------------------

    def score(self, sample: Sample, prediction: str) -> dict[str, float]:
        refs = [str(a) for a in (sample.answer if isinstance(sample.answer, (list, tuple)) else [sample.answer])]
        pred = postprocess(prediction or "")
        return {"string_match_all": string_match_all(pred, refs), "string_match_part": string_match_part(pred, refs)}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = super().aggregate(rows)
        by_task: dict[str, list[float]] = defaultdict(list)
        by_task_len: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in rows:
            meta = r.get("meta") or {}
            name = meta.get("task") or str(r.get("sample_id", "")).split("/", 1)[0]
            if name not in TASK_CONFIGS:
                continue
            value = (r.get("metrics") or {}).get(METRICS[TASK_CONFIGS[name]["task"]].__name__)
            if value is None:
                continue
            by_task[name].append(float(value))
            if isinstance(meta.get("length"), int):
                by_task_len[(name, meta["length"])].append(float(value))
        if not by_task:
            return out
        per_task = {t: round(100 * fmean(v), 2) for t, v in by_task.items()}
        out["avg"] = round(fmean(per_task.values()), 2)
        out.update(per_task)
        per_len: dict[int, list[float]] = defaultdict(list)
        for (t, length), vals in sorted(by_task_len.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            out[f"{t}@len{length}"] = round(100 * fmean(vals), 2)
            per_len[length].append(out[f"{t}@len{length}"])
        for length, vals in sorted(per_len.items()):
            out[f"avg@len{length}"] = round(fmean(vals), 2)
        return out
