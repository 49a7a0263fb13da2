"""Plots: a task's Pareto fronts and the needle-in-a-haystack depth × context length heatmaps (PNG)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .records import MEMORY_KEYS
from .stats import _floats, _num
from .tables import _FRONT_NAMES, _bytes_unit

if TYPE_CHECKING:
    import pandas as pd

HEATMAP_TASKS = ("niah",)  # also any task whose samples carry meta.context_length and meta.depth


def _figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas (no pyplot, no global backend change), with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_AXIS_NAMES = {"e2e_ms": "end-to-end latency (ms, median)", "ttft_ms": "time to first token (ms, median)",
               "images_per_s": "throughput (images/s, higher is better)",
               "kv_cache_bytes": "KV cache", "peak_allocated": "peak memory above weights",
               "achieved_keep_ratio": "achieved keep ratio (lower = more compression)"}


def plot_pareto(frame: pd.DataFrame, main: str | None, axes: dict[str, tuple], path: Path,
                title: str) -> Path | None:
    """One panel per Pareto axis: every ok run labelled, front members filled, the front drawn as steps."""
    from matplotlib import colormaps

    if not main or f"metrics.{main}" not in frame.columns or not axes:
        return None
    ok = frame[frame["status"] == "ok"]
    methods = sorted(frame["method"].dropna().unique(), key=lambda m: (m != "none", m))
    palette = colormaps["tab10"]
    colors = {m: palette(i % 10) for i, m in enumerate(methods)}
    n = len(axes)
    fig = _figure(5.2 * n, 4.6)
    excluded = frame[frame["status"] != "ok"]
    for i, (name, (col, higher)) in enumerate(axes.items()):
        ax = fig.add_subplot(1, n, i + 1)
        scale, unit = 1.0, ""
        if col in MEMORY_KEYS:
            unit, scale = _bytes_unit(ok[col])
        x = _floats(ok[col]) / scale
        y = _floats(ok[f"metrics.{main}"])
        lo = ok.get(f"metrics.{main}.ci_lo")
        hi = ok.get(f"metrics.{main}.ci_hi")
        on = ok[f"pareto_{name}"].to_numpy(dtype=bool)
        has = np.isfinite(x) & np.isfinite(y)
        for j in np.flatnonzero(has):
            c = colors.get(ok["method"].iloc[j], "grey")
            if lo is not None and np.isfinite(lo.iloc[j]) and np.isfinite(hi.iloc[j]):
                ax.errorbar(x[j], y[j], yerr=[[max(0.0, y[j] - lo.iloc[j])], [max(0.0, hi.iloc[j] - y[j])]],
                            fmt="none", ecolor=c, alpha=0.35, capsize=2, lw=1, zorder=1)
            ax.scatter([x[j]], [y[j]], s=46, zorder=3, color=c if on[j] else "white", edgecolors=[c],
                       linewidths=1.5)
        # The front as a staircase: the best main metric reachable at each cost.
        fx, fy = x[on & has], y[on & has]
        if fx.size:
            order = np.lexsort((fy, fx))
            fx, fy = fx[order], fy[order]
            if fx.size > 1:
                ax.step(fx, fy, where="pre" if higher else "post", color="black", lw=1.2, ls="--", zorder=2,
                        label="Pareto front")
            else:
                ax.plot(fx, fy, color="black", lw=0, label="Pareto front")
        # Labels; points at the same coordinates share one label; labels of nearby points stack upwards.
        spots: dict[tuple[float, float], list[str]] = {}
        for j in np.flatnonzero(has):
            spot = (round(float(x[j]), 9), round(float(y[j]), 9))
            spots.setdefault(spot, []).append(str(ok["label"].iloc[j]))
        placed: list[tuple[float, float, int, int]] = []  # x, y, first line level, lines
        xr = float(np.ptp(x[has])) if has.any() else 0.0
        yr = float(np.ptp(y[has])) if has.any() else 0.0
        for (px, py), names in sorted(spots.items()):
            near = [(lv, n) for qx, qy, lv, n in placed
                    if abs(qx - px) <= 0.3 * xr + 1e-12 and abs(qy - py) <= 0.08 * max(yr, 1e-12) + 1e-12]
            level = max((lv + n for lv, n in near), default=0)
            placed.append((px, py, level, len(names)))
            ax.annotate("\n".join(names), (px, py), xytext=(5, 5 + 9 * level), textcoords="offset points",
                        fontsize=7, va="bottom", ha="left", color="#222222", zorder=4,
                        bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6},
                        arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6} if level else None)
        yvals = [float(v) for v in y[has]]
        for bound in (lo, hi):
            if bound is not None:
                yvals += [v for v in _floats(bound) if np.isfinite(v)]
        if yvals and 0.0 <= min(yvals) and max(yvals) <= 1.0:  # a score in [0, 1]: show the whole scale
            ax.set_ylim(-0.06, 1.1)
        ax.set_xlabel(_AXIS_NAMES.get(col, col) + (f" ({unit})" if unit else ""), fontsize=9)
        ax.set_ylabel(f"{main} (higher is better)", fontsize=9)
        ax.set_title(f"{main} vs {_FRONT_NAMES[name]}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.2, y=0.15)
        ax.tick_params(labelsize=8)
    handles = [fig.axes[0].scatter([], [], color=colors[m], s=40, label=m) for m in methods
               if m in set(ok["method"])]
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", ls="--", label="Pareto front (filled = on it)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    note = ""
    if len(excluded):
        note = "not plotted (" + ", ".join(f"{r.label}: {r.status}" for r in excluded.itertuples()) + ")"
        if len(note) > 160:
            note = note[:159] + "…"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _heatmap_cells(rows: list[dict[str, Any]], metric: str) -> dict[tuple[int, float], float]:
    cells: dict[tuple[int, float], list[float]] = {}
    for r in rows:
        meta, metrics = r.get("meta") or {}, r.get("metrics") or {}
        if "context_length" in meta and "depth" in meta and isinstance(metrics.get(metric), (int, float)):
            cell = (int(meta["context_length"]), float(meta["depth"]))
            cells.setdefault(cell, []).append(float(metrics[metric]))
    return {k: sum(v) / len(v) for k, v in cells.items()}


def has_heatmap(task: str, samples: Iterable[list[dict[str, Any]]]) -> bool:
    if task in HEATMAP_TASKS:
        return True
    return any("context_length" in (r.get("meta") or {}) and "depth" in (r.get("meta") or {})
               for rows in samples for r in rows[:1])


def plot_heatmaps(frame: pd.DataFrame, samples: dict[str, list[dict[str, Any]]], metric: str, path: Path,
                  title: str) -> Path | None:
    """Every ok run's depth × context length heatmap of ``metric``, side by side on one colour scale,
    redrawn from the runs' samples (the same layout as ``niah_heatmap.png``)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    panels = []
    for r in frame[frame["status"] == "ok"].itertuples():
        cells = _heatmap_cells(samples.get(r.run_key, []), metric)
        if cells:
            panels.append((r, cells))
    if not panels:
        return None
    lengths = sorted({n for _, c in panels for n, _ in c})
    depths = sorted({d for _, c in panels for _, d in c})
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    cell_w, cell_h = 0.62, 0.36
    w = max(2.6, 1.3 + cell_w * len(lengths))
    h = max(2.0, 1.2 + cell_h * len(depths))
    fig = _figure(min(w * ncols + 1.0, 30), min(h * nrows + 0.9, 30))
    cmap = colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")
    norm = Normalize(vmin=0.0, vmax=1.0)
    image = None
    main_col = f"metrics.{metric}"
    for i, (r, cells) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), v in cells.items():
            grid[depths.index(d), lengths.index(n)] = v
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d * 100:g}%" for d in depths], fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        if i >= (nrows - 1) * ncols or i + ncols >= len(panels):
            ax.set_xlabel("context length (tokens)", fontsize=8)
        if len(lengths) > 8:
            ax.tick_params(axis="x", labelrotation=45)
        if len(lengths) * len(depths) <= 100:
            for a in range(len(depths)):
                for b in range(len(lengths)):
                    v = grid[a, b]
                    if np.isnan(v):
                        ax.text(b, a, "–", ha="center", va="center", fontsize=7, color="#555555")
                        continue
                    red, green, blue, _ = cmap(norm(v))
                    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        mean = frame.loc[frame["run_key"] == r.run_key, main_col] if main_col in frame.columns else []
        mean_v = _num(mean.iloc[0]) if len(mean) else math.nan
        sub = f"{r.label}" + (f" ({r.model})" if frame["model"].nunique() > 1 else "")
        ax.set_title(sub + ("" if math.isnan(mean_v) else f"\nmean {metric} {mean_v:.2f}"), fontsize=8)
    if image is not None:
        cbar = fig.colorbar(image, ax=fig.axes, fraction=0.025, pad=0.02)
        cbar.set_label(metric, fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
