"""Per-document perplexity of a ``.bin``/``.idx`` dataset, written into its metadata sidecar.

The perplexity curriculum of Llama-3-SynE feeds documents from low to high perplexity under the
model being trained: ``tools/score_ppl.py`` computes ``ppl`` here, the recipe then orders a source
with ``order: "ascending:ppl"``.

Windows (transformers' fixed-length perplexity recipe, exactly): a document of n tokens is read in
windows ``[begin, end)`` with ``begin = 0, stride, 2 stride, ...`` and ``end = min(begin + window, n)``,
stopping at the first window that reaches n. A window scores the tokens ``[prev_end, end)`` that no
earlier window scored, each predicted from all tokens of the window before it; token 0 has no
context and is never scored (``prepend_id``, e.g. BOS, gives it one). With ``stride == window``
(the default, cheapest) the first token of each later window has no context either and is skipped,
as in transformers' recipe; ``stride < window`` gives every scored token at least
``window - stride`` tokens of context. Then::

    ppl(doc) = exp( sum of token NLL / number of scored tokens )      (+inf with no scored token)

Work is cut into blocks of documents (:mod:`megasyne.syne.blocks`): each finished block is saved
atomically, a killed run continues from the blocks on disk, and DP replicas take different blocks.
The field is published (one atomic write through :mod:`megasyne.data.metadata`) only when every
block is done; a report ``<prefix>.<field>.report.json`` tells what was scored. With several nodes
the state directory must be on a filesystem every rank sees (rank 0 assembles the blocks).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from megasyne.atomic import atomic_write_json
from megasyne.data.indexed_dataset import IndexedDataset, idx_fingerprint
from megasyne.data.metadata import meta_dir, write_metadata_field
from megasyne.errors import RecipeToolError
from megasyne.syne.blocks import BlockStore, KillAfterBlocks, open_on_every_rank


class ScoreError(RecipeToolError, ValueError):
    """Bad scoring configuration (the message names the option)."""


@dataclass(kw_only=True)
class ScoreConfig:
    """What to score and how; the model is given separately (a scorer from megasyne.scorers)."""

    prefix: str
    """Dataset prefix (``<prefix>.bin/.idx``)."""
    field: str = "ppl"
    """Metadata field to write (float32 per document)."""
    window: int = 2048
    """Tokens per window (at most the model's context)."""
    stride: int | None = None
    """Start-to-start distance of windows (None: = window)."""
    batch_size: int = 8
    """Windows per forward pass (a multiple of the micro-batch size is best)."""
    block_size: int = 1024
    """Documents per resumable block."""
    prepend_id: int | None = None
    """Token put before every document (e.g. BOS 128000) so that its first token is scored too."""
    state_dir: str | None = None
    """Where finished blocks are kept until the field is written (default ``<prefix>.meta/.<field>.partial``)."""
    restart: bool = False
    """Discard blocks of an interrupted run with another configuration."""
    progress: bool = True
    """tqdm bar (rank 0)."""
    kill_after_blocks: int | None = None
    """Tests only: a crash at a known point. Every rank SIGKILLs itself once every rank has
    scored that many blocks, so exactly that many blocks per DP replica are on disk (refused when
    a replica has fewer pending blocks; see megasyne.syne.blocks.KillAfterBlocks)."""

    def __post_init__(self) -> None:
        if self.stride is None:
            self.stride = self.window
        if self.window < 2:
            raise ScoreError(f"--window must be >= 2, got {self.window}")
        if not 1 <= self.stride <= self.window:
            raise ScoreError(f"--stride must be in [1, window={self.window}], got {self.stride}")
        if self.batch_size < 1 or self.block_size < 1:
            raise ScoreError("--batch-size and --block-size must be >= 1")

    @property
    def state_path(self) -> str:
        return self.state_dir or os.path.join(meta_dir(self.prefix), f".{self.field}.partial")


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows of a document of ``n`` tokens: ``(begin, end, first_target)``; targets are
    ``[first_target, end)``, inputs ``[begin, end - 1)``. Windows that score nothing are left out."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def document_tokens(ds: IndexedDataset, d: int) -> np.ndarray:
    """All tokens of document ``d`` (its sequences concatenated) as int64."""
    s0, s1 = int(ds.document_indices[d]), int(ds.document_indices[d + 1])
    if s1 - s0 == 1:
        return np.asarray(ds.get(s0), dtype=np.int64)
    return np.concatenate([np.asarray(ds.get(s), dtype=np.int64) for s in range(s0, s1)]) \
        if s1 > s0 else np.zeros(0, dtype=np.int64)


def _batches(rows: list, batch_size: int):
    """Rows (doc_slot, tokens, first_target_in_window) -> padded numpy batches, longest first.

    Yields (slots [b], tokens [b, s], labels [b, s], mask [b, s]) with s = longest input in the batch.
    """
    rows = sorted(rows, key=lambda r: -len(r[1]))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        s = max(len(r[1]) for r in chunk) - 1
        tokens = np.zeros((len(chunk), s), dtype=np.int64)
        labels = np.zeros((len(chunk), s), dtype=np.int64)
        mask = np.zeros((len(chunk), s), dtype=bool)
        for j, (_, w, first) in enumerate(chunk):
            tokens[j, :len(w) - 1] = w[:-1]
            labels[j, :len(w) - 1] = w[1:]
            mask[j, first - 1:len(w) - 1] = True  # label position k predicts window token k + 1
        yield np.array([r[0] for r in chunk]), tokens, labels, mask


def score_block(ds: IndexedDataset, start: int, stop: int, scorer, cfg: ScoreConfig):
    """NLL sums [stop - start] float64, scored tokens [..] int64 and window count of a block."""
    rows = []
    for d in range(start, stop):
        doc = document_tokens(ds, d)
        if cfg.prepend_id is not None:
            doc = np.concatenate([[cfg.prepend_id], doc])
        for begin, end, first in plan_windows(len(doc), cfg.window, cfg.stride):
            rows.append((d - start, doc[begin:end], first - begin))
    nll = np.zeros(stop - start, dtype=np.float64)
    count = np.zeros(stop - start, dtype=np.int64)
    for slots, tokens, labels, mask in _batches(rows, cfg.batch_size):
        s, c = scorer.nll(tokens, labels, mask)
        np.add.at(nll, slots, s)
        np.add.at(count, slots, c)
    return nll, count, len(rows)


def perplexity(nll_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """exp(nll / count) as float32, +inf where nothing was scored."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ppl = np.exp(np.where(count > 0, nll_sum / np.maximum(count, 1), np.inf))
    return ppl.astype(np.float32)


def _publish(cfg: ScoreConfig, scorer, store: BlockStore, ds: IndexedDataset, own: dict,
             own_docs: int, t0: float) -> dict:
    """Rank 0, every block done: write the field and the report (``own``: rank 0's figures of
    this run), remove the block state; returns the report."""
    arrays = store.assemble()
    ppl = perplexity(arrays["nll_sum"], arrays["count"])
    write_metadata_field(cfg.prefix, cfg.field, ppl,
                         description=f"perplexity under {scorer.identity.get('path')} "
                                     f"(window {cfg.window}, stride {cfg.stride})")
    finite = ppl[np.isfinite(ppl)]
    seconds = time.time() - t0
    report = {
        "dataset": cfg.prefix, "field": cfg.field, "model": scorer.identity,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("kill_after_blocks",)},
        "documents": ds.num_documents, "blocks": store.num_blocks, **own,
        "tokens_scored": int(arrays["count"].sum()),
        "no_scored_token": int((arrays["count"] == 0).sum()),
        "ppl_min": float(finite.min()) if finite.size else None,
        "ppl_median": float(np.median(finite)) if finite.size else None,
        "ppl_max": float(finite.max()) if finite.size else None,
        "seconds": round(seconds, 3),
        "docs_per_s_rank0": round(own_docs / seconds, 3) if seconds > 0 else None,
    }
    atomic_write_json(f"{cfg.prefix}.{cfg.field}.report.json", report, indent=2)
    store.remove()
    return report


def run_score(cfg: ScoreConfig, scorer) -> dict | None:
    """Score every document (this rank's share), then rank 0 writes the field; returns the report
    on rank 0 (None elsewhere). Every rank of the job must call it."""
    from tqdm import tqdm

    t0 = time.time()
    ds = IndexedDataset(cfg.prefix)
    rank = int(os.environ.get("RANK", "0"))
    run_config = {"field": cfg.field, "idx_fingerprint": idx_fingerprint(cfg.prefix),
                  "model": scorer.identity, "window": cfg.window, "stride": cfg.stride,
                  "prepend_id": cfg.prepend_id, "dtype": scorer.dtype,
                  "vocab_size": scorer.vocab_size}
    store = open_on_every_rank(cfg.state_path, rank=rank, restart=cfg.restart, config=run_config,
                               num_items=ds.num_documents, block_size=cfg.block_size)
    resumed = len(store.done_blocks())
    todo = store.pending()
    mine = todo[scorer.dp_rank::scorer.dp_size]
    scorer.barrier()  # every rank has listed the pending blocks before anyone saves
    kill = KillAfterBlocks(cfg.kill_after_blocks, pending=len(todo), workers=scorer.dp_size,
                           barrier=scorer.barrier, error=ScoreError)
    total_docs = sum(store.block_range(b)[1] - store.block_range(b)[0] for b in mine)
    bar = tqdm(total=total_docs, unit="doc", desc=f"score_ppl {cfg.field}", dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    windows = tokens = saved = 0
    t_scoring, cpu_scoring = time.perf_counter(), time.process_time()
    for b in mine:
        start, stop = store.block_range(b)
        nll, count, n_windows = score_block(ds, start, stop, scorer, cfg)
        windows += n_windows
        tokens += int(count.sum())
        if scorer.is_writer:
            store.save(b, nll_sum=nll, count=count)
        saved += 1
        bar.update(stop - start)
        kill.block_done(saved)  # every rank of a replica counts its blocks, writer or not
    scoring_seconds = time.perf_counter() - t_scoring
    scoring_cpu_seconds = time.process_time() - cpu_scoring  # all threads of this process
    bar.close()
    scorer.barrier()
    own = {"blocks_resumed": resumed, "blocks_scored_by_rank0": len(mine),
           "dp_size": scorer.dp_size, "docs_scored_rank0": total_docs,
           "windows_rank0": windows, "tokens_scored_rank0": tokens,
           "scoring_seconds_rank0": round(scoring_seconds, 3),
           "scoring_cpu_seconds_rank0": round(scoring_cpu_seconds, 3),
           "tokens_per_s_rank0": round(tokens / scoring_seconds, 1) if scoring_seconds else None}
    report = _publish(cfg, scorer, store, ds, own, total_docs, t0) if rank == 0 else None
    scorer.barrier()
    return report


def reference_perplexity(model, doc: np.ndarray, window: int, stride: int) -> float:
    """transformers' recipe, literally (for tests and spot checks): strided windows, labels -100
    outside each window's new targets, the model's own shifted loss. ``model``: a HF causal LM."""
    import torch

    ids = torch.as_tensor(np.asarray(doc, dtype=np.int64)).unsqueeze(0)
    n = ids.shape[1]
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        inp = ids[:, begin:end]
        target = inp.clone()
        target[:, :-trg_len] = -100
        valid = int((target[:, 1:] != -100).sum())
        if valid:
            with torch.no_grad():
                loss = model(inp, labels=target).loss
            nll_sum += float(loss) * valid
            count += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / count) if count else math.inf


__all__ = ["ScoreConfig", "ScoreError", "document_tokens", "perplexity", "plan_windows",
           "reference_perplexity", "run_score", "score_block"]
