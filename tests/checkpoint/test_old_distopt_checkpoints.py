"""Checkpoints written before the dist_opt_buckets fix (no state-layout marker in the manifest)
are refused where their Adam state was saved shifted, and load where it was not
(megasyne/checkpoint/dist_opt_layout.py).

One 2-rank launch (PP2 x DP1, distributed optimizer; ~20 s on 2 idle cores) saves tiny models
with reduction not overlapped, as the old code always did. Without virtual stages: tied
embeddings with a padded bucket before the embedding's, tied with no padding, untied. With two
virtual stages per rank (interleaved; each model chunk has its own gradient buffer): a padded
bucket only in the first chunk of the first stage, only in the last chunk of the last stage,
none. Each checkpoint loads with its marker; stripped of it (fault injection: an old
checkpoint), the padded ones are refused and the others load their Adam state. Per buffer of
every chunk, ``old_buckets_shifted`` is checked against megatron-core's own bucket layout and
against megatron-core's own old cut of its dp-zero state (whether it saved shifted moments).
Measured on the old code, docs/design.md: such a checkpoint resumed onto other losses.
"""

import json
from types import SimpleNamespace

import pytest

from megasyne.checkpoint import dist_opt_layout
from megasyne.checkpoint.dist_opt_layout import (
    STATE_LAYOUT,
    STATE_LAYOUT_KEY,
    check_optimizer_state_layout,
    old_buckets_shifted,
)
from megasyne.errors import CheckpointError
from tests.launch import run_torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("old_distopt")
    run_torchrun("tests/checkpoint/old_distopt_worker.py", 2, out, timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _layout(ranks, case) -> list[list[tuple]]:
    """Per rank: (model chunk, buckets, padded) of each gradient buffer."""
    return [[(b["chunk"], b["n"], b["padded"]) for b in r[case]["buckets"]] for r in ranks]


@pytest.mark.distributed
def test_prediction_matches_megatron_buckets(ranks):
    for rank, result in enumerate(ranks):
        for case, rec in result.items():
            for buf in rec["buckets"]:
                assert buf["predicted"] == buf["padded"] == buf["shifted"], (rank, case, buf)
    # The layouts the cases stand for: two buckets with tied embeddings on both stages, the
    # first stage's padded only for ffn 161; one bucket untied.
    assert [b["n"] for r in ranks for b in r["tied_padded"]["buckets"]] == [2, 2]
    assert [b["padded"] for r in ranks for b in r["tied_padded"]["buckets"]] == [True, False]
    assert [b["n"] for r in ranks for b in r["tied_aligned"]["buckets"]] == [2, 2]
    assert not any(b["padded"] for r in ranks for b in r["tied_aligned"]["buckets"])
    assert [b["n"] for r in ranks for b in r["untied"]["buckets"]] == [1, 1]


@pytest.mark.distributed
def test_prediction_matches_megatron_buckets_with_virtual_stages(ranks):
    # Rank 0: chunks [embedding, layer 0] and [layer 2]; rank 1: [layer 1] and [layer 3,
    # output layer]. Only the first and the last chunk split, each case pads one of them.
    assert _layout(ranks, "vp_first_padded") == [[(0, 2, True), (1, 1, False)],
                                                 [(0, 1, False), (1, 2, False)]]
    assert _layout(ranks, "vp_last_padded") == [[(0, 2, False), (1, 1, False)],
                                                [(0, 1, False), (1, 2, True)]]
    assert _layout(ranks, "vp_aligned") == [[(0, 2, False), (1, 1, False)],
                                            [(0, 1, False), (1, 2, False)]]


@pytest.mark.distributed
def test_checkpoints_with_the_marker_load_their_adam_state(ranks):
    for result in ranks:
        for case, rec in result.items():
            assert rec["fixed"] == dict(error=None, same_adam=True), case
    assert ranks[0]["tied_padded"]["marker"] == STATE_LAYOUT


@pytest.mark.distributed
@pytest.mark.parametrize("case, vpp", [("tied_padded", "None"), ("vp_first_padded", "2"),
                                       ("vp_last_padded", "2")])
def test_old_shifted_checkpoint_is_refused_on_every_rank(ranks, case, vpp):
    for result in ranks:  # a rank whose buffers are not shifted refuses too
        error = result[case]["old"]["error"]
        assert error is not None
        assert f"has no {STATE_LAYOUT_KEY!r}" in error
        assert f"tp=1, pp=2, dp=1, virtual_pp={vpp}" in error
        assert "init_checkpoint=" in error and f"{case}/iter_0000001" in error


@pytest.mark.distributed
def test_old_unshifted_checkpoints_still_load(ranks):
    for result in ranks:
        assert result["tied_aligned"]["old"] == dict(error=None, same_adam=True)
        assert result["untied"]["old"] == dict(error=None, same_adam=True)
        assert result["vp_aligned"]["old"] == dict(error=None, same_adam=True)


@pytest.mark.distributed
def test_old_virtual_stage_checkpoint_without_them_is_refused(ranks):
    # Saved with two virtual stages, loaded at PP2 without: other buffers, nothing to compute
    for result in ranks:
        error = result["vp_aligned"]["old_elsewhere"]["error"]
        assert error is not None
        assert "resume there once (tp=1, pp=2, dp=1, virtual_pp=2" in error


def _param(numel: int, shared: bool = False):
    return SimpleNamespace(numel=lambda: numel, shared_embedding=shared)


def test_old_buckets_shifted_by_hand():
    # reversed order: [a] then the shared embedding; a ends at 192, padded to 256 at dp 2
    assert old_buckets_shifted([_param(4096, shared=True), _param(192)], dp=2)
    assert not old_buckets_shifted([_param(4096, shared=True), _param(256)], dp=2)
    # dp 3: lcm 384, so 256 is padded
    assert old_buckets_shifted([_param(4096, shared=True), _param(256)], dp=3)
    # the shared embedding first in reverse order (last stage): its own padding counts
    assert old_buckets_shifted([_param(192), _param(4000, shared=True)], dp=2)
    assert not old_buckets_shifted([_param(192), _param(4096, shared=True)], dp=2)
    # the shared embedding last in reverse order (first stage): its own end padding is the
    # buffer's end, which shifts nothing
    assert not old_buckets_shifted([_param(4000, shared=True), _param(256)], dp=2)
    # one bucket: only the end is padded, which shifts nothing
    assert not old_buckets_shifted([_param(100), _param(30)], dp=2)


def test_old_checkpoint_at_another_layout_is_refused(monkeypatch, tmp_path):
    manifest = dict(layout=dict(tp=1, pp=2, dp=2, virtual_pp=None, distributed_optimizer=True),
                    model=dict(tie_word_embeddings=True))
    monkeypatch.setattr(dist_opt_layout, "_layout_here",
                        lambda chunks: dict(tp=1, pp=1, dp=4, chunks=1))
    with pytest.raises(CheckpointError, match="resume there once \\(tp=1, pp=2, dp=2"):
        check_optimizer_state_layout(manifest, [], tmp_path)
    for fine in (dict(manifest, **{STATE_LAYOUT_KEY: STATE_LAYOUT}),
                 dict(manifest, model=dict(tie_word_embeddings=False)),
                 dict(manifest, layout=dict(manifest["layout"], pp=1)),
                 dict(manifest, layout=dict(manifest["layout"], distributed_optimizer=False))):
        check_optimizer_state_layout(fine, [], tmp_path)  # nothing to check: no error
