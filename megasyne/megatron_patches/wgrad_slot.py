"""Megatron-Core's weight-gradient accumulation fusion, given torch's fp32-output GEMM.

With ``config.gradient_accumulation_fusion`` Megatron-Core's linear layers call
``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`` (an apex extension, imported into
``tensor_parallel.layers`` when apex is there, with ``_grad_accum_fusion_available`` set) to
add grad_output^T @ input straight into the fp32 ``main_grad`` of Megatron DDP. Without apex,
``install()`` puts ``megasyne.model.fusions.WgradAccumulation`` (the same interface on
``torch.addmm(..., out_dtype=torch.float32)``) into those two module globals, on CUDA only
after a probe on this GPU gives the right numbers.
"""

from __future__ import annotations

import torch

_status: dict = {}


def _probe() -> str | None:
    """None if torch's fp32-output GEMM works and is right on this GPU, else why not."""
    from megasyne.model.fusions import WgradAccumulation

    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(96, 40, device="cuda", generator=g).to(torch.bfloat16)
        dy = torch.randn(96, 24, device="cuda", generator=g).to(torch.bfloat16)
        acc = torch.randn(24, 40, device="cuda", generator=g)
        want = acc.double() + dy.double().t() @ x.double()
        WgradAccumulation.wgrad_gemm_accum_fp32(x, dy, acc)
        err = (acc.double() - want).abs().max().item()
        return None if err < 1e-3 else f"probe error {err:.3g}"
    except Exception as exc:  # e.g. a torch without addmm(out_dtype=) for this GPU
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def install(force: bool = False) -> bool:
    """Give Megatron-Core's linear layers our fp32 weight-gradient accumulation, unless
    apex's is already there. On CUDA only after the probe passes (the result is cached and
    the reason kept in ``status()``); ``force`` skips the probe (tests use it on CPU). True if
    gradient_accumulation_fusion may be turned on."""
    from megatron.core.tensor_parallel import layers

    from megasyne.model.fusions import WgradAccumulation

    if getattr(layers, "_grad_accum_fusion_available", False) and \
            getattr(layers, "fused_weight_gradient_mlp_cuda", None) is not None:
        return True  # apex's, or ours installed before
    if not force:
        if not torch.cuda.is_available():
            return False
        if "reason" not in _status:
            _status["reason"] = _probe()
        if _status["reason"] is not None:
            return False
    layers.fused_weight_gradient_mlp_cuda = WgradAccumulation
    layers._grad_accum_fusion_available = True
    return True


def status() -> str | None:
    """Why our weight-gradient accumulation is off on this GPU (None: not probed, or fine)."""
    return _status.get("reason")
