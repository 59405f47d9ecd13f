"""Process groups for a run: the one place where parallelism is set up.

``init_parallel(dims)`` validates the layout against the launcher's world size,
creates the default process group (NCCL on GPUs, gloo on CPU), the Megatron-Core
model-parallel groups, and the RNG tracker. It applies the CPU shims first when
there is no CUDA (megasyne.megatron_patches).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megasyne import megatron_patches
from megasyne.parallel.dims import ParallelConfigError, ParallelDims


def launcher_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (single process: 0, 0, 1)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def init_parallel(dims: ParallelDims, *, seed: int = 1234, timeout_s: float = 600) -> None:
    """Create process groups for ``dims``; every rank must call it with the same dims."""
    from megatron.core import parallel_state, tensor_parallel

    rank, local_rank, world_size = launcher_world()
    if dims.world_size != world_size:
        # Fails on every rank identically and before any collective: nobody hangs.
        raise ParallelConfigError(
            f"the parallel layout was made for world size {dims.world_size} but torchrun "
            f"started {world_size} ranks: set --nproc_per_node (x nnodes) to {dims.world_size} "
            f"or change tp/pp/dp"
        )
    megatron_patches.apply_cpu_shims()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A plain single process (a tool, a scorer, a test): an in-process store, no TCP
            # port. Picking a "free" port and binding it later raced with other processes
            # on the machine (EADDRINUSE seen once in the score_ppl tests).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=timeout)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vp_size,
        context_parallel_size=dims.cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_rehearsal(dims: ParallelDims, *, rank: int, seed: int = 1234) -> None:
    """Process groups of ``dims`` at its full world size inside this one process, playing
    ``rank``: torch's fake backend (every collective returns at once, nothing is exchanged),
    for a dry run that builds a rank's model on the meta device and runs every set-up check of
    the real layout without its GPUs. Megatron's gloo side groups are not created (they would
    need real peers)."""
    from megatron.core import parallel_state, tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < dims.world_size:
        raise ParallelConfigError(f"rank {rank} outside the world of {dims.world_size}")
    megatron_patches.apply_cpu_shims()
    destroy_parallel()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vp_size,
        context_parallel_size=dims.cp,
        create_gloo_process_groups=False,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where small tensors of our own collectives must live: NCCL reduces only CUDA tensors
    ("No backend type associated with device type cpu"), gloo only CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
