"""Every tokenizer kind loads from a local file, detected from content; special ids are right."""

import base64
import os
import shutil

import pytest

from megasyne.data.tokenizers import LLAMA3_SPECIAL_TOKENS, TokenizerError, detect_kind, load_tokenizer

from .conftest import write_ranks


def test_hf_tokenizer_json(hf_tokenizer_path, corpus):
    tok = load_tokenizer(hf_tokenizer_path)
    assert tok.kind == "hf" and tok.vocab_size == 400
    assert (tok.bos_id, tok.eod_id) == (0, 1)  # <|begin_of_text|>, <|end_of_text|>
    for text in corpus[:20]:
        ids = tok.encode(text)
        assert ids and tok.decode(ids) == text and tok.bos_id not in ids
    assert tok.encode_batch(corpus[:20]) == [tok.encode(t) for t in corpus[:20]]
    # special-token text inside a document stays plain text: no EOD mid-document
    assert tok.eod_id not in tok.encode("end <|end_of_text|> here")
    # a directory resolves to its tokenizer.json; "hf:" forces the kind
    assert load_tokenizer(os.path.dirname(hf_tokenizer_path)).kind == "hf"
    assert load_tokenizer(f"hf:{hf_tokenizer_path}").vocab_size == 400
    assert load_tokenizer(hf_tokenizer_path, eod="<|begin_of_text|>").eod_id == 0


def test_sentencepiece_model(sp_tokenizer_path, corpus):
    import sentencepiece as spm

    tok = load_tokenizer(sp_tokenizer_path)
    ref = spm.SentencePieceProcessor(model_file=sp_tokenizer_path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400
    assert tok.eod_id == ref.eos_id() == 2 and tok.bos_id == ref.bos_id() == 1
    for text in corpus[:20]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.encode_batch(corpus[:20]) == ref.encode(corpus[:20])
    assert load_tokenizer(sp_tokenizer_path, kind="sentencepiece").kind == "sentencepiece"


def test_tiktoken_ranks_file(tiktoken_path, corpus):
    tok = load_tokenizer(tiktoken_path)  # named tokenizer.model, content says tiktoken
    n = 256 + 60
    assert tok.kind == "tiktoken" and tok.vocab_size == n + 2
    assert (tok.bos_id, tok.eod_id) == (n, n + 1)
    for text in corpus[:20]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids) < n
    assert len(tok.encode(corpus[0])) < len(corpus[0].encode())  # the merges are used
    assert tok.encode_batch(corpus[:5]) == [tok.encode(t) for t in corpus[:5]]


def test_tiktoken_llama3_layout(tmp_path):
    """128000 ranks -> Llama-3: 256 specials from 128000, BOS 128000, EOD 128001, vocab 128256."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"t%d" % i: 256 + i for i in range(128000 - 256)})
    write_ranks(tmp_path / "tokenizer.model", ranks)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eod_id) == (128256, 128000, 128001)
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.encode("ab<|end_of_text|>") == list(b"ab<|end_of_text|>")  # plain text, not special
    assert tok.encode("x" * 60_000 + " " * 30_000 + "y") == list(b"x" * 60_000 + b" " * 30_000 + b"y")


def test_gpt2_style_ranks_file(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"g%d" % i: 256 + i for i in range(50256 - 256)})
    write_ranks(tmp_path / "gpt2.tiktoken", ranks)
    tok = load_tokenizer(tmp_path / "gpt2.tiktoken")
    assert (tok.vocab_size, tok.eod_id, tok.bos_id) == (50257, 50256, 50256)


def test_detection_is_by_content(tmp_path, hf_tokenizer_path, sp_tokenizer_path, tiktoken_path):
    shutil.copy(hf_tokenizer_path, tmp_path / "weird.model")
    shutil.copy(sp_tokenizer_path, tmp_path / "weird.json")
    assert detect_kind(str(tmp_path / "weird.model")) == "hf"
    assert detect_kind(str(tmp_path / "weird.json")) == "sentencepiece"
    assert detect_kind(tiktoken_path) == "tiktoken"
    with pytest.raises(TokenizerError, match="looks like hf"):
        load_tokenizer(tmp_path / "weird.model", kind="tiktoken")


def test_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match=r"junk\.bin: not a tokenizer\.json"):
        load_tokenizer(tmp_path / "junk.bin")
    (tmp_path / "bad.tiktoken").write_bytes(base64.b64encode(b"a") + b" 0\n!!notbase64 1\n")
    with pytest.raises(TokenizerError, match=r"bad\.tiktoken:2: not a '<base64 token> <rank>'"):
        load_tokenizer("tiktoken:" + str(tmp_path / "bad.tiktoken"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
