"""Tables: a task's human table (display) and the files written from it (Markdown, CSV, HTML, the index)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import LATENCY_KEYS, MEMORY_KEYS
from .stats import FRONTS, _num

if TYPE_CHECKING:
    import pandas as pd

    from .build import TaskBoard


# --- display ------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    f = _num(v)
    if math.isnan(f):
        return ""
    return f"{f:.{digits}f}"


def _fmt_mag(v: Any) -> str:
    f = _num(v)
    if math.isnan(f):
        return ""
    a = abs(f)
    if a >= 100:
        return f"{f:.0f}"
    if a >= 10:
        return f"{f:.1f}"
    if a >= 0.1 or a == 0:
        return f"{f:.2f}"
    return f"{f:.3g}"


def _bytes_unit(values: Iterable[float]) -> tuple[str, float]:
    finite = [abs(v) for v in values if not math.isnan(_num(v))]
    top = max(finite) if finite else 0.0
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= scale:
            return unit, float(scale)
    return "B", 1.0


def _with_ci(row: Any, metric: str) -> str:
    value = _fmt(row.get(f"metrics.{metric}"))
    lo, hi = row.get(f"metrics.{metric}.ci_lo"), row.get(f"metrics.{metric}.ci_hi")
    if value and not math.isnan(_num(lo)) and not math.isnan(_num(hi)):
        return f"{value} [{_fmt(lo)}, {_fmt(hi)}]"
    return value


_LAT_NAMES = {"prefill_ms": "prefill ms", "ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms", "e2e_ms": "e2e ms",
              "images_per_s": "images/s"}
_FRONT_NAMES = {"latency": "latency", "memory": "memory", "keep_ratio": "keep ratio"}


def display_table(frame: pd.DataFrame, main: str | None, *, max_error: int = 80) -> pd.DataFrame:
    """The human table of one task: strings, headline metrics as ``value [lo, hi]``, latency as
    ``p50 / p90``, memory in a readable unit, the fronts a run is on, failed runs with their error."""
    import pandas as pd

    metrics = [c.removeprefix("metrics.") for c in frame.columns
               if c.startswith("metrics.") and not c.endswith((".ci_lo", ".ci_hi")) and "@" not in c]
    if main in metrics:
        metrics = [main] + [m for m in metrics if m != main]
    show_model = frame["model"].nunique(dropna=True) > 1
    budgeted = frame[frame["method"] != "none"]
    show_phase = budgeted["phase"].dropna().astype(str).nunique() > 1
    show_qa = frame["query_aware"].dropna().astype(str).nunique() > 1
    show_error = frame["error"].notna().any()
    mem_units = {k: _bytes_unit(frame[k]) for k in MEMORY_KEYS if k in frame.columns}
    out = []
    for _, row in frame.iterrows():
        label = str(row["label"])
        head, _, suffix = label.partition(" (")  # "method@budget (what tells it apart)"
        method, _, budget = head.partition("@")
        if not budget:
            kr = _num(row["keep_ratio"])
            budget = "full" if math.isnan(kr) or kr == 1.0 else ""
        d: dict[str, Any] = {"rank": "" if pd.isna(row.get("rank")) else str(row["rank"]),
                             "method": method + (f" ({suffix}" if suffix else "")}
        if show_model:
            d["model"] = row["model"]
        d["budget"] = budget
        if show_phase:
            d["phase"] = row["phase"] if isinstance(row["phase"], str) else ""
        if show_qa:
            d["query aware"] = "" if pd.isna(row["query_aware"]) else str(bool(row["query_aware"]))
        d["status"] = row["status"]
        for m in metrics:
            d[m + (" (main)" if m == main else "")] = _with_ci(row, m)
        d["achieved keep"] = _fmt(row["achieved_keep_ratio"])
        for k in LATENCY_KEYS:
            if k in frame.columns:
                p50, p90 = _fmt_mag(row[k]), _fmt_mag(row.get(f"{k}_p90"))
                d[f"{_LAT_NAMES[k]} (p50 / p90)"] = f"{p50} / {p90}" if p50 and p90 else p50
        for k, (unit, scale) in mem_units.items():
            name = {"peak_allocated": "peak", "kv_cache_bytes": "KV cache", "weights_bytes": "weights"}[k]
            d[f"{name} {unit}"] = _fmt_mag(_num(row[k]) / scale)
        fronts = [_FRONT_NAMES[n] for n in FRONTS if bool(row.get(f"pareto_{n}", False))]
        d["Pareto"] = ", ".join(fronts)
        d["n"] = f"{row['n_samples']}/{row['n_samples_expected']}"
        if show_error:
            err = "" if pd.isna(row["error"]) else " ".join(str(row["error"]).split())
            d["error"] = err if len(err) <= max_error else err[: max_error - 1] + "…"
        out.append(d)
    return pd.DataFrame(out)


# --- writing ------------------------------------------------------------------------------------------------


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _markdown_table(table: pd.DataFrame) -> str:
    from tabulate import tabulate

    cells = [[_md_cell(v) for v in row] for row in table.itertuples(index=False)]
    return tabulate(cells, headers=[_md_cell(c) for c in table.columns], tablefmt="github",
                    disable_numparse=True)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif;
       margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; }
td:nth-child(2), td:nth-child(3) { text-align: left; }
td.front { font-weight: 600; }
td.failed { background: #fde8e8; color: #8a1f1f; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; max-width: 70em; }
"""


