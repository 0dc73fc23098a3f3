"""``qustream tail``: follow a topic as JSON lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from schemas.settings import Settings
from streams.kafka_io import assign_all, make_consumer

TOPIC_ALIASES = ("input", "parsed", "metrics", "dlq")


def resolve_topic(settings: Settings, name: str) -> str:
    aliases = {
        "input": settings.topic_input,
        "raw": settings.topic_input,
        "parsed": settings.topic_parsed,
        "metrics": settings.topic_metrics,
        "dlq": settings.topic_dlq,
    }
    return aliases.get(name, name)


def record_to_json(record: Any) -> dict[str, Any]:
    value: Any
    try:
        value = json.loads(record.value) if record.value is not None else None
    except ValueError:
        value = record.value.decode("utf-8", "replace")
    headers = {key: raw.decode("utf-8", "replace") for key, raw in (record.headers or ())}
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
        "value": value,
    }
    if headers:
        out["headers"] = headers
    return out


async def follow(
    settings: Settings,
    topic: str,
    *,
    from_beginning: bool = False,
    max_messages: int | None = None,
    idle_timeout_s: float | None = None,
    group: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield records of ``topic`` as dicts; stops after ``max_messages`` or ``idle_timeout_s`` of silence."""
    import time

    consumer = make_consumer(settings, group_id=group,
                             auto_offset_reset="earliest" if from_beginning else "latest")
    await consumer.start()
    try:
        if group is None:
            await assign_all(consumer, [topic], from_end=not from_beginning)
        else:
            consumer.subscribe([topic])
        seen = 0
        last = time.monotonic()
        while max_messages is None or seen < max_messages:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            if not batches:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    return
                continue
            last = time.monotonic()
            for records in batches.values():
                for record in records:
                    yield record_to_json(record)
                    seen += 1
                    if max_messages is not None and seen >= max_messages:
                        return
            if group is not None:
                await consumer.commit()
    finally:
        await consumer.stop()
