"""Document masking's data side: positions, loss mask and attention mask as Megatron-LM makes
them, micro-batches, the EOD id from the preprocess reports, and the config section."""

import json

import numpy as np
import pytest
import torch
import yaml

from megasyne.errors import ConfigError
from megasyne.model.documents import block_causal_mask, cu_seqlens
from megasyne.training.batches import micro_batches
from megasyne.training.config import load_config
from megasyne.training.documents import (
    DocumentMasking,
    document_ids,
    eod_loss_mask,
    eod_token_id,
    reset_position_ids,
)

EOD = 7


def _rows() -> np.ndarray:
    """Random rows over a 10-token vocabulary (EODs ~15%), and the edge cases: EOD first, EOD
    last, EODs in a row, no EOD, only EODs."""
    rng = np.random.default_rng(0)
    rows = [rng.choice(10, 24, p=[0.85 / 9] * 7 + [0.15] + [0.85 / 9] * 2) for _ in range(40)]
    rows += [np.array([EOD] + [1] * 23), np.array([1] * 23 + [EOD]),
             np.array([1, EOD, EOD, EOD, 2] + [3] * 19), np.full(24, 4), np.full(24, EOD)]
    return np.stack(rows).astype(np.int64)


def test_positions_loss_and_attention_masks_equal_megatron_lm():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = _rows()
    docs = document_ids(tokens, EOD)
    ours_pos, ours_loss = reset_position_ids(docs), eod_loss_mask(tokens, EOD)
    ours_mask = block_causal_mask(torch.from_numpy(docs))[:, 0]  # [b, s, s], True = masked
    for r, row in enumerate(tokens):
        attn, loss, pos = _get_ltor_masks_and_position_ids(
            torch.from_numpy(row), EOD, reset_position_ids=True, reset_attention_mask=True,
            eod_mask_loss=True, create_attention_mask=True)
        assert ours_pos[r].tolist() == pos.tolist(), row
        assert ours_loss[r].tolist() == loss.tolist(), row
        assert torch.equal(ours_mask[r], attn[0]), row


def test_cu_seqlens_are_the_document_offsets_of_the_flattened_rows():
    tokens = _rows()
    docs = document_ids(tokens, EOD)
    offsets, longest = cu_seqlens(docs)
    b, s = docs.shape
    want = [0]  # brute force: walk every row, a new document at each id change
    for r in range(b):
        for k in range(s):
            if k > 0 and docs[r, k] != docs[r, k - 1]:
                want.append(r * s + k)
        want.append((r + 1) * s)
    assert offsets.tolist() == want and offsets.dtype == np.int32
    assert longest == max(np.diff(want))


