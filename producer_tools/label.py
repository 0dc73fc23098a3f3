"""``qustream label``: queries into labelled JSONL for ``qustream train`` (and ``qustream eval``).

Queries come from replayable logs (every format ``qustream replay`` reads, through its reader) or
from the parsed topic. Labels are either already there (log records that carry the spec's fields; a
parsed event's parse, when it was made under the active spec) or written by a teacher: any
transformers causal LM run through the constrained engine (``--model``, ``--grounding``).

Each labelled row passes the same check as training data (``workers.training.check_record``); a row
that fails is reported with where it came from and why, and left out. Queries are written as the
worker normalises them; repeats are written once. A provenance JSON beside the output says how the
labels were made: teacher model or gold, spec name, version and fingerprint, grounding, counts, time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from producer_tools.replay import BadLine, LogReader, ReplayOptions, raw_lines
from schemas.settings import Settings
from schemas.spec import ParseSpec
from workers.grammar import spec_vocabulary
from workers.normalize import normalize_query
from workers.training import BadRow, check_record

#: Skipped rows listed one by one in the provenance file; the rest are only counted.
MAX_LISTED_SKIPPED = 1000


@dataclass(frozen=True)
class Item:
    """One input query: where it came from, and the record (query plus any labels) or why it is bad."""

    where: str
    record: dict[str, Any] | None
    problem: str | None = None


@dataclass
class LabelSummary:
    read: int = 0
    written: int = 0
    repeats: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "repeats": self.repeats, "skipped": len(self.skipped),
                "skipped_rows": [{"where": w, "reason": r} for w, r in self.skipped[:MAX_LISTED_SKIPPED]]}


def log_items(files: Iterable[str], spec: ParseSpec, options: ReplayOptions) -> Iterator[Item]:
    """Queries of replayable logs; a record keeps the spec's fields the log line carries."""
    for path in files:
        reader = LogReader(path, options)
        for number, raw in enumerate(raw_lines(path), start=1):
            where = f"{path}:{number}"
            try:
                entry = reader.entry(number, raw)
            except BadLine as exc:
                yield Item(where, None, str(exc))
                continue
            if entry is not None:
                labels = {name: entry.payload[name] for name in spec.field_names if name in entry.payload}
                yield Item(where, {"query": entry.query, **labels})


def parsed_event_item(spec: ParseSpec, item: dict[str, Any]) -> Item:
    """A record of the parsed topic (as ``tail`` yields it): its query, and its parse when the event
    was made under the active spec (a parse of another contract is no label for this one)."""
    where = f"{item['topic']}[{item['partition']}]@{item['offset']}"
    value = item.get("value")
    if not isinstance(value, dict) or not isinstance(value.get("query"), str):
        return Item(where, None, "not a parsed event (no query)")
    made_under = value.get("spec") or {}
    parse = value.get("parse") if made_under.get("name") == spec.name else None
    labels = {name: parse.get(name) for name in spec.field_names} if isinstance(parse, dict) else {}
    return Item(where, {"query": value["query"], **labels})


def label(
    items: Iterable[Item],
    spec: ParseSpec,
    out: Path,
    *,
    teacher: Any | None = None,
    batch_size: int = 32,
    limit: int = 0,
    progress: Any = None,
) -> LabelSummary:
    """Write the labelled JSONL; ``teacher`` (a ParseEngine) labels every query, else the items' own labels."""
    vocabulary = spec_vocabulary(spec)
    summary = LabelSummary()
    seen: set[str] = set()
    pending: list[tuple[str, dict[str, Any]]] = []

    def write(rows: list[tuple[str, dict[str, Any]]], handle: Any) -> None:
        if teacher is not None and rows:
            results = teacher.parse_batch([record["query"] for _, record in rows])
            rows = [(where, {"query": record["query"], **result.parse})
                    for (where, record), result in zip(rows, results, strict=True)]
        for where, record in rows:
            if teacher is None and not set(record) & set(spec.field_names):
                summary.skipped.append((where, "no labels (none of the spec's fields); pass --model to label "
                                               "with a teacher"))
                continue
            try:
                checked = check_record(spec, vocabulary, record)
            except BadRow as exc:
                summary.skipped.append((where, str(exc)))
                continue
            handle.write(json.dumps(checked, ensure_ascii=False) + "\n")
            summary.written += 1
        if progress is not None:
            progress(len(rows))

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for item in items:
            if limit and summary.read >= limit:
                break
            summary.read += 1
            if item.record is None:
                summary.skipped.append((item.where, item.problem or "unreadable"))
                continue
            key = normalize_query(item.record["query"])
            if key in seen:
                summary.repeats += 1
                continue
            seen.add(key)
            pending.append((item.where, item.record))
            if len(pending) >= batch_size:
                write(pending, handle)
                pending = []
        write(pending, handle)
    return summary


def provenance_path(out: Path) -> Path:
    """``labels.jsonl`` -> ``labels.provenance.json``, beside it."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".provenance.json")


def write_provenance(
    out: Path, spec: ParseSpec, settings: Settings, source: dict[str, Any], teacher: Any | None,
    summary: LabelSummary, started: datetime, seconds: float,
) -> Path:
    payload = {
        "output": str(out),
        "labels": "teacher" if teacher is not None else "gold",
        "teacher": None if teacher is None else {"model": teacher.model_id, "grounding": teacher.grounding,
                                                  "engine_version": teacher.version},
        "spec": {**spec.ref, "fingerprint": spec.fingerprint},
        "grounding": teacher.grounding if teacher is not None else settings.grounding,
        "source": source,
        "count": summary.written,
        **summary.as_dict(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    path = provenance_path(out)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    return path


def now() -> tuple[datetime, float]:
    return datetime.now(UTC), time.perf_counter()
