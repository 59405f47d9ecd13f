"""Models behind the evaluation: one small interface, three ways to run it.

A :class:`Scorer` turns token ids into the two things benchmarks need:

- ``loglikelihood_tokens([(context_ids, continuation_ids), ...])`` -> summed log-probabilities
  of each continuation given its context (multiple choice);
- ``generate(prompt_ids, max_new_tokens, stop)`` -> greedy text, cut at the first stop string
  (math, code).

Implementations:

- :class:`HFScorer`: a transformers causal LM (an HF directory, or a megasyne checkpoint
  exported to one). Generation uses the KV cache.
- :class:`MegatronScorer`: a megasyne checkpoint loaded directly into the Megatron-Core model
  used for training (one process, TP1, any saved layout). Generation uses Megatron's static
  KV cache.
- :class:`ScoreFnScorer`: only a ``score_fn`` (the in-training contract, see
  ``megasyne.eval.in_training``): multiple choice only.

``HFScorer`` and ``MegatronScorer`` run one forward per distinct input: the four answers of
a question share their context, so a single-token answer costs one forward, not four.

:class:`ScorerLM` adapts a Scorer to lm-eval's ``LM`` interface; text -> tokens exactly as
lm-eval's HFLM does (trailing spaces of a context move to the continuation; the continuation
is what encoding the whole adds after the encoded context).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ScoreFn = Callable[[list[list[int]], list[int]], Sequence[float]]


class Scorer(ABC):
    """Token-level scoring and greedy generation for one model."""

    def __init__(self, tokenizer, *, max_length: int, batch_size: int = 8,
                 add_bos: bool | None = None, progress: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress
        bos = tokenizer.bos_token_id
        if add_bos is None:  # as the tokenizer does by default (Llama-3: yes; SmolLM2: no)
            add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.add_bos = bool(add_bos and bos is not None)

    # ---------------------------------------------------------------- text <-> tokens
    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.bos_token_id, *ids] if self.add_bos else list(ids)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval HFLM's ``_encode_pair``."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def describe(self) -> dict:
        return {"backend": type(self).__name__, "max_length": self.max_length,
                "add_bos": self.add_bos, "batch_size": self.batch_size}

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """(sequence, index of the first continuation token), left-truncated to max_length + 1."""
        if not continuation:
            raise ValueError("empty continuation: nothing to score")
        seq = (context + continuation)[-(self.max_length + 1):]
        return seq, len(seq) - len(continuation)

    # ---------------------------------------------------------------- interface
    @abstractmethod
    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log p(continuation | context) per request."""

    def generate(self, prompt: list[int], *, max_new_tokens: int, stop: Sequence[str]) -> str:
        raise NotImplementedError(f"{type(self).__name__} scores only; generative tasks need an "
                                  f"HF or megasyne model")

    def _greedy(self, prompt: list[int], max_new_tokens: int, stop: Sequence[str],
                step: Callable[[list[int], int], int]) -> str:
        """Greedy loop: ``step(new_ids, offset)`` feeds tokens and returns the next id."""
        prompt = prompt[-max(1, self.max_length - max_new_tokens):]
        eos = {self.tokenizer.eos_token_id} - {None}
        out: list[int] = []
        nxt = step(prompt, 0)
        offset = len(prompt)
        while True:
            if nxt in eos:
                break
            out.append(nxt)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if len(out) >= max_new_tokens or any(s in text for s in stop):
                break
            nxt = step([nxt], offset)
            offset += 1
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
        return text[:cut]


