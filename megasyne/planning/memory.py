"""GPU memory of a training run, per pipeline stage, without a GPU and without the weights.

Each pipeline stage's model chunks are built on the meta device inside a fake process group of
the run's real world size (``megasyne.parallel.init.init_rehearsal``), as the rank that holds
them would build them (TP-sharded, its layers, embedding or output layer). Then:

- **parameters** are counted on those chunks;
- **weights, gradients, optimizer state** follow from the dtypes the trainer uses: bf16 (or fp32)
  weights; Megatron DDP's fp32 gradient buffer (``grad_reduce_in_fp32``); fp32 master weights and
  Adam's two moments, 12 bytes per parameter, divided over the data-parallel group with the
  distributed optimizer;
- **activations** are traced, not estimated: one forward of a micro-batch through the chunk at
  the run's sequence length, on meta tensors, records every tensor autograd saves for the
  backward (``saved_tensors_hooks``; parameters and views of the same tensor counted once), so
  the count follows the real code: GQA, SwiGLU, the loss, sequence parallelism and the chosen
  recomputation. Attention is counted as flash attention keeps it (q, k, v, output and an fp32
  log-sum-exp per head and token), which is what the GPU's SDPA runs; on the meta device torch
  would decompose it into the math path and store the full score matrix;
- **in flight**: with the 1F1B pipeline schedule the first stage holds the activations of up to
  ``pp`` micro-batches at once (stage i: ``pp - i``), never more than the step's micro-batches;
  with interleaved stages Megatron-LM's factor ``1 + (pp - 1) / (pp * vp)`` on top (its
  theoretical-memory estimate).

Not modelled: the CUDA context and allocator fragmentation (a few GiB; compare the peak with
``torch.cuda.max_memory_allocated`` figures, as the planner's test does against BENCHMARKS.md),
communication buffers, and our Triton kernels' own savings (the trace runs torch's ops: the
kernels keep less, e.g. the fused cross-entropy keeps no fp32 softmax).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

GIB = 1 << 30


@dataclass(kw_only=True, frozen=True)
class StageMemory:
    """One pipeline stage's memory on each of its GPUs, in bytes."""

    stage: int
    parameters: int
    """Parameters held by one GPU of the stage (its TP shard of its layers)."""
    weights: int
    grads: int
    optimizer: int
    activations_per_microbatch: int
    microbatches_in_flight: float
    logits_per_microbatch: int
    """Of activations_per_microbatch: the output layer's logits and the loss's softmax (last stage)."""

    @property
    def activations(self) -> int:
        return int(self.activations_per_microbatch * self.microbatches_in_flight)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {"stage": self.stage, "parameters": self.parameters,
                "weights_gib": self.weights / GIB, "grads_gib": self.grads / GIB,
                "optimizer_gib": self.optimizer / GIB,
                "activations_per_microbatch_gib": self.activations_per_microbatch / GIB,
                "microbatches_in_flight": self.microbatches_in_flight,
                "activations_gib": self.activations / GIB,
                "logits_per_microbatch_gib": self.logits_per_microbatch / GIB,
                "total_gib": self.total / GIB}


class _SavedTensors:
    """Bytes autograd saves for the backward, each storage counted once, parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        key = id(base)
        if key not in self.exclude and key not in self.seen:
            self.seen[key] = base.numel() * base.element_size()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class _FlashAttentionShapes(torch.autograd.Function):
    """What flash attention keeps for its backward, on meta tensors: q, k, v, the output and
    an fp32 log-sum-exp [b, heads, s_q] (torch decomposes SDPA on meta into the math path,
    which would keep the full [b, heads, s_q, s_k] scores)."""

    @staticmethod
    def forward(ctx, q, k, v):  # [b, a, s, d]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace has no backward
        raise RuntimeError("memory trace only")


@contextlib.contextmanager
def _flash_attention_accounting():
    """Inside the block, SDPA is counted as flash attention (this process only traces)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):  # masks / scale do not change what flash keeps
        return _FlashAttentionShapes.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def trace_stage(chunks: list, *, micro_batch_size: int, seq_length: int, hidden_size: int,
                dtype: torch.dtype, sequence_parallel: bool, tp: int) -> tuple[int, int]:
    """(activation bytes of one micro-batch, of which logits and loss) through this rank's
    chunks, traced on the meta device (call inside ``cuda_maps_to("meta")``)."""
    from megatron.core import parallel_state as ps

    params = {id(p) for c in chunks for p in c.parameters()}
    tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long, device="meta")
    pos = torch.arange(seq_length, device="meta").unsqueeze(0).expand(micro_batch_size, -1)
    s_local = seq_length // tp if sequence_parallel else seq_length
    total, logits = 0, 0
    for vp, chunk in enumerate(chunks):
        saved = _SavedTensors(params)
        if not ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp if len(chunks) > 1 else None):
            chunk.set_input_tensor(torch.empty(s_local, micro_batch_size, hidden_size,
                                               device="meta", dtype=dtype, requires_grad=True))
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
                _flash_attention_accounting():
            out = chunk(tokens, pos, None, labels=tokens)
        total += saved.total
        if getattr(chunk, "post_process", False) and out is not None:
            logits += _loss_bytes(chunk, saved)
    return total, logits


def _loss_bytes(chunk, saved: _SavedTensors) -> int:
    """The output layer's share of a last-stage trace: tensors of at least a vocabulary row per
    token (logits, the loss's softmax)."""
    vocab = chunk.output_layer.weight.shape[0]
    return sum(b for b in saved.seen.values() if b % vocab == 0 and b >= vocab * 1024)


def in_flight(stage: int, *, pp: int, vp: int | None, num_microbatches: int) -> float:
    """Micro-batches whose activations a GPU of pipeline stage ``stage`` holds at its peak."""
    if pp == 1:
        return 1.0
    if vp and vp > 1:  # Megatron-LM's theoretical memory: the interleaving penalty
        return min(pp * (1 + (pp - 1) / (pp * vp)), num_microbatches) if stage == 0 else \
            min(pp - stage, num_microbatches)
    return float(min(pp - stage, num_microbatches))


def stage_memory(stage: int, chunks: list, *, dims, dtype: torch.dtype, micro_batch_size: int,
                 seq_length: int, hidden_size: int, num_microbatches: int) -> StageMemory:
    n = sum(p.numel() for c in chunks for p in c.parameters())
    weight_bytes = torch.empty(0, dtype=dtype).element_size()
    act, logits = trace_stage(chunks, micro_batch_size=micro_batch_size, seq_length=seq_length,
                              hidden_size=hidden_size, dtype=dtype,
                              sequence_parallel=dims.sequence_parallel, tp=dims.tp)
    master = 0 if dtype == torch.float32 else 4          # fp32 copy of bf16 weights
    optimizer = (master + 8) * n                           # + Adam's exp_avg, exp_avg_sq
    if dims.distributed_optimizer:
        optimizer = math.ceil(optimizer / dims.dp)
    return StageMemory(stage=stage, parameters=n, weights=weight_bytes * n, grads=4 * n,
                       optimizer=optimizer, activations_per_microbatch=act,
                       microbatches_in_flight=in_flight(stage, pp=dims.pp, vp=dims.vp_size,
                                                        num_microbatches=num_microbatches),
                       logits_per_microbatch=logits)
