"""Validation: forward-only loss and perplexity per source on held-out data.

The first ``eval_samples`` samples of the eval recipe's index (the same ones every time, cut to
whole micro-batches over the data-parallel ranks) are scored by the one forward-only scorer
(``megasyne.scorers.MegatronScorer``) on the trainer's own model chunks, at any TP / PP /
virtual stages; each DP rank scores its contiguous share and the per-source sums are reduced
over the data-parallel group.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from megasyne.training.documents import DocumentMasking
from megasyne.training.hooks import Hook, HookContext

NO_MASKING = DocumentMasking()


class Validator:
    """Measures the per-source validation loss of model chunks on an eval index."""

    def __init__(self, eval_set, *, samples: int, micro_batch_size: int, vocab_size: int,
                 masking: DocumentMasking = NO_MASKING, eod_id: int | None = None):
        self.eval_set = eval_set
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.vocab_size = vocab_size
        self.masking = masking
        """Document masking as in training (positions, attention and loss mask alike)."""
        self.eod_id = eod_id
        self._rows: dict | None = None
        """This rank's share of the held-out samples, read once: they are the same every time."""

    def measure(self, chunks: list) -> dict:
        """{"loss", "ppl", "<source>/loss", "<source>/ppl", ...} (the same on every rank)."""
        table = self.sums(chunks)
        if table is None:
            return {}
        sources = list(self.eval_set.source_names)
        loss = float(table[:, 0].sum() / table[:, 1].sum())
        out = {"loss": loss, "ppl": math.exp(min(loss, 50))}
        for (nll_sum, tokens), name in zip(table, sources):
            if tokens > 0:
                out[f"{name}/loss"] = float(nll_sum / tokens)
                out[f"{name}/ppl"] = math.exp(min(nll_sum / tokens, 50))
        return out

    def sums(self, chunks: list) -> np.ndarray | None:
        """float64 [source, (summed NLL, scored tokens)] over the held-out samples, in the eval
        set's source order, reduced over data-parallel ranks (None: too few samples for one
        micro-batch per rank). Sums, so that sources can be pooled (e.g. per language)."""
        from megatron.core import parallel_state as ps

        from megasyne.parallel.init import comm_device
        from megasyne.scorers import MegatronScorer
        from megasyne.training.batches import micro_batches

        dp, mbs = ps.get_data_parallel_world_size(), self.micro_batch_size
        n = min(self.samples, len(self.eval_set)) // (dp * mbs) * dp * mbs
        if n == 0:
            return None
        if self._rows is None:
            batch = micro_batches(self.eval_set, first_sample=0, per_rank=n // dp,
                                  dp_rank=ps.get_data_parallel_rank(), micro_batch_size=mbs,
                                  masking=self.masking, eod_id=self.eod_id)
            keys = ["tokens", "labels", "loss_mask", "source"]
            keys += ["position_ids", "document_ids"] if self.masking.enabled else []
            self._rows = {k: torch.cat([mb[k] for mb in batch]).numpy() for k in keys}
        rows = self._rows
        scorer = MegatronScorer(chunks, vocab_size=self.vocab_size, micro_batch_size=mbs)
        nll, count = scorer.nll(rows["tokens"], rows["labels"], rows["loss_mask"] > 0,
                                position_ids=rows.get("position_ids"),
                                document_ids=rows.get("document_ids"))
        sources = list(self.eval_set.source_names)
        table = np.zeros((len(sources), 2), dtype=np.float64)    # [source, (nll_sum, tokens)]
        np.add.at(table[:, 0], rows["source"], nll)
        np.add.at(table[:, 1], rows["source"], count)
        total = torch.from_numpy(table).to(comm_device())
        if dist.is_initialized():
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total.cpu().numpy()


class ValidationHook(Hook):
    """Validation every ``interval`` steps (not before the first step)."""

    key = "eval"

    def __init__(self, interval: int):
        self.interval = interval

    def due(self, step: int) -> bool:
        return step > 0 and step % self.interval == 0

    def run(self, step: int, ctx: HookContext) -> dict:
        return ctx.validation()