class LogitsScorer(Scorer):
    """Scoring from full logits: one forward per distinct input, shared by its continuations."""

    vocab_size: int

    @abstractmethod
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] right-padded token ids -> [b, s, >= vocab_size] logits (causal)."""

    def loglikelihood_tokens(self, requests):
        from tqdm import tqdm

        rows: dict[tuple, list[tuple[int, int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            seq, start = self._window(ctx, cont)
            rows.setdefault(tuple(seq[:-1]), []).append((i, start, seq[start:]))
        keys = sorted(rows, key=len, reverse=True)
        out = [0.0] * len(requests)
        with tqdm(total=len(keys), desc="loglikelihood", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            for b in range(0, len(keys), self.batch_size):
                batch = keys[b: b + self.batch_size]
                tokens = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
                for j, key in enumerate(batch):
                    tokens[j, : len(key)] = torch.tensor(key)
                with torch.no_grad():
                    logp = self.logits(tokens)[..., : self.vocab_size].float().log_softmax(-1)
                for j, key in enumerate(batch):
                    for i, start, target in rows[key]:
                        pos = torch.arange(start - 1, start - 1 + len(target))
                        out[i] = logp[j, pos, torch.tensor(target)].sum().item()
                bar.update(len(batch))
        return out


class HFScorer(LogitsScorer):
    """A transformers causal LM."""

    def __init__(self, model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "eager", max_length: int | None = None, **kw):
        import transformers

        self.model_dir = Path(model_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype, attn_implementation=attn_implementation).eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.vocab_size = self.model.config.vocab_size
        super().__init__(tokenizer, max_length=max_length or self.model.config.max_position_embeddings,
                         **kw)

    def logits(self, tokens):
        device = next(self.model.parameters()).device
        return self.model(tokens.to(device), use_cache=False).logits

    def generate(self, prompt, *, max_new_tokens, stop):
        import inspect

        device = next(self.model.parameters()).device
        params = inspect.signature(self.model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 / 4
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        state = {}

        def step(ids, offset):
            with torch.no_grad():
                out = self.model(torch.tensor([ids], device=device), use_cache=True,
                                 **{cache_kw: state.get("cache")}, **extra)
            state["cache"] = getattr(out, cache_kw)
            return int(out.logits[0, -1, : self.vocab_size].argmax())

        return self._greedy(prompt, max_new_tokens, stop, step)


class ScoreFnScorer(Scorer):
    """Only a score_fn (see megasyne.eval.in_training for the contract)."""

    def __init__(self, score_fn: ScoreFn, tokenizer, *, max_length: int, **kw):
        self.score_fn = score_fn
        super().__init__(tokenizer, max_length=max_length, **kw)

    def loglikelihood_tokens(self, requests):
        from tqdm import tqdm

        windows = [self._window(c, t) for c, t in requests]
        out: list[float] = []
        for b in tqdm(range(0, len(windows), self.batch_size), desc="score_fn",
                      disable=not self.progress, dynamic_ncols=True):
            chunk = windows[b: b + self.batch_size]
            scores = self.score_fn([list(s) for s, _ in chunk], [st for _, st in chunk])
            scores = [float(x) for x in (scores.tolist() if torch.is_tensor(scores) else scores)]
            if len(scores) != len(chunk):
                raise ValueError(f"score_fn returned {len(scores)} scores for {len(chunk)} sequences")
            out.extend(scores)
        return out


def hf_score_fn(model) -> ScoreFn:
    """A score_fn from a transformers causal LM (reference implementation of the contract)."""
    def score_fn(sequences, starts):
        device = next(model.parameters()).device
        width = max(map(len, sequences))
        tokens = torch.zeros(len(sequences), width, dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = torch.tensor(s)
        with torch.no_grad():
            logp = model(tokens.to(device)).logits[..., : model.config.vocab_size].float().log_softmax(-1)
        return [logp[i, st - 1: len(s) - 1].gather(-1, tokens[i, st: len(s), None].to(device)).sum().item()
                for i, (s, st) in enumerate(zip(sequences, starts))]
    return score_fn


def megatron_score_fn(model, vocab_size: int) -> ScoreFn:
    """A score_fn from one Megatron-Core GPTModel chunk holding the whole pipeline (PP=1).

    Any TP: every rank of the tensor-parallel group calls it with the same arguments; the
    log-probabilities come from Megatron's vocab-parallel cross-entropy (padded vocabulary
    columns masked out), the same code as the training loss. Inputs are right-padded to a
    multiple of TP (sequence parallelism splits the sequence). PP > 1 needs the pipeline
    schedule's forward-only step and is not handled here.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("megatron_score_fn needs the whole model on this rank (PP=1)")

    def score_fn(sequences, starts):
        device = next(model.parameters()).device
        tp = parallel_state.get_tensor_model_parallel_world_size()
        inputs = -(-(max(map(len, sequences)) - 1) // tp) * tp  # sequence parallel: a multiple of TP
        tokens = torch.zeros(len(sequences), inputs + 1, dtype=torch.long)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)] = torch.tensor(s)
        tokens = tokens.to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                inp = tokens[:, :-1]
                positions = torch.arange(inp.shape[1], device=device).unsqueeze(0)
                logits = model(inp, positions, None).float()  # [b, s, V / tp]
                shard = logits.shape[-1]
                first = parallel_state.get_tensor_model_parallel_rank() * shard
                if first + shard > vocab_size:
                    logits[..., max(0, vocab_size - first):] = float("-inf")
                loss = tensor_parallel.vocab_parallel_cross_entropy(
                    logits.transpose(0, 1).contiguous(), tokens[:, 1:].t().contiguous())
        finally:
            model.train(was_training)
        logp = -loss.t()  # [b, s]
        return [logp[i, st - 1: len(s) - 1].sum().item() for i, (s, st) in enumerate(zip(sequences, starts))]
    return score_fn


