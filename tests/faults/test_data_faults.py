"""Run integrity of data preparation and conversion, shown by injecting the faults a weeks-long job
meets: a worker SIGKILLed (the OOM killer), a full disk, a truncated download, a killed run's
leftovers, a converter pointed at its own input, a checkpoint save on a full disk.

Each test shows the behaviour wanted: the run fails fast, says what happened and what to do, and
publishes nothing incomplete. Where a test needs a full disk it mounts a small tmpfs when the
machine allows it (root in the container) and otherwise injects ENOSPC at the write; the test says
which one ran (``-s`` prints it).
"""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import time
import bz2

import numpy as np
import pytest

from megasyne.data.indexed_dataset import IndexedDataset
from megasyne.data.metadata import read_metadata_field, stale_metadata_fields
from megasyne.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megasyne.data.preprocess_pool import KILL_AT_BATCH_ENV
from tests.faults.conftest import small_tmpfs
from tests.launch import REPO_ROOT

PREPROCESS = REPO_ROOT / "tools" / "preprocess_data.py"
sys.path.insert(0, str(REPO_ROOT / "tools"))
import preprocess_data  # noqa: E402


def write_jsonl(path, texts, **extra) -> str:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, **{k: v(i) for k, v in extra.items()}}) + "\n")
    return str(path)


def listing(d) -> list[str]:
    """Every path under ``d``, hidden ones included, relative to it."""
    out = []
    for root, dirs, files in os.walk(d):
        out += [os.path.relpath(os.path.join(root, n), d) for n in dirs + files]
    return sorted(out)


def preprocess(src, prefix, tok, **kw):
    kw.setdefault("append_eod", True)
    return run_preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(prefix),
                                           tokenizer=tok, progress=False, log_interval=0, **kw))


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(PREPROCESS), *map(str, args)], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------------
def test_a_killed_tokenizer_worker_fails_the_run_within_seconds(tmp_path, corpus,
                                                                 hf_tokenizer_path):
    """SIGKILL of one worker (as the OOM killer does) used to hang the run forever."""
    src = write_jsonl(tmp_path / "in.jsonl", corpus)
    out = tmp_path / "out"
    t0 = time.time()
    try:
        proc = cli("--input", src, "--tokenizer-model", hf_tokenizer_path, "--output-prefix",
                   out / "c", "--workers", "2", "--batch-size", "16", "--no-progress",
                   env={KILL_AT_BATCH_ENV: "5"}, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("preprocess still running 60 s after a worker was killed: it hangs")
    assert time.time() - t0 < 45
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"tokenizer worker process \d+ was killed by signal 9 \(SIGKILL\) while "
                     r"tokenising .*in\.jsonl:\d+ onwards", proc.stderr), proc.stderr
    assert "out-of-memory killer" in proc.stderr and "fewer --workers (this run: 2)" in proc.stderr
    assert "Nothing was published" in proc.stderr
    assert listing(out) == []


@pytest.mark.parametrize("fails_at", ["sidecar", "report"])
def test_a_dataset_is_complete_or_absent(tmp_path, monkeypatch, corpus, hf_tokenizer_path,
                                         fails_at):
    """The disk fills after the .bin is written: the .idx (the commit marker) must not appear,
    and an older complete dataset at the prefix must stay as it was."""
    import megasyne.data.preprocess as pp

    src = write_jsonl(tmp_path / "in.jsonl", corpus[:100], ppl=float)
    out = tmp_path / "out"
    preprocess(src, out / "c", hf_tokenizer_path, metadata_keys=["ppl"])  # the old dataset
    before = {p: (out / p).read_bytes() for p in listing(out) if (out / p).is_file()}
    monkeypatch.setattr(pp, "write_metadata_field" if fails_at == "sidecar" else "_write_report",
                        no_space)
    src2 = write_jsonl(tmp_path / "in2.jsonl", corpus[100:250], ppl=float)
    for prefix in (out / "fresh", out / "c"):
        with pytest.raises(PreprocessError, match="no space left on device"):
            preprocess(src2, prefix, hf_tokenizer_path, metadata_keys=["ppl"])
    assert not (out / "fresh_text_document.idx").exists()
    after = {p: (out / p).read_bytes() for p in listing(out) if (out / p).is_file()}
    assert after == before  # nothing of the failed runs, the old dataset byte for byte
    old = str(out / "c_text_document")
    assert len(IndexedDataset(old)) == 100 and stale_metadata_fields(old) == []
    assert read_metadata_field(old, "ppl").tolist() == [float(i) for i in range(100)]


