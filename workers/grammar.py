"""Per-query output grammars for the parse schema, and turning a constrained output into a parse.

The output is always ``json.dumps`` of the parse with the schema's key order, preceded by one space
(the prompt ends with ``JSON:``). What a value may be depends on the grounding mode:

- ``catalog``: a vocabulary field admits null or the canonical values whose surface forms occur in
  the query; a span field admits null or a run of the query's own words, its known values (mentions,
  pattern matches) the query says first, or with ``fill: mentioned`` only those (with
  ``extend_mentions``, those and the longer runs that contain them).
- ``span``: span and vocabulary fields admit null or a run of the query's words.
- ``free``: span and vocabulary fields admit null or any short string (values absent from the query
  are flagged).

A category field admits null or one label of its closed set in every mode.

Strings are written JSON-escaped into the grammar, so a query containing quotes, backslashes, emoji or
control characters can never produce malformed JSON.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Literal

from schemas.spec import ParseSpec, SpecError, SpecField, UncheckedValue, load_spec, resolve_spec_path
from schemas.vocabulary import Vocabulary, match_form
from workers.inflection import singular_noun, singular_phrase

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


def query_spans(
    query: str,
    max_words: int = MAX_SPAN_WORDS,
    exclude: frozenset[str] = frozenset(),
    trim_edges: bool = True,
    stop_at: frozenset[str] = frozenset(),
    heads: frozenset[str] = frozenset(),
    fallback: bool = True,
) -> list[str]:
    """Distinct contiguous runs of up to ``max_words`` query words, in order of first appearance.

    Runs come from the words before the first word of ``stop_at`` (lowercase, not the query's first
    word) when those words hold an acceptable run, else from the whole query. They may not contain a
    word of ``exclude`` (in match form: words another field's vocabulary claims, e.g. the "oak" of
    "oak dining table") and, with ``trim_edges``, may not start or end with a stopword or a number.
    Falls back to every run when that leaves nothing (unless not ``fallback``). With ``heads``, only
    runs ending in one of them (as written or singular) count, the fallback included: none may be left.
    """
    words = query_words(query)
    stop = next((i for i, word in enumerate(words) if i and word.lower() in stop_at), None)
    if stop is not None:
        before = _runs(words[:stop], max_words, exclude, trim_edges, heads)
        if before:
            return before
    runs = _runs(words, max_words, exclude, trim_edges, heads)
    if not runs and fallback and (exclude or words):
        runs = _runs(words, max_words, frozenset(), False, heads)
    return runs


def ends_in_head(word: str, heads: frozenset[str]) -> bool:
    """Whether ``word`` (the last word of a run) is one of ``heads``, as written or singular."""
    pieces = match_form(word).split()
    return bool(pieces) and (pieces[-1] in heads or singular_noun(pieces[-1]) in heads)


def _runs(
    words: list[str], max_words: int, exclude: frozenset[str], trim_edges: bool, heads: frozenset[str] = frozenset()
) -> list[str]:
    seen: dict[str, None] = {}
    for start in range(len(words)):
        for end in range(start + 1, min(len(words), start + max_words) + 1):
            if trim_edges and not (_edge_ok(words[start]) and _edge_ok(words[end - 1])):
                continue
            if heads and not ends_in_head(words[end - 1], heads):
                continue
            if exclude and any(piece in exclude for w in words[start:end] for piece in match_form(w).split()):
                continue
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


#: Above this many value combinations a group of vocabulary fields chooses its values independently.
MAX_COMBINATIONS = 512


def allowed_values(
    spec_field: SpecField, query: str, grounding: Grounding, claimed: frozenset[str], mentioned: tuple[str, ...]
) -> tuple[str, ...] | None:
    """What one field may take for ``query`` (besides null); None means any short string. ``mentioned``:
    the field's known values the query says (catalog grounding only)."""
    if spec_field.kind == "category":
        return tuple(spec_field.canonical_values)
    if grounding == "free":
        return None
    if grounding == "catalog" and spec_field.kind == "vocabulary":
        return mentioned
    heads = spec_field.head_words if grounding == "catalog" else frozenset()
    stop_at = frozenset(spec_field.stop_at)
    if mentioned and spec_field.fill == "mentioned":
        if not spec_field.extend_mentions:
            return mentioned
        # The runs may use the mentions' own words (in whichever number the query says them), must
        # contain one of them, and keep every other rule: no fallback to untrimmed runs.
        keys = [_number_blind(value) for value in mentioned]
        own = frozenset(piece for key in keys for piece in key.split())
        exclude = frozenset(word for word in claimed if singular_noun(word) not in own)
        runs = query_spans(query, spec_field.max_words, exclude, spec_field.trim_edges, stop_at, heads, fallback=False)
        longer = [run for run in runs
                  if any(key != (blind := _number_blind(run)) and f" {key} " in f" {blind} " for key in keys)]
        return tuple(dict.fromkeys([*mentioned, *longer]))
    runs = query_spans(query, spec_field.max_words, claimed, spec_field.trim_edges, stop_at, heads)
    if not runs and heads and spec_field.without_head == "runs":
        runs = query_spans(query, spec_field.max_words, claimed, spec_field.trim_edges, stop_at)
    return tuple(dict.fromkeys([*mentioned, *runs]))


