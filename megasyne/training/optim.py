"""Megatron DDP wrapping and the Megatron-Core optimizer for a list of model chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megasyne import megatron_patches
from megasyne.parallel.dims import ParallelDims


@dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """AdamW as in the SynE paper (betas 0.9/0.95, clip 1.0); LR comes from the schedule."""

    lr: float = 1e-5
    """Peak learning rate (the schedule scales it every step)."""
    min_lr: float = 0.0
    """Floor of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    fused_adam: bool | None = None
    """torch's fused AdamW kernel when megatron-core falls back to torch's optimizer (no TE /
    apex); None = on with CUDA. Its default multi-tensor path took 33 ms of a 187 ms
    TinyLlama step on an H100 (BENCHMARKS.md)."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("optim.adam_beta1/adam_beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("optim.weight_decay and optim.clip_grad must be >= 0")


def wrap_ddp(chunks: list, dims: ParallelDims) -> list:
    """Megatron DDP around each chunk: contiguous fp32 grad buffers, bucketed reduce.

    With ``dims.overlap_grad_reduce`` each bucket's reduce is launched asynchronously from the
    backward hooks of its last gradient; with ``dims.param_gather_overlapped`` the distributed
    optimizer leaves the all-gather of updated parameters to the next forward's pre-hooks. The
    pipeline schedules learn of both through the hooks set by :func:`set_schedule_hooks`.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    param_gather = dims.param_gather_overlapped
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=dims.overlap_grad_reduce,
        overlap_param_gather=param_gather,
        # Interleaved pipelines: the schedule starts each chunk's gather ahead of its first
        # micro-batch (param_sync_func), at the same point on every pipeline stage. One chunk:
        # the pre-hooks chain the buckets (each gather started when the previous is waited on).
        align_param_gather=param_gather and dims.vp_size is not None,
        use_distributed_optimizer=dims.distributed_optimizer,
        bucket_size=dims.ddp_bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk buckets: Megatron's own rule for interleaved pipelines.
            disable_bucketing=i > 0,
        ))
    set_schedule_hooks(wrapped)
    return wrapped


def set_schedule_hooks(ddp_chunks: list) -> None:
    """Tell Megatron's pipeline schedules how to drive the DDP chunks' overlapped collectives.

    As Megatron-LM's training loop does (with its default align_grad_reduce): ``no_sync_func``
    holds gradient reduction back until the last micro-batch's backward; ``grad_sync_func``
    lets the pipelined schedules launch a chunk's reduce at the same point on every stage
    (during the pipeline bubble); ``param_sync_func`` starts an interleaved chunk's parameter
    all-gather ahead of its first forward. Without overlap all three stay None and
    finalize_model_grads reduces synchronously.
    """
    from megatron.core.distributed import finalize_model_grads

    ddp_config = ddp_chunks[0].ddp_config

    def per_chunk(method: str):
        funcs = [getattr(c, method) for c in ddp_chunks]
        return funcs[0] if len(funcs) == 1 else funcs

    for config in {id(c.config): c.config for c in ddp_chunks}.values():
        config.no_sync_func = per_chunk("no_sync") if ddp_config.overlap_grad_reduce else None
        config.grad_sync_func = (per_chunk("start_grad_sync") if ddp_config.overlap_grad_reduce
                                 else None)
        config.param_sync_func = (per_chunk("start_param_sync") if ddp_config.align_param_gather
                                  else None)
        config.finalize_model_grads_func = finalize_model_grads


def finish_param_gather(chunks: list) -> None:
    """Give every parameter its post-step value now, when its all-gather is still pending.

    With ``overlap_param_gather`` the distributed optimizer updates only this rank's shard of
    each parameter buffer; the rest arrives by all-gathers that the next training forward's
    pre-hooks start and wait on. Anything that reads the parameters before that (a checkpoint
    save, a forward-only scorer) calls this first: it waits on gathers in flight and runs the
    ones not yet started, synchronously. Collective over the data-parallel group the first time
    after an optimizer step (call it where every rank passes); afterwards, until the next step,
    a no-op without communication, and the pre-hooks find nothing left to do. A no-op for
    chunks without the hooks (no distributed optimizer, no overlap, not DDP-wrapped).
    """
    for chunk in chunks:
        if not getattr(chunk, "use_forward_hook", False):
            continue
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            # megatron-core 0.16.1 keeps this state per bucket group: finish_grad_sync clears
            # param_gather_dispatched (new values to gather), start_param_sync sets it and
            # keeps a handle while an asynchronous gather runs, which finish_param_sync waits
            # on (without starting the next group's: this loop reaches it).
            if not group.param_gather_dispatched:
                group.start_param_sync(force_sync=True)
            else:
                group.finish_param_sync(skip_next_bucket_dispatch=True)


def build_optimizer(ddp_chunks: list, dims: ParallelDims, cfg: OptimConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = ddp_chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        # Must equal the DDP config's flag, or per-rank grad norms differ silently.
        use_distributed_optimizer=dims.distributed_optimizer,
    )
    # Megatron-Core's no-apex fallbacks for the grad norm, clipping and the master->model
    # weight copy sync per tensor and copy twice: torch's _foreach kernels instead.
    megatron_patches.apply_multi_tensor_fallbacks()
    # Several buckets per buffer (overlapped reduction) break megatron-core's fully reshardable
    # distributed-optimizer checkpoint without this fix.
    megatron_patches.apply_dist_opt_buckets()
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    apply_weight_decay_mult(optimizer, cfg.weight_decay)
    fused = torch.cuda.is_available() if cfg.fused_adam is None else cfg.fused_adam
    if fused:
        use_fused_adam(optimizer)
    return optimizer


def apply_weight_decay_mult(optimizer, weight_decay: float) -> None:
    """Give each param group its real weight decay: ``weight_decay * wd_mult``.

    megatron-core puts norms and biases in groups with ``wd_mult = 0`` but builds every group
    with ``weight_decay = config.weight_decay``; only Megatron-LM's OptimizerParamScheduler
    multiplies them, each step. We drive the LR ourselves, so we apply the multiplier once
    here (found by the HF training-parity test: norms were decayed, 1e-5 loss drift).
    """
    from megasyne.checkpoint.dist import _torch_optimizers

    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def use_fused_adam(optimizer) -> int:
    """Switch megatron-core's torch Adam/AdamW fallback to torch's fused kernel (same math).

    The flag is read per param group at every step, and the per-parameter state is created
    lazily at the first step (``step`` then lives on the parameter's device, as fused needs),
    so setting it after construction is enough. TE/apex FusedAdam are left alone. Returns the
    number of torch optimizers switched.
    """
    from megasyne.checkpoint.dist import _torch_optimizers

    n = 0
    for opt in _torch_optimizers(optimizer):
        if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            opt.defaults.update(fused=True, foreach=False)
            for group in opt.param_groups:
                group.update(fused=True, foreach=False)
            n += 1
    return n
