"""Test helpers: real local services, a worker in a subprocess, and topic readers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schemas.settings import Settings
from schemas.spec import load_spec
from streams.kafka_io import assign_all, make_consumer, make_producer
from streams.local_stack import WorkerProcess
from streams.topics import ensure_topics
from workers.cache import CachedParse, ParseCache, redis_client
from workers.engine import version_for
from workers.normalize import normalize_query

__all__ = ["AUTOPARTS_QUERIES", "ECOMMERCE_QUERIES", "POISON", "REPO", "WorkerProcess", "read_topic", "run",
           "write_autoparts_spec"]

#: The issue's five poison messages: name → (value bytes, expected dead-letter stage); both transports use them.
POISON: dict[str, tuple[bytes, str]] = {
    "invalid-json": (b'{"query": "oak desk"', "decode"),
    "no-query": (b'{"q": "sofa"}', "validate"),
    "empty-query": (b'{"query": "   "}', "validate"),
    "invalid-utf8": (b"\xff\xfe red sofa \xc3\x28", "decode"),
    "over-long": (json.dumps({"query": "sofa " * 200}).encode(), "validate"),
}

REPO = Path(__file__).resolve().parent.parent

#: A third, made-up domain that no built-in spec covers: a span, a vocabulary kept in its own file,
#: and a category the model chooses from a closed set that need not occur in the query.
AUTOPARTS_SPEC = """
name: autoparts
version: "2026.12"
description: car and truck parts
fields:
  - name: part
    kind: span
    description: The part wanted, e.g. 'brake pad'.
    normalize: [lowercase, singular]
  - name: position
    kind: vocabulary
    description: Where on the vehicle the part goes.
    values_file: positions.txt
  - name: system
    kind: category
    description: The vehicle system the part belongs to.
    values: [brakes, engine, suspension, electrical, exhaust, cooling, body]
examples:
  - query: front brake pads for honda civic
    parse: {part: brake pad, position: front, system: brakes}
  - query: rear shock absorbers
    parse: {part: shock absorber, position: rear, system: suspension}
  - query: radiator hose
    parse: {part: radiator hose, system: cooling}
"""
AUTOPARTS_POSITIONS = "front, frt\nrear, back\nleft, driver side, lh\nright, passenger side, rh\n"
AUTOPARTS_QUERIES = ["front brake rotors", "rear wiper blade", "alternator for ford f150", "left headlight assembly",
                     "catalytic converter", "water pump", "rear brake pads", "front strut mount"]

ECOMMERCE_QUERIES = ["armani exchange white belts", "womens high waisted workout shorts", "samsung 55 inch tv",
                     "kids rain boots size 12", "stainless steel water bottle", "mens leather wallet"]


def write_autoparts_spec(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "positions.txt").write_text(AUTOPARTS_POSITIONS)
    path = folder / "autoparts.yaml"
    path.write_text(AUTOPARTS_SPEC)
    return path


async def cache_parses(settings: Settings, queries: list[str]) -> None:
    """The cache answers each of ``queries`` (a furniture parse) for a worker of ``settings``."""
    cache = ParseCache(redis_client(settings.redis_url.get_secret_value()), spec=load_spec(settings.parse_spec),
                       version=version_for(settings), ttl_s=600, prefix=settings.cache_prefix)
    parse = {"item_type": None, "material": "wood", "color": None, "style": None}
    try:
        assert await cache.set_many({normalize_query(q): CachedParse(dict(parse), []) for q in queries})
    finally:
        await cache.close()


async def produce_in_order(settings: Settings, values: list[bytes]) -> None:
    """The input topic created, then ``values`` sent one after another to its partition 0."""
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(settings.topic_input, value, partition=0)
    finally:
        await producer.stop()


async def read_topic(settings: Settings, topic: str, *, until: int, timeout_s: float,
                     complete: Callable[[list[Any]], bool] | None = None) -> list[Any]:
    """Every record of ``topic`` from the beginning, until ``until`` records (or what was read is
    ``complete``: at-least-once delivery may repeat records) or the timeout."""
    if complete is None:
        def complete(records: list[Any]) -> bool:
            return len(records) >= until

    consumer = make_consumer(settings)
    await consumer.start()
    records: list[Any] = []
    try:
        await assign_all(consumer, [topic], from_end=False)
        deadline = time.monotonic() + timeout_s
        while not complete(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=250)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def run(coro: Any) -> Any:
    return asyncio.run(coro)
