"""A grid file, its cells, and each cell's materialised recipe and run config.

A grid file (YAML; relative paths resolve against its directory)::

    output: ../../runs/surrogate_grid          # one directory per cell under it, and the table
    base:
      config: ../tinyllama/surrogate.yaml      # the run config every cell starts from
      recipe: ../recipes/tinyllama_surrogate.yaml   # optional: default, the config's recipe
      set: {train_steps: 2000}                 # optional config overrides for every cell
    ranks: 8                                   # torchrun --nproc_per_node of each cell
    evaluation:                                # megasyne.ablation.evaluate.Evaluation
      eval_recipe: ../recipes/heldout.yaml
      eval_samples: 256
    axes:                                      # in this order: the cell names' order
      synthetic:
        - {name: synth0,  x: 0,  set: {recipe.stages.surrogate_cpt.share.synthetic: 0}}
        - {name: synth20, x: 20, set: {recipe.stages.surrogate_cpt.share.synthetic: 0.2}}
      order:
        - {name: ascending, set: {recipe.sources.en_web.order: "ascending:ppl"}}
        - {name: shuffle,   set: {recipe.sources.en_web.order: shuffle}}
    plot: {x: synthetic, lines: order, metrics: [ppl]}

A value's ``set`` maps keys to values. ``config.<a.b>`` sets a run-config key (any key of
``megasyne.training.config.TrainConfig``, e.g. ``config.adaptive: null``).
``recipe.<path>`` sets a key of the recipe in its canonical form (``Recipe.to_dict``: every
source ``{prefix, order}``, stages a list addressed by name or index, a weight tree of numbers
and ``{weight, children}`` groups), e.g. ``recipe.stages.stage1.weights.en.children.en_web``.
``recipe.stages.<stage>.share.<node>`` (``<node>`` a dotted path in the weight tree) gives a
node the fraction of its siblings' total weight: its weight becomes
``share / (1 - share) x (the siblings' sum)``, the siblings keep theirs (so their ratios hold),
and share 0 removes the node (a recipe weight must be > 0).

Cells: the cartesian product of the axes, named by their values' names joined with ``-`` in
axis order (``synth20-ascending``). Each cell lives in ``<output>/<cell>/``: ``recipe.yaml``,
``train.yaml`` (the run config, ``run_dir: <output>/<cell>/run``) and ``cell.json`` (the
definition), written atomically, ``cell.json`` last. A cell whose definition differs from the
recorded one is refused, naming the cell and the key, unless it is restarted.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megasyne.atomic import atomic_write_json, atomic_write_text
from megasyne.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")
"""Axis and value names: no ``-``, so a cell name splits back into its values unambiguously."""
BASE = "base"
"""The entry of the base model (evaluated once, no training); no cell may be named so."""
MANAGED_CONFIG_KEYS = ("recipe", "run_dir", "eval_recipe", "eval_samples", "eval_interval",
                       "init_checkpoint")
"""Run-config keys the grid sets for every cell: an axis may not change them (every cell
starts from the same checkpoint and is judged on the same held-out data)."""
CONFIG_PATH_KEYS = ("recipe", "eval_recipe", "init_checkpoint", "run_dir")


class GridError(ConfigError):
    """A grid file, an axis value or a cell is invalid; the message names the file and key."""


@dataclass(kw_only=True, frozen=True)
class AxisValue:
    """One named value of an axis."""

    name: str
    """Part of the cell names (``[A-Za-z0-9_.]+``)."""
    set: dict
    """Key -> value (``recipe.<path>`` or ``config.<path>``), applied to the base."""
    x: float | None = None
    """Position on a plot's x axis (e.g. 20 for 20% synthetic); None: the value's rank."""


@dataclass(kw_only=True, frozen=True)
class Axis:
    name: str
    values: tuple[AxisValue, ...]


@dataclass(kw_only=True, frozen=True)
class PlotSpec:
    """The PNG: ``metrics`` against the ``x`` axis's values, one line per ``lines`` value."""

    x: str | None = None
    """Axis on the x axis (default: the first)."""
    lines: str | None = None
    """Axis drawn as one line per value (default: the second, if any)."""
    metrics: tuple[str, ...] = ("ppl",)
    """Table columns to plot, one panel each."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    name: str
    index: int
    """Position in the grid's order (0-based; Slurm array task index + 1, task 0 = base)."""
    values: dict
    """Axis name -> value name."""
    x: dict
    """Axis name -> the value's x (or its rank on the axis)."""
    settings: dict
    """Every key the cell's values set."""
    dir: Path

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"


