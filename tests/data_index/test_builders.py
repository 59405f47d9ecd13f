"""C++ builders (csrc/) against brute-force Python oracles, and their checked wrappers."""

from __future__ import annotations

import numpy as np
import pytest

from megasyne.data.index_builders import build_blend, build_sample_index
from tests.data_index.helpers import oracle_blend, oracle_sample_index


def random_weights(rng, num_sources: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # near-uniform, many exact ties
        return np.ones(num_sources)
    if kind == 1:  # skewed, some tiny
        return rng.dirichlet(np.full(num_sources, 0.2)) + 1e-9
    if kind == 2:  # "recipe-like" round numbers
        return rng.integers(1, 20, num_sources) / 20.0
    w = rng.dirichlet(np.ones(num_sources))
    w[rng.integers(num_sources)] = 0.0  # a source absent from the stage
    return w if w.sum() > 0 else np.ones(num_sources)


def max_prefix_deviation(source_id: np.ndarray, weights: np.ndarray) -> float:
    """max over prefixes n = 1..N and sources s of |count_s(n) - w_s * n|."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    n = source_id.shape[0]
    onehot = np.zeros((n, w.shape[0]), dtype=np.int32)
    onehot[np.arange(n), source_id] = 1
    counts = np.cumsum(onehot, axis=0)
    target = np.arange(1, n + 1, dtype=np.float64)[:, None] * w[None, :]
    return float(np.abs(counts - target).max())


@pytest.mark.parametrize("seed", range(40))
def test_blend_matches_oracle(seed):
    rng = np.random.default_rng(seed)
    num_sources = int(rng.integers(1, 20))
    w = random_weights(rng, num_sources)
    n = int(rng.integers(0, 1500))
    cursors = rng.integers(0, 10**12, num_sources).astype(np.int64)
    res = build_blend(w, n, cursors)
    sid, ssm, cur = oracle_blend(w, n, cursors)
    assert res.source_id.dtype == np.int16 and res.source_sample.dtype == np.int64
    np.testing.assert_array_equal(res.source_id, sid)
    np.testing.assert_array_equal(res.source_sample, ssm)
    np.testing.assert_array_equal(res.cursors, cur)


@pytest.mark.parametrize("seed", range(30))
def test_blend_every_prefix_within_two(seed):
    """Guarantee (1): for every prefix of the interval, |count_s - w_s * n| <= 2 (in fact < 1.25)."""
    rng = np.random.default_rng(1000 + seed)
    num_sources = int(rng.integers(2, 40))
    w = random_weights(rng, num_sources)
    res = build_blend(w, 20_000)
    dev = max_prefix_deviation(res.source_id, w)
    assert dev <= 2.0, dev
    assert dev < 1.25, dev  # the tighter empirical bound we document
    # over-allocation is always below one sample
    wn = w / w.sum()
    onehot = np.zeros((20_000, num_sources), dtype=np.int32)
    onehot[np.arange(20_000), res.source_id] = 1
    over = np.cumsum(onehot, 0) - np.arange(1, 20_001)[:, None] * wn[None, :]
    assert over.max() < 1.0
    assert np.all(wn[res.source_id] > 0)  # a zero-weight source is never chosen


def test_blend_cursors_continue_and_intervals_compose():
    rng = np.random.default_rng(5)
    w1, w2 = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    a = build_blend(w1, 777)
    b = build_blend(w2, 555, a.cursors)
    stream = np.concatenate([a.source_sample, b.source_sample])
    sid = np.concatenate([a.source_id, b.source_id])
    for s in range(6):  # each source's samples are 0, 1, 2, ... with no gap or repeat
        np.testing.assert_array_equal(stream[sid == s], np.arange(int(b.cursors[s])))


def test_blend_large_interval_int64_stream():
    res = build_blend([0.25, 0.75], 3, np.array([2**40, 2**62], dtype=np.int64))
    assert res.source_sample.tolist() == [2**62, 2**40, 2**62 + 1]


@pytest.mark.parametrize("bad, match", [
    (dict(weights=[0.0, 0.0], num_samples=3), "sum to 0"),
    (dict(weights=[1.0, -1.0], num_samples=3), ">= 0"),
    (dict(weights=[1.0, float("nan")], num_samples=3), "finite"),
    (dict(weights=[[1.0]], num_samples=3), "1-D"),
    (dict(weights=[1.0], num_samples=-1), ">= 0"),
    (dict(weights=[1.0], num_samples=2.5), "int"),
    (dict(weights=[1.0, 1.0], num_samples=3, cursors=[0]), "shape"),
    (dict(weights=[1.0, 1.0], num_samples=3, cursors=[0, -1]), ">= 0"),
    (dict(weights=[1.0, 1.0], num_samples=3, cursors=[0.5, 1.0]), "integers"),
    (dict(weights=np.ones(40000), num_samples=3), "at most"),
])
def test_blend_wrapper_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        build_blend(**bad)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("seed", range(25))
def test_sample_index_matches_oracle(seed, dtype):
    rng = np.random.default_rng(seed)
    n_docs = int(rng.integers(1, 400))
    hi = int(rng.choice([3, 20, 200]))
    lengths = rng.integers(0 if seed % 3 == 0 else 1, hi, n_docs).astype(np.int32)  # some empty
    seq = int(rng.choice([1, 2, 7, 16, 64]))
    if lengths.sum() < seq + 1:
        lengths[0] += seq + 1
    got = build_sample_index(lengths, seq, dtype=dtype)
    assert got.dtype == dtype and got.shape == ((lengths.sum() - 1) // seq + 1, 2)
    np.testing.assert_array_equal(got, oracle_sample_index(lengths, seq))


@pytest.mark.filterwarnings("ignore::UserWarning")  # megatron.core: "Apex is not installed"
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("seed", range(10))
def test_sample_index_with_order_matches_gathered(seed, dtype):
    rng = np.random.default_rng(100 + seed)
    lengths = rng.integers(0, 50, int(rng.integers(2, 300))).astype(np.int32)
    lengths[0] += 40
    order = rng.permutation(lengths.size)
    if seed % 2:
        order = order[: max(1, order.size // 2)]  # an epoch over a subset of the documents
        order = np.append(order, 0)
    seq = int(rng.choice([1, 5, 16]))
    got = build_sample_index(lengths, seq, dtype=dtype, order=order)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, oracle_sample_index(lengths[order], seq))
    np.testing.assert_array_equal(got, build_sample_index(lengths[order], seq, dtype=dtype))


def test_sample_index_order_is_checked():
    with pytest.raises(ValueError, match="document ids"):
        build_sample_index(np.full(4, 10, np.int32), 3, order=[0, 4])
    with pytest.raises(ValueError, match="1-D integer"):
        build_sample_index(np.full(4, 10, np.int32), 3, order=[0.0, 1.0])


def test_sample_index_is_megatrons_for_one_epoch():
    """Our per-epoch index equals Megatron's build_sample_idx (one epoch, extra token, drop last)."""
    from megatron.core.datasets import helpers_cpp

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 300, 5000).astype(np.int32)
    order = rng.permutation(5000).astype(np.int32)
    for seq in (8, 128, 1000):
        ours = build_sample_index(sizes[order], seq)
        np.testing.assert_array_equal(build_sample_index(sizes, seq, order=order), ours)
        theirs = helpers_cpp.build_sample_idx_int32(sizes, order, seq, 1, int(sizes.sum()), True, 1)
        np.testing.assert_array_equal(ours, theirs)
        theirs64 = helpers_cpp.build_sample_idx_int64(sizes, order, seq, 1, int(sizes.sum()), True, 1)
        np.testing.assert_array_equal(build_sample_index(sizes[order], seq, dtype=np.int64), theirs64)


@pytest.mark.parametrize("args, match", [
    (([5, -1, 5], 2), "negative"),
    (([[5, 5]], 2), "1-D"),
    (([1.5, 2.0], 2), "integer"),
    (([3, 3], 0), "seq_length"),
    (([3, 3], 6), "cannot hold one sample"),
    (([3, 3], 2, np.int16), "int32 or int64"),
])
def test_sample_index_wrapper_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        build_sample_index(*args)


def test_no_compilation_at_import():
    """The extension is a prebuilt module: importing never touches a compiler."""
    import megasyne._csrc as c

    assert c.__file__.endswith((".so", ".pyd"))
    assert isinstance(c.INDEX_ALGO_VERSION, str)
