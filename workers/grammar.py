"""Per-query output grammars for the parse schema, and turning a constrained output into a parse.

The output is always ``json.dumps`` of the parse with the schema's key order, preceded by one space
(the prompt ends with ``JSON:``). What a value may be depends on the grounding mode:

- ``catalog``: a vocabulary field admits null or the canonical values whose surface forms occur in
  the query; a span field admits null or a run of the query's own words.
- ``span``: every field admits null or a run of the query's words.
- ``free``: every field admits null or any short string (values absent from the query are flagged).

Strings are written JSON-escaped into the grammar, so a query containing quotes, backslashes, emoji or
control characters can never produce malformed JSON.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Literal

from schemas.events import PARSE_FIELDS
from schemas.vocabulary import Vocabulary, match_form
from workers.inflection import singular_phrase

Grounding = Literal["catalog", "span", "free"]

#: Longest run of query words an open span may take; item types rarely exceed this
#: ("chair and a half recliner" is 5).
MAX_SPAN_WORDS = 5
#: Only the first words of a very long query are offered as spans; keeps grammars small.
MAX_SPAN_SOURCE_WORDS = 40
#: Words longer than this (2 KB of emoji, pasted URLs) are never offered as values.
MAX_WORD_CHARS = 32
#: Character budget of one value in ``free`` mode; bounds the output length.
MAX_FREE_CHARS = 40

_WORD = re.compile(r"[^\s,;:!?()\[\]{}<>|\"]+")
_EDGE_PUNCT = ".'`*~"


def query_words(query: str) -> list[str]:
    """The query's words as spans may use them: split on spaces and separators, edge dots dropped."""
    words: list[str] = []
    for raw in _WORD.findall(query):
        word = raw.strip(_EDGE_PUNCT)
        if word and len(word) <= MAX_WORD_CHARS:
            words.append(word)
    return words[:MAX_SPAN_SOURCE_WORDS]


#: Words an item span never starts or ends with: connectives, quantities and sizes describe the
#: item without being it ("bar stools set of 2" -> "bar stool", "queen bed frame" -> "bed frame").
EDGE_STOPWORDS = frozenset(
    [
        "a", "an", "the", "and", "or", "with", "without", "for", "of", "in", "on", "to", "by", "under",
        "over", "from", "set", "pack", "pcs", "pc", "piece", "pieces", "inch", "inches", "in.", "ft",
        "feet", "cm", "size", "sized", "queen", "king", "twin", "full", "cal", "california", "xl",
        "small", "large", "big", "cheap", "best", "new", "sale", "used", "tall", "wide", "narrow",
        "long", "round", "square"
    ]
)


def _edge_ok(word: str) -> bool:
    lowered = word.lower()
    return (
        lowered not in EDGE_STOPWORDS
        and any(ch.isalpha() for ch in lowered)
        and not any(ch.isdigit() for ch in lowered)
    )


