"""One optimizer step over a global batch: micro-batches through Megatron's pipeline schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch


@dataclass
class StepResult:
    loss: float
    """Token-weighted mean loss over the global batch (all DP ranks, all micro-batches)."""
    grad_norm: float | None
    """Global gradient norm before clipping (None when the step was skipped)."""
    skipped: bool
    """True when the update was not applied (non-finite loss or gradients)."""
    source_loss_sum: list = field(default_factory=list)
    """Per source: summed token loss over the global batch."""
    source_tokens: list = field(default_factory=list)
    """Per source: number of loss tokens in the global batch."""


def lm_loss_func(loss_mask: torch.Tensor, source: torch.Tensor | None, num_sources: int,
                 inject_nan: bool, output_tensor: torch.Tensor):
    """Per-token LM losses [b, s] -> (sum, token count, report) for Megatron's schedule.

    The report carries [loss_sum, tokens] and a per-source [num_sources, 2] table so the
    trainer can log the loss of every data source (what a CPT user watches for forgetting).
    """
    losses = output_tensor.float()  # [b, s]
    if inject_nan:
        losses = losses * float("nan")
    mask = loss_mask.float()        # [b, s]
    per_seq = (losses * mask).sum(dim=1)  # [b]
    per_seq_tokens = mask.sum(dim=1)      # [b]
    loss_sum = per_seq.sum()
    report = {"lm loss": torch.stack([loss_sum.detach(), per_seq_tokens.sum()])}
    if num_sources:
        table = torch.zeros(num_sources, 2, dtype=torch.float64, device=per_seq.device)
        source = source.to(per_seq.device)
        table[:, 0].index_add_(0, source, per_seq.detach().double())
        table[:, 1].index_add_(0, source, per_seq_tokens.double())
        report["source"] = table
    return loss_sum, per_seq_tokens.sum().to(torch.int), report


def _upload(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Pinned first: a copy from pageable memory may wait for the GPU's queued work (a drain
    before every micro-batch); from pinned memory it is queued like a kernel."""
    return (t.pin_memory() if t.device.type == "cpu" else t).to(dev, non_blocking=True)


def gpt_forward_step(data_iterator: Iterator[dict], model, *, num_sources: int = 0,
                     inject_nan: bool = False) -> tuple:
    """Megatron forward_step_func for batches made by ``megasyne.training.batches``."""
    batch = next(data_iterator)
    # Document masking: the ids stay on the CPU (cu_seqlens are made from them there). Not
    # popped: with virtual pipeline stages every model chunk reads the same micro-batch dicts.
    docs = batch.get("document_ids")
    if torch.cuda.is_available():  # batches are built on the CPU from memory-mapped data
        dev = torch.device("cuda", torch.cuda.current_device())
        batch = {k: _upload(v, dev) if isinstance(v, torch.Tensor) and k != "document_ids" else v
                 for k, v in batch.items()}
    if docs is not None:
        from megasyne.model.documents import document_forward

        output = document_forward(model, batch["tokens"], batch["position_ids"], docs,
                                  labels=batch["labels"])
    else:
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"], batch.get("source"), num_sources,
                           inject_nan)


def run_microbatches(model_chunks: list, data_iterators, *, num_microbatches: int,
                     micro_batch_size: int, seq_length: int, forward_only: bool,
                     forward_step_func: Callable = gpt_forward_step,
                     documents: bool = False) -> list:
    """``documents``: the micro-batches carry document_ids (document masking), which changes
    the activations' shape between pipeline stages for some attentions."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasyne.model.documents import schedule_shape

    micro_batch_size, seq_length = schedule_shape(model_chunks[0], micro_batch_size, seq_length,
                                                  documents)
    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model_chunks: list, optimizer, data_iterators, *, num_microbatches: int,
               micro_batch_size: int, seq_length: int, num_sources: int = 0,
               forward_step_func: Callable | None = None, documents: bool = False) -> StepResult:
    """Zero grads, run all micro-batches forward+backward, reduce grads, step the optimizer.

    A non-finite global loss skips the update on every rank (they all see the same
    reduced loss, so they agree) and the step is reported as skipped.
    """
    from megatron.core.distributed import finalize_model_grads

    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    parts = run_microbatches(
        model_chunks, data_iterators, num_microbatches=num_microbatches,
        micro_batch_size=micro_batch_size, seq_length=seq_length, forward_only=False,
        forward_step_func=forward_step_func or partial(gpt_forward_step, num_sources=num_sources),
        documents=documents,
    )
    loss, src_sum, src_tok = reduce_losses(parts, num_sources)
    if not math.isfinite(loss):
        return StepResult(loss=loss, grad_norm=None, skipped=True,
                          source_loss_sum=src_sum, source_tokens=src_tok)
    update_ok, grad_norm, _ = optimizer.step()
    skipped = not update_ok or grad_norm is None or not math.isfinite(grad_norm)
    return StepResult(loss=loss, grad_norm=None if skipped else grad_norm, skipped=skipped,
                      source_loss_sum=src_sum, source_tokens=src_tok)


def reduce_losses(parts: list, num_sources: int = 0) -> tuple[float, list, list]:
    """Token-weighted mean over micro-batches and DP ranks, shared with every pipeline stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    total = torch.zeros(2 + 2 * num_sources, dtype=torch.float64)
    for part in parts or []:
        total[:2] += part["lm loss"].double().cpu()
        if num_sources:
            total[2:] += part["source"].reshape(-1).cpu()
    if dist.is_initialized():
        from megasyne.parallel.init import comm_device

        total = total.to(comm_device())  # NCCL reduces only CUDA tensors
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        # Only the last pipeline stage computed the loss: share it with the other stages.
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        total = total.cpu()
    loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    table = total[2:].reshape(num_sources, 2) if num_sources else torch.zeros(0, 2)
    return loss, table[:, 0].tolist(), table[:, 1].tolist()
