"""Document masking in the model: every document of a packed row gets the logits it gets alone.

One torchrun launch of 2 ranks checks TP2 (with sequence parallelism) and PP2, each with both
attention paths of megasyne.model.documents ("mask": Megatron's DotProductAttention with a
block-diagonal mask and per-token RoPE; "thd": our SDPAttention with PackedSeqParams, at TP2
also with our Triton kernels, the CUDA default without Transformer-Engine), against
transformers run on each document alone (fp32, eager attention); the forward-only scorer's NLL
with document ids, and the training forward step's loss (with eod_mask_loss, backward through
the pipeline) too.
The same rows without document masking are the control: far off, so the comparison can fail.
"""

import json

import pytest

from tests.launch import run_torchrun

pytestmark = pytest.mark.slow


def test_packed_documents_match_each_document_alone(converted_gqa):
    run_torchrun("tests/model/document_mask_worker.py", 2, converted_gqa, timeout=600)
    results = json.loads((converted_gqa / "document_mask.json").read_text())
    assert sorted(results) == ["tp1pp2-megatron", "tp1pp2-sdpa", "tp2pp1-megatron", "tp2pp1-sdpa",
                               "tp2pp1-sdpa-kernels"]
    for name, r in results.items():
        assert r["path"] == ("mask" if "megatron" in name else "thd"), (name, r)
        assert r["logit_diff"] < 1e-5, (name, r)
        assert r["unmasked_logit_diff"] > 0.1, (name, r)  # the documents do interact without it
        assert r["nll_diff"] < 1e-4, (name, r)
        assert r["train_loss_diff"] < 1e-5, (name, r)
        if r["path"] == "mask":  # RoPE at the reset positions, as transformers computes it
            assert r["rope_cos_diff"] < 1e-6, (name, r)
