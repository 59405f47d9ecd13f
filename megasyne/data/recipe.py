"""The data recipe: which sources a run reads, in which order, in which proportion, per stage.

A recipe YAML (``examples/recipes/*.yaml``)::

    seq_length: 8192            # tokens per sample (each sample holds seq_length + 1 tokens)
    seed: 1234                  # seeds every shuffle (with the source name and epoch)
    on_exhaustion: fail         # or new_epoch: a source that runs out starts a new epoch
    sources:
      zh_web: {prefix: ../../data/zh_web, order: "ascending:ppl"}   # PPL curriculum
      en_book: ../../data/en_book          # shorthand: prefix, order shuffle
    stages:
      - name: bilingual
        tokens: 92.5B           # or samples: N; tokens -> ceil(tokens / seq_length) samples
        weights:                # hierarchical; each level is normalised, then multiplied out
          zh: {weight: 2, children: {zh_web: 0.7, zh_book: 0.3}}
          en: {weight: 8, children: {en_book: 1}}
        lr: 1.0e-5              # any other key is kept untouched in StageConfig.extra

``order``: ``shuffle`` (Megatron's behaviour: documents shuffled per epoch by seed, samples
shuffled too), ``sequential`` (document order as written), ``ascending:<metric>`` /
``descending:<metric>`` (stable sort on a metadata sidecar field, ties in document order; see
megasyne.data.metadata). Ordered sources are never shuffled anywhere downstream.

Relative prefixes are resolved against the recipe file's directory. Every validation error names
the field path, e.g. ``stages[1].weights.zh.web: weight must be > 0``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megasyne.errors import DataError

ORDER_KINDS = ("shuffle", "sequential", "ascending", "descending")
EXHAUSTION_POLICIES = ("fail", "new_epoch")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")  # names become file names
_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_TOP_KEYS = ("seq_length", "seed", "on_exhaustion", "sources", "stages")


class RecipeError(DataError, ValueError):
    """A recipe value is invalid; ``path`` is the field path (``stages[1].weights.zh``)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}" if path else reason)

    def under(self, prefix: str) -> RecipeError:
        """The same error seen from the enclosing field ``prefix``."""
        if not self.path:
            return RecipeError(prefix, self.reason)
        sep = "" if self.path.startswith("[") else "."
        return RecipeError(f"{prefix}{sep}{self.path}", self.reason)


def _count(value: Any, path: str) -> int:
    """A positive count: int, integral float, or a string like ``92.5B`` / ``1_000``."""
    raw = value
    if isinstance(value, str):
        s = value.strip().replace("_", "").replace(",", "")
        mult = _SUFFIXES.get(s[-1:].upper(), 1)
        if mult != 1:
            s = s[:-1]
        try:
            value = float(s) * mult if ("." in s or "e" in s.lower()) else int(s) * mult
        except ValueError:
            raise RecipeError(path, f"expected a count such as 8192 or 92.5B, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(path, f"expected a count, got {type(raw).__name__} {raw!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != round(value):
            raise RecipeError(path, f"expected a whole number, got {raw!r}")
        value = int(round(value))
    if value <= 0:
        raise RecipeError(path, f"must be > 0, got {raw!r}")
    return value


def _check_name(name: Any, path: str, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RecipeError(path, f"{what} name {name!r} must match {NAME_RE.pattern}")


@dataclass(kw_only=True, frozen=True)
class SourceConfig:
    """One source: a Megatron ``.bin``/``.idx`` dataset and the order its documents are read in."""

    name: str
    """Source name; used in file names of the index (``doc_order_<name>.npy``) and in logs."""
    prefix: str
    """Dataset prefix (``<prefix>.bin``/``.idx``), absolute once loaded from a file."""
    order: str = "shuffle"
    """``shuffle`` | ``sequential`` | ``ascending:<metric>`` | ``descending:<metric>``."""
    where: tuple = ()
    """Document filter on sidecar fields, ``((field, (value, ...)), ...)``: the source reads
    only the documents whose field takes one of the values (e.g. one topic of a web corpus:
    ``where: {topic: 3}``, or ``{topic: [3, 5]}``; categorical fields match their strings)."""

    def __post_init__(self) -> None:
        _check_name(self.name, "", "source")
        for item in self.where:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], tuple)
                    and item[1]):
                raise RecipeError("where", f"expected field -> value(s), got {item!r}")
            if not isinstance(item[0], str) or not NAME_RE.match(item[0]):
                raise RecipeError("where", f"field name {item[0]!r} must match {NAME_RE.pattern}")
            for v in item[1]:
                if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    raise RecipeError(f"where.{item[0]}", f"values must be numbers or strings, "
                                                          f"got {v!r}")
        if not isinstance(self.prefix, str) or not self.prefix:
            raise RecipeError("prefix", f"expected a dataset prefix path, got {self.prefix!r}")
        kind, _, metric = self.order.partition(":") if isinstance(self.order, str) else ("", "", "")
        if kind not in ORDER_KINDS:
            raise RecipeError("order", f"must be one of shuffle, sequential, ascending:<metric>, "
                                       f"descending:<metric>; got {self.order!r}")
        if kind in ("ascending", "descending") and not metric:
            raise RecipeError("order", f"{kind} needs a metric field, e.g. '{kind}:ppl'")
        if kind in ("shuffle", "sequential") and metric:
            raise RecipeError("order", f"{kind} takes no metric, got {self.order!r}")

    @property
    def kind(self) -> str:
        """``shuffle`` | ``sequential`` | ``ascending`` | ``descending``."""
        return self.order.partition(":")[0]

    @property
    def metric(self) -> str | None:
        """The metadata field an ordered source sorts on, else None."""
        return self.order.partition(":")[2] or None

    @property
    def shuffled(self) -> bool:
        return self.kind == "shuffle"


