"""``qustream label``: queries into labelled JSONL for ``qustream train`` (and ``qustream eval``).

Queries come from replayable logs (every format ``qustream replay`` reads, through its reader) or
from the parsed topic. Labels are either already there (log records that carry the spec's fields; a
parsed event's parse, when it was made under the active spec) or written by a teacher: any
transformers causal LM run through the constrained engine (``--model``, ``--grounding``).

Each labelled row passes the same check as training data (``workers.training.check_record``); a row
that fails is reported with where it came from and why, and left out. Queries are written as the
worker normalises them; repeats are written once (the first copy; a gold repeat with other
labels is reported). A provenance JSON beside the output says how the
labels were made: teacher model or gold, spec name, version and fingerprint, grounding, counts, time.
"""

from __future__ import annotations

import difflib
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
from workers.evaluation import label_values
from workers.grammar import spec_vocabulary, written_form
from workers.normalize import normalize_query
from workers.training import BadRow, check_record

#: Skipped rows listed one by one in the provenance file; the rest are only counted.
MAX_LISTED_SKIPPED = 1000
#: How alike (``difflib`` ratio) a labelled row's unknown key and a field it lacks must be to be taken for
#: a misspelling of it: "prat"/"part" and "colour"/"color" are, "style"/"size" and "notes"/"size" are not.
_MISSPELT_CUTOFF = 0.75


@dataclass(frozen=True)
class Item:
    """One input query: where it came from, and the record (query plus any labels) or why it is bad."""

    where: str
    record: dict[str, Any] | None
    problem: str | None = None
    #: Spec fields the labelled row left out (taken as null), and its keys left out as the log's metadata.
    unlabelled: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


@dataclass
class LabelSummary:
    read: int = 0
    written: int = 0
    repeats: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Repeats whose labels differ from those of the copy kept (the first): (where, where the kept copy is).
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    #: Gold rows that left fields out, which were written as null: (where, the fields).
    unlabelled: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    #: Keys of labelled rows left out as the log's metadata, with how many rows had each.
    ignored_keys: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "repeats": self.repeats,
                "conflicting_repeats": len(self.conflicts),
                "conflicting_rows": [{"where": w, "kept": k} for w, k in self.conflicts[:MAX_LISTED_SKIPPED]],
                "rows_with_fields_left_out": len(self.unlabelled),
                "fields_left_out": [{"where": w, "fields": list(f)} for w, f in self.unlabelled[:MAX_LISTED_SKIPPED]],
                "ignored_keys": self.ignored_keys,
                "skipped": len(self.skipped),
                "skipped_rows": [{"where": w, "reason": r} for w, r in self.skipped[:MAX_LISTED_SKIPPED]]}


@dataclass(frozen=True)
class Compared:
    """A kept record's labels as ``label`` compares repeats with them."""

    form: Any


