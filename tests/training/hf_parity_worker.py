"""Trains the same random Llama 3 steps with transformers + torch AdamW and with megasyne.

Usage (torchrun, 1 or 2 ranks): hf_parity_worker.py OUT_DIR TP
OUT_DIR/hf holds the HF model, OUT_DIR/ms its conversion (made by the test). Rank 0 writes
OUT_DIR/losses_tp<TP>.json: {"hf": [...], "megasyne": [...]}.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import megasyne  # noqa: F401
from megasyne.checkpoint.dist import load_checkpoint, read_manifest
from megasyne.model.builder import build_model
from megasyne.model.config import LlamaConfig
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
from megasyne.training.step import train_step

LR, WD, CLIP, STEPS, B, S = 3e-3, 0.1, 1.0, 3, 4, 16
EPS = 1e-8


def batches(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (STEPS, B, S + 1), generator=torch.Generator().manual_seed(7))


def train_hf(hf_dir: Path, data: torch.Tensor) -> list[float]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                          dtype=torch.float32)
    # Megatron's rule: no weight decay on 1-D parameters (the norms).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=EPS)
    losses = []
    for tokens in data:
        logits = model(input_ids=tokens[:, :-1]).logits  # [b, s, v]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
    return losses


def train_megasyne(ms_dir: Path, data: torch.Tensor, tp: int) -> list[float]:
    dims = ParallelDims(tp=tp, world_size=int(os.environ["WORLD_SIZE"]))
    init_parallel(dims, seed=0)
    cfg = LlamaConfig.from_dict(read_manifest(next(ms_dir.glob("iter_*")))["model"])
    ddp = wrap_ddp(build_model(cfg, dims), dims)
    load_checkpoint(ms_dir, ddp, model_config=cfg.to_dict())
    opt = build_optimizer(ddp, dims, OptimConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, adam_eps=EPS))
    losses = []
    for tokens in data:
        mbs = [dict(tokens=tokens[k:k + 1, :-1], labels=tokens[k:k + 1, 1:],
                    loss_mask=torch.ones(1, S), position_ids=torch.arange(S).unsqueeze(0))
               for k in range(B)]
        losses.append(train_step(ddp, opt, iter(mbs), num_microbatches=B, micro_batch_size=1,
                                 seq_length=S).loss)
    return losses


if __name__ == "__main__":
    out, tp = Path(sys.argv[1]), int(sys.argv[2])
    vocab = json.loads((out / "hf" / "config.json").read_text())["vocab_size"]
    data = batches(vocab)
    ours = train_megasyne(out / "ms", data, tp)
    if dist.get_rank() == 0:
        ref = train_hf(out / "hf", data)
        (out / f"losses_tp{tp}.json").write_text(json.dumps({"hf": ref, "megasyne": ours}))
