"""Tiny random-weight Hugging Face Llama checkpoints for the conversion tests.

Each case exercises something the converter must get right; all are made with
``transformers.LlamaConfig`` + a seeded random init (no download), in fp32 unless noted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_CUSTOM_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5,
                      "high_freq_factor": 2.0, "original_max_position_embeddings": 256}

# name -> (transformers.LlamaConfig kwargs, how it is stored, dtype)
CASES = {
    # GQA with several KV groups (8 heads / 4 groups), untied, sharded safetensors + index.
    "gqa": (dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                 rope_theta=10000.0), "safetensors-sharded", torch.float32),
    # A single KV group (MQA), an odd vocabulary (1101: padded to 1152 at TP1, 1280 at TP2),
    # bf16 weights, one safetensors file.
    "mqa_bf16": (dict(vocab_size=1101, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                      rope_theta=10000.0), "safetensors", torch.bfloat16),
    # Tied embeddings + Llama-3.1 rope scaling, odd vocabulary, sharded PyTorch .bin files.
    "tied_llama31": (dict(vocab_size=999, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=16384, rope_theta=500000.0,
                          rope_scaling=LLAMA31_ROPE, tie_word_embeddings=True),
                     "bin-sharded", torch.float32),
    # Llama-3-style scaling with constants that are all unlike Llama-3.1's (the kind a
    # context-extended derivative has), chosen so that the three bands of the formula all
    # occur: head dim 32 and theta 1e4 give wavelengths 6.3 ... 35333, the band edges are
    # 256 / 2 = 128 and 256 / 0.5 = 512. Its test batch runs past the original context.
    "llama3_custom": (dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=1024, rope_theta=10000.0,
                           rope_scaling=LLAMA3_CUSTOM_ROPE),
                      "safetensors", torch.float32),
}
# Length of each case's test batch (default 12): past original_max_position_embeddings,
# where the scaled low frequencies decide the attention pattern.
SEQ_LENGTHS = {"llama3_custom": 320}


def make_hf_model(case: str, path: Path, seed: int = 0) -> Path:
    """Write case ``case`` to ``path`` (config.json + weights) and return ``path``."""
    import transformers

    kwargs, storage, dtype = CASES[case]
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**copy.deepcopy(kwargs))  # it edits rope_scaling in place
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so a swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    if storage == "safetensors-sharded":
        model.save_pretrained(path, max_shard_size="100KB")
    elif storage == "safetensors":
        model.save_pretrained(path)
    else:  # sharded .bin with an index, as older transformers wrote them
        path.mkdir(parents=True)
        model.config.architectures = ["LlamaForCausalLM"]  # as model.save_pretrained writes
        model.config.dtype = dtype
        model.config.save_pretrained(path)
        state = {k: v.clone() for k, v in model.state_dict().items()}  # lm_head kept (tied)
        names = list(state)
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, path / fname)
            weight_map.update({k: fname for k in part})
        (path / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def seq_length(case: str) -> int:
    return SEQ_LENGTHS.get(case, 12)


def tokens(vocab_size: int, length: int = 12) -> torch.Tensor:
    """The fixed [2, length] batch every logit comparison uses."""
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(7))


def hf_logits(path: Path, length: int = 12) -> torch.Tensor:
    """transformers' logits on ``tokens`` in fp32 (weights upcast), eager attention (the
    same math as Megatron's; SDPA differs from both by fp32 summation order only)."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens(model.config.vocab_size, length)).logits.float()