def _number_blind(text: str) -> str:
    return " ".join(singular_noun(word) for word in match_form(text).split())


def build_row_grammar(query: str, vocabulary: Vocabulary, grounding: Grounding) -> RowGrammar:
    """The grammar of one query's output (see the module docstring for the modes)."""
    spec = vocabulary.spec
    mentions = vocabulary.matches(query) if grounding == "catalog" else []
    words = match_form(query).split()
    for spec_field in spec.fields:
        if spec_field.stop_at:
            mentions = _drop_mentions_past_stop(spec_field, words, mentions)
    claimed = frozenset(w for _, _, s, e in mentions for w in words[s:e])
    # One pass over the query's mentions serves every field (``Vocabulary.candidates`` would rescan it).
    mentioned: dict[str, dict[str, None]] = {}
    for name, value, _, _ in mentions:
        mentioned.setdefault(name, {})[value] = None
    allowed = {
        f.name: allowed_values(f, query, grounding, claimed, tuple(mentioned.get(f.name, ()))) for f in spec.fields
    }
    rules: list[str] = []
    for index, spec_field in enumerate(spec.fields):
        values = allowed[spec_field.name]
        if values is None:
            rules.append(f'v{index} ::= "null" | "\\"" freechar{{0,{MAX_FREE_CHARS}}} "\\""')
        else:
            null = [] if values and _fills_unshared(spec_field, mentions) else ['"null"']
            rules.append(f"v{index} ::= " + " | ".join([*null, *(_json_string_literal(v) for v in values)]))
    if any(v is None for v in allowed.values()):
        # Printable characters other than quote and backslash: a free value never needs escaping.
        rules.append('freechar ::= [^"\\\\\\x00-\\x1f\\x7f]')
    groups = _exclusive_groups(spec, mentions) if grounding == "catalog" else {}
    parts: list[str] = []
    index = 0
    while index < len(spec.fields):
        group = groups.get(index)
        if group is not None:
            end, alternatives = group
            parts.append(f"g{index}")
            rules.append(f"g{index} ::= " + alternatives)
            index = end
            continue
        opener = " {" if index == 0 else ", "
        parts.append(_ebnf_literal(opener + json.dumps(spec.fields[index].name) + ": ") + f" v{index}")
        index += 1
    parts.append(_ebnf_literal("}"))
    ebnf = "root ::= " + " ".join(parts) + "\n" + "\n".join(rules) + "\n"
    return RowGrammar(ebnf=ebnf, allowed=allowed)


def _drop_mentions_past_stop(
    spec_field: SpecField, words: list[str], mentions: list[tuple[str, str, int, int]]
) -> list[tuple[str, str, int, int]]:
    """``mentions`` without the field's mentions after its first ``stop_at`` word when the words before
    that stop hold a mention or an acceptable run ("charger for phone case": the charger, not the case);
    ``words``: the query's words in match form, the same words the runs come from."""
    stop_at = frozenset(spec_field.stop_at)
    stop = next((i for i, word in enumerate(words) if i and word in stop_at), None)
    own = [m for m in mentions if m[0] == spec_field.name]
    if stop is None or not any(m[2] >= stop for m in own):
        return mentions
    before = " ".join(words[:stop])
    if not any(m[2] < stop for m in own) and not query_spans(
        before, spec_field.max_words, trim_edges=spec_field.trim_edges, heads=spec_field.head_words
    ):
        return mentions
    return [m for m in mentions if m[0] != spec_field.name or m[2] < stop]


