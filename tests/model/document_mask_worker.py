"""Packed documents through megasyne's model vs each document alone through transformers.

Usage (torchrun, 2 ranks): document_mask_worker.py OUT_DIR
OUT_DIR/hf holds the random GQA Llama, OUT_DIR/ms its conversion (the ``converted_gqa`` fixture).
Two packed rows of three documents each (different lengths, EOD separators, the last document
cut off without its EOD) go through the model at TP2 (sequence parallel) and at PP2, with each
attention path of
``megasyne.model.documents``: "mask" (Megatron's DotProductAttention, block-diagonal mask and
per-token RoPE) and "thd" (our SDPAttention, PackedSeqParams). Rank 0 writes
OUT_DIR/document_mask.json: per case, the largest logit difference to transformers over every
position of every document, the same without document masking (the control: must be large),
the scorer's per-row NLL difference, the training step's loss difference (eod_mask_loss on,
forward and backward through the pipeline schedule), and (mask path) the RoPE cosines'
difference to transformers' at the reset positions.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.training.documents import document_ids, reset_position_ids

EOD = 999  # the random model's vocabulary is 1000; no document token is 999
DOC_LENGTHS = [(5, 9, 8), (11, 3, 8)]  # per row, without separators: rows of 24 tokens
# (tp, pp, core attention, Triton kernels): "sdpa" with kernels is the CUDA default without TE
# (our fused RoPE of packed sequences; the interpreter runs the kernels here)
CASES = [(2, 1, "megatron", False), (2, 1, "sdpa", False), (2, 1, "sdpa", True),
         (1, 2, "megatron", False), (1, 2, "sdpa", False)]


def packed_rows() -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """tokens [2, 24] and, per row, the token indices of each of its documents."""
    rng = np.random.default_rng(3)
    rows, spans = [], []
    for lengths in DOC_LENGTHS:
        row, mine = [], []
        for i, n in enumerate(lengths):
            doc = list(rng.integers(0, EOD, n)) + ([EOD] if i < len(lengths) - 1 else [])
            mine.append(np.arange(len(row), len(row) + len(doc)))
            row += doc
        rows.append(row)
        spans.append(mine)
    return np.array(rows, dtype=np.int64), spans


def hf_alone(hf_dir: Path, tokens: np.ndarray, spans):
    """(per row, per document: transformers' logits [n, v] of the document alone; the model)."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return [[model(torch.from_numpy(tokens[r, idx]).unsqueeze(0)).logits[0] for idx in row]
                for r, row in enumerate(spans)], model


def build(ms_dir: Path, tp: int, pp: int, attention: str, kernels: bool):
    from megasyne.checkpoint.dist import load_checkpoint, read_manifest
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.model.config import LlamaConfig
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import init_parallel

    cfg = LlamaConfig.from_dict(read_manifest(next(ms_dir.glob("iter_*")))["model"])
    dims = ParallelDims(tp=tp, pp=pp, sequence_parallel=tp > 1, world_size=int(os.environ["WORLD_SIZE"]))
    init_parallel(dims, seed=0)
    chunks = build_model(cfg, dims, ModelRuntime(init_weights=False, attention=attention,
                                                 triton_kernels=kernels))
    load_checkpoint(ms_dir, chunks, model_config=cfg.to_dict())
    for c in chunks:
        c.eval()
    return cfg, chunks


def logits(chunks, tokens, positions, docs, vocab: int, masked: bool):
    """Full-vocabulary logits [b, s, vocab] on the last stage's TP rank 0 (None elsewhere),
    through the pipeline schedule (2 rows in one micro-batch)."""
    from megatron.core import parallel_state as ps

    from megasyne.model.documents import document_forward
    from megasyne.training.step import run_microbatches

    b, s = tokens.shape
    batch = dict(tokens=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions),
                 docs=torch.from_numpy(docs))

    def step(data_iterator, model):
        mb = next(data_iterator)
        if masked:
            out = document_forward(model, mb["tokens"], mb["position_ids"], mb["docs"])
        else:  # the control: the plain causal model over the packed rows
            out = model(mb["tokens"], torch.arange(s).expand(b, s), None)
        return out, None

    with torch.no_grad():
        out = run_microbatches(chunks, iter([batch]), num_microbatches=1, micro_batch_size=b,
                               seq_length=s, forward_only=True, forward_step_func=step,
                               documents=masked)
    if not ps.is_pipeline_last_stage():
        return None
    shard = out[0].float().contiguous()  # [b, s, padded_vocab / tp]
    pieces = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, shard, group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)[..., :vocab] if ps.get_tensor_model_parallel_rank() == 0 else None


def worst_difference(full, ref, spans) -> float:
    return max((full[r, idx] - ref[r][d]).abs().max().item()
               for r, row in enumerate(spans) for d, idx in enumerate(row))


