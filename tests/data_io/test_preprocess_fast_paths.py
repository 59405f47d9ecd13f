"""The preprocessor's fast paths keep json's verdicts and reuse the parent's tokenizer."""

from __future__ import annotations

import json

import pytest

from megasyne.data import preprocess

# Lines where orjson and json disagree or orjson refuses: each must end as json.loads ends.
TRICKY = [
    b'{"text": "a", "x": NaN}',  # json: nan; orjson: error
    b'{"text": "a", "x": 123456789012345678901234567890}',  # beyond 64 bits
    b'{"text": "\\ud800 lone surrogate"}',  # json: a str with a lone surrogate
    b'\xef\xbb\xbf{"text": "bom"}',  # UTF-8 BOM: json detects utf-8-sig
    b'{"text": "dup", "text": "last"}',
    b'{"text": "\xff\xfe not utf-8"}',  # json: UnicodeDecodeError
    b'{"text": "unterminated',
    b'[1, 2]',
    b'{"text": "plain", "n": 1.5e300, "m": -0.0}',
]


NEEDED = ("text", "x", "n", "m")  # the --json-keys and --metadata-keys a run reads


@pytest.mark.parametrize("line", TRICKY)
def test_loads_is_json_loads(line):
    try:
        want = json.loads(line)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        with pytest.raises(type(exc)) as got:
            preprocess._loads(line, NEEDED)
        assert str(got.value) == str(exc)
        return
    got = preprocess._loads(line, NEEDED)
    assert repr(got) == repr(want)  # repr: nan != nan, and -0.0 == 0.0


def test_orjson_is_used_when_installed():
    """requirements-ci.txt pins orjson: CI runs the fast path, not only the fallback."""
    pytest.importorskip("orjson")
    assert preprocess._orjson is not None


def test_forked_worker_reuses_the_parents_tokenizer(monkeypatch):
    sentinel = object()
    spec = {"path": "/x/tokenizer.json", "kind": "hf", "engine": "tiktoken", "eod_id": 1,
            "bos_id": 0}
    monkeypatch.setattr(preprocess, "_W", {"path": spec["path"], "kind": "hf",
                                           "engine": "tiktoken", "tok": sentinel})

    def no_load(*a, **k):
        raise AssertionError("the inherited tokenizer should have been reused")

    monkeypatch.setattr(preprocess, "load_tokenizer", no_load)
    preprocess._init_worker(spec)
    assert preprocess._W["tok"] is sentinel
    # Another file (or a spawned worker's empty _W) loads its own.
    loaded = []
    monkeypatch.setattr(preprocess, "load_tokenizer", lambda *a, **k: loaded.append(a) or "tok")
    preprocess._init_worker({**spec, "path": "/y/tokenizer.json"})
    assert loaded == [("/y/tokenizer.json",)] and preprocess._W["tok"] == "tok"
    preprocess._init_worker({**spec, "path": "/y/tokenizer.json", "engine": "tokenizers"})
    assert len(loaded) == 2  # the same file through another engine is another tokenizer


def test_a_dead_worker_is_located_at_its_first_lost_task(tmp_path):
    """The message names the first line (or Parquet row) of the first task the worker held,
    whatever the kind of task."""
    import signal
    from collections import deque

    from megasyne.data.corpus_reader import LineBlock, LineRange, RowBatch
    from megasyne.data.preprocess_pool import WorkerDied

    cfg = preprocess.PreprocessConfig(inputs=["x"], output_prefix="p", tokenizer="t", workers=2)
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.jsonl.gz")]
    for path, head in zip(files, (b"{}\n", b"PAR1", b"\x1f\x8b")):  # kinds are told by content
        open(path, "wb").write(head)
    inflight = deque([(3, 0, LineRange(files[0], 40, 0, 9)), (4, 1, RowBatch([7, 8], [{}, {}])),
                      (5, 2, LineBlock(files[2], 12, b"{}\n"))])
    died = WorkerDied(99, -signal.SIGKILL, lost=[4, 5])
    assert f"{files[1]}: row 7 onwards" in preprocess._worker_died_message(cfg, died, inflight,
                                                                           files)
    died.lost = [5, 3]
    assert f"{files[0]}:40 onwards" in preprocess._worker_died_message(cfg, died, inflight, files)
    died.lost = [5]
    assert f"{files[2]}:12 onwards" in preprocess._worker_died_message(cfg, died, inflight, files)
