"""The errors megasyne raises for conditions a user can fix, and how the command lines report them.

Every such error derives from ``MegasyneError`` through one of a few kinds, named after what
the user has to fix:

- ``ConfigError``: a run config, a model or parallel layout, a command-line option, a task or
  template file that cannot work (also a ``ValueError``, as it always was).
- ``DataError``: a recipe, a ``.bin``/``.idx`` dataset, its metadata sidecar, a tokenizer, the
  input of preprocessing, a mixture index that cannot be built or no longer matches its data.
- ``CheckpointError``: a checkpoint that is missing, incomplete, of another model, or that the
  run cannot resume from (also a ``RuntimeError``, as it always was).
- ``ConversionError``: a Hugging Face directory (or a model to fetch) that cannot be converted.
- ``EvalError``: a benchmark task specification or benchmark file.
- ``RecipeToolError``: the SynE recipe tools (perplexity scoring, topic labelling, synthetic
  QA): their inputs, state directories and resumes.
- ``TrainingError``: training itself cannot go on (e.g. too many non-finite steps in a row).

The concrete classes live next to the code that raises them (``RecipeError`` in
``megasyne.data.recipe``, ``HFConversionError`` in ``megasyne.checkpoint.hf``, ...) and keep
the standard base they had (``ValueError`` / ``RuntimeError``), so ``except ValueError`` callers
keep working. A bug (``TypeError``, ``KeyError``, an assertion) is never a ``MegasyneError``:
it keeps its traceback.

Every command-line face (``pretrain_syne.py``, ``tools/*.py``) catches ``MegasyneError`` once and
reports it with ``report()``: one line ``error: <message>`` on stderr, exit status ``EXIT_ERROR``.
"""

from __future__ import annotations

import sys

EXIT_ERROR = 2  # the exit status of every command line on a MegasyneError (argparse's too)


class MegasyneError(Exception):
    """A condition the user can fix; the message names the file, field or option and what to do."""


class ConfigError(MegasyneError, ValueError):
    """A configuration that cannot work (run config, layout, model, option); names the key."""


class DataError(MegasyneError):
    """Input data that cannot be used: recipe, dataset, metadata, tokenizer, mixture index."""


class CheckpointError(MegasyneError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run; names the path."""


class ConversionError(MegasyneError):
    """A model that cannot be converted between Hugging Face and megasyne; names file and field."""


class EvalError(MegasyneError):
    """A benchmark task specification or benchmark file that cannot be used."""


class RecipeToolError(MegasyneError):
    """Bad input, state or resume of a SynE recipe tool (scoring, topics, synthesis)."""


class TrainingError(MegasyneError):
    """Training cannot go on (the message says why and from which step)."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a YAML parser's message, for one, spans several)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) \
        or type(exc).__name__


def report(exc: MegasyneError, *, show: bool = True, file=None) -> int:
    """Print ``error: <message>`` (when ``show``) and return the exit status for it."""
    if show:
        print(f"error: {one_line(exc)}", file=file or sys.stderr, flush=True)
    return EXIT_ERROR


__all__ = ["EXIT_ERROR", "CheckpointError", "ConfigError", "ConversionError", "DataError",
           "EvalError", "MegasyneError", "RecipeToolError", "TrainingError", "one_line", "report"]
