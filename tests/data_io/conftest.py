"""Fixtures: a small synthetic corpus and tiny tokenizers of every kind, trained on the fly (<1 s)."""

import base64
import collections
import io
import random

import pytest
import regex

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jolly zebras and many perplexing curricula mixture tokens llama data model train "
         "science physics chemistry biology mathematics 1234 5678 héllo naïve café").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents of varied length, some multi-line, some Unicode."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 40))]
        if i % 7 == 0:
            words.insert(rng.randint(0, len(words)), "\n")
        if i % 11 == 0:
            words.append("你好 世界")
        out.append(" ".join(words).capitalize() + ".")
    return out


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_texts(400)


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory, corpus) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sp_tokenizer_path(tmp_path_factory, corpus) -> str:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2)
    # Named like Llama-2's tokenizer.model: the kind must come from the content, not the name.
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def train_byte_bpe(texts, merges: int, pattern: str) -> dict[bytes, int]:
    """A tiny byte-level BPE (tiktoken ranks): 256 single bytes, then the most frequent pairs."""
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(w.encode() for t in texts for w in regex.findall(pattern, t))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    for _ in range(merges):
        pairs = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return ranks


def write_ranks(path, ranks: dict[bytes, int]) -> None:
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")


@pytest.fixture(scope="session")
def tiktoken_path(tmp_path_factory, corpus) -> str:
    from megasyne.data.tokenizers import LLAMA3_PATTERN

    ranks = train_byte_bpe(corpus[:100], merges=60, pattern=LLAMA3_PATTERN)
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    write_ranks(path, ranks)
    return str(path)
