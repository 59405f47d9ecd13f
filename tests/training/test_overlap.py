"""Overlapped gradient reduction and parameter gathering train exactly like the synchronous
collectives (docs/design.md, "Overlapped data-parallel collectives").

One 2-rank launch (DP2 with the plain and the distributed optimizer) trains every case three
times from the same weights: overlap off, overlap on (small buckets), and resumed from a
checkpoint the overlapped run saved with its parameter gather pending. A 4-rank launch does the
same for TP2 x DP2, PP2 x DP2 and interleaved PP2 x DP2 (distributed optimizer): ~25 s more on
2 idle cores (all five tests: 39 s), mostly imports.

Bit-identical: losses, parameters, the scorer's NLL, and grad norms with the plain optimizer:
with two data-parallel ranks every reduced element is one fp32 addition a + b, whatever the
buckets or the timing. The distributed optimizer's grad norm sums per-rank partial norms, and
which elements a rank holds depends on the buckets, so it is compared within fp32 summation
noise (measured 5e-7 relative); its runs clip nothing, so the updates stay exact.
"""


import pytest
import torch

from tests.launch import run_torchrun

WORKER = "tests/training/overlap_worker.py"
TWO_RANKS = ["dp2", "dp2_distopt"]
FOUR_RANKS = ["tp2_dp2", "pp2_dp2_distopt", "vp2_dp2_distopt"]


def _launch(tmp_path_factory, nproc, cases):
    out = tmp_path_factory.mktemp(f"overlap{nproc}")
    # A hang (a collective some rank never joins) shows as the timeout.
    run_torchrun(WORKER, nproc, out, *cases, timeout=600)
    return {c: torch.load(out / f"{c}.pt") for c in cases}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(tmp_path_factory, 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _launch(tmp_path_factory, 4, FOUR_RANKS)


def _check_parity(runs, case):
    off, on = runs["off"], runs["on"]
    assert len(off["losses"]) == len(on["losses"]) == 3
    assert on["losses"] == off["losses"]
    assert off["losses"][0] != off["losses"][-1]  # it trained
    if "distopt" in case:
        assert on["norms"] == pytest.approx(off["norms"], rel=2e-6)
    else:
        assert on["norms"] == off["norms"]
    assert on["nll"] == off["nll"]
    assert set(on["params"]) == set(off["params"])
    for name, param in off["params"].items():
        assert torch.equal(on["params"][name], param), f"{case}: parameter {name}"


def _check_overlapped(runs, case):
    off, on = runs["off"], runs["on"]
    assert off["early"] == [0, 0, 0]  # every reduce launched inside finalize_model_grads
    assert on["groups"] > 1
    # After the first batch (which records when each bucket's gradients are complete) every
    # bucket group's reduce was launched before finalize_model_grads waited on it.
    assert on["early"][1:] == [on["groups"]] * 2
    assert off["pending"] == [False] * 3
    assert on["pending"] == [("distopt" in case)] * 3  # the gather left to the next forward


def _check_resume(runs, case):
    on, resumed = runs["on"], runs["resume"]
    # The checkpoint saved while the parameter gather was pending holds the post-step weights.
    assert set(resumed["loaded"]) == set(on["saved"])
    for name, param in on["saved"].items():
        assert torch.equal(resumed["loaded"][name], param), f"{case}: saved weight {name}"
    assert resumed["losses"] == on["losses"][1:]
    assert resumed["norms"] == on["norms"][1:]
    for name, param in on["params"].items():
        assert torch.equal(resumed["params"][name], param), f"{case}: parameter {name}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", TWO_RANKS)
def test_overlap_matches_synchronous_dp2(two_ranks, case):
    _check_parity(two_ranks[case], case)
    _check_overlapped(two_ranks[case], case)
    _check_resume(two_ranks[case], case)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", FOUR_RANKS)
def test_overlap_matches_synchronous_4_ranks(four_ranks, case):
    _check_parity(four_ranks[case], case)
    _check_overlapped(four_ranks[case], case)
    _check_resume(four_ranks[case], case)
