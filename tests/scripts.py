"""Import a repository script (``tools/*.py``, ``benchmarks/*.py``) as a module, by file path, or
run it in a child process (``run_tool``).

Scripts are not packages: putting their folder on ``sys.path`` would let any module name there
shadow an installed one for the rest of the test session. Loading by path touches nothing but
``sys.modules``, where the module is registered under its own name (dataclasses and pickling
look a class's module up there).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.launch import REPO_ROOT


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """The module of the script at ``path`` (relative to the repository root, or absolute).

    ``name`` defaults to ``script_<file stem>``; loading the same name again returns the module
    already loaded, so a script's top level runs once per process.
    """
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    name = name or f"script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such script")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run_tool(*cmd, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a repository script with the test interpreter; fail with its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
