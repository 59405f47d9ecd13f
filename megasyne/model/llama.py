"""Megatron-Core's GPTModel with the loss routed to our Triton vocab-parallel cross-entropy, and
RoPE that can follow per-token position ids (document masking)."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel


class LlamaGPTModel(GPTModel):
    """GPTModel whose per-token LM loss can use megasyne's Triton kernel.

    Only the loss differs: with ``use_triton_cross_entropy`` the logits shard of this
    TP rank goes to ``megasyne.kernels.cross_entropy.vocab_parallel_cross_entropy``,
    a drop-in for ``tensor_parallel.vocab_parallel_cross_entropy`` (same [s, b] loss).
    """

    def __init__(self, *args, use_triton_cross_entropy: bool = False,
                 real_vocab_size: int | None = None, document_attention: str = "mask",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.use_triton_cross_entropy = use_triton_cross_entropy
        self.real_vocab_size = real_vocab_size
        if document_attention not in ("mask", "thd"):
            raise ValueError(f"document_attention must be 'mask' or 'thd', got {document_attention!r}")
        self.document_attention = document_attention
        """How packed documents are kept apart (megasyne.model.documents): "thd" when the core
        attention takes PackedSeqParams, else "mask"."""
        self._rotary_from_positions = False

    def forward(self, input_ids, position_ids, attention_mask, *args,
                rotary_from_positions: bool = False, **kwargs):
        """GPTModel.forward; with ``rotary_from_positions`` the RoPE angle of each token is that
        of its ``position_ids`` entry ([b, s]) instead of its index in the sequence.

        Megatron-Core's GPTModel reads position_ids only for learned position embeddings: with
        RoPE it takes the angles of positions 0..s-1 from the sequence length alone
        (``GPTModel._preprocess``: ``self.rotary_pos_emb(rotary_seq_len)``), so positions that
        restart at each document would be ignored. Its packed (thd) path restarts RoPE per
        document from cu_seqlens, but only attention that takes PackedSeqParams can use it
        (Transformer-Engine's, ours); Megatron's local DotProductAttention refuses them, and
        its documents get the angles of their own positions here."""
        self._rotary_from_positions = rotary_from_positions
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._rotary_from_positions = False

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        if not self._rotary_from_positions:
            return out
        table = out[1]  # [S, 1, 1, r] angles of positions 0..S-1, S = the sequence length
        if table is None or table.dim() != 4 or table.shape[1] != 1:
            raise ValueError("rotary_from_positions needs RoPE angles of shape [s, 1, 1, r] "
                             "(no inference context, no context parallelism)")
        positions = kwargs["position_ids"].to(table.device)          # [b, s], each < S
        per_token = table[:, 0, 0, :][positions.t()].unsqueeze(2)     # [s, b, 1, r]
        return (out[0], per_token, *out[2:])

    # Logit given to the vocabulary padding (rows added to divide by 128 x TP): exp(-1e4 - max)
    # is 0 in every dtype, so the padding takes no probability mass. Megatron-LM lets those
    # rows take part in the softmax; a model converted from HF (padding rows = 0, logit 0)
    # then trains on a different loss than HF's (6.95 vs 6.93 measured on a random model).
    PADDED_LOGIT = -1e4

    def _mask_vocab_padding(self, logits):
        """logits [s, b, v / tp] of this TP rank: padding columns set in place (no copy)."""
        from megatron.core import parallel_state

        real = self.real_vocab_size
        if real is None or real >= self.vocab_size:
            return logits
        shard = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * shard
        local = max(real - first, 0)
        if local < shard:
            logits[..., local:].fill_(self.PADDED_LOGIT)  # autograd: zero grad there
        return logits

    def compute_language_model_loss(self, labels, logits):
        logits = self._mask_vocab_padding(logits)
        if not self.use_triton_cross_entropy:
            return super().compute_language_model_loss(labels, logits)
        from megatron.core import parallel_state

        from megasyne.kernels.cross_entropy import vocab_parallel_cross_entropy

        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        loss = vocab_parallel_cross_entropy(
            logits, labels, tp_group=parallel_state.get_tensor_model_parallel_group()
        )  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]
