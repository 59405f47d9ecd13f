"""Core attention through torch's scaled_dot_product_attention (flash / memory-efficient).

Megatron-Core's local ``DotProductAttention`` materialises the [b, heads, s, s] score
matrix (8 GiB per layer for Llama-3-8B at s=8192, b=1, bf16) and has no flash path;
without Transformer-Engine that caps MFU far below what the card can do. This module
is a drop-in ``core_attention`` for the local layer spec: same constructor and forward
signature, causal masking, GQA without materialising repeated K/V (``enable_gqa``).

Packed documents (``megasyne.model.documents``) arrive as Megatron-Core's thd format: q/k/v
[t, heads, hn] of a micro-batch's rows laid end to end, and ``PackedSeqParams`` whose
cu_seqlens give each document's offsets. Each document is one causal SDPA call on its own
slice: no [t, t] mask is built, the flash / memory-efficient kernels stay usable, and no work
is spent on the blocks across documents that a mask would only discard.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megasyne.errors import ConfigError


class SDPAttention(MegatronModule):
    """softmax(q k^T / sqrt(d)) v with a causal mask; q: [sq, b, np, hn], k/v: [sk, b, ng, hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("SDPAttention does not support context parallelism (cp > 1): "
                              "use the Transformer-Engine spec or cp=1")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SDPAttention supports causal/no_mask, not {attn_mask_type}")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if pg_collection is not None:
            tp = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention bias is not supported")
        if packed_seq_params is not None:
            return self._per_document(query, key, value, packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)    # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            # Megatron's convention: True = masked out; SDPA's boolean mask: True = keep.
            mask = ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.heads != self.groups,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, np*hn]

    def _per_document(self, query, key, value, packed_seq_params):
        """thd: q [t, np, hn], k/v [t, ng, hn] -> [t, np*hn], causal within each document."""
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention: packed sequences in {packed_seq_params.qkv_format!r} "
                             f"format are not supported (only thd)")
        from megasyne.model.documents import document_lengths

        lengths = document_lengths(packed_seq_params)
        if sum(lengths) != query.shape[0]:
            raise ValueError(f"SDPAttention: documents of {sum(lengths)} tokens for "
                             f"{query.shape[0]} packed tokens")
        dropout = self.dropout if self.training else 0.0
        outs = []
        for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths)):
            out = F.scaled_dot_product_attention(
                q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0),
                v.permute(1, 0, 2).unsqueeze(0), is_causal=True, scale=self.softmax_scale,
                dropout_p=dropout, enable_gqa=self.heads != self.groups,
            )  # [1, np, l, hn]
            outs.append(out[0].permute(1, 0, 2))  # [l, np, hn]
        return torch.cat(outs).reshape(query.shape[0], -1)  # [t, np*hn]
