"""tools/build_mixture.py: builds or validates, and reports target vs realised per stage/source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools/build_mixture.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_tool_builds_then_validates_and_reports(data_dir, fits_index, tmp_path):  # fits.yaml
    pytest.importorskip("matplotlib")
    out = tmp_path / "index"
    first = run_tool("--recipe", str(data_dir / "fits.yaml"), "--output", str(out))
    assert first.returncode == 0, first.stderr
    assert "building" in first.stderr and "no index yet" in first.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["rebuilt"] and report["num_samples"] == 1000
    st1, st2 = report["stages"]
    assert st1["name"] == "bilingual" and st1["num_samples"] == 700
    for st in (st1, st2):
        assert sum(r["realised_samples"] for r in st["sources"].values()) == st["num_samples"]
        for r in st["sources"].values():
            assert abs(r["realised_samples"] - r["target_samples"]) < 1.0
            assert r["realised_tokens"] == r["realised_samples"] * 16
            assert r["max_prefix_deviation"] <= 2.0
    assert abs(st1["sources"]["web_zh"]["weight"] - 0.2) < 1e-12
    assert {s["name"]: s["epochs_used"] for s in report["sources"]} == {
        "web_en": 1, "web_zh": 1, "book": 1, "code": 1}
    md = (out / "report.md").read_text()
    assert "## Stage bilingual" in md and "| web_zh | 0.2000 |" in md
    assert (out / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    second = run_tool("--recipe", str(data_dir / "fits.yaml"), "--output", str(out), "--no-plot")
    assert second.returncode == 0, second.stderr
    assert "reusing" in second.stderr and "validated" in second.stderr
    assert not json.loads((out / "report.json").read_text())["rebuilt"]


def test_tool_fails_clearly_on_a_bad_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq_length: 8\nsources: {a: x}\nstages: [{name: s, samples: 2, weights: {b: 1}}]\n")
    r = run_tool("--recipe", str(bad), "--output", str(tmp_path / "i"))
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith("error: ")
    assert [line for line in r.stderr.splitlines() if "error" in line] == [r.stderr.splitlines()[-1]]
    assert "stages[0].weights.b: unknown source 'b'" in r.stderr
    assert "Traceback" not in r.stderr
