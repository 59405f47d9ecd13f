"""The full-scale rehearsal (tools/plan_run.py) on every shipped run config at its real world
size: each must start (a config that cannot fails CI here), and the plan must say what the run
will do. Memory is checked against a measured case (BENCHMARKS.md, TinyLlama-1.1B on one H100)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.launch import REPO_ROOT
from tests.scripts import load_script

pytestmark = pytest.mark.slow
SHIPPED = {  # config -> (nodes, GPUs per node) it is written for
    "examples/syne/llama3_8b_stage1.yaml": (8, 8),
    "examples/syne/llama3_8b_stage2.yaml": (8, 8),
    "examples/tinyllama/surrogate.yaml": (1, 8),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One scratch directory: the stand-ins and index of a recipe are built once."""
    return tmp_path_factory.mktemp("plan")


def _plan(work, config: str, nodes: int, gpus: int, *overrides: str, capsys=None):
    tool = load_script(REPO_ROOT / "tools" / "plan_run.py")
    out = work / f"out_{abs(hash((config, overrides))) % 10**8}"
    rc = tool.main(["--config", str(REPO_ROOT / config), "--nodes", str(nodes),
                    "--gpus-per-node", str(gpus), "--out", str(out),
                    "--work-dir", str(work / "scratch"), *(["--set", *overrides] if overrides else [])])
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
    return rc, plan, out


@pytest.mark.parametrize("config", sorted(SHIPPED))
def test_every_shipped_config_starts_at_its_real_size(work, config):
    rc, plan, out = _plan(work, config, *SHIPPED[config])
    assert rc == 0 and plan["memory"]["fits"], plan and plan["memory"]
    assert plan["config"]["world_size"] == SHIPPED[config][0] * SHIPPED[config][1]
    assert (out / "lr.png").stat().st_size > 10_000
    if "llama3_8b" in config:
        stages = plan["steps"]["stages"]
        assert [(s["first_step"], s["end_step"]) for s in stages.values()] == \
            [(0, 11027), (11027, 11920)]
        assert plan["steps"]["launch_steps"] == (11027 if "stage1" in config else 11920)
        lr, peak = plan["lr"], 1e-5
        # WSD over the run: warm-up, stable through stage I, the decay over stage II only.
        assert lr[499] == peak and set(lr[499:11028]) == {peak} and lr[11028] < peak
        assert lr[-1] < 0.2 * peak
        shares = stages["stage1_bilingual_adaptation"]["sources"]
        zh = sum(v["share"] for k, v in shares.items() if k.startswith("zh_"))
        assert zh == pytest.approx(0.2, abs=1e-4)  # the recipe's zh:en 2:8
        assert plan["memory"]["stages"][0]["microbatches_in_flight"] == 2  # PP2, 1F1B


def test_a_config_that_cannot_start_is_refused(work, capsys):
    rc, _, _ = _plan(work, "examples/syne/llama3_8b_stage1.yaml", 8, 8, "train_steps=11921")
    assert rc == 2 and "needs 12207104 samples but the recipe" in capsys.readouterr().err
    rc, plan, _ = _plan(work, "examples/tinyllama/surrogate.yaml", 1, 1, "micro_batch_size=32",
                        "global_batch_size=64")
    assert rc == 2 and not plan["memory"]["fits"]  # 32 x 2048 tokens of activations: no
    assert "DOES NOT FIT" in capsys.readouterr().out
    rc, _, _ = _plan(work, "examples/syne/llama3_8b_stage1.yaml", 3, 4)
    assert rc == 2 and "world size 12 is not divisible by tp*pp*cp" in capsys.readouterr().err
    rc, _, _ = _plan(work, "examples/syne/llama3_8b_stage1.yaml", 8, 6)
    assert rc == 2 and "multiple of micro_batch_size 1 x data-parallel size 6" in \
        capsys.readouterr().err


def test_memory_matches_the_measured_tinyllama_step(work, tmp_path):
    """BENCHMARKS.md: TinyLlama-1.1B, one H100, micro-batch 4 x 2048 tokens, bf16, no
    recomputation, Megatron's (not distributed) optimizer, torch's ops: 37.4 GiB peak
    (torch.cuda.max_memory_allocated). The plan, traced on the meta device: within 3%."""
    recipe = dict(seq_length=2048, sources={"web": str(tmp_path / "missing_web")},
                  stages=[dict(name="s", samples=64, weights={"web": 1})])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dict(
        run_dir=str(tmp_path / "run"), recipe="recipe.yaml", model="tinyllama_1_1b",
        dtype="bf16", micro_batch_size=4, global_batch_size=4)))
    rc, plan, _ = _plan(tmp_path, str(tmp_path / "run.yaml"), 1, 1)
    assert rc == 0
    total = plan["memory"]["stages"][0]["total_gib"]
    assert total == pytest.approx(37.4, rel=0.03), plan["memory"]
