"""Presets: published parameter counts, meta-device builds, validation errors."""

import json
import subprocess
import sys

import pytest

from megasyne.model.config import LlamaConfig, ModelConfigError, RopeScaling
from megasyne.model.presets import PRESETS, get_preset, llama3_1_8b, llama3_8b, tinyllama_1_1b
from tests.launch import REPO_ROOT

# Published sizes: Meta's model cards (8.03B, 70.6B) and TinyLlama's paper (1.1B).
PUBLISHED = {"llama3_8b": 8.03e9, "llama3_1_8b": 8.03e9, "llama3_70b": 70.6e9,
             "tinyllama_1_1b": 1.1e9}


@pytest.fixture(scope="module")
def built_counts():
    proc = subprocess.run([sys.executable, "tests/model/preset_worker.py"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("COUNTS "))
    return json.loads(line[len("COUNTS "):])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name):
    count = PRESETS[name]().num_parameters()
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, count


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_on_meta_with_its_parameter_count(built_counts, name):
    entry = built_counts[name]
    assert entry["on_meta"]
    # The Megatron model (padded vocab) has exactly the analytic count at that vocab.
    assert entry["built"] == entry["expected_padded"]


def test_architecture_numbers():
    c = llama3_8b()
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups,
            c.ffn_hidden_size, c.vocab_size, c.rope_theta, c.norm_eps, c.tie_word_embeddings) == \
        (32, 4096, 32, 8, 14336, 128256, 500000.0, 1e-5, False)
    t = tinyllama_1_1b()
    assert (t.num_layers, t.hidden_size, t.num_query_groups, t.ffn_hidden_size, t.vocab_size,
            t.rope_theta) == (22, 2048, 4, 5632, 32000, 10000.0)
    s = llama3_1_8b().rope_scaling
    assert (s.factor, s.low_freq_factor, s.high_freq_factor,
            s.original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)


def test_vocab_padding_multiple_of_128_times_tp():
    c = get_preset("tiny_debug", vocab_size=1025)
    assert c.padded_vocab_size(1) == 1152
    assert c.padded_vocab_size(2) == 1280
    assert c.padded_vocab_size(4) == 1536
    assert llama3_8b().padded_vocab_size(8) == 129024


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ModelConfigError, match="unknown model preset 'llama4'.*llama3_8b"):
        get_preset("llama4")


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=100, num_attention_heads=8), "not divisible by num_attention_heads"),
    (dict(num_query_groups=3), "not divisible by num_query_groups"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(rope_theta=-1.0), "rope_theta"),
])
def test_bad_architectures_name_the_field(overrides, message):
    with pytest.raises(ModelConfigError, match=message):
        get_preset("tiny_debug", **overrides)


def test_rope_scaling_takes_any_llama3_constants():
    s = RopeScaling(factor=4.0, low_freq_factor=0.5, high_freq_factor=2.0,
                    original_max_position_embeddings=256)
    cfg = get_preset("tiny_debug", rope_scaling=s)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg  # the manifest's way
    assert RopeScaling(factor=1.0).factor == 1.0  # transformers accepts 1 silently


@pytest.mark.parametrize("fields, message", [
    (dict(factor=0.5), "rope_scaling.factor must be >= 1"),
    (dict(factor=float("nan")), "rope_scaling.factor must be a positive number"),
    (dict(low_freq_factor=0.0), "rope_scaling.low_freq_factor must be a positive number"),
    (dict(high_freq_factor=-4.0), "rope_scaling.high_freq_factor must be a positive number"),
    (dict(high_freq_factor="4"), "rope_scaling.high_freq_factor must be a positive number"),
    (dict(low_freq_factor=4.0), "high_freq_factor (4.0) must be greater than low_freq_factor (4.0)"),
    (dict(low_freq_factor=2.0, high_freq_factor=1.0), "must be greater than low_freq_factor"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings must be a "
                                                "positive integer"),
    (dict(original_max_position_embeddings=8192.5), "original_max_position_embeddings"),
    (dict(original_max_position_embeddings=True), "original_max_position_embeddings"),
])
def test_bad_rope_scaling_names_the_field(fields, message):
    with pytest.raises(ModelConfigError) as info:
        RopeScaling(**fields)
    assert message in str(info.value)


def test_a_saved_config_without_the_scaling_constants_reads_them_as_llama31():
    """Model configs that name only the factor (as Megatron-Core's scaling took it) are
    Llama-3.1's scaling; unknown fields are refused by name."""
    d = llama3_1_8b().to_dict()
    d["rope_scaling"] = {"factor": 8.0}
    assert LlamaConfig.from_dict(d) == llama3_1_8b()
    d["rope_scaling"] = {"factor": 8.0, "beta_fast": 32}
    with pytest.raises(ModelConfigError, match="unknown rope_scaling fields: .'beta_fast'."):
        LlamaConfig.from_dict(d)


def test_checkpoint_architecture_check_compares_the_rope_constants():
    from megasyne.checkpoint.dist import CheckpointError, check_model_compatible

    run = llama3_1_8b().to_dict()
    partial = dict(run, rope_scaling={"factor": 8.0})  # an older manifest's spelling
    check_model_compatible({"model": partial}, run, "ckpt")  # the same model
    other = dict(run, rope_scaling=dict(run["rope_scaling"], original_max_position_embeddings=4096))
    with pytest.raises(CheckpointError, match="rope_scaling: checkpoint .*4096"):
        check_model_compatible({"model": other}, run, "ckpt")


def test_flops_per_token_matches_6n_rule_for_8b():
    c = llama3_8b()
    non_embedding = c.num_parameters() - c.vocab_size * c.hidden_size  # keep output matmul
    assert c.flops_per_token(8192) == pytest.approx(6 * non_embedding + 12 * 32 * 8192 * 4096)