def _truncated(tmp_path, fmt: str, texts) -> str:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts]), str(path),
                       row_group_size=32)
        blob = path.read_bytes()
    else:
        import zstandard
        path = tmp_path / f"in.jsonl.{fmt}"
        blob = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
                "zst": zstandard.ZstdCompressor().compress}[fmt](data)
    path.write_bytes(blob[:len(blob) // 2])
    return str(path)


@pytest.mark.parametrize("fmt", ["zst", "gz", "bz2", "xz", "parquet"])
def test_a_truncated_compressed_file_fails_naming_it_even_when_skipping_bad_lines(
        tmp_path, corpus, hf_tokenizer_path, fmt):
    """A truncated .zst used to publish a partial dataset ("1 bad line"), a .gz a bare EOFError."""
    src = _truncated(tmp_path, fmt, corpus[:300])
    with pytest.raises(PreprocessError, match=re.escape(src) + ": truncated or corrupt") as e:
        preprocess(src, tmp_path / "out" / "c", hf_tokenizer_path, skip_bad_lines=True)
    assert "--skip-bad-lines" in str(e.value)
    assert listing(tmp_path / "out") == []


def _start_and_kill(src, prefix, tok) -> None:
    """Start a preprocess of ``prefix`` and SIGKILL it once it has files under way."""
    proc = subprocess.Popen([sys.executable, str(PREPROCESS), "--input", src, "--tokenizer-model",
                             tok, "--output-prefix", str(prefix), "--append-eod",
                             "--metadata-keys", "n", "--batch-size", "32", "--no-progress"],
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                            stderr=subprocess.PIPE, text=True)
    out, deadline = prefix.parent, time.time() + 60
    before = set(listing(out))
    try:
        while not [p for p in set(listing(out)) - before
                   if os.path.isfile(out / p) and not p.endswith(".lock")]:
            assert proc.poll() is None, f"ended before it could be killed: {proc.stderr.read()}"
            assert time.time() < deadline, "no temporary file appeared within 60 s"
            time.sleep(0.02)
        time.sleep(0.3)
        assert proc.poll() is None, "ended before it could be killed: corpus too small"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_the_next_run_on_a_prefix_removes_the_leftovers_of_a_killed_one(tmp_path, corpus,
                                                                        hf_tokenizer_path):
    big = write_jsonl(tmp_path / "big.jsonl", corpus * 60, n=int)
    out = tmp_path / "out"
    out.mkdir()
    # Another prefix whose name starts like the datasets of "c": its leftovers must stay.
    _start_and_kill(big, out / "c_text_document", hf_tokenizer_path)
    others = listing(out)
    _start_and_kill(big, out / "c", hf_tokenizer_path)
    assert len(listing(out)) > len(others)  # the killed run left files behind
    small = write_jsonl(tmp_path / "small.jsonl", corpus[:50], n=int)
    proc = cli("--input", small, "--tokenizer-model", hf_tokenizer_path, "--output-prefix",
               out / "c", "--metadata-keys", "n", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "left by an interrupted run on this output prefix" in proc.stderr
    published = ["c_text_document.bin", "c_text_document.idx", "c_text_document.meta",
                 "c_text_document.meta/.lock", "c_text_document.meta/manifest.json",
                 "c_text_document.meta/n.npy", "c_text_document.report.json"]
    assert listing(out) == sorted(others + published)
    assert len(IndexedDataset(out / "c_text_document")) == 50


class _FillingDisk:
    """``open`` for megasyne.data.indexed_dataset whose written files fail with ENOSPC once
    ``budget`` bytes were written in all (the fallback where no tmpfs can be mounted)."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def __call__(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FillingFile(f, self) if "w" in mode else f


class _FillingFile:
    def __init__(self, f, disk: _FillingDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._disk.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_a_full_disk_fails_with_a_message_and_leaves_nothing(tmp_path, monkeypatch, capsys,
                                                             corpus, hf_tokenizer_path):
    import megasyne.data.indexed_dataset as ids

    src = write_jsonl(tmp_path / "in.jsonl", corpus * 10, n=int)  # ~0.5 MB of uint16 tokens
    out = tmp_path / "disk"
    with small_tmpfs(out, "256k") as mounted:
        if not mounted:
            monkeypatch.setattr(ids, "open", _FillingDisk(256 << 10), raising=False)
        print(f"full disk: {'a 256 KiB tmpfs' if mounted else 'ENOSPC injected at the write'}")
        capsys.readouterr()
        rc = preprocess_data.main(["--input", src, "--tokenizer-model", hf_tokenizer_path,
                                   "--output-prefix", str(out / "c"), "--metadata-keys", "n",
                                   "--append-eod", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1
        assert f"no space left on device while writing {out / 'c_text_document'}" in err, err
        assert "free space" in err and "nothing was published" in err
        assert listing(out) == []  # no dataset, no temporary file, no lock


@pytest.mark.parametrize("heads, groups, ffn", [(32, 8, 14336), (8, 2, 160), (12, 12, 100),
                                                (16, 4, 48)])
def test_the_tp_hint_lists_only_degrees_that_pass_every_check(heads, groups, ffn):
    """The hint for 32 heads / 8 KV groups used to offer tp=16 and 32, which then failed."""
    from megasyne.parallel.dims import ParallelConfigError, ParallelDims

    shape = dict(num_layers=2, num_attention_heads=heads, num_query_groups=groups,
                 ffn_hidden_size=ffn)
    for tp in range(2, heads + 2):
        try:
            ParallelDims(tp=tp, world_size=tp).validate_for_model(**shape)
            continue
        except ParallelConfigError as exc:
            hint = re.search(r"choose tp among \[([\d, ]+)\]", str(exc))
        assert hint, f"tp={tp}: no hint in the error"
        offered = [int(d) for d in hint.group(1).split(",")]
        assert 1 in offered and tp not in offered
        for d in offered:  # each offered degree passes
            ParallelDims(tp=d, world_size=d).validate_for_model(**shape)
