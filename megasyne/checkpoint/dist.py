"""megasyne checkpoints: Megatron-Core distributed (sharded) checkpoints + a JSON manifest.

Layout of a checkpoint root (a run's ``checkpoints/`` or a converted model)::

    <root>/iter_0000100/          one complete checkpoint
        dist/                     megatron.core.dist_checkpointing (torch_dist) files:
                                  model weights as global tensors, optimizer state if saved
        megasyne.json             manifest: format, iteration, model config, the layout it
                                  was saved from, whether optimizer state is inside, extras
                                  (schedule, data identity and cursors, hooks' state), and
                                  every file's size and xxh3_64 checksum
    <root>/latest                 text: the name of the newest complete checkpoint

Atomic: every rank writes into ``iter_XXXXXXX.tmp/``; after a barrier rank 0 renames it to
``iter_XXXXXXX`` and only then rewrites ``latest`` (temp file + rename). A crash mid-save
leaves only a ``.tmp`` directory, which loaders never look at and the next save removes; a save
that fails (e.g. the disk fills: torch then reports "inline_container.cc:672 unexpected pos")
removes it at once and raises a CheckpointError saying so, ``latest`` still naming the previous
checkpoint.
Integrity: the checksums are computed (each file by one rank) before the rename and checked
before every load (``megasyne.checkpoint.integrity``); a damaged checkpoint is named with its
files, and a run's resume falls back to the previous complete one (:func:`resume_candidates`).
Because the weights are stored as global tensors with their sharding metadata, a
checkpoint saved at one TP/PP/DP layout loads at any other.
Asynchronous saves (``megasyne.checkpoint.async_save``, the trainer's ``async_save``) write
the same directory in the background from a snapshot of the state at the save's step, and
publish it with the same :func:`publish` (checksums, manifest, rename, ``latest``) once every
rank's write is done; until then ``latest`` names the previous checkpoint, so a crash while a
write is pending loses only that checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megasyne import megatron_patches
from megasyne.atomic import atomic_write_text
from megasyne.checkpoint.dist_opt_layout import (
    STATE_LAYOUT,
    STATE_LAYOUT_KEY,
    check_optimizer_state_layout,
)
from megasyne.checkpoint.integrity import digest_checkpoint, verify_checkpoint_files
from megasyne.checkpoint.sharding import unwrap
from megasyne.errors import CheckpointError  # (also imported from here by its callers)
from megasyne.model.config import ModelConfigError, RopeScaling

FORMAT = "megasyne-checkpoint/1"
MANIFEST = "megasyne.json"
# Only this optimizer sharding survives a TP/PP change, and megatron-core 0.16.1's default
# ("fully_sharded_model_space") fails with "ShardedTensor.flattened_range is not supported".
# Without CUDA, the gather of distributed-optimizer state must take Megatron's gloo path
# ("mem_efficient": gather to DP rank 0 over the gloo group); the default path calls
# Tensor.cuda() on the send buffer.
DIST_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                     "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_sharded_state_dict(chunks: list) -> dict:
    """The chunks' sharded state dict (for a save, or as the template of a load), after any
    pending all-gather of updated parameters (overlap_param_gather): a save then writes the
    post-step weights, and a load is not overwritten by a gather still in flight."""
    from megasyne.training.optim import finish_param_gather

    finish_param_gather(chunks)
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(root: str | os.PathLike, iteration: int, chunks: list, *,
                    model_config: dict, layout: dict, optimizer=None,
                    extra: dict | None = None, keep_last: int | None = None,
                    before_publish=None) -> Path:
    """Save model (and optimizer) state of every rank; returns the final directory.

    ``before_publish(tmp_dir)`` runs on every rank after the sharded write and before the
    rename, for per-rank files (e.g. RNG states) that must be part of the checkpoint.
    A failed save leaves no ``.tmp`` directory; a full disk raises CheckpointError.
    (``megasyne.checkpoint.async_save`` writes the same checkpoint while training goes on.)
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = root / iter_name(iteration), root / (iter_name(iteration) + ".tmp")
    try:
        state = prepare_save(root, tmp, chunks, optimizer)
        dist_checkpointing.save(state, str(tmp / "dist"), content_metadata=DIST_OPT_METADATA)
        if before_publish is not None:
            before_publish(tmp)
        _barrier()
        publish(root, final, tmp, manifest_fields(iteration, model_config, layout, optimizer,
                                                  extra), keep_last=keep_last)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        error = failed_save_error(exc, root, final, tmp)
        if error is not None:
            raise error from exc
        raise
    return final


