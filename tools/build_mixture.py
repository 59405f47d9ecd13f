#!/usr/bin/env python
"""Build (or validate the cache of) a recipe's mixture index, and report what the run will read.

    python tools/build_mixture.py --recipe examples/recipes/syne_llama3_8b.yaml --output runs/syne/index

Writes into ``--output`` (next to the index files):

- ``report.json``: per stage and source, target vs realised samples and tokens, the worst
  deviation from the target share over every prefix of the stage; per source, epochs used.
- ``report.md``: the same as tables.
- ``mixture.png``: the source mixture over training (stacked share per window of samples, stage
  boundaries marked).

The index itself is megasyne.data.mixture's (see its docstring for the files); the trainer builds
the same one on rank 0, so running this first only moves the work off the job's start-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from megasyne.data.mixture import build_or_load_index, read_index_json
from megasyne.errors import DataError, MegasyneError, report

log = logging.getLogger("build_mixture")
_CHUNK = 1 << 22


def prefix_deviation(source_id: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per source, max over prefixes n of |count_s(n) - w_s * n| (chunked, O(N * S))."""
    num = source_id.shape[0]
    worst = np.zeros(weights.shape[0])
    counts = np.zeros(weights.shape[0], dtype=np.int64)
    for start in range(0, num, _CHUNK):
        chunk = np.asarray(source_id[start:start + _CHUNK])
        n = np.arange(start + 1, start + chunk.shape[0] + 1, dtype=np.float64)
        for s, w in enumerate(weights):
            c = counts[s] + np.cumsum(chunk == s)
            worst[s] = max(worst[s], float(np.abs(c - w * n).max()))
            counts[s] = c[-1]
    return worst


def summarise(index_dir: Path) -> dict:
    meta = read_index_json(index_dir)
    if meta is None:
        raise DataError(f"{index_dir}: no readable index.json; rebuild it with --force")
    seq = meta["seq_length"]
    names = meta["source_names"]
    source_id = np.load(index_dir / "source_id.npy", mmap_mode="r")
    stages = []
    for st in meta["stages"]:
        n = st["num_samples"]
        w = np.array([st["weights"][nm] for nm in names])
        dev = prefix_deviation(source_id[st["start"]:st["end"]], w)
        rows = {}
        for s, nm in enumerate(names):
            if w[s] == 0 and st["realised_samples"][nm] == 0:
                continue
            real = st["realised_samples"][nm]
            rows[nm] = {"weight": w[s], "target_samples": w[s] * n, "realised_samples": real,
                        "target_tokens": w[s] * n * seq, "realised_tokens": real * seq,
                        "realised_share": real / n, "max_prefix_deviation": float(dev[s])}
        stages.append({"name": st["name"], "start": st["start"], "end": st["end"],
                       "num_samples": n, "tokens": n * seq, "sources": rows})
    sources = [{k: m[k] for k in ("name", "order", "num_docs", "num_tokens", "samples_per_epoch",
                                  "samples_used", "epochs_used")}
               | {"epochs_fraction": m["samples_used"] / m["samples_per_epoch"]}
               for m in meta["sources"]]
    return {"index_dir": str(index_dir), "fingerprint": meta["fingerprint"], "seq_length": seq,
            "num_samples": meta["num_samples"], "num_tokens": meta["num_samples"] * seq,
            "on_exhaustion": meta["on_exhaustion"], "stages": stages, "sources": sources}


