"""Forward-only scoring: the negative log-likelihood of token windows under one model.

One job with one implementation, used by everything that needs it: validation and the adaptive
mixture's per-topic perplexity inside training, the in-training benchmark probe,
``tools/evaluate.py`` (megasyne checkpoints and Hugging Face directories) and
``tools/score_ppl.py``.

The contract of a :class:`TokenScorer`::

    nll(tokens [u, s], labels [b, s], mask [b, s], rows=None) -> (nll_sum float64 [b], count int64 [b])

- ``tokens`` are right-padded model inputs (int64); ``labels[i, k]`` is the token that position
  ``k`` of input row ``rows[i]`` predicts, and ``mask[i, k]`` says whether it counts. ``rows``
  (int [b], default ``arange(u)``) lets several label rows share one input row: the four
  answers of a multiple-choice question behind one context cost one forward pass.
- Padding sits after a row's real tokens and attention is causal, so it never changes the
  logits of a real position.
- ``MegatronScorer.nll`` also takes packed documents (validation with document masking):
  ``position_ids`` and ``document_ids`` [u, s], keyword-only; without them, rows are plain.
- It is a collective over one model replica: every TP / PP rank of the replica calls it with
  the same arguments and returns the same sums. Data-parallel replicas score different rows:
  ``dp_rank`` / ``dp_size`` tell the caller which share is its own.
- Vocabulary padding (a megasyne model pads its vocabulary to a multiple of 128 x TP) takes no
  probability mass: the Megatron model computes the loss with its own
  ``compute_language_model_loss``, the code of the training loss, which gives the padding
  columns ``LlamaGPTModel.PADDED_LOGIT``. The result is the likelihood under the
  ``vocab_size`` real tokens, as transformers computes it.

:class:`MegatronScorer` runs the training model (a checkpoint at any TP x PP, interleaved
virtual stages included, or the trainer's own model chunks) through Megatron-Core's
forward-only pipeline schedule. :class:`HFScorer` runs a transformers causal LM (one replica
per rank). :func:`continuation_logprobs` adapts either to the ``score_fn(sequences, starts)``
contract of ``megasyne.eval.in_training``.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megasyne.training.optim import finish_param_gather


class TokenScorer(ABC):
    """Summed NLL of label rows under one model replica (see the module docstring)."""

    vocab_size: int
    """Real vocabulary size (padding excluded)."""
    dp_rank: int = 0
    dp_size: int = 1
    is_writer: bool = True
    """One rank per replica writes results (TP rank 0 of the first pipeline stage)."""
    identity: dict = {}
    """What was scored (kind, path, iteration / config hash): recorded in reports."""
    dtype: str = "float32"

    @abstractmethod
    def nll(self, tokens: np.ndarray, labels: np.ndarray, mask: np.ndarray,
            rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(nll_sum float64 [b], count int64 [b]) of each label row."""

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:  # noqa: B027 (optional to override: nothing to release by default)
        """Release process groups this scorer created (none by default)."""