@dataclass(kw_only=True, frozen=True)
class WeightNode:
    """A node of a stage's weight tree: a leaf (a source) or a group with children."""

    name: str
    weight: float
    """Relative weight among its siblings (siblings are normalised to sum to 1)."""
    children: tuple[WeightNode, ...] = ()

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise RecipeError("", f"weight must be a finite number, got {w!r}")
        if w <= 0:
            raise RecipeError("", f"weight must be > 0, got {w!r} (leave a source out of a "
                                  "stage to give it no samples)")

    def leaves(self, scale: float = 1.0):
        """Yield (source name, absolute weight) under this node, ``scale`` being its own share."""
        if not self.children:
            yield self.name, scale
            return
        total = math.fsum(c.weight for c in self.children)
        for c in self.children:
            yield from c.leaves(scale * (c.weight / total))

    def to_dict(self) -> Any:
        if not self.children:
            return self.weight
        return {"weight": self.weight, "children": {c.name: c.to_dict() for c in self.children}}


def _parse_weights(raw: Any, path: str, sources: dict[str, SourceConfig]) -> tuple[WeightNode, ...]:
    if not isinstance(raw, dict) or not raw:
        raise RecipeError(path, "expected a non-empty mapping of source or group -> weight")
    nodes = []
    for name, spec in raw.items():
        sub = f"{path}.{name}"
        children: tuple[WeightNode, ...] = ()
        if isinstance(spec, dict):
            unknown = set(spec) - {"weight", "children"}
            if unknown:
                raise RecipeError(sub, f"unknown keys {sorted(unknown)}; a group is "
                                       "{weight: w, children: {...}}")
            if "weight" not in spec:
                raise RecipeError(sub, "a group needs 'weight'")
            weight = spec["weight"]
            if "children" in spec:
                if name in sources:
                    raise RecipeError(sub, f"{name!r} is a source, so it cannot have children")
                children = _parse_weights(spec["children"], sub, sources)
        else:
            weight = spec
        if not children and name not in sources:
            raise RecipeError(sub, f"unknown source {name!r} (sources: {sorted(sources)})")
        try:
            nodes.append(WeightNode(name=str(name), weight=weight, children=children))
        except RecipeError as exc:
            raise exc.under(sub) from None
    return tuple(nodes)


