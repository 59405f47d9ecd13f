"""Models behind the evaluation: text in, log-likelihoods and greedy text out, for lm-eval.

A :class:`Scorer` turns token ids into the two things benchmarks need:

- ``loglikelihood_tokens([(context_ids, continuation_ids), ...])`` -> summed log-probabilities
  of each continuation given its context (multiple choice);
- ``generate(prompt_ids, max_new_tokens, stop)`` -> greedy text, cut at the first stop string
  (math, code).

Implementations:

- :class:`ModelScorer`: a model behind the forward-only scorer of ``megasyne.scorers`` (the
  one validation, the in-training probe and score_ppl use): a transformers causal LM
  (:func:`hf_model_scorer`, also for a megasyne checkpoint exported to HF) or a megasyne
  checkpoint in the Megatron-Core training model (:func:`megasyne_model_scorer`). Requests
  sharing their input run once: the four answers of a question behind one context cost one
  forward pass. Generation uses the model's KV cache (Megatron's static cache at TP1).
- :class:`ScoreFnScorer`: only a ``score_fn`` (the in-training contract, see
  ``megasyne.eval.in_training``): multiple choice only.

:func:`scorer_lm` adapts a Scorer to lm-eval's ``LM`` interface; text -> tokens exactly as
lm-eval's HFLM does (trailing spaces of a context move to the continuation; the continuation
is what encoding the whole adds after the encoded context).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

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


class ModelScorer(Scorer):
    """A model behind ``megasyne.scorers.TokenScorer``: scoring and greedy generation."""

    def __init__(self, model, tokenizer, **kw):
        self.model = model
        """The ``megasyne.scorers`` scorer (``HFScorer`` or ``MegatronScorer``)."""
        super().__init__(tokenizer, **kw)

    def loglikelihood_tokens(self, requests):
        from tqdm import tqdm

        from megasyne.scorers import continuation_logprobs

        groups: dict[tuple, list[tuple[int, list[int], int]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            seq, start = self._window(ctx, cont)
            groups.setdefault(tuple(seq[:-1]), []).append((i, seq, start))
        keys = sorted(groups, key=len, reverse=True)  # similar lengths batched together
        out = [0.0] * len(requests)
        with tqdm(total=len(keys), desc="loglikelihood", disable=not self.progress,
                  dynamic_ncols=True) as bar:
            for b in range(0, len(keys), self.batch_size):  # batch_size distinct inputs
                batch = [r for key in keys[b: b + self.batch_size] for r in groups[key]]
                scores = continuation_logprobs(self.model, [seq for _, seq, _ in batch],
                                               [start for _, _, start in batch])
                for (i, _, _), score in zip(batch, scores):
                    out[i] = score
                bar.update(min(self.batch_size, len(keys) - b))
        return out

    def generate(self, prompt, *, max_new_tokens, stop):
        prompt = prompt[-max(1, self.max_length - max_new_tokens):]
        step = self.model.greedy_stepper(len(prompt) + max_new_tokens + 1)
        return self._greedy(prompt, max_new_tokens, stop, step)


def hf_model_scorer(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "eager", max_length: int | None = None,
                    **kw) -> ModelScorer:
    """A transformers causal LM directory (its own tokenizer)."""
    import transformers

    from megasyne.scorers import HFScorer

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = HFScorer.from_dir(model_dir, dtype=dtype, attention=attn_implementation)
    return ModelScorer(model, tokenizer,
                       max_length=max_length or model.model.config.max_position_embeddings, **kw)


def megasyne_model_scorer(checkpoint: str | os.PathLike, tokenizer, *,
                          dtype: torch.dtype = torch.float32, max_length: int | None = None,
                          **kw) -> ModelScorer:
    """A megasyne checkpoint (any saved layout) in the Megatron-Core model, one process."""
    from megasyne.scorers import MegatronScorer

    model = MegatronScorer.from_checkpoint(checkpoint, dtype=dtype)
    return ModelScorer(model, tokenizer,
                       max_length=max_length or model.config.max_position_embeddings, **kw)


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
