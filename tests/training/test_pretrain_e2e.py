"""pretrain_syne.py end to end on 2 gloo ranks over real data (the bundled tiny corpus).

One uninterrupted TP2 run is the reference. Against it:
- a run SIGKILLed mid-training and relaunched gives bit-identical per-step losses, grad
  norms and data fingerprints (no sample repeated or skipped), and no duplicated log lines;
- a run resumed from the reference's step-4 checkpoint at PP2 continues within 1e-5;
- a stage-I-only run (stop_after_stage) continued into stage II equals the reference;
- a NaN step is skipped (weights unchanged), too many in a row abort with a clear message;
- per-source losses average back to the total, per-source token counts equal the index's,
  and the LR follows the global WSD schedule, then stage II's own cosine schedule.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from tests.launch import REPO_ROOT
from tests.training.pretrain_launch import SEQ, STAGE1_STEPS, STEPS, G, launch, make_run_files, records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_run_files(root)
    ref = launch(root, "ref")
    assert ref.returncode == 0, ref.stderr[-6000:]
    return root


def test_reference_run_reports_consistent_losses_and_follows_the_schedules(setup):
    from megasyne.data.dataset import MixtureDataset
    from megasyne.training.schedule import ScheduleConfig, lr_at

    recs = records(setup, "ref")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert [r["stage"] for r in recs] == ["stage1"] * STAGE1_STEPS + ["stage2"] * (STEPS - STAGE1_STEPS)
    index = MixtureDataset(setup / "ref" / "index")
    for r in recs:
        # Per-source losses average back to the total, weighted by their tokens ...
        toks = r["source_tokens"]
        mean = sum(r["source_loss"][s] * toks[s] for s in r["source_loss"]) / sum(toks.values())
        # (the total is summed in fp32 on each rank, the per-source table in fp64)
        assert math.isclose(mean, r["loss"], rel_tol=1e-6), r
        # ... and the tokens per source are what the index put into this step.
        ids = index.source_id[(r["step"] - 1) * G:r["step"] * G]
        want = {s: int(np.sum(np.asarray(ids) == k)) * SEQ for k, s in enumerate(index.source_names)}
        assert toks == want
        assert r["consumed_samples"] == r["step"] * G and r["consumed_tokens"] == r["step"] * G * SEQ
    wsd = ScheduleConfig(kind="wsd", warmup_steps=2, decay_steps=3, decay_shape="1-sqrt")
    cos = ScheduleConfig(kind="cosine", warmup_steps=1)
    want_lr = [lr_at(s, peak_lr=2e-3, min_lr=2e-4, total_steps=STEPS, schedule=wsd)
               for s in range(STAGE1_STEPS)]
    want_lr += [lr_at(s, peak_lr=1e-3, min_lr=1e-4, total_steps=STEPS - STAGE1_STEPS, schedule=cos)
                for s in range(STEPS - STAGE1_STEPS)]
    assert [r["lr"] for r in recs] == pytest.approx(want_lr, rel=1e-12)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.25  # it learns (6.25 -> 5.87 measured)
    assert (setup / "ref" / "config.yaml").exists()
    assert sorted(p.name for p in (setup / "ref" / "checkpoints").glob("iter_*")) == \
        [f"iter_{s:07d}" for s in range(2, STEPS + 1, 2)]


def _same_steps(a: list[dict], b: list[dict], keys=("loss", "grad_norm", "data_crc", "source_loss")):
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])


def test_sigkill_and_resume_is_bit_identical(setup):
    killed = launch(setup, "killed", kill_at_step=5)
    assert killed.returncode != 0
    partial = records(setup, "killed")
    assert 5 <= len(partial) < STEPS, "the job was not killed mid-run"
    resumed = launch(setup, "killed")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "resumed from" in resumed.stdout
    _same_steps(records(setup, "ref"), records(setup, "killed"))


def test_async_save_killed_while_writing_then_resumed_is_bit_identical(setup):
    """async_save: the step-4 checkpoint's background write is held back (testing hook) and
    the job SIGKILLed at step 5 while it is pending: 'latest' still names step 2 (itself
    written in the background), and the relaunch resumes from it, saving in the background
    again, onto the reference's losses, data and final weights, every checkpoint intact."""
    from megasyne.checkpoint import dist as ckpt
    from megasyne.checkpoint.hf import param_maps
    from megasyne.checkpoint.hf_convert import MegasyneCheckpoint

    killed = launch(setup, "async", "async_save=true", "fault_slow_async_write=[4]",
                    kill_at_step=5)
    assert killed.returncode != 0
    assert 5 <= len(records(setup, "async")) < STEPS, "the job was not killed mid-run"
    root = setup / "async" / "checkpoints"
    assert "iter_0000002 (written in the background" in killed.stdout
    assert (root / "latest").read_text() == "iter_0000002\n"
    assert (root / "iter_0000004.tmp").is_dir() and not (root / "iter_0000004").exists()
    resumed = launch(setup, "async", "async_save=true")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert f"resumed from {root / 'iter_0000002'} at step 2" in resumed.stdout
    _same_steps(records(setup, "ref"), records(setup, "async"))
    assert sorted(p.name for p in root.iterdir()) == \
        [f"iter_{s:07d}" for s in range(2, STEPS + 1, 2)] + ["latest"]  # no .tmp left
    assert (root / "latest").read_text() == f"iter_{STEPS:07d}\n"  # published before the exit
    for path in ckpt.complete_checkpoints(root):
        ckpt.verify_checkpoint(path)
    got, want = MegasyneCheckpoint(root), MegasyneCheckpoint(setup / "ref" / "checkpoints")
    for pm in param_maps(got.config):
        assert torch.equal(got.read(pm.megatron), want.read(pm.megatron)), pm.megatron


