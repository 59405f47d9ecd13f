"""megasyne.scorers.MegatronScorer on the training model vs transformers' log-probabilities.

Usage (torchrun, 2 ranks): scorer_worker.py OUT_DIR. OUT_DIR/hf (a random GQA Llama, 4 layers)
and OUT_DIR/ms (its megasyne conversion) come from the test. In one launch, for each layout of
the two ranks (TP2, PP2, PP2 x 2 virtual stages, DP2), the checkpoint is loaded into the
trainer's DDP-wrapped chunks and scored through the scorer's two faces: ``score_fn`` (summed
continuation log-probabilities; sequences sharing their input run once) and ``nll`` with a
hand-made mask. DP2 scores each rank's share (``dp_rank::dp_size``) and gathers. Rank 0 writes
OUT_DIR/scores.json: {layout: {"ours", "nll", "count"}, "hf": ..., "hf_nll": ..., "hf_count": ...}.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint.dist import load_checkpoint, read_manifest
from megasyne.model.builder import build_model
from megasyne.model.config import LlamaConfig
from megasyne.parallel.dims import ParallelDims
from megasyne.parallel.init import init_parallel
from megasyne.scorers import MegatronScorer, score_fn
from megasyne.training.optim import wrap_ddp

LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "pp2vp2": dict(pp=2, virtual_pp=2), "dp2": {}}


def sequences(vocab: int):
    """Mixed lengths, and two pairs sharing their input (the last token differs): the
    multiple-choice case the scorer runs once per input."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    seqs += [seqs[1][:-1] + [(seqs[1][-1] + 1) % vocab], seqs[3][:-1] + [7]]
    return seqs, [3, 10, 1, 5, 10, 2]


def windows(vocab: int):
    """nll's own face: tokens / labels / mask of 3 rows (a masked hole in the middle one)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab, (3, 12), generator=g).numpy()
    labels = torch.randint(0, vocab, (3, 12), generator=g).numpy()
    mask = np.ones((3, 12), dtype=bool)
    mask[1, 4:7] = False
    mask[2, 9:] = False        # a shorter row: its padding is never counted
    return tokens, labels, mask


def hf_reference(hf_dir: Path, seqs, starts, tokens, labels, mask):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                          dtype=torch.float32).eval()
    with torch.no_grad():
        scores = []
        for seq, start in zip(seqs, starts):
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq))))
        logp = torch.log_softmax(model(input_ids=torch.from_numpy(tokens)).logits.double(), -1)
        nll = -logp.gather(-1, torch.from_numpy(labels).unsqueeze(-1)).squeeze(-1)
        nll = (nll * torch.from_numpy(mask)).sum(1)
    return scores, nll.tolist(), mask.sum(1).tolist()


def score_layout(out: Path, layout: str) -> dict:
    dims = ParallelDims(world_size=2, **LAYOUTS[layout])
    init_parallel(dims, seed=0)
    cfg = LlamaConfig.from_dict(read_manifest(next((out / "ms").glob("iter_*")))["model"])
    ddp = wrap_ddp(build_model(cfg, dims), dims)
    load_checkpoint(out / "ms", ddp, model_config=cfg.to_dict())
    scorer = MegatronScorer(ddp, vocab_size=cfg.vocab_size, micro_batch_size=2)
    seqs, starts = sequences(cfg.vocab_size)
    tokens, labels, mask = windows(cfg.vocab_size)
    if layout == "dp2":  # each replica scores its share; the caller gathers
        r, n = scorer.dp_rank, scorer.dp_size
        assert n == 2
        mine = score_fn(scorer)(seqs[r::n], starts[r::n])
        parts = [None, None]
        dist.all_gather_object(parts, mine)
        ours = [parts[i % 2][i // 2] for i in range(len(seqs))]
    else:
        ours = score_fn(scorer)(seqs, starts)
    nll, count = scorer.nll(tokens, labels, mask)
    assert all(c.training for c in ddp)  # the model's mode is restored
    return {"ours": ours, "nll": nll.tolist(), "count": count.tolist()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = {layout: score_layout(out, layout) for layout in LAYOUTS}
    if dist.get_rank() == 0:
        cfg = LlamaConfig.from_dict(read_manifest(next((out / "ms").glob("iter_*")))["model"])
        seqs, starts = sequences(cfg.vocab_size)
        results["hf"], results["hf_nll"], results["hf_count"] = hf_reference(
            out / "hf", seqs, starts, *windows(cfg.vocab_size))
        (out / "scores.json").write_text(json.dumps(results))
