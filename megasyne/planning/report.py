"""A plan (megasyne.planning.plan) as text for the console and its LR curve as a PNG."""

from __future__ import annotations

import os
from pathlib import Path


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(p: dict) -> str:
    c, steps, mem, t, ck = p["config"], p["steps"], p["memory"], p["time"], p["checkpoints"]
    lay = c["layout"]
    lines = [
        f"model {c['model']} on {c['world_size']} GPUs ({mem['card']}): TP{lay['tp']} x PP{lay['pp']}"
        + (f" x VP{lay['virtual_pp']}" if lay.get("virtual_pp") else "") + f" x DP{lay['dp']}"
        + (" + SP" if lay["sequence_parallel"] else "")
        + (" + distributed optimizer" if lay["distributed_optimizer"] else ""),
        f"batch: {c['global_batch_size']} x {p['data']['seq_length']} tokens per step "
        f"({_human(t['tokens_per_step'])}), micro-batch {c['micro_batch_size']}, "
        f"{c['num_microbatches']} micro-batches per step, {c['dtype']}, recompute {c['recompute']}",
        "",
        f"steps: {steps['run_steps']} in the run, {steps['launch_steps']} in this launch; "
        f"{steps['unused_samples']} samples of the recipe unused",
    ]
    for name, st in steps["stages"].items():
        lines.append(f"  stage {name}: steps [{st['first_step']}, {st['end_step']}) = "
                     f"{st['steps']} steps, {_human(st['tokens'])} tokens"
                     + ("" if st["in_this_launch"] else " (after this launch)"))
        for src, v in st["sources"].items():
            lines.append(f"      {src:<24} {_human(v['tokens']):>9} tokens  {100 * v['share']:6.2f}%")
    lines += ["", f"memory per GPU (GiB, card {mem['card_memory_gib']:.1f}):"]
    for m in mem["stages"]:
        lines.append(
            f"  stage {m['stage']}: {_human(m['parameters'])} params | weights {m['weights_gib']:.2f}"
            f" + grads {m['grads_gib']:.2f} + optimizer {m['optimizer_gib']:.2f} + activations "
            f"{m['activations_gib']:.2f} ({m['activations_per_microbatch_gib']:.2f} x "
            f"{m['microbatches_in_flight']:g} micro-batches) = {m['total_gib']:.2f}")
    lines.append(f"  peak {mem['peak_gib']:.2f} GiB: " + ("fits" if mem["fits"] else
                 "DOES NOT FIT: lower the micro-batch, recompute, or raise TP/PP"))
    lines += ["",
              f"checkpoints: {ck['size_gib']:.1f} GiB each, every {ck['save_interval']} steps "
              f"(~{t['save_every_min']:.0f} min), {ck['saves_in_launch']} in this launch, "
              f"{ck['keep_last']} kept: {ck['disk_gib']:.0f} GiB of disk at most",
              f"time at {100 * t['mfu']:.0f}% MFU: {t['step_s']:.2f} s/step, "
              f"{_human(t['tokens_per_s'])} tokens/s; run {t['run_hours']:.1f} h "
              f"({t['run_hours'] / 24:.2f} days), this launch {t['launch_hours']:.1f} h"]
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def plot_lr(p: dict, out: str | os.PathLike) -> Path:
    """The LR of every step of the run, stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(range(len(p["lr"])), p["lr"], lw=1.2)
    for name, st in p["steps"]["stages"].items():
        ax.axvline(st["first_step"], color="grey", ls="--", lw=0.8)
        ax.text(st["first_step"], max(p["lr"]) * 1.02, f" {name}", fontsize=8, va="bottom")
    if p["steps"]["launch_steps"] < p["steps"]["run_steps"]:
        ax.axvline(p["steps"]["launch_steps"], color="red", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(0, max(p["lr"]) * 1.15)
    ax.set_title(f"{p['config']['model']}: LR over the run ({p['steps']['run_steps']} steps)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
