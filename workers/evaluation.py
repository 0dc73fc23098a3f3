"""Field-level quality of parses against a labelled query set (``qustream eval``).

Labelled data is JSONL: ``query`` plus the spec's field names, each a value, a list of acceptable
values, or null (a missing field counts as null). The same format feeds training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from schemas.spec import ParseSpec, match_form
from workers.grammar import spec_vocabulary, written_form
from workers.normalize import normalize_query

if TYPE_CHECKING:
    from workers.engine import ParseEngine

QUALITY_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
#: Bad lines a refused labelled set lists one by one (as ``qustream train`` and ``label`` list theirs).
MAX_LISTED_PROBLEMS = 50


class LabelledSetError(ValueError):
    """A labelled set that cannot be scored; the message names the file and, for a bad row, its line."""


def default_quality_path(spec: ParseSpec) -> Path:
    """The labelled set shipped for a built-in spec: ``tests/data/quality_<spec>.jsonl``."""
    return QUALITY_DIR / f"quality_{spec.name}.jsonl"


@dataclass(frozen=True)
class QualityCase:
    query: str
    #: Per field: acceptable answers (several where the query is honestly ambiguous) as ``written_form``
    #: writes them; () means null.
    expected: dict[str, tuple[str, ...]]


def quality_case(spec: ParseSpec, record: dict[str, Any]) -> QualityCase:
    """One labelled record as a case to score: each label in the form the parse writes it (``written_form``:
    a vocabulary synonym as its canonical value, a span as the field normalises it, case and punctuation
    aside), the form ``qustream train`` teaches it in, so a label written "back" or "Radiator Hoses" is the
    parse's "rear" or "radiator hose"."""
    vocabulary = spec_vocabulary(spec)
    expected: dict[str, tuple[str, ...]] = {}
    for spec_field in spec.fields:
        labels = label_values(record.get(spec_field.name))
        expected[spec_field.name] = tuple(dict.fromkeys(written_form(spec_field, label, vocabulary)
                                                        for label in labels))
    return QualityCase(query=record["query"], expected=expected)


def labelled_row_problem(spec: ParseSpec, record: Any) -> str | None:
    """Why ``record`` is not a labelled row of ``spec`` (an object with a non-empty ``query`` and, of the
    spec's fields only, each a value, a list of acceptable values, or null); None when it is one.

    The row's shape, and each ``category`` label one of the field's closed set: ``qustream train`` checks it
    so too (``workers.training.check_record``). Unlike training, a span or vocabulary label outside the
    spec's vocabulary or grammar is kept and scored (a value no grounding can write counts as a miss: the
    set measures the parser, not the labels). A category admits null or one label of its set in every
    grounding, so a label outside it can never be right: it is a typo in the labels, and scoring it as a
    miss would lower the accuracy unnoticed."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    query = record.get("query")
    if not isinstance(query, str) or not normalize_query(query):
        return "no 'query' (a non-empty string)"
    unknown = sorted(set(record) - {"query", *spec.field_names})
    if unknown:
        # A misspelt field would otherwise be scored as an expected null.
        return f"unknown fields {unknown}; the spec {spec.name!r} has {list(spec.field_names)}"
    for name in spec.field_names:
        value = record.get(name)
        if value is not None and not label_values(value):
            return f"field {name!r}: expected a value, a list of acceptable values, or null; got {value!r}"
    for spec_field in spec.fields:
        if spec_field.kind == "category":
            labels = {v.lower() for v in spec_field.canonical_values}
            for label in label_values(record.get(spec_field.name)):
                # Compared as ``field_correct`` compares it with the parse (which writes canonical labels).
                if label.lower() not in labels:
                    return f"field {spec_field.name!r}: {label!r} is not one of {spec_field.canonical_values}"
    return None


def label_values(value: Any) -> list[str]:
    """A field's labels as a list: null is none, a value is one; [] where the shape is wrong (a
    ``labelled_row_problem``)."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return values if all(isinstance(v, str) and v.strip() for v in values) else []


