"""Shared fixture of the SynE tests: one run of examples/syne/run_toy.py per session.

Its QA step is tools/synth_qa.py with the real SmolLM2-135M-Instruct, the run that
test_synth_smollm2.py checks; test_toy_recipe.py checks the whole sequence. One run serves
both: the generation (~20-25 s on 2 cores) is done once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT


@pytest.fixture(scope="session")
def syne_toy(tmp_path_factory) -> Path:
    """The work directory of a finished examples/syne/run_toy.py run."""
    out = tmp_path_factory.mktemp("syne_toy")
    proc = subprocess.run([sys.executable, "examples/syne/run_toy.py", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out
