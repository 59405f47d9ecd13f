"""Publishing preprocessed datasets so that each one is complete or absent.

A dataset ``<P>`` (``<output_prefix>_<key>_document``) is ``<P>.bin``, ``<P>.idx``, the metadata
sidecar ``<P>.meta/`` (with ``--metadata-keys``) and ``<P>.report.json``. ``<P>.idx`` is the commit
marker: it is renamed into place last, after the ``.bin``, the sidecar and the report, so a present
``.idx`` means the whole dataset is there (``examples/tiny/run_tiny.py`` skips a dataset whose
``.idx`` exists, and so may any pipeline).

Staging: one run for output prefix ``<dir>/<name>`` writes everything under the hidden directory
``<dir>/.<name>.preprocess.<pid>.<8 hex>/`` (the same filesystem, so publishing is renames only),
where each dataset is complete (readable, sidecar and report written) before anything is
published. Publishing a dataset then takes, in this order:

1. remove an old ``<P>.idx``: from here on the old dataset reads as absent, and no reader can pair
   the old ``.idx`` with the new ``.bin``;
2. rename the ``.bin``;
3. move the sidecar's fields into ``<P>.meta/`` (fields already there under other names are kept:
   a scorer's field computed for identical content stays valid, for other content it reads as
   stale);
4. rename the report;
5. rename the ``.idx`` (directory fsynced before and after, so the order survives a power cut).

A failure before step 1 (a bad line, a dead worker, a full disk) leaves an old dataset at ``<P>``
untouched; one during steps 1-5 (renames only) leaves no ``<P>.idx``.

Leftovers: a run killed by SIGKILL (the OOM killer, a preemption, a lost node) cannot clean up, and
its staging directory stays. The next run on the same output prefix removes such directories, and
only those: they are matched by the exact name pattern of that prefix, under the prefix's lock file
``<dir>/.<name>.preprocess.lock`` (``flock``), which a run holds from start to end, so a live run's
staging is never taken for a leftover and two runs cannot write one prefix at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import uuid

from megasyne.data.indexed_dataset import bin_path, idx_path
from megasyne.data.metadata import meta_dir, move_metadata_fields
from megasyne.errors import DataError


class StagingError(DataError, RuntimeError):
    """The output prefix is busy (another run holds its lock); the message says which run."""


def _split(output_prefix: str) -> tuple[str, str]:
    path = os.path.abspath(output_prefix)
    return os.path.dirname(path), os.path.basename(path)


def lock_path(output_prefix: str) -> str:
    d, name = _split(output_prefix)
    return os.path.join(d, f".{name}.preprocess.lock")


def _stage_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.preprocess\.\d+\.[0-9a-f]{{8}}")


# IndexedDatasetWriter's temporaries (<P>.bin.tmp.<pid>.<8 hex>, ...) and the report's, as runs of
# earlier versions of the preprocessor left them directly beside the dataset.
_WRITER_TEMP = r"\.(bin|idx|lengths)\.tmp\.\d+\.[0-9a-f]{8}|\.report\.json\.tmp\.\d+"


@contextlib.contextmanager
def output_lock(output_prefix: str):
    """Hold the output prefix's lock for the block; StagingError if another run holds it."""
    path = lock_path(output_prefix)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StagingError(
                f"{output_prefix}: another preprocess run is writing this output prefix ({holder}; "
                f"lock {path}): wait for it to end, or choose another --output-prefix") from None
        try:  # the run we waited for may have removed the file after we opened it: lock anew
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a run that opened it retries on a new file
        os.close(fd)


def remove_leftovers(output_prefix: str, dataset_prefixes: list[str]) -> list[str]:
    """Delete what killed runs on this output prefix left behind (call under output_lock).

    Removes staging directories of ``output_prefix`` and writer temporaries of the given dataset
    prefixes; returns the removed paths. Nothing else matches the patterns (they are anchored on
    the exact prefix name and end in digits and hex), so other prefixes' files stay.
    """
    d, name = _split(output_prefix)
    stage = _stage_pattern(name)
    temps = [re.compile(re.escape(os.path.basename(p)) + f"(?:{_WRITER_TEMP})")
             for p in dataset_prefixes]
    removed = []
    for entry in sorted(os.listdir(d)):
        path = os.path.join(d, entry)
        if stage.fullmatch(entry) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif any(t.fullmatch(entry) for t in temps) and os.path.isfile(path):
            os.unlink(path)
        else:
            continue
        removed.append(path)
    return removed


def make_stage(output_prefix: str) -> str:
    """Create this run's staging directory beside the outputs; returns its path."""
    d, name = _split(output_prefix)
    path = os.path.join(d, f".{name}.preprocess.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    return path


def staged_prefix(stage: str, dataset_prefix: str) -> str:
    """Where a dataset is written inside the staging directory."""
    return os.path.join(stage, os.path.basename(dataset_prefix))


def report_path(prefix: str) -> str:
    return prefix + ".report.json"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on a directory; the renames stand
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def publish(staged: str, prefix: str) -> None:
    """Move a complete staged dataset to ``prefix``, ``.idx`` last (see the module docstring)."""
    out_dir = os.path.dirname(os.path.abspath(prefix))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(idx_path(prefix))
    os.replace(bin_path(staged), bin_path(prefix))
    if os.path.isdir(meta_dir(staged)):
        move_metadata_fields(staged, prefix)
        _fsync_dir(meta_dir(prefix))
    os.replace(report_path(staged), report_path(prefix))
    _fsync_dir(out_dir)
    os.replace(idx_path(staged), idx_path(prefix))
    _fsync_dir(out_dir)