def scorer_difference(chunks, vocab, tokens, positions, docs, ref, spans) -> float:
    """MegatronScorer.nll of the packed rows (labels: the next token of the row) vs the same
    sums from transformers' document-alone logits."""
    from megasyne.scorers import MegatronScorer

    labels = np.roll(tokens, -1, axis=1)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, -1] = False
    nll, count = MegatronScorer(chunks, vocab_size=vocab, micro_batch_size=1).nll(
        tokens, labels, mask, position_ids=positions, document_ids=docs)
    want = []
    for r, row in enumerate(spans):
        logp = torch.cat([ref[r][d] for d in range(len(row))]).double().log_softmax(-1)  # [s, v]
        picked = -logp.gather(-1, torch.from_numpy(labels[r]).unsqueeze(-1)).squeeze(-1)
        want.append(float(picked[torch.from_numpy(mask[r])].sum()))
    assert count.tolist() == mask.sum(1).tolist()
    return float(np.abs(nll - np.array(want)).max())


def training_loss_difference(chunks, tokens, positions, docs, ref, spans) -> float:
    """The training forward step (gpt_forward_step, document masking and eod_mask_loss) through
    the pipeline schedule, forward and backward, vs the same mean loss from transformers'
    document-alone logits."""
    from megasyne.training.step import gpt_forward_step, reduce_losses, run_microbatches

    labels = np.roll(tokens, -1, axis=1)
    loss_mask = (tokens != EOD).astype(np.float32)  # eod_mask_loss
    loss_mask[:, -1] = 0.0
    batch = dict(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                 loss_mask=torch.from_numpy(loss_mask), position_ids=torch.from_numpy(positions),
                 document_ids=torch.from_numpy(docs))
    iters = [iter([batch]) for _ in chunks] if len(chunks) > 1 else iter([batch])
    parts = run_microbatches(chunks, iters, num_microbatches=1, micro_batch_size=tokens.shape[0],
                             seq_length=tokens.shape[1], forward_only=False,
                             forward_step_func=gpt_forward_step, documents=True)
    loss, _, _ = reduce_losses(parts)
    for c in chunks:
        c.zero_grad()
    total = count = 0.0
    for r, row in enumerate(spans):
        logp = torch.cat([ref[r][d] for d in range(len(row))]).double().log_softmax(-1)  # [s, v]
        picked = -logp.gather(-1, torch.from_numpy(labels[r]).unsqueeze(-1)).squeeze(-1)
        total += float((picked * torch.from_numpy(loss_mask[r]).double()).sum())
        count += float(loss_mask[r].sum())
    return abs(loss - total / count)


def rope_difference(chunks, hf_model, tokens, positions, docs) -> float | None:
    """The RoPE angles the mask path hands the decoder vs transformers' cosines at the reset
    positions (first stage only)."""
    from megasyne.model.documents import document_forward

    model = chunks[0]
    if not model.pre_process:
        return None
    seen = {}

    def capture(module, args, kwargs):
        seen["rope"] = kwargs["rotary_pos_emb"]  # [s, b, 1, d]

    hook = model.decoder.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        document_forward(model, torch.from_numpy(tokens), torch.from_numpy(positions),
                         torch.from_numpy(docs))
        hook.remove()
        x = torch.zeros(1, dtype=torch.float32)
        cos, _ = hf_model.model.rotary_emb(x, torch.from_numpy(positions))      # [b, s, d]
    ours = torch.cos(seen["rope"][:, :, 0, :]).transpose(0, 1)                    # [b, s, d]
    return (ours - cos).abs().max().item()


def check(out: Path, case: tuple, tokens, positions, docs, ref, spans, hf_model) -> dict:
    """One layout x attention: this rank's share of the results."""
    from megatron.core import parallel_state as ps

    tp, pp, attention, kernels = case
    cfg, chunks = build(out / "ms", tp, pp, attention, kernels)
    r = {"path": chunks[0].document_attention}
    for masked in (True, False):
        full = logits(chunks, tokens, positions, docs, cfg.vocab_size, masked)
        if full is not None:
            r["logit_diff" if masked else "unmasked_logit_diff"] = worst_difference(full, ref, spans)
    nll_diff = scorer_difference(chunks, cfg.vocab_size, tokens, positions, docs, ref, spans)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        r["nll_diff"] = nll_diff
    r["train_loss_diff"] = training_loss_difference(chunks, tokens, positions, docs, ref, spans)
    if r["path"] == "mask":
        rope = rope_difference(chunks, hf_model, tokens, positions, docs)
        if rope is not None:
            r["rope_cos_diff"] = rope
    return r


def main(out: Path) -> None:
    tokens, spans = packed_rows()
    docs = document_ids(tokens, EOD)
    positions = reset_position_ids(docs)
    ref, hf_model = hf_alone(out / "hf", tokens, spans)
    results = {}
    for case in CASES:
        mine = check(out, case, tokens, positions, docs, ref, spans, hf_model)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        tp, pp, attention, kernels = case
        results[f"tp{tp}pp{pp}-{attention}{'-kernels' if kernels else ''}"] = \
            {k: v for g in gathered for k, v in g.items()}
    if dist.get_rank() == 0:
        (out / "document_mask.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.barrier()
