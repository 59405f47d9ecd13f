"""Models that give per-window negative log-likelihoods for score_ppl: megasyne checkpoints at any
TP x PP (x DP), and Hugging Face directories through ``transformers``.

Both take one batch of windows, right-padded::

    tokens  int64 [b, s]   inputs (window tokens 0..len-2), 0-padded
    labels  int64 [b, s]   next tokens (window tokens 1..len-1)
    mask    bool  [b, s]   which label positions count (targets not scored by an earlier window)

and return ``(nll_sum float64 [b], count int64 [b])``. Padding sits after every real token of a row
and attention is causal, so it never changes a real position's logits.

The padded vocabulary of a megasyne model (rows added to make the vocabulary divisible by 128 x TP)
is excluded from the softmax: those columns are set to -inf before the log-sum-exp, so the result
is the perplexity of the ``vocab_size`` real tokens, exactly what ``transformers`` computes.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def vocab_parallel_nll(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int,
                       tp_rank: int = 0, tp_group=None) -> torch.Tensor:
    """Per-token NLL [b, s] (fp32) from this TP rank's logits shard [b, s, V_padded / tp].

    Columns of global id >= ``vocab_size`` (vocabulary padding) take no probability mass.
    With ``tp_group`` None the shard is the whole vocabulary.
    """
    x = logits.float()                                        # [b, s, v]
    v = x.shape[-1]
    start = tp_rank * v
    valid = max(0, min(v, vocab_size - start))
    if valid < v:
        x = x.clone()
        x[..., valid:] = float("-inf")
    m = x.max(dim=-1).values                                  # [b, s]
    if tp_group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)      # [b, s]
    local = (labels >= start) & (labels < start + v)          # [b, s]
    idx = (labels - start).clamp(0, v - 1).unsqueeze(-1)      # [b, s, 1]
    target = torch.where(local, x.gather(-1, idx).squeeze(-1), torch.zeros_like(m))
    if tp_group is not None:
        dist.all_reduce(sum_exp, group=tp_group)
        dist.all_reduce(target, group=tp_group)
    return torch.log(sum_exp) + m - target


def _row_sums(nll: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    nll = nll.double() * mask                                 # [b, s]
    return nll.sum(dim=1).cpu().numpy(), mask.sum(dim=1).cpu().numpy().astype(np.int64)


class MegatronScorer:
    """A megasyne checkpoint on this rank's share of a TP x PP x DP layout (eval mode, no grads).

    Every rank of one model replica (TP x PP group) gets the same windows and returns the same
    sums (the last pipeline stage computes them and broadcasts over the pipeline group); only one
    rank per replica writes (``is_writer``). DP replicas take different blocks.
    """

    def __init__(self, checkpoint: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                 dtype: torch.dtype = torch.float32, micro_batch_size: int = 1,
                 attention: str | None = None) -> None:
        from megasyne.checkpoint.dist import load_checkpoint, read_manifest, resolve
        from megasyne.model.builder import ModelRuntime, build_model
        from megasyne.model.config import LlamaConfig
        from megasyne.parallel.dims import ParallelDims
        from megasyne.parallel.init import init_parallel, launcher_world

        _, _, world = launcher_world()
        self.checkpoint = resolve(checkpoint)
        manifest = read_manifest(self.checkpoint)
        self.cfg = LlamaConfig.from_dict(manifest["model"])
        self.identity = {"kind": "megasyne", "path": str(self.checkpoint.resolve()),
                         "iteration": manifest.get("iteration")}
        self.dims = ParallelDims(tp=tp, pp=pp, world_size=world)
        self.dims.validate_for_model(num_layers=self.cfg.num_layers,
                                     num_attention_heads=self.cfg.num_attention_heads,
                                     num_query_groups=self.cfg.num_query_groups,
                                     ffn_hidden_size=self.cfg.ffn_hidden_size)
        init_parallel(self.dims)
        self.chunks = build_model(self.cfg, self.dims,
                                  ModelRuntime(dtype=dtype, init_weights=False, attention=attention))
        load_checkpoint(self.checkpoint, self.chunks, model_config=self.cfg.to_dict())
        for c in self.chunks:
            c.eval()
        self._attach(self.chunks, tp=tp, micro_batch_size=micro_batch_size,
                     vocab_size=self.cfg.vocab_size)
        self.dtype = str(dtype).replace("torch.", "")

    @classmethod
    def from_model(cls, chunks: list, *, vocab_size: int, micro_batch_size: int = 1) -> "MegatronScorer":
        """Score with a model already built and placed (e.g. the trainer's, at any TP x PP
        without virtual stages); ``nll`` puts it in eval mode and restores its mode after."""
        from megatron.core import parallel_state as ps

        if len(chunks) != 1:
            raise ValueError("MegatronScorer.from_model: interleaved (virtual) pipeline stages "
                             "are not supported")
        self = cls.__new__(cls)
        self.chunks, self.dims = chunks, None
        self._attach(chunks, tp=ps.get_tensor_model_parallel_world_size(),
                     micro_batch_size=micro_batch_size, vocab_size=vocab_size)
        return self

    def _attach(self, chunks: list, *, tp: int, micro_batch_size: int, vocab_size: int) -> None:
        from megatron.core import parallel_state as ps

        self.device = next(chunks[0].parameters()).device
        self.micro_batch_size = micro_batch_size
        self.vocab_size = vocab_size
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.last_stage = ps.is_pipeline_last_stage()
        self.pp_last_global = ps.get_pipeline_model_parallel_last_rank()
        self.is_writer = self.tp_rank == 0 and ps.get_pipeline_model_parallel_rank() == 0

    def _loss_func(self, mb: dict, output_tensor: torch.Tensor, non_loss_data: bool = True):
        nll = vocab_parallel_nll(output_tensor, mb["labels"], vocab_size=self.vocab_size,
                                 tp_rank=self.tp_rank, tp_group=self.tp_group)  # [mbs, s]
        return _row_sums(nll, mb["mask"])

    def nll(self, tokens: np.ndarray, labels: np.ndarray, mask: np.ndarray):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = tokens.shape
        mbs = self.micro_batch_size
        rows = -(-b // mbs) * mbs  # pad the batch to whole micro-batches (dummy rows: no targets)
        t = torch.zeros(rows, s, dtype=torch.long)
        y = torch.zeros(rows, s, dtype=torch.long)
        m = torch.zeros(rows, s, dtype=torch.bool)
        t[:b], y[:b], m[:b] = torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(mask)
        t, y, m = t.to(self.device), y.to(self.device), m.to(self.device)
        pos = torch.arange(s, device=self.device).unsqueeze(0).expand(mbs, s)
        mbs_list = [dict(tokens=t[i:i + mbs], labels=y[i:i + mbs], mask=m[i:i + mbs])
                    for i in range(0, rows, mbs)]

        def step(data_iterator, model):
            mb = next(data_iterator)
            return model(mb["tokens"], pos, None), partial(self._loss_func, mb)

        iters = iter(mbs_list)
        modes = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        try:
            with torch.no_grad():
                out = get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iters, model=self.chunks,
                    num_microbatches=len(mbs_list), seq_length=s, micro_batch_size=mbs,
                    forward_only=True, collect_non_loss_data=True)
        finally:
            for c, mode in zip(self.chunks, modes):
                c.train(mode)
        sums = torch.zeros(2, rows, dtype=torch.float64)                  # [nll_sum; count]
        if self.last_stage:
            sums[0] = torch.from_numpy(np.concatenate([o[0] for o in out]))
            sums[1] = torch.from_numpy(np.concatenate([o[1] for o in out]).astype(np.float64))
        if self.pp > 1:  # on the model's device: NCCL broadcasts CUDA tensors only
            sums = sums.to(self.device)
            dist.broadcast(sums, src=self.pp_last_global, group=self.pp_group)
            sums = sums.cpu()
        return sums[0, :b].numpy(), sums[1, :b].numpy().astype(np.int64)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        from megasyne.parallel.init import destroy_parallel

        destroy_parallel()


class HFScorer:
    """A Hugging Face causal LM through ``transformers`` (one replica per rank: DP only)."""

    def __init__(self, hf_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 attention: str | None = None) -> None:
        import hashlib

        import transformers

        self.dir = Path(hf_dir)
        kwargs = {"attn_implementation": attention} if attention else {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            self.dir, dtype=dtype, **kwargs).eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.vocab_size = self.model.config.vocab_size
        self.dtype = str(dtype).replace("torch.", "")
        config_sha = hashlib.sha256((self.dir / "config.json").read_bytes()).hexdigest()
        weights = sorted((p.name, p.stat().st_size) for p in self.dir.iterdir()
                         if p.suffix in (".safetensors", ".bin"))
        self.identity = {"kind": "hf", "path": str(self.dir.resolve()), "config_sha256": config_sha,
                         "weight_files": weights}
        self.dp_rank, self.dp_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.is_writer = True

    def nll(self, tokens: np.ndarray, labels: np.ndarray, mask: np.ndarray):
        t = torch.from_numpy(tokens).to(self.device)
        y = torch.from_numpy(labels).to(self.device)
        m = torch.from_numpy(mask).to(self.device)
        # A row's real inputs end at its last counted label (every window scores its last token).
        last = torch.from_numpy(_row_input_lengths(mask)).to(self.device)      # [b]
        attn = (torch.arange(t.shape[1], device=self.device).unsqueeze(0) < last.unsqueeze(1))
        with torch.no_grad():
            logits = self.model(input_ids=t, attention_mask=attn.long()).logits  # [b, s, V]
        nll = vocab_parallel_nll(logits, y, vocab_size=self.vocab_size)
        return _row_sums(nll, m)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _row_input_lengths(mask: np.ndarray) -> np.ndarray:
    """Length of each row's real input = 1 + position of its last counted label ([b] int64)."""
    any_ = mask.any(axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.where(any_, last + 1, 1).astype(np.int64)


__all__ = ["HFScorer", "MegatronScorer", "vocab_parallel_nll"]
