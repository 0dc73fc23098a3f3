"""Matching a parse spec's known values against queries: surface forms to canonical values.

Built from the active ``ParseSpec``; the grammar asks it which canonical values a query mentions
(``candidates``), and normalisation maps any surface form to its canonical value (``canonicalize``).
Known values are those of vocabulary fields and the mentions of span fields (a span field's mention
is its own canonical value); a span field's patterns add the text they match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property

from schemas.spec import ParseSpec, match_form

__all__ = ["Vocabulary", "match_form"]


class Vocabulary:
    """Surface-form index over the spec's vocabulary fields and span fields' mentions and patterns."""

    def __init__(self, spec: ParseSpec, singular: Callable[[str], str] | None = None) -> None:
        """``singular`` (a word's singular): the mentions of span fields written singular then match
        whichever number the query uses for their last word ("running shoe" in "running shoes")."""
        self.spec = spec
        self._singular = singular
        self._number_blind = frozenset(
            f.name for f in spec.fields if singular is not None and f.kind == "span" and "singular" in f.normalize
        )

    @cached_property
    def surface_index(self) -> dict[str, dict[str, str]]:
        """Per field with known values: surface form (match form) -> canonical value."""
        index: dict[str, dict[str, str]] = {}
        for spec_field in self.spec.fields:
            forms: dict[str, str] = {}
            if spec_field.kind == "vocabulary":
                for entry in spec_field.values:
                    surface = {match_form(entry.value), *(match_form(f) for f in entry.forms)}
                    for form in sorted((f for f in surface if f), key=len, reverse=True):
                        forms.setdefault(form, entry.value)
            elif spec_field.mentions:
                for mention in spec_field.mentions:
                    forms.setdefault(match_form(mention), " ".join(mention.lower().split()))
            if forms:
                index[spec_field.name] = forms
        return index

    def _singular_last(self, words: tuple[str, ...]) -> tuple[str, ...]:
        assert self._singular is not None
        return (*words[:-1], self._singular(words[-1]))

    @cached_property
    def _form_index(self) -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
        """First word -> (form words, field, canonical value), longest forms first; the forms of
        number-blind fields with their last word singular, each once."""
        index: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        seen: set[tuple[tuple[str, ...], str]] = set()
        for name, forms in self.surface_index.items():
            for form, value in forms.items():
                words = tuple(form.split())
                if name in self._number_blind:
                    words = self._singular_last(words)
                if (words, name) not in seen:
                    seen.add((words, name))
                    index.setdefault(words[0], []).append((words, name, value))
        for entries in index.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)
        return index

    def _forms_from(self, word: str) -> list[tuple[tuple[str, ...], str, str]]:
        """The forms that may start at ``word``: those of a one-word number-blind form by its singular too."""
        entries = self._form_index.get(word, [])
        if self._number_blind:
            singular = self._singular(word) if self._singular is not None else word
            if singular != word:
                entries = entries + [e for e in self._form_index.get(singular, ()) if len(e[0]) == 1]
        return entries

    def matches(self, query: str) -> list[tuple[str, str, int, int]]:
        """(field, canonical value, first word, end word) of every vocabulary mention in ``query``.

        The longest mention wins: "white oak" (material) hides "white" (colour), "rose gold" hides
        "gold", "mid century modern" hides "modern". The same words may still be a candidate of two
        fields ("walnut" colour or material) and the model decides between them.
        """
        words = match_form(query).split()
        found: list[tuple[str, str, int, int]] = []
        for start, word in enumerate(words):
            for form_words, name, value in self._forms_from(word):
                end = start + len(form_words)
                said = tuple(words[start:end])
                if name in self._number_blind and len(said) == len(form_words):
                    said = self._singular_last(said)
                if said == form_words:
                    found.append((name, value, start, end))
        found.extend(self._pattern_matches(query))
        kept: list[tuple[str, str, int, int]] = []
        for match in sorted(found, key=lambda m: m[3] - m[2], reverse=True):
            _, _, start, end = match
            hidden = any(s < end and start < e and (s, e) != (start, end) for _, _, s, e in kept)
            if not hidden:
                kept.append(match)
        return sorted(kept, key=lambda m: (m[2], -m[3]))

    @cached_property
    def _patterns(self) -> list[tuple[str, re.Pattern[str]]]:
        return [(f.name, pattern) for f in self.spec.fields for pattern in f.compiled_patterns]

    def _pattern_matches(self, query: str) -> list[tuple[str, str, int, int]]:
        """Span fields' pattern matches as mentions: the matched text, at the words it covers (a match
        that starts or ends inside a word is not a mention of whole words and is dropped)."""
        if not self._patterns:
            return []
        text = " ".join(query.lower().split())
        found: list[tuple[str, str, int, int]] = []
        for name, pattern in self._patterns:
            for match in pattern.finditer(text):
                before, matched = text[: match.start()], match.group().strip()
                covered = match_form(matched).split()
                if not covered or not _word_edge(text, match.start(), match.end()):
                    continue
                start = len(match_form(before).split())
                found.append((name, matched, start, start + len(covered)))
        return found

    def candidates(self, field: str, query: str) -> list[str]:
        """Canonical values of ``field`` mentioned in ``query`` (whole words, longest mention wins)."""
        found: list[str] = []
        for name, value, _, _ in self.matches(query):
            if name == field and value not in found:
                found.append(value)
        return found

    def canonicalize(self, field: str, value: str) -> str | None:
        """Map any surface form to its canonical value; None when the vocabulary does not know it."""
        return self.surface_index.get(field, {}).get(match_form(value))

    def grounded(self, field: str, value: str, query: str) -> bool:
        """Whether ``value`` (canonical or a surface form) is said in ``query``."""
        padded = f" {match_form(query)} "
        if f" {match_form(value)} " in padded:
            return True
        if field in self.surface_index:
            canonical = self.canonicalize(field, value) or value
            return canonical in self.candidates(field, query)
        return False


def _word_edge(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] begins and ends at word boundaries."""
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())
