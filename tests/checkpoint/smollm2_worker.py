"""SmolLM2 worker for test_smollm2.py (TP1; its main() runs in the test process).

Usage: smollm2_worker.py HF_DIR OUT MS_ROOT [MS_ROOT ...]
Loads every MS_ROOT (conversions of HF_DIR) into an fp32 TP1 model and runs it on TEXT; saves
the logits, keyed by each root's directory name, with transformers' (eager and SDPA attention)
on the same tokens to OUT/logits.pt.
"""

import sys
from pathlib import Path

import torch

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)

# Jane Austen, Pride and Prejudice (1813), public domain.
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered the rightful property of some "
        "one or other of their daughters.")


def megasyne_logits(root: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megasyne.checkpoint.dist import load_checkpoint, read_manifest
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.model.config import LlamaConfig
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import destroy_parallel, init_parallel

    cfg = LlamaConfig.from_dict(read_manifest(root)["model"])
    init_parallel(ParallelDims())
    try:
        model = build_model(cfg, ParallelDims(), ModelRuntime(init_weights=False))[0]
        load_checkpoint(root, [model], model_config=cfg.to_dict())
        model.eval()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        with torch.no_grad():
            return model(tokens, positions, None)[..., : cfg.vocab_size].float()
    finally:
        destroy_parallel()


def main(hf_dir: Path, out: Path, roots: list[Path]) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokens = torch.tensor([tokenizer(TEXT)["input_ids"]])
    results = {"tokens": tokens}
    for attention in ("eager", "sdpa"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation=attention).eval()
        with torch.no_grad():
            results[f"transformers_{attention}"] = model(tokens).logits.float()
        del model
    for root in roots:
        results[root.name] = megasyne_logits(root, tokens)
    torch.save(results, out / "logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
