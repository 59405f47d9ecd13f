"""Multiple-choice accuracy during training, independent of the model's parallel layout.

    from megasyne.eval.in_training import InTrainingEval
    evaluator = InTrainingEval(tasks="examples/eval/in_training.yaml",
                               tokenizer_path="llama3-8b/", max_items=300)   # once, at start-up
    ...
    accuracies = evaluator.run(score_fn)          # every N steps: {"mmlu": 0.61, "ceval": 0.47}

Everything that can fail (missing file, bad answer format, unknown task, too few few-shot
examples, a generative task) fails in the constructor, before training starts. The prompts
are built once, by lm-eval, exactly as ``tools/evaluate.py`` builds them for the same task
settings, and tokenized once; a run only calls ``score_fn`` and counts.

The ``score_fn`` contract
-------------------------
``score_fn(sequences: list[list[int]], starts: list[int]) -> list[float]`` (or a 1-D tensor):

- ``sequences[i]`` is a token-id list (context + continuation, at most ``max_length + 1``
  ids, already left-truncated); at most ``batch_size`` sequences per call, of mixed lengths
  (pad them yourself; right padding is safe with a causal model);
- ``starts[i]`` (``1 <= starts[i] < len(sequences[i])``) is the index of the first
  continuation token;
- it returns, per sequence, ``sum(log p(seq[t] | seq[:t]) for t in range(start, len(seq)))``:
  log-softmax over the real vocabulary (padded vocabulary rows excluded), fp32 accumulation;
- it runs the model in eval mode without gradients and leaves its training mode as it was;
- it is a collective: every rank that holds part of the model (all TP / PP ranks of a model
  replica) calls it in the same order with the same arguments, and it returns the scores on
  every rank (or at least where ``run`` is read).

``megasyne.scorers.score_fn(scorer)`` implements it for any scorer of that module: the
Megatron model at any TP / PP / virtual stages (``MegatronScorer``), a transformers model
(``HFScorer``).

Data parallel: ``counts(score_fn, shard=(dp_rank, dp_size))`` scores every ``dp_size``-th
request only; all-reduce the returned correct / total counts over the data-parallel group
and divide (``accuracies_from_counts``). ``run(score_fn)`` scores everything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from megasyne.eval.lm import ScoreFn, ScoreFnScorer
from megasyne.eval.tasks import MC, EvalConfigError, TaskSpec, build_lm_eval_configs, load_task_file


@dataclass(kw_only=True, frozen=True)
class _Question:
    task: str
    answer: int
    first: int
    """Index of its first request in the flat request list (one request per choice)."""
    n_choices: int


@dataclass(kw_only=True)
class InTrainingEval:
    """A fixed multiple-choice subset, ready to score with any ``score_fn`` (see module doc)."""

    tasks: str | os.PathLike | list[TaskSpec]
    """A task file (YAML, see megasyne.eval.tasks) or TaskSpecs; multiple-choice formats only."""
    tokenizer_path: str | os.PathLike
    """A transformers tokenizer directory (the model's HF directory)."""
    max_items: int | None = 200
    """Questions per task (round-robin over subjects; overrides the task's own max_items)."""
    max_length: int = 4096
    """Longest scored sequence; longer contexts lose their oldest tokens."""
    batch_size: int = 8
    """Sequences per score_fn call."""
    add_bos: bool | None = None
    """Prepend BOS (None: as the tokenizer does by default)."""
    progress: bool = False
    """tqdm bar over score_fn calls."""
    _questions: list[_Question] = field(init=False, repr=False, default_factory=list)
    _requests: list[tuple[list[int], list[int]]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        import transformers

        specs = (load_task_file(self.tasks) if isinstance(self.tasks, (str, os.PathLike))
                 else list(self.tasks))
        if not specs:
            raise EvalConfigError("InTrainingEval: no tasks")
        for s in specs:
            if s.fmt.kind != MC:
                raise EvalConfigError(f"InTrainingEval: task '{s.name}' ({s.format}) is not multiple "
                                      f"choice; in-training evaluation scores answers only")
        if self.max_items is not None:
            specs = [dataclasses.replace(s, max_items=self.max_items) for s in specs]
        self.specs = specs
        path = Path(self.tokenizer_path)
        if not path.is_dir():
            raise EvalConfigError(f"InTrainingEval: tokenizer directory {path} does not exist")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self._scorer_args = dict(tokenizer=tokenizer, max_length=self.max_length,
                                 batch_size=self.batch_size, add_bos=self.add_bos,
                                 progress=self.progress)
        encoder = ScoreFnScorer(lambda *_: [], **self._scorer_args)
        for spec, text_requests in _record_requests(specs):
            for answer, pairs in text_requests:
                self._questions.append(_Question(task=spec.name, answer=answer,
                                                 first=len(self._requests), n_choices=len(pairs)))
                self._requests.extend(encoder.encode_pair(c, t) for c, t in pairs)

    @property
    def num_questions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self._questions:
            out[q.task] = out.get(q.task, 0) + 1
        return out

    def scores(self, score_fn: ScoreFn, shard: tuple[int, int] = (0, 1)) -> list[tuple[str, int, list[float]]]:
        """(task, gold index, log-likelihood per choice) of this shard's questions, in order."""
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {shard}: need 0 <= index < count")
        mine = self._questions[index::count]
        requests = [r for q in mine for r in self._requests[q.first: q.first + q.n_choices]]
        lls = ScoreFnScorer(score_fn, **self._scorer_args).loglikelihood_tokens(requests)
        out, at = [], 0
        for q in mine:
            out.append((q.task, q.answer, lls[at: at + q.n_choices]))
            at += q.n_choices
        return out

    def counts(self, score_fn: ScoreFn, shard: tuple[int, int] = (0, 1)) -> dict[str, tuple[int, int]]:
        """{task: (correct, total)} over this shard's questions (shard = (index, count))."""
        out = {s.name: [0, 0] for s in self.specs}
        for task, answer, lls in self.scores(score_fn, shard):
            out[task][0] += int(max(range(len(lls)), key=lls.__getitem__) == answer)
            out[task][1] += 1
        return {k: (c, n) for k, (c, n) in out.items()}

    def run(self, score_fn: ScoreFn) -> dict[str, float]:
        """{task: accuracy} over all questions."""
        return accuracies_from_counts(self.counts(score_fn))


def accuracies_from_counts(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    return {k: (c / n if n else float("nan")) for k, (c, n) in counts.items()}


def _record_requests(specs: list[TaskSpec]):
    """Per spec: [(gold index, [(context, continuation) per choice]) per question] via lm-eval."""
    import warnings

    from lm_eval.api.model import LM
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from megasyne.eval.runner import _quiet_lm_eval

    recorded: dict[str, dict[int, dict]] = {}

    class Recorder(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            for r in requests:
                q = recorded.setdefault(r.task_name, {}).setdefault(
                    r.doc_id, {"answer": int(r.doc["answer"]), "pairs": {}})
                q["pairs"][r.idx] = r.args
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    _quiet_lm_eval()
    built = []
    for s in specs:
        tasks, _ = build_lm_eval_configs(s)
        built.extend(tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task_dict = get_task_dict([t.config for t in built], TaskManager(include_defaults=False))
        evaluate(Recorder(), task_dict, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    for s in specs:
        questions = []
        for t in (t for t in built if t.spec is s):
            for doc_id in sorted(recorded.get(t.lm_name, {})):
                q = recorded[t.lm_name][doc_id]
                questions.append((q["answer"], [q["pairs"][i] for i in sorted(q["pairs"])]))
        if not questions:
            raise EvalConfigError(f"InTrainingEval: task '{s.name}' has no questions")
        yield s, questions