def _exclusive_groups(spec: ParseSpec, mentions: list[tuple[str, str, int, int]]) -> dict[int, tuple[int, str]]:
    """Per run of two or more consecutive vocabulary fields (not the first field): alternatives in which
    one mention fills at most one field. "walnut media console" may give walnut as material or colour,
    not both. A run with too many combinations to list is left out (its fields choose independently).
    Returns start index -> (end index, EBNF alternatives)."""
    groups: dict[int, tuple[int, str]] = {}
    index = 1
    while index < len(spec.fields):
        end = index
        while end < len(spec.fields) and spec.fields[end].kind == "vocabulary":
            end += 1
        if end - index >= 2:
            alternatives = _combinations(spec.fields[index:end], mentions)
            if alternatives is not None:
                groups[index] = (end, alternatives)
        index = max(end, index + 1)
    return groups


def _fills_unshared(spec_field: SpecField, mentions: list[tuple[str, str, int, int]]) -> bool:
    """Whether a ``fill: mentioned`` field must take a value: one of its mentions is claimed by no other field."""
    if spec_field.fill != "mentioned":
        return False
    own = {(s, e) for name, _, s, e in mentions if name == spec_field.name}
    others = {(s, e) for name, _, s, e in mentions if name != spec_field.name}
    return bool(own - others)


def _combinations(spec_fields: list[SpecField], mentions: list[tuple[str, str, int, int]]) -> str | None:
    """EBNF alternatives for consecutive vocabulary fields: each mention fills at most one field, and a
    ``fill: mentioned`` field is null only when every one of its mentions went to another field."""
    fields = [f.name for f in spec_fields]
    fill_spans = {
        f.name: frozenset((s, e) for name, _, s, e in mentions if name == f.name)
        for f in spec_fields
        if f.fill == "mentioned"
    }
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
        unfilled = (n for n, (v, _) in zip(fields, combo, strict=True) if v is None and n in fill_spans)
        if any(fill_spans[n] - used for n in unfilled):
            continue
        text = "".join(
            f", {json.dumps(n)}: {json.dumps(v, ensure_ascii=False)}" for n, (v, _) in zip(fields, combo, strict=True)
        )
        alternatives.append(_ebnf_literal(text))
    return " | ".join(alternatives)


def normalize_value(spec_field: SpecField, value: str, vocabulary: Vocabulary) -> str:
    """How a chosen value is written into the parse: canonical vocabulary and category values, span
    values lowercased and singularised as the field asks."""
    text = " ".join(value.split())
    if spec_field.kind == "vocabulary":
        return vocabulary.canonicalize(spec_field.name, text) or text.lower()
    if spec_field.kind == "category":
        lowered = text.lower()
        return next((v for v in spec_field.canonical_values if v.lower() == lowered), text)
    if "lowercase" in spec_field.normalize:
        text = text.lower()
    if "singular" in spec_field.normalize:
        text = singular_phrase(text)
    return text


def normalize_parse(
    raw: dict[str, object], query: str, vocabulary: Vocabulary
) -> tuple[dict[str, str | None], list[str]]:
    """Every field of the spec, normalised; also which span or vocabulary values are not in the query."""
    parse: dict[str, str | None] = {}
    ungrounded: list[str] = []
    for spec_field in vocabulary.spec.fields:
        name = spec_field.name
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            parse[name] = None
            continue
        parse[name] = normalize_value(spec_field, value, vocabulary)
        if spec_field.kind == "category":
            continue
        if not vocabulary.grounded(name, value, query) and not _grounded_words(value, query):
            ungrounded.append(name)
    return parse, ungrounded


def _grounded_words(value: str, query: str) -> bool:
    padded = f" {match_form(query)} "
    return f" {match_form(value)} " in padded


def check_value(spec_field: SpecField, value: str, query: str, vocabulary: Vocabulary) -> str | None:
    """Why a labelled value cannot be a parse of ``query`` (None when it can): a span value that is no
    run of the query's words, a vocabulary value outside the vocabulary or not mentioned, a label
    outside the set. Spec examples and training data are checked with it."""
    name = spec_field.name
    if spec_field.kind != "category" and not match_form(value):
        return f"field {name!r}: {value!r} has no letters or digits"
    if spec_field.kind == "span":
        runs = query_spans(query, spec_field.max_words, trim_edges=False, stop_at=frozenset(spec_field.stop_at))
        if written_form(spec_field, value, vocabulary) not in {written_form(spec_field, r, vocabulary) for r in runs}:
            return f"field {name!r}: {value!r} is not a run of the query's words"
    elif spec_field.kind == "vocabulary":
        canonical = vocabulary.canonicalize(name, value)
        if canonical is None:
            return f"field {name!r}: {value!r} is not a value of its vocabulary"
        if canonical not in vocabulary.candidates(name, query):
            return f"field {name!r}: no surface form of {value!r} occurs in the query"
    elif normalize_value(spec_field, value, vocabulary) not in spec_field.canonical_values:
        return f"field {name!r}: {value!r} is not one of {spec_field.canonical_values}"
    return None