def load_quality(spec: ParseSpec, path: Path | None = None) -> list[QualityCase]:
    """The cases of a labelled JSONL file (default: the spec's shipped set).

    Raises ``LabelledSetError`` listing the bad lines as ``FILE:LINE: reason``, one a line (the first
    ``MAX_LISTED_PROBLEMS``, then how many more), or a file that holds no labelled query: a score over
    the rows that happened to parse would be a score of another set."""
    path = path or default_quality_path(spec)
    cases: list[QualityCase] = []
    problems: list[str] = []
    try:
        # Lines as ``qustream train`` numbers them: split at newlines only, not at U+2028 inside a query.
        with path.open(encoding="utf-8", errors="strict") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    # Without its newline: JSON cut short is then reported at its own column, not at line 2.
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    problems.append(f"{path}:{number}: invalid JSON: {exc.msg} at column {exc.colno}")
                    continue
                problem = labelled_row_problem(spec, record)
                if problem is None:
                    cases.append(quality_case(spec, record))
                else:
                    problems.append(f"{path}:{number}: {problem}")
    except UnicodeDecodeError as exc:
        raise LabelledSetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        others = len(problems) - len(listed)
        more = [f"... and {others} more bad line{'s' if others > 1 else ''}"] if others else []
        raise LabelledSetError("\n".join([*listed, *more]))
    if not cases:
        raise LabelledSetError(f"{path}: no labelled queries")
    return cases


def parse_cases(
    engine: ParseEngine, cases: Sequence[QualityCase], batch_size: int = 32
) -> tuple[list[dict[str, str | None] | None], list[list[str]], float]:
    """The engine's parses of the cases' queries, their ungrounded flags, and the seconds it took."""
    started = time.perf_counter()
    parses: list[dict[str, str | None] | None] = []
    flags: list[list[str]] = []
    for start in range(0, len(cases), batch_size):
        chunk = [c.query for c in cases[start : start + batch_size]]
        for result in engine.parse_batch(chunk):
            parses.append(result.parse)
            flags.append(result.ungrounded)
    return parses, flags, time.perf_counter() - started


def field_correct(expected: tuple[str, ...], predicted: str | None) -> bool:
    """Whether a parse's value (as the parse writes it) is one of a case's ``expected`` labels, punctuation
    and case aside; null is right only where the label is null."""
    if not expected:
        return predicted is None
    return predicted is not None and match_form(predicted) in expected


def schema_valid(spec: ParseSpec, parse: Any) -> bool:
    try:
        spec.parse_model.model_validate(parse)
    except ValidationError:
        return False
    return isinstance(parse, dict) and set(parse) == set(spec.field_names)


def score(
    spec: ParseSpec,
    cases: Sequence[QualityCase],
    parses: Sequence[dict[str, str | None] | None],
    ungrounded: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Accuracy per field, all-fields-right (and core-fields-right where the spec names core fields),
    schema-valid, invented-for-absent and ungrounded rates.

    A ``None`` parse counts as invalid and wrong on every field.
    """
    n = len(cases)
    if n == 0:
        return {}
    fields = spec.field_names
    core = spec.headline_fields
    correct = dict.fromkeys(fields, 0)
    all_right = core_right = valid = absent = invented = values = flagged = 0
    for index, (case, parse) in enumerate(zip(cases, parses, strict=True)):
        ok = parse is not None and schema_valid(spec, parse)
        valid += ok
        got: dict[str, str | None] = parse if (ok and parse is not None) else {}
        right = {name: ok and field_correct(case.expected[name], got.get(name)) for name in fields}
        for name in fields:
            correct[name] += right[name]
            if not case.expected[name]:
                absent += 1
                invented += ok and got.get(name) is not None
            if got.get(name) is not None:
                values += 1
        all_right += all(right.values())
        core_right += all(right[name] for name in core)
        if ungrounded is not None:
            flagged += len(ungrounded[index])
    metrics = {f"{name}_acc": correct[name] / n for name in fields}
    metrics["all_fields_acc"] = all_right / n
    if core != fields:
        metrics["core_fields_acc"] = core_right / n
    metrics["schema_valid"] = valid / n
    metrics["invented_absent"] = invented / absent if absent else 0.0
    metrics["ungrounded"] = flagged / values if values else 0.0
    metrics["n"] = float(n)
    return metrics


def null_baseline(spec: ParseSpec, cases: Sequence[QualityCase]) -> dict[str, float]:
    """The trivial 'always null' answer per field (what a parser must beat)."""
    n = len(cases) or 1
    return {f"{name}_acc": sum(not c.expected[name] for c in cases) / n for name in spec.field_names}
