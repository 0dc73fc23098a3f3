"""Hand-written parts the worker no longer uses, kept only so ``qustream bench handwritten`` can
measure them again against the library that replaced them. Nothing outside ``bench/`` imports this.

- the rule-based singulariser of ``workers/grammar.py`` (``singular``/``singular_item``), replaced
  by ``workers.inflection.singular_phrase`` (inflect);
- the delay formula of ``streams/retry.py``'s ``Backoff``, replaced by ``redis.backoff.EqualJitterBackoff``.
"""

from __future__ import annotations

import random


class HandwrittenBackoff:
    """Capped exponential backoff, each delay drawn between half the ceiling and the ceiling."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 15.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures, 16))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


_PLURAL_RULES: tuple[tuple[str, str], ...] = (
    ("ies", "y"),
    ("ves", "f"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("sses", "ss"),
    ("xes", "x"),
    ("zes", "z"),
)
_NOT_PLURAL = ("ss", "us", "is", "ous")
_PLURAL_EXCEPTIONS = {
    "shelves": "shelf",
    "knives": "knife",
    "leaves": "leaf",
    "dresses": "dress",
    "mattresses": "mattress",
    "glasses": "glass",
    "cushions": "cushion",
    "series": "series",
    "drawers": "drawer",
    "loveseats": "loveseat",
    "stools": "stool",
    "chaises": "chaise",
    "vases": "vase",
    "bases": "base",
    "cases": "case",
    "houses": "house",
    "pieces": "piece",
    "ottomans": "ottoman",
    "tvs": "tv",
}


def singular(word: str) -> str:
    """Singular of an English furniture noun (rule-based; good for catalog nouns, not for all English)."""
    if word in _PLURAL_EXCEPTIONS:
        return _PLURAL_EXCEPTIONS[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(_NOT_PLURAL):
        return word
    for suffix, replacement in _PLURAL_RULES:
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            if suffix == "ves" and word.endswith(("oves", "aves")):
                return word[:-1]
            return word[: -len(suffix)] + replacement
    return word[:-1]


def singular_item(item: str) -> str:
    """Singularize the head noun of an item type: 'bar stools' -> 'bar stool', 'chairs and a half' kept."""
    words = item.split()
    if not words:
        return item
    if len(words) > 2 and words[1] in ("and", "with", "for", "of"):
        # "chairs and a half" -> "chair and a half"; the first word is the head noun.
        words[0] = singular(words[0])
    else:
        words[-1] = singular(words[-1])
    return " ".join(words)
