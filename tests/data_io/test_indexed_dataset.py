"""The .bin/.idx writer and reader: Megatron compatibility both ways, validation, atomicity, memory."""

import os
import struct
import tracemalloc

import numpy as np
import pytest

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron is imported)
from megasyne.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_token_dtype,
    dtype_code,
    idx_fingerprint,
)


def random_docs(n, high, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, 60))) for _ in range(n)]


def write(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


@pytest.fixture(scope="module")
def megatron_indexed():
    from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_dtype_codes_match_megatron(megatron_indexed):
    for t, code in DTYPE_CODES.items():
        assert megatron_indexed.DType.code_from_dtype(t) == code
    assert best_token_dtype(32000) is np.uint16 and best_token_dtype(128256) is np.int32
    assert best_token_dtype(65500) is np.int32 and best_token_dtype(65499) is np.uint16
    assert dtype_code("uint16") == 8 and dtype_code(np.dtype("<i4")) == 4


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65500), (np.int32, 128256)])
def test_megatron_reads_what_we_write(tmp_path, megatron_indexed, dtype, high):
    docs = random_docs(500, high)
    write(tmp_path / "ours", docs, dtype)
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs) and theirs.index.dtype == dtype
    assert np.array_equal(theirs.document_indices, np.arange(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(theirs[i], d)
    assert np.array_equal(theirs.get(3, offset=1, length=min(2, len(docs[3]) - 1)),
                          docs[3][1:1 + min(2, len(docs[3]) - 1)])


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65500), (np.int32, 128256)])
def test_we_read_what_megatron_writes(tmp_path, megatron_indexed, dtype, high):

    docs = random_docs(500, high, seed=1)
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=dtype)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(tmp_path / "meg.idx"))
    ds = IndexedDataset(tmp_path / "meg")
    assert len(ds) == ds.num_documents == len(docs) and ds.dtype == np.dtype(dtype)
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64 and ds.document_indices.shape == (len(docs) + 1,)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d) and np.array_equal(ds.get(i), d)
    ds.validate()
    # and the files are byte-identical to ours
    write(tmp_path / "ours", docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"meg{ext}").read_bytes()


def test_get_offset_length_and_bounds(tmp_path):
    write(tmp_path / "d", [np.arange(10), np.arange(100, 105)], np.uint16)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.get(0, offset=3, length=4).tolist() == [3, 4, 5, 6]
    assert ds.get(1, offset=2).tolist() == [102, 103, 104]
    assert ds[-1].tolist() == [100, 101, 102, 103, 104]
    assert [x.tolist() for x in ds[0:2]][1] == [100, 101, 102, 103, 104]
    with pytest.raises(IndexError):
        ds.get(2)
    with pytest.raises(IndexError):
        ds.get(1, offset=3, length=3)


def test_add_documents_equals_add_document(tmp_path):
    docs = random_docs(300, 1000, seed=3)
    write(tmp_path / "a", docs, np.uint16)
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        w.add_documents(np.concatenate(docs[:100]), [len(d) for d in docs[:100]])
        w.add_documents(np.concatenate(docs[100:]), [len(d) for d in docs[100:]])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_refuses_empty_and_out_of_range_tokens(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        with pytest.raises(ValueError, match="empty document"):
            w.add_document([])
        with pytest.raises(ValueError, match="does not fit"):
            w.add_document([1, 70000])
        with pytest.raises(ValueError, match="lengths must be"):
            w.add_documents([1, 2], [2, 0])
        w.add_document([1, 2])
    assert IndexedDataset(tmp_path / "d")[0].tolist() == [1, 2]


def test_exception_midway_leaves_nothing(tmp_path):
    write(tmp_path / "d", [np.arange(5)], np.uint16)
    before = {p: (tmp_path / p).read_bytes() for p in ("d.bin", "d.idx")}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            for i in range(1000):
                w.add_document(np.arange(1, 50))
                if i == 500:
                    raise RuntimeError("boom")
    # the previous pair is untouched and no temp file is left behind
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert all((tmp_path / p).read_bytes() == b for p, b in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "new", np.int32) as w:
            w.add_document([1])
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_unfinished_writer_cleans_up_when_dropped(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    w.add_document([1, 2, 3])
    del w
    assert os.listdir(tmp_path) == []


def test_empty_dataset_round_trip(tmp_path):
    with IndexedDatasetWriter(tmp_path / "e", np.uint16):
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
    assert ds.document_indices.tolist() == [0]


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _corrupt(p / "d.idx", 0, b"XXIDIDX"), "bad magic"),
    (lambda p: _corrupt(p / "d.idx", 9, struct.pack("<Q", 2)), "unsupported .idx version 2"),
    (lambda p: _corrupt(p / "d.idx", 17, b"\x09"), "unknown Megatron dtype code 9"),
    (lambda p: (p / "d.idx").write_bytes((p / "d.idx").read_bytes()[:-5]), "truncated"),
    (lambda p: (p / "d.idx").write_bytes((p / "d.idx").read_bytes()[:20]), "truncated .idx"),
    (lambda p: (p / "d.bin").write_bytes((p / "d.bin").read_bytes()[:-2]), "does not match"),
    (lambda p: os.unlink(p / "d.bin"), "no such file"),
])
def test_validation_errors_name_the_file(tmp_path, damage, message):
    write(tmp_path / "d", random_docs(20, 500), np.uint16)
    damage(tmp_path)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(tmp_path / "d")
    assert str(tmp_path / "d.") in str(info.value)


def test_fingerprint_tracks_content(tmp_path):
    docs = random_docs(50, 500)
    write(tmp_path / "d", docs, np.uint16)
    fp = idx_fingerprint(tmp_path / "d")
    assert fp == idx_fingerprint(tmp_path / "d")
    write(tmp_path / "same", docs, np.uint16)
    assert idx_fingerprint(tmp_path / "same") == fp
    write(tmp_path / "d", docs[::-1], np.uint16)  # same tokens, other order
    assert idx_fingerprint(tmp_path / "d") != fp
    with pytest.raises(IndexedDatasetError, match="no such file"):
        idx_fingerprint(tmp_path / "missing")


def _peak_bytes(prefix, n):
    doc = np.arange(3, dtype=np.uint16)
    tracemalloc.start()
    try:
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for _ in range(n):
                w.add_document(doc)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writer_memory_does_not_grow_with_document_count(tmp_path):
    # Both counts exceed the 64 Ki-element chunks the writer buffers and streams the .idx with.
    small = _peak_bytes(tmp_path / "small", 70_000)
    large = _peak_bytes(tmp_path / "large", 200_000)
    # Megatron's builder holds ~36 B per document in lists: ~7 MB more here. Ours: fixed chunks.
    assert large < 4 * 2**20, large
    assert abs(large - small) < 2**18, (small, large)
    assert len(IndexedDataset(tmp_path / "large")) == 200_000
