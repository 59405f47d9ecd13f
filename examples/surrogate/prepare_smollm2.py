"""Inputs of the SmolLM2-135M surrogate demonstration (examples/surrogate/smollm2_grid.yaml).

    .venv/bin/python examples/surrogate/prepare_smollm2.py        # -> runs/smollm2_surrogate/
    .venv/bin/python tools/ablate.py --grid examples/surrogate/smollm2_grid.yaml

Every step is a documented command line (tools/*.py):

1. SmolLM2-135M-Instruct as an HF directory (tools/prepare_smollm2.py, offline, cached) and as
   a megasyne checkpoint (tools/convert_hf.py): the base of every cell;
2. the bundled text preprocessed with SmolLM2's tokenizer: Chinese (zh_poetry), English
   (en_verse, en_drama) and the four public-domain science pages of examples/syne/data (the
   seeds of the synthetic science QA, standing in for it: generating enough QA with a 135M
   model on 2 CPU cores would take longer than the grid), each split into training documents
   and held-out documents never trained on;
3. the perplexity of every English and Chinese training document under SmolLM2
   (tools/score_ppl.py), for ``order: ascending:ppl``;
4. the recipe (zh : en : science = 1 : 7 : 2 as in SynE stage II), the held-out recipe and the
   base run config (TP1, fp32, 2 ranks, LR 1e-4) in the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "tiny" / "data"
PAGES = ROOT / "examples" / "syne" / "data" / "science_pages.jsonl"
SEQ = 128
CHUNK = 1200  # characters per science document (the pages are whole books' chapters)


def tool(name: str, *args) -> str:
    cmd = [sys.executable, str(ROOT / "tools" / name), *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True).stdout


def docs(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (CORPUS / f"{name}.jsonl").open(encoding="utf-8")]


def science() -> list[str]:
    out = []
    for line in PAGES.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        out += [text[i:i + CHUNK] for i in range(0, len(text), CHUNK) if len(text[i:i + CHUNK]) > 200]
    return out


def split(items: list[str], heldout_every: int) -> tuple[list[str], list[str]]:
    """Every ``heldout_every``-th document held out, the others for training."""
    return ([t for i, t in enumerate(items) if i % heldout_every],
            [t for i, t in enumerate(items) if i % heldout_every == 0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "smollm2_surrogate"))
    out = Path(ap.parse_args().out).resolve()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    smol = Path(tool("prepare_smollm2.py").strip().splitlines()[-1])
    base = out / "smollm2_megasyne"
    if not base.exists():
        tool("convert_hf.py", "hf-to-megasyne", "--hf-dir", smol, "--output", base, "--no-progress")
    corpora = {"zh_web": docs("zh_poetry")[:60], "en_web": docs("en_verse")[:30], "en_book": docs("en_drama"),
               "science": science()}
    for name, texts in corpora.items():
        train, held = split(texts, 5)
        for part, chunk in (("train", train), ("valid", held)):
            prefix = data / part / name
            if (prefix.parent / f"{name}_text_document.idx").exists():
                continue
            raw = data / "raw" / part / f"{name}.jsonl"
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk),
                           encoding="utf-8")
            tool("preprocess_data.py", "--input", raw, "--json-keys", "text", "--tokenizer-model",
                 smol / "tokenizer.json", "--append-eod", "--output-prefix", prefix, "--no-progress")
    for name in ("zh_web", "en_web"):
        if (data / "train" / f"{name}_text_document.meta" / "ppl.npy").exists():
            continue  # scored by an earlier run of this script
        tool("score_ppl.py", "--data-prefix", data / "train" / f"{name}_text_document", "--checkpoint", base,
             "--window", SEQ, "--batch-size", 16, "--state-dir", out / "ppl_state" / name, "--no-progress")
    src = {n: str(data / "train" / f"{n}_text_document") for n in corpora}
    (out / "recipe.yaml").write_text(yaml.safe_dump(dict(
        seq_length=SEQ, seed=1234, on_exhaustion="new_epoch",
        sources={"zh_web": {"prefix": src["zh_web"], "order": "ascending:ppl"},
                 "en_web": {"prefix": src["en_web"], "order": "ascending:ppl"},
                 "en_book": src["en_book"], "science": src["science"]},
        stages=[dict(name="cpt", samples=1024, weights={
            "zh": {"weight": 1, "children": {"zh_web": 1}},
            "en": {"weight": 7, "children": {"en_web": 0.6, "en_book": 0.4}},
            "synthetic": {"weight": 2, "children": {"science": 1}}})]), sort_keys=False))
    (out / "heldout.yaml").write_text(yaml.safe_dump(dict(
        seq_length=SEQ, seed=4321, on_exhaustion="new_epoch",
        sources={n: str(data / "valid" / f"{n}_text_document") for n in corpora},
        stages=[dict(name="valid", samples=256, weights={
            "zh": {"weight": 1, "children": {"zh_web": 1}},
            "en": {"weight": 1, "children": {"en_web": 1, "en_book": 1}},
            "synthetic": {"weight": 1, "children": {"science": 1}}})]), sort_keys=False))
    (out / "base.yaml").write_text(yaml.safe_dump(dict(
        recipe="recipe.yaml", model="init_checkpoint", init_checkpoint=str(base), parallel={"tp": 1},
        dtype="fp32", optim={"lr": 1e-4, "min_lr": 1e-5, "weight_decay": 0.1, "clip_grad": 1.0},
        schedule={"kind": "wsd", "warmup_steps": 2, "decay_steps": 6, "decay_shape": "1-sqrt"},
        micro_batch_size=2, global_batch_size=4, save_interval=10, keep_last=1, tensorboard=False),
        sort_keys=False))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
