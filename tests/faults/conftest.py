"""Fixtures of the fault-injection tests: the data tests' tokenizer and corpus, and a small disk."""

import contextlib
import os
import shutil
import subprocess

from tests.data_io.conftest import corpus, hf_tokenizer_path  # noqa: F401  (shared fixtures)


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """Mount a ``size`` tmpfs at ``path`` (created) for the block; yields True, or False where
    mounting is refused (not root, no CAP_SYS_ADMIN in the container): the caller then injects
    ENOSPC instead, and says so."""
    os.makedirs(path, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True)
        mounted = proc.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)
