"""Worker for test_old_distopt_checkpoints.py (2 ranks: PP2 x DP1, distributed optimizer).

Usage: old_distopt_worker.py OUT_DIR. For each model of CASES it builds the model with
overlapped reduction off (the only way before the dist_opt_buckets fix), records each gradient
buffer's real buckets next to ``old_buckets_shifted``'s prediction for them, trains one step,
saves, then loads into a fresh model and optimizer (overlap on, as resumes build them now):
with the manifest's state-layout marker, and again with the marker stripped (a checkpoint of
the old code). Each load records either the error or whether every Adam moment came back.
Writes OUT_DIR/rank<r>.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint.dist import (
    MANIFEST,
    CheckpointError,
    _torch_optimizers,
    load_checkpoint,
    save_checkpoint,
)
from megasyne.checkpoint.dist_opt_layout import STATE_LAYOUT_KEY, old_buckets_shifted
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
from megasyne.training.step import train_step
from tests.parallel.parity_worker import SEQ, global_batches, micro_batches

# Two layers: one per stage. ffn 161 makes a layer 645 x 64 elements, so the first stage's
# layer bucket ends 64 short of a multiple of 128 and gets end padding before the embedding's
# bucket; ffn 160 makes it 642 x 64 (no padding: several buckets, nothing shifted).
CASES = {
    "tied_padded": dict(tie_word_embeddings=True, ffn_hidden_size=161),
    "tied_aligned": dict(tie_word_embeddings=True, ffn_hidden_size=160),
    "untied": dict(tie_word_embeddings=False, ffn_hidden_size=161),
}


def build(model_cfg, overlap: bool):
    dims = ParallelDims(world_size=int(os.environ["WORLD_SIZE"]), pp=2,
                        distributed_optimizer=True, overlap_grad_reduce=overlap)
    init_parallel(dims, seed=0)
    ddp = wrap_ddp(build_model(model_cfg, dims, ModelRuntime()), dims)
    return dims, ddp, build_optimizer(ddp, dims, OptimConfig(lr=1e-3))


def adam_state(optimizer) -> list[torch.Tensor]:
    return [opt.state[p][k].clone() for opt in _torch_optimizers(optimizer)
            for group in opt.param_groups for p in group["params"]
            for k in ("exp_avg", "exp_avg_sq")]


def buckets(ddp) -> list[dict]:
    """Per gradient buffer: its bucket count, whether a bucket other than the last has end
    padding (megatron-core's own layout), and the prediction from its parameters alone."""
    out = []
    for buffer in (b for chunk in ddp for b in chunk.buffers):
        bs = buffer.buckets
        out.append(dict(n=len(bs),
                        padded=any(a.offset + a.numel_unpadded != b.offset
                                   for a, b in zip(bs, bs[1:])),
                        predicted=old_buckets_shifted(buffer.params,
                                                      buffer.data_parallel_world_size)))
    return out


def try_load(root: str, model_cfg, saved: list) -> dict:
    _, ddp, optimizer = build(model_cfg, overlap=True)
    try:
        load_checkpoint(root, ddp, optimizer=optimizer, model_config=model_cfg.to_dict())
    except CheckpointError as exc:
        return dict(error=str(exc))
    got = adam_state(optimizer)
    return dict(error=None, same_adam=len(got) == len(saved)
                and all(torch.equal(a, b) for a, b in zip(got, saved)))


def run_case(out_dir: str, case: str) -> dict:
    from megatron.core import parallel_state as ps

    model_cfg = tiny_debug(num_layers=2, **CASES[case])
    dims, ddp, optimizer = build(model_cfg, overlap=False)
    rec = dict(buckets=buckets(ddp))
    mbs = micro_batches(global_batches()[0], ps.get_data_parallel_rank(), dims.dp, 1)
    train_step(ddp, optimizer, iter(mbs), num_microbatches=len(mbs), micro_batch_size=1,
               seq_length=SEQ)
    root = os.path.join(out_dir, case)
    path = save_checkpoint(root, 1, ddp, model_config=model_cfg.to_dict(),
                           layout=dims.layout_dict(), optimizer=optimizer)
    saved = adam_state(optimizer)
    assert any(t.abs().sum() > 0 for t in saved)  # it stepped: the moments are not zeros
    rec["fixed"] = try_load(root, model_cfg, saved)
    if dist.get_rank() == 0:  # an old checkpoint: the same, without the marker
        manifest = json.loads((path / MANIFEST).read_text())
        rec["marker"] = manifest.pop(STATE_LAYOUT_KEY)
        (path / MANIFEST).write_text(json.dumps(manifest))
    dist.barrier()
    rec["old"] = try_load(root, model_cfg, saved)
    return rec


if __name__ == "__main__":
    out = sys.argv[1]
    result = {case: run_case(out, case) for case in CASES}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
