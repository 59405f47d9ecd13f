"""HF <-> megasyne conversion end to end on tiny random Llamas (hf_models.CASES).

Launches (shared by every test here): the test process converts each case with the
streaming single-process path (a plain child process, as before, added a fresh interpreter's
torch imports and start-up); one 4-rank torchrun job (2 cores: ~25 s) converts cases from
TP2 x PP2 and TP2 x DP2 layouts and loads the converted checkpoints at TP2 x PP2 (gqa),
TP2 x DP2 (gqa, tied_llama31), TP2 x PP2 (tied_llama31: the shared embedding crosses
stages), TP1 x PP2 x DP2 (mqa_bf16: one KV group) and TP1 x DP4, TP2 x DP2, TP1 x PP2 x DP2
(llama3_custom: Llama-3-style RoPE scaling with non-Llama-3.1 constants, 320 positions past
an original context of 256), gathering parameters and logits. The way back (megasyne -> HF)
needs no process group and runs in the test process.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megasyne.checkpoint.hf import HFCheckpoint, llama_config_from_hf, param_maps, to_megatron
from megasyne.checkpoint.hf_convert import hf_to_megasyne, megasyne_to_hf
from tests.checkpoint.hf_models import CASES, hf_logits, make_hf_model, seq_length
from tests.launch import run_torchrun

WORKER = "tests/checkpoint/convert_worker.py"
LOADS = [("gqa", 2, 2), ("gqa", 2, 1), ("mqa_bf16", 1, 2), ("tied_llama31", 2, 1),
         ("tied_llama31", 2, 2), ("llama3_custom", 1, 1), ("llama3_custom", 2, 1),
         ("llama3_custom", 1, 2)]
PARALLEL_CONVERSIONS = [("gqa", 2, 2), ("tied_llama31", 2, 1), ("tied_llama31", 2, 2)]
LOGIT_TOL = 1e-5  # fp32 on both sides; measured max |diff| is 4e-7 or less


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    for case in CASES:
        make_hf_model(case, out / "hf" / case)
        # The streaming single-process path, here: no process group exists in the test process,
        # so it makes a 1-rank one on an in-process store (no environment change) and destroys it.
        hf_to_megasyne(out / "hf" / case, out / "ms" / case, progress=False)
    specs = [f"convert:{c}:{tp}:{pp}" for c, tp, pp in PARALLEL_CONVERSIONS]
    specs += [f"load:{c}:{tp}:{pp}" for c, tp, pp in LOADS]
    specs.append("trainsave:gqa:2:2")
    run_torchrun(WORKER, 4, "layouts", out, *specs, timeout=600)
    return out


def _check_spec(work, spec: str) -> None:
    """Fail with the worker's error for ``spec``."""
    err = work / "errors" / spec.replace(":", "_")
    if err.exists():
        pytest.fail(f"worker failed on {spec}: {err.read_text()}")


def _hf_config(path) -> dict:
    import transformers

    d = transformers.AutoConfig.from_pretrained(path).to_dict()
    for k in ("transformers_version", "_name_or_path", "_commit_hash"):
        d.pop(k, None)
    return d


def _assert_same_hf(original, converted):
    a, b = HFCheckpoint(original), HFCheckpoint(converted)
    names = set(a.names()) - ({"lm_head.weight"} if a.config.get("tie_word_embeddings") else set())
    assert set(b.names()) == names
    for name in names:
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name  # bit-identical
    assert _hf_config(converted) == _hf_config(original)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical(work, case):
    back = megasyne_to_hf(work / "ms" / case, work / "back" / case, progress=False,
                          max_shard_size="64KB")
    _assert_same_hf(work / "hf" / case, back)
    assert json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.distributed
@pytest.mark.parametrize("case,tp,pp", PARALLEL_CONVERSIONS,
                         ids=[f"{c}-tp{t}pp{p}" for c, t, p in PARALLEL_CONVERSIONS])
def test_conversion_from_a_parallel_layout_is_the_same(work, case, tp, pp):
    _check_spec(work, f"convert:{case}:{tp}:{pp}")
    root = work / f"ms_tp{tp}pp{pp}" / case
    manifest = json.loads((root / "iter_0000000" / "megasyne.json").read_text())
    assert manifest["layout"]["tp"] == tp and manifest["layout"]["pp"] == pp
    back = megasyne_to_hf(root, work / f"back_tp{tp}pp{pp}" / case, progress=False)
    _assert_same_hf(work / "hf" / case, back)


