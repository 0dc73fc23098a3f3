"""``qustream produce``: put queries (plain lines or JSON lines) on the input topic."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from schemas.settings import Settings
from streams.kafka_io import make_producer


def stable_query_id(source: str, line_number: int) -> str:
    """Same file and line → same id, so replaying a log twice yields the same ids."""
    return hashlib.blake2b(f"{source}:{line_number}".encode(), digest_size=10).hexdigest()


def lines_to_values(lines: Iterable[str], source: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) per non-empty line: JSON objects pass through (gaining a query_id), text becomes a query."""
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        query_id = stable_query_id(source, number)
        if text.lstrip()[:1] in ("{", "[", '"'):
            # A JSON line is sent as it is unless it is an object we can give an id: the worker,
            # not this tool, decides what is poison (and dead-letters it with the original bytes).
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = None
            if isinstance(payload, dict):
                payload.setdefault("query_id", query_id)
                yield str(payload["query_id"]).encode(), json.dumps(payload, ensure_ascii=False).encode("utf-8")
            else:
                yield query_id.encode(), text.encode("utf-8")
            continue
        yield query_id.encode(), json.dumps({"query": text, "query_id": query_id}, ensure_ascii=False).encode("utf-8")


async def produce_lines(settings: Settings, lines: Iterable[str], source: str, topic: str | None = None) -> int:
    producer = make_producer(settings)
    await producer.start()
    sent = 0
    try:
        pending = []
        for key, value in lines_to_values(lines, source):
            pending.append(await producer.send(topic or settings.topic_input, value, key=key))
            sent += 1
        for future in pending:
            await future
    finally:
        await producer.stop()
    return sent


def read_lines(path: str) -> Iterator[str]:
    import sys

    if path == "-":
        yield from sys.stdin
        return
    with Path(path).open(encoding="utf-8") as handle:
        yield from handle
