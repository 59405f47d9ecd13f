"""Evaluation of megasyne / Hugging Face checkpoints on the paper's benchmarks, offline.

- ``data``: readers for the public file formats (MMLU, C-Eval, CMMLU, SciEval, GSM8K, MATH,
  HumanEval), validated with errors that name file, line and field;
- ``tasks``: TaskSpec, the paper preset (5-shot MMLU / C-Eval / CMMLU / MATH / SciEval, 8-shot
  GSM8K, 0-shot HumanEval), task files, and the lm-eval task configs they become;
- ``scoring``: answer extraction and exact match (GSM8K, MATH), HumanEval's unit tests in a
  child process with limits;
- ``backends``: the models (transformers, Megatron-Core from a megasyne checkpoint, or a bare
  ``score_fn``) and their lm-eval adapter;
- ``runner``: run tasks, results JSON, paper-like tables, before/after comparison;
- ``in_training``: ``InTrainingEval`` for the trainer (multiple choice via a ``score_fn``).

Command line: ``tools/evaluate.py``.
"""

from megasyne.eval.benchmark_files import EvalDataError
from megasyne.eval.tasks import EvalConfigError, TaskSpec

__all__ = ["EvalConfigError", "EvalDataError", "TaskSpec"]