def _fmt_tokens(t: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if t >= div:
            return f"{t / div:.3f}{unit}"
    return f"{t:.0f}"


def markdown(report: dict) -> str:
    out = [f"# Mixture report: {Path(report['index_dir']).name}", "",
           f"- index: `{report['index_dir']}` (fingerprint `{report['fingerprint'][:16]}`)",
           f"- {report['num_samples']:,} samples x {report['seq_length']} tokens = "
           f"{_fmt_tokens(report['num_tokens'])} tokens; on_exhaustion: {report['on_exhaustion']}",
           ""]
    for st in report["stages"]:
        out += [f"## Stage {st['name']}: samples [{st['start']:,}, {st['end']:,}), "
                f"{_fmt_tokens(st['tokens'])} tokens", "",
                "| source | weight | target samples | realised samples | target tokens | "
                "realised tokens | max prefix deviation |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for nm, r in st["sources"].items():
            out.append(f"| {nm} | {r['weight']:.4f} | {r['target_samples']:,.1f} | "
                       f"{r['realised_samples']:,} | {_fmt_tokens(r['target_tokens'])} | "
                       f"{_fmt_tokens(r['realised_tokens'])} | {r['max_prefix_deviation']:.3f} |")
        out.append("")
    out += ["## Sources", "",
            "| source | order | documents | tokens | samples/epoch | samples used | epochs |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for s in report["sources"]:
        out.append(f"| {s['name']} | {s['order']} | {s['num_docs']:,} | "
                   f"{_fmt_tokens(s['num_tokens'])} | {s['samples_per_epoch']:,} | "
                   f"{s['samples_used']:,} | {s['epochs_fraction']:.3f} |")
    out += ["", "![source mixture over training](mixture.png)", ""]
    return "\n".join(out)


def plot_index_shares(index_dir: Path, path: Path, windows: int = 400) -> None:
    """Stacked share of each source per window of consecutive samples, stages marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = read_index_json(index_dir)
    names, seq = meta["source_names"], meta["seq_length"]
    source_id = np.load(index_dir / "source_id.npy", mmap_mode="r")
    num = source_id.shape[0]
    windows = max(1, min(windows, num // 50))  # >= 50 samples per window, or shares are noise
    edges = np.linspace(0, num, windows + 1).astype(np.int64)
    share = np.zeros((len(names), windows))
    for k in range(windows):  # window by window: memory stays O(window)
        c = np.bincount(np.asarray(source_id[edges[k]:edges[k + 1]]), minlength=len(names))
        share[:, k] = c / max(1, c.sum())
    x = (edges[:-1] + edges[1:]) / 2 * seq
    scale, unit = (1e9, "B") if num * seq >= 1e9 else (1e6, "M") if num * seq >= 1e6 else (1, "")
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = plt.get_cmap("tab20").colors
    ax.stackplot(x / scale, share, labels=names, colors=colors[:len(names)] if len(names) <= 20
                 else None, step="mid")
    for st in meta["stages"][1:]:
        ax.axvline(st["start"] * seq / scale, color="black", lw=1, ls="--")
    for st in meta["stages"]:
        ax.text((st["start"] + st["end"]) / 2 * seq / scale, 1.01, st["name"], ha="center",
                va="bottom", fontsize=8)
    ax.set_xlim(0, num * seq / scale)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"training tokens ({unit})" if unit else "training tokens")
    ax.set_ylabel(f"source share per window of {max(1, num // windows):,} samples")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, help="recipe YAML (megasyne.data.recipe)")
    ap.add_argument("--output", required=True, help="index directory (built or validated)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    ap.add_argument("--windows", type=int, default=400, help="windows in mixture.png")
    ap.add_argument("--no-plot", action="store_true", help="skip mixture.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _build_and_report(args)
    except MegasyneError as exc:
        return report(exc)


def _build_and_report(args) -> int:
    t0 = time.perf_counter()
    built = build_or_load_index(args.recipe, args.output, force=args.force)
    log.info("index %s in %.1f s (%s)", "built" if built.rebuilt else "validated",
             time.perf_counter() - t0, built.reason)
    summary = summarise(built.path) | {"rebuilt": built.rebuilt, "reason": built.reason}
    (built.path / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    (built.path / "report.md").write_text(markdown(summary))
    if not args.no_plot:
        plot_index_shares(built.path, built.path / "mixture.png", windows=args.windows)
    worst = max((r["max_prefix_deviation"] for st in summary["stages"]
                 for r in st["sources"].values()), default=0.0)
    log.info("report: %s (worst prefix deviation %.3f samples)", built.path / "report.md", worst)
    for s in summary["sources"]:
        log.info("  %-20s %8.3f epochs (%s)", s["name"], s["epochs_fraction"], s["order"])
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
