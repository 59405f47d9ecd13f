"""pretrain_syne.py with document masking: 2 steps on 2 gloo ranks (TP2) over the tiny corpus
cut into short documents, so that each sample packs several (preprocessed with --append-eod).

Run "docs" has ``document_masking: {enabled, eod_mask_loss}``, run "loss_only" only
``eod_mask_loss``: both train the same tokens (the non-EOD inputs of the index's samples, with
the EOD id read from the preprocess reports), so their losses differ only by the attention and
positions that the option confines to each document; validation is scored the same way.
Masking off is the path every other end-to-end test runs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.training.pretrain_launch import SEQ, G, launch, make_run_files, records

pytestmark = pytest.mark.slow

COMMON = ("train_steps=2", "eval_recipe=recipe.yaml", "eval_interval=2", "eval_samples=8",
          "save_interval=100", "document_masking.eod_mask_loss=true")


def test_two_steps_with_document_masking(tmp_path):
    from megasyne.data.dataset import MixtureDataset

    make_run_files(tmp_path, docs_per_source=10, max_doc_chars=40)  # ~1-2 EODs per sample
    runs = {}
    for run, extra in (("docs", ["document_masking.enabled=true"]), ("loss_only", [])):
        proc = launch(tmp_path, run, *COMMON, *extra)
        assert proc.returncode == 0, proc.stderr[-6000:]
        runs[run] = records(tmp_path, run)
    eod = json.loads((tmp_path / "en_drama_text_document.report.json").read_text())["tokenizer"]["eod_id"]
    index = MixtureDataset(tmp_path / "docs" / "index")
    for step in (1, 2):
        inputs = np.stack([index[i]["tokens"][:-1] for i in range((step - 1) * G, step * G)])
        assert 0 < (inputs == eod).sum() < inputs.size // 4  # several documents per step
        for run, recs in runs.items():
            r = recs[step - 1]
            assert r["step"] == step and math.isfinite(r["loss"]), (run, r)
            assert sum(r["source_tokens"].values()) == int((inputs != eod).sum()) < G * SEQ, (run, r)
        # the same tokens trained: only attention and positions tell the two runs apart
        assert abs(runs["docs"][step - 1]["loss"] - runs["loss_only"][step - 1]["loss"]) > 1e-4
    for run, recs in runs.items():
        assert recs[1]["loss"] < recs[0]["loss"], (run, recs)  # it trains
        assert math.isfinite(recs[1]["eval"]["loss"]), (run, recs[1])
    assert abs(runs["docs"][1]["eval"]["loss"] - runs["loss_only"][1]["eval"]["loss"]) > 1e-4
