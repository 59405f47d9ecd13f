"""Our fused RoPE and SwiGLU kernels, plugged into Megatron-Core through its own hooks.

Both are switched with the other kernels (``ModelRuntime.triton_kernels``: on with CUDA by
default, off with MEGASYNE_KERNELS=0) and never replace Transformer-Engine's versions.

- RoPE: Megatron-Core routes ``apply_rotary_pos_emb`` to the module global
  ``rope_utils.fused_apply_rotary_pos_emb`` when ``config.apply_rope_fusion`` is set; that
  global is Transformer-Engine's function when TE imports, else None (and the config then
  refuses the fusion). ``install_rope_kernel()`` fills the empty slot with our Triton kernel
  (TE's, when present, is left alone). It changes nothing for models built with
  ``apply_rope_fusion=False`` (kernels off). Cases our kernel does not cover (interleaved
  rotary, per-batch angles) go to Megatron-Core's unfused function.
- SwiGLU: Megatron-Core's ``MLP`` calls ``submodules.activation_func`` (a module built with
  the config) on the whole fc1 output when ``config.use_te_activation_func`` is set. Despite
  the name, that branch of ``MLP.forward`` only calls the module (TE is needed only by
  TE's own activation modules), so ``SwiGLU`` below receives cat(gate, up) and returns
  silu(gate) * up, exactly what the unfused ``glu`` of the MLP computes.
"""

from __future__ import annotations

import torch


def _fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_unused):
    """Megatron-Core's ``fused_apply_rotary_pos_emb(t, freqs, interleaved=...)`` signature."""
    from megatron.core.models.common.embeddings import rope_utils

    from megasyne.kernels.rope import rope, supported

    if interleaved or supported(t, freqs) is not None:
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return rope(t, freqs)


def install_rope_kernel() -> bool:
    """Make our Triton RoPE Megatron-Core's fused RoPE unless one (TE's) is already there.
    Idempotent; True if ours is the one in place."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = _fused_rope
    return rope_utils.fused_apply_rotary_pos_emb is _fused_rope


class SwiGLU(torch.nn.Module):
    """MLP activation module: [s, b, 2F/tp] = cat(gate, up) -> [s, b, F/tp] = silu(gate) * up.

    The backward writes its gradient in place of the fc1 output (kept only for this
    backward), so the fused activation needs no fc1-sized gradient buffer of its own."""

    def __init__(self, config=None, **_unused):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megasyne.kernels.swiglu import swiglu

        return swiglu(x, inplace_grad=True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """No state: checkpoints are the same with the kernel on or off. (Megatron's MLP asks
        every child module for its sharded state when it saves.)"""
        return {}
