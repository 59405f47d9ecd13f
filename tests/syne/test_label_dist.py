"""tools/label_topics.py label at corpus scale: blocks dealt to torchrun ranks, resumable, and
MiniLM's length-sorted batches.

Fixture: 40 English documents of 1 to 5 labelled paragraphs (so MiniLM batches mix lengths and
documents are cut at --max-tokens), a byte-level BPE trained on them, a MiniLM head trained on the
labelled set. Launches: one uninterrupted single-process run (the reference) and, beside it, one
single-process run SIGKILLed after 2 of its 7 blocks, then ONE 2-rank torchrun job that labels
from scratch, resumes the killed run with another batch size, meets a foreign state directory,
and last is SIGKILLed on both ranks once each has labelled 2 blocks (resumed in the test process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megasyne.data.indexed_dataset import IndexedDatasetWriter
from megasyne.data.metadata import list_metadata_fields, meta_dir, read_metadata_field
from megasyne.syne.blocks import BlockStateError, BlockStore
from megasyne.syne.labeling import LabelConfig, label_dataset, predict_texts
from megasyne.syne.topics import (
    Featurizer,
    TopicClassifier,
    TopicError,
    load_taxonomy,
    minilm_dir,
    read_labelled,
    train_classifier,
)
from tests.launch import REPO_ROOT, run_torchrun

TAXONOMY = REPO_ROOT / "examples/syne/taxonomy.yaml"
LABELLED = REPO_ROOT / "examples/syne/data/topics_labelled.jsonl"
BLOCK, DOCS = 6, 40  # 7 blocks, the last one of 4 documents


def _start(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",  # as torchrun's workers: same float sums
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "tools/label_topics.py", *map(str, args)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, check=True) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if check:
        assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _field_bytes(prefix: str, name: str) -> bytes:
    with open(os.path.join(meta_dir(prefix), f"{name}.npy"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("label_dist")
    tax = load_taxonomy(TAXONOMY)
    paragraphs = [d.text for d in read_labelled(LABELLED, tax, "en")]
    texts = [" ".join(paragraphs[i:i + 1 + i % 5]) for i in range(DOCS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(paragraphs, trainers.BpeTrainer(
        vocab_size=800, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tok.json"))
    prefix = str(root / "en")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for t in texts:
            w.add_document(np.array(tok.encode(t).ids))
    feat = Featurizer("minilm")
    clf = train_classifier(tax["en"], read_labelled(LABELLED, tax, "en"), feat, l2=tax["en"].l2)
    clf.save(root / "head")
    common = ["label", "--head", root / "head", "--data-prefix", prefix, "--tokenizer",
              root / "tok.json", "--block-size", BLOCK, "--max-tokens", 256, "--no-progress"]
    # The reference and the killed run at once: one thread each, the 2 cores both busy; they
    # share only the metadata directory, whose writes take its lock (the killed run publishes
    # nothing anyway).
    reference = _start(*common, "--field", "t1", "--confidence-field", "t1c", "--batch-size", 8)
    try:
        killed = _wait(_start(*common, "--field", "t3", "--confidence-field", "t3c", "--batch-size", 8,
                              "--debug-kill-after-blocks", 2), check=False)
    finally:
        reference = json.loads(_wait(reference).stdout)
    state3 = sorted(os.listdir(meta_dir(prefix) + "/.t3.partial"))
    # a state directory left by a run of another head: every rank must refuse it, none may hang
    BlockStore(meta_dir(prefix) + "/.t4.partial", config={"features": "ngrams"}, num_items=DOCS,
               block_size=BLOCK)
    argv = [*common, "--field", "t2", "--confidence-field", "t2c", "--batch-size", 8, "--",
            *common, "--field", "t3", "--confidence-field", "t3c", "--batch-size", 3, "--",
            *common, "--field", "t4", "--",
            *common, "--field", "t5", "--confidence-field", "t5c", "--batch-size", 8,
            "--debug-kill-after-blocks", 2]
    crash = run_torchrun(REPO_ROOT / "tests/syne/label_worker.py", 2, root / "ranks.json",
                         *map(str, argv), timeout=600, check=False)
    files = [root / f"ranks.json.{r}" for r in range(2)]
    assert all(f.is_file() for f in files), crash.stderr[-8000:]
    ranks = [json.loads(f.read_text()) for f in files]
    assert all(len(r) == 3 for r in ranks), (ranks, crash.stderr[-8000:])  # t5 printed nothing
    state5 = sorted(os.listdir(meta_dir(prefix) + "/.t5.partial"))
    return dict(root=root, prefix=prefix, texts=texts, tok=tok, feat=feat, clf=clf,
                reference=reference, killed=killed, state3=state3, ranks=ranks, crash=crash,
                state5=state5)


def _label_here(work, field: str, tokenizer, **options) -> dict:
    """label_dataset in the test process, with the tool's options of the fixture's runs."""
    from megasyne.data.tokenizers import load_tokenizer

    cfg = LabelConfig(prefix=work["prefix"], field=field, block_size=BLOCK, max_tokens=256,
                      progress=False, **options)
    return label_dataset(cfg, TopicClassifier.load(work["root"] / "head"), work["feat"],
                         load_tokenizer(str(tokenizer)))


def _report(work, run: int) -> dict:
    assert work["ranks"][0][run]["rc"] == 0 and work["ranks"][1][run]["rc"] == 0, work["ranks"]
    assert work["ranks"][1][run]["stdout"] == ""  # only rank 0 reports
    return json.loads(work["ranks"][0][run]["stdout"])


@pytest.mark.distributed
@pytest.mark.slow  # the module's fixture: ~35 s on 2 idle-ish cores (3 label runs, 1 torchrun)
def test_two_ranks_write_the_bytes_of_one(work):
    one, two = work["reference"], _report(work, 0)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["blocks"], two["blocks_labelled"], two["blocks_labelled_by_rank0"]) == (7, 7, 4)
    for a, b in (("t1", "t2"), ("t1c", "t2c")):
        assert _field_bytes(work["prefix"], a) == _field_bytes(work["prefix"], b)
    assert one["topic_counts"] == two["topic_counts"]
    assert len([k for k, v in one["topic_counts"].items() if v]) >= 4  # labels really vary


@pytest.mark.distributed
def test_killed_run_resumes_on_two_ranks(work):
    assert work["killed"].returncode == -9, work["killed"].stderr[-3000:]
    assert work["state3"] == ["block_00000000.npz", "block_00000001.npz", "run.json"]
    report = _report(work, 1)
    assert (report["blocks_resumed"], report["blocks_labelled"]) == (2, 5)
    assert report["documents_labelled"] == DOCS - 2 * BLOCK  # finished blocks not recomputed
    assert not os.path.exists(meta_dir(work["prefix"]) + "/.t3.partial")
    # resumed with batches of 3 instead of 8: same labels, confidences within float noise
    assert _field_bytes(work["prefix"], "t1") == _field_bytes(work["prefix"], "t3")
    np.testing.assert_allclose(read_metadata_field(work["prefix"], "t3c"),
                               read_metadata_field(work["prefix"], "t1c"), atol=1e-5)


@pytest.mark.distributed
def test_job_killed_on_two_ranks_leaves_two_blocks_each_and_resumes(work, tmp_path):
    """Both ranks are SIGKILLed only once each has saved its 2nd block (the barrier of
    KillAfterBlocks): blocks 0-3 on disk whatever the ranks' speeds, no field published."""
    assert work["crash"].returncode != 0 and "SIGKILL" in work["crash"].stderr, \
        work["crash"].stderr[-3000:]
    assert work["state5"] == [f"block_{b:08d}.npz" for b in range(4)] + ["run.json"]
    assert "t5" not in list_metadata_fields(work["prefix"])
    # the same tokenizer file under another path: the blocks are keyed by its content
    shutil.copy(work["root"] / "tok.json", tmp_path / "tok.json")
    report = _label_here(work, "t5", tmp_path / "tok.json", confidence_field="t5c")
    assert (report["blocks_resumed"], report["blocks_labelled"]) == (4, 3)
    assert _field_bytes(work["prefix"], "t1") == _field_bytes(work["prefix"], "t5")
    np.testing.assert_allclose(read_metadata_field(work["prefix"], "t5c"),
                               read_metadata_field(work["prefix"], "t1c"), atol=1e-5)


