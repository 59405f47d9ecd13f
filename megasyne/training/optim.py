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
    """Megatron DDP around each chunk: contiguous fp32 grad buffers, bucketed reduce."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=dims.distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk buckets: Megatron's own rule for interleaved pipelines.
            disable_bucketing=i > 0,
        ))
    return wrapped


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
