"""tools/score_ppl.py: per-document perplexity through a megasyne checkpoint equals transformers'.

One tiny random Llama (4 layers, GQA 4 heads / 2 groups, vocabulary 300: padded to 384 at TP1 and
512 at TP2, so the padding columns must be kept out of the softmax), its output layer scaled up
so perplexities differ a lot between documents. 23 documents of 1..129 random tokens (one of a
single token: nothing to score), windows of 48 tokens every 32 (documents up to 4 windows).

The model is converted in the test process (the streaming single-process path), which then
scores once at 1 rank, uninterrupted (``ppl_1rank``, the baseline every other run must equal).
Launches: one 4-rank torchrun job scores at TP2 x DP2, PP2 x DP2 (3 micro-batches through the
pipeline schedule) and DP4 (blocks dealt to four replicas), meets a state directory left by a run
of another model (refused on every rank), then starts a TP2 x DP2 run that
SIGKILLs every rank once each replica has saved 2 of its 4 blocks; one 2-rank torchrun run of the
tool (DP2, another layout) resumes it; two plain runs of the tool: one SIGKILLed after 2 of its
4 blocks, one that resumes it. The reference is transformers' own strided-window recipe,
computed in the test process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megasyne.checkpoint.hf_convert import hf_to_megasyne
from megasyne.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megasyne.data.metadata import list_metadata_fields, read_metadata_field
from megasyne.scorers import MegatronScorer
from megasyne.syne.blocks import BlockStateError, BlockStore, KillAfterBlocks
from megasyne.syne.ppl import (
    ScoreConfig,
    ScoreError,
    document_tokens,
    plan_windows,
    reference_perplexity,
    run_score,
)
from tests.launch import REPO_ROOT, run_torchrun

WINDOW, STRIDE = 48, 32
REL_TOL = 1e-3  # the bound examples/syne/README.md states; fp32 on both sides measures ~1e-6
SAME_TOL = 1e-5  # megasyne at another layout or batching vs megasyne at 1 rank (fp32 rounding)
LAYOUTS = ["tp2dp2:2:1:5", "pp2dp2:1:2:5", "dp4:1:1:3"]
FOREIGN = "foreign:1:1:5"  # DP4 into a state directory of another model's run
CRASH = "crash:2:1:3:2"  # TP2 x DP2, 8 blocks of 3 documents: killed at 2 blocks per replica


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))


def _tool(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "tools/score_ppl.py", *map(str, args)], cwd=REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("score_ppl")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked predictions: ppl from ~10 to ~1e3 per document
    model.save_pretrained(root / "hf")
    rng = np.random.default_rng(1)
    lengths = [1, *rng.integers(2, 130, 22)]
    with IndexedDatasetWriter(root / "docs", np.uint16) as w:
        for n in lengths:
            w.add_document(rng.integers(0, 300, int(n)))
    prefix = str(root / "docs")
    ds = IndexedDataset(prefix)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    ref = np.array([reference_perplexity(hf, document_tokens(ds, d), WINDOW, STRIDE)
                    for d in range(ds.num_documents)])
    env = dict(os.environ)
    try:  # conversion and scorer open (and close) a 1-rank gloo group; keep its env out of later runs
        hf_to_megasyne(root / "hf", root / "ms", progress=False)
        scorer = MegatronScorer.from_checkpoint(root / "ms", micro_batch_size=2)
        try:
            run_score(ScoreConfig(prefix=prefix, field="ppl_1rank", window=WINDOW, stride=STRIDE,
                                  batch_size=5, block_size=100, progress=False), scorer)
        finally:
            scorer.close()
    finally:
        os.environ.clear()
        os.environ.update(env)
    foreign = BlockStore(f"{prefix}.meta/.ppl_foreign.partial", config={"model": "another"},
                         num_items=ds.num_documents, block_size=5)
    crash = run_torchrun(REPO_ROOT / "tests/syne/score_worker.py", 4, root / "ms", prefix,
                         *LAYOUTS, FOREIGN, CRASH, timeout=600, check=False)
    crash_state = f"{prefix}.meta/.ppl_crash.partial"
    return dict(root=root, prefix=prefix, ref=ref, ms=root / "ms", hf_model=hf, crash=crash,
                foreign=foreign,
                crash_state=crash_state, crash_files=sorted(os.listdir(crash_state)),
                one_rank=read_metadata_field(prefix, "ppl_1rank"))


def _check(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.isinf(got[0]) and np.isinf(ref[0])  # the 1-token document: nothing to score
    rel = np.abs(got[1:].astype(np.float64) / ref[1:] - 1)
    assert rel.max() < REL_TOL, f"max relative difference {rel.max():.3g} at document {rel.argmax() + 1}"
    return float(rel.max())


def _same(got: np.ndarray, base: np.ndarray) -> float:
    """Equal to the 1-rank scores up to fp32 rounding (+inf where nothing was scored)."""
    assert got.shape == base.shape and np.array_equal(np.isinf(got), np.isinf(base))
    finite = np.isfinite(base)
    rel = np.abs(got[finite].astype(np.float64) / base[finite] - 1)
    assert rel.max() < SAME_TOL, f"max relative difference {rel.max():.3g} from the 1-rank run"
    return float(rel.max())


def test_one_rank_matches_transformers(work):
    _check(work["one_rank"], work["ref"])


def test_reference_is_not_trivial(work):
    ref = work["ref"][1:]
    assert ref.max() / ref.min() > 3, ref  # documents really differ, a mix-up would show


def test_windows_follow_transformers_recipe():
    assert plan_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert plan_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert plan_windows(1, 4, 2) == [] and plan_windows(5, 8, 8) == [(0, 5, 1)]
    for n in range(2, 40):  # stride < window: every token 1..n-1 scored exactly once
        scored = [t for _, end, first in plan_windows(n, 7, 5) for t in range(first, end)]
        assert scored == list(range(1, n))


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [s.split(":")[0] for s in LAYOUTS])
def test_four_ranks_match_one_rank_and_transformers(work, layout):
    got = read_metadata_field(work["prefix"], f"ppl_{layout}")
    _check(got, work["ref"])
    _same(got, work["one_rank"])


@pytest.mark.distributed
def test_job_killed_under_torchrun_resumes_at_another_layout(work):
    """The TP2 x DP2 job dies by SIGKILL with blocks 0-3 on disk (2 per replica); a DP2 run of
    the tool scores only blocks 4-7 and publishes a field equal to the uninterrupted run's. A
    finished block is proven reused, not rescored: block 1 is doctored on disk (every NLL sum
    + ln 2 per scored token), and exactly its documents come out with twice the perplexity."""
    crash, prefix, state = work["crash"], work["prefix"], work["crash_state"]
    assert crash.returncode != 0 and "SIGKILL" in crash.stderr, crash.stderr[-3000:]
    blocks = [f"block_{b:08d}.npz" for b in range(4)]
    assert work["crash_files"] == [*blocks, "run.json"], work["crash_files"]
    assert "ppl_crash" not in list_metadata_fields(prefix)  # nothing published by the dead job
    with np.load(f"{state}/{blocks[1]}") as z:
        nll_sum, count = z["nll_sum"], z["count"]
    with open(f"{state}/{blocks[1]}", "wb") as f:
        np.savez(f, nll_sum=nll_sum + count * np.log(2.0), count=count)
    proc = run_torchrun(REPO_ROOT / "tools/score_ppl.py", 2, "--data-prefix", prefix,
                        "--checkpoint", work["ms"], "--field", "ppl_crash", "--window", WINDOW,
                        "--stride", STRIDE, "--batch-size", 5, "--block-size", 3, "--no-progress")
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert (report["blocks"], report["blocks_resumed"], report["dp_size"],
            report["blocks_scored_by_rank0"]) == (8, 4, 2, 2)  # rank 0: blocks 4 and 6
    assert not os.path.exists(state)
    got, expected = read_metadata_field(prefix, "ppl_crash"), work["one_rank"].copy()
    expected[3:6] *= 2  # block 1: documents 3..5, as doctored
    _same(got, expected)
    got[3:6] /= 2
    _check(got, work["ref"])


@pytest.mark.distributed
def test_state_of_another_run_is_refused_on_every_rank(work):
    """Rank 0 alone reads run.json first; its refusal must reach ranks 1-3 (they would otherwise
    wait for rank 0 at a barrier until torchrun or a collective timeout stopped them)."""
    # torchrun merges the ranks' stdout: two ranks' lines can come out glued on one line.
    refused = sorted(re.findall(r"rank (\d) refused ppl_foreign: (.*?discard its finished blocks)",
                                work["crash"].stdout))
    assert [rank for rank, _ in refused] == ["0", "1", "2", "3"], work["crash"].stdout[-3000:]
    assert all("another configuration" in msg and "'model'" in msg for _, msg in refused), refused
    assert "ppl_foreign" not in list_metadata_fields(work["prefix"])
    assert work["foreign"].done_blocks() == set() and (work["foreign"].dir / "run.json").is_file()


def test_killed_run_resumes_and_matches_transformers(work):
    prefix, ms = work["prefix"], work["ms"]
    args = ["--data-prefix", prefix, "--checkpoint", ms, "--window", WINDOW, "--stride", STRIDE,
            "--batch-size", 5, "--block-size", 7, "--no-progress"]
    killed = _tool(*args, "--debug-kill-after-blocks", 2, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no clean-up ran
    state = f"{prefix}.meta/.ppl.partial"
    assert sorted(os.listdir(state)) == ["block_00000000.npz", "block_00000001.npz", "run.json"]
    assert "ppl" not in list_metadata_fields(prefix)  # nothing published by the dead run
    report = json.loads(_tool(*args).stdout.strip().splitlines()[-1])
    assert (report["blocks"], report["blocks_resumed"], report["blocks_scored_by_rank0"]) == (4, 2, 2)
    assert not os.path.exists(state)
    _check(read_metadata_field(prefix, "ppl"), work["ref"])
    _same(read_metadata_field(prefix, "ppl"), work["one_rank"])
    assert report["no_scored_token"] == 1
    with open(f"{prefix}.ppl.report.json") as f:
        assert json.load(f)["tokens_scored"] == report["tokens_scored"]


def test_hf_backend_matches_the_reference(work):
    from megasyne.scorers import HFScorer
    from megasyne.syne.ppl import run_score

    scorer = HFScorer.from_dir(work["root"] / "hf")
    report = run_score(ScoreConfig(prefix=work["prefix"], field="ppl_hf", window=WINDOW,
                                   stride=STRIDE, batch_size=4, block_size=10, progress=False),
                       scorer)
    assert report["model"]["kind"] == "hf"
    _check(read_metadata_field(work["prefix"], "ppl_hf"), work["ref"])


def test_prepend_id_scores_the_first_token(work):
    """With a BOS in front, a document's first token is predicted too (n scored tokens, not n-1)."""
    from megasyne.scorers import HFScorer
    from megasyne.syne.ppl import run_score

    scorer = HFScorer.from_dir(work["root"] / "hf")
    report = run_score(ScoreConfig(prefix=work["prefix"], field="ppl_bos", window=WINDOW,
                                   stride=STRIDE, batch_size=8, block_size=100, prepend_id=299,
                                   progress=False), scorer)
    ds = IndexedDataset(work["prefix"])
    assert report["tokens_scored"] == ds.num_tokens and report["no_scored_token"] == 0
    got = read_metadata_field(work["prefix"], "ppl_bos")
    ref = reference_perplexity(work["hf_model"], np.concatenate([[299], document_tokens(ds, 5)]),
                               WINDOW, STRIDE)
    assert got[5] == pytest.approx(ref, rel=1e-5)


