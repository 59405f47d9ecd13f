"""PNG plots of a run from its metrics.jsonl: loss (total and per source) and the mixture.

The per-source curves are what a continual pre-training user watches for forgetting; the
mixture plot shows the share of tokens each source took at every step, i.e. what the sample
index actually fed the model (stage switches are visible as steps in the shares).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megasyne.atomic import atomic_write


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The step records of a metrics.jsonl, in order (eval-only lines are kept too)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
    return records


def _save(fig, out: Path) -> Path:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def plot_losses(records: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Training loss (total and per source) and validation loss per source against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="black", lw=2,
            label="total")
    sources = sorted({s for r in train for s in r.get("source_loss", {})})
    for s in sources:
        pts = [(r["step"], r["source_loss"][s]) for r in train if s in r.get("source_loss", {})]
        ax.plot(*zip(*pts), lw=1, alpha=0.8, label=s)
    ax.set(xlabel="step", ylabel="training loss", title=title or "training loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    evals = [r for r in records if r.get("eval")]
    keys = sorted({k for r in evals for k in r["eval"] if k.endswith("/loss")})
    for k in keys:
        pts = [(r["step"], r["eval"][k]) for r in evals if k in r["eval"]]
        ax.plot(*zip(*pts), marker="o", label=k.split("/")[0])
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], color="black",
                lw=2, marker="o", label="total")
    ax.set(xlabel="step", ylabel="validation loss", title="validation loss per source")
    if evals:
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_mixture(records: list[dict], out: str | os.PathLike,
                 stage_steps: dict[str, int] | None = None) -> Path:
    """Stacked share of each source's tokens per step; dashed lines at stage starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "source_tokens" in r]
    sources = sorted({s for r in train for s in r["source_tokens"]})
    steps = [r["step"] for r in train]
    shares = []
    for s in sources:
        shares.append([r["source_tokens"].get(s, 0) / max(sum(r["source_tokens"].values()), 1)
                       for r in train])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(steps, shares, labels=sources, step="mid", alpha=0.85)
    for name, at in (stage_steps or {}).items():
        ax.axvline(at + 0.5, color="black", ls="--", lw=1)
        ax.text(at + 0.7, 1.01, name, fontsize=8)
    ax.set(xlabel="step", ylabel="share of tokens", ylim=(0, 1), title="mixture over steps")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out)
