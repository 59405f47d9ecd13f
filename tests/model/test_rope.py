"""Llama-3-style RoPE frequencies (megasyne/model/rope.py) against transformers and Megatron-Core.

In-process, no process group: about a second.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megasyne.model.config import RopeScaling
from megasyne.model.presets import get_preset, llama3_1_8b
from megasyne.model.rope import llama3_inv_freq, set_rope_frequencies
from tests.checkpoint.hf_models import LLAMA3_CUSTOM_ROPE

# (head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
CONSTANTS = [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),    # Llama-3.1 / 3.2 / 3.3
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),    # Llama-3.2-1B/3B's factor
    (32, 10000.0, 4.0, 0.5, 2.0, 256),       # tests/checkpoint/hf_models.py "llama3_custom"
    (128, 500000.0, 16.0, 2.0, 8.0, 131072),  # a context extension of Llama-3.1
    (64, 123456.5, 1.0, 1.0, 1.5, 100),      # factor 1, theta not an integer
]


def _transformers_inv_freq(head_dim, theta, factor, low, high, original):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=original * 4,
        rope_parameters=dict(rope_type="llama3", rope_theta=theta, factor=factor,
                             low_freq_factor=low, high_freq_factor=high,
                             original_max_position_embeddings=original))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    assert attention_factor == 1.0  # llama3 scaling leaves the attention scale alone
    return inv_freq


def _megatron_rotary(head_dim, theta, *, scaling_factor=None):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=theta,
                           rope_scaling=scaling_factor is not None,
                           rope_scaling_factor=scaling_factor or 8.0,
                           use_cpu_initialization=True)


@pytest.mark.parametrize("constants", CONSTANTS, ids=[str(c[2:]) for c in CONSTANTS])
def test_inv_freq_equals_transformers_bit_for_bit(constants):
    ours = llama3_inv_freq(*constants)
    ref = _transformers_inv_freq(*constants)
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == (constants[0] // 2,)
    assert torch.equal(ours, ref)


def test_llama31_inv_freq_equals_megatron_core_bit_for_bit():
    """Llama-3.1's constants were Megatron-Core's own scaling before: nothing changes there."""
    megatron = _megatron_rotary(128, 500000, scaling_factor=8.0).inv_freq
    assert torch.equal(llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192), megatron)


def test_custom_constants_use_all_three_bands_and_megatron_would_differ():
    """The test model's constants reach every branch of the formula (so the logits test
    covers them all), and Megatron-Core's hard-coded constants give other frequencies."""
    head_dim, theta = 32, 10000.0
    c = {k: v for k, v in LLAMA3_CUSTOM_ROPE.items() if k != "rope_type"}
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ours = llama3_inv_freq(head_dim, theta, **c)
    kept, divided = ours == base, ours == base / c["factor"]
    smoothed = ~kept & ~divided
    assert kept.sum() >= 2 and divided.sum() >= 2 and smoothed.sum() >= 2, ours / base
    wavelen = 2 * math.pi / base[smoothed]
    original = c["original_max_position_embeddings"]
    assert (wavelen > original / c["high_freq_factor"]).all()
    assert (wavelen < original / c["low_freq_factor"]).all()
    megatron = _megatron_rotary(head_dim, int(theta), scaling_factor=c["factor"]).inv_freq
    assert not torch.allclose(ours, megatron)


def _model_with_rotary(head_dim, theta):
    return SimpleNamespace(rotary_pos_emb=_megatron_rotary(head_dim, theta))


def test_set_rope_frequencies_puts_ours_on_the_model():
    cfg = get_preset("tiny_debug", rope_scaling=RopeScaling(factor=4.0, low_freq_factor=0.5,
                                                             high_freq_factor=2.0,
                                                             original_max_position_embeddings=64))
    model = _model_with_rotary(cfg.head_dim, cfg.rope_theta)
    set_rope_frequencies(model, cfg)
    s = cfg.rope_scaling
    assert torch.equal(model.rotary_pos_emb.inv_freq,
                       _transformers_inv_freq(cfg.head_dim, cfg.rope_theta, s.factor,
                                              s.low_freq_factor, s.high_freq_factor,
                                              s.original_max_position_embeddings))
    # angles as Megatron makes them for the attention: position x our frequencies
    freqs = model.rotary_pos_emb.get_freqs_non_repeated(300)  # [300, head_dim / 2]
    assert torch.equal(freqs[299], 299.0 * model.rotary_pos_emb.inv_freq)


def test_unscaled_models_keep_megatrons_frequencies():
    cfg = get_preset("tiny_debug")
    model = _model_with_rotary(cfg.head_dim, cfg.rope_theta)
    before = model.rotary_pos_emb.inv_freq
    set_rope_frequencies(model, cfg)
    assert model.rotary_pos_emb.inv_freq is before


def test_frequencies_are_real_when_the_model_is_built_on_meta():
    """Models to be loaded are built under a meta-device context; Megatron keeps inv_freq on
    the CPU there, and so must we (a meta tensor cannot be used or copied)."""
    cfg = llama3_1_8b()
    with torch.device("meta"):
        model = _model_with_rotary(cfg.head_dim, 500000)
        set_rope_frequencies(model, cfg)
    assert model.rotary_pos_emb.inv_freq.device.type == "cpu"
    assert torch.equal(model.rotary_pos_emb.inv_freq,
                       _megatron_rotary(cfg.head_dim, 500000, scaling_factor=8.0).inv_freq)
