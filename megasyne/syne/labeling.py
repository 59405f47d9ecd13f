"""Apply and evaluate topic classifiers: label a ``.bin/.idx`` dataset (sidecar field ``topic``) or
a JSONL file, and cross-validate on a labelled set (the numbers of benchmarks/results/topics.md).

Dataset labelling reads each document's first ``max_tokens`` tokens, decodes them with the
dataset's tokenizer, and classifies the text. Work is cut into blocks of documents
(:mod:`megasyne.syne.blocks`, as score_ppl): each finished block is saved atomically under
``<prefix>.meta/.<field>.partial``, a killed run continues from the blocks on disk (with any number
of ranks), and under torchrun the pending blocks are dealt round-robin to the ranks (all nodes; the
state directory must be on a filesystem every rank sees). Rank 0 assembles the blocks and writes the
categorical field (categories = the taxonomy's topic ids of that language, in order) only when
every block is done, then the report ``<prefix>.<field>.report.json``.

A block's labels do not depend on which rank computes it nor on how many ranks there are: a block
is always the same documents, embedded in the same batches. On CUDA the MiniLM encoder runs in
bf16 (see :class:`~megasyne.syne.topics.MiniLMFeatures`); the run records the encoder's device and
dtype so that a resume never mixes fp32-CPU and bf16-GPU blocks in one field.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from megasyne.atomic import atomic_write_json
from megasyne.data.indexed_dataset import IndexedDataset, idx_fingerprint
from megasyne.data.metadata import meta_dir, write_metadata_field
from megasyne.jsonl import read_jsonl
from megasyne.syne.blocks import BlockStore, KillAfterBlocks, open_on_every_rank
from megasyne.syne.ppl import document_tokens
from megasyne.syne.topics import (
    Featurizer,
    LabelledDoc,
    LanguageTaxonomy,
    TopicClassifier,
    TopicError,
    embed_raw,
    train_classifier,
)

PREDICT_CHUNK = 2048
"""Texts featurized at once: the MiniLM length buckets are sorted within it, and the dense hashed
n-gram rows ([chunk, 65536] float32, 512 MiB) stay bounded."""


def predict_texts(clf: TopicClassifier, featurizer: Featurizer, texts: list[str],
                  chunk: int = PREDICT_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(topic index [n], confidence [n]) for raw texts, in their order."""
    idx, conf = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for i in range(0, len(texts), chunk):
        a, b = clf.predict(featurizer, texts[i:i + chunk])
        idx.append(a)
        conf.append(b)
    return np.concatenate(idx), np.concatenate(conf)


@dataclass(kw_only=True)
class LabelConfig:
    """Dataset labelling options (the model and tokenizer are given separately)."""

    prefix: str
    """Dataset prefix (``<prefix>.bin/.idx``)."""
    field: str = "topic"
    """Categorical metadata field to write."""
    confidence_field: str | None = None
    """Also write the classifier's confidence (float32) under this name."""
    max_tokens: int = 512
    """Tokens of each document read for classification."""
    block_size: int = 4096
    """Documents per resumable block (a crash loses at most one block per rank)."""
    state_dir: str | None = None
    """Where finished blocks wait (default ``<prefix>.meta/.<field>.partial``)."""
    restart: bool = False
    """Discard blocks of an interrupted run with another configuration."""
    progress: bool = True
    """tqdm bar (rank 0)."""
    kill_after_blocks: int | None = None
    """Tests only: a crash at a known point. Every rank SIGKILLs itself once every rank has
    labelled that many blocks, so exactly that many blocks per rank are on disk (refused when a
    rank has fewer pending blocks; see megasyne.syne.blocks.KillAfterBlocks)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.block_size < 1:
            raise TopicError(f"--max-tokens and --block-size must be >= 1, got {self.max_tokens} "
                             f"and {self.block_size}")

    @property
    def state_path(self) -> str:
        return self.state_dir or os.path.join(meta_dir(self.prefix), f".{self.field}.partial")


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group). Under torchrun
    (``WORLD_SIZE`` > 1) joins a group: NCCL when there is a GPU (one per local rank), else gloo."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _sum_over_ranks(*values: int) -> list[int]:
    """Totals over all ranks (the report counts the work done, not the work planned)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _open_store(cfg: LabelConfig, ds: IndexedDataset, clf: TopicClassifier, featurizer: Featurizer,
                tokenizer, rank: int) -> BlockStore:
    run_config = {"field": cfg.field, "idx_fingerprint": idx_fingerprint(cfg.prefix),
                  "topics": clf.topics, "head": clf.info, "features": clf.features,
                  "weight_sum": float(clf.weight.double().sum()),
                  # the file's content, not its path: the same tokenizer named by another path
                  # (a relative one, another cwd) may resume, another file at that path may not
                  "tokenizer_sha256": tokenizer.sha256, "max_tokens": cfg.max_tokens,
                  "encoder": featurizer.precision}
    return open_on_every_rank(cfg.state_path, rank=rank, restart=cfg.restart, config=run_config,
                              num_items=ds.num_documents, block_size=cfg.block_size)


