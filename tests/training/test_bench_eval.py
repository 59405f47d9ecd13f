"""The score functions of bench_eval (benchmark accuracy inside training) against transformers:
summed log-probabilities of each continuation, on the trainer's own model chunks, at PP2
(pipeline forward-only pass) and TP2, within 1e-4 in fp32."""

import json

import pytest

from tests.launch import run_torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_score_fn_matches_transformers(converted_gqa, layout):
    run_torchrun("tests/training/bench_score_worker.py", 2, converted_gqa, layout, timeout=600)
    r = json.loads((converted_gqa / f"scores_{layout}.json").read_text())
    assert r["ours"] == pytest.approx(r["hf"], abs=1e-4)