class MegatronScorer(LogitsScorer):
    """A megasyne checkpoint in the Megatron-Core model, one process, TP1 (needs init_parallel)."""

    def __init__(self, checkpoint: str | os.PathLike, tokenizer, *,
                 dtype: torch.dtype = torch.float32, **kw):
        from megasyne.checkpoint.dist import load_checkpoint, read_manifest
        from megasyne.model.builder import ModelRuntime, build_model
        from megasyne.model.config import LlamaConfig
        from megasyne.parallel.dims import ParallelDims

        self.cfg = LlamaConfig.from_dict(read_manifest(checkpoint)["model"])
        self.model = build_model(self.cfg, ParallelDims(), ModelRuntime(dtype=dtype, init_weights=False))[0]
        load_checkpoint(checkpoint, [self.model], model_config=self.cfg.to_dict())
        self.model.eval()
        self.vocab_size = self.cfg.vocab_size
        kw.setdefault("max_length", self.cfg.max_position_embeddings)
        super().__init__(tokenizer, **kw)

    def logits(self, tokens):
        device = next(self.model.parameters()).device
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
        return self.model(tokens.to(device), positions, None)

    def generate(self, prompt, *, max_new_tokens, stop):
        from megatron.core.inference.contexts import StaticInferenceContext

        param = next(self.model.parameters())
        total = min(len(prompt), self.max_length - max_new_tokens) + max_new_tokens + 1
        ctx = StaticInferenceContext(1, total)
        # Megatron allocates these on torch.cuda.current_device(); give it the model's device.
        for layer in range(1, self.cfg.num_layers + 1):
            ctx.key_value_memory_dict[layer] = tuple(
                torch.empty(total, 1, self.cfg.num_query_groups, self.cfg.head_dim,
                            dtype=param.dtype, device=param.device) for _ in range(2))

        def step(ids, offset):
            tokens = torch.tensor([ids], device=param.device)
            positions = torch.arange(offset, offset + len(ids), device=param.device).unsqueeze(0)
            ctx.sequence_len_offset = offset
            with torch.no_grad():
                logits = self.model(tokens, positions, None, inference_context=ctx,
                                    runtime_gather_output=True)
            return int(logits[0, -1, : self.vocab_size].argmax())

        return self._greedy(prompt, max_new_tokens, stop, step)


# --------------------------------------------------------------------------- lm-eval adapter

def scorer_lm(scorer: Scorer):
    """An ``lm_eval.api.model.LM`` running on ``scorer``."""
    from lm_eval.api.model import LM
    from tqdm import tqdm

    class ScorerLM(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [scorer.encode_pair(*r.args) for r in requests]
            return [(ll, False) for ll in scorer.loglikelihood_tokens(pairs)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("megasyne.eval does not run perplexity tasks")

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in tqdm(requests, desc="generate", disable=not scorer.progress, dynamic_ncols=True):
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(scorer.generate(scorer.encode(context),
                                           max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                           stop=until))
            return out

    return ScorerLM()