class _Samples:
    """dataset[i] -> {"tokens": int64 [s + 1], "source": int}, as MixtureDataset gives them."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i):
        return {"tokens": self.rows[i], "source": i % 2}


def _batches(**kw):
    rows = np.concatenate([_rows(), _rows()[:, :1]], axis=1)[:8]  # 8 samples of 25 tokens
    return rows, micro_batches(_Samples(rows), first_sample=0, per_rank=8, dp_rank=0,
                               micro_batch_size=4, **kw)


def test_micro_batches_without_masking_are_unchanged():
    rows, mbs = _batches()
    for k, mb in enumerate(mbs):
        assert sorted(mb) == ["labels", "loss_mask", "position_ids", "sample_ids", "source", "tokens"]
        assert torch.equal(mb["tokens"], torch.from_numpy(rows[4 * k:4 * k + 4, :-1]))
        assert torch.equal(mb["loss_mask"], torch.ones(4, 24))
        assert torch.equal(mb["position_ids"], torch.arange(24).expand(4, -1))


def test_micro_batches_with_masking_carry_documents_positions_and_loss_mask():
    rows, mbs = _batches(masking=DocumentMasking(enabled=True, eod_mask_loss=True), eod_id=EOD)
    for k, mb in enumerate(mbs):
        inputs = rows[4 * k:4 * k + 4, :-1]
        assert torch.equal(mb["labels"], torch.from_numpy(rows[4 * k:4 * k + 4, 1:]))
        assert mb["document_ids"].tolist() == document_ids(inputs, EOD).tolist()
        assert mb["position_ids"].tolist() == reset_position_ids(document_ids(inputs, EOD)).tolist()
        assert mb["loss_mask"].tolist() == (inputs != EOD).astype(np.float32).tolist()
    # eod_mask_loss alone: the loss mask only; attention and positions stay plain
    _, mbs = _batches(masking=DocumentMasking(eod_mask_loss=True), eod_id=EOD)
    assert "document_ids" not in mbs[0] and torch.equal(mbs[0]["position_ids"], torch.arange(24).expand(4, -1))
    assert mbs[0]["loss_mask"].sum() < 4 * 24
    with pytest.raises(ValueError, match="needs the EOD id"):
        _batches(masking=DocumentMasking(enabled=True))


class _Sources:
    def __init__(self, prefixes):
        self.meta = {"sources": [{"prefix": str(p)} for p in prefixes]}


def _report(prefix, **fields):
    data = {"tokenizer": {"eod_id": 7}, "append_eod": True}
    for key, value in fields.items():
        if key == "eod_id":
            data["tokenizer"]["eod_id"] = value
        else:
            data[key] = value
    (prefix.parent / (prefix.name + ".report.json")).write_text(json.dumps(data))


def test_eod_id_comes_from_the_preprocess_reports(tmp_path):
    a, b = tmp_path / "a_text_document", tmp_path / "b_text_document"
    on = DocumentMasking(enabled=True)
    assert eod_token_id(_Sources([a]), DocumentMasking(), "recipe r.yaml") is None  # off: not read
    with pytest.raises(ConfigError, match=f"{a}.report.json not found.*--append-eod"):
        eod_token_id(_Sources([a]), on, "recipe r.yaml")
    _report(a)
    _report(b, eod_id=None)
    assert eod_token_id(_Sources([a]), on, "recipe r.yaml") == 7
    assert eod_token_id(_Sources([a]), DocumentMasking(eod_mask_loss=True), "recipe r.yaml") == 7
    with pytest.raises(ConfigError, match=f"records no EOD id for the tokenizer of {b}"):
        eod_token_id(_Sources([a, b]), on, "recipe r.yaml")
    _report(b, append_eod=False)
    with pytest.raises(ConfigError, match=f"{b} was preprocessed without --append-eod"):
        eod_token_id(_Sources([a, b]), on, "recipe r.yaml")
    _report(b, eod_id=8)
    with pytest.raises(ConfigError, match="different EOD ids"):
        eod_token_id(_Sources([a, b]), on, "recipe r.yaml")


@pytest.fixture
def config_file(tmp_path):
    (tmp_path / "recipe.yaml").write_text("seq_length: 16\n")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dict(run_dir="run", recipe="recipe.yaml", model="tiny_debug",
                                        parallel=dict(world_size=2, tp=2), global_batch_size=4)))
    return path


def test_config_section(config_file):
    assert load_config(str(config_file)).document_masking == DocumentMasking()
    cfg = load_config(str(config_file), ["document_masking.enabled=true",
                                         "document_masking.eod_mask_loss=true"])
    assert cfg.document_masking == DocumentMasking(enabled=True, eod_mask_loss=True)
    for overrides, message in [
        (["document_masking.enabled=1"], "document_masking: enabled must be true or false, got 1"),
        (["document_masking.reset_position_ids=true"],
         "unknown keys in document_masking: \\['reset_position_ids'\\]"),
        (["document_masking.enabled=true", "parallel.tp=1", "parallel.cp=2"],
         "document_masking.enabled does not support context parallelism"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(str(config_file), overrides)
