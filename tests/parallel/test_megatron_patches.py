"""megasyne.megatron_patches is the one place that changes Megatron-Core at run time, and its
registry says exactly what changes: no other module of the package assigns to a megatron
module or class, and applying every patch changes exactly the declared attributes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from megasyne import megatron_patches as mp
from tests.launch import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "parallel" / "patch_snapshot_worker.py"
PATCH_DIR = REPO_ROOT / "megasyne" / "megatron_patches"


def _megatron_names(tree: ast.AST) -> set[str]:
    """Names a module binds to megatron modules or objects: ``import megatron.x as y``,
    ``from megatron.x import y``, and any ``y = importlib.import_module(...)`` (its name may be
    computed)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "megatron":
                    names.add(a.asname or "megatron")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "attr", getattr(node.value.func, "id", "")) \
                == "import_module":
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def megatron_assignments(source: str) -> list[int]:
    """Line numbers where ``source`` assigns to, deletes from, or setattr()s on an attribute
    (or item) reached from a megatron module or object. In a module that imports megatron,
    every setattr/delattr on anything but ``self`` counts: its target is often a loop
    variable over megatron modules."""
    tree = ast.parse(source)
    bound = _megatron_names(tree)
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("setattr", "delattr") and node.args:
            if bound and _root(node.args[0]) != "self":
                lines.append(node.lineno)
            continue
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, (ast.Attribute, ast.Subscript)) and _root(el) in bound:
                    lines.append(node.lineno)
    return sorted(lines)


def test_the_scan_finds_every_form_of_patching():
    source = """
import importlib
import megatron.core.utils
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import layers
from megatron.core.models.gpt import GPTModel
mod = importlib.import_module("megatron.core.optimizer.clip_grads")
spec = make_spec()
spec.submodules.x = 1                       # a local object: not a patch
layers.fused = 1                            # 10
megatron.core.utils.helper = 2              # 11
GPTModel.forward = None                     # 12
setattr(ps, "_GROUP", None)                 # 13
mod.l2_norm_impl += 1                       # 14
vars(layers)["x"] = 1                       # through a call: beyond this scan
layers.__dict__["y"] = 1                    # 16
del ps._GROUP                               # 17
a, layers.z = 1, 2                          # 18
for module, name in ((layers, "a"), (ps, "b")):
    setattr(module, name, None)             # 20
for name in ("megatron.core.utils",):
    m = importlib.import_module(name)
    m.torch = None                          # 23
setattr(self, "x", 1)                       # an object's own attribute: not a patch
"""
    assert megatron_assignments(source) == [10, 11, 12, 13, 14, 16, 17, 18, 20, 23]
    assert megatron_assignments("setattr(obj, 'x', 1)\n") == []  # no megatron import


def test_no_module_outside_megatron_patches_changes_megatron():
    sources = [p for p in sorted((REPO_ROOT / "megasyne").rglob("*.py"))
               if PATCH_DIR not in p.parents]
    sources += [REPO_ROOT / "pretrain_syne.py", *sorted((REPO_ROOT / "kernels").glob("*.py")),
                *sorted((REPO_ROOT / "tools").glob("*.py"))]
    assert len(sources) > 50
    found = {str(p.relative_to(REPO_ROOT)): lines for p in sources
             if (lines := megatron_assignments(p.read_text()))}
    assert found == {}, "change Megatron-Core only in megasyne/megatron_patches/ (and declare it)"
    # ... and the patch modules themselves are seen by the scan (it is not vacuous):
    assert megatron_assignments((PATCH_DIR / "rope_slot.py").read_text())


def _snapshot(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(WORKER), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    changed = {tuple(x) for x in out["changed"]}
    declared = {t for p in mp.PATCHES for t in p.targets}
    return out, changed - declared, declared - changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims apply only without CUDA")
def test_applying_every_patch_changes_exactly_the_declared_attributes():
    out, undeclared, not_applied = _snapshot()
    assert out["results"]["cpu_shims"] is True and out["results"]["rope_slot"] is True
    assert out["results"]["writer_queue"] is True
    assert out["results"]["wgrad_accumulation"] is True and len(out["results"]["multi_tensor"]) == 3
    assert undeclared == set(), "a patch changed attributes it does not declare in PATCHES"
    assert not_applied == set(), "PATCHES declares attributes no patch changed"
    assert out["loggers"] == sorted({n for p in mp.PATCHES for n in p.loggers})
    assert out["new_modules"] == []  # every module a patch touches was loaded before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims apply only without CUDA")
def test_the_snapshot_catches_a_stray_change_and_a_missing_one():
    _, undeclared, not_applied = _snapshot("--inject")
    assert undeclared == {("megatron.core.utils", "_undeclared"),
                          ("megatron.core.models.common.language_module.language_module",
                           "LanguageModule._undeclared")}
    assert not_applied == {("megatron.core.models.common.embeddings.rope_utils",
                            "fused_apply_rotary_pos_emb")}


def test_the_registry_is_complete_and_checked_against_the_installed_megatron_core():
    names = [p.name for p in mp.PATCHES]
    assert len(set(names)) == len(names)
    targets = [t for p in mp.PATCHES for t in p.targets]
    assert len(set(targets)) == len(targets)  # one owner per attribute
    for p in mp.PATCHES:
        assert p.targets and p.active and p.why
        assert callable(getattr(mp, p.apply.split(",")[0])), p.apply
    # Bumping megatron-core (requirements-ci.txt) fails here until each patch is re-checked.
    assert {p.checked_against for p in mp.PATCHES} == {metadata.version("megatron-core")}


def test_another_megatron_core_version_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9")
    mp._check_version.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="megasyne.megatron_patches"):
            mp.apply_multi_tensor_fallbacks()
            mp.apply_multi_tensor_fallbacks()
    finally:
        mp._check_version.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.name == "megasyne.megatron_patches"]
    assert len(warnings) == 1 and "megatron-core 9.9.9 is installed" in warnings[0]
    assert "'cpu_shims'" in warnings[0] and "checked against 0.16.1" in warnings[0]
