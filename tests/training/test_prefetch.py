"""BatchPrefetcher (megasyne.training.prefetch) on its own, against synchronous reads.

The reader here is a tiny data set whose samples a test can change between steps, like the
adaptive mixture re-blending the index in place: every step's data must equal what a
synchronous read at that step gives. The trainer end to end: test_pretrain_e2e.py (same data
and losses with prefetch on and off; the step time with a slow reader) and test_adaptive_e2e.py
(prefetch across re-blends).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megasyne.errors import DataError
from megasyne.training.batches import batch_crc
from megasyne.training.prefetch import BatchPrefetcher, DataReadError, StepData


class Samples:
    """Step s's batch is [s*10 + k + offset for k < 4]; ``offset`` stands for the mixture's
    weights (changed by a test between steps); ``delay`` per read; ``fail`` step -> error."""

    def __init__(self, delay: float = 0.0, fail: dict | None = None):
        self.offset, self.delay, self.fail = 0, delay, dict(fail or {})
        self.reads: list[tuple[int, int]] = []  # (step, offset seen), in read order
        self.threads: set[str] = set()

    def read(self, step: int) -> StepData:
        self.threads.add(threading.current_thread().name)
        offset = self.offset
        self.reads.append((step, offset))
        if self.delay:
            time.sleep(self.delay)
        if step in self.fail:
            raise self.fail[step]
        tokens = torch.arange(4).unsqueeze(0) + step * 10 + offset  # [1, 4]
        batch = [dict(tokens=tokens, labels=tokens + 1)]
        return StepData(step=step, batch=batch, crc=batch_crc(batch))


def _wait_for(condition, timeout: float = 10.0) -> None:
    """Until the reader thread has got somewhere (polling: a loaded machine may be slow)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the reader thread did not get there"
        time.sleep(0.005)


def _tokens(data: StepData) -> list[int]:
    return data.batch[0]["tokens"][0].tolist()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_every_step_reads_what_a_synchronous_read_gives(depth):
    src = Samples()
    pre = BatchPrefetcher(src.read, depth=depth, end_step=6)
    try:
        got = [pre.get(s, version=0)[0] for s in range(6)]
    finally:
        pre.close()
    ref = Samples()
    for s, data in enumerate(got):
        want = ref.read(s)
        assert data.step == s and _tokens(data) == _tokens(want) and data.crc == want.crc
    assert [s for s, _ in src.reads] == list(range(6))  # each step read once, in order
    assert src.threads == ({threading.current_thread().name} if depth == 0 else
                           {"megasyne-prefetch_0"})


def test_reads_run_ahead_but_never_past_the_end():
    src = Samples()
    pre = BatchPrefetcher(src.read, depth=2, end_step=4)
    try:
        pre.get(0, 0)
        assert pre.in_flight == [1, 2]
        pre.get(2, 0)  # a step skipped (not in a run, but the rule): its read is dropped
        assert pre.in_flight == [3]
        pre.get(3, 0)
        assert pre.in_flight == []
    finally:
        pre.close()


def test_a_changed_data_version_discards_what_was_read_ahead():
    """The hook changes the samples between steps 1 and 2 (and the trainer bumps the
    version): steps 2.. are read again with the new samples, whatever was read before."""
    src = Samples(delay=0.02)
    pre = BatchPrefetcher(src.read, depth=2, end_step=6)
    try:
        assert _tokens(pre.get(0, 0)[0]) == [0, 1, 2, 3]
        assert _tokens(pre.get(1, 0)[0]) == [10, 11, 12, 13]
        _wait_for(lambda: (3, 0) in src.reads)  # steps 2 and 3 read ahead, old samples
        assert (2, 0) in src.reads
        src.offset = 100  # the re-blend
        got = [_tokens(pre.get(s, 1)[0]) for s in range(2, 6)]
    finally:
        pre.close()
    assert got == [[s * 10 + 100 + k for k in range(4)] for s in range(2, 6)]
    # Without the version bump the stale read is served: the check above can fail.
    src = Samples()
    pre = BatchPrefetcher(src.read, depth=2, end_step=6)
    try:
        pre.get(0, 0)
        _wait_for(lambda: (1, 0) in src.reads)
        src.offset = 100
        assert _tokens(pre.get(1, 0)[0]) == [10, 11, 12, 13]
    finally:
        pre.close()


