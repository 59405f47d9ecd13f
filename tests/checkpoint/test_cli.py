"""tools/convert_hf.py as a user runs it: both directions, and bad input failing early.

The happy path runs the real script in subprocesses (~8 s); the error cases call its
``main()`` in-process: they must fail while checking, before Megatron is even imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megasyne.checkpoint.hf import HFCheckpoint
from tests.checkpoint.hf_models import make_hf_model
from tests.launch import REPO_ROOT
from tests.scripts import load_script

TOOL = REPO_ROOT / "tools" / "convert_hf.py"


def _load_tool():
    return load_script(TOOL)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_model("tied_llama31", tmp_path_factory.mktemp("cli") / "hf")


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_both_directions_from_the_command_line(hf_dir, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = _run("hf-to-megasyne", "--hf-dir", hf_dir, "--output", ckpt)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "hf -> megasyne" in proc.stderr  # the progress bar
    proc = _run("megasyne-to-hf", "--checkpoint", ckpt, "--output", out, "--tokenizer-dir", tok,
                "--dtype", "bf16", "--max-shard-size", "100KB", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "tok"]  # no temp dirs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tok / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 100KB
    a, b = HFCheckpoint(hf_dir), HFCheckpoint(out)
    for name in b.names():
        assert torch.equal(b.get(name), a.get(name).to(torch.bfloat16)), name
    # A second run refuses to overwrite what the first one wrote.
    proc = _run("megasyne-to-hf", "--checkpoint", ckpt, "--output", out)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == \
        proc.stderr.strip().splitlines()[-1:]


def _bad_config(tmp_path, **over):
    d = tmp_path / "bad"
    src = make_hf_model("gqa", d)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(over)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("case,message", [
    ("not_llama", "model_type is 'mistral', not 'llama'"),
    ("rope", "unsupported rope type 'dynamic'"),
    ("shapes", "tensor shapes do not match config.json"),
    ("tp", "1 KV (query) groups are not divisible by tp=2"),
    ("output_exists", "already exists and is not empty"),
    ("no_checkpoint", "no megasyne checkpoint"),
])
def test_bad_input_fails_before_writing(tmp_path, capsys, case, message):
    tool = _load_tool()
    out = tmp_path / "out"
    args = ["hf-to-megasyne", "--output", str(out)]
    if case == "not_llama":
        args += ["--hf-dir", str(_bad_config(tmp_path, model_type="mistral"))]
    elif case == "rope":
        args += ["--hf-dir", str(_bad_config(
            tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))]
    elif case == "shapes":
        args += ["--hf-dir", str(_bad_config(tmp_path, intermediate_size=192))]
    elif case == "tp":
        args += ["--hf-dir", str(make_hf_model("mqa_bf16", tmp_path / "hf")), "--tp", "2"]
    elif case == "output_exists":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
        args += ["--hf-dir", str(make_hf_model("gqa", tmp_path / "hf"))]
    else:
        args = ["megasyne-to-hf", "--checkpoint", str(tmp_path), "--output", str(out)]
    capsys.readouterr()  # drop the fixtures' output
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    if case == "output_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial output


def test_only_rank_0_reports_an_error(tmp_path, capsys, monkeypatch):
    # Under torchrun every rank checks the same inputs; one line for the job, not one per rank.
    tool = _load_tool()
    args = ["megasyne-to-hf", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]
    monkeypatch.setenv("RANK", "1")
    assert tool.main(args) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert tool.main(args) == 2 and capsys.readouterr().err.startswith("error: no megasyne")
