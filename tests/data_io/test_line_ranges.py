"""Plain JSONL files are read by byte ranges in the workers: same lines, numbers and verdicts.

A plain file is cut into ranges of whole lines by the main process and each worker reads and
parses its own ranges; compressed files still go line by line through the main process. The
oracles are a per-line reference of the cutting rule and the gzip path, which reads the same
bytes line by line.
"""

from __future__ import annotations

import gzip
import json
import random

import pytest

from megasyne.data import corpus_reader, preprocess
from megasyne.data.corpus_reader import LineRange, line_ranges, read_line_range
from megasyne.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess


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


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_plain_file_equals_the_line_by_line_path(tmp_path, corpus, hf_tokenizer_path, workers,
                                                 trailing_newline):
    """Same dataset and the same report (counts, bad lines and their numbers and messages) as the
    same bytes gzipped, which the main process reads line by line."""
    text = "".join(_corpus_lines(corpus))
    if not trailing_newline:
        text += '{"text": "last line, unterminated'  # bad, and its message must not change
    data = text.encode()
    plain, gz = tmp_path / "in.jsonl", tmp_path / "in.jsonl.gz"
    plain.write_bytes(data)
    gz.write_bytes(gzip.compress(data))
    reports = {}
    for name, src in (("plain", plain), ("gz", gz)):
        cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / name / "c"),
                               tokenizer=hf_tokenizer_path, append_eod=True, workers=workers,
                               batch_size=13, skip_bad_lines=True, progress=False, log_interval=0)
        reports[name] = run_preprocess(cfg)["text"]
    for key in ("docs", "tokens", "skipped", "empty", "blank_lines", "bad_examples",
                "idx_fingerprint"):
        got, want = reports["plain"][key], reports["gz"][key]
        if key == "bad_examples":
            got = [g.replace("in.jsonl:", "X:") for g in got]
            want = [w.replace("in.jsonl.gz:", "X:") for w in want]
        assert got == want, key
    bad = reports["plain"]["bad_examples"]
    assert 5 < reports["plain"]["skipped"] == len(bad) < 20  # every bad line is listed
    assert reports["plain"]["blank_lines"] > 5
    if not trailing_newline:
        n_lines = text.count("\n") + 1
        assert bad[-1].startswith(f"{plain}:{n_lines}: invalid JSON (Unterminated string"), bad
    for ext in (".bin", ".idx"):
        assert (tmp_path / "plain" / f"c_text_document{ext}").read_bytes() == \
            (tmp_path / "gz" / f"c_text_document{ext}").read_bytes()


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