@dataclass(kw_only=True, frozen=True)
class StageConfig:
    """One training stage: its length and its (possibly hierarchical) source weights."""

    name: str
    tokens: int | None = None
    """Stage length in tokens; converted to ceil(tokens / seq_length) samples."""
    samples: int | None = None
    """Stage length in samples (give exactly one of tokens / samples)."""
    weights: tuple[WeightNode, ...]
    """Top level of the weight tree; every leaf is a source."""
    extra: dict = field(default_factory=dict)
    """Other keys of the stage (lr, schedule hints, ...), untouched, for the trainer."""

    def __post_init__(self) -> None:
        _check_name(self.name, "name", "stage")
        if (self.tokens is None) == (self.samples is None):
            raise RecipeError("", "give exactly one of 'tokens' or 'samples'")
        seen: set[str] = set()
        for leaf, _ in self.leaf_items():
            if leaf in seen:
                raise RecipeError("weights", f"source {leaf!r} appears twice in the weight tree")
            seen.add(leaf)

    def leaf_items(self) -> list[tuple[str, float]]:
        root = WeightNode(name="<root>", weight=1.0, children=self.weights)
        return list(root.leaves())

    def num_samples(self, seq_length: int) -> int:
        return self.samples if self.samples is not None else -(-self.tokens // seq_length)

    def leaf_weights(self, source_names: list[str]) -> list[float]:
        """Normalised weight of every source, in ``source_names`` order (0 if not in the stage)."""
        d = dict(self.leaf_items())
        return [d.get(n, 0.0) for n in source_names]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name}
        out["tokens" if self.tokens is not None else "samples"] = (
            self.tokens if self.tokens is not None else self.samples)
        out["weights"] = {n.name: n.to_dict() for n in self.weights}
        out.update(self.extra)
        return out