def test_kill_after_more_blocks_than_pending_is_refused(work):
    """7 blocks: killing after the 8th can never happen (on 2 ranks a rank that ran out of blocks
    would wait at the final collective while the others wait at the kill's barrier)."""
    with pytest.raises(TopicError, match=r"--debug-kill-after-blocks 8: .* only 7 of the 7 pending"):
        _label_here(work, "t6", work["root"] / "tok.json", kill_after_blocks=8)
    assert os.listdir(meta_dir(work["prefix"]) + "/.t6.partial") == ["run.json"]  # nothing labelled
    assert "t6" not in list_metadata_fields(work["prefix"])


def test_another_tokenizer_at_the_same_path_is_refused(work, tmp_path):
    """A run stopped before its first block (the refused kill above) leaves its run.json; a
    resume that decodes with another tokenizer file, at the very same path, must not reuse it."""
    from tokenizers import Tokenizer

    path = tmp_path / "tok.json"
    shutil.copy(work["root"] / "tok.json", path)
    with pytest.raises(TopicError, match="--debug-kill-after-blocks"):
        _label_here(work, "t7", path, kill_after_blocks=8)
    other = Tokenizer.from_file(str(path))
    other.add_special_tokens(["<other>"])
    other.save(str(path))
    with pytest.raises(BlockStateError, match=r"tokenizer_sha256.*--restart"):
        _label_here(work, "t7", path)


@pytest.mark.distributed
def test_foreign_state_is_refused_on_every_rank(work):
    assert [r[2]["rc"] for r in work["ranks"]] == [2, 2]
    assert "t4" not in list_metadata_fields(work["prefix"])


def test_length_buckets_keep_each_embedding(work):
    """MiniLM in sorted batches of 5 and 64 vs transformers on each text alone (no padding)."""
    import transformers

    # 15 documents: 1 to 5 paragraphs each, so every batch of 5 mixes lengths before sorting
    texts = [work["tok"].decode(work["tok"].encode(t).ids[:256]) for t in work["texts"][:15]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    ref = []
    for t in texts:
        enc = tokenizer([t[:2000]], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            ref.append(torch.nn.functional.normalize(model(**enc).last_hidden_state.mean(1), dim=-1))
    ref = torch.cat(ref)                                                    # [n, 384]
    minilm, labels = work["feat"].parts[0], []
    for batch in (5, 64):
        minilm.batch_size = batch
        got = work["feat"].raw(texts)
        assert (got - ref).abs().max() < 1e-5, (batch, float((got - ref).abs().max()))
        labels.append(predict_texts(work["clf"], work["feat"], texts)[0])
    assert all(np.array_equal(labels[0], x) for x in labels)
    assert np.array_equal(labels[0], read_metadata_field(work["prefix"], "t1")[:15])
