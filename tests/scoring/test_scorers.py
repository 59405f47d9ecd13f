"""The one forward-only scorer (megasyne.scorers) against transformers' log-probabilities.

MegatronScorer on the trainer's own DDP-wrapped chunks at TP2, PP2, PP2 x 2 interleaved virtual
stages and DP2 (one launch, 2 ranks): summed continuation log-probabilities (the score_fn of
validation-free callers: the benchmark probe, tools/evaluate.py) and masked per-row NLL sums
(validation, score_ppl) within 1e-4 of transformers in fp32, with the padded vocabulary (1000
real tokens padded to 1024) taking no probability mass. HFScorer against the same numbers in
process.
"""

import json

import numpy as np
import pytest

from tests.launch import run_torchrun
from tests.scoring.scorer_worker import hf_reference, sequences, windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scores(converted_gqa):
    run_torchrun("tests/scoring/scorer_worker.py", 2, converted_gqa, timeout=900)
    return json.loads((converted_gqa / "scores.json").read_text())


@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2vp2", "dp2"])
def test_megatron_scorer_matches_transformers(scores, layout):
    r = scores[layout]
    assert r["ours"] == pytest.approx(scores["hf"], abs=1e-4)
    assert r["nll"] == pytest.approx(scores["hf_nll"], abs=1e-4)
    assert r["count"] == scores["hf_count"] == [12, 9, 9]


def test_hf_scorer_matches_transformers(converted_gqa):
    import torch
    import transformers

    from megasyne.scorers import HFScorer, score_fn

    model = transformers.LlamaForCausalLM.from_pretrained(
        converted_gqa / "hf", attn_implementation="eager", dtype=torch.float32)
    scorer = HFScorer(model)
    seqs, starts = sequences(model.config.vocab_size)
    tokens, labels, mask = windows(model.config.vocab_size)
    ref, ref_nll, ref_count = hf_reference(converted_gqa / "hf", seqs, starts, tokens, labels, mask)
    assert score_fn(scorer)(seqs, starts) == pytest.approx(ref, abs=1e-4)
    nll, count = scorer.nll(tokens, labels, mask)
    assert nll.tolist() == pytest.approx(ref_nll, abs=1e-4) and count.tolist() == ref_count
    # Several label rows on one input row: each row's own labels, one forward.
    rows = np.array([0, 0, 2])
    shared, _ = scorer.nll(tokens, labels[[0, 1, 2]], mask, rows=rows)
    alone, _ = scorer.nll(tokens[[0, 0, 2]], labels, mask)
    assert shared.tolist() == pytest.approx(alone.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="rows must give an input row"):
        scorer.nll(tokens, labels, mask, rows=np.array([0, 1, 3]))


def test_hf_scorer_takes_this_ranks_gpu(tmp_path, monkeypatch):
    """Under torchrun on a GPU node, rank k's model goes to cuda:k, not to every rank's GPU 0.
    (No GPU here: CUDA and the model are stood in for, and what they are asked is recorded.)"""
    import torch
    import transformers

    from megasyne import scorers

    asked = {}

    class Model(torch.nn.Module):
        config = type("Config", (), {"vocab_size": 8})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def to(self, device):
            asked["to"] = device
            return self

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: Model())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: asked.setdefault("set_device", d))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "config.json").write_text("{}")
    scorers.HFScorer.from_dir(tmp_path)
    assert asked == {"set_device": 3, "to": torch.device("cuda", 3)}
