"""The Llama-3-SynE sequence of examples/syne/README.md at toy scale, on CPU, in a few minutes:

    convert a base model -> preprocess -> score_ppl -> label_topics -> synth_qa
    -> preprocess the synthetic QA -> build_mixture -> pretrain_syne stage I -> stage II

Every step is the documented command line (tools/*.py, pretrain_syne.py under torchrun). Toy
parts, and why: the corpora are slices of the bundled tiny corpus plus four public-domain science
pages; the base model that scores perplexity and is continually pre-trained is a 2-layer random
Llama with SmolLM2's tokenizer (a real model would take minutes per step on 2 CPU cores); the QA
generator is the real SmolLM2-135M-Instruct (tools/prepare_smollm2.py, cached outside the repo).

    .venv/bin/python examples/syne/run_toy.py [--out runs/syne_toy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "tiny" / "data"
PAGES = ROOT / "examples" / "syne" / "data" / "science_pages.jsonl"
SEQ, G, STAGE1, STAGE2 = 64, 8, 6, 4  # steps per stage
BENCH_QUESTION = ("A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. "
                  "How much does the ball cost?")


def _env(threads: int) -> dict:
    """``threads`` is the command's OMP_NUM_THREADS unless the caller set one."""
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)),
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run(cmd: list, threads: int = 1, **kw) -> subprocess.CompletedProcess:
    """Run one documented command (1 thread for the training runs: torchrun starts one process
    per core)."""
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, cwd=ROOT, env=_env(threads), **kw)


def tool(name: str, *args) -> subprocess.CompletedProcess:
    # One process: every core (QA generation with SmolLM2 on 2 cores, at 160 new tokens then:
    # 53 s instead of 70 s).
    return run([sys.executable, f"tools/{name}", *args], threads=os.cpu_count() or 1)


def start_tools(calls: list[tuple]) -> list:
    """Start independent tool commands, each ``(name, *args)``, at the same time with one thread
    each; ``finish`` waits for them. A toy-sized tool run is mostly Python imports, on one core:
    on 2 cores, two at once take about the time of one."""
    started = []
    for name, *args in calls:
        cmd = [sys.executable, f"tools/{name}", *map(str, args)]
        print("$", " ".join(cmd), flush=True)
        log = tempfile.TemporaryFile("w+", encoding="utf-8")
        started.append((cmd, log, subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stdout=log,
                                                   stderr=subprocess.STDOUT, text=True)))
    return started


def finish(started: list) -> None:
    """Wait for what ``start_tools`` started; print the outputs in order, then fail if one failed."""
    failed = None
    for cmd, log, proc in started:
        rc = proc.wait()
        log.seek(0)
        sys.stdout.write(log.read())
        log.close()
        if rc != 0 and failed is None:
            failed = subprocess.CalledProcessError(rc, cmd)
    sys.stdout.flush()
    if failed is not None:
        raise failed


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")
    return path


