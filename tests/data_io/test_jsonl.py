"""megasyne.jsonl.read_jsonl and the readers of user JSONL files that use it: a bad line fails
with the caller's error class, naming the file and the line; nothing is silently skipped."""

import gzip
import json

import pytest

from megasyne.jsonl import read_jsonl
from tests.launch import REPO_ROOT


class MyError(ValueError):
    pass


def test_records_with_their_line_numbers_blank_lines_skipped(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2, "t": "中文"}\n{"a": 3}', encoding="utf-8")
    assert list(read_jsonl(p, MyError)) == [(1, {"a": 1}), (4, {"a": 2, "t": "中文"}),
                                            (5, {"a": 3})]
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(p.read_text(encoding="utf-8"))
    assert list(read_jsonl(gz, MyError)) == list(read_jsonl(p, MyError))


@pytest.mark.parametrize("line, message", [
    ('{"a": 1', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
])
def test_a_bad_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n\n' + line + '\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(MyError, match=f"bad.jsonl:3: {message}"):
        list(read_jsonl(p, MyError))


def test_a_missing_or_binary_file_is_the_callers_error(tmp_path):
    with pytest.raises(MyError, match=r"nope.jsonl: cannot read it \(No such file"):
        list(read_jsonl(tmp_path / "nope.jsonl", MyError))
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(MyError, match="latin1.jsonl:2: not UTF-8"):
        list(read_jsonl(p, MyError))
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:60])  # truncated mid-stream
    with pytest.raises(MyError, match="cut.jsonl.gz: cannot read it after line"):
        list(read_jsonl(gz, MyError))


def _bad_file(tmp_path, topic="x"):
    """Line 1 is a good record, line 2 a JSON list."""
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"text": "fine", "lang": "en", "topic": topic}) + "\n[\"no\"]\n")
    return p


def test_seed_pages_reader(tmp_path):
    from megasyne.syne.synth.pipeline import SynthError, read_seed_pages
    from megasyne.syne.synth.templates import load_disciplines

    disciplines = load_disciplines(REPO_ROOT / "examples/syne/disciplines.yaml")
    with pytest.raises(SynthError, match=r"in.jsonl:2: expected a JSON object"):
        read_seed_pages(str(_bad_file(tmp_path)), disciplines)


def test_labelled_topics_reader(tmp_path):
    from megasyne.syne.topics import TopicError, load_taxonomy, read_labelled

    taxonomy = load_taxonomy(REPO_ROOT / "examples/syne/taxonomy.yaml")
    with pytest.raises(TopicError, match=r"in.jsonl:2: expected a JSON object"):
        read_labelled(_bad_file(tmp_path, taxonomy["en"].ids[0]), taxonomy)


def test_pages_to_label_reader(tmp_path):
    from megasyne.syne.labeling import label_jsonl
    from megasyne.syne.topics import TopicError

    # The file is read and checked before the classifier is used.
    with pytest.raises(TopicError, match=r"in.jsonl:2: expected a JSON object"):
        label_jsonl(str(_bad_file(tmp_path)), str(tmp_path / "out.jsonl"), None, None)
    assert not (tmp_path / "out.jsonl").exists()
