"""A tokenizer.json converted from tiktoken ranks is encoded by tiktoken with the ``tokenizers``
library's ids; a file that breaks any condition of megasyne.data.hf_as_tiktoken keeps the library.

The converted files are written by transformers' own ``TikTokenConverter`` (how Llama-3's
tokenizer.json was made); the reference ids come from the ``tokenizers`` library directly.
"""

import collections
import itertools
import json
import random

import pytest
import regex
from tokenizers import Tokenizer as HFTokenizer

from megasyne.data.hf_as_tiktoken import byte_level_alphabet
from megasyne.data.preprocess import PreprocessConfig, run_preprocess
from megasyne.data.tokenizers import LLAMA3_PATTERN, TokenizerError, load_tokenizer

from .conftest import train_byte_bpe, write_ranks

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
# Text where the regex engines or the merge orders could part: runs that need many merges,
# whitespace of every kind, case-folded contractions, digits of other scripts, CJK, emoji,
# special-token text, CRLF.
HARD_TEXTS = [
    "", " ", "a", "====== ==== ===", "aaaaaaaaaaaaaaaaaaaaaaaaa", "the  the   the    the",
    " \t\n\r\n \u00a0\u2028\u3000x\u0085y\u200b", "IT'S he'LL we'Ve 'ſ 'K", "٣٤٥ ²½ Ⅻ 12345678",
    "你好，世界！ 数学 物理", "🦙🦙 e\u0301 ﷺ", "end <|end_of_text|> here<|begin_of_text|>",
    "line\r\nline\n\n\n  \n", "x" * 3000 + " " * 2000 + "y", "naïve café héllo",
]


def convert(tmp_path, ranks: dict[bytes, int], name: str) -> str:
    """Write ``ranks`` as a tiktoken file, then as transformers' conversion of it."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_path = tmp_path / f"{name}.tiktoken"  # a new name each time: tiktoken caches by path
    write_ranks(ranks_path, ranks)
    tok = TikTokenConverter(vocab_file=str(ranks_path), pattern=LLAMA3_PATTERN,
                            extra_special_tokens=SPECIALS).converted()
    out = tmp_path / name / "tokenizer.json"
    out.parent.mkdir()
    tok.save(str(out))
    return str(out)


def library(path: str) -> HFTokenizer:
    ref = HFTokenizer.from_file(path)
    ref.encode_special_tokens = True  # megasyne's rule: special-token text is plain text
    return ref


@pytest.fixture(scope="module")
def converted(tmp_path_factory, corpus) -> str:
    texts = corpus[:150] + HARD_TEXTS * 3
    ranks = train_byte_bpe(texts, merges=250, pattern=LLAMA3_PATTERN)
    return convert(tmp_path_factory.mktemp("conv"), ranks, "trained")


def test_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_level_alphabet() == {b: c for b, c in bytes_to_unicode().items()}


def test_converted_file_encodes_by_tiktoken_with_the_librarys_ids(converted, corpus):
    tok, ref = load_tokenizer(converted), library(converted)
    hf = load_tokenizer(converted, engine="tokenizers")
    assert (tok.kind, tok.engine, tok.engine_note) == ("hf", "tiktoken", None)
    assert hf.engine == "tokenizers" and tok.describe()["engine"] == "tiktoken"
    assert (tok.vocab_size, tok.eod_id, tok.bos_id) == (hf.vocab_size, hf.eod_id, hf.bos_id)
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    texts = corpus + HARD_TEXTS
    want = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert [tok.encode(t) for t in texts] == want
    assert tok.encode_batch(texts) == want
    assert len(tok.encode(corpus[0])) < len(corpus[0].encode())  # the merges are used
    assert tok.eod_id not in tok.encode("a <|end_of_text|> b")
    for ids in want[:50] + [[tok.bos_id, *want[3], tok.eod_id]]:
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_random_rank_tables_agree_with_the_library(tmp_path):
    """Ranks in any order (singles among the merged tokens, longer tokens ranked before their
    parts, as in Llama-3's "    " before "   "), alphabets that force long merge chains."""
    rng = random.Random(0)
    checked = 0
    for table in range(12):
        alphabet = ["ab", "a", "ab ", "=-", "a\n"][table % 5]
        tokens = {"".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))).encode()
                  for _ in range(rng.randint(10, 60))}
        order = [bytes([b]) for b in range(256)] + sorted(tokens - {bytes([b]) for b in range(256)})
        ids = list(range(len(order)))
        rng.shuffle(ids)
        path = convert(tmp_path, dict(zip(order, ids)), f"t{table}")
        tok, ref = load_tokenizer(path), library(path)
        assert tok.engine == "tiktoken"
        for _ in range(150):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
            assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, (table, text)
            checked += 1
    assert checked == 1800


