"""Build every preset on the meta device (no memory) and print parameter counts as JSON.

Run as a plain process (RANK/WORLD_SIZE unset -> world size 1, gloo).
"""

import json

import torch

import megasyne  # noqa: F401
from megasyne.model.builder import ModelRuntime, build_model
from megasyne.model.presets import PRESETS
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel

dims = ParallelDims(world_size=1)
init_parallel(dims)
counts = {}
for name, factory in PRESETS.items():
    cfg = factory()
    with torch.device("meta"):
        chunks = build_model(cfg, dims, ModelRuntime(init_weights=False))
    params = list(chunks[0].parameters())
    counts[name] = dict(
        built=sum(p.numel() for p in params),
        on_meta=all(p.device.type == "meta" for p in params),
        padded_vocab=cfg.padded_vocab_size(1),
        expected_padded=cfg.num_parameters(cfg.padded_vocab_size(1)),
    )
print("COUNTS " + json.dumps(counts))
