"""Collect the SmolLM2-135M niah runs (PG essays, 2048 tokens, 5 depths, keep 25%) from results/runs into
records/ and a Markdown table. Run from the repository root after the commands in README.md.

    python results/reference/niah-kv-smollm2/make_table.py                       # the magic-number needle
    python results/reference/niah-kv-smollm2/make_table.py --runs RUNS --needle kamradt   # Kamradt's needle
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenbench.text_metrics import answer_prefix, rouge1_recall

OUT = Path(__file__).parent
KAMRADT = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
CLAUSE = "eat a sandwich and sit in Dolores Park on a sunny day"  # what the question asks for


@dataclass(frozen=True)
class Needle:
    sentence: str  # the task's needle
    table: str  # the table's file name
    prefix: str  # of the records' file names
    graded: str  # the graded column's name
    score: Callable[[str, str], float]  # (prediction, answer) -> graded recall
    lead: int  # characters of the predictions' lead-in, left out of the table
    width: int  # characters shown after it


NEEDLES = {
    "magic": Needle("The special magic number is 7192846.", "table.md", "", "answer_prefix", answer_prefix, 50, 16),
    "kamradt": Needle(KAMRADT, "table_kamradt.md", "kamradt-", "ROUGE-1 recall of the asked clause",
                      lambda pred, _answer: rouge1_recall(pred, CLAUSE), 40, 32),
}


def defaults(method: str, params: dict) -> bool:
    """Whether the run used the method's default parameters (budget and query_aware aside)."""
    from dataclasses import fields

    from tokenbench.registry import METHODS, load_all

    load_all()
    cls = METHODS.get(method, "kv").cls
    skip = {"keep_ratio", "n_keep", "query_aware"}
    return all(params.get(f.name) == f.default for f in fields(cls) if f.name not in skip and f.name in params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, default=Path("results/runs"), help="the runs' output_dir")
    ap.add_argument("--needle", choices=sorted(NEEDLES), default="magic")
    args = ap.parse_args()
    nd = NEEDLES[args.needle]
    rows = []
    (OUT / "records").mkdir(exist_ok=True)
    for f in sorted(args.runs.glob("*/result.json")):
        r = json.loads(f.read_text())
        tp, mp = r["task_params"], r["method_params"]
        if (r["task"] != "niah" or r["model"] != "smollm2-135m" or tp.get("context_lengths") != [2048]
                or "paul_graham" not in str(tp.get("haystack_dir")) or r["status"] != "ok"
                or tp.get("needle", NEEDLES["magic"].sentence) != nd.sentence):
            continue
        if r["method"] != "none" and mp.get("keep_ratio") != 0.25:
            continue
        if not defaults(r["method"], mp):  # e.g. snapkv with other pooling: reported apart in the README
            continue
        samples = [json.loads(x) for x in (f.parent / "samples.jsonl").read_text().splitlines() if x.strip()]
        by_depth = {s["sample_id"].split("depth")[1]: s for s in samples}
        depths = sorted(by_depth, key=float)
        acc = "".join(str(int(by_depth[d]["metrics"]["accuracy"])) for d in depths)
        # the graded recall recomputed from the prediction (runs older than answer_prefix lack it)
        middle = [nd.score(by_depth[d]["prediction"], str(by_depth[d]["answer"])) for d in depths
                  if 0 < float(d) < 1]
        rows.append((r["method"], bool(mp.get("query_aware")), r["metrics"]["accuracy"], acc,
                     sum(middle) / len(middle), r["achieved_keep_ratio"],
                     [" ".join(by_depth[d]["prediction"].split())[nd.lead:nd.lead + nd.width] for d in depths
                      if 0 < float(d) < 1]))
        shutil.copy(f, OUT / "records" / f"{nd.prefix}{r['method']}-qa{int(bool(mp.get('query_aware')))}.json")
    rows.sort(key=lambda x: (not x[1], x[0]))
    header = (f"| method | query-aware | accuracy (5 depths) | per depth 0/.25/.5/.75/1 | {nd.graded}, middle depths "
              f"| achieved keep | predictions at depths .25/.5/.75 (after the {nd.lead}-character lead-in) |")
    lines = [header, "|---|---|---:|---|---:|---:|---|"]
    for m, qa, a, per, ap, keep, preds in rows:
        lines.append(f"| {m} | {qa} | {a:.1f} | {per} | {ap:.2f} | {keep:.3f} | "
                     + " / ".join(f"`{p}`" for p in preds) + " |")
    (OUT / nd.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