def test_kill_after_more_blocks_than_pending_is_refused(work):
    """3 blocks of 10 documents: a kill after the 4th block could never happen; the run is refused
    before it scores anything (on several ranks a short replica would hang the job)."""
    from megasyne.scorers import HFScorer

    cfg = ScoreConfig(prefix=work["prefix"], field="ppl_refused", window=WINDOW, stride=STRIDE,
                      batch_size=4, block_size=10, progress=False, kill_after_blocks=4)
    with pytest.raises(ScoreError, match=r"--debug-kill-after-blocks 4: .* only 3 of the 3 pending"):
        run_score(cfg, HFScorer.from_dir(work["root"] / "hf"))
    assert os.listdir(cfg.state_path) == ["run.json"]  # nothing scored
    assert "ppl_refused" not in list_metadata_fields(work["prefix"])


def test_kill_hook_refuses_a_replica_short_of_blocks():
    """5 pending blocks dealt to 2 DP replicas: replica 1 gets 2 (blocks 1 and 3), so a kill after
    3 blocks is refused although replica 0 has 3; after 2 it is armed and fires at the 2nd only."""
    barriers = []
    with pytest.raises(ScoreError, match=r"2 workers .* only 2 of the 5 pending"):
        KillAfterBlocks(3, pending=5, workers=2, barrier=lambda: barriers.append(1), error=ScoreError)
    with pytest.raises(ScoreError, match=">= 1"):
        KillAfterBlocks(0, pending=5, workers=2, barrier=lambda: barriers.append(1), error=ScoreError)
    kill = KillAfterBlocks(2, pending=5, workers=2, barrier=lambda: barriers.append(1),
                           error=ScoreError)
    kill.block_done(1)  # not yet: no barrier, no SIGKILL (this test process lives on)
    assert barriers == []


