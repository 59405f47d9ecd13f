"""Load a tokenizer from a local file, whatever its kind, behind one small interface.

Kinds (detected from the file's *content*, the extension is not trusted: Llama-3's tiktoken ranks
and Llama-2's SentencePiece protobuf are both called ``tokenizer.model``):

- ``hf``: a Hugging Face ``tokenizer.json`` (JSON object), via the ``tokenizers`` package, or via
  ``tiktoken`` when the file is a conversion of tiktoken ranks (Llama-3's is): the same ids, 4-5x
  faster (megasyne.data.hf_as_tiktoken says when; ``engine=`` chooses);
- ``sentencepiece``: a SentencePiece ``.model`` (protobuf), via ``sentencepiece``;
- ``tiktoken``: a BPE ranks file (``<base64 token> <rank>`` per line), via ``tiktoken``. With exactly
  128000 ranks it is Llama-3's: Meta's split pattern and its 256 special tokens
  (``<|begin_of_text|>`` = 128000, ``<|end_of_text|>`` = 128001, vocab 128256). With 50256 ranks it is
  GPT-2's (``<|endoftext|>`` = 50256). Otherwise the Llama-3 pattern with BOS/EOD appended.

A spec may force the kind: ``"hf:PATH"``, ``"sentencepiece:PATH"`` (or ``sp:``), ``"tiktoken:PATH"``;
a directory resolves to its ``tokenizer.json``, else ``tokenizer.model``.

``encode(text)`` never adds special tokens and treats special-token *text* in the input as plain
text (a web page quoting ``<|end_of_text|>`` must not end a document); it raises on a lone
surrogate with every kind (no kind silently rewrites a document); BOS/EOD are added by the
caller (``tools/preprocess_data.py --append-eod``). Nothing is ever downloaded.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field

from megasyne.errors import DataError

KINDS = ("hf", "sentencepiece", "tiktoken")
ENGINES = ("auto", "tokenizers", "tiktoken")  # for a tokenizer.json, see load_tokenizer
_SPEC_PREFIXES = {"hf": "hf", "huggingface": "hf", "sentencepiece": "sentencepiece",
                  "sp": "sentencepiece", "tiktoken": "tiktoken"}

# Meta's llama3/tokenizer.py
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_BASE_TOKENS = 128000
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Meta encodes in slices of at most 400k chars and 25k consecutive (non-)whitespace chars
# (tiktoken's regex is pathological on huge runs); we do the same so ids match Meta's exactly.
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"\s{{{_TIKTOKEN_MAX_RUN + 1}}}|\S{{{_TIKTOKEN_MAX_RUN + 1}}}")

_EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+\d+$")


class TokenizerError(DataError, ValueError):
    """The tokenizer file is missing, of an unknown kind, or lacks what was asked (names the file)."""


@dataclass(kw_only=True)
class Tokenizer:
    """What the data pipeline needs from any tokenizer."""

    kind: str
    """File kind: hf | sentencepiece | tiktoken."""
    engine: str
    """Library that encodes: tokenizers | tiktoken | sentencepiece (a tokenizer.json that is a
    tiktoken conversion is encoded by tiktoken, same ids; megasyne.data.hf_as_tiktoken)."""
    path: str
    vocab_size: int
    eod_id: int | None
    bos_id: int | None
    _encode: object = field(repr=False)
    _decode: object = field(repr=False)
    _encode_batch: object = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)
    engine_note: str | None = None
    """Why a tokenizer.json is not encoded by tiktoken (None when it is, or for other kinds)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOD added, special-token text encoded as plain text."""
        return self._encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in one native call where the library has one."""
        if self._encode_batch is not None:
            return self._encode_batch(texts)
        return [self._encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            self._sha256 = h.hexdigest()
        return self._sha256

    def describe(self) -> dict:
        """Provenance for reports: which file, which kind, which ids."""
        return {"kind": self.kind, "engine": self.engine, "path": os.path.abspath(self.path),
                "sha256": self.sha256,
                "vocab_size": self.vocab_size, "eod_id": self.eod_id, "bos_id": self.bos_id}


def _resolve_path(path: str) -> str:
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise TokenizerError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: tokenizer file not found")
    return path


def detect_kind(path: str) -> str:
    """``hf``, ``tiktoken`` or ``sentencepiece`` from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.lstrip()[:1] == b"{":
        return "hf"
    lines = [ln.strip() for ln in head.split(b"\n")[:-1] if ln.strip()][:20]  # drop the cut line
    if not lines and head.strip():
        lines = [head.strip()]
    if lines and all(_TIKTOKEN_LINE.match(ln) for ln in lines):
        return "tiktoken"
    if head[:1] == b"\x0a":  # protobuf field 1 (pieces), length-delimited: a SentencePiece model
        return "sentencepiece"
    raise TokenizerError(f"{path}: not a tokenizer.json (JSON), a tiktoken ranks file "
                         "('<base64> <rank>' lines) or a SentencePiece model (protobuf)")


def _pick_special(ids: dict[str, int], override, candidates, path, what) -> int | None:
    """An override (id or token text) wins; else the first candidate token present."""
    if override is not None:
        if isinstance(override, int):
            return override
        if override not in ids:
            raise TokenizerError(f"{path}: {what} token {override!r} is not in the vocabulary")
        return ids[override]
    for tok in candidates:
        if tok in ids:
            return ids[tok]
    return None


def _hf_config_token(path: str, key: str) -> str | None:
    cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            tok = json.load(f).get(key)
    except (OSError, json.JSONDecodeError):
        return None
    return tok.get("content") if isinstance(tok, dict) else tok


def _load_hf(path: str, eod, bos, engine: str = "auto") -> Tokenizer:
    """A tokenizer.json, encoded by tiktoken where that gives the same ids (``engine="auto"``;
    megasyne.data.hf_as_tiktoken says when), else by the ``tokenizers`` library."""
    with _gc_paused():
        return _load_hf_file(path, eod, bos, engine)


@contextlib.contextmanager
def _gc_paused():
    """Parsing Llama-3's tokenizer.json and checking its merges allocates ~1M objects in no
    reference cycle (reference counting frees them); the collector's passes over them cost
    ~0.25 s of a ~1 s load (measured back to back), for nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_hf_file(path: str, eod, bos, engine: str) -> Tokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        data = json.loads(raw) if engine != "tokenizers" else None
        if data is not None and not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: cannot load as a Hugging Face tokenizer.json: {exc}") from None
    why_not = None
    if data is not None:
        from megasyne.data.hf_as_tiktoken import NotTiktokenEquivalent, tiktoken_ranks

        try:
            ranks, specials, pattern = tiktoken_ranks(data)
        except NotTiktokenEquivalent as exc:
            why_not = str(exc)
        except (KeyError, TypeError, AttributeError) as exc:  # the tokenizers loader says more
            why_not = f"unexpected layout ({type(exc).__name__}: {exc})"
        else:
            if importlib.util.find_spec("tiktoken") is not None:
                return _hf_by_tiktoken(path, data, ranks, specials, pattern, eod, bos)
            why_not = "the 'tiktoken' package is not installed"
        if engine == "tiktoken":
            raise TokenizerError(f"{path}: cannot be encoded by tiktoken with the same ids: "
                                 f"{why_not}")
    return _hf_by_tokenizers(path, raw, eod, bos, why_not)


def _hf_special_candidates(path: str) -> tuple[tuple, tuple]:
    # Llama-3's <|end_of_text|> first: Instruct configs name <|eot_id|> as eos, which ends a turn,
    # not a pre-training document.
    eod_cands = ("<|end_of_text|>",) + tuple(t for t in [_hf_config_token(path, "eos_token")] if t)
    bos_cands = ("<|begin_of_text|>",) + tuple(t for t in [_hf_config_token(path, "bos_token")] if t)
    return eod_cands + _EOD_CANDIDATES, bos_cands + _BOS_CANDIDATES


def _hf_by_tokenizers(path: str, raw: str, eod, bos, why_not_tiktoken: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_str(raw)
    except Exception as exc:
        raise TokenizerError(f"{path}: cannot load as a Hugging Face tokenizer.json: {exc}") from None
    # Special-token text in a document is plain text (as Meta's tiktoken encode does); without this,
    # a page quoting "<|end_of_text|>" would get a real EOD mid-document.
    tok.encode_special_tokens = True
    vocab = tok.get_vocab(with_added_tokens=True)
    eod_cands, bos_cands = _hf_special_candidates(path)
    # encode_batch_fast (tokenizers >= 0.21) skips offsets; it runs on several threads only where
    # TOKENIZERS_PARALLELISM allows (the preprocessor turns it off: its workers are processes).
    batch_fast = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in batch_fast(texts, add_special_tokens=False)]

    return Tokenizer(
        kind="hf", engine="tokenizers", path=path,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eod_id=_pick_special(vocab, eod, eod_cands, path, "EOD"),
        bos_id=_pick_special(vocab, bos, bos_cands, path, "BOS"),
        _encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        _decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
        _encode_batch=encode_batch, engine_note=why_not_tiktoken)


def _hf_by_tiktoken(path: str, data: dict, ranks, specials, pattern, eod, bos) -> Tokenizer:
    import tiktoken

    enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=specials)
    encode = _strict_encode_ordinary(enc)
    ids = {**data["model"]["vocab"], **specials}
    eod_cands, bos_cands = _hf_special_candidates(path)
    return Tokenizer(
        kind="hf", engine="tiktoken", path=path, vocab_size=len(ranks) + len(specials),
        eod_id=_pick_special(ids, eod, eod_cands, path, "EOD"),
        bos_id=_pick_special(ids, bos, bos_cands, path, "BOS"),
        _encode=encode, _decode=lambda ids_: enc.decode(ids_))


