"""Shared fixtures: the benchmark fixture (examples/eval/make_fixture.py) and SmolLM2.

Both are built once per session; the wheels and the SmolLM2 HF directory are cached outside
the repository (MEGASYNE_CACHE, default ~/.cache/megasyne) after the first run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT


def _load_make_fixture():
    spec = importlib.util.spec_from_file_location(
        "megasyne_make_fixture", REPO_ROOT / "examples" / "eval" / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*cmd, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a repository script with the test interpreter; fail with its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def fixture_tasks(tmp_path_factory) -> Path:
    """tasks.yaml of a freshly built fixture directory."""
    return _load_make_fixture().build(tmp_path_factory.mktemp("eval") / "fixture")


@pytest.fixture(scope="session")
def fixture_dir(fixture_tasks) -> Path:
    return fixture_tasks.parent


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (tools/prepare_smollm2.py, cached)."""
    return Path(run_tool("tools/prepare_smollm2.py").stdout.strip().splitlines()[-1])
