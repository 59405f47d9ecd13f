"""Multi-tensor ops for Megatron-Core's optimizer on torch's ``_foreach`` kernels.

Megatron-Core's optimizer and gradient clipping call apex's ``amp_C.multi_tensor_l2norm`` and
``amp_C.multi_tensor_scale`` through ``multi_tensor_applier``. Without apex or
Transformer-Engine, megatron-core 0.16 falls back to ``megatron.core.utils.local_multi_tensor_*``:

- the gradient norm takes ``torch.norm`` of every tensor, then ``torch.tensor(list)`` of those
  device scalars: one device-to-host copy (a sync) per parameter tensor (~200 for TinyLlama,
  ~290 for Llama-3-8B) every step, and one more for the total;
- "scale" is ``dst.copy_(src * scale)`` per tensor: a temporary as large as each tensor and two
  passes. It runs every step to copy the fp32 master weights into the bf16 model weights (with
  scale 1.0), and to clip the gradients whenever their norm exceeds the limit.

Here: ``torch._foreach_norm`` and one ``vector_norm`` on the device (no sync; Megatron reads the
value once, after its all-reduce), ``torch._foreach_copy_`` for the scale-1 copy (converts the
dtype in the same pass) and ``torch._foreach_mul_`` in place for clipping. Same math; the sums
are ordered differently, so results agree to rounding, not bit for bit.

``megasyne.megatron_patches.apply_multi_tensor_fallbacks()`` puts these in place of only
Megatron-Core's *local* fallbacks (apex's or TE's kernels, when present, are kept), in the two
modules that picked them at import.
"""

from __future__ import annotations

import torch


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm: ([1] fp32 norm of all tensors, per-tensor norms or None)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])  # [n_tensors]
    total = torch.linalg.vector_norm(norms).reshape(1)
    return total, (norms if per_tensor else None)


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale: dst[i] = src[i] * scale (dst may be src; dtypes may differ)."""
    src, dst = tensor_lists
    if not src:
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))