def test_resume_at_another_layout_tp2_to_pp2(setup):
    (setup / "pp" / "checkpoints").mkdir(parents=True)
    shutil.copytree(setup / "ref" / "checkpoints" / "iter_0000004",
                    setup / "pp" / "checkpoints" / "iter_0000004")
    (setup / "pp" / "checkpoints" / "latest").write_text("iter_0000004")
    proc = launch(setup, "pp", "parallel.tp=1", "parallel.pp=2")
    assert proc.returncode == 0, proc.stderr[-6000:]
    ref, got = records(setup, "ref")[4:], records(setup, "pp")
    assert [r["step"] for r in got] == list(range(5, STEPS + 1))
    for ra, rb in zip(ref, got):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
        assert rb["data_crc"] == ra["data_crc"]  # same DP size: same samples in the same order


def test_stage_one_alone_then_stage_two(setup):
    first = launch(setup, "staged", "stop_after_stage=stage1")
    assert first.returncode == 0, first.stderr[-6000:]
    assert [r["step"] for r in records(setup, "staged")] == list(range(1, STAGE1_STEPS + 1))
    assert "stage stage1 done" in first.stdout
    second = launch(setup, "staged")
    assert second.returncode == 0, second.stderr[-6000:]
    _same_steps(records(setup, "ref"), records(setup, "staged"))


def test_nan_step_is_skipped_without_touching_the_weights(setup):
    from megasyne.checkpoint.hf import param_maps
    from megasyne.checkpoint.hf_convert import MegasyneCheckpoint

    proc = launch(setup, "nan", "fault_nan_steps=[3]", "train_steps=3")
    assert proc.returncode == 0, proc.stderr[-6000:]
    recs = records(setup, "nan")
    assert [r["skipped"] for r in recs] == [False, False, True] and recs[2]["skipped_steps"] == 1
    assert math.isnan(recs[2]["loss"]) and recs[2]["grad_norm"] is None
    after_skip = MegasyneCheckpoint(setup / "nan" / "checkpoints" / "iter_0000003")
    ref_step2 = MegasyneCheckpoint(setup / "ref" / "checkpoints" / "iter_0000002")
    for pm in param_maps(after_skip.config):
        assert torch.equal(after_skip.read(pm.megatron), ref_step2.read(pm.megatron)), pm.megatron


