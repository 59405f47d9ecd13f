"""Named model presets: small functions returning a validated ``LlamaConfig``.

Numbers from the model cards / config.json of each release (tabulated in docs/recipe.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from megasyne.model.config import LlamaConfig, ModelConfigError, RopeScaling


def llama3_8b(**overrides) -> LlamaConfig:
    """Meta-Llama-3-8B: 8.03B parameters."""
    return LlamaConfig(
        name="llama3_8b", num_layers=32, hidden_size=4096, num_attention_heads=32,
        num_query_groups=8, ffn_hidden_size=14336, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, norm_eps=1e-5, **overrides,
    )


def llama3_1_8b(**overrides) -> LlamaConfig:
    """Llama-3.1-8B: Llama-3-8B with "llama3" RoPE scaling to a 131072 context."""
    base = dict(max_position_embeddings=131072, rope_scaling=RopeScaling())
    base.update(overrides)
    return replace(llama3_8b(), name="llama3_1_8b", **base)


def llama3_70b(**overrides) -> LlamaConfig:
    """Meta-Llama-3-70B: 70.6B parameters."""
    return LlamaConfig(
        name="llama3_70b", num_layers=80, hidden_size=8192, num_attention_heads=64,
        num_query_groups=8, ffn_hidden_size=28672, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, norm_eps=1e-5, **overrides,
    )


def tinyllama_1_1b(**overrides) -> LlamaConfig:
    """TinyLlama-1.1B: the paper's cheap surrogate (Llama-2 tokenizer, 32000 tokens)."""
    return LlamaConfig(
        name="tinyllama_1_1b", num_layers=22, hidden_size=2048, num_attention_heads=32,
        num_query_groups=4, ffn_hidden_size=5632, vocab_size=32000,
        max_position_embeddings=2048, rope_theta=10000.0, norm_eps=1e-5, **overrides,
    )


def tiny_debug(**overrides) -> LlamaConfig:
    """4 layers, hidden 64, 8 heads / 2 KV groups: parity and CI runs in milliseconds."""
    base = dict(
        name="tiny_debug", num_layers=4, hidden_size=64, num_attention_heads=8,
        num_query_groups=2, ffn_hidden_size=160, vocab_size=1000,
        max_position_embeddings=256, rope_theta=10000.0, norm_eps=1e-5,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_debug_mha(**overrides) -> LlamaConfig:
    """tiny_debug with one KV head per query head (no GQA) and tied embeddings."""
    base = dict(name="tiny_debug_mha", num_query_groups=8, tie_word_embeddings=True)
    base.update(overrides)
    return tiny_debug(**base)


PRESETS: dict[str, Callable[..., LlamaConfig]] = {
    f.__name__: f for f in (llama3_8b, llama3_1_8b, llama3_70b, tinyllama_1_1b, tiny_debug,
                            tiny_debug_mha)
}


def get_preset(name: str, **overrides) -> LlamaConfig:
    """Look a preset up by name; unknown names list the known ones."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
    return factory(**overrides)
