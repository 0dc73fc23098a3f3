"""Field-level quality of parses against a labelled query set (``qustream eval``)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError

from schemas.events import PARSE_FIELDS, QueryParse

DEFAULT_QUALITY_PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "quality.jsonl"
#: The fields of the headline "all three right" rate; style is reported but is rarer and fuzzier.
CORE_FIELDS: tuple[str, ...] = ("item_type", "material", "color")


@dataclass(frozen=True)
class QualityCase:
    query: str
    #: Per field: acceptable answers (several where the query is honestly ambiguous); () means null.
    expected: dict[str, tuple[str, ...]]


def load_quality(path: Path | None = None) -> list[QualityCase]:
    cases: list[QualityCase] = []
    for line in (path or DEFAULT_QUALITY_PATH).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        expected: dict[str, tuple[str, ...]] = {}
        for name in PARSE_FIELDS:
            value = record.get(name)
            if value is None:
                expected[name] = ()
            elif isinstance(value, list):
                expected[name] = tuple(str(v).lower() for v in value)
            else:
                expected[name] = (str(value).lower(),)
        cases.append(QualityCase(query=record["query"], expected=expected))
    return cases


def field_correct(expected: tuple[str, ...], predicted: str | None) -> bool:
    if not expected:
        return predicted is None
    return predicted is not None and predicted.lower() in expected


def schema_valid(parse: Any) -> bool:
    try:
        QueryParse.model_validate(parse)
    except ValidationError:
        return False
    return isinstance(parse, dict) and set(parse) == set(PARSE_FIELDS)


def score(
    cases: Sequence[QualityCase],
    parses: Sequence[dict[str, str | None] | None],
    ungrounded: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Accuracy per field, all-three-right, schema-valid, invented-for-absent and ungrounded rates.

    A ``None`` parse counts as invalid and wrong on every field.
    """
    n = len(cases)
    if n == 0:
        return {}
    correct = dict.fromkeys(PARSE_FIELDS, 0)
    all_three = valid = absent = invented = values = flagged = 0
    for index, (case, parse) in enumerate(zip(cases, parses, strict=True)):
        ok = parse is not None and schema_valid(parse)
        valid += ok
        got: dict[str, str | None] = parse if (ok and parse is not None) else {}
        for name in PARSE_FIELDS:
            correct[name] += field_correct(case.expected[name], got.get(name)) if ok else 0
            if not case.expected[name]:
                absent += 1
                invented += ok and got.get(name) is not None
            if got.get(name) is not None:
                values += 1
        all_three += ok and all(field_correct(case.expected[f], got.get(f)) for f in CORE_FIELDS)
        if ungrounded is not None:
            flagged += len(ungrounded[index])
    metrics = {f"{name}_acc": correct[name] / n for name in PARSE_FIELDS}
    metrics["all_three_acc"] = all_three / n
    metrics["schema_valid"] = valid / n
    metrics["invented_absent"] = invented / absent if absent else 0.0
    metrics["ungrounded"] = flagged / values if values else 0.0
    metrics["n"] = float(n)
    return metrics


def null_baseline(cases: Sequence[QualityCase]) -> dict[str, float]:
    """The trivial 'always null' answer for material and colour (what a parser must beat)."""
    n = len(cases) or 1
    return {
        "material_acc": sum(not c.expected["material"] for c in cases) / n,
        "color_acc": sum(not c.expected["color"] for c in cases) / n,
        "style_acc": sum(not c.expected["style"] for c in cases) / n,
    }


def eval_command(
    model: Annotated[str | None, typer.Option(help="Model id or folder; default: the configured model.")] = None,
    grounding: Annotated[
        Literal["catalog", "span", "free"] | None, typer.Option(help="Grounding mode; default: configured.")
    ] = None,
    queries: Annotated[Path, typer.Option(help="Labelled JSONL (query + expected fields).")] = DEFAULT_QUALITY_PATH,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per parse_batch call.")] = 32,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N queries (0 = all).")] = 0,
    show_errors: Annotated[bool, typer.Option(help="Print every query with a wrong field.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics here as JSON.")] = None,
) -> None:
    """Parse a labelled query set and print field-level accuracy, all-three-right and validity rates."""
    from rich.console import Console
    from rich.table import Table

    from schemas.settings import Settings
    from workers.engine import build_engine

    overrides: dict[str, Any] = {}
    if model:
        overrides["model"] = model
    if grounding:
        overrides["grounding"] = grounding
    settings = Settings(**overrides)
    cases = load_quality(queries)
    if limit:
        cases = cases[:limit]
    engine = build_engine(settings)
    engine.warm_up()
    started = time.perf_counter()
    parses: list[dict[str, str | None] | None] = []
    flags: list[list[str]] = []
    for start in range(0, len(cases), batch_size):
        chunk = [c.query for c in cases[start : start + batch_size]]
        for result in engine.parse_batch(chunk):
            parses.append(result.parse)
            flags.append(result.ungrounded)
    seconds = time.perf_counter() - started
    metrics = score(cases, parses, flags)
    baseline = null_baseline(cases)
    console = Console()
    table = Table(title=f"{engine.model_id} · grounding={engine.grounding} · {len(cases)} queries · {seconds:.1f} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("always-null", justify="right")
    for key, value in metrics.items():
        if key == "n":
            continue
        table.add_row(key, f"{value:.1%}", f"{baseline[key]:.1%}" if key in baseline else "")
    console.print(table)
    if show_errors:
        for case, parse in zip(cases, parses, strict=True):
            wrong = [f for f in PARSE_FIELDS if not field_correct(case.expected[f], (parse or {}).get(f))]
            if wrong:
                console.print(f"{case.query!r}: got {parse}, expected {dict(case.expected)}", markup=False)
    if json_out:
        payload = {"model": engine.model_id, "grounding": engine.grounding, "version": engine.version,
                   "seconds": seconds, "metrics": metrics, "always_null": baseline}
        json_out.write_text(json.dumps(payload, indent=2))
