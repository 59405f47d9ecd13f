"""RMSNorm for the Megatron layer spec: our Triton kernel on CUDA, torch elsewhere.

Replaces Megatron-Core's ``WrappedTorchNorm`` in the local spec, which refuses
sequence parallelism. With sequence parallel on, each TP rank normalises its own
slice of the sequence and the weight's gradient is a partial sum: the
``sequence_parallel`` attribute set below makes Megatron's ``finalize_model_grads``
all-reduce it over the TP group, exactly as for Transformer-Engine's norms.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in fp32 (Hugging Face Llama semantics)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, use_kernel: bool = False,
                 **_unused):
        super().__init__()
        self.eps = eps
        self.use_kernel = use_kernel
        device = None if config.use_cpu_initialization or not torch.cuda.is_available() \
            else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [s, b, h]
        if self.use_kernel:
            from megasyne.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, triton={self.use_kernel}"
