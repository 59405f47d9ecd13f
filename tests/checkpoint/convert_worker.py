"""Conversion worker for test_convert.py (one torchrun launch; the test process itself converts
OUT/hf/CASE -> OUT/ms/CASE with the streaming single-process path first).

Usage:
  convert_worker.py layouts OUT SPEC [SPEC ...]     under torchrun (4 ranks), SPEC =
      convert:CASE:TP:PP  HF -> megasyne written by a TPxPP job -> OUT/ms_tp{TP}pp{PP}/CASE
      load:CASE:TP:PP     load OUT/ms/CASE at TPxPP (DP = 4/(TP*PP)) into an fp32 model whose
                          parameters were NaN-filled, gather the full parameters and the
                          logits on hf_models.tokens (forward only, Megatron's pipeline
                          schedule) -> OUT/load/CASE.tp{TP}pp{PP}.pt (rank 0)
      trainsave:CASE:TP:PP  load as above, one training step at LR 0, save a training
                          checkpoint with optimizer state -> OUT/trained/CASE
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import megasyne  # noqa: F401  (sets TRITON_INTERPRET before megatron imports triton)
from megasyne.checkpoint.hf_convert import hf_to_megasyne
from tests.checkpoint.hf_models import seq_length, tokens


def _merge_ranks(mine: dict | None) -> dict:
    """Union of every rank's dict (None contributes nothing); first writer wins."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    merged = {}
    for d in gathered:
        for k, v in (d or {}).items():
            merged.setdefault(k, v)
    return merged


def forward_logits(chunks, toks: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Full-vocab logits [b, s, vocab] on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = toks.shape
    batch = dict(tokens=toks, position_ids=torch.arange(s).unsqueeze(0).expand(b, s))

    def step(data_iterator, model):
        mb = next(data_iterator)
        return model(mb["tokens"], mb["position_ids"], None), None  # no loss: keep logits

    iters = [iter([batch]) for _ in chunks] if len(chunks) > 1 else iter([batch])
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters, model=chunks, num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    shard = out[0].float().contiguous()  # [b, s, padded_vocab / tp]
    pieces = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(pieces, shard, group=ps.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=-1)[..., :vocab]


def _build_and_load(out: Path, case: str, tp: int, pp: int):
    from megasyne.checkpoint.dist import load_checkpoint, read_manifest
    from megasyne.model.builder import ModelRuntime, build_model
    from megasyne.model.config import LlamaConfig
    from megasyne.parallel.dims import ParallelDims
    from megasyne.parallel.init import init_parallel

    root = out / "ms" / case
    cfg = LlamaConfig.from_dict(read_manifest(root)["model"])
    dims = ParallelDims(tp=tp, pp=pp, world_size=int(os.environ["WORLD_SIZE"]))
    init_parallel(dims, seed=0)
    chunks = build_model(cfg, dims, ModelRuntime(init_weights=False))
    with torch.no_grad():
        for c in chunks:
            for p in c.parameters():
                p.fill_(float("nan"))  # anything the checkpoint does not set stays NaN
    load_checkpoint(root, chunks, model_config=cfg.to_dict())
    return cfg, dims, chunks


def load(out: Path, case: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    from megasyne.checkpoint.sharding import gather_full_state

    cfg, _, chunks = _build_and_load(out, case, tp, pp)
    for c in chunks:
        c.eval()
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    params = {}
    for c in chunks:
        params.update(gather_full_state(c, ps.get_tensor_model_parallel_group()))
    logits = forward_logits(chunks, tokens(cfg.vocab_size, seq_length(case)), cfg.vocab_size)
    merged = _merge_ranks({**params, **({"__logits__": logits} if logits is not None else {})}
                          if first else None)
    if dist.get_rank() == 0:
        (out / "load").mkdir(exist_ok=True)
        torch.save(dict(logits=merged.pop("__logits__"), params=merged,
                        padded_vocab=cfg.padded_vocab_size(tp)),
                   out / "load" / f"{case}.tp{tp}pp{pp}.pt")
    dist.barrier()


def train_and_save(out: Path, case: str, tp: int, pp: int) -> None:
    """A checkpoint as training writes it (DDP, optimizer state, iteration 1), after one
    step at learning rate 0: the weights are still the HF ones, bit for bit."""
    from megatron.core import parallel_state as ps

    from megasyne.checkpoint.dist import save_checkpoint
    from megasyne.training.optim import OptimConfig, build_optimizer, wrap_ddp
    from megasyne.training.step import train_step

    cfg, dims, chunks = _build_and_load(out, case, tp, pp)
    ddp = wrap_ddp(chunks, dims)
    optimizer = build_optimizer(ddp, dims, OptimConfig(lr=1e-3))
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    seq = tokens(cfg.vocab_size)[ps.get_data_parallel_rank()::dims.dp]
    batch = dict(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=torch.ones_like(seq[:, 1:]),
                 position_ids=torch.arange(seq.shape[1] - 1).expand(seq.shape[0], -1))
    iters = [iter([batch]) for _ in ddp] if len(ddp) > 1 else iter([batch])
    train_step(ddp, optimizer, iters, num_microbatches=1, micro_batch_size=seq.shape[0],
               seq_length=seq.shape[1] - 1)
    save_checkpoint(out / "trained" / case, 1, ddp, model_config=cfg.to_dict(),
                    layout=dict(tp=tp, pp=pp, dp=dims.dp), optimizer=optimizer,
                    extra={"global_batch_size": 2})


def layouts(out: Path, specs: list[str]) -> None:
    for spec in specs:
        action, case, tp, pp = spec.split(":")
        tp, pp = int(tp), int(pp)
        try:
            if action == "convert":
                hf_to_megasyne(out / "hf" / case, out / f"ms_tp{tp}pp{pp}" / case, tp=tp, pp=pp,
                               progress=False)
            elif action == "trainsave":
                train_and_save(out, case, tp, pp)
            else:
                load(out, case, tp, pp)
        except Exception as exc:  # recorded for the test; every rank fails at the same point
            if dist.get_rank() == 0:  # (model construction), so nobody is left in a collective
                (out / "errors").mkdir(exist_ok=True)
                (out / "errors" / spec.replace(":", "_")).write_text(f"{type(exc).__name__}: {exc}")
            dist.barrier()


if __name__ == "__main__":
    mode, out_dir, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if mode != "layouts":
        sys.exit(f"convert_worker.py: unknown mode {mode!r} (layouts only)")
    layouts(out_dir, rest)
