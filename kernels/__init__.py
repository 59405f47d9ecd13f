"""Triton kernels of megasyne, installed as ``megasyne.kernels``.

Each kernel module imports only torch and triton, so it can be used and tested alone:

- ``rmsnorm``: ``rmsnorm(x, weight, eps)`` and fused ``add_rmsnorm(x, residual, weight, eps)``
  (Llama / Megatron semantics, fp32 math, two-stage deterministic dweight reduction).
- ``cross_entropy``: ``cross_entropy(logits, target, ...)`` and the drop-in
  ``vocab_parallel_cross_entropy(logits_shard, target, tp_group, ...)`` for Megatron-Core
  (per-token loss, online log-sum-exp, label smoothing, z-loss, ignore_index; the logits
  tensor is consumed: backward writes the gradient in place).

Nothing is imported here, so ``import megasyne.kernels`` stays cheap (no triton import).
"""
