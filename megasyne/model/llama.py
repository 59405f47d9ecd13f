"""Megatron-Core's GPTModel with the loss routed to our Triton vocab-parallel cross-entropy."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel


class LlamaGPTModel(GPTModel):
    """GPTModel whose per-token LM loss can use megasyne's Triton kernel.

    Only the loss differs: with ``use_triton_cross_entropy`` the logits shard of this
    TP rank goes to ``megasyne.kernels.cross_entropy.vocab_parallel_cross_entropy``,
    a drop-in for ``tensor_parallel.vocab_parallel_cross_entropy`` (same [s, b] loss).
    """

    def __init__(self, *args, use_triton_cross_entropy: bool = False,
                 real_vocab_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_triton_cross_entropy = use_triton_cross_entropy
        self.real_vocab_size = real_vocab_size

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
