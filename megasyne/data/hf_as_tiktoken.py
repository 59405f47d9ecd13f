"""Recognise a Hugging Face ``tokenizer.json`` that is a conversion of tiktoken ranks, so that it
can be encoded by tiktoken: the same ids, 4-5x faster per core.

Why: preprocessing is bound by the tokenizer. Llama-3's ``tokenizer.json`` is what transformers'
``TikTokenConverter`` writes from Meta's ranks file, and tiktoken encodes it at 129,665 English
documents/s per core against the ``tokenizers`` library's 25,724 (71,783 against 15,532 on Chinese
+ English; BENCHMARKS.md).

When the two are the same function. Both split the text with one regular expression, map each
piece to bytes, return a piece found whole in the vocabulary as is (``tokenizers``: the BPE model's
``ignore_merges``; tiktoken: always), and otherwise merge adjacent parts until none can merge:
``tokenizers`` takes the pair with the lowest *merge index*, tiktoken the pair whose concatenation
has the lowest *rank*, leftmost first. We accept a file only when:

- no normalizer; the pre-tokenizer is exactly a ``Split`` on a known pattern (``isolated``, not
  inverted) and a ``ByteLevel`` without prefix space or regex; the model is a BPE with
  ``ignore_merges``, no byte fallback, dropout, unknown token, subword prefix or word suffix;
- every vocabulary string is GPT-2 byte-level text; the 256 single bytes are all there; ids are
  distinct and, with the added tokens, cover 0..n-1 (the ranks are the ids);
- the merges are exactly ``TikTokenConverter``'s derivation from those ranks: every split
  ``(l, r)`` of every token with both halves in the vocabulary, ordered by
  ``(id(l + r), id(l), id(r))``. Then both sides may merge the same pairs, in the same order
  except among pairs that make the same token. That those ties never change the ids is not
  proven here; no case was found (12 random rank tables in any order in the tests, and the
  strings below);
- every added token is special: special-token text is encoded as plain text (the preprocessor's
  rule, see megasyne.data.tokenizers), which ``encode_ordinary`` does too.

For Llama-3's own file the ids were also compared with the ``tokenizers`` library's directly:
no difference on 1,961,920 adversarial strings (every code point below U+30000 alone and in six
contexts, random strings from each Unicode category and from the characters the pattern treats
specially, long runs, random vocabulary tokens: ``benchmarks/check_tiktoken_engine.py``) and none
on the benchmark corpora, 280 MB of English and Chinese (BENCHMARKS.md).
``tests/data_io/test_hf_as_tiktoken.py`` checks the same on a converted tiny tokenizer, and that
each condition above, broken, is refused.

The ``tokenizers`` library raises on a lone surrogate, while tiktoken's public ``encode_ordinary``
replaces it with U+FFFD; megasyne.data.tokenizers calls tiktoken's core, which raises as
``tokenizers`` does, so such a document stays a bad line either way.
"""

from __future__ import annotations

import numpy as np

from megasyne.data.tokenizers import LLAMA3_PATTERN, TokenizerError

# Patterns whose matches agree between the tokenizers library's regex engine (Oniguruma) and
# tiktoken's (fancy-regex), checked as above. Llama-3's, which is also TikTokenConverter's default.
_VERIFIED_PATTERNS = (LLAMA3_PATTERN,)


