"""Worker for the overlap parity tests (launched by test_overlap.py under torchrun).

Usage: overlap_worker.py OUT_DIR CASE [CASE ...]; each CASE (a layout of CASES) runs three
trainings of STEPS steps in turn on the same initial weights and global batches:

- "off": overlap_grad_reduce=False (one bucket, reduced synchronously in finalize_model_grads;
  the distributed optimizer all-gathers inside optimizer.step);
- "on": the defaults (overlapped reduce; with the distributed optimizer, the parameter gather
  left to the next forward) with small buckets (several per chunk). After step 1 it saves a
  checkpoint, after step 2 it scores two rows with MegatronScorer (see
  ``score``), both while the parameter gather is pending;
- "resume": overlap on, loads that checkpoint's weights alone (recorded),
  then weights and optimizer, and trains steps 2..STEPS.

Each run records per-step losses and grad norms, whether each step's reduces were launched
before finalize_model_grads waited on them ("early"), whether a parameter gather was left
pending after the step, the scorer's NLL, and the full parameters at the end, in
OUT_DIR/<case>.pt (rank 0).
"""

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint.dist import load_checkpoint, save_checkpoint
from megasyne.checkpoint.sharding import gather_full_state
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.scorers import MegatronScorer
from megasyne.training.optim import OptimConfig, build_optimizer, finish_param_gather, wrap_ddp
from megasyne.training.step import train_step
from tests.parallel.parity_worker import SEQ, STEPS, VOCAB, global_batches, merge_stages, micro_batches

# tiny_debug holds ~0.2M parameters: 20k per bucket gives the first chunk several buckets.
BUCKET = 20_000
CASES = {
    "dp2": dict(),
    "dp2_distopt": dict(distributed_optimizer=True),
    "tp2_dp2": dict(tp=2, sequence_parallel=True),
    "pp2_dp2_distopt": dict(pp=2, distributed_optimizer=True),
    "vp2_dp2_distopt": dict(pp=2, virtual_pp=2, distributed_optimizer=True),
}


def instrument(ddp: list, events: list) -> None:
    """Log each bucket group's reduce launch ("start") and each chunk's wait ("finish")."""
    def logged(name, fn):
        def call(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return call

    for chunk in ddp:
        chunk.finish_grad_sync = logged("finish", chunk.finish_grad_sync)
        for group in chunk.bucket_groups:
            group.start_grad_sync = logged("start", group.start_grad_sync)


def build(case: str, overlap: bool, init_state: list | None):
    from megatron.core import parallel_state as ps

    dims = ParallelDims(world_size=int(os.environ["WORLD_SIZE"]), overlap_grad_reduce=overlap,
                        ddp_bucket_size=BUCKET if overlap else None, **CASES[case])
    init_parallel(dims, seed=0)
    chunks = build_model(tiny_debug(), dims, ModelRuntime())
    if init_state is None:
        init_state = [{k: v.clone() for k, v in c.state_dict().items()
                       if isinstance(v, torch.Tensor)} for c in chunks]
    else:
        for c, state in zip(chunks, init_state):
            c.load_state_dict(state, strict=False)
    ddp = wrap_ddp(chunks, dims)
    # Clipping scales every update by 1 / grad norm, and the distributed optimizer sums its
    # partial norms over other parameter partitions when the buckets change: without clipping
    # there, the updates are exactly comparable (the norm itself is compared within noise).
    clip = 0.0 if dims.distributed_optimizer else 1.0
    optimizer = build_optimizer(ddp, dims, OptimConfig(lr=1e-3, adam_eps=1e-6, clip_grad=clip))
    assert dims.param_gather_overlapped == (overlap and dims.distributed_optimizer)
    return dims, ddp, optimizer, init_state, ps


def train(case: str, mode: str, root: str, init_state: list | None):
    dims, ddp, optimizer, init_state, ps = build(case, mode != "off", init_state)
    start = 0
    rec = {}
    if mode == "resume":
        # The weights alone first (what an export or an evaluation reads): the post-step ones?
        load_checkpoint(root, ddp, model_config=tiny_debug().to_dict())
        rec["loaded"] = full_params(ddp, ps)
        start = load_checkpoint(root, ddp, optimizer=optimizer,
                                model_config=tiny_debug().to_dict())["iteration"]
    events: list = []
    instrument(ddp, events)
    rec.update(losses=[], norms=[], early=[], pending=[],
               groups=sum(len(c.bucket_groups) for c in ddp))
    batches = global_batches()
    for step in range(start, STEPS):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        mbs = micro_batches(batches[step], ps.get_data_parallel_rank(), dims.dp, 1)
        iters = [iter(mbs) for _ in ddp] if len(ddp) > 1 else iter(mbs)
        events.clear()
        result = train_step(ddp, optimizer, iters, num_microbatches=len(mbs),
                            micro_batch_size=1, seq_length=SEQ)
        rec["losses"].append(result.loss)
        rec["norms"].append(result.grad_norm)
        first_wait = events.index("finish")
        rec["early"].append(events[:first_wait].count("start"))
        rec["pending"].append(any(not g.param_gather_dispatched for c in ddp
                                  if c.use_forward_hook for g in c.bucket_groups))
        if mode == "on" and step == 0:
            save_checkpoint(root, 1, ddp, model_config=tiny_debug().to_dict(),
                            layout=dims.layout_dict(), optimizer=optimizer)
            rec["saved"] = full_params(ddp, ps)
        if mode != "resume" and step == 1:  # a step after the save: nothing gathered it
            rec["nll"] = score(ddp, ps, batches[0][:2].numpy())
    finish_param_gather(ddp)  # the last step's gather is still pending with overlap
    rec["params"] = full_params(ddp, ps)
    return rec, init_state


def score(ddp: list, ps, rows: np.ndarray) -> list | None:
    """NLL of ``rows`` [2, SEQ + 1] by the scorer on the trainer's chunks. Scoring needs only the
    TP and PP peers of one model replica, so only data-parallel replica 0 scores: a parameter
    gather left to the forward's hooks would then wait for ranks that never come (the scorer
    must finish it when built, on every rank)."""
    scorer = MegatronScorer(ddp, vocab_size=VOCAB)
    nll = None
    if ps.get_data_parallel_rank() == 0:
        nll = scorer.nll(rows[:, :-1], rows[:, 1:], np.ones((2, SEQ), dtype=bool))[0].tolist()
    # The ranks meet again (as the trainer's metrics all-reduce makes them): had a gather been
    # started by rank 0's forward alone, it would wait here forever (a launch timeout).
    dist.barrier()
    return nll


def full_params(ddp: list, ps) -> dict:
    """Every parameter in full (gather_full_state finishes a pending parameter gather first)."""
    return merge_stages([gather_full_state(c, ps.get_tensor_model_parallel_group()) for c in ddp])


def run_case(out_dir: str, case: str) -> None:
    root = os.path.join(out_dir, f"{case}_ckpt")
    off, init_state = train(case, "off", root, None)
    on, _ = train(case, "on", root, init_state)
    resumed, _ = train(case, "resume", root, init_state)
    if dist.get_rank() == 0:
        torch.save(dict(off=off, on=on, resume=resumed), os.path.join(out_dir, f"{case}.pt"))
    dist.barrier()


if __name__ == "__main__":
    out_dir, cases = sys.argv[1], sys.argv[2:]
    for case in cases:
        run_case(out_dir, case)