def _error_lines(proc) -> int:
    return sum(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_too_many_nan_steps_in_a_row_abort_with_a_message(setup):
    proc = launch(setup, "abort", "fault_nan_steps=[2,3]", "max_nonfinite_in_a_row=2")
    assert proc.returncode != 0
    assert "2 consecutive steps with a non-finite loss (last at step 3)" in proc.stderr
    assert _error_lines(proc) == 1 and "error: training aborted: 2 consecutive" in proc.stderr


def test_bad_stage_name_fails_before_training(setup):
    proc = launch(setup, "badstage", "stop_after_stage=stage9")
    assert proc.returncode != 0
    assert "no stage 'stage9'" in proc.stderr and "['stage1', 'stage2']" in proc.stderr
    assert _error_lines(proc) == 1  # rank 0 says it; rank 1 fails alike, quietly
    assert not (setup / "badstage" / "metrics.jsonl").exists()


def test_data_tokenised_for_a_larger_vocabulary_fails_before_training(setup):
    proc = launch(setup, "badvocab", "model_overrides.vocab_size=256")
    assert proc.returncode != 0  # (each rank exits 2; torchrun reports 1)
    assert "en_drama_text_document was tokenised with" in proc.stderr
    assert "(vocabulary 512) but the model's vocab_size is 256" in proc.stderr
    assert _error_lines(proc) == 1
    assert not (setup / "badvocab" / "metrics.jsonl").exists()


def test_training_starts_from_a_converted_hugging_face_checkpoint(setup):
    """model: init_checkpoint takes the architecture from convert_hf's manifest; the first
    step's loss (TP2, before any update) equals transformers' on the same 8 samples."""
    import transformers

    from megasyne.checkpoint.hf_convert import hf_to_megasyne
    from megasyne.data.dataset import MixtureDataset

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=20000.0)).eval()
    hf.save_pretrained(setup / "hf_init")
    hf_to_megasyne(setup / "hf_init", setup / "ms_init", progress=False)
    # benchmark accuracy inside training, on 3 MMLU-format fixture questions
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(setup / "tokenizer.json"), bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>").save_pretrained(setup / "hf_init")
    (setup / "bench.yaml").write_text(yaml.safe_dump(dict(
        data_root=str(REPO_ROOT / "examples" / "eval" / "fixture"),
        tasks=[dict(name="mmlu", format="mmlu", path="mmlu", num_fewshot=1, max_items=3)])))
    bench = dict(tasks=str(setup / "bench.yaml"), tokenizer=str(setup / "hf_init"),
                 interval_steps=1, max_items=3, max_length=SEQ, batch_size=4)
    proc = launch(setup, "from_hf", "model=init_checkpoint", f"init_checkpoint={setup / 'ms_init'}",
                  "train_steps=1", f"bench_eval={json.dumps(bench)}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "initial weights from" in proc.stdout
    recs = records(setup, "from_hf")
    assert [r["step"] for r in recs] == [0, 1] and set(recs[1]["bench"]) == {"mmlu"}
    loss = recs[1]["loss"]
    tokens = torch.from_numpy(np.stack([MixtureDataset(setup / "from_hf" / "index")[i]["tokens"]
                                        for i in range(G)]))
    with torch.no_grad():
        logits = hf(input_ids=tokens[:, :-1]).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1))
    assert loss == pytest.approx(ref.item(), abs=1e-5)
    # Step 0 (the converted weights): the same accuracy as the HF original, offline.
    from megasyne.eval.in_training import InTrainingEval
    from megasyne.scorers import HFScorer, score_fn

    offline = InTrainingEval(tasks=str(setup / "bench.yaml"), tokenizer_path=setup / "hf_init",
                             max_items=3, max_length=SEQ, batch_size=4)
    assert recs[0]["bench"] == offline.run(score_fn(HFScorer(hf)))
    # The same at PP2 (the pipeline schedule's forward-only pass scores the questions).
    pp = launch(setup, "from_hf_pp2", "model=init_checkpoint",
                f"init_checkpoint={setup / 'ms_init'}", "train_steps=1", "parallel.tp=1",
                "parallel.pp=2", f"bench_eval={json.dumps(bench)}")
    assert pp.returncode == 0, pp.stderr[-6000:]
    pp_recs = records(setup, "from_hf_pp2")
    assert pp_recs[0]["bench"] == recs[0]["bench"]
    assert pp_recs[1]["loss"] == pytest.approx(ref.item(), abs=1e-5)
    # the architecture really came from the checkpoint (rope_theta 20000 is in no preset)
    saved = yaml.safe_load((setup / "from_hf" / "config.yaml").read_text())
    assert saved["model"] == "init_checkpoint"


