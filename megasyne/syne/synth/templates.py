"""Discipline prompt templates for synthetic QA (the file format is documented in
``examples/syne/disciplines.yaml``)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from megasyne.errors import RecipeToolError

PLACEHOLDERS = ("discipline", "guidance", "content")
KINDS = ("qa", "code")
"""qa: a problem and a worked solution; code: a programming problem and a solution with its
Python code in a fenced block (parsed and checked to compile)."""
ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_LIMITS = ("min_problem_chars", "max_problem_chars", "min_solution_chars", "max_solution_chars")


class TemplateError(RecipeToolError, ValueError):
    """A bad disciplines file (the message names the file and the field path)."""


@dataclass(kw_only=True, frozen=True)
class Prompt:
    """The chat prompt of one language."""

    system: str
    user: str
    response_prefix: str = ""


@dataclass(kw_only=True, frozen=True)
class Discipline:
    """One discipline: its prompts (per language), page routing and answer limits."""

    id: str
    name: str
    guidance: str
    prompts: dict[str, Prompt]
    topics: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    kind: str = "qa"
    """One of KINDS."""
    min_problem_chars: int = 30
    max_problem_chars: int = 2000
    min_solution_chars: int = 40
    max_solution_chars: int = 6000

    def messages(self, content: str, lang: str) -> tuple[list[dict], str]:
        """(chat messages, response prefix) for a seed snippet in ``lang``."""
        if lang not in self.prompts:
            raise TemplateError(f"discipline {self.id!r} has no prompt for language {lang!r} "
                                f"(has {sorted(self.prompts)})")
        p = self.prompts[lang]
        fill = dict(discipline=self.name, guidance=self.guidance, content=content.strip())
        return ([{"role": "system", "content": p.system.format(**fill)},
                 {"role": "user", "content": p.user.format(**fill)}], p.response_prefix)


@dataclass(kw_only=True, frozen=True)
class Disciplines:
    """All disciplines of a file, in file order."""

    path: str
    sha256: str
    items: dict[str, Discipline] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Discipline:
        if key not in self.items:
            raise TemplateError(f"{self.path}: no discipline {key!r} (has {list(self.items)})")
        return self.items[key]

    def route(self, *, discipline: str | None = None, topic: str | None = None,
              text: str = "") -> str | None:
        """The discipline of a seed page: its own label, else its topic (keywords break ties)."""
        if discipline:
            return discipline if discipline in self.items else None
        if not topic:
            return None
        candidates = [d for d in self.items.values() if topic in d.topics]
        if not candidates:
            return None
        low = text.lower()
        scores = [sum(low.count(k.lower()) for k in d.keywords) for d in candidates]
        return candidates[scores.index(max(scores))].id


def _check_template(text: str, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TemplateError(f"{where}: expected a non-empty string")
    for name in re.findall(r"(?<!\{)\{([^{}]*)\}(?!\})", text):
        if name not in PLACEHOLDERS:
            raise TemplateError(f"{where}: unknown placeholder {{{name}}} (allowed: "
                                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}; write {{{{ }}}} "
                                "for a literal brace)")
    return text


def _prompts(raw, where: str) -> dict[str, Prompt]:
    if not isinstance(raw, dict) or not raw:
        raise TemplateError(f"{where}: expected a mapping language -> {{system, user}}")
    out = {}
    for lang, p in raw.items():
        w = f"{where}.{lang}"
        if not isinstance(p, dict):
            raise TemplateError(f"{w}: expected a mapping with system and user")
        user = _check_template(p.get("user"), f"{w}.user")
        if "{content}" not in user:
            raise TemplateError(f"{w}.user: must contain {{content}} (the seed snippet)")
        out[str(lang)] = Prompt(system=_check_template(p.get("system"), f"{w}.system"), user=user,
                                response_prefix=str(p.get("response_prefix") or ""))
    return out


def load_disciplines(path: str | Path) -> Disciplines:
    """Read and validate a disciplines YAML file."""
    import yaml

    path = str(path)
    try:
        data = Path(path).read_bytes()
        raw = yaml.safe_load(data)
    except FileNotFoundError:
        raise TemplateError(f"{path}: no such disciplines file") from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("disciplines"), list):
        raise TemplateError(f"{path}: expected a mapping with a 'disciplines' list")
    defaults = raw.get("defaults") or {}
    base_prompts = _prompts(defaults["prompts"], f"{path}: defaults.prompts") \
        if "prompts" in defaults else {}
    items = {}
    for i, d in enumerate(raw["disciplines"]):
        where = f"{path}: disciplines[{i}]"
        if not isinstance(d, dict):
            raise TemplateError(f"{where}: expected a mapping")
        did = d.get("id")
        if not isinstance(did, str) or not ID_RE.match(did):
            raise TemplateError(f"{where}.id: {did!r} must match {ID_RE.pattern}")
        if did in items:
            raise TemplateError(f"{where}.id: duplicate discipline {did!r}")
        prompts = dict(base_prompts)
        if "prompts" in d:
            prompts.update(_prompts(d["prompts"], f"{where}.prompts"))
        if not prompts:
            raise TemplateError(f"{where}: no prompts (give defaults.prompts or prompts)")
        limits = {}
        for k in _LIMITS:
            v = d.get(k, defaults.get(k))
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise TemplateError(f"{where}.{k}: expected an integer >= 0, got {v!r}")
                limits[k] = v
        name = d.get("name")
        if not isinstance(name, str) or not name.strip():
            raise TemplateError(f"{where}.name: expected a non-empty string")
        kind = d.get("kind", defaults.get("kind", "qa"))
        if kind not in KINDS:
            raise TemplateError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}")
        items[did] = Discipline(id=did, name=name, guidance=str(d.get("guidance") or ""),
                                prompts=prompts, topics=tuple(map(str, d.get("topics") or ())),
                                keywords=tuple(map(str, d.get("keywords") or ())), kind=kind,
                                **limits)
    if not items:
        raise TemplateError(f"{path}: no disciplines")
    return Disciplines(path=path, sha256=hashlib.sha256(data).hexdigest(), items=items)


__all__ = ["KINDS", "Discipline", "Disciplines", "Prompt", "TemplateError", "load_disciplines"]
