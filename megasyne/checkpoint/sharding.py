"""Map parameters between the full model (TP1/PP1 names) and one rank's model chunk.

"Full" names are the parameter names of a single-process GPTModel, e.g.
``decoder.layers.7.mlp.linear_fc1.weight``. A chunk on a pipeline stage numbers its
layers locally (``decoder.layers.0`` ...); its TransformerLayer.layer_number (1-based,
global) gives the global index. Tensor-parallel slicing follows each parameter's
Megatron attributes (``tensor_model_parallel``, ``partition_dim``) with one special
case: the SwiGLU ``linear_fc1`` holds [gate; up] and each TP rank holds
[gate_r; up_r], not a contiguous slice of the full matrix. QKV needs no special case:
Megatron lays linear_qkv out per query group ([q_g..., k_g, v_g] for each group g), so
a contiguous slice of whole groups is exactly what each TP rank owns.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap(chunk):
    """Strip DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def layer_offset_map(chunk) -> dict[int, int]:
    chunk = unwrap(chunk)
    if getattr(chunk, "decoder", None) is None:
        return {}
    return {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}


def to_global_name(local_name: str, offsets: dict[int, int]) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{offsets[int(m.group(1))]}." + local_name[m.end():]


def _is_glu_fc1(name: str, param) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and getattr(param, "_megasyne_glu", True)


def shard(full: torch.Tensor, param, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of ``full`` that ``param`` (on TP rank ``tp_rank``) holds."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, param):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, dim=0)[tp_rank],
                          torch.chunk(up, tp_size, dim=0)[tp_rank]], dim=0)
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of {tuple(full.shape)} is not divisible by TP={tp_size}")
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def unshard(pieces: list[torch.Tensor], param, name: str) -> torch.Tensor:
    """Inverse of ``shard``: the TP ranks' pieces (in rank order) -> the full tensor."""
    if len(pieces) == 1 or not getattr(param, "tensor_model_parallel", False):
        return pieces[0]
    dim = param.partition_dim
    if _is_glu_fc1(name, param):
        gates, ups = zip(*(torch.chunk(p, 2, dim=0) for p in pieces))
        return torch.cat([torch.cat(gates, dim=0), torch.cat(ups, dim=0)], dim=0)
    return torch.cat(pieces, dim=dim)


def _full_source(full_state: dict, gname: str, tied: bool) -> torch.Tensor:
    if gname in full_state:
        return full_state[gname]
    if tied and gname == "output_layer.weight":
        # Tied embeddings: the last stage's output layer is a copy of the word embeddings.
        return full_state["embedding.word_embeddings.weight"]
    raise KeyError(f"parameter {gname} is missing from the full state")


@torch.no_grad()
def load_full_state(chunk, full_state: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                    *, strict: bool = True) -> None:
    """Copy a full (TP1/PP1-named) state into this rank's chunk, slicing for TP."""
    model = unwrap(chunk)
    offsets = layer_offset_map(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        gname = to_global_name(name, offsets)
        try:
            source = _full_source(full_state, gname, tied)
        except KeyError:
            if strict:
                raise
            continue
        piece = shard(source, param, gname, tp_rank, tp_size)
        if piece.shape != param.shape:
            raise ValueError(f"{gname}: shard shape {tuple(piece.shape)} != parameter shape "
                             f"{tuple(param.shape)} (TP rank {tp_rank}/{tp_size})")
        param.copy_(piece.to(param.dtype))


@torch.no_grad()
def gather_full_state(chunk, tp_group=None, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This chunk's parameters (or main_grads) as full tensors with global names.

    All ranks of ``tp_group`` must call it together (an all-gather per parameter), and of the
    data-parallel group too right after an optimizer step that left its parameter all-gather
    to the next forward (overlap_param_gather: finished here first).
    """
    import torch.distributed as dist

    from megasyne.training.optim import finish_param_gather

    finish_param_gather([chunk])

    model = unwrap(chunk)
    offsets = layer_offset_map(model)
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    out = {}
    for name, param in model.named_parameters():
        tensor = param.main_grad if grads and hasattr(param, "main_grad") else \
            (param.grad if grads else param)
        tensor = tensor.detach().float().contiguous()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            pieces = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(pieces, tensor, group=tp_group)
        else:
            pieces = [tensor]
        out[to_global_name(name, offsets)] = unshard(pieces, param, name).clone()
    return out