def _strict_encode_ordinary(enc):
    """tiktoken's ``encode_ordinary``, raising on a lone surrogate as the tokenizers library and
    sentencepiece do: the public method silently replaces it with U+FFFD, which would change a
    document's text; raising makes it a bad line, named, whichever tokenizer file is used."""
    core = getattr(enc, "_core_bpe", None)
    if core is not None and hasattr(core, "encode_ordinary"):
        return core.encode_ordinary  # the Rust core: str -> UTF-8 fails on a lone surrogate

    def encode(text: str) -> list[int]:
        text.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
        return enc.encode_ordinary(text)
    return encode


def _load_sentencepiece(path: str, eod, bos) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as exc:
        raise TokenizerError(f"{path}: cannot load as a SentencePiece model: {exc}") from None

    def special(override, default_id, what):
        if override is None:
            return default_id if default_id >= 0 else None
        if isinstance(override, int):
            return override
        pid = sp.piece_to_id(override)
        if pid == sp.unk_id() and override != sp.id_to_piece(sp.unk_id()):
            raise TokenizerError(f"{path}: {what} piece {override!r} is not in the vocabulary")
        return pid

    return Tokenizer(
        kind="sentencepiece", engine="sentencepiece", path=path, vocab_size=sp.vocab_size(),
        eod_id=special(eod, sp.eos_id(), "EOD"), bos_id=special(bos, sp.bos_id(), "BOS"),
        _encode=lambda text: sp.encode(text), _decode=lambda ids: sp.decode(ids))


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse ``<base64 token> <rank>`` lines (tiktoken's own loader may try to cache or fetch)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{lineno}: not a '<base64 token> <rank>' line: "
                                     f"{line[:60]!r}") from None
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: duplicate ranks in a tiktoken ranks file")
    return ranks


