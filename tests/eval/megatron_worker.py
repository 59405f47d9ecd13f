"""Megatron side of test_smollm2.py, in one process (Megatron imports once).

Usage: megatron_worker.py CHECKPOINT TASKS_YAML OUT_DIR
1. ``tools/evaluate.py run --checkpoint CHECKPOINT --load megatron`` (its main(), in process)
   on the fixture -> OUT_DIR/megatron.json;
2. InTrainingEval on the fixture's first MMLU question with the ``score_fn`` of the Megatron
   scorer the tool loaded (kept by wrapping megasyne_model_scorer) -> OUT_DIR/in_training.json.
"""

import importlib.util
import json
import sys
from pathlib import Path

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)

REPO = Path(__file__).resolve().parents[2]
IN_TRAINING_TASKS = ("mmlu",)  # its first question (astronomy): a short prompt, CPU-cheap
IN_TRAINING_ITEMS = 1


def main(checkpoint: str, tasks: str, out: Path) -> None:
    from megasyne.eval import lm
    from megasyne.scorers import score_fn

    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    scorers = []  # keep the model the tool loads, to reuse it below (no second load)
    load = lm.megasyne_model_scorer
    lm.megasyne_model_scorer = lambda *a, **k: scorers.append(load(*a, **k)) or scorers[-1]
    rc = tool.main(["run", "--checkpoint", checkpoint, "--load", "megatron", "--task-file", tasks,
                    "--allow-code-execution", "--no-progress", "--output", str(out / "megatron.json")])
    assert rc == 0, rc

    from megasyne.checkpoint.dist import read_manifest
    from megasyne.eval.in_training import InTrainingEval
    from megasyne.eval.tasks import load_task_file

    tok_dir = read_manifest(checkpoint)["extra"]["hf_dir"]
    (scorer,) = scorers
    model = scorer.model.chunks[0]
    specs = [s for s in load_task_file(tasks) if s.name in IN_TRAINING_TASKS]
    evaluator = InTrainingEval(tasks=specs, tokenizer_path=tok_dir, max_items=IN_TRAINING_ITEMS)
    model.train()  # the score_fn must evaluate in eval mode and restore this
    scores = evaluator.scores(score_fn(scorer.model))
    assert model.training
    (out / "in_training.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
