"""A real model end to end: SmolLM2-135M-Instruct, HF original vs its megasyne checkpoint.

On the fixture (every benchmark format; examples/eval/make_fixture.py), the converted
checkpoint gets the same prompts and the same scores as the HF original:
- loaded directly into the Megatron-Core training model (tools/evaluate.py --load megatron):
  same prompts, same predictions, same generations, log-likelihoods within fp32 noise;
- exported back to HF (the --load export path): identical to the last bit;
- in training: InTrainingEval with the Megatron scorer's score_fn counts what the offline run counts.
One multiple-choice result is recomputed by hand with plain transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megasyne.eval.in_training import InTrainingEval
from megasyne.eval.lm import hf_model_scorer
from megasyne.eval.runner import evaluate, read_results, run_tasks
from megasyne.eval.tasks import TaskSpec, load_task_file
from megasyne.scorers import score_fn
from tests.eval.megatron_worker import IN_TRAINING_ITEMS, IN_TRAINING_TASKS
from tests.launch import REPO_ROOT

pytestmark = pytest.mark.slow
# Megatron vs transformers eager attention, fp32: measured identical on CPU (max |diff| 0.0,
# as the logits in tests/checkpoint); other kernels (GPU, other BLAS) may differ by ~1e-4.
LOGLIK_TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's models run on one thread (a 135M model gains little from a second one,
    and the Megatron worker runs beside it); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smol(smollm2_hf, smollm2_megasyne, fixture_tasks, tmp_path_factory):
    # smollm2_megasyne (tests/conftest.py): tools/convert_hf.py hf-to-megasyne --tp 1 of smollm2_hf
    out = tmp_path_factory.mktemp("smol_eval")
    # The Megatron side runs in a child process (one thread) while this one runs the HF
    # original: the two share the 2 cores instead of waiting for each other.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    worker = subprocess.Popen([sys.executable, "tests/eval/megatron_worker.py", str(smollm2_megasyne),
                               str(fixture_tasks), str(out)], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        scorer = hf_model_scorer(smollm2_hf)
        specs = load_task_file(fixture_tasks)
        hf = evaluate(scorer, specs, name="hf", model={"kind": "hf"}, allow_code_execution=True)
    finally:
        log, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, f"megatron_worker.py failed:\n{log[-8000:]}"
    return dict(hf=hf, megatron=read_results(out / "megatron.json"), scorer=scorer, specs=specs,
                in_training=json.loads((out / "in_training.json").read_text()),
                ms=smollm2_megasyne, hf_dir=smollm2_hf)


def test_megasyne_checkpoint_scores_equal_the_hf_original(smol):
    hf, ms = smol["hf"], smol["megatron"]
    assert ms["model"]["kind"] == "megasyne" and ms["model"]["load"] == "megatron"
    assert list(ms["tasks"]) == list(hf["tasks"]) == ["mmlu", "ceval", "cmmlu", "scieval", "gsm8k",
                                                      "math", "humaneval", "mbpp"]
    for task in hf["tasks"]:
        a, b = hf["items"][task], ms["items"][task]
        assert [i["id"] for i in a] == [i["id"] for i in b] and a, task
        for x, y in zip(a, b):
            assert x["prompt_sha256"] == y["prompt_sha256"], (task, x["id"])  # same prompt
            assert (x.get("pred"), x["correct"], x.get("generation")) == \
                   (y.get("pred"), y["correct"], y.get("generation")), (task, x["id"])
            if "logliks" in x:
                diff = max(abs(p - q) for p, q in zip(x["logliks"], y["logliks"]))
                assert diff < LOGLIK_TOL, (task, x["id"], x["logliks"], y["logliks"])
        assert hf["tasks"][task]["score"] == ms["tasks"][task]["score"], task
    # the generative tasks really generated something, and the program really ran
    assert all(i["generation"].strip() for t in ("gsm8k", "math", "humaneval", "mbpp")
               for i in hf["items"][t])
    assert all(i["status"] == "passed" or i["status"].startswith(("failed: ", "timed out"))
               for t in ("humaneval", "mbpp") for i in hf["items"][t])


def test_exported_checkpoint_is_identical(smol, tmp_path):
    from megasyne.checkpoint.hf_convert import megasyne_to_hf

    exported = megasyne_to_hf(smol["ms"], tmp_path / "hf", tokenizer_dir=smol["hf_dir"],
                              progress=False)
    specs = [dataclasses.replace(s, max_items=1) for s in smol["specs"] if s.name in ("mmlu", "gsm8k")]
    got = run_tasks(hf_model_scorer(exported), specs)
    for task in ("mmlu", "gsm8k"):
        assert got["items"][task] == smol["hf"]["items"][task][:1]


def test_in_training_scores_equal_the_offline_run(smol):
    offline = [(t, i["target"], i["logliks"]) for t in IN_TRAINING_TASKS
               for i in smol["hf"]["items"][t][:IN_TRAINING_ITEMS]]
    evaluator = InTrainingEval(tasks=[s for s in smol["specs"] if s.name in IN_TRAINING_TASKS],
                               tokenizer_path=smol["hf_dir"], max_items=IN_TRAINING_ITEMS)
    for scores in (smol["in_training"],  # the Megatron scorer's score_fn (worker)
                   evaluator.scores(score_fn(smol["scorer"].model))):  # the HF scorer's
        assert [(t, a) for t, a, _ in scores] == [(t, a) for t, a, _ in offline]
        for (_, _, got), (_, _, ref) in zip(scores, offline):
            assert max(abs(x - y) for x, y in zip(got, ref)) < LOGLIK_TOL, (got, ref)


def test_multiple_choice_score_checked_by_hand(smol, fixture_dir):
    """Three MMLU-format questions, 1-shot: prompts written out, log-likelihoods by plain torch."""
    spec = TaskSpec(name="astro", format="mmlu", path=fixture_dir / "mmlu", num_fewshot=1,
                    subjects=("astronomy",))
    got = run_tasks(smol["scorer"], [spec])
    head = ("The following are multiple choice questions (with answers) about astronomy.\n\n"
            "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n")
    questions = [
        ("Which planet is the largest in the Solar System?\nA. Earth\nB. Mars\nC. Jupiter\nD. Venus", 2),
        ("What does the Moon orbit?\nA. The Sun\nB. The Earth\nC. Mars\nD. Jupiter", 1),
        ("Which of these is a star, not a planet?\nA. Venus\nB. Sirius\nC. Mars\nD. Saturn", 1),
    ]
    tokenizer, model = smol["scorer"].tokenizer, smol["scorer"].model.model
    letters = [tokenizer(" " + x, add_special_tokens=False)["input_ids"] for x in "ABCD"]
    assert all(len(ids) == 1 for ids in letters)  # " A" .. " D" are single tokens
    correct = 0
    for item, (question, gold) in zip(got["items"]["astro"], questions):
        context = tokenizer(head + question + "\nAnswer:")["input_ids"]  # SmolLM2 adds no BOS
        for ids in letters:  # encoding the whole adds exactly the letter's token
            assert tokenizer(head + question + "\nAnswer:" + tokenizer.decode(ids))["input_ids"] == context + ids
        with torch.no_grad():
            logp = model(torch.tensor([context])).logits[0, -1].log_softmax(-1)
        lls = [logp[ids[0]].item() for ids in letters]
        pred = max(range(4), key=lls.__getitem__)
        correct += pred == gold
        assert item["pred"] == pred and item["target"] == gold
        assert max(abs(a - b) for a, b in zip(item["logliks"], lls)) < 1e-4, (item["logliks"], lls)
    assert got["tasks"]["astro"]["n"] == 3
    assert got["tasks"]["astro"]["score"] == correct / 3