def _split_long_runs(s: str):
    """Meta's _split_whitespaces_or_nonwhitespaces, skipped (same result) when no run is too long."""
    if not _LONG_RUN.search(s):
        yield s
        return
    run_len, run_is_space, start = 0, (s[0].isspace() if s else False), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > _TIKTOKEN_MAX_RUN:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


def _load_tiktoken(path: str, eod, bos) -> Tokenizer:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError(f"{path}: is a tiktoken BPE ranks file, but the 'tiktoken' package is "
                             "not installed (pip install tiktoken)") from None
    ranks = read_tiktoken_ranks(path)
    n = len(ranks)
    if n == LLAMA3_NUM_BASE_TOKENS:
        pattern = LLAMA3_PATTERN
        specials = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        eod_default, bos_default = "<|end_of_text|>", "<|begin_of_text|>"
    elif n == 50256:
        pattern, specials = GPT2_PATTERN, {"<|endoftext|>": 50256}
        eod_default = bos_default = "<|endoftext|>"
    else:
        pattern = LLAMA3_PATTERN
        specials = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1}
        eod_default, bos_default = "<|end_of_text|>", "<|begin_of_text|>"
    enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=specials)

    ordinary = _strict_encode_ordinary(enc)

    def encode(text: str) -> list[int]:
        if len(text) <= _TIKTOKEN_MAX_CHARS and not _LONG_RUN.search(text):
            return ordinary(text)
        out: list[int] = []
        for i in range(0, len(text), _TIKTOKEN_MAX_CHARS):
            for piece in _split_long_runs(text[i:i + _TIKTOKEN_MAX_CHARS]):
                out.extend(ordinary(piece))
        return out

    ids = {**{t.decode("latin-1"): r for t, r in ranks.items()}, **specials}
    return Tokenizer(
        kind="tiktoken", engine="tiktoken", path=path, vocab_size=max(max(ranks.values(), default=-1),
                                                   max(specials.values())) + 1,
        eod_id=_pick_special(ids, eod, (eod_default,), path, "EOD"),
        bos_id=_pick_special(ids, bos, (bos_default,), path, "BOS"),
        _encode=encode, _decode=lambda ids_: enc.decode(ids_))


