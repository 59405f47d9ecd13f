"""From the mixture index to micro-batches: global sample i is a pure function of i.

Step s consumes global samples [s*G, (s+1)*G); data-parallel rank d takes the d-th
contiguous slice of G/dp of them, in order, split into micro-batches. A resumed run
starts at consumed_samples = s*G and reads exactly what the uninterrupted run would.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megasyne.training.documents import (
    DocumentMasking,
    document_ids,
    eod_loss_mask,
    reset_position_ids,
)

NO_MASKING = DocumentMasking()


def build_index_on_rank0(recipe_path: str, index_dir: Path, *, keep_stale: bool = False):
    """Rank 0 builds (or validates the cache of) the mixture index; the others wait.

    The outcome is broadcast, so a failure on rank 0 becomes the same clear error on
    every rank instead of the others hanging at a barrier. ``keep_stale``: an index of other
    inputs found there is kept beside it (see ``build_or_load_index``).
    """
    from megasyne.data.mixture import build_or_load_index
    from megasyne.data.recipe import load_recipe

    status = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            build_or_load_index(load_recipe(recipe_path), index_dir, keep_stale=keep_stale)
            status = ["ok"]
        except Exception as exc:  # re-raised on every rank below
            status = [f"{type(exc).__name__}: {exc}"]
    if dist.is_initialized():
        dist.broadcast_object_list(status, src=0)
    if status[0] != "ok":
        from megasyne.errors import DataError  # every rank raises the same, printable error

        raise DataError(f"building the mixture index for {recipe_path} failed: {status[0]}")
    from megasyne.data.dataset import MixtureDataset

    return MixtureDataset(index_dir)


def micro_batches(dataset, *, first_sample: int, per_rank: int, dp_rank: int,
                  micro_batch_size: int, masking: DocumentMasking = NO_MASKING,
                  eod_id: int | None = None) -> list[dict]:
    """This DP rank's micro-batches of one step, starting at global sample ``first_sample``.

    With ``masking`` (``megasyne.training.documents``; ``eod_id`` from the data's reports):
    positions restart after each EOD and ``document_ids`` [b, s] tells the model which tokens
    may attend to which (``enabled``); the loss skips labels that follow an EOD
    (``eod_mask_loss``). Without it, the plain causal sample of before.
    """
    if masking.needs_eod and eod_id is None:
        raise ValueError("micro_batches: document masking needs the EOD id of the data")
    start = first_sample + dp_rank * per_rank
    out = []
    for k in range(0, per_rank, micro_batch_size):
        items = [dataset[i] for i in range(start + k, start + k + micro_batch_size)]
        tokens = torch.from_numpy(np.stack([it["tokens"] for it in items]).astype(np.int64))
        b, s1 = tokens.shape
        seq = s1 - 1
        mb = dict(
            tokens=tokens[:, :-1].contiguous(),           # [b, s]
            labels=tokens[:, 1:].contiguous(),            # [b, s]
            loss_mask=torch.ones(b, seq),                 # [b, s]
            position_ids=torch.arange(seq).unsqueeze(0).expand(b, -1),
            source=torch.tensor([int(it["source"]) for it in items]),  # [b]
            sample_ids=list(range(start + k, start + k + micro_batch_size)),
        )
        inputs = mb["tokens"].numpy()
        if masking.eod_mask_loss:
            mb["loss_mask"] = torch.from_numpy(eod_loss_mask(inputs, eod_id))
        if masking.enabled:
            docs = document_ids(inputs, eod_id)                          # [b, s]
            mb["document_ids"] = torch.from_numpy(docs)
            mb["position_ids"] = torch.from_numpy(reset_position_ids(docs))
        out.append(mb)
    return out


def batch_crc(batch: list[dict]) -> int:
    """CRC32 of a rank's micro-batches: every input token, then each sample's last label (the
    one token the inputs do not hold), micro-batch by micro-batch."""
    crc = 0
    for mb in batch:
        crc = zlib.crc32(mb["tokens"].numpy().tobytes(), crc)
        crc = zlib.crc32(mb["labels"][:, -1:].numpy().tobytes(), crc)
    return crc


def pinned(batch: list[dict]) -> list[dict]:
    """The micro-batches with their tensors in pinned (page-locked) host memory, so that the
    upload to the GPU (``step._upload``: ``pin_memory()`` of a pinned tensor returns it, no
    second copy) is queued without waiting. ``document_ids`` stay as they are: they are read
    on the CPU (cu_seqlens are made from them there), never uploaded."""
    return [{k: v.pin_memory() if isinstance(v, torch.Tensor) and k != "document_ids" else v
             for k, v in mb.items()} for mb in batch]


def check_vocabulary(dataset, vocab_size: int, what: str) -> None:
    """Fail before training when a source was tokenised for a larger vocabulary than the model's.

    preprocess_data.py records its tokenizer beside each dataset (``<prefix>.report.json``);
    all sources of a run must share one tokenizer and fit the model's vocabulary. Datasets
    made by other tools carry no report: their token ids are checked against the model by
    Megatron's embedding at the first step instead (an index error naming no file), so we
    say which sources could not be checked.
    """
    import json
    import warnings

    seen, unchecked = {}, []
    for source in dataset.meta["sources"]:
        prefix = source["prefix"]
        report = Path(prefix + ".report.json")
        if not report.is_file():
            unchecked.append(prefix)
            continue
        tok = json.loads(report.read_text()).get("tokenizer", {})
        if tok.get("vocab_size", 0) > vocab_size:
            raise ValueError(
                f"{what}: {prefix} was tokenised with {tok.get('path')} (vocabulary "
                f"{tok['vocab_size']}) but the model's vocab_size is {vocab_size}: use the "
                f"model's tokenizer, or set model_overrides.vocab_size")
        seen[prefix] = tok.get("sha256")
    if len(set(seen.values())) > 1:
        detail = "; ".join(f"{p}: {h[:12] if h else None}" for p, h in seen.items())
        raise ValueError(f"{what}: sources were tokenised with different tokenizers ({detail})")
    if unchecked:
        warnings.warn(f"{what}: no preprocess report beside {unchecked}; their token ids are not "
                      f"checked against the model's vocabulary ({vocab_size})", stacklevel=2)
