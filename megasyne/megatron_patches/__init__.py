"""Every runtime change megasyne makes to Megatron-Core, in one place.

megasyne uses megatron-core (pinned to 0.16.1 in requirements-ci.txt) through its public
classes, but a few of its module globals and methods must change at run time: its CUDA
assumptions on a CPU machine, and three empty or slow slots that it fills itself when apex
or Transformer-Engine is absent. This package is the only place in megasyne that assigns to
a megatron module or class (tests/parallel/test_megatron_patches.py scans the sources for any
other), and ``PATCHES`` lists each patch:

- ``targets``: every (module, attribute) it changes (``Class.method`` for a method);
- ``active``: when it changes anything;
- ``why``: what breaks or is slow without it;
- ``apply``: the function of this package that applies it, and who calls that;
- ``checked_against``: the megatron-core version whose source it was checked against.

The patches, in short (details in PATCHES):

- ``cpu_shims``: CPU only (no CUDA); applied by ``parallel.init.init_parallel``.
- ``multi_tensor``: where megatron-core picked its local fallbacks at import (neither apex
  nor TE); applied by ``training.optim.build_optimizer``.
- ``rope_slot``: our kernels on, without TE (the slots, plain and packed sequences, are empty
  then); applied by ``model.builder.transformer_config``.
- ``wgrad_accumulation``: CUDA without apex once a probe passes, or forced
  (``ModelRuntime.wgrad_fusion=True``); applied by ``model.builder.transformer_config``.
- ``writer_queue``: always, at the first checkpoint save; applied by
  ``checkpoint.dist.prepare_save``.
- ``dist_opt_buckets``: always (a correctness fix of the distributed optimizer's fully
  reshardable checkpoint when a buffer has several buckets); applied by
  ``training.optim.build_optimizer``.

Modules: ``cpu_shims`` (the CUDA-to-CPU stand-ins), ``multi_tensor_fallbacks``, ``rope_slot``,
``wgrad_slot``, ``writer_queue``, ``dist_opt_buckets``: the installers. The code they install
stays with its kind: the RoPE and
weight-gradient glue in ``megasyne/model/fusions.py``, the ``_foreach`` ops in
``megasyne/training/multi_tensor.py``. (Our SwiGLU and attention modules reach Megatron
through its layer spec, which is configuration, not a patch.)

Adding a patch: write it in a module here, declare in ``PATCHES`` every attribute it changes,
give it an ``apply_*`` function below and call only that. The test applies every patch that
can be applied on a CPU and fails if the attributes that changed differ from the declared
ones, either way. Upgrading megatron-core: re-check each patch against the new source, then
update ``CHECKED_AGAINST`` (a run on another version logs a warning once).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from megasyne.megatron_patches import (
    cpu_shims,
    dist_opt_buckets,
    multi_tensor_fallbacks,
    rope_slot,
    wgrad_slot,
    writer_queue,
)

CHECKED_AGAINST = "0.16.1"

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Patch:
    name: str
    targets: tuple[tuple[str, str], ...]
    active: str
    why: str
    apply: str
    loggers: tuple[str, ...] = ()  # megatron loggers that get a logging.Filter
    checked_against: str = CHECKED_AGAINST


_OPT = "megatron.core.optimizer"
PATCHES = (
    Patch(
        name="cpu_shims",
        targets=tuple((m, "torch") for m in cpu_shims.MODULES_WITH_CUDA_DEVICES) + (
            ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
            ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
            (f"{_OPT}.clip_grads", "clip_grad_by_total_norm_fp32"),
            (f"{_OPT}.optimizer", "clip_grad_by_total_norm_fp32"),
            (f"{_OPT}.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
            (f"{_OPT}.distrib_optimizer",
             "DistributedOptimizer._build_model_and_main_param_groups"),
            ("megatron.core.models.common.language_module.language_module",
             "LanguageModule.setup_embeddings_and_output_layer"),
        ),
        loggers=("megatron.core.tensor_parallel.random",),
        active="CPU only (torch.cuda.is_available() is False); a no-op with CUDA",
        why="hard-coded device='cuda', torch.cuda RNG calls and CUDA tensor-type assertions "
            "on the code paths we use crash without CUDA (each shim in cpu_shims.py names its "
            "crash)",
        apply="apply_cpu_shims, from megasyne.parallel.init.init_parallel",
    ),
    Patch(
        name="multi_tensor",
        targets=((f"{_OPT}.clip_grads", "l2_norm_impl"),
                 (f"{_OPT}.clip_grads", "multi_tensor_scale_impl"),
                 (f"{_OPT}.optimizer", "multi_tensor_scale_impl")),
        active="where megatron-core picked its local fallbacks at import (neither apex nor "
               "Transformer-Engine); apex's or TE's kernels are kept",
        why="the local fallbacks sync the host once per parameter tensor for the grad norm and "
            "copy every tensor twice for clipping and the master-to-model weight copy",
        apply="apply_multi_tensor_fallbacks, from megasyne.training.optim.build_optimizer",
    ),
    Patch(
        name="rope_slot",
        targets=(("megatron.core.models.common.embeddings.rope_utils",
                  "fused_apply_rotary_pos_emb"),
                 ("megatron.core.models.common.embeddings.rope_utils",
                  "fused_apply_rotary_pos_emb_thd")),
        active="our Triton kernels on (CUDA by default) and Transformer-Engine absent: the slots "
               "are None then; TE's functions are never replaced",
        why="without a function in the slot megatron-core refuses apply_rope_fusion and runs "
            "the unfused RoPE (several elementwise kernels per layer); with packed sequences "
            "(document masking through SDPAttention) it asserts the thd slot is filled",
        apply="apply_rope_slot, from megasyne.model.builder.transformer_config",
    ),
    Patch(
        name="wgrad_accumulation",
        targets=(("megatron.core.tensor_parallel.layers", "fused_weight_gradient_mlp_cuda"),
                 ("megatron.core.tensor_parallel.layers", "_grad_accum_fusion_available")),
        active="CUDA without apex, once a probe of torch's fp32-output GEMM passes on this GPU; "
               "forced by ModelRuntime.wgrad_fusion=True (tests, also on CPU)",
        why="without apex, gradient_accumulation_fusion is unavailable and every weight "
            "gradient is written in bf16 and then added by a DDP hook (~12 bytes moved per "
            "parameter per micro-batch)",
        apply="apply_wgrad_accumulation, from megasyne.model.builder.transformer_config",
    ),
    Patch(
        name="writer_queue",
        targets=((writer_queue.MODULE, "_results_queue"),),
        active="always, from the first checkpoint save of a process (a slot megatron-core "
               "already filled is left alone)",
        why="megatron-core serves its checkpoint writer's results queue from a Manager process "
            "that a job-wide SIGTERM (a cluster's preemption notice) kills, so the trainer's "
            "save-on-SIGTERM fails; and a SIGKILLed trainer leaves that process orphaned",
        apply="apply_writer_queue, from megasyne.checkpoint.dist.prepare_save",
    ),
    Patch(
        name="dist_opt_buckets",
        targets=((f"{_OPT}.distrib_optimizer",
                  "DistributedOptimizer.sharded_param_state_fully_reshardable"),),
        active="always once applied (GPU and CPU); changes nothing with one bucket per buffer",
        why="with several buckets per gradient buffer (overlapped reduction, or a tied "
            "embedding at PP > 1) megatron-core cuts the gathered optimizer state at padded "
            "offsets it laid out unpadded: every later parameter's saved master weights and "
            "Adam moments are shifted (dist_opt_buckets.py), and a resume trains on them",
        apply="apply_dist_opt_buckets, from megasyne.training.optim.build_optimizer",
    ),
)


@functools.cache
def _check_version() -> None:
    from importlib import metadata

    try:
        installed = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source checkout: nothing to compare
        return
    stale = [p.name for p in PATCHES if p.checked_against != installed]
    if stale:
        log.warning("megatron-core %s is installed but the patches %s were checked against "
                    "%s: re-check them against its source (megasyne/megatron_patches)",
                    installed, stale, CHECKED_AGAINST)


def apply_cpu_shims() -> bool:
    """The ``cpu_shims`` patch; True when active (no CUDA). Idempotent."""
    _check_version()
    return cpu_shims.install()


def apply_multi_tensor_fallbacks() -> list[str]:
    """The ``multi_tensor`` patch; returns the ``module.name`` slots that hold our ops."""
    _check_version()
    return multi_tensor_fallbacks.install()


def apply_rope_slot() -> bool:
    """The ``rope_slot`` patch; True if our Triton RoPE is Megatron-Core's fused RoPE."""
    _check_version()
    return rope_slot.install()


def apply_wgrad_accumulation(force: bool = False) -> bool:
    """The ``wgrad_accumulation`` patch; True if gradient_accumulation_fusion may be turned
    on (apex's extension or ours in place). ``force`` skips the CUDA probe (tests)."""
    _check_version()
    return wgrad_slot.install(force=force)


def apply_writer_queue() -> bool:
    """The ``writer_queue`` patch; True if this call started our queue server. Main thread."""
    _check_version()
    return writer_queue.install()


def apply_dist_opt_buckets() -> bool:
    """The ``dist_opt_buckets`` patch (always active once applied). Idempotent."""
    _check_version()
    return dist_opt_buckets.install()


def wgrad_accumulation_status() -> str | None:
    """Why our weight-gradient accumulation is off on this GPU (None: not probed, or fine)."""
    return wgrad_slot.status()


__all__ = ["CHECKED_AGAINST", "PATCHES", "Patch", "apply_cpu_shims", "apply_dist_opt_buckets",
           "apply_multi_tensor_fallbacks", "apply_rope_slot", "apply_wgrad_accumulation",
           "apply_writer_queue",
           "wgrad_accumulation_status"]
