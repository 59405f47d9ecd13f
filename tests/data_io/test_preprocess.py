"""tools/preprocess_data.py end to end: formats, order, workers, keys, bad lines, empties, metadata."""

import bz2
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megasyne.data.indexed_dataset import IndexedDataset
from megasyne.data.metadata import metadata_field_info, read_metadata_field
from megasyne.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megasyne.data.tokenizers import load_tokenizer
from tests.scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
preprocess_data = load_script("tools/preprocess_data.py")


def write_jsonl(path, records, compress=None):
    data = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    elif compress == "bz2":
        data = bz2.compress(data)
    path.write_bytes(data)
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=64)
    return str(path)


def run(tmp_path, inputs, tok, **kw):
    kw.setdefault("append_eod", True)
    cfg = PreprocessConfig(inputs=inputs if isinstance(inputs, list) else [inputs],
                           output_prefix=str(tmp_path / "out" / "c"), tokenizer=tok,
                           progress=False, log_interval=0, **kw)
    return run_preprocess(cfg)


def expected_docs(tok, texts, eod=True):
    out = []
    for t in texts:
        ids = tok.encode(t)
        if ids:
            out.append(ids + ([tok.eod_id] if eod else []))
    return out


def assert_dataset(prefix, docs):
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs)
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d, i


def outputs(tmp_path):
    return sorted(os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else []


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "zst", "bz2", "parquet"])
def test_formats_end_to_end(tmp_path, corpus, hf_tokenizer_path, fmt):
    records = [{"text": t, "id": i} for i, t in enumerate(corpus)]
    if fmt == "parquet":
        src = write_parquet(tmp_path / "in.parquet", records)
    else:
        src = write_jsonl(tmp_path / f"in.{fmt}", records, None if fmt == "jsonl" else fmt)
    reports = run(tmp_path, src, hf_tokenizer_path)
    tok = load_tokenizer(hf_tokenizer_path)
    docs = expected_docs(tok, corpus)
    assert_dataset(tmp_path / "out" / "c_text_document", docs)
    r = reports["text"]
    assert (r["docs"], r["tokens"], r["skipped"], r["empty"]) == (
        len(docs), sum(map(len, docs)), 0, 0)
    on_disk = json.loads((tmp_path / "out" / "c_text_document.report.json").read_text())
    assert on_disk["inputs"] == [{"path": os.path.abspath(src), "records": len(corpus)}]
    assert on_disk["tokenizer"]["kind"] == "hf" and on_disk["dtype"] == "uint16"
    assert outputs(tmp_path) == ["c_text_document.bin", "c_text_document.idx",
                                 "c_text_document.report.json"]


def test_glob_of_many_files_keeps_order(tmp_path, corpus, sp_tokenizer_path):
    parts = [corpus[:150], corpus[150:300], corpus[300:]]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "part-2.jsonl.zst", [{"text": t} for t in parts[2]], "zst")
    write_jsonl(tmp_path / "in" / "part-0.jsonl", [{"text": t} for t in parts[0]])
    write_jsonl(tmp_path / "in" / "part-1.jsonl.gz", [{"text": t} for t in parts[1]], "gz")
    run(tmp_path, str(tmp_path / "in" / "part-*"), sp_tokenizer_path)
    tok = load_tokenizer(sp_tokenizer_path)
    assert_dataset(tmp_path / "out" / "c_text_document", expected_docs(tok, corpus))


def test_several_json_keys(tmp_path, corpus, tiktoken_path):
    records = [{"title": t[:15], "text": t} for t in corpus[:100]]
    reports = run(tmp_path, write_jsonl(tmp_path / "in.jsonl", records), tiktoken_path,
                  json_keys=["text", "title"], append_eod=False)
    tok = load_tokenizer(tiktoken_path)
    assert set(reports) == {"text", "title"}
    assert_dataset(tmp_path / "out" / "c_text_document", expected_docs(tok, corpus[:100], False))
    assert_dataset(tmp_path / "out" / "c_title_document",
                   expected_docs(tok, [r["title"] for r in records], False))