def _html_table(table: pd.DataFrame, frame: pd.DataFrame) -> str:
    """The display table as HTML; cells of runs on a front are bold, failed runs red (pandas Styler when
    jinja2 is available, plain ``to_html`` otherwise)."""
    import pandas as pd

    front = frame[[c for c in frame.columns if c.startswith("pareto_")]].any(axis=1).to_numpy()
    failed = (frame["status"] != "ok").to_numpy()
    row_class = ["failed" if f else "front" if o else "" for f, o in zip(failed, front)]
    try:
        classes = pd.DataFrame({c: row_class for c in table.columns}, index=table.index)
        styler = table.style.hide(axis="index").format(escape="html").set_td_classes(classes)
        return styler.to_html(doctype_html=False)
    except ImportError:  # jinja2 missing: plain table
        return table.to_html(index=False, escape=True, border=0)


def _note(main: str | None, axes: dict[str, tuple], bootstrap: int, confidence: float, seed: int) -> str:
    parts = []
    if main:
        parts.append(f"Main metric: `{main}` (higher is better); rank 1 = best ok run.")
    if bootstrap > 0:
        parts.append(f"`value [lo, hi]`: the run's metric with a {confidence:.0%} percentile-bootstrap "
                     f"interval of the per-sample mean ({bootstrap} resamples, seed {seed}).")
    parts.append("Latency: median over samples / 90th percentile. Memory: peak allocated above the weights, "
                 "KV-cache bytes from the cache tensors (median over samples), model weights.")
    if axes:
        desc = ", ".join(f"{_FRONT_NAMES[n]} = `{c}` ({'higher' if h else 'lower'} is better)"
                         for n, (c, h) in axes.items())
        parts.append(f"Pareto column: the fronts (main metric vs {desc}) the run is on; "
                     "failed runs are on none.")
    return " ".join(parts)


def _task_title(task: str, frame: pd.DataFrame) -> str:
    models = sorted(frame["model"].dropna().astype(str).unique())
    sweeps = sorted(frame["sweep"].dropna().astype(str).unique())
    parts = [f"model: {', '.join(models)}"] if models else []
    if sweeps:
        parts.append(f"sweep: {', '.join(sweeps)}")
    return f"{task} — " + " · ".join(parts) if parts else task


