"""Run integrity under faults: what a weeks-long run meets, injected on a small real run.

One module fixture trains 4 steps at DP2 (2 ranks, TP1) and checkpoints at steps 2 and 4
(written in the background, async_save), like a preempted job. Each test copies that run
directory, injects one fault, relaunches and checks the guard: nothing acknowledged is lost,
nothing is read twice or skipped, and every refusal says what to do next.

Each torchrun launch costs ~10-20 s of start-up on 2 cores, so: a refusal that is rank 0's
alone (the run-dir lock, the data identity check every rank makes alike) is launched as one
plain process (ONE_RANK); two faults that resume through separate guards from the same step
share one relaunch (resumed_past_faults).
"""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pytest
import yaml

from tests.training.pretrain_launch import STEPS, G, launch, make_run_files, records

pytestmark = pytest.mark.slow
DP2 = ("parallel.tp=1",)
ONE_RANK = dict(nproc=1)  # with DP2's overrides: TP1 x DP1, one process, no torchrun


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_run_files(root)
    # Saved in the background (async_save): the stop at exit_at_step must publish the step-4
    # write before the exit, and every test below reads these checkpoints like synchronous ones.
    proc = launch(root, "base", *DP2, "exit_at_step=4", "async_save=true")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "iter_0000004 (written in the background" in proc.stdout
    assert (root / "base" / "checkpoints" / "latest").read_text() == "iter_0000004\n"
    return root


def _copy(root, name: str):
    shutil.copytree(root / "base", root / name)
    return root / name


def _edited_recipe(root, name: str, edit) -> str:
    recipe = yaml.safe_load((root / "recipe.yaml").read_text())
    edit(recipe)
    (root / name).write_text(yaml.safe_dump(recipe))
    return f"recipe={root / name}"


@pytest.fixture(scope="module")
def resumed_past_faults(saved):
    """One relaunch (to step 5) of a copy of the run with two faults whose guards act apart:
    a metrics line torn mid-write (the log's truncation on resume) and a lost ``latest``
    pointer (the choice of checkpoint). Each test below checks its own guard in it."""
    run = _copy(saved, "torn_nolatest")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "stage": "stage1", "consumed_sam')  # killed mid-write
    (run / "checkpoints" / "latest").unlink()
    proc = launch(saved, "torn_nolatest", *DP2, "exit_at_step=5")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc, records(saved, "torn_nolatest"), records(saved, "base")


def test_a_torn_metrics_line_is_dropped_and_the_run_resumes(resumed_past_faults):
    proc, recs, base = resumed_past_faults
    assert "dropping a torn last line" in proc.stderr
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[:4] == base


def test_a_recipe_edit_is_refused_then_rebased_without_repeating_or_skipping(saved):
    run = _copy(saved, "edited")
    before = (run / "metrics.jsonl").read_text()

    def five_five(recipe):
        recipe["stages"][0]["weights"]["zh"]["weight"] = 5
        recipe["stages"][0]["weights"]["en"]["weight"] = 5

    new_recipe = _edited_recipe(saved, "recipe_5_5.yaml", five_five)
    refused = launch(saved, "edited", *DP2, new_recipe, **ONE_RANK)
    assert refused.returncode != 0
    assert "the data changed since" in refused.stderr and "at consumed sample 32" in refused.stderr
    assert "recipe stages[0].weights.zh.weight (2 -> 5)" in refused.stderr
    assert "--set rebase_data=true" in refused.stderr
    assert (run / "metrics.jsonl").read_text() == before  # nothing truncated or overwritten

    rebased = launch(saved, "edited", *DP2, new_recipe, "rebase_data=true")
    assert rebased.returncode == 0, rebased.stderr[-6000:]
    assert "rebased at consumed sample 32" in rebased.stdout
    recs = records(saved, "edited")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[:4] == records(saved, "base")

    from megasyne.checkpoint.dist import read_manifest
    from megasyne.data.dataset import MixtureDataset
    from megasyne.training.data_state import RunData

    old_fp = read_manifest(saved / "base" / "checkpoints")["extra"]["data"]["fingerprint"]
    old = MixtureDataset(run / f"index.{old_fp[:12]}")  # kept: the record of what was read
    new = MixtureDataset(run / "index")
    assert new.fingerprint != old_fp
    state = read_manifest(run / "checkpoints")["extra"]["data"]
    assert state["rebase"]["at"] == 4 * G and state["fingerprint"] == new.fingerprint
    RunData(new, rebase_allowed=True, adaptive=False).apply_rebase(state["rebase"])
    # Every source's stream positions over the whole run: 0, 1, 2, ... with no gap or repeat.
    read = {name: [] for name in new.source_names}
    for ds, samples in ((old, range(0, 4 * G)), (new, range(4 * G, STEPS * G))):
        for i in samples:
            read[ds.source_names[int(ds.source_id[i])]].append(int(ds.source_sample[i]))
    for name, positions in read.items():
        assert positions == list(range(len(positions))), name
    assert state["cursors"] == {n: len(p) for n, p in read.items()}
    # The rebased steps follow the new weights (zh:en 5:5 in stage1, steps 5-6) ...
    zh = sum(new.source_names[int(new.source_id[i])] == "zh_poetry" for i in range(32, 48))
    assert zh == 8
    # ... and the trainer read exactly those samples (its per-step data fingerprint, DP2).
    for rec in recs[4:]:
        assert rec["data_crc"] == _step_crc(new, rec["step"] - 1, dp=2, mbs=2), rec["step"]


