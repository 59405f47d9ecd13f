"""The results table of a grid: one row per cell plus the base model, one column per metric.

Columns: ``ppl`` (all held-out tokens), ``ppl <group>`` (e.g. per language), ``ppl <source>``,
``<task> acc`` (benchmark accuracy, percent). The best value of each column among the cells
is bold (lowest perplexity, highest accuracy; nothing when every cell ties); the base row is the reference and is not
ranked. Written as ``results.md``, ``results.csv`` and ``results.png`` (the grid's ``plot``:
metrics against one axis, one line per value of another, the base as a dashed line) in the
grid's output directory.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from megasyne.ablation.grid import BASE, Grid
from megasyne.atomic import atomic_write, atomic_write_text


def metrics_of(summary: dict) -> dict[str, float | None]:
    """Table columns of one eval.json."""
    val = summary["val"]
    out = {"ppl": val["ppl"]}
    out.update({f"ppl {g}": v for g, v in val["groups"].items()})
    out.update({f"ppl {s}": v for s, v in val["sources"].items() if f"ppl {s}" not in out})
    out.update({f"{t} acc": (None if v is None else 100 * v) for t, v in summary.get("bench", {}).items()})
    return out


def lower_is_better(column: str) -> bool:
    return column.startswith("ppl")


def collect(grid: Grid) -> tuple[list[dict], list[str]]:
    """Rows ({"entry", axis values..., "done", metrics}) and the metric columns, in order."""
    rows, columns = [], []
    for name in [BASE, *(c.name for c in grid.cells())]:
        path = grid.output / name / "eval.json"
        done = (grid.output / name / "done.json").is_file() and path.is_file()
        metrics = metrics_of(json.loads(path.read_text(encoding="utf-8"))) if done else {}
        columns += [m for m in metrics if m not in columns]
        rows.append({"entry": name, "done": done, "metrics": metrics})
    values = {c.name: c.values for c in grid.cells()}
    for row in rows:
        row["values"] = values.get(row["entry"], {})
    return rows, columns


def best(rows: list[dict], column: str) -> float | None:
    got = [r["metrics"].get(column) for r in rows if r["entry"] != BASE]
    got = [v for v in got if v is not None and not math.isnan(v)]
    if len(set(got)) < 2:  # nothing to choose between (one value, or every cell tied)
        return None
    return min(got) if lower_is_better(column) else max(got)


def _fmt(v: float | None, column: str) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if lower_is_better(column) else f"{v:.1f}"


def markdown(grid: Grid, rows: list[dict], columns: list[str]) -> str:
    axes = [a.name for a in grid.axes]
    header = ["cell", *axes, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    tops = {c: best(rows, c) for c in columns}
    for row in rows:
        cells = [row["entry"] if row["entry"] != BASE else "base (no training)",
                 *(row["values"].get(a, "") for a in axes)]
        for c in columns:
            v = row["metrics"].get(c)
            text = _fmt(v, c)
            if row["entry"] != BASE and v is not None and tops[c] is not None and _fmt(v, c) == _fmt(tops[c], c):
                text = f"**{text}**"
            cells.append(text if row["done"] else "not done")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nBold: the best cell of each column (lowest perplexity, highest accuracy in percent); "
        "the base row is the starting checkpoint, not ranked.\n")


def csv_text(grid: Grid, rows: list[dict], columns: list[str]) -> str:
    axes = [a.name for a in grid.axes]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["cell", *axes, "done", *columns])
    for row in rows:
        writer.writerow([row["entry"], *(row["values"].get(a, "") for a in axes), int(row["done"]),
                         *("" if row["metrics"].get(c) is None else repr(row["metrics"][c]) for c in columns)])
    return buf.getvalue()


def plot(grid: Grid, rows: list[dict], out: Path) -> Path | None:
    """metrics against the plot's x axis, one line per value of its ``lines`` axis (and of any
    other axis); None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = grid.plot
    x_axis = next(a for a in grid.axes if a.name == spec.x)
    cells = {c.name: c for c in grid.cells()}
    by_name = {r["entry"]: r for r in rows}
    numeric = all(v.x is not None for v in x_axis.values)
    fig, panels = plt.subplots(1, len(spec.metrics), figsize=(5 * len(spec.metrics), 3.6), squeeze=False)
    for ax, metric in zip(panels[0], spec.metrics):
        lines: dict[str, list] = {}
        for name, cell in cells.items():
            v = by_name[name]["metrics"].get(metric)
            if v is None:
                continue
            label = ", ".join(f"{a}={cell.values[a]}" for a in cell.values if a != spec.x) or metric
            lines.setdefault(label, []).append((cell.x[spec.x], v))
        for label, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        base = by_name[BASE]["metrics"].get(metric)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", label="base (no training)")
        if not numeric:
            ax.set_xticks(range(len(x_axis.values)), [v.name for v in x_axis.values])
        ax.set_xlabel(spec.x)
        ax.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else " (%)"))
        ax.legend(fontsize=7)
    fig.suptitle(f"{grid.path.name}: {len(cells)} cells")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def write_table(grid: Grid) -> dict[str, Path | None]:
    """results.md / .csv / .png in the grid's output directory."""
    rows, columns = collect(grid)
    missing = [m for m in grid.plot.metrics if m not in columns]
    if missing and columns:
        from megasyne.ablation.grid import GridError

        raise GridError(f"{grid.path}: plot.metrics {missing} are not table columns ({columns})")
    grid.output.mkdir(parents=True, exist_ok=True)
    md = atomic_write_text(grid.output / "results.md", markdown(grid, rows, columns))
    cs = atomic_write_text(grid.output / "results.csv", csv_text(grid, rows, columns))
    png = plot(grid, rows, grid.output / "results.png") if columns else None
    return {"markdown": md, "csv": cs, "png": png}


__all__ = ["best", "collect", "csv_text", "lower_is_better", "markdown", "metrics_of", "plot", "write_table"]
