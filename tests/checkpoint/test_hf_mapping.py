"""Unit tests of megasyne.checkpoint.hf: config mapping, tensor mapping, lazy readers/writers.

All in-process, no Megatron, no process group: a few seconds in all.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from megasyne.checkpoint.hf import (
    HFCheckpoint,
    HFConversionError,
    SafetensorsStreamWriter,
    _SafetensorsFile,
    dist_key,
    full_name,
    hf_config_from_llama,
    hf_shapes,
    llama_config_from_hf,
    param_maps,
    parse_size,
    plan_shards,
    to_hf,
    to_megatron,
    validate_hf,
)
from megasyne.model.config import RopeScaling
from megasyne.model.presets import llama3_1_8b, tiny_debug, tiny_debug_mha, tinyllama_1_1b

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _hf(**over) -> dict:
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
            "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


# ----------------------------------------------------------------------------- config

def test_rope_is_read_from_both_transformers_spellings():
    v5 = llama_config_from_hf(_hf(rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0)))
    v4 = llama_config_from_hf(_hf(rope_theta=500000, rope_scaling=dict(LLAMA3_ROPE)))
    old = llama_config_from_hf(_hf(rope_theta=500000, rope_scaling=dict(
        {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}, type="llama3")))
    for cfg in (v5, v4, old):
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0
    assert llama_config_from_hf(_hf()).rope_theta == 10000.0  # transformers' default
    assert llama_config_from_hf(_hf(rope_parameters={"rope_type": "default",
                                                     "rope_theta": 1e5})).rope_scaling is None



CUSTOM_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5,
               "high_freq_factor": 2.0, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("spelling", ["v4", "v5", "v5-theta-outside"])
def test_any_llama3_constants_are_read_as_transformers_reads_them(spelling):
    import transformers

    hf = {"v4": _hf(rope_theta=10000.0, rope_scaling=dict(CUSTOM_ROPE)),
          "v5": _hf(rope_parameters=dict(CUSTOM_ROPE, rope_theta=10000.0)),
          "v5-theta-outside": _hf(rope_theta=10000.0, rope_parameters=dict(CUSTOM_ROPE))}[spelling]
    cfg = llama_config_from_hf(hf)
    ref = transformers.LlamaConfig(**hf).rope_parameters
    assert cfg.rope_theta == ref["rope_theta"] == 10000.0
    assert asdict(cfg.rope_scaling) == {k: ref[k] for k in asdict(cfg.rope_scaling)}
    assert asdict(cfg.rope_scaling) == {k: v for k, v in CUSTOM_ROPE.items() if k != "rope_type"}


def test_a_missing_original_context_is_max_position_embeddings_as_in_transformers():
    import transformers

    spec = {k: v for k, v in CUSTOM_ROPE.items() if k != "original_max_position_embeddings"}
    hf = _hf(rope_theta=10000.0, rope_scaling=spec, max_position_embeddings=1024)
    assert llama_config_from_hf(hf).rope_scaling.original_max_position_embeddings == \
        transformers.LlamaConfig(**hf).rope_parameters["original_max_position_embeddings"] == 1024


def _custom_rope_preset():
    return tiny_debug_mha(rope_scaling=RopeScaling(
        factor=4.0, low_freq_factor=0.5, high_freq_factor=2.0,
        original_max_position_embeddings=256), max_position_embeddings=1024)


@pytest.mark.parametrize("preset", [llama3_1_8b, tinyllama_1_1b, tiny_debug_mha,
                                    _custom_rope_preset])
@pytest.mark.parametrize("style", ["none", "v4", "v5"])
def test_config_round_trips_through_config_json(preset, style):
    cfg = preset()
    base = {"none": None,
            "v4": {"rope_theta": 1.0, "rope_scaling": None, "torch_dtype": "float32",
                   "bos_token_id": 128000},
            "v5": {"rope_parameters": {"rope_type": "default", "rope_theta": 1.0},
                   "dtype": "float32", "bos_token_id": 128000}}[style]
    out = hf_config_from_llama(cfg, dtype=torch.bfloat16, base=base)
    assert llama_config_from_hf(json.loads(json.dumps(out)), name=cfg.name) == cfg
    v4_keys, v5_keys = {"rope_theta", "rope_scaling", "torch_dtype"}, {"rope_parameters", "dtype"}
    if style == "v4":
        assert v4_keys <= set(out) and not v5_keys & set(out)
    elif style == "v5":
        assert v5_keys <= set(out) and not v4_keys & set(out)
    else:
        assert v4_keys | v5_keys <= set(out)
    if base:
        assert out["bos_token_id"] == 128000  # non-architecture fields come from the base
    assert out["vocab_size"] == cfg.vocab_size and out["architectures"] == ["LlamaForCausalLM"]


def test_written_config_is_what_transformers_reads():
    import transformers

    cfg = llama3_1_8b()
    hf = transformers.LlamaConfig(**hf_config_from_llama(cfg, dtype=torch.bfloat16))
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert hf.rope_parameters["rope_theta"] == 500000.0 and hf.rope_parameters["factor"] == 8.0
    assert (hf.num_key_value_heads, hf.vocab_size, hf.tie_word_embeddings) == (8, 128256, False)
    custom = _custom_rope_preset()
    hf = transformers.LlamaConfig(**hf_config_from_llama(custom, dtype=torch.float32))
    assert {k: hf.rope_parameters[k] for k in CUSTOM_ROPE} == CUSTOM_ROPE


@pytest.mark.parametrize("over,message", [
    (dict(model_type="mistral"), "model_type is 'mistral', not 'llama'"),
    (dict(architectures=["LlamaForSequenceClassification"]), "do not include 'LlamaForCausalLM'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported rope type 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "unsupported rope type 'linear'"),
    (dict(rope_scaling=dict(LLAMA3_ROPE, low_freq_factor=4.0)),
     "rope_scaling: rope_scaling.high_freq_factor (4.0) must be greater than low_freq_factor"),
    (dict(rope_parameters={k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}),
     "rope_parameters (rope_type llama3) lacks ['low_freq_factor']"),
    (dict(rope_scaling=dict(LLAMA3_ROPE, factor="8")), "rope_scaling.factor must be a number"),
    (dict(rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=-1)),
     "original_max_position_embeddings must be a positive integer, got -1"),
    (dict(attention_bias=True), "attention_bias=true is not supported"),
    (dict(head_dim=32), "head_dim 32 x 8 heads != hidden_size 64"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(vocab_size=None), "lacks ['vocab_size']"),
    (dict(num_key_value_heads=3), "not divisible by num_query_groups 3"),
])
def test_bad_configs_are_refused_with_a_reason(over, message):
    with pytest.raises(HFConversionError, match="config.json") as info:
        llama_config_from_hf(_hf(**over))
    assert message in str(info.value)


# ----------------------------------------------------------------------------- tensors

def test_qkv_is_interleaved_per_query_group():
    cfg = tiny_debug()  # 8 heads, 2 groups, head dim 8
    d, h, groups = cfg.head_dim, cfg.hidden_size, cfg.num_query_groups
    # Row r of q holds head r // d, etc.: tag rows so their destination is visible.
    q = torch.arange(8 * d).repeat_interleave(h).reshape(8 * d, h).float()
    k = 1000 + torch.arange(groups * d).repeat_interleave(h).reshape(groups * d, h).float()
    v = 2000 + torch.arange(groups * d).repeat_interleave(h).reshape(groups * d, h).float()
    pm = next(p for p in param_maps(cfg) if p.kind == "qkv")
    qkv = to_megatron(pm, [q, k, v], cfg, 0)
    per = (cfg.num_attention_heads // groups + 2) * d
    for g in range(groups):
        block = qkv[g * per:(g + 1) * per, 0]
        assert torch.equal(block[: 4 * d], q[g * 4 * d:(g + 1) * 4 * d, 0])  # 4 q heads of g
        assert torch.equal(block[4 * d: 5 * d], k[g * d:(g + 1) * d, 0])
        assert torch.equal(block[5 * d:], v[g * d:(g + 1) * d, 0])
    assert all(torch.equal(a, b) for a, b in zip(to_hf(pm, qkv, cfg), (q, k, v)))


def test_every_mapping_inverts_and_pads_vocab_with_zeros():
    cfg = tiny_debug_mha(vocab_size=1001, tie_word_embeddings=False)
    shapes = hf_shapes(cfg)
    for pm in param_maps(cfg):
        parts = [torch.randn(shapes[n]) for n in pm.hf]
        full = to_megatron(pm, parts, cfg, cfg.padded_vocab_size(2))
        if pm.kind == "vocab":
            assert full.shape[0] == 1024 and not full[1001:].any()
        if pm.kind == "fc1":
            assert torch.equal(full[: cfg.ffn_hidden_size], parts[0])  # gate first
        assert all(torch.equal(a, b) for a, b in zip(to_hf(pm, full, cfg), parts)), pm.megatron
        key, layer = dist_key(pm.megatron)
        assert full_name(key, layer) == pm.megatron
    assert dist_key("decoder.layers.3.input_layernorm.weight") == \
        ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert "lm_head.weight" not in hf_shapes(tiny_debug_mha())  # tied: no head


# ----------------------------------------------------------------------------- safetensors

def test_stream_writer_matches_the_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.randn(2, 2).half(), "d": torch.arange(5)}
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", entries)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0  # header padded like safetensors does
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())
    reader = _SafetensorsFile(tmp_path / "x.safetensors")
    assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())
    save_file(tensors, tmp_path / "y.safetensors")  # and our reader reads the library's files
    reader = _SafetensorsFile(tmp_path / "y.safetensors")
    assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())


def test_stream_writer_refuses_out_of_plan_tensors(tmp_path):
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="after 0 of 1"):
        w.close()


def test_shard_plan_and_sizes():
    f32 = torch.float32
    entries = [("a", (10,), f32), ("b", (10,), f32), ("c", (100,), f32), ("d", (1,), f32)]
    assert [[e[0] for e in s] for s in plan_shards(entries, 80)] == [["a", "b"], ["c"], ["d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size(123) == 123


# ----------------------------------------------------------------------------- HF directories

def _write_hf(path, config: dict, tensors: dict, *, index: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if index:
        names = sorted(tensors)
        halves = (names[: len(names) // 2], names[len(names) // 2:])
        weight_map = {}
        for i, part in enumerate(halves):
            save_file({n: tensors[n] for n in part}, path / f"model-{i}.safetensors")
            weight_map.update({n: f"model-{i}.safetensors" for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, path / "model.safetensors")
    return path


def _random_tensors(cfg):
    return {n: torch.randn(s) for n, s in hf_shapes(cfg).items()}


def test_validation_accepts_a_good_checkpoint_sharded_or_not(tmp_path):
    config = _hf()
    cfg = llama_config_from_hf(config)
    for index in (False, True):
        ckpt = HFCheckpoint(_write_hf(tmp_path / str(index), config, _random_tensors(cfg), index=index))
        assert validate_hf(ckpt, cfg) == torch.float32


@pytest.mark.parametrize("change,message", [
    ("k_shape", "model.layers.0.self_attn.k_proj.weight: (64, 64) but config.json implies (16, 64)"),
    ("no_head", "lm_head.weight is needed"),
    ("bias", "unexpected tensors"),
    ("int", "non-float weights"),
])
def test_validation_names_the_problem(tmp_path, change, message):
    config = _hf()
    cfg = llama_config_from_hf(config)
    tensors = _random_tensors(cfg)
    if change == "k_shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(64, 64)
    elif change == "no_head":
        del tensors["lm_head.weight"]
    elif change == "bias":
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)
    else:
        tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    ckpt = HFCheckpoint(_write_hf(tmp_path / "m", config, tensors))
    with pytest.raises(HFConversionError) as info:
        validate_hf(ckpt, cfg)
    assert message in str(info.value)


def test_tied_checkpoint_may_carry_its_head_and_old_rotary_buffers(tmp_path):
    config = _hf(tie_word_embeddings=True)
    cfg = llama_config_from_hf(config)
    tensors = _random_tensors(cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.randn(4)
    validate_hf(HFCheckpoint(_write_hf(tmp_path / "m", config, tensors)), cfg)


def test_broken_directories_are_refused(tmp_path):
    with pytest.raises(HFConversionError, match="no config.json"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf()))
    with pytest.raises(HFConversionError, match="no weights"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(HFConversionError, match=r"missing: \['gone.safetensors'\]"):
        HFCheckpoint(tmp_path)
