"""Save/resume worker (launched by test_resume.py on 2 ranks).

Usage: resume_worker.py MODE OUT_DIR CASE [CASE ...], CASE = SAVE_LAYOUT>RESUME_LAYOUT.
MODE "full": train 3 steps at SAVE_LAYOUT, checkpoint (model + optimizer) after step 1,
record the 3 losses. MODE "resume": load that checkpoint at RESUME_LAYOUT, train steps
2-3, record the 2 losses. Results go to OUT_DIR/<case>.<mode>.json.
"""

import json
import os
import sys

import torch.distributed as dist

import megasyne  # noqa: F401
from megasyne.checkpoint.dist import load_checkpoint, save_checkpoint
from megasyne.model.builder import build_model
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
from megasyne.training.step import train_step
from tests.parallel.parity_worker import SEQ, global_batches, micro_batches

LAYOUTS = {
    "dp": dict(), "dp_distopt": dict(distributed_optimizer=True),
    "tp": dict(tp=2), "tp_distopt": dict(tp=2, distributed_optimizer=True),
    "pp": dict(pp=2), "pp_distopt": dict(pp=2, distributed_optimizer=True),
    # torch's fused AdamW (the CUDA default), which also runs on CPU
    "dp_distopt_fused": dict(distributed_optimizer=True, fused_adam=True),
}


def run(mode: str, out_dir: str, case: str) -> None:
    from megatron.core import parallel_state as ps

    save_layout, resume_layout = case.split(">")
    layout = save_layout if mode == "full" else resume_layout
    spec = dict(LAYOUTS[layout])
    fused = spec.pop("fused_adam", False)
    dims = ParallelDims(world_size=2, **spec)
    init_parallel(dims, seed=0)
    cfg = tiny_debug()
    ddp = wrap_ddp(build_model(cfg, dims), dims)
    optimizer = build_optimizer(ddp, dims, OptimConfig(lr=1e-3, fused_adam=fused))
    root = os.path.join(out_dir, case.replace(">", "_to_"))
    start = 0
    if mode == "resume":
        start = load_checkpoint(root, ddp, optimizer=optimizer,
                                model_config=cfg.to_dict())["iteration"]
    losses = []
    batches = global_batches()
    for step in range(start, 3):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        mbs = micro_batches(batches[step], ps.get_data_parallel_rank(), dims.dp, 1)
        iters = [iter(mbs) for _ in ddp] if len(ddp) > 1 else iter(mbs)
        losses.append(train_step(ddp, optimizer, iters, num_microbatches=len(mbs),
                                 micro_batch_size=1, seq_length=SEQ).loss)
        if mode == "full" and step == 0:
            save_checkpoint(root, 1, ddp, model_config=cfg.to_dict(), layout=spec,
                            optimizer=optimizer)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"{case}.{mode}.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    mode, out_dir, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    for case in cases:
        run(mode, out_dir, case)