class NotTiktokenEquivalent(TokenizerError):
    """The tokenizer.json is not a tiktoken conversion; the message says which condition fails
    (the loader then keeps the tokenizers library, or names the file if tiktoken was asked)."""


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by every byte-level BPE tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_pipeline(data: dict) -> str:
    """The Split pattern, after checking normalizer, pre-tokenizer and model options."""
    if data.get("normalizer") is not None:
        raise NotTiktokenEquivalent(f"has a normalizer ({data['normalizer'].get('type')})")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2 or [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        raise NotTiktokenEquivalent("pre_tokenizer is not a Sequence of Split then ByteLevel")
    split, byte_level = steps
    pattern = (split.get("pattern") or {}).get("Regex")
    if pattern not in _VERIFIED_PATTERNS:
        raise NotTiktokenEquivalent("the Split pattern is not one verified to match alike in "
                                    "both regex engines")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        raise NotTiktokenEquivalent("the Split is not 'Isolated' and non-inverted")
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        raise NotTiktokenEquivalent("the ByteLevel pre-tokenizer adds a prefix space or splits")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise NotTiktokenEquivalent(f"model is {model.get('type')!r}, not BPE")
    if not model.get("ignore_merges"):
        raise NotTiktokenEquivalent("BPE model without ignore_merges")
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise NotTiktokenEquivalent(f"BPE model sets {key}")
    if model.get("byte_fallback"):
        raise NotTiktokenEquivalent("BPE model uses byte_fallback")
    return pattern


def _merge_pairs(merges: list) -> list:
    """[(left, right)] of "left right" strings (tokenizers < 0.20) or [left, right] lists."""
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    for index, pair in enumerate(pairs):
        if len(pair) != 2:
            raise NotTiktokenEquivalent(f"merge {index} is not a pair: {merges[index]!r}")
    return pairs


def _check_merges(vocab: dict[str, int], merges: list) -> None:
    """The merges are every split of every token, ordered by (id(l + r), id(l), id(r))."""
    pairs = _merge_pairs(merges)
    get = vocab.get
    # The order is compared with numpy: a comparison per merge in Python, over Llama-3's 280,147
    # merges, took ~0.3 s of serial start-up.
    keys = np.array([(get(left + right, -1), get(left, -1), get(right, -1))
                     for left, right in pairs], dtype=np.int64).reshape(-1, 3)
    outside = np.flatnonzero((keys < 0).any(axis=1))
    if outside.size:
        left, right = pairs[outside[0]]
        raise NotTiktokenEquivalent(f"merge {outside[0]} ({left!r}, {right!r}) names a token "
                                    "outside the vocabulary")
    n = int(keys.max(initial=0)) + 1  # ids < 2**21 in practice; n**3 must fit in int64
    if n ** 3 >= 2 ** 63:
        raise NotTiktokenEquivalent(f"ids up to {n - 1} are too many to check the merge order")
    flat = (keys[:, 0] * n + keys[:, 1]) * n + keys[:, 2]
    unordered = np.flatnonzero(np.diff(flat) <= 0)
    if unordered.size:
        left, right = pairs[unordered[0] + 1]
        raise NotTiktokenEquivalent(f"merge {unordered[0] + 1} ({left!r}, {right!r}) is out of "
                                    "the order (id of the merged token, id of left, id of right)")
    # Strictly increasing keys: no merge twice. Each is a split of a token into two tokens, so
    # equal counts mean the merges are all such splits.
    splits = sum(1 for token in vocab for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab)
    if splits != len(pairs):
        raise NotTiktokenEquivalent(f"{len(pairs)} merges, but the vocabulary has {splits} "
                                    "splits of a token into two tokens")


def tiktoken_ranks(data: dict) -> tuple[dict[bytes, int], dict[str, int], str]:
    """``(ranks, special_tokens, pattern)`` of a parsed tokenizer.json that tiktoken encodes
    identically; raises NotTiktokenEquivalent naming the first condition that fails."""
    pattern = _check_pipeline(data)
    vocab = data["model"].get("vocab") or {}
    if not isinstance(vocab, dict):
        raise NotTiktokenEquivalent("BPE vocab is not a mapping")
    # Characters outside the alphabet map to one that latin-1 cannot encode, so they fail below.
    to_latin1 = {c: "\uffff" for c in range(256)}
    to_latin1.update({ord(c): chr(b) for b, c in byte_level_alphabet().items()})
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        try:  # str.translate: ~3x faster than a per-character lookup on 128k tokens
            ranks[token.translate(to_latin1).encode("latin-1")] = rank
        except UnicodeEncodeError:
            raise NotTiktokenEquivalent(f"vocabulary token {token!r} is not byte-level "
                                        "text") from None
    if len(ranks) != len(vocab):
        raise NotTiktokenEquivalent("two vocabulary tokens are the same bytes")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise NotTiktokenEquivalent("the vocabulary lacks some of the 256 single bytes")
    specials: dict[str, int] = {}
    for added in data.get("added_tokens") or []:
        if not added.get("special"):
            raise NotTiktokenEquivalent(f"added token {added.get('content')!r} is not special")
        if vocab.get(added["content"]) != added["id"]:  # already a vocab token with that id
            specials[added["content"]] = added["id"]
    ids = sorted([*ranks.values(), *specials.values()])
    if ids != list(range(len(ids))):
        raise NotTiktokenEquivalent("token ids are not distinct and dense from 0")
    _check_merges(vocab, data["model"].get("merges") or [])
    return ranks, specials, pattern


__all__ = ["NotTiktokenEquivalent", "byte_level_alphabet", "tiktoken_ranks"]
