"""Bengali text as the metrics and the honesty checks compare it.

NFC first (Bengali has composed and decomposed spellings of the same letters), then Unicode
punctuation -- the danda ``।`` included -- removed or split off, and words split on white space:
``\\w``-based splitting cuts Bengali words at their vowel signs.
"""
from __future__ import annotations

import re
import unicodedata

_WS = re.compile(r"\s+")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def normalize_bn(text: str) -> str:
    """NFC, lower-case (for any Latin), Unicode punctuation removed, white space collapsed."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if _is_punct(ch) else ch for ch in text)
    return _WS.sub(" ", text).strip()


def is_empty_reply(text: str) -> bool:
    """A reply without words: nothing but white space and punctuation (``"।"`` included)."""
    return not normalize_bn(text)


def tokenize_bn(text: str) -> list[str]:
    """Word tokens of :func:`normalize_bn` text (split on white space)."""
    return text.split()


def words_bn(text: str) -> list[str]:
    """The words of ``text`` as word-level scores count them: :func:`tokenize_bn` of :func:`normalize_bn`."""
    return tokenize_bn(normalize_bn(text))


def bleu_tokenize(text: str) -> str:
    """NFC text with every punctuation mark (``।``, ``?``, ``,`` ...) as its own token."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(f" {ch} " if _is_punct(ch) else ch for ch in text)
    return _WS.sub(" ", text).strip()
