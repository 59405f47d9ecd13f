"""Which accelerated path this machine gets, decided once by what imports cleanly.

- Transformer-Engine layer spec: CUDA present and ``import transformer_engine`` succeeds.
- Otherwise Megatron-Core's local spec with our RMSNorm: Triton kernels on CUDA
  (RMSNorm, vocab-parallel cross-entropy, RoPE, SwiGLU, unless MEGASYNE_KERNELS=0), torch on CPU.
- apex is never required: gradient-accumulation fusion uses apex's or TE's extension when
  present, else torch's fp32-output GEMM (megasyne/model/fusions.py) when it works here.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def transformer_engine_available() -> bool:
    # On CPU, `import transformer_engine` raises (no cudnn) and would break megatron's
    # own import: never even try without CUDA.
    if not torch.cuda.is_available() or os.environ.get("MEGASYNE_DISABLE_TE") == "1":
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def triton_kernels_default() -> bool:
    """Our Triton kernels are on by default on CUDA; MEGASYNE_KERNELS=0 turns them off."""
    return torch.cuda.is_available() and os.environ.get("MEGASYNE_KERNELS", "1") != "0"


def describe() -> str:
    if transformer_engine_available():
        return "transformer-engine layer spec (CUDA)"
    if triton_kernels_default():
        return "megatron-core local spec + megasyne Triton RMSNorm/cross-entropy/RoPE/SwiGLU (CUDA)"
    if torch.cuda.is_available():
        return "megatron-core local spec + torch ops (CUDA, kernels off)"
    return "megatron-core local spec + torch ops (CPU, gloo)"
