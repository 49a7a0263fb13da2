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

    def row(method: str, keep: float, c: int, b: int) -> dict[str, Any] | None:
        return idx.get((method, 1.0 if method == "none" else keep, c, b))

    shapes = sorted({(r["context"], r["batch"]) for r in rows}, key=lambda cb: (-cb[0], -cb[1]))
    methods = ["none"] + sorted({r["method"] for r in rows} - {"none"})
    head = " | ".join(f"{c // 1024}k b{b}" for c, b in shapes)
    keeps = sorted({k for _, k, _, _ in idx if k < 1.0})
    out = []
    for keep in keeps:
        out += [f"keep {keep:g}: TPOT ms (× streaming_llm, decode BW % of peak)", "",
                f"| method | {head} |", "|---|" + "---:|" * len(shapes)]
        for m in methods:
            cells = []
            for c, b in shapes:
                r, s = row(m, keep, c, b), row("streaming_llm", keep, c, b)
                if r is None:
                    cells.append("—")
                    continue
                ratio = "" if m == "none" or s is None else f"{r['tpot_ms'] / s['tpot_ms']:.2f}×, "
                cells.append(f"{r['tpot_ms']:.2f} ({ratio}{100 * r['decode_bw_frac']:.0f}%)")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        speedup, worst = [], []
        for c, b in shapes:
            n, s = row("none", keep, c, b), row("streaming_llm", keep, c, b)
            speedup.append("—" if n is None or s is None else f"{n['tpot_ms'] / s['tpot_ms']:.2f}×")
            pairs = [] if s is None else [(r["tpot_ms"] / s["tpot_ms"], m) for m in methods[1:]
                                          if (r := row(m, keep, c, b)) is not None]
            worst.append("—" if not pairs else "{:.2f}× ({})".format(*max(pairs)))
        out += ["| **streaming_llm's speedup over none** | " + " | ".join(speedup) + " |",
                "| **slowest method ÷ streaming_llm** | " + " | ".join(worst) + " |", ""]
    keep = keeps[0] if keeps else 1.0
    out += [f"Prefill ms (TTFT), keep {keep:g} (none: full cache)", "", f"| method | {head} |",
            "|---|" + "---:|" * len(shapes)]
    for m in methods:
        cells = ["—" if (r := row(m, keep, c, b)) is None else f"{r['prefill_ms']:.0f}" for c, b in shapes]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path)
    print(tables(json.loads(ap.parse_args().result.read_text())["rows"]))


if __name__ == "__main__":
    main()
