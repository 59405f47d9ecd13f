"""torchrun worker (2 ranks, DP2): rank 0's publish of a checkpoint fails after the sharded
write (its manifest write raises, as a full disk or a dead filesystem would); every rank must
end with an error instead of the other rank waiting forever at a barrier.

Usage: publish_worker.py ROOT. Each rank writes ROOT/rank<r>.txt with the error it ended with.
"""

import sys
from pathlib import Path

import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint import dist as ckpt
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import tiny_debug
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.optim import wrap_ddp

if __name__ == "__main__":
    root = Path(sys.argv[1])
    dims = ParallelDims(world_size=2)
    init_parallel(dims, seed=0)
    cfg = tiny_debug()
    chunks = wrap_ddp(build_model(cfg, dims, ModelRuntime()), dims)
    if dist.get_rank() == 0:  # the fault: rank 0 cannot write the manifest
        def failing_write(path, text):
            raise OSError(28, "No space left on device", str(path))

        ckpt.atomic_write_text = failing_write
    try:
        ckpt.save_checkpoint(root / "checkpoints", 1, chunks, model_config=cfg.to_dict(),
                             layout=dims.layout_dict())
        outcome = "saved"
    except ckpt.CheckpointError as exc:
        outcome = f"CheckpointError: {exc}"
    (root / f"rank{dist.get_rank()}.txt").write_text(outcome)
