"""Generation backends for synthetic QA: an OpenAI-compatible chat endpoint and local transformers.

Both offer ``stream(requests, window)``, one :class:`Response` per :class:`Request` in the order
they finish, and ``generate(requests)``, the same in request order.

- :class:`OpenAIChatBackend`: ``POST {base_url}/chat/completions`` (vLLM, SGLang, llama.cpp
  server, TGI, OpenAI) from a thread pool that keeps ``concurrency`` requests in flight all the
  time (a new one starts as soon as one ends, never more than ``window`` past the oldest
  unfinished one, so a caller that handles responses in request order buffers at most
  ``window``), a per-request ``timeout``, and up to ``max_retries`` retries with exponential
  backoff (+-25% jitter) on connection errors, timeouts, HTTP 408/409/425/429 and 5xx; a
  ``Retry-After`` header (seconds or an HTTP date) replaces the backoff. Other 4xx fail at once.
  A request that still fails comes back with ``error`` set (the pipeline records it and retries
  it on the next run); nothing raises. Standard library only.
- :class:`TransformersBackend`: a local causal LM (chat template, left-padded batches,
  ``response_prefix`` appended after the generation prompt), greedy or sampled with a fixed seed.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from megasyne.syne.synth.filters import SynthError

RETRY_STATUS = {408, 409, 425, 429}


@dataclass(kw_only=True)
class Request:
    """One chat completion to make."""

    key: str
    """Stable id of the work item (also the sampling seed's source)."""
    messages: list[dict]
    response_prefix: str = ""


@dataclass(kw_only=True)
class Response:
    """What came back: ``text`` (the prefix included) or ``error``."""

    key: str
    text: str = ""
    error: str | None = None
    truncated: bool = False
    """The model stopped at the token limit (the answer may be cut)."""
    attempts: int = 1
    seconds: float = 0.0


def _seed(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode()) & 0x7FFFFFFF


MAX_DELAY = 60.0
"""Longest wait before a retry (seconds), a server's Retry-After included."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (RFC 9110: delay seconds or an HTTP date) as seconds from now, or
    None when absent or unreadable (the backoff applies then)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(kw_only=True)
class OpenAIChatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint."""

    base_url: str
    """E.g. http://127.0.0.1:8000/v1 (the path up to /chat/completions)."""
    model: str
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 4
    backoff: float = 1.0
    """First retry delay in seconds (doubles each retry, +-25% jitter, capped at 60 s)."""
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024
    send_seed: bool = True
    """Send a per-item ``seed`` (vLLM/SGLang honour it: reruns reproduce answers)."""
    extra_body: dict = field(default_factory=dict)

    name = "openai"

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise SynthError(f"need concurrency (--concurrency) >= 1, max_retries (--retries) >= 0 "
                             f"and timeout (--timeout) > 0; got {self.concurrency}, "
                             f"{self.max_retries}, {self.timeout}")
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self._rng = random.Random(0)
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.model

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry ``attempt + 1``: the server's Retry-After, else
        ``backoff * 2**attempt`` with +-25% jitter (so clients that failed together do not
        retry together), at most MAX_DELAY."""
        asked = retry_after_seconds(retry_after)
        if asked is not None:
            return min(asked, MAX_DELAY)
        with self._lock:
            jitter = self._rng.uniform(0.75, 1.25)
        return min(self.backoff * (2 ** attempt) * jitter, MAX_DELAY)

    def one(self, r: Request) -> Response:
        body = {"model": self.model, "messages": r.messages, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens, **self.extra_body}
        if self.send_seed:
            body["seed"] = _seed(r.key)
        t0 = time.time()
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                out = self._post(body)
                choice = out["choices"][0]
                text = choice["message"]["content"] or ""
                return Response(key=r.key, text=text, attempts=attempt + 1,
                                truncated=choice.get("finish_reason") == "length",
                                seconds=time.time() - t0)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {exc.code} from {self.url}: {detail}"
                if exc.code not in RETRY_STATUS and exc.code < 500:
                    break
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError,
                    http.client.HTTPException) as exc:  # HTTPException: a cut-off answer
                last = f"{type(exc).__name__} from {self.url}: {getattr(exc, 'reason', exc)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
                last = f"malformed response from {self.url}: {type(exc).__name__} {exc}"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        return Response(key=r.key, error=last, attempts=attempt + 1, seconds=time.time() - t0)

    def stream(self, requests: Iterable[Request], window: int | None = None) -> Iterator[Response]:
        """Responses as they finish, ``concurrency`` requests in flight (see the module
        docstring); ``window`` (default 4 x concurrency) bounds how far past the oldest
        unfinished request new ones start."""
        window = max(window or 4 * self.concurrency, self.concurrency)
        todo = iter(requests)
        running: dict = {}  # future -> request index
        next_index, exhausted = 0, False
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="synth-http")
        try:
            while True:
                while (not exhausted and len(running) < self.concurrency
                       and (not running or next_index < min(running.values()) + window)):
                    req = next(todo, None)
                    if req is None:
                        exhausted = True
                        break
                    running[pool.submit(self.one, req)] = next_index
                    next_index += 1
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=running.__getitem__):
                    del running[fut]
                    yield fut.result()
        finally:  # the caller stopped early: queued requests are dropped, none is waited for
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, requests: list[Request]) -> list[Response]:
        by_key = {r.key: r for r in self.stream(requests)}
        return [by_key[r.key] for r in requests]


class TransformersBackend:
    """A local ``transformers`` causal LM with a chat template (e.g. SmolLM2-135M-Instruct)."""

    name = "transformers"

    def __init__(self, model_dir: str, *, max_new_tokens: int = 512, temperature: float = 0.7,
                 top_p: float = 0.95, batch_size: int = 4, dtype: str = "float32") -> None:
        import torch
        import transformers

        self.model_dir = str(model_dir)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, dtype)).eval()
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size

    @property
    def model_name(self) -> str:
        import os

        return os.path.basename(os.path.normpath(self.model_dir))

    def _prompt(self, r: Request) -> str:
        text = self.tokenizer.apply_chat_template(r.messages, tokenize=False,
                                                  add_generation_prompt=True)
        return text + r.response_prefix

    def stream(self, requests: Iterable[Request], window: int | None = None) -> Iterator[Response]:
        """Batch after batch, in request order (``window`` is not needed: nothing overtakes)."""
        batch: list[Request] = []
        for r in requests:
            batch.append(r)
            if len(batch) == self.batch_size:
                yield from self.generate(batch)
                batch = []
        if batch:
            yield from self.generate(batch)

    def generate(self, requests: list[Request]) -> list[Response]:
        import torch

        out = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i:i + self.batch_size]
            t0 = time.time()
            enc = self.tokenizer([self._prompt(r) for r in chunk], return_tensors="pt",
                                 padding=True, add_special_tokens=False)
            sample = self.temperature > 0
            torch.manual_seed(_seed(chunk[0].key))  # deterministic for a given batch
            with torch.no_grad():
                gen = self.model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                    temperature=self.temperature if sample else None,
                    top_p=self.top_p if sample else None, top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]                       # [b, new]
            eos = self.tokenizer.eos_token_id
            for r, row in zip(chunk, new):
                ids = row.tolist()
                stopped = eos in ids or self.tokenizer.pad_token_id in ids
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Response(key=r.key, text=r.response_prefix + text,
                                    truncated=not stopped and len(ids) >= self.max_new_tokens,
                                    seconds=(time.time() - t0) / len(chunk)))
        return out


__all__ = ["MAX_DELAY", "OpenAIChatBackend", "Request", "Response", "TransformersBackend",
           "retry_after_seconds"]
