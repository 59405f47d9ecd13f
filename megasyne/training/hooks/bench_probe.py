"""Benchmark accuracy inside training: a fixed multiple-choice subset (e.g. a few hundred MMLU
and C-Eval questions) scored every N steps (and before the first step of a fresh run) next to
the per-source losses, so forgetting shows during the run. megasyne.eval.in_training does the
prompts and counting, megasyne.scorers the forward passes (any TP / PP / virtual stages)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megasyne.training.hooks import Hook, HookContext


@dataclass(kw_only=True, frozen=True)
class BenchEvalConfig:
    tasks: str
    """Task file (YAML, megasyne.eval.tasks; multiple-choice formats), e.g.
    examples/eval/in_training.yaml."""
    tokenizer: str
    """A transformers tokenizer directory (the model's HF directory)."""
    interval_steps: int
    """Score every N steps (and once before the first step of a fresh run)."""
    max_items: int = 200
    """Questions per task."""
    max_length: int = 4096
    """Longest scored sequence (older context tokens are dropped)."""
    batch_size: int = 8
    """Sequences per forward pass."""

    def __post_init__(self):
        if self.interval_steps < 1 or self.max_items < 1 or self.batch_size < 1:
            raise ValueError("interval_steps, max_items and batch_size must be >= 1")
        for key in ("tasks", "tokenizer"):
            if not Path(getattr(self, key)).exists():
                raise ValueError(f"{key}: not found: {getattr(self, key)}")


class BenchProbeHook(Hook):
    """Built on every rank at start-up (all file/task errors surface then, before training)."""

    key = "bench"

    def __init__(self, cfg: BenchEvalConfig, vocab_size: int):
        from megasyne.eval.in_training import InTrainingEval

        self.cfg, self.vocab_size = cfg, vocab_size
        self.evaluator = InTrainingEval(tasks=cfg.tasks, tokenizer_path=cfg.tokenizer,
                                        max_items=cfg.max_items, max_length=cfg.max_length,
                                        batch_size=cfg.batch_size)

    def due(self, step: int) -> bool:
        return step % self.cfg.interval_steps == 0

    def run(self, step: int, ctx: HookContext) -> dict:
        accuracies = self.measure(ctx.trainer.chunks)
        if step:
            from megasyne.training.metrics import print0

            print0(f"benchmarks at step {step}: " + ", ".join(
                f"{k}={v:.3f}" for k, v in accuracies.items()))
        return accuracies

    def measure(self, chunks: list) -> dict:
        """{task: accuracy}: this DP rank scores its shard, counts are summed over DP."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megasyne.eval.in_training import accuracies_from_counts
        from megasyne.parallel.init import comm_device
        from megasyne.scorers import MegatronScorer, score_fn

        # One forward pass per batch of questions (PP1), or PP micro-batches of it.
        pp = ps.get_pipeline_model_parallel_world_size()
        scorer = MegatronScorer(chunks, vocab_size=self.vocab_size,
                                micro_batch_size=max(1, self.cfg.batch_size // pp))
        counts = self.evaluator.counts(score_fn(scorer), shard=(scorer.dp_rank, scorer.dp_size))
        names = sorted(counts)
        total = torch.tensor([v for n in names for v in counts[n]], dtype=torch.float64,
                             device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        total = total.cpu().tolist()
        return accuracies_from_counts({n: (int(total[2 * i]), int(total[2 * i + 1]))
                                       for i, n in enumerate(names)})
