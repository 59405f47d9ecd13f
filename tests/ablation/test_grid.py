"""Grid files without launching anything: expansion and names, the recipe/config keys a value
sets (a weight-tree share checked against the recipe's own normalised leaf weights), the
refusal of a changed cell and --restart-cell, the Slurm script, and the table's best marks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from megasyne.ablation import grid as G
from megasyne.ablation.grid import GridError, load_grid
from megasyne.ablation.runner import prepare, write_slurm_script
from megasyne.ablation.table import write_table
from megasyne.data.recipe import Recipe, load_recipe


def _world(tmp: Path, axes: dict | None = None, **extra) -> Path:
    """A base recipe (zh / en / synthetic 1:7:2), run config and grid; no data is read."""
    (tmp / "ckpt").mkdir(exist_ok=True)
    recipe = dict(seq_length=16, sources={"zh_web": "d/zh_web", "en_web": "d/en_web", "en_book": "d/en_book",
                                          "synthetic_qa": "d/synthetic_qa"},
                  stages=[dict(name="cpt", samples=64, weights={
                      "zh": {"weight": 1, "children": {"zh_web": 1}},
                      "en": {"weight": 7, "children": {"en_web": 0.4, "en_book": 0.6}},
                      "synthetic": {"weight": 2, "children": {"synthetic_qa": 1}}})])
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp / "heldout.yaml").write_text(yaml.safe_dump(recipe))
    (tmp / "base.yaml").write_text(yaml.safe_dump(dict(recipe="recipe.yaml", init_checkpoint="ckpt",
                                                       optim=dict(lr=1e-3))))
    axes = axes or {
        "synthetic": [{"name": f"synth{p}", "x": p, "set": {"recipe.stages.cpt.share.synthetic": p / 100}}
                      for p in (0, 20, 40)],
        "order": [{"name": o.split(":")[0], "set": {"recipe.sources.en_web.order": o}}
                  for o in ("ascending:ppl", "shuffle")]}
    grid = dict(output="out", base={"config": "base.yaml"}, evaluation={"eval_recipe": "heldout.yaml"},
                axes=axes, **extra)
    (tmp / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    return tmp / "grid.yaml"


def test_cells_are_the_cartesian_product_in_axis_order(tmp_path):
    grid = load_grid(_world(tmp_path))
    cells = grid.cells()
    assert [c.name for c in cells] == ["synth0-ascending", "synth0-shuffle", "synth20-ascending",
                                       "synth20-shuffle", "synth40-ascending", "synth40-shuffle"]
    assert [c.index for c in cells] == list(range(6))
    assert cells[3].values == {"synthetic": "synth20", "order": "shuffle"}
    assert cells[3].x == {"synthetic": 20, "order": 1}
    assert cells[3].dir == tmp_path / "out" / "synth20-shuffle"
    assert load_grid(tmp_path / "grid.yaml").cells() == cells  # deterministic


@pytest.mark.parametrize("axes, match", [
    ({"a": [{"name": "x-1", "set": {"config.seed": 1}}]}, "no '-'"),
    ({"a": [{"name": "x", "set": {"optim.lr": 1}}]}, "must start with 'recipe.' or 'config.'"),
    ({"a": [{"name": "x", "set": {"config.init_checkpoint": "other"}}]}, "set by the grid for every cell"),
    ({"a": [{"name": "x", "set": {"config.seed": 1}}, {"name": "x", "set": {"config.seed": 2}}]},
     "value names repeat"),
    ({"a": [{"name": "x", "set": {"config.seed": 1}}], "b": [{"name": "y", "set": {"config.seed": 2}}]},
     "cell x-y: 'config.seed' is set by both axis a and axis b"),
    ({"a": [{"name": "base", "set": {"config.seed": 1}}]}, "may not be named 'base'"),
])
def test_bad_axes_are_refused_naming_the_key(tmp_path, axes, match):
    with pytest.raises(GridError, match=match):
        load_grid(_world(tmp_path, axes))


def _leaf_shares(recipe: dict) -> dict:
    stage = Recipe.from_dict(recipe).stages[0]
    return dict(stage.leaf_items())


def test_share_gives_the_node_its_fraction_and_keeps_the_other_ratios(tmp_path):
    grid = load_grid(_world(tmp_path))
    base = G.base_documents(grid)
    before = _leaf_shares(base[1])
    for cell, share in zip(grid.cells()[::2], (0.0, 0.2, 0.4)):
        _, recipe = G.cell_documents(grid, cell, base)
        got = _leaf_shares(recipe)
        assert got.get("synthetic_qa", 0.0) == pytest.approx(share, abs=1e-12)
        # zh : en_web : en_book keep the base's proportions (brute force over the leaves)
        rest = {k: v for k, v in before.items() if k != "synthetic_qa"}
        total = sum(rest.values())
        for k, v in rest.items():
            assert got[k] == pytest.approx(v / total * (1 - share), abs=1e-12)
        assert recipe["sources"]["en_web"]["order"] == ("ascending:ppl" if cell.values["order"] == "ascending"
                                                         else "shuffle")
    _, zero = G.cell_documents(grid, grid.cells()[0], base)
    assert "synthetic" not in zero["stages"][0]["weights"]  # a recipe weight must be > 0
    # a nested node: en_book's share inside en
    weights = json.loads(json.dumps(base[1]["stages"][0]["weights"]))
    G.set_share(weights, ["en", "en_book"], 0.25)
    children = weights["en"]["children"]
    assert children["en_book"] / (children["en_book"] + children["en_web"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\)"):
        G.set_share(weights, ["synthetic"], 20)
    with pytest.raises(KeyError, match="no node 'code'"):
        G.set_share(weights, ["code"], 0.1)


def test_materialised_files_are_an_ordinary_run(tmp_path):
    grid = load_grid(_world(tmp_path))
    cells = prepare(grid)
    cell = cells[2]
    config = yaml.safe_load((cell.dir / "train.yaml").read_text())
    assert config["run_dir"] == str(cell.run_dir) and config["recipe"] == str(cell.dir / "recipe.yaml")
    assert config["init_checkpoint"] == str(tmp_path / "ckpt")  # the same base for every cell
    assert config["eval_recipe"] == str(tmp_path / "heldout.yaml")
    recipe = load_recipe(cell.dir / "recipe.yaml")  # what the trainer reads
    assert recipe.sources["en_web"].prefix == str(tmp_path / "d" / "en_web")  # the same data
    assert dict(recipe.stages[0].leaf_items())["synthetic_qa"] == pytest.approx(0.2)
    assert json.loads((cell.dir / "cell.json").read_text())["cell"] == "synth20-ascending"


def test_a_changed_cell_is_refused_until_restarted(tmp_path):
    path = _world(tmp_path)
    prepare(load_grid(path))
    (tmp_path / "out" / "synth0-ascending" / "run").mkdir()
    raw = yaml.safe_load(path.read_text())
    raw["base"]["set"] = {"optim.lr": 5e-4}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(GridError, match=r"cell synth0-ascending: its definition changed .*"
                                        r"config\.optim\.lr: was 0\.001, now 0\.0005.*"
                                        r"--restart-cell synth0-ascending"):
        prepare(load_grid(path))
    # a value of one axis changed: only the cells holding it are named
    raw["base"].pop("set")
    raw["axes"]["order"][1]["set"]["recipe.sources.en_web.order"] = "descending:ppl"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(GridError, match=r"cell synth0-shuffle: .*recipe\.sources\.en_web\.order: "
                                        r"was 'shuffle', now 'descending:ppl'"):
        prepare(load_grid(path))
    restarted = [f"synth{p}-shuffle" for p in (0, 20, 40)]
    prepare(load_grid(path), restart=tuple(restarted))
    asides = sorted(p.name for p in (tmp_path / "out").iterdir() if ".set-aside-" in p.name)
    assert [a.split(".set-aside-")[0] for a in asides] == restarted  # renamed, nothing deleted
    with pytest.raises(GridError, match="--restart-cell nope: no such cell"):
        prepare(load_grid(path), restart=("nope",))


def test_slurm_script_is_one_array_task_per_entry(tmp_path):
    grid = load_grid(_world(tmp_path, slurm=["--partition=gpu", "--gpus-per-node=8"]))
    text = write_slurm_script(grid).read_text()
    assert "#SBATCH --array=0-6" in text and "#SBATCH --partition=gpu" in text
    assert text.rstrip().endswith('--only-index "$SLURM_ARRAY_TASK_ID"')
    assert "tools/ablate.py" in text and str(grid.path) in text
    assert not any((tmp_path / "out" / c.name / "run").exists() for c in grid.cells())  # nothing ran


def _fake_eval(directory: Path, ppl: float, acc: float | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    val = {"loss": 0.0, "ppl": ppl, "tokens": 1, "groups": {"zh": ppl * 2, "en": ppl / 2},
           "sources": {"zh_web": ppl * 2, "en_web": 7.0}}
    (directory / "eval.json").write_text(json.dumps({"val": val, "bench": {"mmlu": acc}}))
    (directory / "done.json").write_text("{}")


def test_table_marks_the_best_cell_per_column(tmp_path):
    grid = load_grid(_world(tmp_path, plot={"x": "synthetic", "lines": "order", "metrics": ["ppl", "mmlu acc"]}))
    _fake_eval(grid.output / "base", 5.0, 0.9)  # the reference is not ranked
    values = {"synth0-ascending": (12.0, 0.25), "synth0-shuffle": (11.0, 0.5),
              "synth20-ascending": (10.0, 0.25), "synth20-shuffle": (13.0, 0.75),
              "synth40-ascending": (10.5, 0.5)}
    for name, (ppl, acc) in values.items():
        _fake_eval(grid.output / name, ppl, acc)
    out = write_table(grid)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out["markdown"].read_text().splitlines()}
    assert "**10.000**" in rows["synth20-ascending"] and "**20.000**" in rows["synth20-ascending"]
    assert "**5.000**" in rows["synth20-ascending"]                        # ppl en: lowest
    assert "**75.0**" in rows["synth20-shuffle"] and "25.0" in rows["synth0-ascending"]  # accuracy: highest
    assert "**" not in rows["base (no training)"] and "90.0" in rows["base (no training)"]
    assert "not done" in rows["synth40-shuffle"]
    assert all("**" not in rows[c].split(" | ")[7] for c in values)  # ppl en_web: every cell tied
    table = list(csv.DictReader(out["csv"].open()))
    assert [r["cell"] for r in table] == ["base", *(c.name for c in grid.cells())]
    assert float(table[3]["ppl"]) == 10.0 and table[6]["ppl"] == "" and table[6]["done"] == "0"
    assert out["png"].stat().st_size > 10_000


def test_command_line_reports_a_grid_error_in_one_line(tmp_path, capsys):
    import importlib.util

    from tests.launch import REPO_ROOT

    spec = importlib.util.spec_from_file_location("ablate_tool", REPO_ROOT / "tools" / "ablate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = _world(tmp_path, {"a": [{"name": "x", "set": {"recipe.sources.nope.order": "shuffle"}}]})
    assert tool.main(["--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: cell x: recipe.sources.nope.order: ") and err.count("\n") == 1
    assert tool.main(["--grid", str(path), "--list"]) == 0


def test_an_evaluation_error_fails_its_entry_naming_the_log(tmp_path, monkeypatch):
    """The evaluation in this process (the CPU default) fails as its child process would: a
    MegasyneError is eval.log's one ``error:`` line and status 2 (the base checkpoint here is
    an empty directory); a bug is its traceback and status 1. No eval.json either way, and the
    environment is restored (the evaluation's imports may set variables)."""
    import os

    import megasyne.ablation.evaluate as evaluate
    from megasyne.ablation.runner import CellFailed, evaluate_entry

    grid = load_grid(_world(tmp_path))
    prepare(grid)
    log, env = tmp_path / "out" / "base" / "eval.log", dict(os.environ)
    with pytest.raises(CellFailed, match=r"^base: evaluation failed \(status 2\); see .*eval\.log "
                                         r"\(last line: error: "):
        evaluate_entry(grid, "base", in_process=True)
    assert log.read_text().count("error: ") == 1 and str(tmp_path / "ckpt") in log.read_text()
    assert not (tmp_path / "out" / "base" / "eval.json").exists()

    def bug(argv):
        os.environ["MEGASYNE_TEST_LEAK"] = "1"
        raise KeyError("tokens")

    monkeypatch.setattr(evaluate, "main", bug)
    with pytest.raises(CellFailed, match=r"evaluation failed \(status 1\).*last line: KeyError: 'tokens'"):
        evaluate_entry(grid, "base", in_process=True)
    assert "Traceback" in log.read_text() and dict(os.environ) == env
    assert not (tmp_path / "out" / "base" / "eval.json").exists()
