"""Middle-depth niah recall of a few kv methods over keep ratios (SmolLM2-135M-Instruct, CPU, query-aware):
exact accuracy and answer_prefix averaged over depths .25/.5/.75 of a 2048-token Paul Graham haystack, as in
``table.md`` (24 greedy tokens, the task's own scoring). Prints one line per (keep, method).

    python results/reference/niah-kv-smollm2/keep_sweep.py --methods snapkv streaming_llm pyramidkv \\
        --keeps 0.25 0.35 0.5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from tokenbench import registry
from tokenbench.families.kv import KVMethod
from tokenbench.lm import LMRunner, Prompt


def predict(loaded: Any, task: Any, samples: list[Any], method: dict[str, Any] | KVMethod,
            chat_template: bool = True,
            before: Callable[[Prompt], None] | None = None) -> list[tuple[dict[str, float], str]]:
    """Each sample through a kv method (``method``: its config, ``name`` included, or an instance): the task's
    scores of the greedy answer (the task's ``max_new_tokens``) and the answer's text. ``before``: called with
    each sample's prompt before it is generated from."""
    if isinstance(method, dict):
        method = registry.build("method", method, family="kv")
    runner = LMRunner(loaded, method)
    out = []
    for s in samples:
        prompt = runner.build_prompt(s, use_chat_template=chat_template)
        if before is not None:
            before(prompt)
        gen = runner.generate(prompt, task.max_new_tokens)
        text = loaded.tokenizer.decode(gen.tokens[0].tolist(), skip_special_tokens=True)
        out.append((task.score(s, text), text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["snapkv", "streaming_llm"])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.25])
    ap.add_argument("--haystack-dir", default="../shared/data/paul_graham_essays")
    args = ap.parse_args()
    registry.load_all()
    loaded = registry.build("model", {"name": "smollm2-135m"}).load()
    task = registry.build("task", {"name": "niah", "haystack_dir": args.haystack_dir, "context_lengths": [2048],
                                   "depths": [0.25, 0.5, 0.75]})
    samples = task.samples(loaded)
    for keep in args.keeps:
        for name in args.methods:
            rows = [r for r, _ in predict(loaded, task, samples, {"name": name, "keep_ratio": keep,
                                                                  "query_aware": True})]
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("accuracy", "answer_prefix")}
            print(f"keep={keep} {name}: accuracy {mean['accuracy']:.2f}, answer_prefix {mean['answer_prefix']:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
