"""The command line: ``tokenbench-leaderboard``.

Also reached as ``tokenbench leaderboard`` and ``python -m tokenbench.leaderboard``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .build import build_leaderboard
from .wandb_table import WANDB_MODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenbench-leaderboard",
        description="Build leaderboards (tables with bootstrap CIs, Pareto plots, niah heatmaps; Markdown, "
                    "CSV, HTML, PNG; a W&B leaderboard run) from tokenbench result records.")
    p.add_argument("results_dir", nargs="?", default="results/runs",
                   help="folder searched recursively for result.json records (default: results/runs)")
    p.add_argument("--out", default="results/leaderboard",
                   help="output folder (default: results/leaderboard)")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, default="offline",
                   help="offline (default: files under <out>/wandb for `wandb sync`), online or disabled")
    p.add_argument("--wandb-project", default="tokenbench")
    p.add_argument("--wandb-entity", default=None)
    p.add_argument("--sweep", default=None,
                   help="only records of this sweep (its sweep_name); also the W&B group")
    p.add_argument("--task", action="append", default=None,
                   help="only this task (repeat or comma-separate for several)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the confidence intervals (0: no intervals; default 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``tokenbench-leaderboard``: build the leaderboard and print one table per task."""
    from tabulate import tabulate

    args = _parser().parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        print("tokenbench-leaderboard: error: --confidence must be in (0, 1)", file=sys.stderr)
        return 2
    tasks = [t.strip() for arg in args.task or [] for t in arg.split(",") if t.strip()] or None
    if not Path(args.results_dir).is_dir():
        print(f"tokenbench-leaderboard: error: results folder not found: {args.results_dir}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    lb = build_leaderboard(args.results_dir, args.out, wandb_mode=args.wandb_mode, sweep=args.sweep,
                           tasks=tasks, bootstrap=args.bootstrap, seed=args.seed, confidence=args.confidence,
                           wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)
    if not lb.tasks:
        what = [f"sweep {args.sweep}"] if args.sweep else []
        what += [f"task(s) {', '.join(tasks)}"] if tasks else []
        print(f"tokenbench-leaderboard: no result records under {args.results_dir}"
              + (f" for {' and '.join(what)}" if what else ""), file=sys.stderr)
        return 1
    for task, board in lb.tasks.items():
        print(f"\n{task}  (main metric: {board.main_metric or '-'})")
        print(tabulate(board.table.values.tolist(), headers=list(board.table.columns),
                       tablefmt="simple_outline", disable_numparse=True))
    print(f"\nleaderboard written to {lb.out_dir}/ (README.md, index.html, <task>.md|.csv|.html, PNGs)")
    if lb.wandb_dir is not None:
        hint = f"; upload with: wandb sync {lb.wandb_dir}" if args.wandb_mode == "offline" else ""
        print(f"W&B leaderboard run: {lb.wandb_dir}{hint}")
    return 0