def failed_save_error(exc: BaseException, root: Path, final: Path,
                      tmp: Path) -> CheckpointError | None:
    """After a save failed on every rank: rank 0 removes the ``.tmp`` directory. A full disk
    gives the CheckpointError to raise (naming the checkpoint and what 'latest' still names);
    anything else None (the caller re-raises it as it is)."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if _no_space(exc):
        return CheckpointError(
            f"no space left on device while writing {tmp}: free space or change run_dir; "
            f"{previous_checkpoint_note(root, final)}")
    return None


# torch's zip writer loses the errno of a failed write: "[enforce fail at inline_container.cc:672]
# . unexpected pos 704 vs 598" is what a full disk looks like through torch.save.
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos")


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or its causes, or a rank's failure inside a CheckpointException) is a
    full disk / exceeded quota."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _NO_SPACE_TEXT):
            return True
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # rank -> (exc, traceback)
            todo += [f for f in (failure if isinstance(failure, tuple) else (failure,))
                     if isinstance(f, BaseException)]
    return False


def previous_checkpoint_note(root: Path, final: Path) -> str:
    """What a failed save of ``final`` left: the checkpoint ``latest`` still names."""
    latest = root / "latest"
    name = latest.read_text().strip() if latest.is_file() else None
    if name and name != final.name:
        return f"the previous checkpoint {root / name} is intact ('latest' names it)"
    if name:
        return f"{root / name} ('latest') is unchanged"
    return f"there is no earlier checkpoint in {root}"


def prepare_save(root: Path, tmp: Path, chunks: list, optimizer) -> dict:
    """Collective: an empty ``tmp/dist`` (a stale ``.tmp`` of a crashed save removed) and the
    sharded state dict to write there."""
    # megatron-core's writer reports through a queue server it would start itself, which a
    # job-wide SIGTERM (preemption) kills under the save that SIGTERM asks for: ours is immune.
    megatron_patches.apply_writer_queue()
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dist").mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=DIST_OPT_METADATA)
    return state


def manifest_fields(iteration: int, model_config: dict, layout: dict, optimizer,
                    extra: dict | None) -> dict:
    """The manifest's entries other than the file checksums (with optimizer state: how its
    distributed-optimizer part is laid out, which loads of older checkpoints check)."""
    fields = dict(format=FORMAT, iteration=iteration, model=model_config, layout=layout,
                  has_optimizer=optimizer is not None, extra=extra or {})
    if optimizer is not None:
        fields[STATE_LAYOUT_KEY] = STATE_LAYOUT
    return fields


def publish(root: Path, final: Path, tmp: Path, fields: dict, *, keep_last: int | None) -> None:
    """Collective, once every rank's files are in ``tmp``: checksums, then on rank 0 the
    manifest, the rename to ``final``, ``latest`` and the pruning; every rank learns rank 0's
    outcome (a CheckpointError on failure)."""
    files = digest_checkpoint(tmp, exclude=(MANIFEST,))  # every file's size and checksum
    failure = [None]
    if _rank() == 0:
        try:
            atomic_write_text(tmp / MANIFEST, json.dumps(dict(fields, files=files), indent=2,
                                                         default=str))
            if final.exists():  # re-saving the same iteration replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(root / "latest", final.name + "\n")
            if keep_last:
                _prune(root, keep_last)
        except BaseException as exc:
            failure = [f"{type(exc).__name__}: {exc}"]
            _share_status(failure)
            raise
    _share_status(failure)  # the other ranks learn rank 0's outcome instead of hanging
    if failure[0] is not None:
        raise CheckpointError(f"publishing {final} failed on rank 0: {failure[0]}")


def _share_status(status: list) -> None:
    if dist.is_initialized():
        dist.broadcast_object_list(status, src=0)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a root (via ``latest``) or an ``iter_*`` directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{latest} points at {target}, which is not a complete checkpoint")
        return target
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is an incomplete checkpoint (a save was interrupted)")
    raise CheckpointError(f"no megasyne checkpoint at {path}: expected {MANIFEST} or a 'latest' file")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every published checkpoint (``iter_*`` with a manifest) under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
                   and (p / MANIFEST).is_file()), reverse=True)


def resume_candidates(root: str | os.PathLike, *, warn=print) -> list[Path]:
    """The checkpoints a resume tries, in order: the one ``latest`` names, then every older
    complete one. A missing or dangling ``latest`` falls back to the newest complete checkpoint
    (with a warning): losing the pointer never restarts a run from scratch."""
    root = Path(root)
    complete = complete_checkpoints(root)
    latest = root / "latest"
    if not complete:
        return []
    if not latest.is_file():
        warn(f"warning: {latest} is missing; resuming from the newest complete checkpoint, "
             f"{complete[0]}")
        return complete
    target = root / latest.read_text().strip()
    if target not in complete:
        warn(f"warning: {latest} names {target.name}, which is not a complete checkpoint; "
             f"resuming from the newest complete one, {complete[0]}")
        return complete
    newer = [p.name for p in complete if p.name > target.name]
    if newer:
        warn(f"warning: {latest} names {target.name} but {newer} are newer and complete; "
             f"resuming from {target.name} as 'latest' says (point it at another to change that)")
    return [p for p in complete if p.name <= target.name]


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files do not match the sizes and checksums its manifest recorded."""


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Collective: every file against the manifest's size and checksum (checkpoints saved before
    checksums were recorded pass unchecked); raises CheckpointCorruptError naming the files."""
    ckpt = resolve(path)
    expected = read_manifest(ckpt).get("files")
    if not expected:
        return
    problems = verify_checkpoint_files(ckpt, expected)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                            if len(problems) > 5 else "")
        raise CheckpointCorruptError(f"{ckpt} is damaged: {shown}")


def read_manifest(path: str | os.PathLike) -> dict:
    ckpt = resolve(path)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except ValueError as exc:
        raise CheckpointCorruptError(f"{ckpt / MANIFEST} is not valid JSON ({exc}); the "
                                     f"checkpoint is damaged") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / MANIFEST}: unknown format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return manifest


def check_model_compatible(manifest: dict, model_config: dict, path) -> None:
    """Fail before training when the checkpoint's architecture differs from the run's."""
    saved = manifest["model"]
    # Everything but the name and max_position_embeddings (CPT may lengthen the context):
    # a different RoPE base or scaling would run silently with wrong positions.
    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "vocab_size", "tie_word_embeddings", "rope_theta",
              "rope_scaling", "norm_eps")
    saved, run = _with_rope_defaults(saved), _with_rope_defaults(model_config)
    diffs = [f"{f}: checkpoint {saved.get(f)} vs run {run.get(f)}"
             for f in fields if saved.get(f) != run.get(f)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match the model of this run: "
                              + "; ".join(diffs))


def _with_rope_defaults(model_config: dict) -> dict:
    """``rope_scaling`` with every constant spelled out: a manifest that names only some of
    them (the rest are Llama-3.1's) is the same model as one that names all."""
    scaling = model_config.get("rope_scaling")
    if not isinstance(scaling, dict):
        return model_config
    try:
        full = asdict(RopeScaling.from_dict(scaling))
    except ModelConfigError:
        return model_config  # compared as written; the differing field is named
    return {**model_config, "rope_scaling": full}


def load_checkpoint(path: str | os.PathLike, chunks: list, *, optimizer=None,
                    model_config: dict | None = None, verify: bool = True) -> dict:
    """Load weights (and optimizer state if given) into this rank's chunks; returns the manifest.

    Collective. With ``verify`` every file is checked against the manifest's checksums first
    (pass False only when :func:`verify_checkpoint` just did)."""
    ckpt = resolve(path)
    if verify:
        verify_checkpoint(ckpt)
    manifest = read_manifest(ckpt)
    if model_config is not None:
        check_model_compatible(manifest, model_config, ckpt)
    if optimizer is not None and not manifest["has_optimizer"]:
        raise CheckpointError(f"{ckpt} holds no optimizer state (a converted or weights-only "
                              f"checkpoint): load it as initial weights, not as a resume point")
    if optimizer is not None:
        check_optimizer_state_layout(manifest, chunks, ckpt)
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        _materialise_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=DIST_OPT_METADATA)
    loaded = _load_sharded(state, ckpt)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)
    if optimizer is not None:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    return manifest


