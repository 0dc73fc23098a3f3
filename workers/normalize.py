"""Query normalization: the cache key and what the model sees."""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


#: ASCII control characters (C0 and DEL) → space; the only control characters ASCII text can hold.
_ASCII_CONTROL = {code: " " for code in (*range(32), 127)}


def strip_control(text: str) -> str:
    """Replace NUL and other control/format characters with spaces (they carry no search meaning)."""
    if text.isascii():  # the common case, without a per-character Unicode lookup
        return text.translate(_ASCII_CONTROL)
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in text)


def normalize_query(text: str) -> str:
    """NFKC, control characters removed, lowercase, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = strip_control(text)
    return _WHITESPACE.sub(" ", text).strip().lower()
