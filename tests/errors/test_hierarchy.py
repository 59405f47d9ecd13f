"""Every error class of the package is a MegasyneError of the right kind, and every command-line
face reports a MegasyneError the same way (one line ``error: ...``, exit status 2)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

import megasyne
from megasyne.errors import (
    EXIT_ERROR,
    CheckpointError,
    ConfigError,
    ConversionError,
    DataError,
    EvalError,
    MegasyneError,
    RecipeToolError,
    TrainingError,
    one_line,
    report,
)
from tests.launch import REPO_ROOT

# Exception classes allowed outside the hierarchy (none).
NOT_YET: set = set()


def _exception_classes():
    """(qualified name, class) of every exception class defined in a megasyne module."""
    found = {}
    for info in pkgutil.walk_packages(megasyne.__path__, prefix="megasyne."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) \
                    and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_error_class_of_the_package_is_a_megasyne_error():
    classes = _exception_classes()
    assert len(classes) > 25  # the walk reached the subpackages (data, syne.synth, ...)
    outside = sorted(n for n, c in classes.items() if not issubclass(c, MegasyneError))
    assert outside == sorted(NOT_YET), "derive these from a kind in megasyne/errors.py"


@pytest.mark.parametrize("module, name, kind, std", [
    ("megasyne.training.config", "ConfigError", MegasyneError, ValueError),
    ("megasyne.parallel.dims", "ParallelConfigError", ConfigError, ValueError),
    ("megasyne.model.config", "ModelConfigError", ConfigError, ValueError),
    ("megasyne.syne.topic_mixture", "AdaptiveMixtureError", ConfigError, ValueError),
    ("megasyne.data.recipe", "RecipeError", DataError, ValueError),
    ("megasyne.data.indexed_dataset", "IndexedDatasetError", DataError, ValueError),
    ("megasyne.data.metadata", "MetadataError", DataError, ValueError),
    ("megasyne.data.tokenizers", "TokenizerError", DataError, ValueError),
    ("megasyne.data.preprocess", "PreprocessError", DataError, RuntimeError),
    ("megasyne.data.mixture", "IndexBuildError", DataError, RuntimeError),
    ("megasyne.data.dataset", "IndexMismatchError", DataError, RuntimeError),
    ("megasyne.data.overlay", "OverlayError", DataError, RuntimeError),
    ("megasyne.checkpoint.dist", "CheckpointError", MegasyneError, RuntimeError),
    ("megasyne.checkpoint.hf", "HFConversionError", ConversionError, ValueError),
    ("megasyne.eval.tasks", "EvalConfigError", EvalError, ValueError),
    ("megasyne.eval.benchmark_files", "EvalDataError", EvalError, ValueError),
    ("megasyne.syne.ppl", "ScoreError", RecipeToolError, ValueError),
    ("megasyne.syne.topics", "TopicError", RecipeToolError, ValueError),
    ("megasyne.syne.blocks", "BlockStateError", RecipeToolError, RuntimeError),
    ("megasyne.syne.synth.pipeline", "SynthError", RecipeToolError, ValueError),
    ("megasyne.syne.synth.templates", "TemplateError", RecipeToolError, ValueError),
    ("megasyne.training.trainer", "TrainingAborted", TrainingError, RuntimeError),
    ("megasyne.training.run_lock", "RunDirBusy", ConfigError, ValueError),
    ("megasyne.training.metrics", "MetricsError", DataError, ValueError),
    ("megasyne.training.data_state", "DataIdentityError", ConfigError, ValueError),
    ("megasyne.ablation.grid", "GridError", ConfigError, ValueError),
    ("megasyne.ablation.runner", "CellFailed", TrainingError, RuntimeError),
])
def test_each_error_has_its_kind_and_keeps_its_standard_base(module, name, kind, std):
    cls = getattr(importlib.import_module(module), name)
    # std: callers written before the hierarchy (`except ValueError`) still catch it
    assert issubclass(cls, kind) and issubclass(cls, std)


def test_the_historic_names_are_the_kinds_themselves():
    from megasyne.checkpoint import dist
    from megasyne.training import config

    assert config.ConfigError is ConfigError and dist.CheckpointError is CheckpointError


def test_report_prints_one_line_and_returns_2(capsys):
    exc = ConfigError("x.yaml: invalid YAML: while parsing\n  in line 2\n\n    ^\n")
    assert one_line(exc) == "x.yaml: invalid YAML: while parsing in line 2 ^"
    assert report(exc) == EXIT_ERROR == 2
    assert capsys.readouterr().err == "error: x.yaml: invalid YAML: while parsing in line 2 ^\n"
    assert report(exc, show=False) == 2 and capsys.readouterr().err == ""


def _faces():
    return [REPO_ROOT / "pretrain_syne.py", *sorted((REPO_ROOT / "tools").glob("*.py"))]


@pytest.mark.parametrize("path", _faces(), ids=lambda p: p.name)
def test_every_face_reports_megasyne_errors_through_errors_report(path):
    """A new tool that forgets the convention fails here; the behaviour of each face on bad
    input is tested beside its other tests (tests/*/test_*: "error: " and exit status 2)."""
    tree = ast.parse(path.read_text())
    handlers = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler)
                and isinstance(h.type, ast.Name) and h.type.id == "MegasyneError"]
    assert len(handlers) == 1, f"{path.name}: catch MegasyneError exactly once"
    calls = [c for c in ast.walk(handlers[0]) if isinstance(c, ast.Call)
             and isinstance(c.func, ast.Name) and c.func.id == "report"]
    assert calls, f"{path.name}: report the error with megasyne.errors.report"
    assert "SystemExit(" not in path.read_text(), f"{path.name}: raise a MegasyneError instead"
