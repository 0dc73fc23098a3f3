"""``qustream tail``: follow a topic (or Redis stream) as JSON lines or a live table."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from producer_tools.transport import Record, open_source, resolve_name
from schemas.events import DeadLetterReason
from schemas.settings import Settings

TOPIC_ALIASES = ("input", "parsed", "metrics", "dlq")


def resolve_topic(settings: Settings, name: str) -> str:
    return resolve_name(settings, name)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def record_to_json(record: Record, *, dead_letter: bool = False) -> dict[str, Any]:
    value: Any
    try:
        value = json.loads(record.value) if record.value is not None else None
    except ValueError:
        value = record.value.decode("utf-8", "replace") if record.value is not None else None
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp_ms,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
        "value": value,
    }
    # A key or value that is not UTF-8 (a dead letter's original bytes, say) is shown with replacement
    # characters, and given whole in base64 as well, so that the bytes can be recovered from the output.
    for name, raw in (("key", record.key), ("value", record.value)):
        if raw is not None and not _is_utf8(raw):
            out[f"{name}_base64"] = base64.b64encode(raw).decode("ascii")
    if record.headers:
        out["headers"] = {key: raw.decode("utf-8", "replace") for key, raw in record.headers.items()}
    if dead_letter:
        out["reason"] = DeadLetterReason.from_headers(dict(record.headers)).model_dump()
    return out


async def follow(
    settings: Settings,
    name: str,
    *,
    from_beginning: bool = False,
    max_messages: int | None = None,
    idle_timeout_s: float | None = None,
    group: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield records of ``name`` as dicts; stops after ``max_messages`` or ``idle_timeout_s`` of silence.

    With ``group``, starts at the group's checkpoint and commits what was yielded, so the next
    ``tail --group`` goes on from there.
    """
    target = resolve_name(settings, name)
    dead_letter = target in (settings.topic_dlq, settings.stream_dlq)
    async with open_source(settings, [target], from_end=not from_beginning, group=group) as source:
        seen = 0
        last = time.monotonic()
        while max_messages is None or seen < max_messages:
            records = await source.poll(timeout_ms=200)
            if not records:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    return
                continue
            last = time.monotonic()
            done: list[Record] = []
            for record in records:
                yield record_to_json(record, dead_letter=dead_letter)
                done.append(record)
                seen += 1
                if max_messages is not None and seen >= max_messages:
                    break
            await source.commit(done)


def table_row(kind: str, item: dict[str, Any], fields: Sequence[str] = ()) -> list[str]:
    """Columns of the live table for one record; ``kind`` is parsed, metrics, dlq or other, and
    ``fields`` the parse spec's fields (the parsed topic's columns)."""
    value = item.get("value")
    if kind == "parsed" and isinstance(value, dict):
        parse = value.get("parse") or {}
        spec = value.get("spec") or {}
        return [str(value.get("query_id", ""))[:20], str(value.get("query", ""))[:40],
                *(str(parse.get(f) or "") for f in fields),
                "yes" if value.get("cached") else "no", f"{spec.get('name', '')} {spec.get('version', '')}".strip()]
    if kind == "metrics" and isinstance(value, dict):
        return [str(value.get(f, "")) for f in ("worker_id", "size", "parsed", "cached", "dead_lettered",
                                                "cache_hits", "inference_ms", "batch_ms")]
    if kind == "dlq":
        reason = item.get("reason") or {}
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return [str(item.get("offset")), str(reason.get("stage", "")), str(reason.get("error_class", "")),
                str(reason.get("attempts", "")), str(reason.get("message", ""))[:50], shown[:40]]
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return [str(item.get("partition")), str(item.get("offset")), str(item.get("key") or ""), shown[:80]]


def table_columns(kind: str, fields: Sequence[str] = ()) -> list[str]:
    if kind == "parsed":
        return ["query_id", "query", *fields, "cached", "spec"]
    return TABLE_COLUMNS[kind]


TABLE_COLUMNS = {
    "metrics": ["worker", "size", "parsed", "cached", "dead", "cache_hits", "inference_ms", "batch_ms"],
    "dlq": ["offset", "stage", "class", "attempts", "message", "value"],
    "other": ["partition", "offset", "key", "value"],
}


def table_kind(settings: Settings, name: str) -> str:
    target = resolve_name(settings, name)
    for kind in ("parsed", "metrics", "dlq"):
        if target == resolve_name(settings, kind):
            return kind
    return "other"