def _check_batch(tokens, labels, mask, rows) -> np.ndarray:
    if tokens.ndim != 2 or labels.shape != mask.shape or labels.ndim != 2 \
            or labels.shape[1] != tokens.shape[1]:
        raise ValueError(f"nll: need tokens [u, s], labels and mask [b, s]; got "
                         f"{tokens.shape}, {labels.shape}, {mask.shape}")
    rows = np.arange(tokens.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.shape != (labels.shape[0],) or (rows.size and not 0 <= rows.min() <= rows.max()
                                           < tokens.shape[0]):
        raise ValueError(f"nll: rows must give an input row in [0, {tokens.shape[0]}) for each "
                         f"of the {labels.shape[0]} label rows")
    return rows


def _row_sums(nll: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL [b, s] -> (masked sum float64 [b], count int64 [b])."""
    nll = nll.double() * mask
    return nll.sum(dim=1).cpu().numpy(), mask.sum(dim=1).cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------- Megatron-Core

class MegatronScorer(TokenScorer):
    """Model chunks of this rank (any TP x PP x virtual stages) in eval mode, no gradients."""

    def __init__(self, chunks: list, *, vocab_size: int, micro_batch_size: int = 1,
                 identity: dict | None = None, dtype: str | None = None,
                 owns_parallel: bool = False) -> None:
        """Score with chunks already built and placed (e.g. the trainer's, DDP-wrapped or not);
        ``nll`` puts them in eval mode and restores their mode after."""
        from megatron.core import parallel_state as ps

        self.chunks = list(chunks)
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size
        self.identity = identity or {"kind": "megasyne-model"}
        param = next(self.chunks[0].parameters())
        self.device = param.device
        self.dtype = dtype or str(param.dtype).replace("torch.", "")
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_last_global = ps.get_pipeline_model_parallel_last_rank()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.is_writer = (ps.get_tensor_model_parallel_rank() == 0
                          and ps.get_pipeline_model_parallel_rank() == 0)
        self._owns_parallel = owns_parallel
        self.config = None
        """The LlamaConfig when loaded from a checkpoint (generation needs its shapes)."""
        # The trainer's chunks may still await the all-gather of their last update
        # (overlap_param_gather): finish it here, where every rank passes, so that the forwards
        # below read post-step weights and communicate nothing however many each rank runs.
        finish_param_gather(self.chunks)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *, tp: int = 1, pp: int = 1,
                        virtual_pp: int | None = None, dtype: torch.dtype = torch.float32,
                        micro_batch_size: int = 1, attention: str | None = None) -> MegatronScorer:
        """Load a megasyne checkpoint (saved at any layout) at TP x PP (x virtual stages) over
        the launcher's ranks (DP = world / (TP x PP)); creates the process groups."""
        from megasyne.checkpoint.dist import load_checkpoint, read_manifest, resolve
        from megasyne.model.builder import ModelRuntime, build_model
        from megasyne.model.config import LlamaConfig
        from megasyne.parallel.dims import ParallelDims
        from megasyne.parallel.init import init_parallel, launcher_world

        path = resolve(checkpoint)
        manifest = read_manifest(path)
        cfg = LlamaConfig.from_dict(manifest["model"])
        dims = ParallelDims(tp=tp, pp=pp, virtual_pp=virtual_pp, world_size=launcher_world()[2])
        dims.validate_for_model(num_layers=cfg.num_layers,
                                num_attention_heads=cfg.num_attention_heads,
                                num_query_groups=cfg.num_query_groups,
                                ffn_hidden_size=cfg.ffn_hidden_size)
        init_parallel(dims)
        chunks = build_model(cfg, dims, ModelRuntime(dtype=dtype, init_weights=False,
                                                     attention=attention))
        load_checkpoint(path, chunks, model_config=cfg.to_dict())
        for c in chunks:
            c.eval()
        self = cls(chunks, vocab_size=cfg.vocab_size, micro_batch_size=micro_batch_size,
                   identity={"kind": "megasyne", "path": str(path.resolve()),
                             "iteration": manifest.get("iteration")},
                   dtype=str(dtype).replace("torch.", ""), owns_parallel=True)
        self.config = cfg
        return self

    def _micro_batches(self, tokens, labels, mask, rows, position_ids=None,
                       document_ids=None) -> list[dict]:
        """Input rows in micro-batches of micro_batch_size (padded with empty rows; their
        number a multiple of PP, which the interleaved schedule needs), each with the label
        rows that read it."""
        mbs, s = self.micro_batch_size, tokens.shape[1]
        s_pad = -(-s // self.tp) * self.tp    # sequence parallel splits the sequence over TP
        n_mb = max(1, -(-tokens.shape[0] // mbs))
        if self.pp > 1:
            n_mb = -(-n_mb // self.pp) * self.pp
        t = torch.zeros(n_mb * mbs, s_pad, dtype=torch.long)
        t[: tokens.shape[0], :s] = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        y = torch.zeros(labels.shape[0], s_pad, dtype=torch.long)
        y[:, :s] = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        m = torch.zeros(labels.shape[0], s_pad, dtype=torch.bool)
        m[:, :s] = torch.from_numpy(np.asarray(mask, dtype=bool))
        pos = torch.arange(s_pad).repeat(n_mb * mbs, 1)                 # [rows, s_pad]
        if position_ids is not None:
            pos[: tokens.shape[0], :s] = torch.from_numpy(np.asarray(position_ids, dtype=np.int64))
        docs = None
        if document_ids is not None:  # padding: a document of its own after the real tokens
            docs = torch.zeros(n_mb * mbs, s_pad, dtype=torch.int32)
            docs[: tokens.shape[0], :s] = torch.from_numpy(np.asarray(document_ids, dtype=np.int32))
            docs[: tokens.shape[0], s:] = docs[: tokens.shape[0], s - 1:s] + 1
        out = []
        for k in range(n_mb):
            mine = np.nonzero((rows >= k * mbs) & (rows < (k + 1) * mbs))[0]
            rows_k = slice(k * mbs, (k + 1) * mbs)
            out.append(dict(tokens=t[rows_k].to(self.device), position_ids=pos[rows_k].to(self.device),
                            document_ids=None if docs is None else docs[rows_k],  # stays on the CPU
                            label_rows=mine,
                            select=torch.from_numpy(rows[mine] - k * mbs).to(self.device),
                            labels=y[mine].to(self.device), mask=m[mine].to(self.device)))
        return out

    def _loss_func(self, model, mb: dict, output_tensor: torch.Tensor, non_loss_data: bool = True):
        """Last stage: logits [mbs, s, V/tp] -> (nll_sum, count) of this micro-batch's label
        rows, through the model's own loss (padded vocabulary masked as in training)."""
        from megasyne.checkpoint.sharding import unwrap

        if len(mb["label_rows"]) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        logits = output_tensor.index_select(0, mb["select"]).transpose(0, 1).contiguous()
        nll = unwrap(model).compute_language_model_loss(mb["labels"], logits)  # [b, s]
        return _row_sums(nll, mb["mask"])

    def nll(self, tokens, labels, mask, rows=None, *, position_ids=None, document_ids=None):
        """See TokenScorer.nll. Packed documents (validation with document masking), both or
        neither: ``position_ids`` [u, s] replace 0..s-1, and ``document_ids`` [u, s] (ids
        constant over each document of a row) keep attention inside each document
        (``megasyne.model.documents``)."""
        from functools import partial

        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megasyne.model.documents import document_forward, schedule_shape

        rows = _check_batch(tokens, labels, mask, rows)
        finish_param_gather(self.chunks)  # no-op unless chunks trained since __init__
        if (position_ids is None) != (document_ids is None):
            raise ValueError("nll: position_ids and document_ids go together (packed documents)")
        for name, extra in (("position_ids", position_ids), ("document_ids", document_ids)):
            if extra is not None and np.shape(extra) != tokens.shape:
                raise ValueError(f"nll: {name} must have the shape of tokens {tokens.shape}, "
                                 f"got {np.shape(extra)}")
        mbs_list = self._micro_batches(tokens, labels, mask, rows, position_ids, document_ids)
        s = mbs_list[0]["tokens"].shape[1]

        def step(data_iterator, model):
            mb = next(data_iterator)
            if mb["document_ids"] is not None:
                logits = document_forward(model, mb["tokens"], mb["position_ids"],
                                          mb["document_ids"])
            else:
                logits = model(mb["tokens"], mb["position_ids"], None)
            return logits, partial(self._loss_func, model, mb)

        mbs, seq = schedule_shape(self.chunks[0], self.micro_batch_size, s,
                                  document_ids is not None)

        iters = [iter(mbs_list) for _ in self.chunks] if len(self.chunks) > 1 else iter(mbs_list)
        modes = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        try:
            with torch.no_grad():
                out = get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iters, model=self.chunks,
                    num_microbatches=len(mbs_list), seq_length=seq,
                    micro_batch_size=mbs, forward_only=True,
                    collect_non_loss_data=True)
        finally:
            for c, mode in zip(self.chunks, modes):
                c.train(mode)
        b = labels.shape[0]
        sums = torch.zeros(2, b, dtype=torch.float64)                  # [nll_sum; count]
        if self.last_stage:
            for mb, (nll_sum, count) in zip(mbs_list, out):
                sums[0, mb["label_rows"]] = torch.from_numpy(np.asarray(nll_sum, dtype=np.float64))
                sums[1, mb["label_rows"]] = torch.from_numpy(np.asarray(count, dtype=np.float64))
        if self.pp > 1:  # on the model's device: NCCL broadcasts CUDA tensors only
            sums = sums.to(self.device)
            dist.broadcast(sums, src=self.pp_last_global, group=self.pp_group)
            sums = sums.cpu()
        return sums[0].numpy(), sums[1].numpy().astype(np.int64)

    def greedy_stepper(self, max_tokens: int):
        """``step(new_ids, offset) -> next id`` for one generation of at most ``max_tokens``
        tokens (prompt included), with Megatron's static KV cache (TP1, PP1)."""
        from megatron.core.inference.contexts import StaticInferenceContext

        from megasyne.checkpoint.sharding import unwrap

        if self.tp != 1 or self.pp != 1 or len(self.chunks) != 1:
            raise ValueError("generation with a megasyne checkpoint runs at TP1 / PP1")
        model, cfg = unwrap(self.chunks[0]), self.config
        param = next(model.parameters())
        ctx = StaticInferenceContext(1, max_tokens)
        # Megatron allocates these on torch.cuda.current_device(); give it the model's device.
        for layer in range(1, cfg.num_layers + 1):
            ctx.key_value_memory_dict[layer] = tuple(
                torch.empty(max_tokens, 1, cfg.num_query_groups, cfg.head_dim,
                            dtype=param.dtype, device=param.device) for _ in range(2))

        def step(ids, offset):
            tokens = torch.tensor([ids], device=param.device)
            positions = torch.arange(offset, offset + len(ids), device=param.device).unsqueeze(0)
            ctx.sequence_len_offset = offset
            with torch.no_grad():
                logits = model(tokens, positions, None, inference_context=ctx,
                               runtime_gather_output=True)
            return int(logits[0, -1, : self.vocab_size].argmax())

        return step

    def close(self) -> None:
        if self._owns_parallel:
            from megasyne.parallel.init import destroy_parallel

            destroy_parallel()


# --------------------------------------------------------------------------- transformers

class HFScorer(TokenScorer):
    """A transformers causal LM; one replica per rank (data parallel only)."""

    def __init__(self, model, *, identity: dict | None = None) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.identity = identity or {"kind": "hf-model"}
        self._owns_group = False
        if dist.is_initialized():
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()

    @classmethod
    def from_dir(cls, hf_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 attention: str | None = None) -> HFScorer:
        """Load an HF directory onto this rank's GPU (or the CPU); under torchrun, joins a
        process group so that ranks take different shares."""
        import transformers

        path = Path(hf_dir)
        kwargs = {"attn_implementation": attention} if attention else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        if torch.cuda.is_available():
            # Under torchrun each rank takes its own GPU: "cuda" alone is the current device,
            # GPU 0 for every rank unless it was set.
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            model.to(torch.device("cuda", local_rank))
        else:
            model.to("cpu")
        config_sha = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
        weights = sorted((p.name, p.stat().st_size) for p in path.iterdir()
                         if p.suffix in (".safetensors", ".bin"))
        owns = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            owns = True
        self = cls(model, identity={"kind": "hf", "path": str(path.resolve()),
                                    "config_sha256": config_sha, "weight_files": weights})
        self._owns_group = owns
        return self

    def nll(self, tokens, labels, mask, rows=None):
        rows = _check_batch(tokens, labels, mask, rows)
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.device)
        # A row's real input ends at the last position any of its label rows counts.
        last = np.zeros(tokens.shape[0], dtype=np.int64)
        np.maximum.at(last, rows, _input_lengths(np.asarray(mask, dtype=bool)))
        keep = torch.arange(t.shape[1], device=self.device).unsqueeze(0) \
            < torch.from_numpy(last).to(self.device).unsqueeze(1)
        with torch.no_grad():
            logits = self.model(input_ids=t, attention_mask=keep.long()).logits  # [u, s, V]
        logp = logits[..., : self.vocab_size].float().log_softmax(-1)
        select = torch.from_numpy(rows).to(self.device)
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(self.device)
        nll = -logp.index_select(0, select).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [b, s]
        return _row_sums(nll, torch.from_numpy(np.asarray(mask, dtype=bool)).to(self.device))

    def greedy_stepper(self, max_tokens: int):
        """``step(new_ids, offset) -> next id`` for one generation, with transformers' KV cache."""
        import inspect

        params = inspect.signature(self.model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 / 4
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        state: dict = {}

        def step(ids, offset):
            with torch.no_grad():
                out = self.model(torch.tensor([ids], device=self.device), use_cache=True,
                                 **{cache_kw: state.get("cache")}, **extra)
            state["cache"] = getattr(out, cache_kw)
            return int(out.logits[0, -1, : self.vocab_size].argmax())

        return step

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _input_lengths(mask: np.ndarray) -> np.ndarray:
    """Length of each label row's real input = 1 + position of its last counted label."""
    any_ = mask.any(axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.where(any_, last + 1, 1).astype(np.int64)


# --------------------------------------------------------------------------- adapters

def continuation_logprobs(scorer: TokenScorer, sequences: list[list[int]],
                          starts: list[int]) -> list[float]:
    """The ``score_fn`` contract of ``megasyne.eval.in_training``: per sequence,
    ``sum(log p(seq[t] | seq[:t]) for t in range(start, len(seq)))``; sequences sharing their
    input (all tokens but the last) are run once."""
    if not sequences:
        return []
    inputs: dict[tuple, int] = {}
    rows = np.array([inputs.setdefault(tuple(seq[:-1]), len(inputs)) for seq in sequences])
    s = max(len(seq) for seq in sequences) - 1
    tokens = np.zeros((len(inputs), s), dtype=np.int64)
    for key, r in inputs.items():
        tokens[r, : len(key)] = key
    labels = np.zeros((len(sequences), s), dtype=np.int64)
    mask = np.zeros((len(sequences), s), dtype=bool)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        if not 1 <= start < len(seq):
            raise ValueError(f"score_fn: start {start} outside [1, {len(seq)}) for sequence {i}")
        n = len(seq) - 1
        labels[i, :n] = seq[1:]
        mask[i, start - 1:n] = True    # label k is token k + 1: the continuation from `start`
    nll, _ = scorer.nll(tokens, labels, mask, rows)
    return [-float(x) for x in nll]


def score_fn(scorer: TokenScorer):
    """``score_fn(sequences, starts)`` bound to ``scorer`` (see :func:`continuation_logprobs`)."""
    from functools import partial

    return partial(continuation_logprobs, scorer)


__all__ = ["HFScorer", "MegatronScorer", "TokenScorer", "continuation_logprobs", "score_fn"]