@pytest.mark.parametrize("tok_fixture", ["hf_tokenizer_path", "tiktoken_path"])
def test_two_workers_give_byte_identical_output(tmp_path, request, corpus, tok_fixture):
    tok = request.getfixturevalue(tok_fixture)
    records = [{"text": t, "ppl": i * 0.5, "lang": "zh" if i % 3 else "en"}
               for i, t in enumerate(corpus)]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    for w in (1, 2):
        run(tmp_path / f"w{w}", src, tok, workers=w, batch_size=7, metadata_keys=["ppl", "lang"])
    for suffix in (".bin", ".idx", ".meta/ppl.npy", ".meta/lang.npy"):
        a = (tmp_path / "w1" / "out" / f"c_text_document{suffix}").read_bytes()
        b = (tmp_path / "w2" / "out" / f"c_text_document{suffix}").read_bytes()
        assert a == b, suffix
    assert_dataset(tmp_path / "w2" / "out" / "c_text_document",
                   expected_docs(load_tokenizer(tok), corpus))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad_line, why", [
    ('{"text": "broken\n', "invalid JSON"),
    ('{"body": "no text key"}\n', "missing key 'text'"),
    ('{"text": 42}\n', "key 'text' is int, not a string"),
    ('["a list"]\n', "a JSON list, not an object"),
])
def test_bad_line_fails_naming_file_and_line(tmp_path, corpus, hf_tokenizer_path, bad_line, why,
                                             workers):
    records = [{"text": t} for t in corpus[:300]]
    records.insert(250, bad_line)  # line 251, in a late batch: earlier batches were already written
    src = write_jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(PreprocessError, match=f"in.jsonl:251: {why}"):
        run(tmp_path, src, hf_tokenizer_path, workers=workers, batch_size=16)
    assert outputs(tmp_path) == []  # no .bin/.idx, no temp files, no spill directory


def test_skip_bad_lines_counts_them(tmp_path, corpus, hf_tokenizer_path):
    records = [{"text": t} for t in corpus[:50]]
    records[10] = '{"text": oops}\n'
    records[20] = {"other": "x"}
    src = write_jsonl(tmp_path / "in.jsonl", records)
    r = run(tmp_path, src, hf_tokenizer_path, skip_bad_lines=True)["text"]
    assert r["skipped"] == 2 and r["docs"] == 48
    assert r["bad_examples"][0].endswith("in.jsonl:11: invalid JSON (Expecting value at column 10)")
    assert "in.jsonl:21: missing key 'text'" in r["bad_examples"][1]
    kept = [t for i, t in enumerate(corpus[:50]) if i not in (10, 20)]
    assert_dataset(tmp_path / "out" / "c_text_document",
                   expected_docs(load_tokenizer(hf_tokenizer_path), kept))


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_text_the_tokenizer_refuses_is_a_bad_line(tmp_path, corpus, hf_tokenizer_path,
                                                  sp_tokenizer_path, tiktoken_path, kind):
    """A lone surrogate (json accepts the escape; it is no text) is refused by every kind:
    tiktoken's public encode would replace it with U+FFFD, silently changing the document."""
    tok = {"hf": hf_tokenizer_path, "sentencepiece": sp_tokenizer_path,
           "tiktoken": tiktoken_path}[kind]
    records = [{"text": t} for t in corpus[:5]]
    records[2] = '{"text": "lone surrogate \\ud800"}\n'
    src = write_jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(PreprocessError, match="in.jsonl:3: tokenizer failed"):
        run(tmp_path, src, tok)
    r = run(tmp_path, src, tok, skip_bad_lines=True)["text"]
    assert (r["docs"], r["skipped"]) == (4, 1)


def test_empty_documents_and_blank_lines(tmp_path, corpus, hf_tokenizer_path):
    records = [{"text": corpus[0]}, {"text": ""}, "\n", {"text": corpus[1]}, {"text": ""}]
    r = run(tmp_path, write_jsonl(tmp_path / "in.jsonl", records), hf_tokenizer_path)["text"]
    assert (r["docs"], r["empty"], r["blank_lines"], r["skipped"]) == (2, 2, 1, 0)
    assert_dataset(tmp_path / "out" / "c_text_document",
                   expected_docs(load_tokenizer(hf_tokenizer_path), corpus[:2]))


