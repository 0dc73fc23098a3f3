"""Query normalization: the cache key and what the model sees."""

from __future__ import annotations

import re
import unicodedata

#: ASCII control characters (C0 and DEL): the only control characters ASCII text can hold.
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def strip_control(text: str) -> str:
    """Replace NUL and other control/format characters with spaces (they carry no search meaning)."""
    if text.isascii():  # the common case, without a per-character Unicode lookup (or str.translate's)
        # isprintable: one C pass that is True exactly when an ASCII text holds no control character.
        return text if text.isprintable() else _ASCII_CONTROL.sub(" ", text)
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in text)


def normalize_query(text: str) -> str:
    """NFKC, control characters removed, lowercase, whitespace collapsed."""
    if not text.isascii():  # ASCII text is already in NFKC
        text = unicodedata.normalize("NFKC", text)
    # str.split() splits on exactly what the regex \s matches (str.isspace), and faster.
    return " ".join(strip_control(text).split()).lower()
