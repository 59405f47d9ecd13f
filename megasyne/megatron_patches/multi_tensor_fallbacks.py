"""Megatron-Core's no-apex multi-tensor fallbacks, replaced by torch ``_foreach`` ops.

Megatron-Core's optimizer and gradient clipping call apex's ``amp_C`` kernels through module
globals that megatron-core 0.16 sets at import: apex's or TE's kernels when present, else
``megatron.core.utils.local_multi_tensor_*`` (a host sync per tensor, a temporary per tensor;
see ``megasyne.training.multi_tensor`` for the costs and for our replacements). ``install()``
replaces only those local fallbacks, in the two modules that picked them at import.
"""

from __future__ import annotations


def install() -> list[str]:
    """Use our _foreach ops in place of Megatron-Core's local fallbacks; returns what was
    replaced (``module.name``), ours in place before included. Idempotent."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    from megasyne.training.multi_tensor import multi_tensor_l2norm, multi_tensor_scale

    replaced = []
    slots = [(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm, multi_tensor_l2norm),
             (clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale,
              multi_tensor_scale),
             (optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale,
              multi_tensor_scale)]
    for module, name, fallback, ours in slots:
        current = getattr(module, name, None)
        if current is fallback:
            setattr(module, name, ours)
        if getattr(module, name, None) is ours:
            replaced.append(f"{module.__name__}.{name}")
    return replaced