def query_spans(query: str, max_words: int = MAX_SPAN_WORDS, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Distinct contiguous runs of up to ``max_words`` query words, in order of first appearance.

    Runs may not start or end with a stopword or a number, nor contain a word of ``exclude`` (in
    match form: words another field's vocabulary claims, e.g. the "oak" of "oak dining table").
    Falls back to every run when that leaves nothing.
    """
    words = query_words(query)
    seen: dict[str, None] = {}
    for start in range(len(words)):
        for end in range(start + 1, min(len(words), start + max_words) + 1):
            if not (_edge_ok(words[start]) and _edge_ok(words[end - 1])):
                continue
            if exclude and any(piece in exclude for w in words[start:end] for piece in match_form(w).split()):
                continue
            seen.setdefault(" ".join(words[start:end]), None)
    if not seen and (exclude or words):
        for start in range(len(words)):
            for end in range(start + 1, min(len(words), start + max_words) + 1):
                seen.setdefault(" ".join(words[start:end]), None)
    return list(seen)


def _ebnf_literal(text: str) -> str:
    """An EBNF string literal matching ``text`` exactly."""
    escaped = []
    for ch in text:
        if ch in ('"', "\\"):
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            escaped.append(f"\\x{ord(ch):02x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def _json_string_literal(value: str) -> str:
    return _ebnf_literal(json.dumps(value, ensure_ascii=False))


@dataclass(frozen=True)
class RowGrammar:
    """The grammar for one query and what it allows per field."""

    ebnf: str
    #: Per field: the allowed string values, or None for "any string" (free mode).
    allowed: dict[str, tuple[str, ...] | None]


#: Above this many value combinations the catalog grammar lets fields choose independently.
MAX_COMBINATIONS = 512


def build_row_grammar(query: str, vocabulary: Vocabulary, grounding: Grounding) -> RowGrammar:
    """The grammar of one query's output (see the module docstring for the modes)."""
    mentions = vocabulary.matches(query) if grounding == "catalog" else []
    claimed = frozenset(w for _, _, s, e in mentions for w in match_form(query).split()[s:e])
    allowed: dict[str, tuple[str, ...] | None] = {}
    for name in PARSE_FIELDS:
        spec = vocabulary.fields[name]
        if grounding == "free":
            allowed[name] = None
        elif grounding == "catalog" and spec.kind == "vocabulary":
            allowed[name] = tuple(vocabulary.candidates(name, query))
        else:
            allowed[name] = tuple(query_spans(query, exclude=claimed if grounding == "catalog" else frozenset()))
    rules: list[str] = []
    for index, name in enumerate(PARSE_FIELDS):
        values = allowed[name]
        if values is None:
            rules.append(f'v{index} ::= "null" | "\\"" freechar{{0,{MAX_FREE_CHARS}}} "\\""')
        else:
            rules.append(f"v{index} ::= " + " | ".join(['"null"', *(_json_string_literal(v) for v in values)]))
    if any(v is None for v in allowed.values()):
        # Printable characters other than quote and backslash: a free value never needs escaping.
        rules.append('freechar ::= [^"\\\\\\x00-\\x1f\\x7f]')
    head = _ebnf_literal(" {" + json.dumps(PARSE_FIELDS[0]) + ": ") + " v0"
    tail = _exclusive_tail(query, mentions, vocabulary) if grounding == "catalog" else None
    if tail is None:
        parts = []
        for index, name in enumerate(PARSE_FIELDS[1:], start=1):
            parts.append(_ebnf_literal(", " + json.dumps(name) + ": ") + f" v{index}")
        tail = " ".join(parts) + " " + _ebnf_literal("}")
    ebnf = f"root ::= {head} tail\ntail ::= {tail}\n" + "\n".join(rules) + "\n"
    return RowGrammar(ebnf=ebnf, allowed=allowed)


def _exclusive_tail(
    query: str, mentions: list[tuple[str, str, int, int]], vocabulary: Vocabulary
) -> str | None:
    """Alternatives for the vocabulary fields in which one mention fills at most one field.

    "walnut media console" may give walnut as material or colour, not both. Returns None when the
    combinations are too many to list (then fields choose independently).
    """
    fields = [n for n in PARSE_FIELDS[1:] if vocabulary.fields[n].kind == "vocabulary"]
    if fields != list(PARSE_FIELDS[1:]):
        return None
    options: list[list[tuple[str | None, frozenset[tuple[int, int]]]]] = []
    for name in fields:
        spans: dict[str, set[tuple[int, int]]] = {}
        for field_name, value, start, end in mentions:
            if field_name == name:
                spans.setdefault(value, set()).add((start, end))
        options.append([(None, frozenset()), *((v, frozenset(s)) for v, s in spans.items())])
    total = 1
    for choices in options:
        total *= len(choices)
    if total > MAX_COMBINATIONS:
        return None
    alternatives: list[str] = []
    for combo in itertools.product(*options):
        used: set[tuple[int, int]] = set()
        clash = False
        for _, spans_of_value in combo:
            if used & spans_of_value:
                clash = True
            used |= spans_of_value
        if clash:
            continue
        text = "".join(
            f", {json.dumps(n)}: {json.dumps(v, ensure_ascii=False)}" for n, (v, _) in zip(fields, combo, strict=True)
        )
        alternatives.append(_ebnf_literal(text + "}"))
    return " | ".join(alternatives)


def normalize_parse(
    raw: dict[str, object], query: str, vocabulary: Vocabulary
) -> tuple[dict[str, str | None], list[str]]:
    """Lowercase, singular item types, canonical vocabulary values; also which fields are ungrounded."""
    parse: dict[str, str | None] = {}
    ungrounded: list[str] = []
    for name in PARSE_FIELDS:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            parse[name] = None
            continue
        text = " ".join(value.lower().split())
        spec = vocabulary.fields[name]
        canonical = vocabulary.canonicalize(name, text) if spec.kind == "vocabulary" else None
        text = canonical or (text if spec.kind == "vocabulary" else singular_phrase(text))
        parse[name] = text
        if not vocabulary.grounded(name, value, query) and not _grounded_words(value, query):
            ungrounded.append(name)
    return parse, ungrounded


def _grounded_words(value: str, query: str) -> bool:
    padded = f" {match_form(query)} "
    return f" {match_form(value)} " in padded
