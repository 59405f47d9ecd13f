"""The score functions of bench_eval (benchmark accuracy inside training) against transformers:
summed log-probabilities of each continuation, on the trainer's own model chunks, at PP2
(pipeline forward-only pass) and TP2, within 1e-4 in fp32."""

import json

import pytest

from tests.checkpoint.hf_models import make_hf_model
from tests.launch import run_torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megasyne.checkpoint.hf_convert import hf_to_megasyne

    out = tmp_path_factory.mktemp("bench_score")
    make_hf_model("gqa", out / "hf")
    hf_to_megasyne(out / "hf", out / "ms", progress=False)
    return out


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_score_fn_matches_transformers(converted, layout):
    run_torchrun("tests/training/bench_score_worker.py", 2, converted, layout, timeout=600)
    r = json.loads((converted / f"scores_{layout}.json").read_text())
    assert r["ours"] == pytest.approx(r["hf"], abs=1e-4)
