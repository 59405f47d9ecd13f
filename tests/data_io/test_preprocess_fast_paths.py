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
