"""Apply and evaluate topic classifiers: label a ``.bin/.idx`` dataset (sidecar field ``topic``) or
a JSONL file, and cross-validate on a labelled set (the numbers of benchmarks/results/topics.md).

Dataset labelling reads each document's first ``max_tokens`` tokens, decodes them with the
dataset's tokenizer, and classifies the text. It is resumable like score_ppl (blocks of documents
saved atomically under ``<prefix>.meta/.<field>.partial``); the categorical field (categories =
the taxonomy's topic ids of that language, in order) appears only when every block is done.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasyne.data.indexed_dataset import IndexedDataset, idx_fingerprint
from megasyne.data.metadata import meta_dir, write_metadata_field
from megasyne.jsonl import read_jsonl
from megasyne.syne.blocks import BlockStore
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


def predict_texts(clf: TopicClassifier, featurizer: Featurizer, texts: list[str],
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(topic index [n], confidence [n]) for raw texts."""
    idx, conf = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for i in range(0, len(texts), batch_size):
        a, b = clf.predict(featurizer, texts[i:i + batch_size])
        idx.append(a)
        conf.append(b)
    return np.concatenate(idx), np.concatenate(conf)


@dataclass(kw_only=True)
class LabelConfig:
    """Dataset labelling options."""

    prefix: str
    field: str = "topic"
    confidence_field: str | None = None
    """Also write the classifier's confidence (float32) under this name."""
    max_tokens: int = 512
    """Tokens of each document read for classification."""
    batch_size: int = 64
    block_size: int = 4096
    state_dir: str | None = None
    restart: bool = False
    progress: bool = True
    kill_after_blocks: int | None = None
    """Tests only: SIGKILL after saving that many blocks."""


def label_dataset(cfg: LabelConfig, clf: TopicClassifier, featurizer: Featurizer, tokenizer) -> dict:
    """Label every document of ``cfg.prefix``; returns the report (also ``<prefix>.<field>.report.json``)."""
    from tqdm import tqdm

    t0 = time.time()
    ds = IndexedDataset(cfg.prefix)
    state = cfg.state_dir or os.path.join(meta_dir(cfg.prefix), f".{cfg.field}.partial")
    store = BlockStore(state, restart=cfg.restart, num_items=ds.num_documents,
                       block_size=cfg.block_size,
                       config={"field": cfg.field, "idx_fingerprint": idx_fingerprint(cfg.prefix),
                               "topics": clf.topics, "head": clf.info, "features": clf.features,
                               "weight_sum": float(clf.weight.double().sum()),
                               "tokenizer": getattr(tokenizer, "path", ""),
                               "max_tokens": cfg.max_tokens})
    resumed = len(store.done_blocks())
    pending = store.pending()
    bar = tqdm(total=sum(store.block_range(b)[1] - store.block_range(b)[0] for b in pending),
               unit="doc", desc=f"label_topics {cfg.field}", disable=not cfg.progress,
               dynamic_ncols=True)
    for k, b in enumerate(pending, 1):
        start, stop = store.block_range(b)
        texts = []
        for d in range(start, stop):
            texts.append(tokenizer.decode(document_tokens(ds, d)[:cfg.max_tokens]))
        idx, conf = predict_texts(clf, featurizer, texts, cfg.batch_size)
        store.save(b, topic=idx.astype(np.int16), confidence=conf)
        bar.update(stop - start)
        if cfg.kill_after_blocks is not None and k >= cfg.kill_after_blocks:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    arrays = store.assemble()
    write_metadata_field(cfg.prefix, cfg.field, arrays["topic"], categories=clf.topics,
                         description=f"topic ({clf.lang}, {clf.features} + linear head)")
    if cfg.confidence_field:
        write_metadata_field(cfg.prefix, cfg.confidence_field, arrays["confidence"],
                             description=f"confidence of {cfg.field}")
    counts = np.bincount(arrays["topic"].astype(np.int64), minlength=len(clf.topics))
    seconds = time.time() - t0
    scored = sum(store.block_range(b)[1] - store.block_range(b)[0] for b in pending)
    report = {"dataset": cfg.prefix, "field": cfg.field, "lang": clf.lang,
              "documents": ds.num_documents, "blocks": store.num_blocks, "blocks_resumed": resumed,
              "topic_counts": dict(zip(clf.topics, counts.tolist())),
              "mean_confidence": float(arrays["confidence"].mean()) if ds.num_documents else None,
              "seconds": round(seconds, 3), "docs_per_s": round(scored / seconds, 2) if seconds else None}
    path = Path(f"{cfg.prefix}.{cfg.field}.report.json")
    tmp = path.with_name(path.name + f".tmp.{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    store.remove()
    return report


def label_jsonl(input_path: str, output_path: str, clf: TopicClassifier, featurizer: Featurizer, *,
                text_key: str = "text", field: str = "topic", batch_size: int = 64) -> dict:
    """Copy a JSONL file adding ``field`` (topic id) and ``<field>_confidence`` to each record."""
    records = []
    for n, rec in read_jsonl(input_path, TopicError):
        if not isinstance(rec.get(text_key), str):
            raise TopicError(f"{input_path}:{n}: no string field {text_key!r}")
        records.append(rec)
    idx, conf = predict_texts(clf, featurizer, [r[text_key] for r in records], batch_size)
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


__all__ = ["LabelConfig", "cross_validate", "label_dataset", "label_jsonl", "predict_texts",
           "render_markdown", "stratified_folds"]