def test_bf16_run_from_initial_weights_updates_those_weights(setup):
    """bf16 with fp32 master weights from init_checkpoint: the optimizer's fp32 copies are made
    when it is built, before the initial weights are loaded, so they must be refreshed from
    them; otherwise the first update writes the random-init masters back into the model (a
    CPT run silently restarts from scratch). One update with LR 2e-3 moves each weight by
    ~2e-3 (Adam's first step), far below the ~0.03 between two random inits."""
    from megasyne.checkpoint.hf import param_maps
    from megasyne.checkpoint.hf_convert import MegasyneCheckpoint

    if not (setup / "ms_init").exists():
        pytest.skip("needs the converted checkpoint of the from-HF test (same module)")
    proc = launch(setup, "from_init_bf16", "model=init_checkpoint", "dtype=bf16",
                  f"init_checkpoint={setup / 'ms_init'}", "train_steps=1", "data_prefetch=0")
    assert proc.returncode == 0, proc.stderr[-6000:]
    init = MegasyneCheckpoint(setup / "ms_init")
    trained = MegasyneCheckpoint(setup / "from_init_bf16" / "checkpoints")
    worst = {}
    for pm in param_maps(init.config):
        a, b = init.read(pm.megatron).float(), trained.read(pm.megatron).float()
        rows = min(a.shape[0], b.shape[0])  # the vocabulary may be padded differently
        worst[pm.megatron] = (a[:rows] - b[:rows]).abs().max().item()
    assert max(worst.values()) < 1e-2, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert max(worst.values()) > 0  # it did train


def test_bf16_with_fp32_master_weights_follows_the_fp32_run(setup):
    proc = launch(setup, "bf16", "dtype=bf16", "train_steps=3")
    assert proc.returncode == 0, proc.stderr[-6000:]
    got, ref = records(setup, "bf16"), records(setup, "ref")[:3]
    # bf16 weights and activations with fp32 master weights: measured within 5e-4 of the
    # fp32 run over 3 steps (the LR-2e-3 updates are kept in the fp32 master copy).
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], abs=5e-3)
    from megasyne.checkpoint.hf_convert import MegasyneCheckpoint

    assert MegasyneCheckpoint(setup / "bf16" / "checkpoints").validate() == torch.bfloat16