def _step_crc(ds, step: int, *, dp: int, mbs: int) -> int:
    """The trainer's data fingerprint of a step: per DP rank a CRC over its micro-batches'
    tokens and last labels, summed over the ranks."""
    total = 0
    per_rank = G // dp
    for r in range(dp):
        crc, first = 0, step * G + r * per_rank
        for k in range(first, first + per_rank, mbs):
            tokens = np.stack([ds[i]["tokens"] for i in range(k, k + mbs)]).astype(np.int64)
            crc = zlib.crc32(np.ascontiguousarray(tokens[:, :-1]).tobytes(), crc)
            crc = zlib.crc32(np.ascontiguousarray(tokens[:, -1:]).tobytes(), crc)
        total += crc
    return total


def test_a_second_launcher_on_a_run_dir_is_refused_at_once(saved):
    from megasyne.training.run_lock import RunDirLock

    run = _copy(saved, "locked")
    before = (run / "metrics.jsonl").read_text()
    lock = RunDirLock(run).acquire()  # this process plays the first run
    try:
        proc = launch(saved, "locked", *DP2, "exit_at_step=6", **ONE_RANK)
    finally:
        lock.release()
    assert proc.returncode != 0
    assert "is in use by another run" in proc.stderr and '"pid"' in proc.stderr
    assert (run / "metrics.jsonl").read_text() == before
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_a_lost_latest_pointer_resumes_from_the_newest_complete_checkpoint(resumed_past_faults):
    proc, recs, base = resumed_past_faults
    assert "latest is missing; resuming from the newest complete checkpoint" in proc.stdout
    assert "iter_0000004 at step 4" in proc.stdout
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[:4] == base


def test_a_deleted_newest_checkpoint_falls_back_to_the_previous_one(saved):
    run = _copy(saved, "nonewest")
    shutil.rmtree(run / "checkpoints" / "iter_0000004")  # 'latest' now dangles
    proc = launch(saved, "nonewest", *DP2, "exit_at_step=4")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "names iter_0000004, which is not a complete checkpoint" in proc.stdout
    assert "iter_0000002 at step 2" in proc.stdout
    _same_steps(records(saved, "nonewest"), records(saved, "base"))  # steps 3-4 redone bit-identically


def _same_steps(got: list[dict], want: list[dict]) -> None:
    """Same steps with bit-identical losses, grad norms, LRs and data (timings aside)."""
    keys = ("step", "loss", "grad_norm", "lr", "source_loss", "data_crc", "consumed_samples")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]


def _shards(ckpt_dir):
    return sorted((ckpt_dir / "dist").glob("__*_0.distcp"))


def test_damaged_checkpoints_are_named_skipped_or_refused_and_never_restarted(saved):
    run = _copy(saved, "damaged")
    before = (run / "metrics.jsonl").read_text()
    newest, older = run / "checkpoints" / "iter_0000004", run / "checkpoints" / "iter_0000002"
    truncated = _shards(newest)[-1]
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    flipped = _shards(older)[0]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: still a loadable file
    flipped.write_bytes(bytes(data))

    refused = launch(saved, "damaged", *DP2, "exit_at_step=6")
    assert refused.returncode != 0
    assert f"{truncated}: " in refused.stderr and "(truncated or overwritten)" in refused.stderr
    assert f"{flipped}: checksum mismatch" in refused.stderr
    assert "--set fresh_start=true" in refused.stderr
    assert (run / "metrics.jsonl").read_text() == before  # no silent fresh start

    shutil.copy2(saved / "base" / "checkpoints" / "iter_0000002" / "dist" / flipped.name, flipped)
    fallback = launch(saved, "damaged", *DP2, "exit_at_step=4")
    assert fallback.returncode == 0, fallback.stderr[-6000:]
    assert f"{newest} is damaged" in fallback.stdout and "falling back" in fallback.stdout
    assert "iter_0000002 at step 2" in fallback.stdout
    _same_steps(records(saved, "damaged"), records(saved, "base"))

    # Starting over is an explicit, one-launch request, and sets the old run aside.
    fresh = launch(saved, "damaged", *DP2, "exit_at_step=2", "fresh_start=true")
    assert fresh.returncode == 0, fresh.stderr[-6000:]
    aside = sorted(p.name for p in run.iterdir() if ".set-aside-" in p.name)
    assert [n.split(".set-aside-")[0] for n in aside] == ["checkpoints", "metrics.jsonl"]
    _same_steps(records(saved, "damaged"), records(saved, "base")[:2])


