"""Where the converters write: checked before anything is written, published atomically.

An output is written whole under ``.<name>.partial`` beside it, then published:

- a new (or empty) output directory is the partial directory renamed;
- into an existing one (``--overwrite``) go only the converter's own entries: entries of the
  same name are replaced, stale ones the converter owns (e.g. the shards of an earlier conversion
  cut into more shards) are removed, and every other file of the directory is kept. The entry a
  loader reads first (the *marker*: ``model.safetensors.index.json`` of an HF directory,
  ``latest`` of a megasyne checkpoint root) is removed first and moved in last, so an interruption
  leaves a directory without it (loading fails loudly) rather than a mix of two models.

An output that is, contains or lies inside one of the inputs is refused: the converter would write
into its own input, and with ``--overwrite`` replace it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from megasyne.checkpoint.hf import HFConversionError

HF_MARKER = "model.safetensors.index.json"
CHECKPOINT_MARKER = "latest"
# What an HF model directory's weights and configs are called: replaced as a whole (a stale
# model.safetensors would even be loaded by transformers before the new index).
_HF_OWNED = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
                       r"|(model\.safetensors|pytorch_model\.bin)\.index\.json"
                       r"|config\.json|generation_config\.json")


def owned_by_hf_export(name: str) -> bool:
    return _HF_OWNED.fullmatch(name) is not None


def owned_by_checkpoint_export(name: str) -> bool:
    return name in ("iter_0000000", CHECKPOINT_MARKER)  # what a conversion (iteration 0) writes


def check_output(output, overwrite: bool, inputs=()) -> None:
    """Refuse an output that overlaps an input, is a file, or exists without ``overwrite``."""
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        relation = ("is" if out == src else "is inside" if src in out.parents
                    else "contains" if out in src.parents else None)
        if relation:
            raise HFConversionError(
                f"--output {out} {relation} the input {src}: a converter must not write into "
                f"its own input (with --overwrite it would replace it); choose an --output "
                f"outside {src}")
    if out.exists() and not out.is_dir():
        raise HFConversionError(f"{out} exists and is not a directory: remove it or choose "
                                f"another --output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFConversionError(f"{out} already exists and is not empty "
                                f"(choose another --output or pass --overwrite)")


def partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def publish(partial: Path, output: Path, *, marker: str, owns) -> None:
    """Move the finished ``partial`` directory to ``output`` (see the module docstring)."""
    if not output.exists() or not any(output.iterdir()):
        os.replace(partial, output)  # rename(2) replaces an empty directory
        return
    trash = output.parent / f".{output.name}.replaced"  # old entries, deleted at the end
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    new = {p.name for p in partial.iterdir()}
    if (output / marker).exists():
        os.replace(output / marker, trash / marker)
    for name in sorted(new - {marker}):
        if (output / name).exists() or (output / name).is_symlink():
            os.replace(output / name, trash / name)  # a directory cannot be renamed over
        os.replace(partial / name, output / name)
    for p in output.iterdir():
        if p.name not in new and owns(p.name):
            os.replace(p, trash / p.name)
    if marker in new:
        os.replace(partial / marker, output / marker)
    partial.rmdir()
    shutil.rmtree(trash)
