"""Per-step metrics: console line, ``metrics.jsonl`` (one JSON object per step), TensorBoard.

MFU = achieved model FLOP/s per GPU / peak bf16 dense FLOP/s of the card, with model
FLOPs per token from ``LlamaConfig.flops_per_token`` (6N + 12*L*s*h, PaLM's convention;
recomputation not counted). On CPU there is no meaningful peak: MFU is null.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from megasyne.atomic import atomic_write_text
from megasyne.errors import DataError
from megasyne.jsonl import cut_torn_tail

# Dense bf16 peak per card (vendor datasheets; SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "H800": 989e12}


class MetricsError(DataError, ValueError):
    """metrics.jsonl cannot be read back (a corrupt line other than a torn last one)."""


def peak_flops_per_device() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLog:
    """Appends one JSON line per step; on resume, drops lines past the checkpoint step."""

    def __init__(self, run_dir: Path, *, is_writer: bool, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.is_writer = is_writer
        self.tb = None
        if is_writer and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: jsonl + console only
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Keep records of steps <= step (a killed run may have logged steps it never saved).

        A torn last line (the process died mid-write) is dropped with a warning; a bad line
        anywhere else is a corrupt file, reported with its line number."""
        if not self.is_writer or not self.path.exists():
            return
        torn = cut_torn_tail(self.path)
        if torn is not None:
            warnings.warn(f"{self.path}:{torn[0]}: dropping a torn last line (the run was "
                          f"killed while writing it): {torn[1][:80]!r}", stacklevel=2)
        kept = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise MetricsError(f"{self.path}:{n}: not a JSON record ({line[:80]!r}); "
                                   f"repair or remove that line to resume") from None
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.is_writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, record["step"])
            for name, value in (record.get("source_loss") or {}).items():
                self.tb.add_scalar(f"source_loss/{name}", value, record["step"])
            for name, value in (record.get("bench") or {}).items():
                self.tb.add_scalar(f"bench/{name}", value, record["step"])
            for name, value in (record.get("eval") or {}).items():
                self.tb.add_scalar(f"eval/{name}", value, record["step"])
            decision = record.get("adaptive") or {}
            for group in (decision.get("groups") or {"": decision}).values():
                for topic, ratio in zip(group.get("topics", []), group.get("new_ratios", [])):
                    self.tb.add_scalar(f"adaptive_ratio/{topic}", ratio, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def console_line(r: dict) -> str:
    parts = [f"step {r['step']:>6}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    parts.append(f"tok/s {r['tokens_per_s']:.0f}")
    if r.get("data_wait_ms") is not None:  # of the step's time, the wait for its data
        parts.append(f"data wait {r['data_wait_ms']:.0f} ms")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    src = r.get("source_loss") or {}
    if src:
        parts.append(" ".join(f"{k}={v:.3f}" for k, v in src.items()))
    return " | ".join(parts)


def print0(msg: str) -> None:
    """Print on global rank 0 only (every rank runs the same loop)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
