"""Learning-rate schedules as pure functions of the step (unit-tested against their formulas).

WSD (warmup-stable-decay, as in the SynE paper and MiniCPM): linear warmup to the peak,
a long constant phase, then a decay to ``min_lr`` over the last ``decay_steps`` steps
with a linear, cosine or 1-sqrt shape. Cosine: warmup, then half a cosine to ``min_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    kind: str = "wsd"
    """"wsd", "cosine" or "constant"."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak LR over this many steps."""
    decay_steps: int | None = None
    """WSD: length of the final decay phase (None = 10% of the run)."""
    decay_shape: str = "linear"
    """WSD decay shape: "linear", "cosine" or "1-sqrt"."""

    def __post_init__(self):
        if self.kind not in ("wsd", "cosine", "constant"):
            raise ValueError(f"schedule.kind must be wsd, cosine or constant, got {self.kind!r}")
        if self.decay_shape not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"schedule.decay_shape must be linear, cosine or 1-sqrt, got {self.decay_shape!r}")
        if self.warmup_steps < 0 or (self.decay_steps is not None and self.decay_steps < 0):
            raise ValueError("schedule.warmup_steps and schedule.decay_steps must be >= 0")


def _decay_factor(progress: float, shape: str) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # "1-sqrt" (Hägele et al., 2024)


def lr_at(step: int, *, peak_lr: float, min_lr: float, total_steps: int,
          schedule: ScheduleConfig) -> float:
    """LR for optimizer step ``step`` (0-based) of a run of ``total_steps`` steps."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return peak_lr
    if schedule.kind == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr + (peak_lr - min_lr) * _decay_factor(progress, "cosine")
    decay = schedule.decay_steps if schedule.decay_steps is not None else max(total_steps // 10, 1)
    decay_start = total_steps - decay
    if step < decay_start:
        return peak_lr
    progress = min((step - decay_start) / max(decay, 1), 1.0)
    return min_lr + (peak_lr - min_lr) * _decay_factor(progress, schedule.decay_shape)


def stage_step_ranges(stage_boundaries, stage_names, global_batch_size: int,
                      total_steps: int) -> dict[str, tuple[int, int]]:
    """Recipe stage -> [first step, end step) of the optimizer steps it drives.

    A step belongs to the stage of its first sample (global sample ``step * G``), so a stage
    boundary that falls inside a global batch moves to the next step boundary.
    """
    out = {}
    for k, name in enumerate(stage_names):
        first = -(-int(stage_boundaries[k]) // global_batch_size)        # ceil
        end = -(-int(stage_boundaries[k + 1]) // global_batch_size)
        out[name] = (min(first, total_steps), min(end, total_steps))
    return out