def test_a_re_preprocessed_source_is_refused(saved):
    """Last in the module: it rewrites a source of the shared data (and restores it)."""
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess

    _copy(saved, "reprocessed")
    prefix = saved / "en_verse_text_document"
    keep = saved / "kept_en_verse"  # the dataset, its sidecar and report, restored after
    keep.mkdir()
    for p in saved.glob("en_verse_text_document*"):
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, keep / p.name)
    raw = saved / "en_verse.jsonl"
    lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
    (saved / "en_verse_fewer.jsonl").write_text("".join(lines[:50]), encoding="utf-8")
    try:
        run_preprocess(PreprocessConfig(inputs=[str(saved / "en_verse_fewer.jsonl")],
                                        output_prefix=str(saved / "en_verse"),
                                        tokenizer=str(saved / "tokenizer.json"),
                                        metadata_keys=["n_chars"], append_eod=True,
                                        log_interval=0, progress=False))
        proc = launch(saved, "reprocessed", *DP2, **ONE_RANK)
    finally:
        for p in saved.glob("en_verse_text_document*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in keep.iterdir():
            p.rename(saved / p.name)
    assert proc.returncode != 0
    assert "source en_verse data (.idx/.bin)" in proc.stderr and "rebase_data" in proc.stderr
    assert prefix.with_suffix(".idx").exists()


def test_fresh_start_is_refused_in_a_config_file(saved, tmp_path):
    from megasyne.errors import ConfigError
    from megasyne.training.config import load_config

    raw = yaml.safe_load((saved / "base.yaml").read_text())
    raw.update(fresh_start=True, recipe=str(saved / "recipe.yaml"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="fresh_start belongs on the command line"):
        load_config(str(tmp_path / "c.yaml"))


def test_metrics_log_keeps_every_good_line(tmp_path):
    from megasyne.training.metrics import MetricsError, MetricsLog

    log = MetricsLog(tmp_path, is_writer=True, tensorboard=False)
    lines = [json.dumps({"step": s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropping a torn last line"):
        log.truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n{oops\n" + lines[2] + "\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not a JSON record"):
        log.truncate_after(5)


def test_the_kernel_releases_a_dead_holders_lock(tmp_path):
    import subprocess
    import sys
    import time

    from megasyne.training.run_lock import RunDirBusy, RunDirLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from megasyne.training.run_lock import RunDirLock; "
        f"lock = RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f'"pid": {holder.pid}'):
        RunDirLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: no clean-up code runs
    holder.wait()
    deadline = time.time() + 5
    while True:
        try:
            RunDirLock(tmp_path).acquire().release()
            break
        except RunDirBusy:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_failed_publish_on_rank_0_fails_every_rank_instead_of_hanging(tmp_path):
    from tests.launch import run_torchrun

    run_torchrun("tests/faults/publish_worker.py", 2, tmp_path, timeout=180)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith("CheckpointError: no space left on device while writing")
    # rank 1 learns rank 0's outcome (and reports it as what it was: a full disk)
    assert rank1.startswith("CheckpointError: no space left on device while writing")
    assert not list((tmp_path / "checkpoints").glob("iter_*"))  # nothing published, no .tmp


class _Index:
    """What RunData reads of a mixture index: fingerprint, inputs, sources, per-sample sources."""

    def __init__(self, fingerprint: str, source_id, names=("a", "b")):
        self.fingerprint, self.source_names = fingerprint, list(names)
        self.source_id = np.asarray(source_id, dtype=np.int16)
        self.meta = {"inputs": {"code_version": 1, "recipe": {"fp": fingerprint}, "sources": {}}}

    def __len__(self):
        return len(self.source_id)


def test_data_identity_guards_without_a_run():
    from megasyne.training.data_state import DataIdentityError, RunData

    now = _Index("new", [0, 1, 0, 1, 0, 0])
    saved = {"fingerprint": "old", "inputs": {"code_version": 1, "recipe": {"fp": "old"},
                                              "sources": {}},
             "cursors": {"a": 2, "b": 2}, "rebase": None}
    with pytest.raises(DataIdentityError, match="cannot be combined with the adaptive"):
        RunData(now, rebase_allowed=True, adaptive=True).check(saved, 4, checkpoint="ck")
    with pytest.raises(DataIdentityError, match="fewer than the 9 the run has consumed"):
        RunData(now, rebase_allowed=True, adaptive=False).check(saved, 9, checkpoint="ck")
    same = dict(saved, fingerprint="new", cursors={"a": 3, "b": 1})  # it read a, b, a, b
    with pytest.raises(DataIdentityError, match=r"differ from the saved ones .*'a': \(3, 2\)"):
        RunData(now, rebase_allowed=False, adaptive=False).verify(same, 4, checkpoint="ck")
    RunData(now, rebase_allowed=False, adaptive=False).verify(
        dict(same, cursors={"a": 2, "b": 2}), 4, checkpoint="ck")  # the positions it reached
