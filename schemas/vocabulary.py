"""The catalog vocabulary file: which parse fields are open spans and which take canonical facet values.

A deployment swaps in its own catalog's facet values with ``QUSTREAM_VOCABULARY_PATH``; the default
furniture vocabulary ships in ``schemas/data/furniture_vocabulary.json``.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import PARSE_FIELDS

DEFAULT_VOCABULARY_PATH = Path(__file__).parent / "data" / "furniture_vocabulary.json"

_SEPARATORS = re.compile(r"[^\w']+|_+")


def match_form(text: str) -> str:
    """The form used to compare surface forms with queries: lowercase, punctuation and spaces as one space."""
    return _SEPARATORS.sub(" ", text.lower()).strip()


class VocabularyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(description="Canonical facet value written into the parse, e.g. 'gray'.")
    forms: list[str] = Field(default_factory=list, description="Other surface forms: 'grey', 'gry'.")

    def surface_forms(self) -> list[str]:
        """All forms (the canonical value included) in match form, longest first."""
        forms = {match_form(self.value), *(match_form(f) for f in self.forms)}
        return sorted((f for f in forms if f), key=len, reverse=True)


class FieldSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["span", "vocabulary"]
    values: list[VocabularyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_match_kind(self) -> FieldSpec:
        if self.kind == "vocabulary" and not self.values:
            raise ValueError("a vocabulary field needs at least one value")
        if self.kind == "span" and self.values:
            raise ValueError("a span field takes no values")
        return self


class Vocabulary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = "1"
    description: str = ""
    fields: dict[str, FieldSpec]

    @model_validator(mode="after")
    def _fields_are_parse_fields(self) -> Vocabulary:
        unknown = set(self.fields) - set(PARSE_FIELDS)
        if unknown:
            raise ValueError(f"unknown parse fields in vocabulary: {sorted(unknown)}")
        missing = set(PARSE_FIELDS) - set(self.fields)
        if missing:
            raise ValueError(f"vocabulary lacks parse fields: {sorted(missing)}")
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> Vocabulary:
        source = path or DEFAULT_VOCABULARY_PATH
        return cls.model_validate(json.loads(Path(source).read_text(encoding="utf-8")))

    def canonical_json(self) -> str:
        """Stable serialisation, part of the engine version hash."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)

    @cached_property
    def surface_index(self) -> dict[str, dict[str, str]]:
        """Per vocabulary field: surface form (match form) -> canonical value."""
        index: dict[str, dict[str, str]] = {}
        for name, spec in self.fields.items():
            if spec.kind != "vocabulary":
                continue
            forms: dict[str, str] = {}
            for entry in spec.values:
                for form in entry.surface_forms():
                    forms.setdefault(form, entry.value)
            index[name] = forms
        return index

    @cached_property
    def _form_index(self) -> dict[str, list[tuple[tuple[str, ...], str, str]]]:
        """First word -> (form words, field, canonical value), longest forms first."""
        index: dict[str, list[tuple[tuple[str, ...], str, str]]] = {}
        for name, forms in self.surface_index.items():
            for form, value in forms.items():
                words = tuple(form.split())
                index.setdefault(words[0], []).append((words, name, value))
        for entries in index.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)
        return index

    def matches(self, query: str) -> list[tuple[str, str, int, int]]:
        """(field, canonical value, first word, end word) of every vocabulary mention in ``query``.

        The longest mention wins: "white oak" (material) hides "white" (colour), "rose gold" hides
        "gold", "mid century modern" hides "modern". The same words may still be a candidate of two
        fields ("walnut" colour or material) and the model decides between them.
        """
        words = match_form(query).split()
        found: list[tuple[str, str, int, int]] = []
        for start, word in enumerate(words):
            for form_words, name, value in self._form_index.get(word, ()):
                end = start + len(form_words)
                if tuple(words[start:end]) == form_words:
                    found.append((name, value, start, end))
        kept: list[tuple[str, str, int, int]] = []
        for match in sorted(found, key=lambda m: m[3] - m[2], reverse=True):
            _, _, start, end = match
            hidden = any(s < end and start < e and (s, e) != (start, end) for _, _, s, e in kept)
            if not hidden:
                kept.append(match)
        return sorted(kept, key=lambda m: (m[2], -m[3]))

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