def first_docs(name: str, n: int) -> list[dict]:
    with open(CORPUS / f"{name}.jsonl", encoding="utf-8") as f:
        return [{"text": json.loads(line)["text"]} for _, line in zip(range(n), f)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "syne_toy"), help="work directory")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    print("\n=== 0. the models: SmolLM2 (QA generator, tokenizer) and a toy base model")
    smol = Path(run([sys.executable, "tools/prepare_smollm2.py"], capture_output=True,
                    text=True).stdout.strip().splitlines()[-1])
    tokenizer = smol / "tokenizer.json"
    # Steps that do not need each other's output run at the same time (start_tools): step 1's
    # preprocessing and the training of step 3's topic classifiers start now, beside the base
    # model's making and conversion; then steps 2 and 3 (different fields of one sidecar, which
    # takes concurrent writers: megasyne/data/metadata.py).
    raw, data = out / "raw", out / "data"
    pages = [json.loads(line) for line in PAGES.read_text(encoding="utf-8").splitlines()]
    sources = {"en_web": first_docs("en_verse", 12) + [{"text": p["text"]} for p in pages],
               "en_book": first_docs("en_drama", 4), "zh_web": first_docs("zh_poetry", 40)}
    langs = (("en", "en_web"), ("zh", "zh_web"))
    print("\n=== 1. preprocess: web (verse + science pages), book (drama), zh web (poetry); the\n"
          "       topic classifiers of step 3; beside them, the toy base model and its conversion")
    early = start_tools([
        ("preprocess_data.py", "--input", write_jsonl(raw / f"{name}.jsonl", docs),
         "--json-keys", "text", "--tokenizer-model", tokenizer, "--append-eod",
         "--output-prefix", data / name, "--no-progress")
        for name, docs in sources.items() if not (data / f"{name}_text_document.idx").exists()] + [
        ("label_topics.py", "train", "--lang", lang, "--out", out / "heads" / lang)
        for lang, _ in langs if not (out / "heads" / lang).exists()])
    base_hf, base = out / "base_hf", out / "checkpoints" / "base"
    if not base.exists():
        import torch
        import transformers

        vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
            rope_theta=10000.0)).save_pretrained(base_hf)
        run([sys.executable, "tools/convert_hf.py", "hf-to-megasyne", "--hf-dir", base_hf,
             "--output", base, "--no-progress"])

    finish(early)

    print("\n=== 2. perplexity of every web document under the base model (the curriculum),\n"
          "    and 3. one topic per web document")
    finish(start_tools([
        ("score_ppl.py", "--data-prefix", data / f"{name}_text_document", "--checkpoint", base,
         "--window", SEQ, "--batch-size", 8, "--state-dir", out / "ppl_state" / name,
         "--no-progress") for _, name in langs] + [
        ("label_topics.py", "label", "--head", out / "heads" / lang, "--tokenizer", tokenizer,
         "--data-prefix", data / f"{name}_text_document", "--no-progress")
        for lang, name in langs]))

    print("\n=== 4. synthetic science QA from the science pages (SmolLM2-135M-Instruct)")
    # 8 answers in one batch, decoded until the longest ends: most never end before the limit,
    # so the limit sets the time. 128 keeps the same 2 pairs as 160 on the development machine
    # (57 and 113 tokens; sampling draws the same tokens under any limit).
    # Pairs that overlap a benchmark are dropped (decontamination); the toy's benchmark is one
    # famous reasoning question small models like to reproduce. Dropped answers are kept in
    # rejects.jsonl with their reason (tests/syne/test_synth_smollm2.py reads both).
    qa = out / "synth" / "qa.jsonl"
    bench = write_jsonl(out / "bench.jsonl", [{"question": BENCH_QUESTION}])
    tool("synth_qa.py", "--pages", PAGES, "--output", qa, "--hf-model", smol,
         "--snippet-chars", 400, "--min-snippet-chars", 100, "--snippets-per-page", 1,
         "--samples", 2, "--max-tokens", 128, "--batch-size", 8, "--benchmark", bench,
         "--rejects", out / "synth" / "rejects.jsonl", "--no-progress")
    kept = [line for line in qa.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not kept:
        raise SystemExit(f"synth_qa kept no pair in {qa}: stage II has no synthetic data")

    print(f"\n=== 5. tokenise the {len(kept)} synthetic QA pair(s) like any source")
    if not (data / "synthetic_qa_text_document.idx").exists():
        tool("preprocess_data.py", "--input", qa, "--json-keys", "text", "--metadata-keys",
             "discipline", "--tokenizer-model", tokenizer, "--append-eod",
             "--output-prefix", data / "synthetic_qa", "--no-progress")

    print("\n=== 6. the mixture + curriculum index: stage I zh:en 2:8, stage II zh:en:synthetic 1:7:2")
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        seq_length=SEQ, seed=1234, on_exhaustion="new_epoch",
        sources={
            "zh_web": {"prefix": str(data / "zh_web_text_document"), "order": "ascending:ppl"},
            "en_web": {"prefix": str(data / "en_web_text_document"), "order": "ascending:ppl"},
            "en_book": str(data / "en_book_text_document"),
            "synthetic_qa": str(data / "synthetic_qa_text_document"),
        },
        stages=[
            dict(name="stage1", samples=STAGE1 * G, weights={
                "zh": {"weight": 2, "children": {"zh_web": 1}},
                "en": {"weight": 8, "children": {"en_web": 0.7, "en_book": 0.3}}}),
            dict(name="stage2", samples=STAGE2 * G, weights={
                "zh": {"weight": 1, "children": {"zh_web": 1}},
                "en": {"weight": 7, "children": {"en_web": 0.7, "en_book": 0.3}},
                "synthetic_qa": 2}),
        ]), sort_keys=False))
    run_dir = out / "run"
    tool("build_mixture.py", "--recipe", recipe, "--output", run_dir / "index")

    print("\n=== 7. continual pre-training from the base checkpoint: stage I, then stage II")
    config = out / "train.yaml"
    config.write_text(yaml.safe_dump(dict(
        run_dir=str(run_dir), recipe=str(recipe), model="init_checkpoint",
        init_checkpoint=str(base), parallel={"tp": 1}, dtype="fp32",
        optim={"lr": 1e-3, "min_lr": 1e-4}, schedule={"kind": "wsd", "warmup_steps": 2,
                                                        "decay_steps": 3},
        micro_batch_size=2, global_batch_size=G, save_interval=5, tensorboard=False)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "pretrain_syne.py", "--config", config]
    run([*launch, "--set", "stop_after_stage=stage1"])
    run(launch)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    print(f"\ndone in {time.time() - t0:.0f} s: step {last['step']} ({last['stage']}), loss "
          f"{last['loss']:.3f}, per source {json.dumps({k: round(v, 3) for k, v in last['source_loss'].items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
