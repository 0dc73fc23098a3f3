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
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from pydantic import ValidationError

from schemas.spec import ParseSpec

if TYPE_CHECKING:
    from workers.engine import ParseEngine

QUALITY_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"


def default_quality_path(spec: ParseSpec) -> Path:
    """The labelled set shipped for a built-in spec: ``tests/data/quality_<spec>.jsonl``."""
    return QUALITY_DIR / f"quality_{spec.name}.jsonl"


@dataclass(frozen=True)
class QualityCase:
    query: str
    #: Per field: acceptable answers (several where the query is honestly ambiguous); () means null.
    expected: dict[str, tuple[str, ...]]


def quality_case(spec: ParseSpec, record: dict[str, Any]) -> QualityCase:
    """One labelled record as a case to score."""
    expected: dict[str, tuple[str, ...]] = {}
    for name in spec.field_names:
        value = record.get(name)
        if value is None:
            expected[name] = ()
        elif isinstance(value, list):
            expected[name] = tuple(str(v).lower() for v in value)
        else:
            expected[name] = (str(value).lower(),)
    return QualityCase(query=record["query"], expected=expected)


def load_quality(spec: ParseSpec, path: Path | None = None) -> list[QualityCase]:
    lines = (path or default_quality_path(spec)).read_text(encoding="utf-8").splitlines()
    return [quality_case(spec, json.loads(line)) for line in lines if line.strip()]


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
    if not expected:
        return predicted is None
    return predicted is not None and predicted.lower() in expected


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


def eval_command(
    spec: Annotated[str | None, typer.Option(help="Parse spec (built-in name or YAML path); default: configured.")]
    = None,
    model: Annotated[str | None, typer.Option(help="Model id or folder; default: the configured model.")] = None,
    grounding: Annotated[
        Literal["catalog", "span", "free"] | None, typer.Option(help="Grounding mode; default: configured.")
    ] = None,
    queries: Annotated[
        Path | None, typer.Option(help="Labelled JSONL (query + the spec's fields); default: the spec's shipped set.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per parse_batch call.")] = 32,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N queries (0 = all).")] = 0,
    show_errors: Annotated[bool, typer.Option(help="Print every query with a wrong field.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics here as JSON.")] = None,
) -> None:
    """Parse a labelled query set and print per-field accuracy, all-fields-right, invented values and validity.

    Example: qustream eval --spec ecommerce --json ecommerce_eval.json
    """
    from rich.console import Console
    from rich.table import Table

    from schemas.settings import Settings
    from workers.engine import build_engine

    overrides: dict[str, Any] = {}
    if spec:
        overrides["parse_spec"] = spec
    if model:
        overrides["model"] = model
    if grounding:
        overrides["grounding"] = grounding
    settings = Settings(**overrides)
    engine = build_engine(settings)
    parse_spec = engine.spec
    path = queries or default_quality_path(parse_spec)
    if not path.is_file():
        raise typer.BadParameter(f"no labelled set at {path}; pass --queries", param_hint="--queries")
    cases = load_quality(parse_spec, path)
    if limit:
        cases = cases[:limit]
    engine.warm_up()
    parses, flags, seconds = parse_cases(engine, cases, batch_size)
    metrics = score(parse_spec, cases, parses, flags)
    baseline = null_baseline(parse_spec, cases)
    console = Console()
    table = Table(title=f"spec {parse_spec.name} v{parse_spec.version} · {engine.model_id} · "
                        f"grounding={engine.grounding} · {len(cases)} queries · {seconds:.1f} s")
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
            wrong = [f for f in parse_spec.field_names if not field_correct(case.expected[f], (parse or {}).get(f))]
            if wrong:
                console.print(f"{case.query!r}: got {parse}, expected {dict(case.expected)}", markup=False)
    if json_out:
        payload = {"spec": parse_spec.ref, "model": engine.model_id, "grounding": engine.grounding,
                   "version": engine.version, "queries": str(path), "seconds": seconds,
                   "queries_per_s": len(cases) / seconds if seconds else None, "metrics": metrics,
                   "always_null": baseline}
        json_out.write_text(json.dumps(payload, indent=2))
