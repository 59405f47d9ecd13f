"""pipeline_score_fn at PP2 (and megatron_score_fn at TP2) vs transformers' log-probabilities.

Usage (torchrun, 2 ranks): bench_score_worker.py OUT_DIR LAYOUT (pp2 | tp2). OUT_DIR/hf and
OUT_DIR/ms come from the test. Rank 0 writes OUT_DIR/scores_<LAYOUT>.json: {"ours", "hf"}.
"""

import json
import sys
from pathlib import Path

import megasyne  # noqa: F401
import torch
import torch.distributed as dist

from megasyne.checkpoint.dist import load_checkpoint, read_manifest
from megasyne.model.builder import build_model
from megasyne.model.config import LlamaConfig
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.bench_eval import pipeline_score_fn
from megasyne.training.optim import wrap_ddp


def sequences(vocab: int):
    g = torch.Generator().manual_seed(3)
    lens, starts = [9, 14, 6, 11], [3, 10, 1, 5]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens], starts


def hf_scores(hf_dir: Path, seqs, starts) -> list[float]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            out.append(sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq))))
    return out


if __name__ == "__main__":
    out, layout = Path(sys.argv[1]), sys.argv[2]
    dims = ParallelDims(world_size=2, **({"pp": 2} if layout == "pp2" else {"tp": 2}))
    init_parallel(dims, seed=0)
    cfg = LlamaConfig.from_dict(read_manifest(next((out / "ms").glob("iter_*")))["model"])
    ddp = wrap_ddp(build_model(cfg, dims), dims)
    load_checkpoint(out / "ms", ddp, model_config=cfg.to_dict())
    seqs, starts = sequences(cfg.vocab_size)
    if layout == "pp2":
        ours = pipeline_score_fn(ddp, cfg.vocab_size)(seqs, starts)
    else:
        from megasyne.checkpoint.sharding import unwrap
        from megasyne.eval.lm import megatron_score_fn

        ours = [float(x) for x in megatron_score_fn(unwrap(ddp[0]), cfg.vocab_size)(seqs, starts)]
    assert all(c.training for c in ddp)  # the model's mode is restored
    if dist.get_rank() == 0:
        (out / f"scores_{layout}.json").write_text(json.dumps(
            {"ours": ours, "hf": hf_scores(out / "hf", seqs, starts)}))
