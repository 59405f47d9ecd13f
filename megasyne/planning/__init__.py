"""Full-scale rehearsal of a training run on one CPU: ``tools/plan_run.py``.

- ``plan``: the plan of a run config at its real size and world size (data, checks, memory per
  GPU, schedule, checkpoints, time); ``PlanOptions``.
- ``memory``: per-stage memory from the model built on the meta device (traced activations).
- ``standins``: datasets with real lengths and metadata but no tokens, for corpora not here.
- ``report``: the plan as text and the LR curve as a PNG.
"""

from __future__ import annotations

from pathlib import Path


def load_plan_config(path: str, overrides: list[str], *, world_size: int):
    """The run config as the real run would load it at ``world_size`` ranks; an init_checkpoint
    this machine does not hold is left out (returned, for the report) instead of refused."""
    import yaml

    from megasyne.training.config import _NumberAwareLoader, apply_overrides, load_config

    raw = apply_overrides(yaml.load(Path(path).read_text(), Loader=_NumberAwareLoader) or {},
                          list(overrides))
    missing = None
    init = raw.get("init_checkpoint")
    if init and not (Path(path).parent / init).exists() and not Path(init).exists():
        missing = init
        overrides = [*overrides, "init_checkpoint=null"]
    cfg = load_config(path, [*overrides, f"parallel.world_size={world_size}"])
    return cfg, missing
