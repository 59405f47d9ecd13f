"""The one evaluation of every grid entry (each cell's final checkpoint, and the base model).

    python -m megasyne.ablation.evaluate --grid GRID.yaml --entry base|<cell>

run by ``megasyne.ablation.runner`` (in its own process on a CPU, as a child process with CUDA;
one process, TP1), so that every cell and the base are scored by the same code on the same data:

- validation perplexity on held-out data (the grid's ``eval_recipe``: its first ``eval_samples``
  samples, the trainer's own ``Validator`` on the checkpoint loaded into the Megatron-Core
  model), overall, per source and per group of sources (per language by default: the eval
  recipe's first-stage top-level groups, e.g. ``zh`` / ``en``), pooled as exp(summed NLL /
  scored tokens);
- optionally a benchmark subset through ``megasyne.eval`` (what ``tools/evaluate.py`` runs:
  lm-eval prompts, answer log-likelihoods) on the same loaded model.

Writes ``<entry dir>/eval.json`` (and ``bench.json``, the full results document) atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True, frozen=True)
class BenchSubset:
    """A benchmark subset scored at the end of every cell (multiple choice or generative)."""

    tasks: str
    """A task file of ``megasyne.eval.tasks`` (e.g. the bundled fixture, examples/eval)."""
    tokenizer: str | None = None
    """HF tokenizer directory; default: the one recorded in the base checkpoint (convert_hf)."""
    names: tuple[str, ...] | None = None
    """Tasks of the file to run (default: all)."""
    max_items: int | None = None
    """At most this many questions per task."""
    batch_size: int = 8
    max_length: int | None = None
    """Context length of the prompts (default: the model's max_position_embeddings)."""

    def __post_init__(self):
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"bench.max_items must be >= 1, got {self.max_items}")
        if self.batch_size < 1:
            raise ValueError(f"bench.batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True, frozen=True)
class Evaluation:
    """The grid's ``evaluation:`` section: the same for every cell and for the base."""

    eval_recipe: str
    """Held-out data recipe (validation perplexity)."""
    eval_samples: int = 64
    """Held-out samples scored (the first ones of the eval recipe's index)."""
    micro_batch_size: int = 1
    """Sequences per forward pass when scoring."""
    groups: dict | None = None
    """Group name -> sources pooled into one perplexity; default: the eval recipe's first stage's
    top-level groups (e.g. zh / en), none if its weights are flat."""
    interval: int | None = None
    """Also validate every K steps during each cell (the trainer's eval_interval)."""
    bench: BenchSubset | None = None

    def __post_init__(self):
        if not Path(self.eval_recipe).is_file():
            raise ValueError(f"eval_recipe: file not found: {self.eval_recipe}")
        for key in ("eval_samples", "micro_batch_size"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) \
                    or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if self.groups is not None and not (isinstance(self.groups, dict) and all(
                isinstance(v, list) and v for v in self.groups.values())):
            raise ValueError("groups must map a group name to a non-empty list of sources")

    @classmethod
    def from_dict(cls, raw: dict, *, base_dir: Path) -> Evaluation:
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(raw) - known:
            raise ValueError(f"unknown keys {sorted(set(raw) - known)}; known: {sorted(known)}")
        if "eval_recipe" not in raw:
            raise ValueError("eval_recipe (held-out data recipe) is missing")
        raw["eval_recipe"] = str((base_dir / raw["eval_recipe"]).resolve())
        if raw.get("bench") is not None:
            bench = dict(raw["bench"])
            bknown = {f.name for f in dataclasses.fields(BenchSubset)}
            if set(bench) - bknown or "tasks" not in bench:
                raise ValueError(f"bench: expected {sorted(bknown)} with tasks, got {sorted(bench)}")
            for key in ("tasks", "tokenizer"):
                if bench.get(key):
                    bench[key] = str((base_dir / bench[key]).resolve())
            if bench.get("names") is not None:
                bench["names"] = tuple(bench["names"])
            raw["bench"] = BenchSubset(**bench)
        return cls(**raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def source_groups(eval_recipe: str, names: list[str], explicit: dict | None) -> dict[str, list[str]]:
    """Group -> its sources (explicit, else the eval recipe's first stage's top-level groups)."""
    from megasyne.data.recipe import load_recipe
    from megasyne.errors import ConfigError

    if explicit is not None:
        for group, sources in explicit.items():
            missing = sorted(set(sources) - set(names))
            if missing:
                raise ConfigError(f"evaluation.groups.{group}: {missing} are not sources of the "
                                  f"eval recipe (its sources: {names})")
        return {g: list(s) for g, s in explicit.items()}
    recipe = load_recipe(eval_recipe)
    return {node.name: [leaf for leaf, _ in node.leaves()]
            for node in recipe.stages[0].weights if node.children}


def perplexities(table, sources: list[str], groups: dict[str, list[str]]) -> dict:
    """{"loss", "ppl", "groups": {g: ppl}, "sources": {s: ppl}} from [source, (NLL, tokens)]."""
    def ppl(rows) -> float | None:
        nll, tokens = sum(table[i, 0] for i in rows), sum(table[i, 1] for i in rows)
        return math.exp(min(nll / tokens, 50)) if tokens > 0 else None

    index = {s: i for i, s in enumerate(sources)}
    loss = float(table[:, 0].sum() / table[:, 1].sum())
    return {"loss": loss, "ppl": math.exp(min(loss, 50)),
            "tokens": int(table[:, 1].sum()),
            "groups": {g: ppl([index[s] for s in members]) for g, members in groups.items()},
            "sources": {s: ppl([i]) for s, i in index.items()}}


def evaluate_checkpoint(checkpoint: Path, ev: Evaluation, *, masking: dict, work_dir: Path,
                        tokenizer: Path | None) -> tuple[dict, dict | None]:
    """(summary, full benchmark results or None) of one checkpoint."""
    import torch

    from megasyne.scorers import MegatronScorer
    from megasyne.training.batches import build_index_on_rank0
    from megasyne.training.documents import DocumentMasking, eod_token_id
    from megasyne.training.hooks.validation import Validator

    start = time.time()
    scorer = MegatronScorer.from_checkpoint(checkpoint, dtype=torch.float32,
                                            micro_batch_size=ev.micro_batch_size)
    try:
        eval_set = build_index_on_rank0(ev.eval_recipe, work_dir / "eval_index")
        doc_masking = DocumentMasking(**masking)
        validator = Validator(eval_set, samples=ev.eval_samples, micro_batch_size=ev.micro_batch_size,
                              vocab_size=scorer.vocab_size, masking=doc_masking,
                              eod_id=eod_token_id(eval_set, doc_masking, f"eval_recipe {ev.eval_recipe}"))
        table = validator.sums(scorer.chunks)
        if table is None:
            from megasyne.errors import ConfigError

            raise ConfigError(f"evaluation.eval_samples {ev.eval_samples} holds no micro-batch of "
                              f"{ev.micro_batch_size} (the eval recipe has {len(eval_set)} samples)")
        sources = list(eval_set.source_names)
        summary = {"checkpoint": str(checkpoint), "identity": scorer.identity,
                   "val": perplexities(table, sources, source_groups(ev.eval_recipe, sources, ev.groups))}
        bench = _bench(scorer, ev.bench, tokenizer) if ev.bench else None
        summary["bench"] = {name: t["score"] for name, t in bench["tasks"].items()} if bench else {}
    finally:
        scorer.close()
    summary["seconds"] = round(time.time() - start, 2)
    return summary, bench


def _bench(model, bench: BenchSubset, tokenizer: Path | None) -> dict:
    import transformers

    from megasyne.eval.lm import ModelScorer
    from megasyne.eval.runner import evaluate
    from megasyne.eval.tasks import EvalConfigError, load_task_file

    if tokenizer is None:
        raise EvalConfigError("evaluation.bench: no tokenizer: set evaluation.bench.tokenizer to an "
                              "HF tokenizer directory (the base checkpoint records none)")
    specs = load_task_file(bench.tasks)
    if bench.names:
        known = {s.name: s for s in specs}
        missing = [n for n in bench.names if n not in known]
        if missing:
            raise EvalConfigError(f"evaluation.bench.names: {missing} not in {bench.tasks} "
                                  f"(it has {list(known)})")
        specs = [known[n] for n in bench.names]
    if bench.max_items:
        specs = [dataclasses.replace(s, max_items=bench.max_items) for s in specs]
    scorer = ModelScorer(model, transformers.AutoTokenizer.from_pretrained(tokenizer),
                         max_length=bench.max_length or model.config.max_position_embeddings,
                         batch_size=bench.batch_size)
    return evaluate(scorer, specs, name=str(model.identity.get("path")), model=model.identity)


def bench_tokenizer(ev: Evaluation, base_checkpoint: str) -> Path | None:
    """The tokenizer directory of the benchmark subset: set, or recorded by convert_hf."""
    if ev.bench is None:
        return None
    if ev.bench.tokenizer:
        return Path(ev.bench.tokenizer)
    from megasyne.checkpoint.dist import read_manifest, resolve

    recorded = (read_manifest(resolve(base_checkpoint)).get("extra") or {}).get("hf_dir")
    return Path(recorded) if recorded else None


def run_entry(grid_path: str, entry: str) -> Path:
    """Evaluate one entry of a grid (``base`` or a cell name); returns its eval.json."""
    import yaml

    from megasyne.ablation.grid import BASE, GridError, base_documents, load_grid
    from megasyne.atomic import atomic_write_json
    from megasyne.eval.runner import write_results

    grid = load_grid(grid_path)
    base_config, _ = base_documents(grid)
    if entry == BASE:
        work_dir, checkpoint, config = grid.output / BASE, Path(base_config["init_checkpoint"]), base_config
    else:
        cells = {c.name: c for c in grid.cells()}
        if entry not in cells:
            raise GridError(f"{grid.path}: no cell {entry!r} (cells: {list(cells)})")
        cell = cells[entry]
        work_dir, checkpoint = cell.dir, cell.run_dir / "checkpoints"
        config = yaml.safe_load((cell.dir / "train.yaml").read_text(encoding="utf-8"))
    work_dir.mkdir(parents=True, exist_ok=True)
    summary, bench = evaluate_checkpoint(
        checkpoint, grid.evaluation, masking=config.get("document_masking") or {}, work_dir=work_dir,
        tokenizer=bench_tokenizer(grid.evaluation, base_config["init_checkpoint"]))
    summary["entry"] = entry
    if bench is not None:
        write_results(bench, work_dir / "bench.json")
    return atomic_write_json(work_dir / "eval.json", summary, indent=1, ensure_ascii=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate one entry of an ablation grid.")
    parser.add_argument("--grid", required=True)
    parser.add_argument("--entry", required=True, help="base, or a cell name")
    args = parser.parse_args(argv)
    import megasyne  # noqa: F401  (sets TRITON_INTERPRET on CPU before megatron imports)
    from megasyne.errors import MegasyneError, report

    try:
        print(f"wrote {run_entry(args.grid, args.entry)}")
    except MegasyneError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