def _write_task(board: TaskBoard, out: Path, *, bootstrap: int, confidence: float, seed: int) -> None:
    task, frame = board.task, board.frame
    csv_path = out / f"{task}.csv"
    frame.to_csv(csv_path, index=False)
    board.files["csv"] = csv_path
    images = [p for k, p in board.files.items() if k in ("pareto", "heatmaps")]
    note = _note(board.main_metric, board.axes, bootstrap, confidence, seed)
    title = _task_title(task, frame) + (f" · {board.setting}" if board.setting else "")
    n_ok = int((frame["status"] == "ok").sum())

    md = [f"# {task}", "", f"{title}. {n_ok} ok run(s) of {len(frame)}.", "",
          _markdown_table(board.table), "", note, ""]
    for p in images:
        md += [f"![{p.stem}]({p.name})", ""]
    link = f"[{csv_path.name}]({csv_path.name})"
    md += [f"All columns (CIs, per-bucket metrics, p90s, bytes, run directories): {link}", ""]
    md_path = out / f"{task}.md"
    md_path.write_text("\n".join(md))
    board.files["md"] = md_path

    body = [f"<h1>{html.escape(task)}</h1>",
            f"<p>{html.escape(title)}. {n_ok} ok run(s) of {len(frame)}.</p>",
            _html_table(board.table, frame), f"<p class='note'>{html.escape(note)}</p>"]
    body += [f"<p><img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'></p>" for p in images]
    body.append(f"<p><a href='{html.escape(csv_path.name)}'>{html.escape(csv_path.name)}</a> (all columns) · "
                "<a href='index.html'>all tasks</a></p>")
    html_path = out / f"{task}.html"
    html_path.write_text(_page(f"tokenbench leaderboard: {task}", "\n".join(body)))
    board.files["html"] = html_path


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _best(board: TaskBoard) -> str:
    m = board.main_metric
    col = f"metrics.{m}" if m else None
    ok = board.frame[board.frame["status"] == "ok"]
    if not col or col not in ok.columns or ok[col].isna().all():
        return ""
    top = ok.loc[ok[col].idxmax()]
    return f"{top['label']} ({m} {_fmt(top[col])})"


def _write_index(boards: dict[str, TaskBoard], out: Path, sweep: str | None) -> list[Path]:
    from tabulate import tabulate

    rows = []
    for task, b in boards.items():
        f = b.frame
        links = " · ".join(f"[{k}]({p.name})" for k, p in b.files.items())
        rows.append([task, str(int((f["status"] == "ok").sum())), str(int((f["status"] != "ok").sum())),
                     b.main_metric or "", _md_cell(_best(b)), links])
    headers = ["task", "ok runs", "failed runs", "main metric", "best", "files"]
    head = "# tokenbench leaderboard" + (f" — sweep {sweep}" if sweep else "")
    md = [head, "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), "",
          "Every run of every task, all columns: [runs.csv](runs.csv).", ""]
    md_path = out / "README.md"
    md_path.write_text("\n".join(md))

    trs = []
    for task, b in boards.items():
        f = b.frame
        links = " · ".join(f"<a href='{html.escape(p.name)}'>{k}</a>" for k, p in b.files.items())
        trs.append(f"<tr><td><a href='{html.escape(task)}.html'>{html.escape(task)}</a></td>"
                   f"<td>{int((f['status'] == 'ok').sum())}</td><td>{int((f['status'] != 'ok').sum())}</td>"
                   f"<td>{html.escape(b.main_metric or '')}</td><td>{html.escape(_best(b))}</td>"
                   f"<td>{links}</td></tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr></thead><tbody>"
             + "".join(trs) + "</tbody></table>")
    body = (f"<h1>{html.escape(head.lstrip('# '))}</h1>\n{table}\n"
            "<p>Every run of every task, all columns: <a href='runs.csv'>runs.csv</a>.</p>")
    html_path = out / "index.html"
    html_path.write_text(_page("tokenbench leaderboard", body))
    return [md_path, html_path]
