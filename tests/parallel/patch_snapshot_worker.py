"""Apply every Megatron-Core patch that runs on a CPU, in a fresh interpreter, and print (JSON)
which attributes of the loaded megatron modules and classes, and which megatron loggers'
filters, changed. Run by tests/parallel/test_megatron_patches.py (a fresh process: patches
are process-wide, and a pytest process has usually applied some already)."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys

import megasyne  # noqa: F401  (TRITON_INTERPRET before megatron imports triton)

# Load what the patches touch or import before the snapshot: an import during a patch would
# add modules whose earlier state is unknown.
import megasyne.model.fusions  # noqa: E402,F401
import megasyne.training.multi_tensor  # noqa: E402,F401
from megasyne import megatron_patches as mp

for name in ["megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.distributed",
             "megatron.core.pipeline_parallel", "megatron.core.tensor_parallel",
             "megatron.core.dist_checkpointing", *(m for p in mp.PATCHES for m, _ in p.targets),
             *(m for p in mp.PATCHES for m in p.loggers)]:
    importlib.import_module(name)


def _megatron_modules():
    return {n: m for n, m in list(sys.modules.items())
            if (n == "megatron" or n.startswith("megatron.")) and m is not None}


def snapshot():
    state = {}
    for mod_name, module in _megatron_modules().items():
        for attr, value in list(vars(module).items()):
            state[(mod_name, attr)] = value
            if inspect.isclass(value) and value.__module__ == mod_name:
                for cattr, cvalue in list(vars(value).items()):
                    state[(mod_name, f"{attr}.{cattr}")] = cvalue
    loggers = {n: list(lg.filters) for n, lg in logging.root.manager.loggerDict.items()
               if n.startswith("megatron") and isinstance(lg, logging.Logger)}
    return state, loggers


def main() -> None:
    before, loggers_before = snapshot()
    modules_before = set(_megatron_modules())
    results = {"cpu_shims": mp.apply_cpu_shims(),
               "multi_tensor": mp.apply_multi_tensor_fallbacks(),
               "rope_slot": mp.apply_rope_slot(),
               "wgrad_accumulation": mp.apply_wgrad_accumulation(force=True),
               "writer_queue": mp.apply_writer_queue(),
               "dist_opt_buckets": mp.apply_dist_opt_buckets()}
    if sys.argv[1:] == ["--inject"]:  # the test's own check that a stray change is caught
        from megatron.core import utils
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.models.common.language_module.language_module import LanguageModule

        utils._undeclared = True
        LanguageModule._undeclared = True
        rope_utils.fused_apply_rotary_pos_emb = before[(rope_utils.__name__,
                                                        "fused_apply_rotary_pos_emb")]
    after, loggers_after = snapshot()

    changed = set()
    for key, value in after.items():
        if key not in before:
            mod_name, attr = key
            if key[0] not in modules_before:
                continue  # a module first imported by a patch: reported below
            if sys.modules.get(f"{mod_name}.{attr}") is value:
                continue  # a submodule bound on its package by an import
            changed.add(key)
        elif before[key] is not value:
            changed.add(key)
    changed |= {k for k in before if k not in after}  # deleted
    changed_loggers = sorted(n for n, f in loggers_after.items() if f != loggers_before.get(n, []))
    print(json.dumps({"results": results, "changed": sorted(changed),
                      "loggers": changed_loggers,
                      "new_modules": sorted(set(_megatron_modules()) - modules_before)}))


# The writer_queue patch starts a "spawn" process, which re-imports this file: guarded.
if __name__ == "__main__":
    main()
