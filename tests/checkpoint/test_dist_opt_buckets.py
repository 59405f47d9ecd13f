"""The dist_opt_buckets patch: the distributed optimizer's gathered state, which megatron-core
lays out with each bucket's end padding dropped, is re-laid at the gradient buffer's offsets,
where sharded_param_state_fully_reshardable cuts it into parameters.

The end-to-end guard is tests/training/test_overlap.py (a resume with several buckets); this
checks the re-layout against the buffer's own parameter ranges on a made-up layout.
"""

from types import SimpleNamespace

import torch

from megasyne.megatron_patches.dist_opt_buckets import _at_buffer_offsets


def _layout():
    """Three buckets padded to multiples of 8, params aligned as megatron-core places them:
    (bucket offset, numel_unpadded) and each param's (start, end) in buffer coordinates."""
    buckets = [SimpleNamespace(offset=0, numel_unpadded=13),    # params [0, 5), [8, 13)
               SimpleNamespace(offset=16, numel_unpadded=7),    # param [16, 23)
               SimpleNamespace(offset=24, numel_unpadded=3)]    # param [24, 27)
    params = [(0, 5), (8, 13), (16, 23), (24, 27)]
    return SimpleNamespace(numel=32, buckets=buckets), params


def test_each_parameter_slice_is_its_own_state():
    buffer, params = _layout()
    truth = {}
    for key in ("param", "exp_avg", "exp_avg_sq"):
        full = torch.full((buffer.numel,), -1.0)  # -1: padding
        for i, (start, end) in enumerate(params):
            full[start:end] = torch.arange(end - start) + 100.0 * (i + 1)
        truth[key] = full
    # What get_parameter_state_dp_zero returns: per bucket its first numel_unpadded elements
    # (intra-bucket padding kept), buckets end to end.
    packed = {k: torch.cat([v[b.offset:b.offset + b.numel_unpadded] for b in buffer.buckets])
              for k, v in truth.items()}
    dtype = torch.float32
    state = {0: {dtype: {**packed, "numel_unpadded": 23}}}
    optimizer = SimpleNamespace(gbuf_ranges=[{dtype: None}], buffers=[buffer])

    # Without the re-layout, parameters after the first bucket's end padding are misread.
    start, end = params[2]
    assert not torch.equal(packed["exp_avg"][start:end], truth["exp_avg"][start:end])

    fixed = _at_buffer_offsets(optimizer, state)[0][dtype]
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert fixed[key].shape == (buffer.numel,)
        for start, end in params:
            assert torch.equal(fixed[key][start:end], truth[key][start:end])
    assert fixed["numel_unpadded"] == 23


def test_ranks_without_state_pass_through():
    assert _at_buffer_offsets(SimpleNamespace(), None) is None