def log_items(files: Iterable[str], spec: ParseSpec, options: ReplayOptions) -> Iterator[Item]:
    """Queries of replayable logs. A line that carries any of the spec's fields is a labelled row; a line
    with none of them is a query without labels. A spec field is read from the line as written, never
    from the reader's defaults or derived values, even where its name is one of the reader's keys
    (``source``, ``id``, ``ts``...). A labelled row's other keys are the log's metadata (``user_id``,
    ``clicks``...) and are left out, except one spelt like a field the row lacks (``prat`` where ``part``
    is missing, ``colour`` for ``color``): that row is skipped, since its label would otherwise be taken
    as null. A field the row leaves out is null (the labelled-JSONL rule), and the item says so."""
    fields = spec.field_names
    for path in files:
        reader = LogReader(path, options)
        own = reader.own_keys - set(fields)
        for number, raw in enumerate(raw_lines(path), start=1):
            where = f"{path}:{number}"
            try:
                entry = reader.entry(number, raw)
            except BadLine as exc:
                yield Item(where, None, str(exc))
                continue
            if entry is None:
                continue
            if set(fields).isdisjoint(entry.row):
                yield Item(where, {"query": entry.query})
                continue
            missing = [name for name in fields if name not in entry.row]
            extra = [key for key in entry.row if key not in own and key not in fields]
            misspelt = {key: close[0] for key in extra
                        if (close := difflib.get_close_matches(key.lower(), missing, n=1, cutoff=_MISSPELT_CUTOFF))}
            if misspelt:
                guesses = ", ".join(f"{key!r} (the spec's {field!r}?)" for key, field in misspelt.items())
                yield Item(where, None, f"unknown fields {guesses}; the spec {spec.name!r} has {list(fields)}")
                continue
            labels = {name: entry.row.get(name) for name in fields}
            yield Item(where, {"query": entry.query, **labels}, unlabelled=tuple(missing), ignored=tuple(extra))


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
    """Write the labelled JSONL; ``teacher`` (a ParseEngine) labels every query, else the items' own labels.

    Skipped rows are listed in input order. Without a teacher, a repeat whose labels differ from the
    copy kept (the first) is listed as a conflict."""
    vocabulary = spec_vocabulary(spec)
    summary = LabelSummary()
    #: normalised query -> where the kept copy is, and its record (its labels as compared once repeated)
    kept: dict[str, tuple[str, Any]] = {}
    pending: list[tuple[int, str, dict[str, Any]]] = []
    skipped: list[tuple[int, str, str]] = []  # (read order, where, reason)

    def labels_form(record: dict[str, Any]) -> Any:
        """A gold record's labels in a form where equal labels compare equal (as eval scores them); a
        record that fails the check, its keys as written."""
        try:
            checked = check_record(spec, vocabulary, record)
        except BadRow:
            return ("as written", json.dumps({k: v for k, v in record.items() if k != "query"}, sort_keys=True,
                                              ensure_ascii=False, default=str))
        return {f.name: frozenset(written_form(f, value, vocabulary) for value in label_values(checked[f.name]))
                for f in spec.fields}

    def write(rows: list[tuple[int, str, dict[str, Any]]], handle: Any) -> None:
        if teacher is not None and rows:
            results = teacher.parse_batch([record["query"] for _, _, record in rows])
            rows = [(order, where, {"query": record["query"], **result.parse})
                    for (order, where, record), result in zip(rows, results, strict=True)]
        for order, where, record in rows:
            if teacher is None and not set(record) & set(spec.field_names):
                skipped.append((order, where, "no labels (none of the spec's fields); pass --model to label "
                                              "with a teacher"))
                continue
            try:
                checked = check_record(spec, vocabulary, record)
            except BadRow as exc:
                skipped.append((order, where, str(exc)))
                continue
            handle.write(json.dumps(checked, ensure_ascii=False) + "\n")
            summary.written += 1
        if progress is not None:
            progress(len(rows))

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("w", encoding="utf-8") as handle:
            for order, item in enumerate(items):
                if limit and summary.read >= limit:
                    break
                summary.read += 1
                if item.record is None:
                    skipped.append((order, item.where, item.problem or "unreadable"))
                    continue
                for key in item.ignored:
                    summary.ignored_keys[key] = summary.ignored_keys.get(key, 0) + 1
                key = normalize_query(item.record["query"])
                if key in kept:
                    summary.repeats += 1
                    first = kept[key]
                    if teacher is None:  # a teacher labels the query once, whatever the log says
                        if not isinstance(first[1], Compared):
                            first = kept[key] = (first[0], Compared(labels_form(first[1])))
                        if labels_form(item.record) != first[1].form:
                            summary.conflicts.append((item.where, first[0]))
                    continue
                kept[key] = (item.where, item.record if teacher is None else None)
                if item.unlabelled and teacher is None:
                    summary.unlabelled.append((item.where, item.unlabelled))
                pending.append((order, item.where, item.record))
                if len(pending) >= batch_size:
                    write(pending, handle)
                    pending = []
            write(pending, handle)
    finally:
        summary.skipped = [(where, reason) for _, where, reason in sorted(skipped, key=lambda row: row[0])]
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
