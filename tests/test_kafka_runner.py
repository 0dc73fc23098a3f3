"""The default Kafka runner (``streams.kafka_runner``) on the real broker: where its producer
batches put records, and partitions moving between two workers without losing a message."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from schemas.settings import Settings
from streams.kafka_io import assign_all, make_consumer, make_producer
from streams.kafka_runner import BatchPublisher
from streams.local_stack import free_port
from streams.topics import ensure_topics
from tests.support import WorkerProcess, cache_parses, read_topic, run
from workers.core_step import OutboundRecord

pytestmark = pytest.mark.e2e


async def test_publisher_puts_records_where_producer_send_would(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(partitions=4)
    topic = settings.topic_parsed
    await ensure_topics(settings, [topic])
    producer = make_producer(settings)  # the default 16 KiB batches, so the oversized path is taken too
    await producer.start()
    keyed = [OutboundRecord(f"query-{i}".encode(), json.dumps({"n": i}).encode()) for i in range(300)]
    oversized = OutboundRecord(b"query-big", b"x" * 40_000)
    keyless = [OutboundRecord(None, b"metrics-%d" % i) for i in range(10)]
    try:
        await BatchPublisher(producer).publish({topic: [*keyed, oversized, *keyless]})
    finally:
        await producer.stop()

    records = await read_topic(settings, topic, until=len(keyed) + 1 + len(keyless), timeout_s=30)
    assert len(records) == len(keyed) + 1 + len(keyless)
    partitioner, partitions = DefaultPartitioner(), [0, 1, 2, 3]
    for record in records:
        if record.key is not None:
            assert record.partition == partitioner(record.key, partitions, partitions), record.key
    # Per partition, records keep the order they were handed over in.
    for partition in partitions:
        numbers = [json.loads(r.value)["n"] for r in records if r.partition == partition and r.key != b"query-big"
                   and r.key is not None]
        assert numbers == sorted(numbers)
    assert {r.value for r in records if r.key is None} == {record.value for record in keyless}
    assert next(r for r in records if r.key == b"query-big").value == oversized.value


def test_partitions_move_between_workers_without_losing_a_message(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Worker A alone, then B joins (rebalance), then A stops (its partitions move to B), all while
    messages keep coming: every query id comes out parsed, and both workers did part of the work."""
    settings = make_settings(batch_size=32, partitions=4)
    run(ensure_topics(settings))
    total, phases = 3000, (1200, 1000, 800)
    queries = [f"oak {['desk', 'bed', 'chair', 'table'][i % 4]} no {i}" for i in range(total)]
    # All cached: the workers never wait for the model, so the test measures the hand-over alone.
    run(cache_parses(settings, queries))

    worker_a = WorkerProcess(settings, tmp_path / "worker-a.log")
    settings_b = settings.model_copy(update={"web_port": free_port(), "worker_id": settings.worker_id + "-b"})
    worker_b: WorkerProcess | None = None
    try:
        worker_a.wait_ready()
        sent = 0
        run(_produce(settings, queries, sent, sent + phases[0]))
        sent += phases[0]
        worker_b = WorkerProcess(settings_b, tmp_path / "worker-b.log")
        run(_produce(settings, queries, sent, sent + phases[1], pause_s=0.002))
        sent += phases[1]
        worker_b.wait_ready()
        worker_a.stop()  # SIGTERM: finishes and commits its batches, leaves the group
        run(_produce(settings, queries, sent, total))
        records = run(_read_until_every_id(settings, {f"m{i}" for i in range(total)}, timeout_s=180))
    finally:
        worker_a.stop()
        if worker_b is not None:
            worker_b.stop()

    events = [json.loads(record.value) for record in records]
    ids = [event["query_id"] for event in events]
    missing = {f"m{i}" for i in range(total)} - set(ids)
    assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:10]}"
    assert set(ids) == {f"m{i}" for i in range(total)}
    assert all(event["cached"] for event in events)
    by_worker = {event["worker_id"] for event in events}
    assert by_worker == {settings.worker_id, settings_b.worker_id}
    # At least once, and duplicates only where a partition moved (not a wholesale replay).
    assert len(ids) - len(set(ids)) < total // 4


async def _read_until_every_id(settings: Settings, wanted: set[str], timeout_s: float) -> list[Any]:
    """The parsed topic until every wanted query id is in it (duplicates count once) or the timeout:
    stopping at a record count would stop early by as many records as there are duplicates."""
    consumer = make_consumer(settings)
    await consumer.start()
    records: list[Any] = []
    seen: set[str] = set()
    try:
        await assign_all(consumer, [settings.topic_parsed], from_end=False)
        deadline = time.monotonic() + timeout_s
        while not wanted <= seen and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=250)).values():
                records.extend(batch)
                seen.update(record.key.decode() for record in batch if record.key)
    finally:
        await consumer.stop()
    return records




async def _produce(settings: Settings, queries: list[str], start: int, end: int, pause_s: float = 0.0) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        pending = []
        for i in range(start, end):
            value = json.dumps({"query": queries[i], "query_id": f"m{i}", "ts": time.time()}).encode()
            pending.append(await producer.send(settings.topic_input, value, key=f"m{i}".encode()))
            if pause_s:
                await asyncio.sleep(pause_s)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
