"""One writer per run directory.

Two launches into one ``run_dir`` would interleave their metrics lines and collide on the same
``iter_N.tmp`` checkpoint directory. Global rank 0 of a run takes an exclusive ``flock`` on
``<run_dir>/.lock`` before it touches anything in the directory and holds it for the whole run;
a second launcher fails at once with a message naming the holder. The kernel drops the lock when
the holding process dies (SIGKILL and OOM included), so a crashed run never leaves a stale lock
behind. The file's text (pid, host, start time, command) is only information for that message.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from megasyne.errors import ConfigError


class RunDirBusy(ConfigError):
    """Another process holds the run directory."""


class RunDirLock:
    """An exclusive lock on ``<run_dir>/.lock`` (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunDirBusy(
                f"run_dir {self.path.parent} is in use by another run ({holder}); wait for it "
                f"to finish or stop it, or give this run another run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": datetime.datetime.now().isoformat(timespec="seconds"),
                            "command": " ".join(sys.argv)[:300]}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
