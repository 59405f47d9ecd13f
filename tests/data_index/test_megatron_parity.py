"""Our blend vs Megatron-Core's ``helpers_cpp.build_blending_indices`` (shuffle-free: the blend itself).

Documented difference. Both pick, for sample ``i``, the source with the largest error
``w_s * t - count_s`` with ties to the lowest id; they differ only in the target ``t``:

- megasyne: ``t = i + 1`` -- the prefix *including* the sample being placed (computed exactly,
  weights in 2^-52 fixed point, see csrc/blend.cpp);
- Megatron: ``t = max(i, 1)`` -- the prefix *before* it (and 1 for the first two samples).

So the two source sequences coincide for weights where the lag does not change any argmax
(uniform weights, two equal sources, dyadic shares like 1/2 : 1/4 : 1/4), and differ in
general (e.g. 0.2 : 0.8 from the 4th sample on). Both are exact to within ~1.2 samples at
every prefix; ours never overshoots a source by a whole sample. These tests pin Megatron's rule
with the same oracle, so a change of either side shows up here.
"""

from __future__ import annotations

import numpy as np
import pytest

from megasyne.data.index_builders import build_blend
from tests.data_index.helpers import oracle_blend
from tests.data_index.test_builders import max_prefix_deviation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # megatron.core import warnings


def megatron_blend(weights, n):
    from megatron.core.datasets import helpers_cpp

    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    di = np.empty(n, dtype=np.int16)
    ds = np.empty(n, dtype=np.int64)
    helpers_cpp.build_blending_indices(di, ds, w, w.shape[0], n, False)
    return di, ds


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [0.5, 0.5], [0.5, 0.25, 0.25], [1] * 12])
def test_same_sequence_where_the_targets_agree(weights):
    ours = build_blend(weights, 4000)
    di, ds = megatron_blend(weights, 4000)
    np.testing.assert_array_equal(ours.source_id, di)
    np.testing.assert_array_equal(ours.source_sample, ds)


@pytest.mark.parametrize("seed", range(8))
def test_megatron_follows_the_documented_rule(seed):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(int(rng.integers(2, 10))))
    di, ds = megatron_blend(w, 1500)
    sid, ssm, _ = oracle_blend(w, 1500, np.zeros(w.shape[0], dtype=np.int64), megatron_rule=True)
    np.testing.assert_array_equal(di, sid)
    np.testing.assert_array_equal(ds, ssm)


def test_sequences_differ_in_general_but_both_are_exact():
    w = np.array([0.2, 0.8])
    ours = build_blend(w, 10)
    di, _ = megatron_blend(w, 10)
    assert ours.source_id.tolist() != di.tolist()
    rng = np.random.default_rng(3)
    for _ in range(10):
        w = rng.dirichlet(np.ones(int(rng.integers(2, 13))))
        ours = build_blend(w, 20_000)
        di, _ = megatron_blend(w, 20_000)
        assert max_prefix_deviation(ours.source_id, w) < 1.25
        assert max_prefix_deviation(di, w) < 2.0
        # the realised totals agree to within one sample per source
        diff = np.bincount(ours.source_id, minlength=w.size) - np.bincount(di, minlength=w.size)
        assert np.abs(diff).max() <= 1
