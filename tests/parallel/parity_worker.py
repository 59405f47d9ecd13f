"""Worker for the parallel parity matrix (launched by test_parity.py under torchrun).

Usage: parity_worker.py OUT_DIR LAYOUT [LAYOUT ...]
- LAYOUT "ref" (1 rank): builds tiny_debug with seed 0, saves its full weights to
  OUT_DIR/init_state.pt, trains, and saves OUT_DIR/ref.pt.
- Any other layout (2 ranks): loads OUT_DIR/init_state.pt into its shards, trains on
  the same global batches, and saves OUT_DIR/<layout>.pt.
Each result holds per-step losses and grad norms, the first step's full gradients
(None with the distributed optimizer, whose grad buffer holds only a shard), and the
full parameters after the last step.
"""

import os
import sys

import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint.sharding import gather_full_state, load_full_state
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
from megasyne.training.step import train_step

SEQ, GLOBAL_BATCH, STEPS, VOCAB = 16, 4, 3, 1000

# layout -> (ParallelDims kwargs, micro_batch_size[, ModelRuntime kwargs])
LAYOUTS = {
    "ref": (dict(), 1),
    "tp2": (dict(tp=2), 1),
    "tp2_sp": (dict(tp=2, sequence_parallel=True), 1),
    "pp2_m2": (dict(pp=2), 2),
    "pp2_m4": (dict(pp=2), 1),
    "pp2_vp2": (dict(pp=2, virtual_pp=2), 1),
    "dp2": (dict(), 1),
    "dp2_distopt": (dict(distributed_optimizer=True), 1),
    # activation recomputation (third element: ModelRuntime overrides)
    "tp2_recompute_full": (dict(tp=2), 1, dict(recompute="full")),
    "pp2_recompute_selective": (dict(pp=2), 1, dict(recompute="selective")),
}


def global_batches() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)


def micro_batches(tokens: torch.Tensor, dp_rank: int, dp: int, mbs: int) -> list[dict]:
    per_rank = GLOBAL_BATCH // dp
    mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    out = []
    for k in range(0, per_rank, mbs):
        seq = mine[k:k + mbs]
        out.append(dict(
            tokens=seq[:, :-1].contiguous(), labels=seq[:, 1:].contiguous(),
            loss_mask=torch.ones(seq.shape[0], SEQ),
            position_ids=torch.arange(SEQ).unsqueeze(0).expand(seq.shape[0], -1),
        ))
    return out


def run_layout(out_dir: str, layout: str) -> None:
    from megatron.core import parallel_state as ps

    kwargs, mbs, *runtime = LAYOUTS[layout]
    runtime = ModelRuntime(**runtime[0]) if runtime else ModelRuntime()
    dims = ParallelDims(world_size=int(os.environ.get("WORLD_SIZE", 1)), **kwargs)
    init_parallel(dims, seed=0)
    cfg = tiny_debug()
    chunks = build_model(cfg, dims, runtime)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), dims.tp
    if layout == "ref":
        full = {}
        for c in chunks:
            full.update(gather_full_state(c))
        torch.save(full, os.path.join(out_dir, "init_state.pt"))
    full = torch.load(os.path.join(out_dir, "init_state.pt"))
    for c in chunks:
        load_full_state(c, full, tp_rank, tp_size)
    ddp = wrap_ddp(chunks, dims)
    # adam_eps 1e-6: an embedding row whose gradient is summation noise (~1e-9; it differs
    # between layouts in relative terms) would otherwise move by a noise-driven fraction of
    # lr in Adam (2.6e-5 seen on one row); with eps above the noise it barely moves.
    optimizer = build_optimizer(ddp, dims, OptimConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0,
                                                       adam_eps=1e-6))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3

    dp_rank = ps.get_data_parallel_rank()
    num_mb = GLOBAL_BATCH // dims.dp // mbs
    losses, norms, first_grads = [], [], None
    for step, tokens in enumerate(global_batches()):
        mbatches = micro_batches(tokens, dp_rank, dims.dp, mbs)
        iters = [iter(mbatches) for _ in ddp] if len(ddp) > 1 else iter(mbatches)
        result = train_step(ddp, optimizer, iters, num_microbatches=num_mb,
                            micro_batch_size=mbs, seq_length=SEQ)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if step == 0 and not dims.distributed_optimizer:
            first_grads = merge_stages([gather_full_state(c, ps.get_tensor_model_parallel_group(),
                                                          grads=True) for c in ddp])
    params = merge_stages([gather_full_state(c, ps.get_tensor_model_parallel_group())
                           for c in ddp])
    if dist.get_rank() == 0:
        torch.save(dict(losses=losses, grad_norms=norms, first_grads=first_grads, params=params),
                   os.path.join(out_dir, f"{layout}.pt"))
    dist.barrier()


def merge_stages(local_dicts: list[dict]) -> dict:
    """Merge this rank's chunks, then every pipeline stage's (TP rank 0, DP rank 0) dicts."""
    from megatron.core import parallel_state as ps

    mine = {}
    for d in local_dicts:
        mine.update(d)
    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0:
        mine = {}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged = {}
    for d in gathered:
        for k, v in d.items():
            merged.setdefault(k, v)  # tied embeddings: first and last stage hold equal copies
    return merged


if __name__ == "__main__":
    out_dir, layouts = sys.argv[1], sys.argv[2:]
    for layout in layouts:
        run_layout(out_dir, layout)