def check_examples(spec: ParseSpec) -> list[str]:
    """Problems with the spec's examples, one line each: those of ``check_value``, span values the
    catalog-grounded grammar cannot write (a catalogued mention or a head decides), and values not
    written as the parse writes them (singular, canonical)."""
    vocabulary = spec_vocabulary(spec)
    problems: list[str] = []
    for index, example in enumerate(spec.examples):
        where = f"examples[{index}] ({example.query!r})"
        for name, value in example.parse.items():
            if value is None:
                continue
            spec_field = spec.field(name)
            problem = check_value(spec_field, value, example.query, vocabulary)
            if problem is None and spec_field.kind == "span":
                problem = _unwritable_span(spec_field, value, example.query, vocabulary)
                if problem is not None and spec_field.head_words and not ends_in_head(value, spec_field.head_words):
                    problem = f"field {name!r}: {value!r} does not end with one of the field's heads"
            if problem is not None:
                problems.append(f"{where}: {problem}")
            elif spec_field.kind == "span" and normalize_value(spec_field, value, vocabulary) != value:
                problems.append(f"{where}: field {name!r}: write {value!r} as the parse does: "
                                f"{normalize_value(spec_field, value, vocabulary)!r}")
            elif spec_field.kind == "vocabulary" and vocabulary.canonicalize(name, value) != value:
                problems.append(f"{where}: field {name!r}: write the canonical value "
                                f"{vocabulary.canonicalize(name, value)!r}, not {value!r}")
            elif spec_field.kind == "category" and value not in spec_field.canonical_values:
                problems.append(f"{where}: field {name!r}: {value!r} is not one of {spec_field.canonical_values}")
    return problems


def written_form(spec_field: SpecField, value: str, vocabulary: Vocabulary) -> str:
    """A value as the parse writes it, punctuation aside: values with the same form are the same value
    (a catalogued mention keeps the catalog's spelling, "t-shirt" for the query's "t shirt")."""
    return match_form(normalize_value(spec_field, value, vocabulary))



def _unwritable_span(spec_field: SpecField, value: str, query: str, vocabulary: Vocabulary) -> str | None:
    """Why the catalog-grounded grammar cannot write ``value`` for ``query`` (a catalogued mention or a
    run without a head takes its place), or None."""
    offered = build_row_grammar(query, vocabulary, "catalog").allowed[spec_field.name] or ()
    if written_form(spec_field, value, vocabulary) in {written_form(spec_field, o, vocabulary) for o in offered}:
        return None
    return f"field {spec_field.name!r}: the grammar offers {list(offered)} for this query, not {value!r}"


def spec_vocabulary(spec: ParseSpec) -> Vocabulary:
    """The spec's known values as the engine matches them: span fields written singular find their
    mentions in either number."""
    return Vocabulary(spec, singular=singular_noun)


def load_checked_spec(ref: str) -> ParseSpec:
    """The spec ``ref`` names, its examples checked too; ``SpecError`` lists every problem. A spec with
    problems in its structure gets its examples checked all the same, against the fields without any,
    so that one run lists every problem."""
    try:
        spec = load_spec(ref)
    except SpecError as exc:
        if exc.partial is None or exc.source is None:
            raise
        examples = [*check_examples(exc.partial), *_unchecked_problems(exc.unchecked)]
        examples.sort(key=lambda problem: int(problem[problem.index("[") + 1:problem.index("]")]))
        raise SpecError.listing(exc.source, [*exc.problems, *examples]) from None
    problems = check_examples(spec)
    if problems:
        raise SpecError.listing(str(resolve_spec_path(ref)), problems)
    return spec


def _unchecked_problems(values: list[UncheckedValue]) -> list[str]:
    """The examples' values of fields that did not validate, checked only as far as holds for every kind
    and option: a value that is neither a run of the query's words (number and punctuation aside) nor
    one the field lists is wrong whatever the field becomes; anything else is left unsaid."""
    problems = []
    for unchecked in values:
        value = _number_blind(unchecked.value)
        if not value:
            continue
        if f" {value} " in f" {_number_blind(unchecked.query)} " or value in map(_number_blind, unchecked.known):
            continue
        problems.append(f"examples[{unchecked.example}] ({unchecked.query!r}): field {unchecked.field!r}: "
                        f"{unchecked.value!r} is neither a run of the query's words nor one of the field's values")
    return problems
