"""The bundled tiny job, end to end on CPU in a few minutes:

    tokenizer -> preprocess -> mixture/curriculum index -> 2-process TP2 training
    -> checkpoint (the run stops at step 20 like a preempted job) -> resume to the end
    -> plots of the loss (total, per source, validation) and of the mixture.

Everything lands in data/tiny/ (tokenizer, .bin/.idx datasets) and runs/tiny/ (config,
index, checkpoints, metrics.jsonl, TensorBoard events, loss.png, mixture.png). Re-running
reuses the tokenizer and datasets and resumes the run (delete runs/tiny to start over).

    .venv/bin/python examples/tiny/run_tiny.py [--nproc 2] [--set parallel.tp=1 parallel.pp=2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "tiny" / "data"
DATA = ROOT / "data" / "tiny"
CONFIG = ROOT / "examples" / "tiny" / "train.yaml"
SOURCES = ("en_drama", "en_verse", "zh_poetry")
VOCAB = 2048          # must equal model_overrides.vocab_size in train.yaml
VALID_EVERY = 20      # every 20th document is held out for validation
STOP_AT = 20          # the first launch stops (and checkpoints) here, the second resumes


def banner(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def run(cmd: list, **kw) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT, **kw)


def train_tokenizer() -> Path:
    """A byte-level BPE over the whole corpus (Llama-3's tokenizer family, 2048 entries)."""
    path = DATA / "tokenizer" / "tokenizer.json"
    if path.exists():
        return path
    from megasyne.data.tokenizers import train_byte_level_bpe

    def texts():
        for name in SOURCES:
            with open(CORPUS / f"{name}.jsonl", encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    train_byte_level_bpe(texts(), VOCAB, path)
    return path


def split_corpus() -> None:
    """Hold out every VALID_EVERY-th document of each source (train/ and valid/ jsonl)."""
    for part in ("train", "valid"):
        (DATA / "raw" / part).mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        lines = (CORPUS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        valid = [line for i, line in enumerate(lines) if i % VALID_EVERY == VALID_EVERY - 1]
        train = [line for i, line in enumerate(lines) if i % VALID_EVERY != VALID_EVERY - 1]
        (DATA / "raw" / "train" / f"{name}.jsonl").write_text("".join(train), encoding="utf-8")
        (DATA / "raw" / "valid" / f"{name}.jsonl").write_text("".join(valid), encoding="utf-8")


def preprocess(tokenizer: Path) -> None:
    for part, out in (("train", DATA), ("valid", DATA / "valid")):
        for name in SOURCES:
            # The .idx is the preprocessor's commit marker, renamed into place after the .bin,
            # the metadata sidecar and the report (megasyne/data/staging.py): if it exists, the
            # whole dataset does. A run that failed or was killed leaves no .idx, so it is redone
            # here (and that run removes the killed one's leftovers).
            if (out / f"{name}_text_document.idx").exists():
                continue
            run([sys.executable, "tools/preprocess_data.py",
                 "--input", DATA / "raw" / part / f"{name}.jsonl",
                 "--json-keys", "text", "--metadata-keys", "n_chars",
                 "--tokenizer-model", tokenizer, "--append-eod",
                 "--output-prefix", out / name, "--workers", "1", "--no-progress"])


def torchrun(nproc: int, overrides: list[str]) -> None:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", "pretrain_syne.py", "--config", CONFIG,
         *(["--set", *overrides] if overrides else [])],
        env=dict(os.environ, OMP_NUM_THREADS="1"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra overrides for pretrain_syne.py (e.g. parallel.tp=1 parallel.pp=2)")
    args = ap.parse_args()
    t0 = time.time()

    banner("1/5 tokenizer (byte-level BPE, 2048 entries)")
    tokenizer = train_tokenizer()
    print(tokenizer)
    banner("2/5 preprocess: jsonl -> Megatron .bin/.idx (+ n_chars metadata sidecar)")
    split_corpus()
    preprocess(tokenizer)
    banner("3/5 mixture and curriculum index (stage I zh:en 2:8, verse by ascending length)")
    from megasyne.training.config import load_config

    # The layout is checked against the world size it will be launched with (this process is one).
    cfg = load_config(CONFIG, [*args.set, f"parallel.world_size={args.nproc}"])
    run([sys.executable, "tools/build_mixture.py", "--recipe", cfg.recipe,
         "--output", Path(cfg.run_dir) / "index"])
    banner(f"4/5 train on {args.nproc} processes; the first launch stops at step {STOP_AT} "
           f"(a preemption), the second resumes from its checkpoint")
    latest = Path(cfg.run_dir) / "checkpoints" / "latest"
    if not latest.exists():
        torchrun(args.nproc, [*args.set, f"exit_at_step={STOP_AT}"])
    torchrun(args.nproc, args.set)
    banner("5/5 plots")
    from megasyne.data.dataset import MixtureDataset
    from megasyne.training.plots import plot_losses, plot_mixture, read_metrics

    records = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    index = MixtureDataset(Path(cfg.run_dir) / "index")
    stage_steps = {name: int(start) // cfg.global_batch_size
                   for name, start in zip(index.stage_names, index.stage_boundaries[:-1])}
    print(plot_losses(records, Path(cfg.run_dir) / "loss.png", title="tiny job: training loss"))
    print(plot_mixture(records, Path(cfg.run_dir) / "mixture.png", stage_steps))
    last = [r for r in records if "loss" in r][-1]
    print(f"\nfinal step {last['step']}: loss {last['loss']:.3f}; "
          f"per source {json.dumps({k: round(v, 3) for k, v in last['source_loss'].items()})}")
    print(f"done in {time.time() - t0:.0f} s; run directory {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
