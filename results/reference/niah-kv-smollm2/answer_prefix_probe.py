"""niah with RULER's answer prefix (SmolLM2-135M-Instruct, CPU, query-aware, keep 25%): does an assistant turn
that already reads "The special magic number mentioned in the text above is" let the observation window of
snapkv vote for the needle's digits? RULER (``scripts/data/prepare.py``) appends its answer prefix after the
model template; here the prefix follows the chat template's assistant header, inside the compressed prompt
(the window's last tokens), built with the ruler task's chat-template split. Prints per-depth accuracy, the
middle depths' exact accuracy and answer_prefix, and the first characters of each prediction.

    python results/reference/niah-kv-smollm2/answer_prefix_probe.py --haystack-dir ../shared/data/paul_graham_essays
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tokenbench import registry

sys.path.insert(0, str(Path(__file__).parent))
from keep_sweep import predict

PREFIX = "The special magic number mentioned in the text above is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["none", "snapkv", "streaming_llm", "pyramidkv", "h2o", "tova"])
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--prefix", default=PREFIX)
    ap.add_argument("--haystack-dir", default="../shared/data/paul_graham_essays")
    args = ap.parse_args()
    registry.load_all()
    loaded = registry.build("model", {"name": "smollm2-135m"}).load()
    task = registry.build("task", {"name": "niah", "haystack_dir": args.haystack_dir, "context_lengths": [2048]})
    before, after = registry.build("task", {"name": "ruler"})._chat_parts(loaded.tokenizer)
    samples = [dataclasses.replace(s, context=before + s.context, question=s.question + after + args.prefix,
                                   meta={**s.meta, "chat_template": False}) for s in task.samples(loaded)]
    for name in args.methods:
        cfg = {"name": name} if name == "none" else {"name": name, "keep_ratio": args.keep, "query_aware": True}
        scored = predict(loaded, task, samples, cfg, chat_template=False)
        rows = [r for r, _ in scored]
        preds = [text.strip().split("\n")[0][:12] for _, text in scored]
        mid = rows[1:-1]  # depths .25 / .5 / .75
        print(f"{name}: per depth {''.join(str(int(r['accuracy'])) for r in rows)}, middle depths accuracy "
              f"{sum(r['accuracy'] for r in mid) / len(mid):.2f}, answer_prefix "
              f"{sum(r['answer_prefix'] for r in mid) / len(mid):.2f}, predictions {preds}", flush=True)


if __name__ == "__main__":
    main()
