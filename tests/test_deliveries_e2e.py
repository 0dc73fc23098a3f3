"""End to end: a message that kills ``qustream worker`` every time it is processed is dead-lettered
after ``max_deliveries`` deliveries, and the messages of its batch are parsed, on both transports.

The worker dies through the test-only ``QUSTREAM_TEST_EXIT_ON_QUERY`` hook (``os._exit`` in the core
step, as a native crash or an out-of-memory kill would end it); each test restarts it as a
supervisor would, under the same worker id.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from schemas.events import DeadLetterReason, ParsedEvent
from schemas.settings import Settings
from streams.redis_codec import decode_entry, encode_entry
from tests.support import WorkerProcess, produce_in_order, read_topic, run
from workers.core_step import EXIT_ON_QUERY_ENV, EXIT_ON_QUERY_STATUS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Model load + warm-up: ~15 s on an idle 2-core machine, over 100 s when other test runs share it.
STARTUP_S = 300.0
MAX_DELIVERIES = 2
POISON = "cursed teal marble ottoman"
QUERIES = ["walnut coffee table", "grey linen sofa", POISON, "black leather office chair", "oak bookshelf"]


def values() -> list[bytes]:
    return [json.dumps({"query": query, "query_id": f"q{index}"}).encode() for index, query in enumerate(QUERIES)]


def crash_until_dead_lettered(settings: Settings, log_dir: Path) -> WorkerProcess:
    """Start the worker until it has died ``MAX_DELIVERIES`` times on the poison; the next one is
    returned running."""
    for delivery in range(1, MAX_DELIVERIES + 1):
        worker = WorkerProcess(settings, log_dir / f"worker-{delivery}.log", {EXIT_ON_QUERY_ENV: POISON})
        try:
            status = worker.process.wait(STARTUP_S)
        except subprocess.TimeoutExpired:
            worker.stop()
            raise AssertionError(f"delivery {delivery}: the worker did not die; log:\n{worker.log_tail()}") from None
        assert status == EXIT_ON_QUERY_STATUS, f"delivery {delivery}: exit {status}; log:\n{worker.log_tail()}"
        worker.stop()
    return WorkerProcess(settings, log_dir / "worker-last.log", {EXIT_ON_QUERY_ENV: POISON})


def check_outcome(parsed: list[ParsedEvent], dead: list[tuple[bytes | None, DeadLetterReason]]) -> None:
    assert {event.query_id for event in parsed} == {f"q{i}" for i, query in enumerate(QUERIES) if query != POISON}
    [(value, reason)] = dead
    assert value == values()[QUERIES.index(POISON)]
    assert (reason.stage, reason.error_class, reason.attempts) == (
        "deliveries", "MaxDeliveriesExceeded", MAX_DELIVERIES + 1)
    assert f"delivered {MAX_DELIVERIES + 1} times" in reason.message


@pytest.mark.parametrize("runner", ["batch", "faust"])
def test_kafka_message_that_kills_the_worker_each_time(
    make_settings: Callable[..., Settings], tmp_path: Path, runner: str
) -> None:
    settings = make_settings(kafka_runner=runner, batch_size=8, max_deliveries=MAX_DELIVERIES, partitions=1)
    run(produce_in_order(settings, values()))
    worker = crash_until_dead_lettered(settings, tmp_path)
    try:
        dead_records = run(read_topic(settings, settings.topic_dlq, until=1, timeout_s=STARTUP_S))
        # A crash may come after some of its step's parses were published: they come again (at least once).
        expected = {f"q{i}".encode() for i, query in enumerate(QUERIES) if query != POISON}
        parsed_records = run(read_topic(settings, settings.topic_parsed, until=0, timeout_s=STARTUP_S,
                                        complete=lambda records: {r.key for r in records} >= expected))
    finally:
        status = worker.stop()
    assert status == 0, worker.log_tail()
    parsed = [ParsedEvent.model_validate_json(record.value) for record in parsed_records]
    dead = [(record.value, DeadLetterReason.from_headers(dict(record.headers))) for record in dead_records]
    check_outcome(parsed, dead)


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(redis_url)
    yield client
    client.close()


def test_redis_entry_that_kills_the_worker_each_time(
    make_settings: Callable[..., Settings], redis: redis_sync.Redis, tmp_path: Path
) -> None:
    # A claim threshold longer than the test: each restart takes its entries back from its own
    # pending list (the worker keeps its name, like a StatefulSet pod), not by claiming them.
    settings = make_settings(transport="redis", batch_size=8, max_deliveries=MAX_DELIVERIES,
                             redis_claim_idle_ms=600_000)
    pipe = redis.pipeline(transaction=False)
    for value in values():
        pipe.xadd(settings.stream_input, encode_entry(value, None))  # type: ignore[arg-type]
    pipe.execute()
    worker = crash_until_dead_lettered(settings, tmp_path)
    try:
        deadline = time.monotonic() + STARTUP_S
        while redis.xlen(settings.stream_parsed) + redis.xlen(settings.stream_dlq) < len(QUERIES):  # type: ignore[operator]
            assert time.monotonic() < deadline, worker.log_tail()
            assert worker.process.poll() is None, worker.log_tail()
            time.sleep(0.2)
    finally:
        status = worker.stop()
        rows: Any = {name: redis.xrange(name) for name in (settings.stream_parsed, settings.stream_dlq)}
        redis.delete(settings.stream_input, settings.stream_parsed, settings.stream_metrics, settings.stream_dlq)
    assert status == 0, worker.log_tail()
    parsed = [ParsedEvent.model_validate_json(decode_entry(fields)[0] or b"")
              for _, fields in rows[settings.stream_parsed]]
    dead = [(decode_entry(fields)[0], DeadLetterReason.from_headers(decode_entry(fields)[2]))
            for _, fields in rows[settings.stream_dlq]]
    check_outcome(parsed, dead)

