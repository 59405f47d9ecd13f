"""Triton kernels of megasyne, installed as ``megasyne.kernels``.

Each kernel module imports only torch and triton, so it can be used and tested alone:

- ``rmsnorm``: ``rmsnorm(x, weight, eps)`` and fused ``add_rmsnorm(x, residual, weight, eps)``
  (Llama / Megatron semantics, fp32 math, two-stage deterministic dweight reduction).
- ``cross_entropy``: ``cross_entropy(logits, target, ...)`` and the drop-in
  ``vocab_parallel_cross_entropy(logits_shard, target, tp_group, ...)`` for Megatron-Core
  (per-token loss, online log-sum-exp, label smoothing, z-loss, ignore_index; the logits
  tensor is consumed: backward writes the gradient in place). ``reduction="sum"/"mean"`` on
  one rank computes the gradient already in the forward, while the row is in L2.

- ``rope``: ``rope(t, freqs)`` for Megatron's [s, b, n, d] layout (rotate-half convention,
  fp32 math, one kernel for both directions); plugged into Megatron-Core's fused-RoPE slot.
- ``swiglu``: ``swiglu(x)`` = silu(gate) * up on the concatenated fc1 output, gradient
  optionally written in place of x (the model's MLP uses that).

Nothing is imported here, so ``import megasyne.kernels`` stays cheap (no triton import).
"""
