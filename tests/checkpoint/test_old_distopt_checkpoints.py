"""Checkpoints written before the dist_opt_buckets fix (no state-layout marker in the manifest)
are refused where their Adam state was saved shifted, and load where it was not
(megasyne/checkpoint/dist_opt_layout.py).

One 2-rank launch (PP2 x DP1, distributed optimizer; ~15 s on 2 idle cores) saves three tiny
models with reduction not overlapped, as the old code always did: tied embeddings with a padded
bucket before the embedding's, tied with no padding, untied. Each checkpoint loads with its
marker; stripped of it (fault injection: an old checkpoint), only the first is refused.
``old_buckets_shifted`` is checked against megatron-core's own bucket layout of each buffer.
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


@pytest.mark.distributed
def test_prediction_matches_megatron_buckets(ranks):
    for rank, result in enumerate(ranks):
        for case, rec in result.items():
            for buf in rec["buckets"]:
                assert buf["predicted"] == buf["padded"], (rank, case, buf)
    # The layouts the cases stand for: two buckets with tied embeddings on both stages, the
    # first stage's padded only for ffn 161; one bucket untied.
    assert [b["n"] for r in ranks for b in r["tied_padded"]["buckets"]] == [2, 2]
    assert [b["padded"] for r in ranks for b in r["tied_padded"]["buckets"]] == [True, False]
    assert [b["n"] for r in ranks for b in r["tied_aligned"]["buckets"]] == [2, 2]
    assert not any(b["padded"] for r in ranks for b in r["tied_aligned"]["buckets"])
    assert [b["n"] for r in ranks for b in r["untied"]["buckets"]] == [1, 1]


@pytest.mark.distributed
def test_checkpoints_with_the_marker_load_their_adam_state(ranks):
    for result in ranks:
        for case, rec in result.items():
            assert rec["fixed"] == dict(error=None, same_adam=True), case
    assert ranks[0]["tied_padded"]["marker"] == STATE_LAYOUT


@pytest.mark.distributed
def test_old_shifted_checkpoint_is_refused_on_every_rank(ranks):
    for result in ranks:  # the second stage's buffer is not shifted: it refuses too
        error = result["tied_padded"]["old"]["error"]
        assert error is not None
        assert f"has no {STATE_LAYOUT_KEY!r}" in error and "tp=1, pp=2, dp=1" in error
        assert "init_checkpoint=" in error and "tied_padded/iter_0000001" in error


@pytest.mark.distributed
def test_old_unshifted_checkpoints_still_load(ranks):
    for result in ranks:
        assert result["tied_aligned"]["old"] == dict(error=None, same_adam=True)
        assert result["untied"]["old"] == dict(error=None, same_adam=True)


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
