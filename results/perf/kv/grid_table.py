"""Summary tables of a KV benchmark grid (``run_kv_benchmark.py`` output): per keep ratio, each method's TPOT at
every (context, batch) with its ratio to ``streaming_llm`` (scoring overhead) and decode bandwidth, then the
speedup over ``none`` and the prefill times.

    python results/perf/kv/grid_table.py results/perf/kv/kv_h200_grid_session5.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def key(r: dict[str, Any]) -> tuple[str, float, int, int]:
    return r["method"], 1.0 if r["keep_ratio"] is None else float(r["keep_ratio"]), r["context"], r["batch"]


def tables(rows: list[dict[str, Any]]) -> str:
    idx = {key(r): r for r in rows}
    shapes = sorted({(r["context"], r["batch"]) for r in rows}, key=lambda cb: (-cb[0], -cb[1]))
    methods = ["none"] + sorted({r["method"] for r in rows} - {"none"})
    head = " | ".join(f"{c // 1024}k b{b}" for c, b in shapes)
    out = []
    for keep in sorted({k for _, k, _, _ in idx if k < 1.0}):
        out += [f"keep {keep:g}: TPOT ms (× streaming_llm, decode BW % of peak)", "",
                f"| method | {head} |", "|---|" + "---:|" * len(shapes)]
        for m in methods:
            cells = []
            for c, b in shapes:
                r, s = idx.get((m, 1.0 if m == "none" else keep, c, b)), idx.get(("streaming_llm", keep, c, b))
                if r is None:
                    cells.append("—")
                    continue
                ratio = "" if m == "none" or s is None else f"{r['tpot_ms'] / s['tpot_ms']:.2f}×, "
                cells.append(f"{r['tpot_ms']:.2f} ({ratio}{100 * r['decode_bw_frac']:.0f}%)")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        cells = []
        for c, b in shapes:
            n, s = idx.get(("none", 1.0, c, b)), idx.get(("streaming_llm", keep, c, b))
            cells.append("—" if n is None or s is None else f"{n['tpot_ms'] / s['tpot_ms']:.2f}×")
        worst = []
        for c, b in shapes:
            s = idx.get(("streaming_llm", keep, c, b))
            pairs = [(idx[(m, keep, c, b)]["tpot_ms"] / s["tpot_ms"], m) for m in methods[1:]
                     if s is not None and (m, keep, c, b) in idx]
            worst.append("—" if not pairs else f"{max(pairs)[0]:.2f}× ({max(pairs)[1]})")
        out += ["| **streaming_llm's speedup over none** | " + " | ".join(cells) + " |",
                "| **slowest method ÷ streaming_llm** | " + " | ".join(worst) + " |", ""]
    out += ["Prefill ms (TTFT), keep 0.1 (none: full cache)", "", f"| method | {head} |",
            "|---|" + "---:|" * len(shapes)]
    keep = min(k for _, k, _, _ in idx)
    for m in methods:
        cells = [f"{idx[(m, 1.0 if m == 'none' else keep, c, b)]['prefill_ms']:.0f}"
                 if (m, 1.0 if m == "none" else keep, c, b) in idx else "—" for c, b in shapes]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path)
    print(tables(json.loads(ap.parse_args().result.read_text())["rows"]))


if __name__ == "__main__":
    main()
