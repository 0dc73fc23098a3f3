"""End to end: a bug in a delivery stops ``qustream worker`` (exit 1, naming the bug), and the restarted
worker processes again what the failed one could not deliver, on the Kafka batch and Faust runners and
on Redis Streams: nothing is lost, nothing is dead-lettered. A Kafka message whose delivery fails in
every life is dead-lettered after ``max_deliveries``, and the restarts end.

The bug is the test-only ``QUSTREAM_TEST_DELIVERY_BUG_ON_QUERY`` hook: the delivery of that query's
parse raises. Before the worker stopped on it, such a part's inputs stayed unacknowledged while the
worker went on (on Kafka, nothing past them was ever committed on their partition until a restart).
Every query but that one is cached, so the step's hits are delivered before its miss fails: the
failed worker publishes them, and its restart parses the miss.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_sync

from schemas.events import DeadLetterReason, ParsedEvent
from schemas.settings import Settings
from streams.delivery import DELIVERY_BUG_ON_QUERY_ENV
from streams.redis_codec import decode_entry, encode_entry
from tests.support import WorkerProcess, cache_parses, produce_in_order, read_topic, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Model load + warm-up: ~15 s on an idle 2-core machine, over 100 s when other test runs share it.
STARTUP_S = 300.0
BUGGY = "sage green velvet armchair"
QUERIES = ["walnut coffee table", "grey linen sofa", BUGGY, "black leather office chair", "oak bookshelf"]
IDS = {f"q{index}" for index in range(len(QUERIES))}


def values() -> list[bytes]:
    return [json.dumps({"query": query, "query_id": f"q{index}"}).encode() for index, query in enumerate(QUERIES)]


def fail_once(settings: Settings, log_dir: Path) -> None:
    """A worker with the bug: it must stop by itself, exit 1 and say why."""
    run(cache_parses(settings, [query for query in QUERIES if query != BUGGY]))
    log = stops_on_the_bug(settings, log_dir / "worker-bug.log")
    assert '"messages": 1, "event": "step.delivery_failed"' in log, log[-4000:]  # the miss alone


def stops_on_the_bug(settings: Settings, log_path: Path) -> str:
    """Run a worker with the bug, which must stop by itself, exit 1 and say why; its log."""
    worker = WorkerProcess(settings, log_path, {DELIVERY_BUG_ON_QUERY_ENV: BUGGY})
    try:
        status = worker.process.wait(STARTUP_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not stop on the bug; log:\n{worker.log_tail()}") from None
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert status == 1, f"exit {status}; log:\n{worker.log_tail()}"
    assert '"worker.failed"' in log and "delivery: RuntimeError" in log, worker.log_tail()
    return log


@pytest.mark.parametrize("runner", ["batch", "faust"])
def test_a_delivery_bug_stops_the_kafka_worker_and_its_restart_loses_nothing(
    make_settings: Callable[..., Settings], tmp_path: Path, runner: str
) -> None:
    settings = make_settings(kafka_runner=runner, batch_size=8, partitions=1)
    run(produce_in_order(settings, values()))
    fail_once(settings, tmp_path)
    before = run(read_topic(settings, settings.topic_parsed, until=0, timeout_s=2.0, complete=lambda _: False))
    # The hits went out although their step's miss failed; the miss did not.
    assert {r.key.decode() for r in before if r.key} == IDS - {f"q{QUERIES.index(BUGGY)}"}
    worker = WorkerProcess(settings, tmp_path / "worker-restarted.log")
    try:
        records = run(read_topic(settings, settings.topic_parsed, until=0, timeout_s=STARTUP_S,
                                 complete=lambda records: {r.key.decode() for r in records if r.key} >= IDS))
        dead = run(read_topic(settings, settings.topic_dlq, until=0, timeout_s=2.0, complete=lambda _: False))
    finally:
        status = worker.stop()
    assert status == 0, worker.log_tail()
    parsed = [ParsedEvent.model_validate_json(record.value) for record in records]
    # The failed worker's offsets never passed the part it could not deliver: the restart parsed it.
    assert {event.query_id for event in parsed} == IDS
    assert BUGGY in {event.query for event in parsed}
    assert dead == []


@pytest.mark.parametrize("runner", ["batch", "faust"])
def test_a_cached_kafka_message_whose_delivery_fails_every_time_is_dead_lettered_and_the_restarts_end(
    make_settings: Callable[..., Settings], tmp_path: Path, runner: str
) -> None:
    """Every query cached, and the delivery of one of them raises in every life: no model is involved,
    yet after two lives that fail its whole batch it goes alone, counts on to ``max_deliveries`` and is
    dead-lettered with its original bytes; the others are parsed, and the last worker keeps running."""
    settings = make_settings(kafka_runner=runner, batch_size=8, partitions=1, max_deliveries=3)
    run(produce_in_order(settings, values()))
    run(cache_parses(settings, QUERIES))
    for life in (1, 2, 3):  # two lives fail the batch, the third fails the message alone
        stops_on_the_bug(settings, tmp_path / f"worker-{life}.log")
    worker = WorkerProcess(settings, tmp_path / "worker-last.log", {DELIVERY_BUG_ON_QUERY_ENV: BUGGY})
    buggy_id = f"q{QUERIES.index(BUGGY)}"
    try:
        # Ends early if the worker exits: without the rule it fails on the message again, and again.
        dead = run(read_topic(settings, settings.topic_dlq, until=1, timeout_s=STARTUP_S,
                              complete=lambda records: bool(records) or worker.process.poll() is not None))
        assert dead, f"the worker exited {worker.process.poll()} without dead-lettering; log:\n{worker.log_tail()}"
        wanted = IDS - {buggy_id}
        records = run(read_topic(settings, settings.topic_parsed, until=0, timeout_s=STARTUP_S,
                                 complete=lambda records: {r.key.decode() for r in records if r.key} >= wanted))
        assert worker.process.poll() is None, worker.log_tail()
    finally:
        status = worker.stop()
    assert status == 0, worker.log_tail()
    assert {ParsedEvent.model_validate_json(record.value).query_id for record in records} == wanted
    [record] = dead
    reason = DeadLetterReason.from_headers(dict(record.headers))
    assert record.value == values()[QUERIES.index(BUGGY)]
    assert (reason.stage, reason.error_class, reason.attempts) == ("deliveries", "MaxDeliveriesExceeded", 4)


def test_a_delivery_bug_stops_the_redis_worker_and_its_restart_loses_nothing(
    make_settings: Callable[..., Settings], redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(transport="redis", batch_size=8)
    client = redis_sync.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for value in values():
            pipe.xadd(settings.stream_input, encode_entry(value, None))  # type: ignore[arg-type]
        pipe.execute()
        fail_once(settings, tmp_path)
        before = [ParsedEvent.model_validate_json(decode_entry(fields)[0] or b"").query
                  for _, fields in client.xrange(settings.stream_parsed)]  # type: ignore[union-attr]
        assert sorted(before) == sorted(query for query in QUERIES if query != BUGGY)
        worker = WorkerProcess(settings, tmp_path / "worker-restarted.log")
        try:
            deadline = time.monotonic() + STARTUP_S
            while client.xlen(settings.stream_parsed) < len(QUERIES):  # type: ignore[operator]
                assert time.monotonic() < deadline, worker.log_tail()
                assert worker.process.poll() is None, worker.log_tail()
                time.sleep(0.2)
        finally:
            status = worker.stop()
        parsed = [ParsedEvent.model_validate_json(decode_entry(fields)[0] or b"")
                  for _, fields in client.xrange(settings.stream_parsed)]  # type: ignore[union-attr]
        dead_letters = client.xlen(settings.stream_dlq)
        pending = client.xpending(settings.stream_input, settings.app_id)["pending"]  # type: ignore[index]
    finally:
        client.delete(settings.stream_input, settings.stream_parsed, settings.stream_metrics, settings.stream_dlq)
        client.close()
    assert status == 0, worker.log_tail()
    assert {event.query_id for event in parsed} == IDS
    assert dead_letters == 0 and pending == 0
