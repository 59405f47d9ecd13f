"""Attention kept inside each document of packed rows: the model call for a micro-batch whose
tokens carry document ids (``megasyne.training.documents``).

Which way depends on the model's core attention (``LlamaGPTModel.document_attention``, fixed by
``megasyne.model.builder`` with the layer spec):

- ``"thd"``: Transformer-Engine's attention (CUDA + TE) and our ``SDPAttention`` (CUDA without
  TE; also usable on CPU). The rows of the micro-batch are laid end to end, [b, s] -> [1, b*s],
  and Megatron-Core's ``PackedSeqParams`` (``qkv_format="thd"``) carry the documents' offsets
  (cu_seqlens). TE runs variable-length flash / cuDNN attention on them; SDPAttention one causal
  SDPA per document. Megatron-Core applies RoPE per document from the same offsets
  (``rope_utils._apply_rotary_pos_emb_thd``, or TE's fused thd RoPE), so positions restart at
  each document by construction. The pipeline then sends [b*s, 1, h] activations between
  stages: the schedule is called with ``schedule_shape``.
- ``"mask"``: Megatron-Core's ``DotProductAttention`` (the CPU default), which refuses
  PackedSeqParams. It gets a block-diagonal causal mask [b, 1, s, s] (True = masked, Megatron's
  convention; ``FusedScaleMaskSoftmax`` uses a given mask instead of its causal one), and RoPE
  takes each token's angle from its reset position (``LlamaGPTModel(...,
  rotary_from_positions=True)``: Megatron's GPTModel would otherwise use positions 0..s-1).

Both give, for every document, the logits of that document run alone
(``tests/model/test_document_mask.py``: against transformers, at TP2 and PP2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class DocumentSeqParams(PackedSeqParams):
    """``PackedSeqParams`` plus the document lengths on the host, so that SDPAttention splits
    q/k/v without reading cu_seqlens back from the GPU in every layer. TE reads only the
    fields of ``PackedSeqParams`` itself."""

    lengths: tuple = ()


def document_lengths(params: PackedSeqParams) -> list[int]:
    """Token count of each packed document, in order."""
    if isinstance(params, DocumentSeqParams) and params.lengths:
        return list(params.lengths)
    return params.cu_seqlens_q.diff().tolist()  # reads the device tensor back: a sync


def cu_seqlens(docs: np.ndarray) -> tuple[np.ndarray, int]:
    """(int32 [n + 1], longest) for the rows of ``docs`` [b, s] (document ids, constant exactly
    over each document) laid end to end: the offsets of the n documents in the flattened
    [b * s] tokens (a row's start always begins one), and the longest document."""
    b, s = docs.shape
    starts = np.ones((b, s), dtype=bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    offsets = np.append(np.flatnonzero(starts.reshape(-1)), b * s).astype(np.int32)
    return offsets, int(np.diff(offsets).max())


def block_causal_mask(docs: torch.Tensor) -> torch.Tensor:
    """bool [b, 1, s, s], True where query i must not see key j: j > i, or j in another
    document (Megatron-Core's convention)."""
    s = docs.shape[1]
    other = docs[:, :, None] != docs[:, None, :]                                  # [b, s, s]
    future = torch.ones(s, s, dtype=torch.bool, device=docs.device).triu(1)       # [s, s]
    return (other | future).unsqueeze(1)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP
        model = model.module
    return model


def packs_rows(model) -> bool:
    """True when ``model`` (a chunk, DDP-wrapped or not) takes documents in thd format."""
    return getattr(_unwrap(model), "document_attention", "mask") == "thd"


def schedule_shape(model, micro_batch_size: int, seq_length: int,
                   documents: bool) -> tuple[int, int]:
    """(micro_batch_size, seq_length) to give Megatron's pipeline schedule: its activations
    between stages are [s, b, h], which thd makes [b*s, 1, h]."""
    if documents and packs_rows(model):
        return 1, micro_batch_size * seq_length
    return micro_batch_size, seq_length


def document_forward(model, tokens: torch.Tensor, position_ids: torch.Tensor,
                     docs: torch.Tensor, labels: torch.Tensor | None = None,
                     device: torch.device | None = None):
    """``model``'s output for [b, s] rows whose tokens carry document ids ``docs`` (CPU
    tensors; moved to ``device`` here): per-token losses [b, s] with ``labels``, else logits
    [b, s, v / tp], on the last pipeline stage; hidden states elsewhere (thd: [b*s, 1, h])."""
    device = device or tokens.device
    b, s = tokens.shape
    if packs_rows(model):
        offsets, longest = cu_seqlens(docs.cpu().numpy())
        cu = torch.from_numpy(offsets).to(device)
        params = DocumentSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                   max_seqlen_q=longest, max_seqlen_kv=longest,
                                   lengths=tuple(np.diff(offsets).tolist()))
        flat = labels.reshape(1, b * s).to(device) if labels is not None else None
        out = model(tokens.reshape(1, b * s).to(device),
                    position_ids.reshape(1, b * s).to(device), None, labels=flat,
                    packed_seq_params=params)
        if not _unwrap(model).post_process:
            return out
        return out.reshape(b, s) if labels is not None else out.reshape(b, s, -1)
    mask = block_causal_mask(docs.to(device))
    return model(tokens.to(device), position_ids.to(device), mask,
                 labels=labels.to(device) if labels is not None else None,
                 rotary_from_positions=True)
