"""tools/ablate.py end to end on a 2x2 grid of the tiny model (1 rank per cell, 4 steps each):
killed in the middle of the second cell, rerun (finished entries skipped, the killed cell
resumed from its checkpoint), the table written; the base row's perplexities and benchmark
score equal transformers' on the same held-out samples and questions, each cell's equal the
trainer's own validation at its last step; the evaluation in a child process (the path taken
with CUDA) equals the tool's in-process one; a changed definition is then refused."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.ablation.grid_files import STEPS, make_grid_files
from tests.launch import REPO_ROOT
from tests.training.pretrain_launch import _kill_tree

pytestmark = pytest.mark.slow
CELLS = ["zh10-asc", "zh10-shuf", "zh40-asc", "zh40-shuf"]


def _ablate(grid: Path, *args: str, kill_when=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "ablate.py"), "--grid", str(grid), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    if kill_when is not None:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not kill_when():
            time.sleep(0.05)
        if proc.poll() is None:
            _kill_tree(proc.pid)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_grid_runs_resumes_and_tabulates(tmp_path, monkeypatch):
    grid = make_grid_files(tmp_path)
    out = tmp_path / "out"
    killed = _ablate(grid, kill_when=lambda: len(_steps(out / "zh10-shuf" / "run")) >= 2)
    assert killed.returncode != 0, killed.stdout + killed.stderr[-3000:]
    assert (out / "zh10-asc" / "done.json").is_file() and not (out / "zh10-shuf" / "done.json").exists()
    assert not (out / "zh40-asc").joinpath("run").exists()

    proc = _ablate(grid)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert "[1/4 cells done] base model: done, skipped" in proc.stdout
    assert "[1/4 cells done] cell 1/4 zh10-asc: done, skipped" in proc.stdout
    assert "[4/4 cells done] cell 4/4 zh40-shuf: done" in proc.stdout
    log = (out / "zh10-shuf" / "train.log").read_text()
    assert "resumed from" in log and log.count("=== ") == 2
    for cell in CELLS:  # every step once: the killed cell continued, not started over
        assert _steps(out / cell / "run") == list(range(1, STEPS + 1)), cell
    assert (out / "zh10-asc" / "train.log").read_text().count("=== ") == 1  # not rerun

    evals = {n: json.loads((out / n / "eval.json").read_text()) for n in ["base", *CELLS]}
    # each cell: its final checkpoint, scored as the trainer scored it at its last step
    for cell in CELLS:
        last = [json.loads(line) for line in (out / cell / "run" / "metrics.jsonl").read_text().splitlines()][-1]
        assert evals[cell]["identity"]["iteration"] == STEPS
        assert evals[cell]["val"]["ppl"] == pytest.approx(last["eval"]["ppl"], rel=1e-6)
        for s, ppl in evals[cell]["val"]["sources"].items():
            assert ppl == pytest.approx(last["eval"][f"{s}/ppl"], rel=1e-6)
    # the recipes really differ: zh took 10% / 40% of the training tokens
    for cell, share in (("zh10-asc", 0.1), ("zh40-shuf", 0.4)):
        recs = [json.loads(line) for line in (out / cell / "run" / "metrics.jsonl").read_text().splitlines()]
        zh = sum(r["source_tokens"]["zh_poetry"] for r in recs)
        assert zh / sum(sum(r["source_tokens"].values()) for r in recs) == pytest.approx(share, abs=0.07)
    _check_base_against_transformers(tmp_path, evals["base"])

    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["cell"] for r in table] == ["base", *CELLS]
    best = min(CELLS, key=lambda c: evals[c]["val"]["ppl"])
    md = (out / "results.md").read_text()
    assert f"**{evals[best]['val']['ppl']:.3f}**" in next(ln for ln in md.splitlines() if ln.startswith(f"| {best} "))
    assert (out / "results.png").stat().st_size > 10_000
    # the tool evaluated in its own process (no CUDA); a child process (the path with CUDA)
    # writes the same eval.json
    from megasyne.ablation.grid import load_grid
    from megasyne.ablation.runner import evaluate_entry

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in the tool's runs: the same float sums
    child = json.loads(evaluate_entry(load_grid(grid), "zh40-shuf", in_process=False).read_text())
    assert {k: v for k, v in child.items() if k != "seconds"} == \
        {k: v for k, v in evals["zh40-shuf"].items() if k != "seconds"}

    raw = yaml.safe_load(grid.read_text())
    raw["base"]["set"] = {"optim.lr": 1e-3}
    grid.write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = _ablate(grid)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: cell zh10-asc: its definition changed") \
        and "config.optim.lr: was 0.003, now 0.001" in refused.stderr


def _check_base_against_transformers(root: Path, base: dict) -> None:
    """The base row, recomputed with transformers on the same held-out samples and questions."""
    import torch
    import transformers

    from megasyne.data.dataset import MixtureDataset
    from megasyne.eval.lm import hf_model_scorer
    from megasyne.eval.runner import run_tasks
    from megasyne.eval.tasks import load_task_file

    hf = transformers.LlamaForCausalLM.from_pretrained(root / "hf_base").eval()
    data = MixtureDataset(root / "out" / "base" / "eval_index")
    nll: dict[str, list] = {}
    with torch.no_grad():
        for i in range(8):  # evaluation.eval_samples
            sample = data[i]
            tokens = torch.from_numpy(np.asarray(sample["tokens"], dtype=np.int64))[None]  # [1, s+1]
            logits = hf(input_ids=tokens[:, :-1]).logits                                  # [1, s, v]
            loss = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:], reduction="sum")
            acc = nll.setdefault(data.source_names[int(sample["source"])], [0.0, 0])
            acc[0] += loss.item()
            acc[1] += tokens.shape[1] - 1
    for source, (total, count) in nll.items():
        assert base["val"]["sources"][source] == pytest.approx(math.exp(total / count), rel=1e-4)
    en = [nll["en_drama"], nll["en_verse"]]
    assert base["val"]["groups"]["en"] == pytest.approx(
        math.exp(sum(t for t, _ in en) / sum(c for _, c in en)), rel=1e-4)
    specs = load_task_file(root / "bench.yaml")
    ref = run_tasks(hf_model_scorer(root / "hf_base", max_length=32, batch_size=4), specs)
    assert base["bench"]["mmlu"] == ref["tasks"]["mmlu"]["score"]
