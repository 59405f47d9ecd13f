"""Asynchronous checkpoint saves (megasyne.checkpoint.async_save) on one process.

What the trainer relies on: the checkpoint holds the state of the step it was started at,
whatever training does meanwhile; it is published (``latest``) only once written; a write
that fails in the background (a full disk) is reported at finalisation, naming the
checkpoint, with the ``.tmp`` removed and ``latest`` unchanged. The kill-while-pending and
bit-identical-resume checks are end-to-end runs in tests/training/test_pretrain_e2e.py.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.faults.conftest import small_tmpfs
from tests.faults.test_data_faults import tiny_model  # noqa: F401  (the fixture)


def _params(chunks):
    return [p.detach().clone() for p in chunks[0].parameters()]


def test_the_checkpoint_holds_the_state_of_its_step_and_is_published_when_written(
        tmp_path, tiny_model):  # noqa: F811
    import torch

    from megasyne.checkpoint import dist as ckpt
    from megasyne.checkpoint.async_save import AsyncCheckpointer

    cfg, chunks = tiny_model
    root = tmp_path / "checkpoints"
    saver = AsyncCheckpointer()
    ckpt.save_checkpoint(root, 1, chunks, model_config=cfg.to_dict(), layout={})
    at_step_2 = _params(chunks)
    hook_state = {"weights": [0.5, 0.5]}
    saver.start(root, 2, chunks, model_config=cfg.to_dict(), layout={}, extra={"hook": hook_state},
                before_publish=lambda tmp: (tmp / "rng").mkdir())
    # Training goes on: the weights and the hook's state change before the write is published.
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.mul_(-3.0)
    hook_state["weights"][0] = 0.9
    assert (root / "latest").read_text() == "iter_0000001\n"  # not published before written
    deadline = time.time() + 120
    published = None
    while published is None:  # the per-step check: never waits for the writer
        assert time.time() < deadline
        published = saver.poll()
        time.sleep(0.05)
    assert published == root / "iter_0000002" and saver.pending is None
    assert (root / "latest").read_text() == "iter_0000002\n"
    assert not (root / "iter_0000002.tmp").exists() and (published / "rng").is_dir()
    ckpt.verify_checkpoint(published)
    manifest = json.loads((published / "megasyne.json").read_text())
    assert manifest["extra"]["hook"] == {"weights": [0.5, 0.5]}  # as at the save, not later
    ckpt.load_checkpoint(root, chunks, model_config=cfg.to_dict())
    for p, want in zip(chunks[0].parameters(), at_step_2):
        assert torch.equal(p, want)  # the snapshot of step 2, not the weights of later
    assert saver.wait() is None  # nothing in flight


def test_a_full_disk_during_a_background_write(tmp_path, monkeypatch, tiny_model):  # noqa: F811
    import torch

    from megasyne.checkpoint import dist as ckpt
    from megasyne.checkpoint.async_save import AsyncCheckpointer

    cfg, chunks = tiny_model
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "600k") as mounted:  # one checkpoint (~470 KB) fits, two do not
        print(f"full disk: {'a 600 KiB tmpfs' if mounted else 'ENOSPC injected into fsync'}")
        root = disk / "checkpoints"
        saver = AsyncCheckpointer()
        saver.start(root, 1, chunks, model_config=cfg.to_dict(), layout={})
        assert saver.wait() == root / "iter_0000001"
        saved = _params(chunks)
        if not mounted:  # the forked writer inherits this; the trainer gets it back at once
            def full(fd):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(os, "fsync", full)
        saver.start(root, 2, chunks, model_config=cfg.to_dict(), layout={})
        monkeypatch.undo()
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(1.0)
        with pytest.raises(ckpt.CheckpointError) as e:
            saver.wait()
        assert str(e.value) == (
            f"no space left on device while writing {root / 'iter_0000002.tmp'}: free space or "
            f"change run_dir; the previous checkpoint {root / 'iter_0000001'} is intact "
            "('latest' names it)")
        assert sorted(os.listdir(root)) == ["iter_0000001", "latest"]
        assert saver.pending is None
        assert ckpt.load_checkpoint(root, chunks, model_config=cfg.to_dict())["iteration"] == 1
        for p, q in zip(chunks[0].parameters(), saved):
            assert torch.equal(p, q)
