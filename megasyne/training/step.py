"""One optimizer step over a global batch: micro-batches through Megatron's pipeline schedule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch


@dataclass
class StepResult:
    loss: float
    """Mean per-token loss over the global batch (all DP ranks)."""
    grad_norm: float | None
    """Global gradient norm before clipping (None if the step was skipped)."""
    skipped: bool
    """True when the update was not applied (inf/NaN gradients)."""
    loss_parts: list = None
    """Per-micro-batch dicts returned by the loss function on the last stage (else empty)."""


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token LM losses [b, s] -> (sum, token count, report) for Megatron's schedule."""
    losses = output_tensor.float()  # [b, s]
    mask = loss_mask.float()
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def gpt_forward_step(data_iterator: Iterator[dict], model) -> tuple:
    """Megatron forward_step_func: batch dict with tokens/labels/loss_mask/position_ids."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


def train_step(model_chunks: list, optimizer, data_iterators, *, num_microbatches: int,
               micro_batch_size: int, seq_length: int,
               forward_step_func: Callable = gpt_forward_step) -> StepResult:
    """Zero grads, run all micro-batches forward+backward, reduce grads, step the optimizer."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    parts = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=_global_mean_loss(parts), grad_norm=grad_norm if update_ok else None,
                      skipped=not update_ok, loss_parts=parts)


def _global_mean_loss(parts: list) -> float:
    """Token-weighted mean over micro-batches and DP ranks, broadcast from the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    for part in parts or []:
        total += part["lm loss"].double().cpu()
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        # Only the last pipeline stage computed the loss: share it with the other stages.
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, src=last, group=pp_group)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")
