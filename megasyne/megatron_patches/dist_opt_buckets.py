"""The distributed optimizer's fully reshardable checkpoint, made right for several buckets.

megatron-core 0.16.1 builds the ``fully_reshardable`` optimizer checkpoint (the format megasyne
saves, so that a run can resume on another layout) in two steps that disagree once a gradient
buffer holds more than one bucket:

1. ``DistributedOptimizer.get_parameter_state_dp_zero`` gathers each bucket's state and lays
   the buckets end to end *without* the padding at the end of each bucket (each bucket is padded
   to a multiple of lcm(dp, 128) elements);
2. ``sharded_param_state_fully_reshardable`` then cuts that tensor into parameters at their
   offsets in the gradient buffer, which *include* that padding.

With one bucket the padding is at the very end and the offsets agree. With several (overlapped
gradient reduction with ``ddp_bucket_size`` below the model's size, or a tied embedding under
pipeline parallelism, which always gets its own bucket) every parameter after the first padded
bucket end is saved with the main weights and Adam moments of elements shifted by the padding
so far, and the last ones are padded with zeros (megatron logs "param range exceeds unpadded
buffer ... can lead to data corruption"). The load cuts the same way, so a resume silently
trains on corrupted state (seen as a grad norm of 37 instead of 2 on the tiny test model).

``install()`` wraps ``sharded_param_state_fully_reshardable`` so that, inside it, the dp-zero
state is laid out at the gradient buffer's own offsets (padding included, as zeros): each
parameter's slice is then its own state. For a single bucket the slices are unchanged (same
bytes on disk as before). Other users of ``get_parameter_state_dp_zero`` (the legacy dp_zero
format, which is consistent with itself) are not affected: the re-layout applies only while
the wrapped method runs.
"""

from __future__ import annotations

import functools

import torch

_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def _at_buffer_offsets(optimizer, state: dict | None) -> dict | None:
    """The dp-zero ``state`` with each buffer's tensors re-laid at the buffer's padded offsets."""
    if state is None:  # DP ranks other than 0 in the memory-efficient mode
        return None
    for gbuf_idx, gbuf_range_maps in enumerate(optimizer.gbuf_ranges):
        buffer = optimizer.buffers[gbuf_idx]
        for dtype in gbuf_range_maps:
            world = state[gbuf_idx][dtype]
            for key in _STATE_KEYS:
                packed = world[key]  # [numel_unpadded]: buckets end to end, end padding dropped
                padded = torch.zeros(buffer.numel, dtype=packed.dtype, device=packed.device)
                src = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    padded[bucket.offset:bucket.offset + n] = packed[src:src + n]
                    src += n
                assert src == packed.numel(), (src, packed.numel())
                world[key] = padded
    return state


def install() -> bool:
    """Wrap DistributedOptimizer.sharded_param_state_fully_reshardable; idempotent."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable
    if getattr(original, "_megasyne_bucket_offsets", False):
        return True

    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        dp_zero = type(self).get_parameter_state_dp_zero

        def at_buffer_offsets(*a, **k):
            return _at_buffer_offsets(self, dp_zero(self, *a, **k))

        # An instance attribute for the duration of the call: the class stays untouched.
        self.get_parameter_state_dp_zero = at_buffer_offsets
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    sharded_param_state_fully_reshardable._megasyne_bucket_offsets = True
    DistributedOptimizer.sharded_param_state_fully_reshardable = \
        sharded_param_state_fully_reshardable
    return True
