"""Test helpers: real local services, a worker in a subprocess, and topic readers."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from schemas.settings import Settings
from streams.kafka_io import assign_all, make_consumer
from streams.local_stack import WorkerProcess

__all__ = ["POISON", "REPO", "WorkerProcess", "read_topic", "run"]

#: The issue's five poison messages: name → (value bytes, expected dead-letter stage); both transports use them.
POISON: dict[str, tuple[bytes, str]] = {
    "invalid-json": (b'{"query": "oak desk"', "decode"),
    "no-query": (b'{"q": "sofa"}', "validate"),
    "empty-query": (b'{"query": "   "}', "validate"),
    "invalid-utf8": (b"\xff\xfe red sofa \xc3\x28", "decode"),
    "over-long": (json.dumps({"query": "sofa " * 200}).encode(), "validate"),
}

REPO = Path(__file__).resolve().parent.parent


async def read_topic(settings: Settings, topic: str, *, until: int, timeout_s: float) -> list[Any]:
    """Every record of ``topic`` from the beginning, until ``until`` records or the timeout."""
    consumer = make_consumer(settings)
    await consumer.start()
    records: list[Any] = []
    try:
        await assign_all(consumer, [topic], from_end=False)
        deadline = time.monotonic() + timeout_s
        while len(records) < until and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=250)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def run(coro: Any) -> Any:
    return asyncio.run(coro)
