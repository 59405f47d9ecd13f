"""Rotary inverse frequencies of Llama-3-style ("llama3") RoPE scaling, for any constants.

Megatron-Core 0.16.1's ``RotaryEmbedding`` takes only the scaling ``factor``; its
``_apply_scaling`` hard-codes Llama-3.1's other three constants (low/high frequency factors
1 and 4, original context 8192). Context-extended derivatives use other values, so the
model builder computes the frequencies here and sets them on the model's own
``RotaryEmbedding`` instance (``set_rope_frequencies``) before its first forward.

``llama3_inv_freq`` follows transformers' ``_compute_llama3_parameters`` operation by
operation (same dtypes, same order, Python-float scalars), so the result equals
transformers' bit for bit; with Llama-3.1's constants it also equals Megatron-Core's
``_apply_scaling`` bit for bit (tests/model/test_rope.py checks both).
"""

from __future__ import annotations

import math

import torch

from megasyne.model.config import LlamaConfig


def default_inv_freq(head_dim: int, theta: float, *, device=None) -> torch.Tensor:
    """Unscaled RoPE: ``1 / theta ** (2i / head_dim)`` for i < head_dim / 2, fp32 [head_dim / 2]."""
    # Made on ``device`` directly: under a meta-device context (models built to be loaded)
    # a tensor made elsewhere first would be a meta tensor that cannot be copied.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (theta ** (exponents / head_dim))


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int, *,
                    device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32) of Llama-3-style scaling.

    Wavelengths shorter than ``original / high_freq_factor`` are kept, longer than
    ``original / low_freq_factor`` are divided by ``factor``, and in between the frequency
    is interpolated linearly in ``original / wavelength`` between the two.
    """
    inv_freq = default_inv_freq(head_dim, theta, device=device)  # [head_dim / 2]
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = ((original_max_position_embeddings / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def model_inv_freq(cfg: LlamaConfig, *, device=None) -> torch.Tensor | None:
    """The scaled inverse frequencies of ``cfg``, or None when it has no scaling (Megatron's
    own unscaled frequencies are then used as they are)."""
    s = cfg.rope_scaling
    if s is None:
        return None
    return llama3_inv_freq(cfg.head_dim, cfg.rope_theta, s.factor, s.low_freq_factor,
                           s.high_freq_factor, s.original_max_position_embeddings,
                           device=device)


def set_rope_frequencies(model, cfg: LlamaConfig) -> None:
    """Give ``model`` (a GPTModel just built, never run) the frequencies of ``cfg``.

    ``RotaryEmbedding.forward`` is ``lru_cache``d on its arguments, so the frequencies must
    be in place before the first forward; ``inv_freq`` is a plain attribute (not a buffer),
    so nothing of it goes into checkpoints.
    """
    rotary = model.rotary_pos_emb
    inv_freq = model_inv_freq(cfg, device=rotary.inv_freq.device)
    if inv_freq is None:
        return
    if inv_freq.shape != rotary.inv_freq.shape:
        raise RuntimeError(f"RoPE: {tuple(inv_freq.shape)} frequencies for a rotary embedding "
                           f"of {tuple(rotary.inv_freq.shape)} (rotary_percent < 1?)")
    rotary.inv_freq = inv_freq