# tokenizer.json goes through _load_hf, which alone takes an engine
_LOADERS = {"sentencepiece": _load_sentencepiece, "tiktoken": _load_tiktoken}


def parse_spec(path_or_spec: str | os.PathLike, kind: str | None = None) -> tuple[str, str | None]:
    """``"tiktoken:/x/tokenizer.model"`` -> ("/x/tokenizer.model", "tiktoken")."""
    spec = os.fspath(path_or_spec)
    head, sep, rest = spec.partition(":")
    if sep and head.lower() in _SPEC_PREFIXES and not os.path.exists(spec):
        forced = _SPEC_PREFIXES[head.lower()]
        if kind is not None and kind != forced:
            raise TokenizerError(f"{spec}: spec says {forced!r} but kind={kind!r} was asked")
        return rest, forced
    return spec, kind


def load_tokenizer(path_or_spec: str | os.PathLike, *, kind: str | None = None,
                   eod: int | str | None = None, bos: int | str | None = None,
                   engine: str = "auto") -> Tokenizer:
    """Load a local tokenizer file (see the module docstring for kinds and specs).

    ``kind`` forces the kind (the content must still agree); ``eod``/``bos`` override the special
    ids (an id, or the token's text). ``engine`` (tokenizer.json only): ``auto`` encodes with
    tiktoken where the ids are the same, ``tokenizers`` always with the Hugging Face library,
    ``tiktoken`` refuses a file tiktoken cannot encode identically.
    """
    path, forced = parse_spec(path_or_spec, kind)
    if forced is not None and forced not in KINDS:
        raise TokenizerError(f"{path}: unknown tokenizer kind {forced!r} (known: {KINDS})")
    if engine not in ENGINES:
        raise TokenizerError(f"{path}: unknown tokenizer engine {engine!r} (known: {ENGINES})")
    path = _resolve_path(path)
    try:
        detected = detect_kind(path)
    except TokenizerError:
        if forced is None:  # a forced kind's own loader gives the more precise error
            raise
        detected = forced
    if forced is not None and detected != forced:
        raise TokenizerError(f"{path}: asked for a {forced} tokenizer, but the file content looks "
                             f"like {detected}")
    if detected == "hf":
        return _load_hf(path, eod, bos, engine)
    if engine != "auto":
        raise TokenizerError(f"{path}: engine {engine!r} applies to a tokenizer.json; this file is "
                             f"{detected}, which has one engine")
    return _LOADERS[detected](path, eod, bos)


# Megatron's --tokenizer-type names -> our kinds (others are refused with a clear message).
MEGATRON_TOKENIZER_TYPES = {
    "HuggingFaceTokenizer": "hf",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
    "TikTokenizer": "tiktoken",
}


__all__ = ["ENGINES", "KINDS", "LLAMA3_PATTERN", "LLAMA3_SPECIAL_TOKENS", "MEGATRON_TOKENIZER_TYPES",
           "Tokenizer", "TokenizerError", "detect_kind", "load_tokenizer", "parse_spec",
           "read_tiktoken_ranks"]


def train_byte_level_bpe(texts, vocab_size: int, out_path: str | os.PathLike) -> str:
    """Train a byte-level BPE (Llama-3's tokenizer family) with ``<|begin_of_text|>`` and
    ``<|end_of_text|>`` as specials, and write its ``tokenizer.json`` atomically.

    For toy corpora (the bundled tiny job, tests); real runs use the model's own tokenizer.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    from megasyne.atomic import atomic_write_text

    os.makedirs(os.path.dirname(os.fspath(out_path)) or ".", exist_ok=True)
    return os.fspath(atomic_write_text(out_path, tok.to_str()))
