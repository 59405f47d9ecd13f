"""Megatron-Core's fused-RoPE slot, filled with our Triton RoPE.

Megatron-Core routes ``apply_rotary_pos_emb`` to the module global
``rope_utils.fused_apply_rotary_pos_emb`` when ``config.apply_rope_fusion`` is set; that global
is Transformer-Engine's function when TE imports, else None (and the config then refuses the
fusion). ``install()`` fills the empty slot with ``megasyne.model.fusions.fused_rope`` (TE's,
when present, is left alone). It changes nothing for models built with
``apply_rope_fusion=False`` (kernels off).

With PackedSeqParams (thd, document masking) ``apply_rotary_pos_emb`` calls the second slot,
``rope_utils.fused_apply_rotary_pos_emb_thd``, instead, and asserts that it is filled: it gets
``megasyne.model.fusions.fused_rope_thd`` the same way.
"""

from __future__ import annotations


def install() -> bool:
    """Make our Triton RoPE Megatron-Core's fused RoPE unless one (TE's) is already there.
    Idempotent; True if ours is the one in place."""
    from megatron.core.models.common.embeddings import rope_utils

    from megasyne.model.fusions import fused_rope, fused_rope_thd

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = fused_rope_thd
    return rope_utils.fused_apply_rotary_pos_emb is fused_rope
