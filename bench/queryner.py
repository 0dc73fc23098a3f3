"""QueryNER (real Amazon shopping queries with span labels) as labelled JSONL for the ``ecommerce`` spec.

QueryNER: Segmentation of E-commerce Queries (Palen-Michel, Liang, Wu, Lignos; LREC-COLING 2024),
CC BY 4.0. Its entity types map to the spec's fields; each label is written as the parse would write
it (product types singular, vocabulary values canonical), so ``qustream eval`` compares like with like.
A labelled span that holds no value of the field's vocabulary ("patterened" as a colour) stays as
written: no parse can produce it, and it counts against the parser, as it should.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from schemas.spec import ParseSpec, match_form
from schemas.vocabulary import Vocabulary
from workers.grammar import normalize_value, spec_vocabulary

#: A phrase joins a mention catalog when it carries the label in at least this share of the queries
#: that say it: "apple" (a brand in most queries that name it) joins, "pink" (mostly a colour) does not.
#: Chosen for brands by five-fold cross-validation on the train split (figures in
#: bench/results/quality_ecommerce.json); product types use the same share.
MENTION_MIN_SHARE = 0.5
#: A word joins the product-type heads when this many train queries end a product type with it.
HEAD_MIN_COUNT = 1
#: Longest phrase, in words, a catalog keeps (the brand field's ``max_words``).
MENTION_MAX_WORDS = 3

#: ecommerce field -> QueryNER entity type.
FIELD_TO_ENTITY = {
    "product_type": "core_product_type",
    "brand": "creator",
    "size": "UoM",
    "color": "color",
    "material": "material",
    "audience": "department",
}


def label_row(row: dict[str, Any], spec: ParseSpec, vocabulary: Vocabulary) -> dict[str, Any]:
    """One QueryNER row as ``{"query", field: value | [acceptable values] | None}``."""
    labelled: dict[str, Any] = {"query": row["query"]}
    for spec_field in spec.fields:
        spans = row["spans"].get(FIELD_TO_ENTITY.get(spec_field.name, ""), [])
        values: list[str] = []
        for span in spans:
            if spec_field.kind == "vocabulary":
                found = [value for name, value, _, _ in vocabulary.matches(span) if name == spec_field.name]
                written = found or [" ".join(span.lower().split())]
            else:
                written = [normalize_value(spec_field, span, vocabulary)]
            values.extend(v for v in written if v not in values)
        labelled[spec_field.name] = values[0] if len(values) == 1 else (values or None)
    return labelled


def convert(source: Path, spec: ParseSpec, limit: int = 0) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    missing = sorted(set(spec.field_names) - set(FIELD_TO_ENTITY))
    if missing:
        raise ValueError(f"spec {spec.name!r} has fields QueryNER does not label: {missing}")
    vocabulary = spec_vocabulary(spec)
    return [label_row(row, spec, vocabulary) for row in rows]


def head_catalog(
    source: Path, spec: ParseSpec, field: str = "product_type", min_count: int = HEAD_MIN_COUNT
) -> list[str]:
    """The last words of ``field``'s labelled values in the QueryNER rows of ``source`` (written as the
    parse writes them: singular), said by at least ``min_count`` rows, as a span field's ``heads_file``."""
    vocabulary = spec_vocabulary(spec)
    counts: Counter[str] = Counter()
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        value = label_row(json.loads(line), spec, vocabulary)[field]
        values = value if isinstance(value, list) else [value]
        lasts = {match_form(v).split()[-1] for v in values if v and match_form(v)}
        counts.update(last for last in lasts if any(c.isalpha() for c in last))
    return sorted(word for word, count in counts.items() if count >= min_count)


def mention_catalog(
    source: Path, entity: str, min_share: float = MENTION_MIN_SHARE, singular: Callable[[str], str] | None = None
) -> list[str]:
    """Phrases labelled ``entity`` in the QueryNER rows of ``source`` that carry that label in at least
    ``min_share`` of the rows whose query says them, as a span field's ``mentions_file`` (sorted; one
    phrase per match form, spelled as most rows spell it). With ``singular``, a phrase is counted
    whichever number its last word is in, as a field written singular matches it."""

    def key_of(words: Sequence[str]) -> str:
        return " ".join([*words[:-1], singular(words[-1])] if singular and words else words)

    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    labelled: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = {}
    for row in rows:
        for span in dict.fromkeys(row["spans"].get(entity, [])):
            key = key_of(match_form(span).split())
            if key and len(key.split()) <= MENTION_MAX_WORDS and any(c.isalpha() for c in key):
                labelled[key] += 1
                spellings.setdefault(key, Counter())[" ".join(span.lower().split())] += 1
    said: Counter[str] = Counter()
    for row in rows:
        words = match_form(row["query"]).split()
        runs = {key_of(words[i:j]) for i in range(len(words))
                for j in range(i + 1, min(len(words), i + MENTION_MAX_WORDS) + 1)}
        said.update(run for run in runs if run in labelled)
    return sorted(spellings[key].most_common(1)[0][0] for key, count in labelled.items()
                  if count >= min_share * max(said[key], 1))