def _load_sharded(state: dict, ckpt: Path) -> dict:
    """megatron's sharded load, its failures named with the checkpoint (a truncated shard is a
    bare EOFError from torch's unpickler; torch's CheckpointException is a BaseException)."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(state, str(ckpt / "dist"))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{ckpt}: its sharded state cannot be read "
                              f"({type(exc).__name__}: {text[:300]}); the checkpoint is damaged "
                              f"or incomplete: resume from an earlier one") from exc


def _load_optimizer_state(optimizer, state) -> None:
    """optimizer.load_state_dict, with the torch-Adam fix-ups Megatron lacks without apex/TE.

    With torch's Adam (no apex/TE), Megatron's DistributedOptimizer.load_state_dict copies
    the per-parameter state it reads from the checkpoint into *every* key of the live
    state, including ``step``, which the checkpoint's parameter state does not carry
    (KeyError: 'step'). So the parameter state is loaded in a second call, with the
    ``step`` entries set aside meanwhile.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    torch_adam = all(isinstance(o, (torch.optim.Adam, torch.optim.AdamW))
                     for o in _torch_optimizers(optimizer))
    if (len(inner) == 1 and isinstance(inner[0], DistributedOptimizer) and torch_adam
            and isinstance(state, dict) and "param_state" in state):
        state = dict(state)
        param_state = state.pop("param_state")
        sharding = state.pop("param_state_sharding_type")
        if sharding != "fully_reshardable":
            raise CheckpointError(f"unsupported distributed-optimizer sharding {sharding!r}")
        inner[0].load_state_dict(state)  # param groups, step, scaler; no parameter state
        torch_opt = inner[0].optimizer
        steps = {p: st.pop("step") for p, st in torch_opt.state.items() if "step" in st}
        inner[0].load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            torch_opt.state[p]["step"] = step
    else:
        optimizer.load_state_dict(state)
    _unshare_step_tensors(optimizer)


