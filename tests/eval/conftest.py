"""Shared fixtures: the benchmark fixture (examples/eval/make_fixture.py), built once per session
(its wheels are cached outside the repository, MEGASYNE_CACHE, default ~/.cache/megasyne).
SmolLM2 (``smollm2_hf``, ``smollm2_megasyne``) is in tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT


def _load_make_fixture():
    spec = importlib.util.spec_from_file_location(
        "megasyne_make_fixture", REPO_ROOT / "examples" / "eval" / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fixture_tasks(tmp_path_factory) -> Path:
    """tasks.yaml of a freshly built fixture directory."""
    return _load_make_fixture().build(tmp_path_factory.mktemp("eval") / "fixture")


@pytest.fixture(scope="session")
def fixture_dir(fixture_tasks) -> Path:
    return fixture_tasks.parent
