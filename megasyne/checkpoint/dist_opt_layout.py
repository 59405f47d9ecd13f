"""Distributed-optimizer checkpoints written before the ``dist_opt_buckets`` fix: refused where
their Adam state is shifted.

Before the fix (``megasyne/megatron_patches/dist_opt_buckets.py``) a gradient buffer with more
than one bucket saved every parameter after a padded bucket end with the master weights and Adam
moments of other elements. Gradient reduction was not overlapped then (no ``bucket_size``: one
bucket per buffer), except that megatron-core 0.16.1 gives the tied embedding its own bucket at
PP > 1 with the distributed optimizer (the ``shared_embedding`` parameter on the first and last
stage). The padding at the end of the bucket before it is zero whenever the bucket's size is a
multiple of lcm(dp, 128) (e.g. all of Llama-3's widths at a power-of-two DP); otherwise the
state of the embedding (first stage) or of every layer (last stage) was saved shifted, and a
resume from it trains on corrupted optimizer state without any error (measured in
docs/design.md, "Distributed checkpointing").

Every save since the fix writes ``STATE_LAYOUT_KEY: STATE_LAYOUT`` into the manifest. A
checkpoint without it, from a distributed-optimizer run at PP > 1 with tied embeddings, is
loaded with its optimizer state only when the bucket layout the old code had for it (recomputed
here from the parameters, megatron-core's algorithm without ``bucket_size``) has no padding
before a bucket's end other than the last's; that needs the layout it was saved at.

With virtual pipeline stages (interleaved schedule) each model chunk is wrapped in its own DDP
with its own gradient buffers, laid out alone by the same algorithm, and the distributed
optimizer gathers and cuts each buffer on its own: the rule holds per buffer. Only the first
chunk of the first stage (the embedding) and the last chunk of the last stage (the output
layer) hold a ``shared_embedding`` parameter, so only those can have several buckets; every
chunk's buffers are checked, and the number of chunks is part of the layout that must match.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from megasyne.errors import CheckpointError

STATE_LAYOUT_KEY = "dist_opt_state_layout"
STATE_LAYOUT = "buffer-offsets"
"""The fully reshardable optimizer state cut at the gradient buffer's padded offsets (the fix)."""


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def old_buckets_shifted(params: list, dp: int) -> bool:
    """Whether megatron-core 0.16.1, building one gradient buffer of ``params`` (in the order
    DDP passes them) for the distributed optimizer at data-parallel size ``dp`` without a
    ``bucket_size``, padded the end of a bucket other than the last: then the pre-fix
    checkpoint saved the state of every later parameter shifted by that padding.

    The algorithm of ``_ParamAndGradBuffer.__init__``: parameters in reverse order, each start
    aligned to 64 elements; a ``shared_embedding`` parameter closes the bucket before it and
    its own; each bucket's end padded to a multiple of lcm(dp, 128)."""
    divisor = math.lcm(dp, 128)
    padded: list[bool] = []  # per closed bucket: whether its end was padded
    start, open_bucket = 0, False
    for param in params[::-1]:
        start = _pad(start, 64)
        shared = getattr(param, "shared_embedding", False)
        if shared and open_bucket:
            padded.append(_pad(start, divisor) != start)
            start = _pad(start, divisor)
        end = start + param.numel()
        if shared:
            padded.append(_pad(end, divisor) != end)
            start, open_bucket = _pad(end, divisor), False
        else:
            start, open_bucket = end, True
    if not open_bucket:  # the last bucket closed: its end padding is harmless
        padded = padded[:-1]
    return any(padded)


def _layout_here(chunks: list) -> dict:
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size(), chunks=len(chunks))


def check_optimizer_state_layout(manifest: dict, chunks: list, ckpt: Path) -> None:
    """Collective. Before loading optimizer state from ``ckpt``: refuse a pre-fix checkpoint
    whose saved Adam state is shifted (or may be, when this layout cannot tell)."""
    saved = manifest.get("layout") or {}
    if manifest.get(STATE_LAYOUT_KEY) == STATE_LAYOUT or not saved.get("distributed_optimizer"):
        return
    if saved.get("pp", 1) == 1 or not manifest["model"].get("tie_word_embeddings"):
        return  # one bucket per gradient buffer: the old and the fixed state agree
    at = (f"tp={saved.get('tp')}, pp={saved.get('pp')}, dp={saved.get('dp')}, "
          f"virtual_pp={saved.get('virtual_pp')}")
    weights_only = (f"start a new run_dir from its weights alone with --set "
                    f"init_checkpoint={ckpt} (optimizer state, LR schedule and data position "
                    f"then start afresh)")
    here = _layout_here(chunks)
    same = (here["tp"], here["pp"], here["dp"], here["chunks"]) == \
        (saved.get("tp"), saved.get("pp"), saved.get("dp"), saved.get("virtual_pp") or 1)
    if not same:
        raise CheckpointError(
            f"{ckpt} was written before megasyne's fix of the distributed optimizer's "
            f"checkpoint (its manifest has no {STATE_LAYOUT_KEY!r}) by a run with tied embeddings "
            f"at pipeline parallelism, whose Adam state may be saved shifted; whether it is can "
            f"only be computed at the layout it was saved at: resume there once ({at}; the "
            f"next checkpoint is then safe at any layout), or {weights_only}")
    shifted = any(old_buckets_shifted(buffer.params, here["dp"])
                  for chunk in chunks for buffer in chunk.buffers)
    # The stages differ (the first holds the embedding, the last the output layer): all agree.
    flag = torch.tensor([int(shifted)], dtype=torch.int64)
    if dist.is_initialized():
        from megasyne.parallel.init import comm_device

        flag = flag.to(comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise CheckpointError(
            f"{ckpt} was written before megasyne's fix of the distributed optimizer's "
            f"checkpoint (its manifest has no {STATE_LAYOUT_KEY!r}): with tied embeddings at "
            f"{at} a gradient buffer had a bucket padded at its end next to the embedding's own "
            f"bucket, so the Adam moments and fp32 master weights saved for the parameters "
            f"after it belong to other elements and a resume would silently train on them. Its "
            f"model weights are intact: {weights_only}")
