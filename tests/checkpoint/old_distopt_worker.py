"""Worker for test_old_distopt_checkpoints.py (2 ranks: PP2 x DP1, distributed optimizer; some
cases with two virtual stages per rank).

Usage: old_distopt_worker.py OUT_DIR. For each case of CASES it builds the model with
overlapped reduction off (the only way before the dist_opt_buckets fix) and trains one step.
For each gradient buffer (of every model chunk) it records megatron-core's own buckets, whether
megatron-core's own dp-zero state cut at the buffer's offsets (what the old code saved) gives
some parameter other elements' Adam moments, and ``old_buckets_shifted``'s prediction. It then
saves, and loads into a fresh model and optimizer (overlap on, as resumes build them now): with
the manifest's state-layout marker, and again with the marker stripped (a checkpoint of the old
code). Each load records either the error or whether every Adam moment came back.
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

# case -> (tiny_debug overrides, virtual_pp). At DP1 a bucket's end is padded to a multiple of
# 128 elements. ffn 161 makes a layer 645 x 64 elements (64 short of a multiple of 128), ffn 160
# 642 x 64; vocabulary 1000 is padded to 1024 rows of 64, 1001 unpadded stays odd.
# Without virtual stages (two layers, one per stage) the first stage's layer bucket comes before
# the embedding's; with ffn 161 it is padded.
# With two virtual stages (four layers) rank 0 holds the chunks [embedding, layer 0] and
# [layer 2], rank 1 [layer 1] and [layer 3, output layer]: the first and the last chunk have two
# buckets each, the others one. The buffer reversed: chunk [embedding, layer 0] closes layer 0's
# bucket before the embedding's (padded with ffn 161); chunk [layer 3, output layer] starts with
# the output layer's bucket (padded with 1001 x 64 elements), before layer 3's.
CASES = {
    "tied_padded": (dict(num_layers=2, tie_word_embeddings=True, ffn_hidden_size=161), None),
    "tied_aligned": (dict(num_layers=2, tie_word_embeddings=True, ffn_hidden_size=160), None),
    "untied": (dict(num_layers=2, tie_word_embeddings=False, ffn_hidden_size=161), None),
    "vp_first_padded": (dict(tie_word_embeddings=True, ffn_hidden_size=161), 2),
    "vp_last_padded": (dict(tie_word_embeddings=True, ffn_hidden_size=160, vocab_size=1001,
                            make_vocab_size_divisible_by=1), 2),
    "vp_aligned": (dict(tie_word_embeddings=True, ffn_hidden_size=160), 2),
}
ELSEWHERE = "vp_aligned"
"""The case whose old checkpoint is also loaded at PP2 without virtual stages."""


def build(model_cfg, overlap: bool, virtual_pp: int | None):
    dims = ParallelDims(world_size=int(os.environ["WORLD_SIZE"]), pp=2, virtual_pp=virtual_pp,
                        distributed_optimizer=True, overlap_grad_reduce=overlap)
    init_parallel(dims, seed=0)
    ddp = wrap_ddp(build_model(model_cfg, dims, ModelRuntime()), dims)
    return dims, ddp, build_optimizer(ddp, dims, OptimConfig(lr=1e-3))


def adam_state(optimizer) -> list[torch.Tensor]:
    return [opt.state[p][k].clone() for opt in _torch_optimizers(optimizer)
            for group in opt.param_groups for p in group["params"]
            for k in ("exp_avg", "exp_avg_sq")]


def old_state_shifted(optimizer) -> dict[int, bool]:
    """Per gradient buffer (by id): whether megatron-core 0.16.1's own fully reshardable state
    without the fix (its dp-zero state, the buckets end to end, cut at the buffer's offsets)
    gives some parameter other elements' Adam moments than the optimizer holds for it. At DP1
    each rank holds every parameter's whole state."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        packed = opt.get_parameter_state_dp_zero(use_gloo_comm=True)
        for gbuf_idx, buffer in enumerate(opt.buffers):
            (dtype,) = opt.gbuf_ranges[gbuf_idx]
            world = packed[gbuf_idx][dtype]  # [numel_unpadded] per key
            shifted = False
            for param, (start, end, _) in buffer.param_index_map.items():
                held = opt._get_main_param_and_optimizer_states(param)
                for key in ("exp_avg", "exp_avg_sq"):
                    cut = world[key][start:end]  # zero-padded past the end, as megatron does
                    cut = torch.nn.functional.pad(cut, (0, end - start - cut.numel()))
                    shifted |= not torch.equal(cut, held[key].detach().cpu().flatten())
            out[id(buffer)] = shifted
    return out


def buckets(ddp, optimizer) -> list[dict]:
    """Per gradient buffer: its model chunk, its bucket count, whether a bucket other than the
    last has end padding (megatron-core's own layout), whether the old code's saved state is
    shifted, and the prediction from its parameters alone."""
    from megatron.core import parallel_state as ps

    assert ps.get_data_parallel_world_size() == 1  # old_state_shifted reads whole states
    shifted = old_state_shifted(optimizer)
    out = []
    for i, buffer in ((i, b) for i, chunk in enumerate(ddp) for b in chunk.buffers):
        bs = buffer.buckets
        out.append(dict(chunk=i, n=len(bs),
                        padded=any(a.offset + a.numel_unpadded != b.offset
                                   for a, b in zip(bs, bs[1:])),
                        shifted=shifted[id(buffer)],
                        predicted=old_buckets_shifted(buffer.params,
                                                      buffer.data_parallel_world_size)))
    return out


def try_load(root: str, model_cfg, saved: list, virtual_pp: int | None) -> dict:
    _, ddp, optimizer = build(model_cfg, overlap=True, virtual_pp=virtual_pp)
    try:
        load_checkpoint(root, ddp, optimizer=optimizer, model_config=model_cfg.to_dict())
    except CheckpointError as exc:
        return dict(error=str(exc))
    got = adam_state(optimizer)
    return dict(error=None, same_adam=len(got) == len(saved)
                and all(torch.equal(a, b) for a, b in zip(got, saved)))


def run_case(out_dir: str, case: str) -> dict:
    from megatron.core import parallel_state as ps

    overrides, virtual_pp = CASES[case]
    model_cfg = tiny_debug(**overrides)
    dims, ddp, optimizer = build(model_cfg, overlap=False, virtual_pp=virtual_pp)
    mbs = micro_batches(global_batches()[0], ps.get_data_parallel_rank(), dims.dp, 1)
    data = [iter(mbs) for _ in ddp] if len(ddp) > 1 else iter(mbs)  # one per model chunk
    train_step(ddp, optimizer, data, num_microbatches=len(mbs), micro_batch_size=1,
               seq_length=SEQ)
    rec = dict(buckets=buckets(ddp, optimizer))
    root = os.path.join(out_dir, case)
    path = save_checkpoint(root, 1, ddp, model_config=model_cfg.to_dict(),
                           layout=dims.layout_dict(), optimizer=optimizer)
    saved = adam_state(optimizer)
    assert any(t.abs().sum() > 0 for t in saved)  # it stepped: the moments are not zeros
    rec["fixed"] = try_load(root, model_cfg, saved, virtual_pp)
    if dist.get_rank() == 0:  # an old checkpoint: the same, without the marker
        manifest = json.loads((path / MANIFEST).read_text())
        rec["marker"] = manifest.pop(STATE_LAYOUT_KEY)
        (path / MANIFEST).write_text(json.dumps(manifest))
    dist.barrier()
    rec["old"] = try_load(root, model_cfg, saved, virtual_pp)
    if case == ELSEWHERE:
        rec["old_elsewhere"] = try_load(root, model_cfg, saved, None)
    return rec


if __name__ == "__main__":
    out = sys.argv[1]
    result = {case: run_case(out, case) for case in CASES}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