@dataclass(kw_only=True, frozen=True)
class Grid:
    path: Path
    output: Path
    base_config: Path
    base_recipe: Path | None
    base_set: dict = field(default_factory=dict)
    ranks: int = 1
    torchrun_args: tuple[str, ...] = ()
    evaluation: Any = None
    """megasyne.ablation.evaluate.Evaluation."""
    axes: tuple[Axis, ...] = ()
    plot: PlotSpec = field(default_factory=PlotSpec)
    slurm: tuple[str, ...] = ()
    """Extra ``#SBATCH`` directives of the job-array script (e.g. ``--partition=gpu``)."""

    def cells(self) -> list[Cell]:
        return expand(self)


_TOP = {"output", "base", "ranks", "torchrun_args", "evaluation", "axes", "plot", "slurm"}


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file (see the module docstring)."""
    from megasyne.ablation.evaluate import Evaluation

    path = Path(path).resolve()
    if not path.is_file():
        raise GridError(f"grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file is a mapping (output, base, evaluation, axes, ...)")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise GridError(f"{path}: unknown keys {unknown}; known: {sorted(_TOP)}")
    for key in ("output", "base", "evaluation", "axes"):
        if key not in raw:
            raise GridError(f"{path}: '{key}' is missing")
    here = path.parent
    base = raw["base"]
    if not isinstance(base, dict) or "config" not in base or set(base) - {"config", "recipe", "set"}:
        raise GridError(f"{path}: base must be {{config: <run config>, recipe: <optional>, "
                        f"set: <optional overrides>}}, got {base!r}")
    base_config = _file(here, base["config"], f"{path}: base.config")
    base_recipe = _file(here, base["recipe"], f"{path}: base.recipe") if base.get("recipe") else None
    base_set = base.get("set") or {}
    if not isinstance(base_set, dict):
        raise GridError(f"{path}: base.set must map config keys to values")
    ranks = raw.get("ranks", 1)
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise GridError(f"{path}: ranks must be an integer >= 1, got {ranks!r}")
    ev = raw["evaluation"]
    if not isinstance(ev, dict):
        raise GridError(f"{path}: evaluation must be a mapping (eval_recipe, eval_samples, ...)")
    try:
        evaluation = Evaluation.from_dict(ev, base_dir=here)
    except (TypeError, ValueError) as exc:
        raise GridError(f"{path}: evaluation: {exc}") from None
    axes = _axes(raw["axes"], path)
    plot = _plot(raw.get("plot") or {}, axes, path)
    slurm = raw.get("slurm") or []
    if not isinstance(slurm, list) or not all(isinstance(s, str) for s in slurm):
        raise GridError(f"{path}: slurm must be a list of #SBATCH directives, e.g. [--partition=gpu]")
    grid = Grid(path=path, output=(here / raw["output"]).resolve(), base_config=base_config,
                base_recipe=base_recipe, base_set=dict(base_set), ranks=ranks,
                torchrun_args=tuple(str(a) for a in raw.get("torchrun_args") or ()),
                evaluation=evaluation, axes=axes, plot=plot, slurm=tuple(slurm))
    expand(grid)  # names and conflicts checked now
    return grid


def _file(here: Path, value, what: str) -> Path:
    p = (here / str(value)).resolve()
    if not p.is_file():
        raise GridError(f"{what}: file not found: {p}")
    return p


def _axes(raw, path: Path) -> tuple[Axis, ...]:
    if not isinstance(raw, dict) or not raw:
        raise GridError(f"{path}: axes must map axis names to lists of values")
    axes = []
    for name, values in raw.items():
        where = f"{path}: axes.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise GridError(f"{where}: axis names must match {NAME_RE.pattern}")
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: expected a non-empty list of {{name, set, x}}")
        parsed = []
        for i, v in enumerate(values):
            if not isinstance(v, dict) or "name" not in v or "set" not in v or set(v) - {"name", "set", "x"}:
                raise GridError(f"{where}[{i}]: expected {{name: ..., set: {{key: value}}, x: <optional "
                                f"number>}}, got {v!r}")
            vname = str(v["name"])
            if not NAME_RE.match(vname):
                raise GridError(f"{where}[{i}].name: {vname!r} must match {NAME_RE.pattern} (no '-': "
                                f"it joins the values of a cell name)")
            if not isinstance(v["set"], dict):
                raise GridError(f"{where}[{i}].set: expected a mapping of keys to values")
            for key in v["set"]:
                _check_key(str(key), f"{where}[{i}].set")
            x = v.get("x")
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise GridError(f"{where}[{i}].x: expected a number, got {x!r}")
            parsed.append(AxisValue(name=vname, set=dict(v["set"]), x=x))
        names = [v.name for v in parsed]
        if len(set(names)) != len(names):
            raise GridError(f"{where}: value names repeat: {names}")
        axes.append(Axis(name=name, values=tuple(parsed)))
    return tuple(axes)


def _check_key(key: str, where: str) -> None:
    scope, _, rest = key.partition(".")
    if scope not in ("recipe", "config") or not rest:
        raise GridError(f"{where}: key {key!r} must start with 'recipe.' or 'config.' "
                        f"(e.g. recipe.sources.en_web.order, config.optim.lr)")
    if scope == "config" and rest.split(".")[0] in MANAGED_CONFIG_KEYS:
        raise GridError(f"{where}: {key!r} is set by the grid for every cell (same base checkpoint, "
                        f"same held-out data); change base or evaluation instead")


def _plot(raw, axes, path: Path) -> PlotSpec:
    if not isinstance(raw, dict) or set(raw) - {"x", "lines", "metrics"}:
        raise GridError(f"{path}: plot must be {{x: <axis>, lines: <axis>, metrics: [...]}}")
    names = [a.name for a in axes]
    x = raw.get("x", names[0])
    lines = raw.get("lines", next((n for n in names if n != x), None))
    for key, axis in (("x", x), ("lines", lines)):
        if axis is not None and axis not in names:
            raise GridError(f"{path}: plot.{key}: no axis {axis!r} (axes: {names})")
    metrics = raw.get("metrics", ["ppl"])
    if isinstance(metrics, str) or not isinstance(metrics, list) or not metrics:
        raise GridError(f"{path}: plot.metrics must be a list of table columns, e.g. [ppl]")
    return PlotSpec(x=x, lines=lines if lines != x else None, metrics=tuple(map(str, metrics)))


def expand(grid: Grid) -> list[Cell]:
    """The cartesian product of the axes, in axis order (the last axis varies fastest)."""
    cells = []
    for index, combo in enumerate(itertools.product(*(a.values for a in grid.axes))):
        name = "-".join(v.name for v in combo)
        settings: dict = {}
        owner: dict = {}
        for axis, value in zip(grid.axes, combo):
            for key, val in value.set.items():
                if key in settings:
                    raise GridError(f"{grid.path}: cell {name}: {key!r} is set by both axis "
                                    f"{owner[key]} and axis {axis.name}")
                settings[key], owner[key] = val, axis.name
        x = {a.name: (v.x if v.x is not None else a.values.index(v)) for a, v in zip(grid.axes, combo)}
        cells.append(Cell(name=name, index=index, values={a.name: v.name for a, v in zip(grid.axes, combo)},
                          x=x, settings=settings, dir=grid.output / name))
    if any(c.name == BASE for c in cells):
        raise GridError(f"{grid.path}: a cell may not be named {BASE!r} (the base model's entry)")
    return cells


# ----------------------------------------------------------------------------- materialising

def base_documents(grid: Grid) -> tuple[dict, dict]:
    """(run config, canonical recipe) of the base, paths absolute, base.set applied."""
    from megasyne.data.recipe import load_recipe
    from megasyne.training.config import _NumberAwareLoader, apply_overrides

    try:
        config = yaml.load(grid.base_config.read_text(encoding="utf-8"), Loader=_NumberAwareLoader) or {}
    except yaml.YAMLError as exc:
        raise GridError(f"{grid.base_config}: invalid YAML: {exc}") from None
    here = grid.base_config.parent
    for key in CONFIG_PATH_KEYS:
        if config.get(key):
            config[key] = str((here / config[key]).resolve())
    bench = config.get("bench_eval")
    if isinstance(bench, dict):
        config["bench_eval"] = {k: (str((here / v).resolve()) if k in ("tasks", "tokenizer") and v else v)
                                for k, v in bench.items()}
    config = apply_overrides(config, [f"{k}={json.dumps(v)}" for k, v in grid.base_set.items()])
    recipe_path = grid.base_recipe or (Path(config["recipe"]) if config.get("recipe") else None)
    if recipe_path is None:
        raise GridError(f"{grid.path}: neither base.recipe nor {grid.base_config}'s recipe is set")
    if not config.get("init_checkpoint"):
        raise GridError(f"{grid.path}: the base config {grid.base_config} has no init_checkpoint: "
                        f"every cell starts from the same base checkpoint (set it in base.set)")
    return config, load_recipe(recipe_path).to_dict()


def cell_documents(grid: Grid, cell: Cell, base: tuple[dict, dict]) -> tuple[dict, dict]:
    """(run config, canonical recipe) of one cell: the base with its settings applied."""
    from megasyne.data.recipe import Recipe, RecipeError

    config, recipe = copy.deepcopy(base[0]), copy.deepcopy(base[1])
    for key, value in cell.settings.items():
        scope, _, rest = key.partition(".")
        try:
            if scope == "recipe":
                _set_recipe(recipe, rest.split("."), value)
            else:
                _set_path(config, rest.split("."), value, create=True)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise GridError(f"{grid.path}: cell {cell.name}: {key}: {exc}") from None
    try:
        recipe = Recipe.from_dict(recipe).to_dict()
    except RecipeError as exc:
        raise GridError(f"{grid.path}: cell {cell.name}: its recipe is invalid: {exc}") from None
    ev = grid.evaluation
    config.update(recipe=str(cell.dir / "recipe.yaml"), run_dir=str(cell.run_dir),
                  eval_recipe=str(ev.eval_recipe), eval_samples=ev.eval_samples)
    config.pop("eval_interval", None)
    if ev.interval:
        config["eval_interval"] = ev.interval
    return config, recipe


def _set_path(node, parts: list[str], value, *, create: bool) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part)
            if last:
                node[idx] = value
                return
            node = node[idx]
            continue
        if not isinstance(node, dict):
            raise TypeError(f"{'.'.join(parts[:i])} is a {type(node).__name__}, not a section")
        if last:
            if not create and part not in node:
                raise KeyError(f"no key {part!r} at {'.'.join(parts[:i]) or 'the top'} "
                               f"(there: {sorted(map(str, node))})")
            node[part] = value
            return
        if part not in node or node[part] is None:
            if not create:
                raise KeyError(f"no key {part!r} at {'.'.join(parts[:i]) or 'the top'} "
                               f"(there: {sorted(map(str, node))})")
            node[part] = {}
        node = node[part]


def _list_index(items: list, part: str) -> int:
    """A list element by its ``name`` (recipe stages) or by its index."""
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    if part.isdigit() and int(part) < len(items):
        return int(part)
    names = [it.get("name") for it in items if isinstance(it, dict)]
    raise KeyError(f"no element {part!r} (names: {names}, or an index below {len(items)})")


def _set_recipe(recipe: dict, parts: list[str], value) -> None:
    if len(parts) >= 4 and parts[0] == "stages" and parts[2] == "share":
        stage = recipe["stages"][_list_index(recipe["stages"], parts[1])]
        set_share(stage["weights"], parts[3:], value)
        return
    if parts[0] == "sources" and len(parts) == 3 and parts[2] not in ("prefix", "order", "where"):
        raise KeyError(f"a source has prefix, order and where, not {parts[2]!r}")
    _set_path(recipe, parts, value, create=parts[0] == "sources" and parts[-1] == "where")


def set_share(siblings: dict, path: list[str], share) -> None:
    """Give the node at ``path`` of a weight tree ``share`` of its siblings' total weight."""
    for i, part in enumerate(path[:-1]):
        node = siblings.get(part)
        if not isinstance(node, dict):
            raise KeyError(f"{'.'.join(path[:i + 1])} is not a group of the weight tree")
        siblings = node["children"]
    name = path[-1]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f"a share is a fraction in [0, 1) such as 0.2, got {share!r}")
    if name not in siblings:
        raise KeyError(f"no node {name!r} in the weight tree (there: {sorted(siblings)})")
    others = sum(_weight(v) for k, v in siblings.items() if k != name)
    if others <= 0:
        raise ValueError(f"{name!r} has no siblings to share the weight with")
    if share == 0:
        del siblings[name]
        return
    weight = share / (1 - share) * others
    if isinstance(siblings[name], dict):
        siblings[name]["weight"] = weight
    else:
        siblings[name] = weight