def test_the_first_read_after_a_resume_is_the_restored_step():
    src = Samples()
    pre = BatchPrefetcher(src.read, depth=2, end_step=10)
    try:
        assert _tokens(pre.get(7, 0)[0]) == [70, 71, 72, 73]
        assert pre.in_flight == [8, 9]
    finally:
        pre.close()
    read = [s for s, _ in src.reads]  # (close may cancel 8 or 9 before they start)
    assert read == [7, 8, 9][:len(read)] and read[0] == 7


def test_a_reader_error_is_raised_at_its_step_in_the_callers_thread():
    boom = OSError(5, "Input/output error")
    for depth in (0, 2):
        src = Samples(fail={2: boom})
        pre = BatchPrefetcher(src.read, depth=depth, end_step=5,
                              describe=lambda s: f"[{8 * s}, {8 * s + 8}) of /idx")
        try:
            pre.get(0, 0)
            if depth:  # step 2's read fails on the thread: not raised before its step
                _wait_for(lambda src=src: (2, 0) in src.reads)
            pre.get(1, 0)
            with pytest.raises(DataReadError) as info:
                pre.get(2, 0)
        finally:
            pre.close()
        assert isinstance(info.value, DataError) and info.value.__cause__ is boom
        msg = str(info.value)
        assert "step 3 (samples [16, 24) of /idx)" in msg and "OSError" in msg
        assert "Input/output error" in msg and "rerun the same command" in msg
    # A bug keeps its type (and traceback), with a note naming the step (Python >= 3.11).
    src = Samples(fail={1: KeyError("tokens")})
    pre = BatchPrefetcher(src.read, depth=1, end_step=3)
    try:
        pre.get(0, 0)
        with pytest.raises(KeyError) as info:
            pre.get(1, 0)
    finally:
        pre.close()
    if hasattr(info.value, "__notes__"):
        assert "while reading the data of step 2" in info.value.__notes__[0]


def test_an_error_of_a_stale_read_is_never_raised():
    src = Samples(fail={1: OSError("torn read during the re-blend")})
    pre = BatchPrefetcher(src.read, depth=1, end_step=3)
    try:
        pre.get(0, 0)
        _wait_for(lambda: (1, 0) in src.reads)  # it fails (under version 0)
        src.fail.clear()
        assert _tokens(pre.get(1, 1)[0]) == [10, 11, 12, 13]
    finally:
        pre.close()


def test_close_stops_the_thread_without_waiting_for_the_queue():
    src = Samples(delay=0.2)
    pre = BatchPrefetcher(src.read, depth=8, end_step=100)
    pre.get(0, 0)
    t0 = time.perf_counter()
    pre.close()
    # Only the read in flight is waited for (0.2 s), not the 7 queued behind it (1.4 s).
    assert time.perf_counter() - t0 < 1.0
    assert len(src.reads) <= 3
    assert not [t for t in threading.enumerate() if t.name.startswith("megasyne-prefetch")]


def test_reads_overlap_the_callers_work():
    """read 0.15 s, work 0.2 s per step: with prefetch a step takes ~max, not the sum (the
    work a little longer, so that the reads get ahead by a margin, not by a tie)."""
    def run(depth):
        src = Samples(delay=0.15)
        pre = BatchPrefetcher(src.read, depth=depth, end_step=6)
        waits, t0 = [], time.perf_counter()
        try:
            for s in range(6):
                waits.append(pre.get(s, 0)[1])
                time.sleep(0.2)  # the step's compute
        finally:
            pre.close()
        return time.perf_counter() - t0, waits

    serial, serial_waits = run(0)
    overlapped, waits = run(2)
    assert serial > 6 * 0.35 - 0.05 and min(serial_waits) >= 0.15
    assert overlapped < 0.75 * serial, (overlapped, serial)
    assert max(waits[1:]) < 0.1, waits  # only the first step waits for its read


def test_a_negative_depth_is_refused():
    with pytest.raises(ValueError, match="prefetch depth must be >= 0"):
        BatchPrefetcher(Samples().read, depth=-1, end_step=3)
