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
import bz2
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
from pathlib import Path

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
    assert proc.returncode == 2, proc.stderr
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
        assert rc == 2
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


# ------------------------------------------------------------------------------------------------
# Conversion and checkpoints
def _files(d) -> dict[str, bytes]:
    return {p: (d / p).read_bytes() for p in listing(d) if (d / p).is_file()}


def test_convert_refuses_its_own_input_and_overwrite_keeps_other_files(tmp_path, capsys):
    """--overwrite used to delete the whole output directory, and --output equal to --hf-dir was
    accepted (the conversion would then replace its own input)."""
    from megasyne.checkpoint.hf import HFCheckpoint
    from megasyne.checkpoint.hf_convert import hf_to_megasyne, megasyne_to_hf
    from tests.checkpoint.hf_models import make_hf_model
    from tests.checkpoint.test_cli import _load_tool

    hf = make_hf_model("gqa", tmp_path / "models" / "hf")
    original = _files(hf)
    tool = _load_tool()
    capsys.readouterr()
    for output, relation in ((hf, "is"), (hf / "ms", "is inside"), (tmp_path / "models", "contains")):
        assert tool.main(["hf-to-megasyne", "--hf-dir", str(hf), "--output", str(output),
                          "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"--output {output} {relation} the input {hf}" in err, err
        assert "choose an --output outside" in err
    assert _files(hf) == original and not (hf / "ms").exists()

    ms = tmp_path / "ms"
    (ms / "notes").mkdir(parents=True)
    (ms / "notes" / "eval.txt").write_text("user data")
    hf_to_megasyne(hf, ms, overwrite=True, progress=False)
    assert sorted(listing(ms))[:3] == ["iter_0000000", "iter_0000000/dist",
                                       "iter_0000000/dist/.metadata"]
    assert (ms / "notes" / "eval.txt").read_text() == "user data"
    assert (ms / "latest").read_text() == "iter_0000000\n"

    out = tmp_path / "hf_out"
    megasyne_to_hf(ms, out, max_shard_size="100KB", progress=False)
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) > 1
    (out / "README.md").write_text("model card")
    megasyne_to_hf(ms, out, overwrite=True, progress=False)  # one shard this time
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json"]  # old shards gone, the user's file kept, no temp left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    a, b = HFCheckpoint(hf), HFCheckpoint(out)
    for name in a.names():
        assert a.get(name).equal(b.get(name)), name


@pytest.fixture
def tiny_model():
    """A two-layer Llama on one process (a 1-rank gloo group), ~107k parameters."""
    import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.model.config import LlamaConfig
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import destroy_parallel, init_parallel

    cfg = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)
    init_parallel(ParallelDims(), seed=0)
    try:
        yield cfg, build_model(cfg, ParallelDims(), ModelRuntime())
    finally:
        destroy_parallel()


def test_a_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch, tiny_model):
    """It surfaced as torch's "inline_container.cc:672 unexpected pos" and left the .tmp."""
    import torch
    from megatron.core import dist_checkpointing

    from megasyne.checkpoint.dist import CheckpointError, load_checkpoint, save_checkpoint

    cfg, chunks = tiny_model
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "600k") as mounted:  # one checkpoint (~470 KB) fits, two do not
        print(f"full disk: {'a 600 KiB tmpfs' if mounted else 'failure injected into the save'}")
        root = disk / "checkpoints"
        save_checkpoint(root, 1, chunks, model_config=cfg.to_dict(), layout={})
        if not mounted:
            real_save = dist_checkpointing.save

            def save_on_full_disk(state, directory, **kwargs):  # what torch raises on ENOSPC
                (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                   "704 vs 598")

            monkeypatch.setattr(dist_checkpointing, "save", save_on_full_disk)
        saved = [p.detach().clone() for p in chunks[0].parameters()]
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(1.0)
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(root, 2, chunks, model_config=cfg.to_dict(), layout={})
        assert str(e.value) == (
            f"no space left on device while writing {root / 'iter_0000002.tmp'}: free space or "
            f"change run_dir; the previous checkpoint {root / 'iter_0000001'} is intact "
            "('latest' names it)")
        assert sorted(os.listdir(root)) == ["iter_0000001", "latest"]
        if not mounted:
            monkeypatch.setattr(dist_checkpointing, "save", real_save)
        assert load_checkpoint(root, chunks, model_config=cfg.to_dict())["iteration"] == 1
        for p, q in zip(chunks[0].parameters(), saved):
            assert torch.equal(p, q)