def test_state_of_another_configuration_is_refused(tmp_path):
    BlockStore(tmp_path / "s", config={"window": 48, "model": "a"}, num_items=10, block_size=3)
    with pytest.raises(BlockStateError, match=r"window.*--restart"):
        BlockStore(tmp_path / "s", config={"window": 40, "model": "a"}, num_items=10, block_size=3)
    store = BlockStore(tmp_path / "s", config={"window": 40, "model": "a"}, num_items=10,
                       block_size=3, restart=True)
    assert store.num_blocks == 4 and store.pending(1, 2) == [1, 3]
    with pytest.raises(BlockStateError, match="shape"):
        store.save(3, nll_sum=np.zeros(3))  # the last block holds 1 item


def test_bad_options_fail_clearly(work):
    proc = _tool("--data-prefix", work["prefix"], "--hf-dir", work["root"] / "hf", "--tp", "2",
                 check=False)
    assert proc.returncode == 2 and "--tp/--pp/--virtual-pp need a megasyne --checkpoint" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --tp/--pp/--virtual-pp")
    assert sum(line.startswith("error: ") for line in proc.stderr.splitlines()) == 1
    proc = _tool("--data-prefix", work["root"] / "none", "--hf-dir", work["root"] / "hf",
                 check=False)  # fails on the dataset before the model loads
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and \
        f"{work['root'] / 'none'}.idx: no such file" in proc.stderr, proc.stderr[-3000:]
    with pytest.raises(ValueError, match="--stride"):
        ScoreConfig(prefix="x", window=8, stride=9)