def _weight(node) -> float:
    return float(node["weight"] if isinstance(node, dict) else node)


def flatten(doc, prefix: str = "") -> dict:
    """``{"a.b[0].c": leaf}`` of a nested document (a stage list element named by its index)."""
    out = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(doc, list) and doc and any(isinstance(v, (dict, list)) for v in doc):
        for i, v in enumerate(doc):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = doc
    return out


def definition_changes(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences ``key: was X, now Y`` between two cell definitions."""
    a, b = flatten(recorded), flatten(current)
    return [f"{k}: was {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def prepare_cell(grid: Grid, cell: Cell, base: tuple[dict, dict]) -> dict:
    """Write the cell's recipe.yaml, train.yaml and cell.json (atomically) if it has none;
    refuse when its recorded definition differs. Returns the definition."""
    config, recipe = cell_documents(grid, cell, base)
    definition = {"cell": cell.name, "values": cell.values, "settings": cell.settings,
                  "recipe": recipe, "config": config}
    definition = json.loads(json.dumps(definition))  # the same types as read back
    record = cell.dir / "cell.json"
    if record.is_file():
        changes = definition_changes(json.loads(record.read_text(encoding="utf-8")), definition)
        if changes:
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            raise GridError(f"cell {cell.name}: its definition changed since it was started "
                            f"({record}): {shown}. Restore the grid, or rerun with "
                            f"--restart-cell {cell.name} to set its run aside and start it over")
        return definition
    cell.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cell.dir / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    atomic_write_text(cell.dir / "train.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    atomic_write_json(record, definition, indent=1, ensure_ascii=False)
    return definition


def set_aside(directory: Path) -> Path | None:
    """Rename a cell's (or the base's) directory aside, never deleting anything."""
    if not directory.exists():
        return None
    aside = directory.with_name(f"{directory.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    directory.rename(aside)
    return aside


__all__ = ["Axis", "AxisValue", "Cell", "Grid", "GridError", "PlotSpec", "base_documents",
           "cell_documents", "definition_changes", "expand", "load_grid",
           "prepare_cell", "set_aside", "set_share"]