def label_block(ds: IndexedDataset, start: int, stop: int, clf: TopicClassifier,
                featurizer: Featurizer, tokenizer, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(topic index [stop - start] int16, confidence [..] float32) of documents [start, stop)."""
    texts = [tokenizer.decode(document_tokens(ds, d)[:max_tokens]) for d in range(start, stop)]
    idx, conf = predict_texts(clf, featurizer, texts)
    return idx.astype(np.int16), conf


def label_dataset(cfg: LabelConfig, clf: TopicClassifier, featurizer: Featurizer,
                  tokenizer) -> dict | None:
    """Label this rank's share of the documents of ``cfg.prefix``, then rank 0 writes the field(s);
    returns the report on rank 0 (None elsewhere). Every rank of the job must call it."""
    import torch.distributed as dist
    from tqdm import tqdm

    t0 = time.time()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ds = IndexedDataset(cfg.prefix)
    store = _open_store(cfg, ds, clf, featurizer, tokenizer, rank)
    resumed = sorted(store.done_blocks())
    todo = store.pending()
    mine = todo[rank::world]
    _barrier()  # every rank has listed the pending blocks before anyone saves
    kill = KillAfterBlocks(cfg.kill_after_blocks, pending=len(todo), workers=world,
                           barrier=_barrier, error=TopicError)
    t1 = time.time()
    my_docs = sum(store.block_range(b)[1] - store.block_range(b)[0] for b in mine)
    bar = tqdm(total=my_docs, unit="doc", desc=f"label_topics {cfg.field} (rank 0 of {world})",
               disable=not (cfg.progress and rank == 0), dynamic_ncols=True)
    for k, b in enumerate(mine, 1):
        start, stop = store.block_range(b)
        idx, conf = label_block(ds, start, stop, clf, featurizer, tokenizer, cfg.max_tokens)
        store.save(b, topic=idx, confidence=conf)
        bar.update(stop - start)
        kill.block_done(k)
    bar.close()
    labelled = _sum_over_ranks(len(mine), my_docs)  # also the barrier after the last save
    label_s = time.time() - t1
    report = None
    if rank == 0:
        report = _publish(cfg, ds, store, clf, featurizer, resumed=len(resumed), mine=len(mine),
                          labelled=labelled, world=world, seconds=time.time() - t0,
                          label_s=label_s)
    _barrier()
    return report


def _publish(cfg: LabelConfig, ds: IndexedDataset, store: BlockStore, clf: TopicClassifier,
             featurizer: Featurizer, *, resumed: int, mine: int, labelled: list[int], world: int,
             seconds: float, label_s: float) -> dict:
    """Rank 0: assemble the blocks, write the field(s) and the report, remove the state."""
    arrays = store.assemble()
    write_metadata_field(cfg.prefix, cfg.field, arrays["topic"], categories=clf.topics,
                         description=f"topic ({clf.lang}, {clf.features} + linear head)")
    if cfg.confidence_field:
        write_metadata_field(cfg.prefix, cfg.confidence_field, arrays["confidence"],
                             description=f"confidence of {cfg.field}")
    counts = np.bincount(arrays["topic"].astype(np.int64), minlength=len(clf.topics))
    report = {"dataset": cfg.prefix, "field": cfg.field, "lang": clf.lang,
              "features": clf.features, "encoder": featurizer.precision or None,
              "documents": ds.num_documents, "blocks": store.num_blocks,
              "blocks_resumed": resumed, "blocks_labelled": labelled[0],
              "blocks_labelled_by_rank0": mine, "world_size": world,
              "documents_labelled": labelled[1],
              "topic_counts": dict(zip(clf.topics, counts.tolist())),
              "mean_confidence": float(arrays["confidence"].mean()) if ds.num_documents else None,
              "seconds": round(seconds, 3), "label_seconds": round(label_s, 3),
              "docs_per_s": round(labelled[1] / label_s, 2) if label_s > 0 else None}
    atomic_write_json(f"{cfg.prefix}.{cfg.field}.report.json", report, indent=2)
    store.remove()
    return report


def label_jsonl(input_path: str, output_path: str, clf: TopicClassifier, featurizer: Featurizer, *,
                text_key: str = "text", field: str = "topic") -> dict:
    """Copy a JSONL file adding ``field`` (topic id) and ``<field>_confidence`` to each record."""
    records = []
    for n, rec in read_jsonl(input_path, TopicError):
        if not isinstance(rec.get(text_key), str):
            raise TopicError(f"{input_path}:{n}: no string field {text_key!r}")
        records.append(rec)
    idx, conf = predict_texts(clf, featurizer, [r[text_key] for r in records])
    tmp = f"{output_path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, i, c in zip(records, idx, conf):
            rec[field], rec[f"{field}_confidence"] = clf.topics[i], round(float(c), 4)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    return {"input": input_path, "output": output_path, "records": len(records),
            "topic_counts": {t: int((idx == k).sum()) for k, t in enumerate(clf.topics)}}


# --------------------------------------------------------------------------- evaluation

def stratified_folds(docs: list[LabelledDoc], folds: int, seed: int = 0) -> list[int]:
    """Fold number of each document: per topic, shuffled by ``seed``, dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = [0] * len(docs)
    by_topic: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_topic.setdefault(d.topic, []).append(i)
    for topic in sorted(by_topic):
        members = by_topic[topic]
        for k, i in enumerate(rng.permutation(len(members))):
            fold[members[i]] = k % folds
    return fold


def _scores(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict:
    f1s = []
    for c in range(k):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((y_true == y_pred).mean()), "macro_f1": float(np.mean(f1s))}


def cross_validate(tax: LanguageTaxonomy, docs: list[LabelledDoc], featurizer: Featurizer, *,
                   folds: int = 3, seed: int = 0, l2: float = 1e-3) -> dict:
    """k-fold accuracy of seeds + labelled training, and the baselines it must beat."""
    if len(docs) < folds:
        raise TopicError(f"{tax.lang}: {len(docs)} labelled documents for {folds} folds")
    k = len(tax.topics)
    cache: dict = {}
    t0 = time.time()
    embed_raw(featurizer, [d.text for d in docs] + [s for s, _ in tax.seed_texts()], cache)
    feat_s = time.time() - t0
    y = np.array([tax.ids.index(d.topic) for d in docs])
    fold = np.array(stratified_folds(docs, folds, seed))
    pred = np.zeros(len(docs), dtype=np.int64)
    for f in range(folds):
        train = [d for d, g in zip(docs, fold) if g != f]
        clf = train_classifier(tax, train, featurizer, l2=l2, cache=cache)
        test = np.flatnonzero(fold == f)
        pred[test], _ = clf.predict_raw(featurizer, embed_raw(featurizer, [docs[i].text for i in test], cache))
    seeds_only = train_classifier(tax, [], featurizer, l2=l2, cache=cache)
    zero_shot, _ = seeds_only.predict_raw(featurizer, embed_raw(featurizer, [d.text for d in docs], cache))
    confusions = {}
    for t, p in zip(y, pred):
        if t != p:
            key = f"{tax.ids[t]} -> {tax.ids[p]}"
            confusions[key] = confusions.get(key, 0) + 1
    return {"lang": tax.lang, "features": featurizer.kind, "topics": k, "documents": len(docs),
            "folds": folds, "seed": seed, "l2": l2,
            **_scores(y, pred, k),
            "seeds_only": _scores(y, zero_shot, k),
            "majority_accuracy": float(np.bincount(y, minlength=k).max() / len(y)),
            "chance_accuracy": 1.0 / k,
            "per_topic_recall": {t: float((pred[y == i] == i).mean()) for i, t in enumerate(tax.ids)
                                 if (y == i).any()},
            "top_confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1])[:5]),
            "feature_docs_per_s": round(len(cache) / feat_s, 1) if feat_s > 0 else None}


def render_markdown(results: list[dict], *, labelled_path: str, taxonomy_path: str,
                    machine: str) -> str:
    """benchmarks/results/topics.md from cross_validate results."""
    lines = [
        "# Topic classifier accuracy (tools/label_topics.py eval)", "",
        f"Labelled set: `{labelled_path}` (short web-style paragraphs written for megasyne, "
        f"6 per topic); taxonomy: `{taxonomy_path}`. Stratified k-fold cross-validation: each "
        "fold trains the linear head on the taxonomy's seed texts plus the other folds' "
        "documents and predicts the held-out fold. *Seeds only* trains on the taxonomy text "
        "alone (no labelled document). Machine: " + machine + ".", "",
        "| lang | features | l2 | topics | docs | folds | accuracy | macro-F1 | seeds only (acc) "
        "| majority | chance | label docs/s (chars/doc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speed = (f"{r['label_docs_per_s']} ({r['label_doc_chars']})" if "label_docs_per_s" in r
                 else "-")
        feats = f"**{r['features']}** (default)" if r.get("default") else r["features"]
        lines.append(f"| {r['lang']} | {feats} | {r['l2']:g} | {r['topics']} | "
                     f"{r['documents']} | {r['folds']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
                     f"{r['seeds_only']['accuracy']:.3f} | {r['majority_accuracy']:.3f} | "
                     f"{r['chance_accuracy']:.3f} | {speed} |")
    lines += ["", "The l2 of each language (taxonomy field `l2`) was picked from {1e-3, 1e-2, 1e-1, 1} "
              "on these same folds, so the accuracies are slightly optimistic; with 6 documents per "
              "topic one document is 1.5 points of accuracy. Label speed: feature extraction + head "
              "on one CPU process, for documents of the given length (the first 2,000 characters "
              "of a document are read)."]
    lines += ["", "Most frequent confusions (true -> predicted: count):", ""]
    for r in results:
        conf = ", ".join(f"{k}: {v}" for k, v in r["top_confusions"].items()) or "none"
        lines.append(f"- {r['lang']} / {r['features']}: {conf}")
    kinds = sorted({r["features"] for r in results})
    lines += ["", "Reproduce: `python tools/label_topics.py eval --features " + " ".join(kinds)
              + " --report benchmarks/results/topics.md` (without `--features`: each language's "
              "default only).", ""]
    return "\n".join(lines)


__all__ = ["LabelConfig", "cross_validate", "init_distributed", "label_block", "label_dataset",
           "label_jsonl", "predict_texts", "render_markdown", "stratified_folds"]
