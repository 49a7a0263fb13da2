"""Collect the SmolLM2-135M niah runs (PG essays, 2048 tokens, 5 depths, keep 25%) from results/runs into
records/ and a Markdown table. Run from the repository root after the commands in README.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenbench.text_metrics import answer_prefix

RUNS, OUT = Path("results/runs"), Path(__file__).parent


def defaults(method: str, params: dict) -> bool:
    """Whether the run used the method's default parameters (budget and query_aware aside)."""
    from dataclasses import fields

    from tokenbench.registry import METHODS, load_all

    load_all()
    cls = METHODS.get(method, "kv").cls
    skip = {"keep_ratio", "n_keep", "query_aware"}
    return all(params.get(f.name) == f.default for f in fields(cls) if f.name not in skip and f.name in params)


def main() -> None:
    rows = []
    (OUT / "records").mkdir(exist_ok=True)
    for f in sorted(RUNS.glob("*/result.json")):
        r = json.loads(f.read_text())
        tp, mp = r["task_params"], r["method_params"]
        if (r["task"] != "niah" or r["model"] != "smollm2-135m" or tp.get("context_lengths") != [2048]
                or "paul_graham" not in str(tp.get("haystack_dir")) or r["status"] != "ok"):
            continue
        if r["method"] != "none" and mp.get("keep_ratio") != 0.25:
            continue
        if not defaults(r["method"], mp):  # e.g. snapkv with other pooling: reported apart in the README
            continue
        samples = [json.loads(x) for x in (f.parent / "samples.jsonl").read_text().splitlines() if x.strip()]
        by_depth = {s["sample_id"].split("depth")[1]: s for s in samples}
        depths = sorted(by_depth, key=float)
        acc = "".join(str(int(by_depth[d]["metrics"]["accuracy"])) for d in depths)
        # answer_prefix recomputed from the prediction (runs older than the metric lack it)
        middle = [answer_prefix(by_depth[d]["prediction"], str(by_depth[d]["answer"])) for d in depths
                  if 0 < float(d) < 1]
        rows.append((r["method"], bool(mp.get("query_aware")), r["metrics"]["accuracy"], acc,
                     sum(middle) / len(middle), r["achieved_keep_ratio"],
                     [" ".join(by_depth[d]["prediction"].split())[50:66] for d in depths if 0 < float(d) < 1]))
        shutil.copy(f, OUT / "records" / f"{r['method']}-qa{int(bool(mp.get('query_aware')))}.json")
    rows.sort(key=lambda x: (not x[1], x[0]))
    lines = ["| method | query-aware | accuracy (5 depths) | per depth 0/.25/.5/.75/1 | answer_prefix, middle depths "
             "| achieved keep | predictions at depths .25/.5/.75 (after the 50-character lead-in) |", "|---|---|---:|---|---:|---:|---|"]
    for m, qa, a, per, ap, keep, preds in rows:
        lines.append(f"| {m} | {qa} | {a:.1f} | {per} | {ap:.2f} | {keep:.3f} | "
                     + " / ".join(f"`{p}`" for p in preds) + " |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
