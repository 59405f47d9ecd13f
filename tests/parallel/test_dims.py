"""The parallel layout is validated before any process group exists."""

import os
import subprocess
import sys

import pytest

from megasyne.parallel.dims import ParallelConfigError, ParallelDims
from tests.launch import REPO_ROOT, free_port


def test_dp_is_derived_from_world_size():
    assert ParallelDims(tp=2, pp=2, world_size=8).dp == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=2, pp=2, world_size=6), "not divisible by tp\\*pp\\*cp"),
    (dict(tp=2, dp=2, world_size=8), "must multiply to the number of ranks"),
    (dict(tp=0, world_size=1), "parallel.tp must be a positive integer"),
    (dict(sequence_parallel=True, world_size=1), "sequence_parallel needs tp >= 2"),
    (dict(virtual_pp=2, world_size=1), "needs pp >= 2"),
    (dict(overlap_param_gather=True, world_size=2), "overlap_param_gather needs distributed_opt"),
    (dict(overlap_param_gather=True, distributed_optimizer=True, overlap_grad_reduce=False,
          world_size=2), "overlap_param_gather needs overlap_grad_reduce"),
    (dict(ddp_bucket_size=0, world_size=1), "ddp_bucket_size must be a positive number"),
    (dict(ddp_bucket_size=True, world_size=1), "ddp_bucket_size must be a positive number"),
])
def test_bad_layouts(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize("kwargs, overlapped", [
    (dict(), False),                                                   # plain optimizer
    (dict(distributed_optimizer=True), True),                          # the default with ZeRO-1
    (dict(distributed_optimizer=True, overlap_grad_reduce=False), False),
    (dict(distributed_optimizer=True, overlap_param_gather=False), False),
])
def test_param_gather_overlap_defaults(kwargs, overlapped):
    dims = ParallelDims(world_size=2, **kwargs)
    assert dims.overlap_grad_reduce == kwargs.get("overlap_grad_reduce", True)
    assert dims.param_gather_overlapped is overlapped


@pytest.mark.parametrize("kwargs, model, message", [
    (dict(tp=3, world_size=3), dict(num_attention_heads=8, num_query_groups=2),
     "8 attention heads are not divisible by tp=3: choose tp among \\[1, 2\\]"),
    (dict(tp=4, world_size=4), dict(num_attention_heads=8, num_query_groups=2),
     "2 KV \\(query\\) groups are not divisible by tp=4"),
    (dict(pp=2, virtual_pp=2, world_size=2), dict(num_layers=6),
     "6 layers cannot be split evenly into pp\\*virtual_pp = 4"),
])
def test_model_dependent_checks(kwargs, model, message):
    shape = dict(num_layers=4, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=160)
    shape.update(model)
    with pytest.raises(ParallelConfigError, match=message):
        ParallelDims(**kwargs).validate_for_model(**shape)


def test_world_size_mismatch_fails_before_process_group():
    """2 ranks launched for a layout made for 4: every rank raises, nobody hangs."""
    code = (
        "import megasyne\n"
        "from megasyne.parallel.dims import ParallelDims\n"
        "from megasyne.parallel.init import init_parallel\n"
        "import torch.distributed as dist\n"
        "try:\n"
        "    init_parallel(ParallelDims(tp=2, world_size=4))\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, e, 'initialized=', dist.is_initialized())\n"
    )
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "ERR ParallelConfigError" in proc.stdout, proc.stderr[-3000:]
    assert "set --nproc_per_node" in proc.stdout
    assert "initialized= False" in proc.stdout
