"""Benchmark accuracy inside training: a fixed multiple-choice subset (e.g. a few hundred MMLU
and C-Eval questions) scored every N steps next to the per-source losses, so forgetting shows
during the run (megasyne.eval.in_training does the prompts and counting)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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


class BenchEval:
    """Built on every rank at start-up (all file/task errors surface then, before training)."""

    def __init__(self, cfg: BenchEvalConfig, vocab_size: int):
        from megasyne.eval.in_training import InTrainingEval

        self.cfg, self.vocab_size = cfg, vocab_size
        self.evaluator = InTrainingEval(tasks=cfg.tasks, tokenizer_path=cfg.tokenizer,
                                        max_items=cfg.max_items, max_length=cfg.max_length,
                                        batch_size=cfg.batch_size)

    def due(self, step: int) -> bool:
        return step % self.cfg.interval_steps == 0

    def run(self, ddp_chunks: list) -> dict:
        """{task: accuracy}: this DP rank scores its shard, counts are summed over DP."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megasyne.checkpoint.sharding import unwrap
        from megasyne.eval.lm import megatron_score_fn
        from megasyne.eval.in_training import accuracies_from_counts
        from megasyne.parallel.init import comm_device

        if ps.get_pipeline_model_parallel_world_size() > 1:
            score_fn = pipeline_score_fn(ddp_chunks, self.vocab_size)
        else:
            score_fn = megatron_score_fn(unwrap(ddp_chunks[0]), self.vocab_size)
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        counts = self.evaluator.counts(score_fn, shard=(dp_rank, dp))
        names = sorted(counts)
        total = torch.tensor([v for n in names for v in counts[n]], dtype=torch.float64,
                             device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        total = total.cpu().tolist()
        return accuracies_from_counts({n: (int(total[2 * i]), int(total[2 * i + 1]))
                                       for i, n in enumerate(names)})


def pipeline_score_fn(ddp_chunks: list, vocab_size: int):
    """The in-training score_fn contract (megasyne.eval.in_training) at PP > 1: the pipeline
    schedule's forward-only pass (megasyne.syne.scorers.MegatronScorer, the one score_ppl uses),
    summed log-probabilities of each continuation, the same on every rank of the replica."""
    import numpy as np
    from megatron.core import parallel_state as ps

    from megasyne.syne.scorers import MegatronScorer

    scorer = MegatronScorer.from_model(ddp_chunks, vocab_size=vocab_size)
    tp = ps.get_tensor_model_parallel_world_size()

    def score_fn(sequences, starts):
        b = len(sequences)
        s = -(-(max(map(len, sequences)) - 1) // tp) * tp   # sequence parallel: a multiple of TP
        tokens = np.zeros((b, s), dtype=np.int64)
        labels = np.zeros((b, s), dtype=np.int64)
        mask = np.zeros((b, s), dtype=bool)
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            n = len(seq) - 1
            tokens[i, :n], labels[i, :n] = seq[:-1], seq[1:]
            mask[i, start - 1:n] = True    # label j is token j + 1: continuation from `start`
        nll, _ = scorer.nll(tokens, labels, mask)
        return [-float(x) for x in nll]

    return score_fn