@pytest.mark.distributed
def test_a_training_checkpoint_converts_back(work):
    """Model state of a checkpoint written by training (DDP + optimizer, TP2 x PP2) after a
    zero-LR step: the optimizer state is ignored and the weights come back bit for bit."""
    _check_spec(work, "trainsave:gqa:2:2")
    manifest = json.loads((work / "trained" / "gqa" / "iter_0000001" / "megasyne.json").read_text())
    assert manifest["has_optimizer"] and "hf_config" not in manifest["extra"]
    back = megasyne_to_hf(work / "trained" / "gqa", work / "back_trained", progress=False,
                          hf_config=work / "hf" / "gqa")  # token ids etc. from the base model
    _assert_same_hf(work / "hf" / "gqa", back)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_manifest_describes_the_source(work, case):
    root = work / "ms" / case
    assert (root / "latest").read_text().strip() == "iter_0000000"
    manifest = json.loads((root / "iter_0000000" / "megasyne.json").read_text())
    kwargs, _, dtype = CASES[case]
    assert manifest["iteration"] == 0 and manifest["has_optimizer"] is False
    assert manifest["extra"]["source"] == "hf"
    assert manifest["extra"]["dtype"] == str(dtype).removeprefix("torch.")
    model = manifest["model"]
    assert model["vocab_size"] == kwargs["vocab_size"]  # unpadded
    assert model["num_query_groups"] == kwargs["num_key_value_heads"]
    assert model["rope_theta"] == kwargs["rope_theta"]
    assert model["tie_word_embeddings"] == kwargs.get("tie_word_embeddings", False)
    scaling = kwargs.get("rope_scaling")
    assert model["rope_scaling"] == (None if scaling is None else
                                     {k: v for k, v in scaling.items() if k != "rope_type"})


@pytest.mark.distributed
@pytest.mark.parametrize("case,tp,pp", LOADS, ids=[f"{c}-tp{t}pp{p}" for c, t, p in LOADS])
def test_loaded_parameters_equal_hf(work, case, tp, pp):
    """Every parameter loaded at TP/PP is exactly the HF tensor (padding rows zero)."""
    _check_spec(work, f"load:{case}:{tp}:{pp}")
    got = torch.load(work / "load" / f"{case}.tp{tp}pp{pp}.pt")
    hf = HFCheckpoint(work / "hf" / case)
    cfg = llama_config_from_hf(hf.config)
    params = got["params"]
    maps = param_maps(cfg)
    expected_names = {pm.megatron for pm in maps}
    if cfg.tie_word_embeddings and pp > 1:
        expected_names.add("output_layer.weight")  # the last stage's copy of the embedding
    assert set(params) == expected_names
    for pm in maps:
        want = to_megatron(pm, [hf.get(n).float() for n in pm.hf], cfg, got["padded_vocab"])
        assert torch.equal(params[pm.megatron], want), pm.megatron
    if "output_layer.weight" in params and cfg.tie_word_embeddings:
        assert torch.equal(params["output_layer.weight"], params["embedding.word_embeddings.weight"])


@pytest.mark.distributed
@pytest.mark.parametrize("case,tp,pp", LOADS, ids=[f"{c}-tp{t}pp{p}" for c, t, p in LOADS])
def test_logits_match_transformers(work, case, tp, pp):
    _check_spec(work, f"load:{case}:{tp}:{pp}")
    got = torch.load(work / "load" / f"{case}.tp{tp}pp{pp}.pt")["logits"]
    ref = hf_logits(work / "hf" / case, seq_length(case))
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff < LOGIT_TOL, f"{case} at TP{tp} PP{pp}: max |logit diff| {diff:.3g}"


@pytest.mark.distributed
def test_hf_output_loads_cleanly_with_transformers(work, caplog):
    import transformers

    back = megasyne_to_hf(work / "ms" / "tied_llama31", work / "clean", progress=False,
                          dtype=torch.bfloat16)
    config = json.loads((back / "config.json").read_text())
    for key in ("architectures", "num_key_value_heads", "rope_parameters", "tie_word_embeddings",
                "rms_norm_eps", "max_position_embeddings", "vocab_size", "head_dim"):
        assert key in config, key
    assert config["vocab_size"] == 999 and config["dtype"] == "bfloat16"
    assert config["rope_parameters"]["rope_type"] == "llama3"
    with caplog.at_level(logging.WARNING):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            back, output_loading_info=True)
    assert model.dtype == torch.bfloat16
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert not [r for r in caplog.records if "key" in r.getMessage().lower()]
