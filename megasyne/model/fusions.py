"""Our fused paths, plugged into Megatron-Core through its own hooks: RoPE and SwiGLU kernels,
and fp32 weight-gradient accumulation in the GEMM.

Both are switched with the other kernels (``ModelRuntime.triton_kernels``: on with CUDA by
default, off with MEGASYNE_KERNELS=0) and never replace Transformer-Engine's versions. This
module holds the code; the two module globals of Megatron-Core that receive it are filled by
``megasyne.megatron_patches`` (``apply_rope_slot``, ``apply_wgrad_accumulation``), where every
runtime change to Megatron-Core is listed.

- RoPE: ``fused_rope`` has the signature of Megatron-Core's fused-RoPE slot
  (``rope_utils.fused_apply_rotary_pos_emb``, used when ``config.apply_rope_fusion`` is set).
  Cases our kernel does not cover (interleaved rotary, per-batch angles) go to Megatron-Core's
  unfused function. ``fused_rope_thd`` fills the slot of packed sequences
  (``fused_apply_rotary_pos_emb_thd``), which Megatron-Core calls instead whenever
  PackedSeqParams are given (document masking with our SDPA attention): without it, the fused
  RoPE would be refused there.
- SwiGLU: Megatron-Core's ``MLP`` calls ``submodules.activation_func`` (a module built with
  the config) on the whole fc1 output when ``config.use_te_activation_func`` is set. Despite
  the name, that branch of ``MLP.forward`` only calls the module (TE is needed only by
  TE's own activation modules), so ``SwiGLU`` below receives cat(gate, up) and returns
  silu(gate) * up, exactly what the unfused ``glu`` of the MLP computes. It is passed through
  the layer spec (megasyne.model.builder.layer_spec): configuration, not a patch.
- Weight-gradient accumulation fusion: with ``config.gradient_accumulation_fusion`` Megatron-
  Core's linear layers call ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`` (an apex
  extension, imported into ``tensor_parallel.layers`` when apex is there) to add
  grad_output^T @ input straight into the fp32 ``main_grad`` of Megatron DDP; without it every
  weight gradient is first written in bf16 and then added by a DDP hook (~12 bytes moved per
  parameter per micro-batch: ~12 GB, ~4 ms on an H100 for TinyLlama). ``WgradAccumulation``
  is that interface on torch's cuBLAS GEMM with an fp32 output (``torch.addmm(...,
  out_dtype=torch.float32)``), installed only when apex is absent and a probe on this GPU
  gives the right numbers.
"""

from __future__ import annotations

import torch


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_unused):
    """Megatron-Core's ``fused_apply_rotary_pos_emb(t, freqs, interleaved=...)`` signature."""
    from megatron.core.models.common.embeddings import rope_utils

    from megasyne.kernels.rope import RoPEFunction, supported

    if interleaved or supported(t, freqs) is not None:
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return RoPEFunction.apply(t, freqs)  # already checked: not again on every call


# One-entry cache: the per-token angles of the current forward's packed documents, so that every
# layer (q and k) rotates with the same tensor and the kernel's cos/sin cache holds across them.
_packed_cache: tuple | None = None


def _packed_freqs(freqs: torch.Tensor, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, 1, 1, r]: the angles of each packed token's position inside its own sequence,
    from ``freqs`` [max_s, 1, 1, r] and the sequences' offsets ``cu_seqlens`` [n + 1]."""
    global _packed_cache
    if _packed_cache is not None:
        f_ref, cu_ref, versions, packed = _packed_cache
        if f_ref() is freqs and cu_ref() is cu_seqlens \
                and versions == (freqs._version, cu_seqlens._version):
            return packed
    import weakref

    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens.diff().long()
    first = torch.repeat_interleave(starts, lengths, output_size=total)  # [total]: no host sync
    packed = freqs[torch.arange(total, device=freqs.device) - first.to(freqs.device)]
    _packed_cache = (weakref.ref(freqs), weakref.ref(cu_seqlens),
                     (freqs._version, cu_seqlens._version), packed)
    return packed


def fused_rope_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                   cp_size: int = 1, cp_rank: int = 0, **_unused):
    """Megatron-Core's ``fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size=...,
    cp_rank=...)`` slot: t [total, n, d] holds packed sequences (document masking's thd path),
    each rotated from position 0, as ``rope_utils._apply_rotary_pos_emb_thd`` does with
    freqs [max_s, 1, 1, r] of the longest sequence (its only case in GPTModel)."""
    if cp_size != 1:
        raise ValueError("fused RoPE of packed sequences: context parallelism is not supported")
    packed = _packed_freqs(freqs, cu_seqlens, t.shape[0])  # [total, 1, 1, r]
    return fused_rope(t.unsqueeze(1), packed).squeeze(1)


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


class WgradAccumulation:
    """apex's ``fused_weight_gradient_mlp_cuda`` interface: ``main_grad += grad_output^T @
    input`` for 2-D ``total_input`` [tokens, in] and ``grad_output`` [tokens, out]."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        if main_grad.is_cuda:
            # bf16/fp16 operands, fp32 accumulate and output, C read in the GEMM epilogue.
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32,
                        out=main_grad)
        else:  # CPU (tests force it there): the same sum in fp32
            main_grad.addmm_(grad_output.t().float(), total_input.float())

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)
