"""Markdown table of the prompt-family reference runs: python make_table.py <runs dir> [records dir]."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

ORDER = ["prompt_none", "truncate", "prompt_random", "selective_context", "llmlingua", "llmlingua2"]


def main(runs: Path, records: Path | None) -> None:
    recs = []
    for res in sorted(runs.glob("*/result.json")):
        r = json.loads(res.read_text())
        if r.get("status") != "ok":
            continue
        rows = [json.loads(x) for x in (res.parent / "samples.jsonl").read_text().splitlines()]
        task = "niah" if r["task"] == "niah" else "multi_news"
        score = r["metrics"]["accuracy"] * 100 if task == "niah" else r["metrics"]["multi_news"]
        ratio = (r["budget"] or {}).get("keep_ratio", 1.0)
        comp = [x["latency"]["compress_ms"] for x in rows]
        gen = [x["latency"]["generate_e2e_ms"] for x in rows]
        pre = [x["latency"]["prefill_ms"] for x in rows]
        method = r["method"]
        if r["method_params"].get("unit") not in (None, "word"):
            method += f" (unit={r['method_params']['unit']})"
        recs.append((task, ratio, method, score, r["achieved_keep_ratio"], statistics.median(comp),
                     statistics.median(pre), statistics.median(gen), r["n_samples"], res.parent.name))
        if records is not None:
            records.mkdir(parents=True, exist_ok=True)
            name = f"{task}-{method.replace(' (unit=', '-').rstrip(')')}-{ratio:g}.json"
            shutil.copy(res, records / name)
    recs.sort(key=lambda t: (t[0] != "niah", -t[1], ORDER.index(t[2].split()[0]) if t[2].split()[0] in ORDER else 99, t[2]))
    print("| task | keep | method | score | achieved ratio | compress ms (median) | prefill ms | generate e2e ms "
          "| samples | run key |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in recs:
        print(f"| {t[0]} | {t[1]:g} | {t[2]} | {t[3]:.2f} | {t[4]:.3f} | {t[5]:.0f} | {t[6]:.0f} | {t[7]:.0f} "
              f"| {t[8]} | {t[9]} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
