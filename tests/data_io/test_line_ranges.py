"""JSONL is cut into pieces of whole lines without per-line work in the main process.

A plain file is cut into byte ranges that each worker reads itself; a compressed one is
decompressed in the main process and sent as blocks of lines. The workers split and parse the
lines. The oracles: a per-line reference of the cutting rule, and a line-by-line json.loads
reference of the documents, counts, bad lines, their numbers and messages.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import random

import pytest

from megasyne.data import corpus_reader, preprocess
from megasyne.data.corpus_reader import LineRange, line_ranges, read_line_range
from megasyne.data.indexed_dataset import IndexedDataset
from megasyne.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megasyne.data.tokenizers import load_tokenizer


def per_line_ranges(data: bytes, batch_lines: int, batch_bytes: int) -> list[tuple]:
    """The cutting rule, one line at a time."""
    out, first, start, lines, pos = [], 1, 0, 0, 0
    while (nl := data.find(b"\n", pos)) >= 0:
        pos, lines = nl + 1, lines + 1
        if lines >= batch_lines or pos - start >= batch_bytes:
            out.append((first, start, pos))
            first, start, lines = first + lines, pos, 0
    if len(data) > start:
        out.append((first, start, len(data)))
    return out


def test_line_ranges_match_the_per_line_rule(tmp_path, monkeypatch):
    rng = random.Random(0)
    path = tmp_path / "f.jsonl"
    for trial in range(1500):
        lines = [b"x" * rng.choice([0, 0, 1, 3, 10, 50]) for _ in range(rng.randrange(0, 40))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        path.write_bytes(data)
        batch_lines, batch_bytes = rng.randrange(1, 8), rng.randrange(1, 120)
        # Read blocks smaller than a line, than a range, and larger than the file.
        monkeypatch.setattr(corpus_reader, "_READ_BLOCK", rng.choice([1, 2, 7, 64, 1 << 22]))
        got = list(line_ranges(str(path), batch_lines, batch_bytes))
        assert got == per_line_ranges(data, batch_lines, batch_bytes), (trial, data)
        # A compressed file's pieces carry their bytes, also across read blocks.
        stream = io.BytesIO(data)
        pieces = list(corpus_reader._cut_lines(stream.read, batch_lines, batch_bytes, keep=True))
        assert [(f, s, e) for f, s, e, _ in pieces] == got
        assert all(d == data[s:e] for _, s, e, d in pieces), (trial, data)
        # The ranges tile the file, and their lines are the file's lines.
        fds: dict = {}
        read = [line for _, s, e in got for line in read_line_range(str(path), s, e, fds)[0]]
        assert read == (data[:-1] if data.endswith(b"\n") else data).split(b"\n") or not data


def test_a_file_that_shrinks_while_read_fails_naming_it(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"text": "a"}\n' * 100)
    ranges = list(line_ranges(str(path), 10))
    path.write_bytes(b'{"text": "a"}\n' * 50)
    fds: dict = {}
    with pytest.raises(PreprocessError, match="f.jsonl: the file changed while it was being read"):
        for _, s, e in ranges:
            read_line_range(str(path), s, e, fds)


def _corpus_lines(texts: list[str]) -> list[str]:
    """Records with blank lines, CRLF endings, bad lines and empties mixed in."""
    rng = random.Random(1)
    out = []
    for i, t in enumerate(texts):
        r = rng.random()
        if r < 0.05:
            out.append("\n" if r < 0.025 else "   \r\n")
        elif r < 0.065:
            out.append('{"text": "unterminated\n')
        elif r < 0.075:
            out.append('{"body": "no text key"}\n')
        out.append(json.dumps({"text": t if i % 23 else ""}) + ("\r\n" if i % 5 == 0 else "\n"))
    return out


def line_by_line(data: bytes, name: str, tok) -> dict:
    """The report's counts and bad lines, and the documents, reading ``data`` one line at a
    time with json.loads: the reference the byte-range and block paths must equal."""
    blank, bad, docs, empty = 0, [], [], 0
    for n, line in enumerate(io.BytesIO(data), 1):  # lines keep their newline, as in a file
        if line.isspace():
            blank += 1
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(f"{name}:{n}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if "text" not in rec:
            bad.append(f"{name}:{n}: missing key 'text' (has: {sorted(rec)[:10]})")
            continue
        ids = tok.encode(rec["text"])
        if ids:
            docs.append(ids + [tok.eod_id])
        else:
            empty += 1
    return dict(blank_lines=blank, bad_examples=bad, skipped=len(bad), empty=empty,
                docs=len(docs), tokens=sum(map(len, docs))), docs


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_every_path_equals_reading_line_by_line(tmp_path, corpus, hf_tokenizer_path, workers,
                                                trailing_newline, monkeypatch):
    """Plain (byte ranges), gzip and bzip2 (decompressed blocks): the documents, counts, bad
    lines with their numbers and messages of a line-by-line json.loads reference."""
    text = "".join(_corpus_lines(corpus))
    if not trailing_newline:
        text += '{"text": "last line, unterminated'  # bad, and its message must not change
    data = text.encode()
    monkeypatch.setattr(corpus_reader, "_READ_BLOCK", 4096)  # pieces span read blocks
    tok = load_tokenizer(hf_tokenizer_path)
    for name, raw in (("in.jsonl", data), ("in.jsonl.gz", gzip.compress(data)),
                      ("in.jsonl.bz2", bz2.compress(data))):
        src = tmp_path / name
        src.write_bytes(raw)
        cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / f"out_{name}" / "c"),
                               tokenizer=hf_tokenizer_path, append_eod=True, workers=workers,
                               batch_size=13, skip_bad_lines=True, progress=False, log_interval=0)
        report = run_preprocess(cfg)["text"]
        want, docs = line_by_line(data, str(src), tok)
        assert {k: report[k] for k in want} == want, name
        ds = IndexedDataset(str(tmp_path / f"out_{name}" / "c_text_document"))
        assert [ds[i].tolist() for i in range(len(ds))] == docs, name
    assert 5 < want["skipped"] < 20 and want["blank_lines"] > 5  # every bad line is listed
    if not trailing_newline:
        assert "Unterminated string" in want["bad_examples"][-1]


FAST_PATH_LINES = [
    b'{"text": "plain"}',
    b'{"text": "dup", "text": "last"}',
    b'{"text": "a", "x": NaN}',
    b'{"text": "\\ud800 lone surrogate"}',
    b'\xef\xbb\xbf{"text": "bom"}',
    b'{"text": "\xff\xfe not utf-8"}',
    b'{"text": "unterminated',
    b'[1, 2]', b'"a string"', b'{"text": 42}', b'{"text": null}', b'{"other": "x"}',
    b'{"text": ["a", "list"]}', b'{"text": {"an": "object"}}', b'{"text": "caf\\u00e9 \xe4\xbd\xa0"}',
]


def test_the_fast_parse_path_gives_jsons_verdicts(monkeypatch):
    """One key, no metadata: the orjson shortcut; every line must end as json.loads makes it."""
    pytest.importorskip("orjson")
    monkeypatch.setattr(preprocess, "_W", {"json_keys": ["text"], "metadata_keys": []})
    lines = FAST_PATH_LINES
    fast = preprocess._parse_records(lines, lines.__getitem__)
    monkeypatch.setattr(preprocess, "_orjson", None)  # json alone: the reference
    slow = preprocess._parse_records(lines, lines.__getitem__)
    rows, texts, _, bad = fast  # metadata: none read in this run
    assert (rows, texts, bad) == (slow[0], slow[1], slow[3])
    assert rows == [0, 1, 2, 3, 4, 14]  # the lines that hold a text
    assert texts[0][1] == "last"


def test_a_range_task_reads_its_lines_in_the_worker(tmp_path, monkeypatch):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\r\n  \n{"text": "c"')
    monkeypatch.setattr(preprocess, "_FDS", {})
    payloads, nums, whole_line, blank = preprocess._records(
        LineRange(str(path), 7, 0, path.stat().st_size))
    assert payloads == [b'{"text": "a"}', b'{"text": "b"}\r', b'{"text": "c"']
    assert nums == [7, 9, 11] and blank == 2
    assert [whole_line(r) for r in range(3)] == [b'{"text": "a"}\n', b'{"text": "b"}\r\n',
                                                 b'{"text": "c"']
    preprocess._close_fds()


def test_input_in_flight_is_bounded_by_bytes(tmp_path, corpus, hf_tokenizer_path, monkeypatch):
    """At most the byte budget (plus the task that crossed it) is submitted and not yet taken."""
    held, peak = {}, []

    class CountingPool:  # runs each task when its result is asked for, in this process
        def __init__(self, workers, init, work, spec, start_method=None):
            init(spec)
            self.work, self.tasks = work, {}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def submit(self, n, task):
            self.tasks[n] = task
            held[n] = preprocess._task_bytes(task)
            peak.append(sum(held.values()))

        def result(self, n):
            del held[n]
            return self.work(self.tasks.pop(n))

    monkeypatch.setattr(preprocess, "WorkerPool", CountingPool)
    monkeypatch.setattr(preprocess, "_INFLIGHT_BYTES", 2000)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus * 3))
    cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / "o" / "c"),
                           tokenizer=hf_tokenizer_path, workers=2, batch_size=5,
                           progress=False, log_interval=0)
    assert run_preprocess(cfg)["text"]["docs"] == 3 * len(corpus)
    biggest = max(e - s for _, s, e in line_ranges(str(src), 5))
    assert 4000 - biggest <= max(peak) < 4000 + biggest  # the budget is used, and never exceeded