def test_trainer_with_the_triton_kernels_follows_the_torch_run_and_checkpoints(setup):
    """The trainer with all our kernels on (RMSNorm, the fused residual-add + RMSNorm layer,
    cross-entropy, RoPE, SwiGLU; Triton interpreter on CPU, TP2) for one step: the
    reference's (torch ops) loss (the kernels' forward) and grad norm (their backward); its
    checkpoint, holding the update made from the kernels' gradients, then resumes with the
    kernels off through both stages onto the reference's losses. (One kernel step, not all of
    stage I: under the interpreter each step takes tens of seconds on 2 cores; a second one
    would only repeat the same kernels' checks on other weights.)"""
    kernel_steps = 1
    proc = launch(setup, "kernels", "triton_kernels=true", f"exit_at_step={kernel_steps}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    ref, got = records(setup, "ref"), records(setup, "kernels")
    assert [r["step"] for r in got] == list(range(1, kernel_steps + 1))
    # fp32; the kernels sum in another order than torch's ops (measured within 1e-6).
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref[:kernel_steps]],
                                                     abs=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx(
        [r["grad_norm"] for r in ref[:kernel_steps]], rel=1e-5)
    assert [r["data_crc"] for r in got] == [r["data_crc"] for r in ref[:kernel_steps]]
    proc = launch(setup, "kernels", "triton_kernels=false")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resumed from" in proc.stdout
    got = records(setup, "kernels")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got[kernel_steps:]] == pytest.approx(
        [r["loss"] for r in ref[kernel_steps:]], abs=1e-5)


def test_prefetch_reads_the_same_data_and_hides_a_slow_reader(setup):
    """The reference reads ahead (data_prefetch: 2 by default); a run reading each step's
    batch synchronously (0) logs the same data and losses at every step, across the stage
    boundary. With a slow reader and a long step (testing hooks: every read sleeps 0.8 s,
    every step 0.8 s more, long against the tiny model's step even on a loaded machine) the
    read-ahead run's step takes about the longer of the two, not their sum, and the logged
    wait for data says which is which: the whole read synchronously, ~0 read ahead. The
    read-ahead run is preempted (SIGTERM) with reads in flight: it checkpoints and exits 0."""
    read_s, compute_s, steps = 0.8, 0.8, STAGE1_STEPS + 1
    slow = (f"fault_data_read_delay_s={read_s}", f"fault_step_delay_s={compute_s}")
    proc = launch(setup, "sync_read", "data_prefetch=0", f"exit_at_step={steps}", *slow)
    assert proc.returncode == 0, proc.stderr[-6000:]
    proc = launch(setup, "prefetch_slow", "data_prefetch=2", *slow, term_at_step=5)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "SIGTERM received: checkpointed at step" in proc.stdout
    sync, pre = records(setup, "sync_read"), records(setup, "prefetch_slow")
    assert len(sync) == steps and 5 <= len(pre) < STEPS, "the run was not preempted mid-run"
    _same_steps(records(setup, "ref")[:steps], sync)
    _same_steps(records(setup, "ref")[:len(pre)], pre)
    assert (setup / "prefetch_slow" / "checkpoints" / "latest").read_text().strip() == \
        f"iter_{len(pre):07d}"
    for r in sync + pre:  # tokens/s (and MFU) from the wall time, data wait included
        assert r["tokens_per_s"] == pytest.approx(G * SEQ / r["step_time_s"], rel=1e-9)
        assert r["step_time_s"] >= r["data_wait_ms"] / 1e3 + compute_s
    # Every synchronous step waits for its whole read; read ahead, only the first step does.
    assert min(r["data_wait_ms"] for r in sync) >= 1e3 * read_s
    assert pre[0]["data_wait_ms"] >= 1e3 * read_s
    waits = [r["data_wait_ms"] for r in pre[1:]]
    assert sum(waits) / len(waits) < 0.1 * 1e3 * read_s, waits

    def mean(values):
        return sum(values) / len(values)

    # The read-ahead run's steps against the same steps with their reads not overlapped
    # (read + the step's own compute, measured in that run: no run-to-run load noise).
    step = mean([r["step_time_s"] for r in pre[1:]])
    serial = mean([read_s + r["step_time_s"] - r["data_wait_ms"] / 1e3 for r in pre[1:]])
    assert step < 0.75 * serial, (step, serial)
    assert mean([r["step_time_s"] for r in sync[1:]]) >= read_s + compute_s
    assert step < mean([r["step_time_s"] for r in sync[1:]]) - 0.25 * read_s
