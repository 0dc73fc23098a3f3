"""Singular forms of the product nouns in shopping queries: ``inflect`` plus the words it gets wrong.

``inflect.engine().singular_noun`` assumes its input is plural, so on its own it strips the ``s`` of
words that are singular already ("christmas" → "christma", "cactus" → "cactu") and of pluralia
tantum that shops sell under their plural ("shorts" → "short", "jeans" → "jean"). Those are kept
here as they are; ``tests/test_inflection.py`` holds the result to hand-checked pairs from real
shopping queries.
"""

from __future__ import annotations

from functools import lru_cache

import inflect

#: Nouns used in the plural for one thing, or singular nouns that end in "s": never singularised.
_UNCHANGED = frozenset({
    # clothes worn as a pair of legs, and clothes themselves
    "pants", "trousers", "jeans", "shorts", "leggings", "tights", "pajamas", "pyjamas", "jammies", "overalls",
    "coveralls", "sweatpants", "capris", "jeggings", "bloomers", "knickers", "briefs", "boxers", "panties", "undies",
    "chinos", "slacks", "khakis", "joggers", "breeches", "clothes",
    # tools and eyewear of two halves
    "scissors", "shears", "pliers", "tongs", "tweezers", "clippers", "nippers", "binoculars", "glasses",
    "sunglasses", "eyeglasses", "goggles", "spectacles", "headphones", "earphones", "earmuffs",
    # singular, or the same in both numbers
    "christmas", "series", "species", "news", "means", "headquarters", "gas", "canvas", "atlas",
    "lens", "bias", "alias", "iris", "tennis", "chassis", "axis", "electronics", "athletics", "gymnastics",
    "aerobics", "pilates", "physics", "mathematics", "economics", "politics", "ethics", "graphics", "billiards",
    "suds", "oats", "grits", "dice",
})

#: Plurals of three letters or fewer; other words that short ("gas", "gps", "vhs") are kept.
_SHORT_PLURALS = {"tvs": "tv", "cds": "cd"}

#: Words before "glasses" that make them vessels or lenses, not eyewear: "wine glasses" → "wine glass".
_GLASS_VESSELS = frozenset({
    "wine", "shot", "drinking", "beer", "champagne", "martini", "pint", "cocktail", "whiskey", "whisky",
    "margarita", "juice", "water", "cream", "sundae", "dessert", "highball", "stemless", "coupe", "magnifying",
})

#: Words that end a noun phrase's head: "containers for food" → "container for food".
_HEAD_ENDS = frozenset({"for", "with", "without", "of", "from"})

_ENGINE = inflect.engine()


@lru_cache(maxsize=8192)
def singular_noun(word: str) -> str:
    """The singular of one lowercase English noun; a word that is not a plural comes back unchanged."""
    if len(word) <= 3:
        return _SHORT_PLURALS.get(word, word)
    if word in _UNCHANGED or word.endswith(("ss", "us", "sis")):
        return word
    # False means "not a plural inflect knows".
    singular = _ENGINE.singular_noun(word)
    return singular if isinstance(singular, str) and singular else word


def singular_phrase(text: str) -> str:
    """The phrase with its head noun singular: 'bar stools' → 'bar stool', 'boxes for toys' → 'box for
    toys', 'chairs and a half' → 'chair and a half'. A list of one-word items is a list of heads ('pots
    and pans' → 'pot and pan'); before a longer last item it qualifies that item's head ('plates and
    bowls sets' → 'plates and bowls set'). Words are split on whitespace and joined by single spaces."""
    words = text.split()
    conjuncts: list[tuple[int, int]] = []
    start = 0
    for index, word in enumerate(words):
        if word == "and":
            conjuncts.append((start, index))
            start = index + 1
    last = (start, len(words))
    if conjuncts and last[0] < last[1] and words[last[0]] in ("a", "an"):
        _singular_head(words, *conjuncts[-1])  # "a half" qualifies the noun before it
    elif last[1] - last[0] == 1:
        for conjunct in (*conjuncts, last):
            _singular_head(words, *conjunct)
    else:
        _singular_head(words, *last)
    return " ".join(words)


def _singular_head(words: list[str], start: int, end: int) -> None:
    """Singularise, in place, the head noun of ``words[start:end]``: the word before the first word
    that ends a head ("of", "for", ...), else the last word."""
    if start >= end:
        return
    head = end - 1
    for index in range(start + 1, end):
        if words[index] in _HEAD_ENDS:
            head = index - 1
            break
    word = words[head]
    if word == "glasses" and head > start and words[head - 1] in _GLASS_VESSELS:
        words[head] = "glass"
    else:
        words[head] = singular_noun(word)