@dataclass(kw_only=True, frozen=True)
class Recipe:
    """A whole run's data: sources, their orders, and the stages blended in sequence."""

    seq_length: int
    """Tokens per sample; a sample holds seq_length + 1 tokens (inputs + shifted labels)."""
    seed: int = 1234
    """Seeds every shuffle, together with the source name and the epoch."""
    on_exhaustion: str = "fail"
    """``fail``: a source that runs out stops the build with a clear error; ``new_epoch``: it
    starts another epoch (reshuffled for shuffle sources, the same order for ordered ones)."""
    sources: dict[str, SourceConfig]
    """Sources by name; their order here fixes the source ids (0, 1, ...)."""
    stages: tuple[StageConfig, ...]
    """Stages in training order; per-source cursors carry from one to the next."""
    path: str | None = field(default=None, compare=False)
    """The YAML file this came from, if any (not part of the recipe's identity)."""

    def __post_init__(self) -> None:
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, int) \
                or self.seq_length < 1:
            raise RecipeError("seq_length", f"must be an int >= 1, got {self.seq_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError("seed", f"must be an int >= 0, got {self.seed!r}")
        if self.on_exhaustion not in EXHAUSTION_POLICIES:
            raise RecipeError("on_exhaustion", f"must be one of {list(EXHAUSTION_POLICIES)}, "
                                               f"got {self.on_exhaustion!r}")
        if not self.sources:
            raise RecipeError("sources", "at least one source is needed")
        if len(self.sources) > 32767:
            raise RecipeError("sources", "at most 32767 sources (int16 source ids)")
        if not self.stages:
            raise RecipeError("stages", "at least one stage is needed")
        names = [s.name for s in self.stages]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise RecipeError(f"stages[{i}].name", f"duplicate stage name {n!r}")

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    def stage_num_samples(self) -> list[int]:
        return [s.num_samples(self.seq_length) for s in self.stages]

    @property
    def num_samples(self) -> int:
        return sum(self.stage_num_samples())

    def to_dict(self) -> dict:
        """Canonical, resolved form (absolute prefixes); ``Recipe.from_dict`` round-trips it."""
        return {
            "seq_length": self.seq_length, "seed": self.seed, "on_exhaustion": self.on_exhaustion,
            "sources": {n: {"prefix": s.prefix, "order": s.order,
                            **({"where": {f: list(v) for f, v in s.where}} if s.where else {})}
                        for n, s in self.sources.items()},
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, raw: Any, base_dir: str | os.PathLike | None = None,
                  path: str | None = None) -> Recipe:
        """Validate a parsed YAML mapping; relative prefixes resolve against ``base_dir``."""
        if not isinstance(raw, dict):
            raise RecipeError("", f"a recipe is a mapping, got {type(raw).__name__}")
        unknown = set(raw) - set(_TOP_KEYS)
        if unknown:
            raise RecipeError(sorted(unknown)[0], f"unknown recipe key (known: {list(_TOP_KEYS)})")
        for key in ("seq_length", "sources", "stages"):
            if key not in raw:
                raise RecipeError(key, "missing")
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        seq_length = raw["seq_length"]
        if isinstance(seq_length, str):
            seq_length = _count(seq_length, "seq_length")
        sources = _parse_sources(raw["sources"], base)
        stages_raw = raw["stages"]
        if not isinstance(stages_raw, list):
            raise RecipeError("stages", "expected a list of stages")
        stages = []
        for i, st in enumerate(stages_raw):
            try:
                stages.append(_parse_stage(st, sources))
            except RecipeError as exc:
                raise exc.under(f"stages[{i}]") from None
        return cls(seq_length=seq_length, seed=raw.get("seed", 1234),
                   on_exhaustion=raw.get("on_exhaustion", "fail"), sources=sources,
                   stages=tuple(stages), path=path)


def _parse_sources(raw: Any, base: Path) -> dict[str, SourceConfig]:
    if not isinstance(raw, dict) or not raw:
        raise RecipeError("sources", "expected a non-empty mapping of name -> prefix or "
                                     "{prefix, order}")
    out = {}
    for name, spec in raw.items():
        path = f"sources.{name}"
        _check_name(name, path, "source")
        if isinstance(spec, str):
            spec = {"prefix": spec}
        if not isinstance(spec, dict):
            raise RecipeError(path, "expected a prefix string or {prefix, order}")
        unknown = set(spec) - {"prefix", "order", "where"}
        if unknown:
            raise RecipeError(f"{path}.{sorted(unknown)[0]}",
                              "unknown key (known: prefix, order, where)")
        where = spec.get("where") or {}
        if not isinstance(where, dict):
            raise RecipeError(f"{path}.where", "expected a mapping field -> value or [values]")
        where = tuple((str(f), tuple(v) if isinstance(v, (list, tuple)) else (v,))
                      for f, v in sorted(where.items()))
        if "prefix" not in spec:
            raise RecipeError(f"{path}.prefix", "missing")
        prefix = spec["prefix"]
        if isinstance(prefix, str) and prefix:
            prefix = os.path.normpath(os.path.join(base, os.path.expanduser(prefix)))
        try:
            out[name] = SourceConfig(name=name, prefix=prefix, order=spec.get("order", "shuffle"),
                                     where=where)
        except RecipeError as exc:
            raise exc.under(path) from None
    return out


def _parse_stage(raw: Any, sources: dict[str, SourceConfig]) -> StageConfig:
    if not isinstance(raw, dict):
        raise RecipeError("", "a stage is a mapping with name, tokens|samples and weights")
    for key in ("name", "weights"):
        if key not in raw:
            raise RecipeError(key, "missing")
    tokens = _count(raw["tokens"], "tokens") if "tokens" in raw else None
    samples = _count(raw["samples"], "samples") if "samples" in raw else None
    weights = _parse_weights(raw["weights"], "weights", sources)
    extra = {k: v for k, v in raw.items() if k not in ("name", "tokens", "samples", "weights")}
    return StageConfig(name=raw["name"], tokens=tokens, samples=samples, weights=weights,
                       extra=extra)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe YAML; relative prefixes resolve against its directory."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError("", f"recipe file not found: {p}")
    with open(p, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise RecipeError("", f"{p}: not valid YAML: {exc}") from None
    try:
        return Recipe.from_dict(raw, base_dir=p.resolve().parent, path=str(p))
    except RecipeError as exc:
        raise RecipeError(exc.path, f"{exc.reason} (in {p})") from None


__all__ = ["Recipe", "RecipeError", "SourceConfig", "StageConfig", "WeightNode", "load_recipe"]