def _mutations():
    """(name, edit of the parsed tokenizer.json, words the refusal must contain)."""
    def drop_merge(d):
        d["model"]["merges"].pop(len(d["model"]["merges"]) // 2)

    def swap_merges(d):
        m = d["model"]["merges"]
        i = next(i for i in range(len(m) - 1) if m[i][0] + m[i][1] != m[i + 1][0] + m[i + 1][1])
        m[i], m[i + 1] = m[i + 1], m[i]

    def set_path(path, value):
        def edit(d):
            node = d
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        return edit

    def non_special(d):
        d["added_tokens"][1]["special"] = False

    def unknown_byte(d):
        vocab = d["model"]["vocab"]
        vocab["a b"] = len(vocab)  # a literal space is not byte-level text (that is "Ġ")
        for added in d["added_tokens"]:
            added["id"] += 1

    def missing_byte(d):
        vocab = d["model"]["vocab"]
        gone = byte_level_alphabet()[0]
        assert not any(gone in m[0] + m[1] for m in d["model"]["merges"])
        del vocab[gone]

    return [
        ("drop_merge", drop_merge, "merges, but the vocabulary has"),
        ("swap_merges", swap_merges, "out of the order"),
        ("normalizer", set_path(["normalizer"], {"type": "NFC"}), "normalizer"),
        ("pattern", set_path(["pre_tokenizer", "pretokenizers", 0, "pattern", "Regex"],
                             r"\s+|\S+"), "pattern"),
        ("ignore_merges", set_path(["model", "ignore_merges"], False), "ignore_merges"),
        ("byte_fallback", set_path(["model", "byte_fallback"], True), "byte_fallback"),
        ("prefix_space", set_path(["pre_tokenizer", "pretokenizers", 1, "add_prefix_space"],
                                  True), "prefix space"),
        ("non_special", non_special, "is not special"),
        ("unknown_byte", unknown_byte, "not byte-level"),
        ("missing_byte", missing_byte, "256 single bytes"),
    ]


@pytest.mark.parametrize("name,edit,why", _mutations(), ids=[m[0] for m in _mutations()])
def test_each_broken_condition_keeps_the_library(tmp_path, converted, name, edit, why):
    with open(converted) as f:
        data = json.load(f)
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok, ref = load_tokenizer(path), library(str(path))
    assert tok.engine == "tokenizers" and why in tok.engine_note
    for text in HARD_TEXTS[:8]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    with pytest.raises(TokenizerError, match=rf"{path}: cannot be encoded by tiktoken.*{why}"):
        load_tokenizer(path, engine="tiktoken")


def test_a_dropped_merge_would_change_ids(tmp_path, converted, corpus):
    """The merge check guards something real: forced through tiktoken anyway, a file without the
    merges of one token gets other ids than the library gives it."""
    import tiktoken

    with open(converted) as f:
        data = json.load(f)
    vocab, ref, alphabet = data["model"]["vocab"], library(converted), byte_level_alphabet()
    texts = corpus + HARD_TEXTS
    inner = collections.Counter()  # tokens the library builds inside pieces not found whole
    for text in texts:
        for piece in regex.findall(LLAMA3_PATTERN, text):
            if "".join(alphabet[b] for b in piece.encode()) not in vocab:
                inner.update(t for t in ref.encode(piece, add_special_tokens=False).tokens
                             if len(t) > 1)
    victim = inner.most_common(1)[0][0]
    data["model"]["merges"] = [m for m in data["model"]["merges"] if m[0] + m[1] != victim]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    assert load_tokenizer(path).engine == "tokenizers"
    to_byte = {c: b for b, c in alphabet.items()}
    ranks = {bytes(to_byte[c] for c in s): i for s, i in vocab.items()}
    forced = tiktoken.Encoding("x", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    after = library(str(path))
    differ = [t for t in texts if forced.encode_ordinary(t) != after.encode(t, add_special_tokens=False).ids]
    assert differ and all(forced.encode_ordinary(t) == ref.encode(t, add_special_tokens=False).ids
                          for t in differ)  # tiktoken still builds the token the file cannot
def test_lone_surrogate_is_refused_by_both_engines(converted):
    for engine in ("tiktoken", "tokenizers"):
        with pytest.raises((UnicodeEncodeError, TypeError)):  # TypeError: tokenizers' own
            load_tokenizer(converted, engine=engine).encode("ok \ud800 ok")


def test_engine_option_errors(converted, tiktoken_path, sp_tokenizer_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer engine 'fast'"):
        load_tokenizer(converted, engine="fast")
    for path in (tiktoken_path, sp_tokenizer_path):
        with pytest.raises(TokenizerError, match="applies to a tokenizer.json"):
            load_tokenizer(path, engine="tokenizers")
        assert load_tokenizer(path).engine in ("tiktoken", "sentencepiece")


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_writes_the_same_dataset_with_either_engine(tmp_path, converted, corpus, workers,
                                                                capsys):
    src = tmp_path / "docs.jsonl"
    rows = corpus + HARD_TEXTS + [t[::-1] for t in corpus]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = {}
    for engine in ("auto", "tokenizers"):
        prefix = str(tmp_path / engine / "c")
        rep = run_preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=prefix,
                                              tokenizer=converted, tokenizer_engine=engine,
                                              append_eod=True, workers=workers, batch_size=7,
                                              progress=False, log_interval=0))["text"]
        assert rep["docs"] == len(rows) - 1  # the empty text writes no document
        out[engine] = [open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx")]
    assert out["auto"] == out["tokenizers"]
    ref = library(converted)
    eod = ref.token_to_id("<|end_of_text|>")
    want = list(itertools.chain.from_iterable(
        ref.encode(t, add_special_tokens=False).ids + [eod] for t in rows if t))
    import numpy as np

    assert np.frombuffer(out["auto"][0], dtype=np.uint16).tolist() == want
    with pytest.raises(Exception, match="tokenizer-engine 'x'"):
        PreprocessConfig(inputs=[str(src)], output_prefix="p", tokenizer=converted,
                         tokenizer_engine="x")


def test_preprocess_says_why_the_library_is_used(tmp_path, hf_tokenizer_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "hello"}\n')
    run_preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / "o"),
                                    tokenizer=hf_tokenizer_path, progress=False, log_interval=0))
    # BpeTrainer's merges are its training history, not every split: not a tiktoken conversion
    assert "encoded by the tokenizers library, not tiktoken" in capsys.readouterr().err


def test_merges_written_as_strings_are_read_alike(tmp_path, converted, corpus):
    """tokenizers < 0.20 wrote each merge as "left right" (Llama-3's own file does); newer
    versions write [left, right]. Both are recognised."""
    with open(converted) as f:
        data = json.load(f)
    assert isinstance(data["model"]["merges"][0], list)
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    tok, ref = load_tokenizer(path), library(str(path))
    assert tok.engine == "tiktoken"
    for text in corpus[:50] + HARD_TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    data["model"]["merges"][5] = "a b c"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="merge 5 is not a pair"):
        load_tokenizer(path, engine="tiktoken")
