"""The architecture of a Llama-family model, independent of how it is parallelised.

A ``LlamaConfig`` says what the model *is* (the numbers a Hugging Face config.json
holds); ``megasyne.model.builder`` turns it, together with a ``ParallelDims``, into a
Megatron-Core ``GPTModel``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megasyne.errors import ConfigError


class ModelConfigError(ConfigError):
    """An architecture that cannot be built; the message names the field."""


@dataclass(kw_only=True, frozen=True)
class RopeScaling:
    """Llama-3-style ("llama3") RoPE frequency scaling, any constants (defaults: Llama-3.1's).

    The frequencies are computed by ``megasyne.model.rope.llama3_inv_freq`` (transformers'
    formula). A model config saved without some of these fields reads them as Llama-3.1's.
    """

    factor: float = 8.0
    """How much the context was extended (8 for Llama-3.1: 8192 -> 131072)."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_context/low_freq_factor are divided by ``factor``."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_context/high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """Context length of the model before the extension."""

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ModelConfigError(f"rope_scaling.{name} must be a positive number, "
                                       f"got {value!r}")
        original = self.original_max_position_embeddings
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ModelConfigError(f"rope_scaling.original_max_position_embeddings must be a "
                                   f"positive integer, got {original!r}")
        # transformers warns below 1: that would shorten the long wavelengths, not extend.
        if self.factor < 1.0:
            raise ModelConfigError(f"rope_scaling.factor must be >= 1 (the context extension), "
                                   f"got {self.factor}")
        # The interpolation divides by (high - low): equal values give NaN frequencies.
        if self.high_freq_factor <= self.low_freq_factor:
            raise ModelConfigError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be greater than "
                f"low_freq_factor ({self.low_freq_factor})")

    @classmethod
    def from_dict(cls, d: dict) -> RopeScaling:
        """From a saved model config (fields it lacks take Llama-3.1's values)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelConfigError(f"unknown rope_scaling fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(kw_only=True, frozen=True)
class LlamaConfig:
    """A decoder-only Llama: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, no biases."""

    name: str = "custom"
    """Preset name, for logs and checkpoints."""
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups); equal to num_attention_heads for plain multi-head attention."""
    ffn_hidden_size: int
    """Inner width of the SwiGLU MLP (per gate/up projection)."""
    vocab_size: int
    """Tokenizer vocabulary (unpadded); the embedding is padded for TP by the builder."""
    max_position_embeddings: int = 8192
    """Longest sequence the run uses (RoPE tables are built this long)."""
    rope_theta: float = 500000.0
    """RoPE base frequency (Llama-3: 500000, Llama-2/TinyLlama: 10000)."""
    rope_scaling: RopeScaling | None = None
    """Llama-3-style frequency scaling, or None."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer (Llama-3: False; SmolLM2: True)."""
    init_method_std: float = 0.02
    """Std of the normal init for random-weight runs (HF's initializer_range)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times TP (Megatron's convention)."""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ModelConfigError(
                f"model.num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups} (GQA needs whole groups)"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ModelConfigError("model: head dim (hidden_size / heads) must be even for RoPE")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_method_std <= 0:
            raise ModelConfigError("model.rope_theta, norm_eps and init_method_std must be > 0")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self, padded_vocab: int | None = None) -> int:
        """Parameter count, as published for the model (unpadded vocab unless given)."""
        vocab = padded_vocab or self.vocab_size
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o projections, no biases
        mlp = 3 * h * self.ffn_hidden_size      # gate, up, down
        norms = 2 * h
        embeddings = vocab * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + norms) + h + embeddings

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls only.

        6 * (non-embedding params + output layer) for the dense matmuls plus the attention
        score/value products 6 * 2 * layers * seq * hidden (causal masking not discounted,
        following the PaLM / Megatron convention used for MFU).
        """
        h = self.hidden_size
        dense = self.num_parameters() - self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        dense += self.vocab_size * h  # the output projection is a matmul even when tied
        return 6.0 * dense + 12.0 * self.num_layers * seq_length * h

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ModelConfigError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)