def test_metadata_sidecar_aligned_with_written_documents(tmp_path, corpus, hf_tokenizer_path):
    records = [{"text": t, "ppl": float(i), "lang": "en" if i % 2 else "zh", "n": i}
               for i, t in enumerate(corpus[:20])]
    records[3]["text"] = ""  # dropped as empty: its metadata must be dropped with it
    src = write_jsonl(tmp_path / "in.jsonl", records)
    r = run(tmp_path, src, hf_tokenizer_path, metadata_keys=["ppl", "lang", "n"])["text"]
    prefix = str(tmp_path / "out" / "c_text_document")
    kept = [i for i in range(20) if i != 3]
    assert read_metadata_field(prefix, "ppl").tolist() == [float(i) for i in kept]
    assert read_metadata_field(prefix, "n").tolist() == kept
    assert read_metadata_field(prefix, "n").dtype == np.int8
    assert read_metadata_field(prefix, "lang", decode=True).tolist() == [
        "en" if i % 2 else "zh" for i in kept]
    assert metadata_field_info(prefix, "lang")["categories"] == ["zh", "en"]
    assert r["metadata"]["ppl"]["dtype"] == "float64"


def test_metadata_problems_are_bad_lines(tmp_path, corpus, hf_tokenizer_path):
    records = [{"text": t, "ppl": 1.5} for t in corpus[:10]]
    records[4]["ppl"] = "high"
    records[6]["ppl"] = None
    src = write_jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(PreprocessError, match="in.jsonl:5: metadata key 'ppl' is a str, earlier"):
        run(tmp_path, src, hf_tokenizer_path, metadata_keys=["ppl"])
    assert outputs(tmp_path) == []
    r = run(tmp_path, src, hf_tokenizer_path, metadata_keys=["ppl"], skip_bad_lines=True)["text"]
    assert r["skipped"] == 2 and r["docs"] == 8
    assert "in.jsonl:7: metadata key 'ppl' is NoneType" in r["bad_examples"][1]
    prefix = str(tmp_path / "out" / "c_text_document")
    assert read_metadata_field(prefix, "ppl").tolist() == [1.5] * 8
    assert_dataset(prefix, expected_docs(load_tokenizer(hf_tokenizer_path),
                                         [t for i, t in enumerate(corpus[:10]) if i not in (4, 6)]))


def test_parquet_missing_column_names_the_row(tmp_path, hf_tokenizer_path):
    src = write_parquet(tmp_path / "in.parquet", [{"body": "x"}, {"body": "y"}])
    with pytest.raises(PreprocessError, match=r"in.parquet: row 1: missing key 'text'"):
        run(tmp_path, src, hf_tokenizer_path)


def test_cli_flags(tmp_path, corpus, hf_tokenizer_path, sp_tokenizer_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "t2": t[:5]} for t in corpus[:30]])
    base = ["--input", src, "--output-prefix", str(tmp_path / "out" / "c"), "--no-progress"]
    # every refusal: exit status 2 and one line "error: ..." on stderr
    assert preprocess_data.main(base + ["--tokenizer-model", hf_tokenizer_path,
                                        "--tokenizer-type", "SentencePieceTokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "looks like hf" in err and err.count("\n") == 1
    assert preprocess_data.main(base + ["--tokenizer-model", hf_tokenizer_path,
                                        "--tokenizer-type", "GPT2BPETokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tokenizer-type GPT2BPETokenizer") and err.count("\n") == 1
    assert preprocess_data.main(base + ["--input", str(tmp_path / "nothing*.jsonl"),
                                        "--tokenizer-model", hf_tokenizer_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no file matches" in err and err.count("\n") == 1
    assert outputs(tmp_path) == []
    assert preprocess_data.main(base + ["--tokenizer-model", sp_tokenizer_path, "--tokenizer-type",
                                        "SentencePieceTokenizer", "--json-keys", "text,t2",
                                        "--append-eod", "--prepend-bos", "--workers", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["dataset"].rsplit("/", 1)[1] for x in lines] == ["c_text_document", "c_t2_document"]
    tok = load_tokenizer(sp_tokenizer_path)
    ds = IndexedDataset(tmp_path / "out" / "c_text_document")
    assert ds[0].tolist() == [tok.bos_id] + tok.encode(corpus[0]) + [tok.eod_id]


def test_tool_runs_as_a_script(tmp_path, corpus, hf_tokenizer_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in corpus[:20]])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                           "--input", src, "--tokenizer-model", hf_tokenizer_path,
                           "--output-prefix", str(tmp_path / "out" / "c"), "--append-eod",
                           "--log-interval", "5", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["docs"] == 20
    assert "docs/s" in proc.stderr and "tokens/s" in proc.stderr