def _torch_optimizers(optimizer) -> list:
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in inner if getattr(o, "optimizer", None) is not None]


def _materialise_torch_adam_state(optimizer) -> None:
    """Give a fresh torch Adam (no apex/TE) a full state before loading into it.

    Megatron's distributed optimizer reads the common ``step`` out of the existing state
    while building the sharded state dict to load into (``assert len(steps) == 1``); a
    freshly built torch optimizer has no state yet. Zero state with one ``step`` tensor per
    parameter is what an Adam that has not stepped would hold; loading overwrites it.
    """
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            # fused Adam keeps `step` on the parameter's device, the other paths on the CPU
            step_device = None if group.get("fused") else "cpu"
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p] = {"step": torch.tensor(0.0, device=step_device or p.device),
                                    "exp_avg": torch.zeros_like(p.data),
                                    "exp_avg_sq": torch.zeros_like(p.data)}


def _unshare_step_tensors(optimizer) -> None:
    """After load, give every parameter its own ``step`` tensor.

    The distributed optimizer's load_state_dict puts ONE step tensor into every parameter's
    state; torch's Adam increments it in place once per parameter (step 3 -> 45), which
    changes the bias correction and the losses (1e-3 drift measured).
    """
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                if isinstance(state.get("step"), torch.Tensor):
                    step = state["step"].clone()
                    # fused Adam needs `step` as fp32 on the parameter's device
                    state["step"] = step.to(p.device, torch.float32) if group.get("fused") else step
