"""Megatron-Core's GPTModel with the loss routed to our Triton vocab-parallel cross-entropy."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel


class LlamaGPTModel(GPTModel):
    """GPTModel whose per-token LM loss can use megasyne's Triton kernel.

    Only the loss differs: with ``use_triton_cross_entropy`` the logits shard of this
    TP rank goes to ``megasyne.kernels.cross_entropy.vocab_parallel_cross_entropy``,
    a drop-in for ``tensor_parallel.vocab_parallel_cross_entropy`` (same [s, b] loss).
    """

    def __init__(self, *args, use_triton_cross_entropy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_triton_cross_entropy = use_triton_cross_entropy

    def compute_language_model_loss(self, labels, logits):
        if not self.use_triton_cross_entropy:
            return super().compute_language_model_loss(labels, logits)
        from megatron.core import parallel_state

        from megasyne.kernels.cross_entropy import vocab_parallel_cross_entropy

        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        loss = vocab_parallel_cross_entropy(
            logits, labels, tp_group=parallel_state.get_tensor_model_parallel_group()
        )  # [s, b]
        return loss.transpose(0, 1).contiguous()  # [b, s]
