"""End to end with Redis alone: `qustream worker` (QUSTREAM_TRANSPORT=redis, default model) in
subprocesses against the real Redis — volume with repeats and poison, kill -9 of one of two
consumers, and an entry that takes the worker down on every delivery."""

from __future__ import annotations

import itertools
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from schemas.events import BatchMetricsEvent, DeadLetterReason, ParsedEvent
from schemas.settings import Settings
from schemas.spec import load_spec
from streams.local_stack import free_port
from streams.redis_codec import decode_entry, encode_entry
from tests.support import AUTOPARTS_QUERIES, ECOMMERCE_QUERIES, POISON, WorkerProcess, write_autoparts_spec

pytestmark = pytest.mark.e2e

#: Model load + warm-up: ~15 s on an idle 2-core machine, over 100 s when other test runs share it.
STARTUP_S = 300.0

COLORS = ["red", "grey", "black", "white", "navy", "green", "cream", "walnut", "pink", "teal"]
ITEMS = ["sofa", "dining table", "office chair", "bookshelf", "bed frame", "nightstand", "bar stool", "dresser",
         "coffee table", "armchair", "tv stand", "desk"]


def unique_queries(count: int, seed: int) -> list[str]:
    combos = [f"{color} {item}" for color, item in itertools.product(COLORS, ITEMS)]
    random.Random(seed).shuffle(combos)
    return combos[:count]


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_settings(
    make_settings: Callable[..., Settings], redis: redis_sync.Redis
) -> Iterator[Callable[..., Settings]]:
    made: list[Settings] = []

    def factory(**overrides: object) -> Settings:
        settings = make_settings(transport="redis", **overrides)
        made.append(settings)
        return settings

    yield factory
    for settings in made:
        redis.delete(settings.stream_input, settings.stream_parsed, settings.stream_metrics, settings.stream_dlq)


def produce(redis: redis_sync.Redis, settings: Settings, messages: list[tuple[bytes, bytes]]) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for key, value in messages:
        pipe.xadd(settings.stream_input, encode_entry(value, key))  # type: ignore[arg-type]
    return [entry_id.decode() for entry_id in pipe.execute()]


def stream(redis: redis_sync.Redis, name: str) -> list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]]:
    rows = []
    reply: Any = redis.xrange(name)
    for entry_id, fields in reply:
        value, key, headers, _ = decode_entry(fields)
        rows.append((entry_id.decode(), value, key, headers))
    return rows


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def settled(redis: redis_sync.Redis, settings: Settings) -> int:
    lengths: Any = (redis.xlen(settings.stream_parsed), redis.xlen(settings.stream_dlq))
    return int(lengths[0]) + int(lengths[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, workers: list[WorkerProcess]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    logs = "\n".join(worker.log_tail(3000) for worker in workers)
    raise AssertionError(f"{what} not reached within {timeout_s} s; logs:\n{logs}")


def pending_of(redis: redis_sync.Redis, settings: Settings, consumer: str | None = None) -> list[dict[str, object]]:
    try:
        return redis.xpending_range(settings.stream_input, settings.app_id, min="-", max="+", count=10_000,  # type: ignore[return-value]
                                    consumername=consumer)
    except redis_sync.ResponseError:  # the group is not created yet
        return []


def test_thousand_queries_with_repeats_and_poison(
    redis_settings: Callable[..., Settings], redis: redis_sync.Redis, tmp_path: Path
) -> None:
    settings = redis_settings(batch_size=32, batch_linger_ms=100)
    unique = unique_queries(32, seed=1)
    rng = random.Random(7)
    queries = unique + [rng.choice(unique) for _ in range(1000 - len(unique))]
    rng.shuffle(queries)
    messages = [(f"q{i}".encode(), json.dumps({"query": q, "query_id": f"q{i}"}).encode())
                for i, q in enumerate(queries)]
    poison = [(name.encode(), value) for name, (value, _) in POISON.items()]

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(STARTUP_S)
        ready = json.loads(worker.get("/ready")[1])
        assert ready["checks"]["transport"] == "ok" and ready["checks"]["partitions"] == 1
        produce(redis, settings, messages[:500] + poison[:3] + messages[500:] + poison[3:])
        total = len(messages) + len(poison)
        wait_until(lambda: settled(redis, settings) >= total, 240, "all parsed or dead-lettered", [worker])
        wait_until(lambda: not pending_of(redis, settings), 10, "all acked", [worker])

        # The /parse bridge over the streams: a query the cache already knows answers at once.
        status, body = _post(worker, "/parse", {"query": unique[0]})
        assert status == 200, body
        assert json.loads(body)["query"] == unique[0]
    finally:
        code = worker.stop(signal.SIGTERM)
    assert code == 0, worker.log_tail()

    parsed = stream(redis, settings.stream_parsed)
    events = [ParsedEvent.model_validate_json(value or b"") for _, value, _, _ in parsed]
    from_stream = [e for e in events if e.query_id.startswith("q")]
    assert sorted(e.query_id for e in from_stream) == sorted(f"q{i}" for i in range(len(messages)))
    assert all(key == e.query_id.encode() for (_, _, key, _), e in zip(parsed, events, strict=True))
    for event in from_stream:
        assert event.query == queries[int(event.query_id[1:])]
        assert event.source.topic == settings.stream_input and event.worker_id == settings.worker_id
    # Each distinct query is inferred once; every repeat comes back cached.
    uncached = sorted(e.normalized_query for e in from_stream if not e.cached)
    assert len(uncached) == len(set(uncached)) == len(unique)

    refused = [(value, DeadLetterReason.from_headers(headers)) for _, value, _, headers in
               stream(redis, settings.stream_dlq)]
    assert sorted(value or b"" for value, _ in refused) == sorted(value for _, (value, _) in POISON.items())
    stage_of = {value: stage for value, stage in POISON.values()}
    assert all(reason.stage == stage_of[value or b""] for value, reason in refused)

    batches = [BatchMetricsEvent.model_validate_json(value or b"") for _, value, _, _ in
               stream(redis, settings.stream_metrics)]
    assert sum(m.size for m in batches) == len(messages) + len(poison) + 1  # + the /parse query
    assert max(m.size for m in batches) <= settings.batch_max_records


@pytest.mark.parametrize("spec_name", ["ecommerce", "autoparts"])
def test_other_specs_over_redis_streams(
    redis_settings: Callable[..., Settings], redis: redis_sync.Redis, tmp_path: Path, spec_name: str
) -> None:
    """The built-in general-retail spec and a made-up third domain; plain-text values keep their key as id."""
    spec_ref = "ecommerce" if spec_name == "ecommerce" else str(write_autoparts_spec(tmp_path / "spec"))
    queries = ECOMMERCE_QUERIES if spec_name == "ecommerce" else AUTOPARTS_QUERIES
    settings = redis_settings(batch_size=16, parse_spec=spec_ref)
    spec = load_spec(spec_ref)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(STARTUP_S)
        produce(redis, settings, [(f"search-{i}".encode(), q.encode()) for i, q in enumerate(queries)])
        wait_until(lambda: settled(redis, settings) >= len(queries), 240, "all parsed", [worker])
    finally:
        code = worker.stop(signal.SIGTERM)
    assert code == 0, worker.log_tail()
    # A clean stop ends with the worker's own last line, not with extension modules' teardown reports.
    log_lines = worker.log_path.read_text(errors="replace").strip().splitlines()
    assert '"worker.stopped"' in log_lines[-1], worker.log_tail()
    events = [json.loads(value or b"") for _, value, _, _ in stream(redis, settings.stream_parsed)]
    assert sorted(e["query_id"] for e in events) == sorted(f"search-{i}" for i in range(len(queries)))
    for event in events:
        spec.parse_model.model_validate(event["parse"])
        assert event["spec"] == spec.ref and list(event["parse"]) == list(spec.field_names)
    metrics = [json.loads(value or b"") for _, value, _, _ in stream(redis, settings.stream_metrics)]
    assert metrics and all(m["spec"] == spec.ref for m in metrics)


def _post(worker: WorkerProcess, path: str, payload: dict[str, object]) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(worker.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_kill9_of_one_consumer_its_entries_are_claimed(
    redis_settings: Callable[..., Settings], redis: redis_sync.Redis, tmp_path: Path
) -> None:
    # Steps of at most 8 entries, whatever the cache hits: the duplicate bound below is one step.
    first = redis_settings(batch_size=8, batch_max_records=8, batch_linger_ms=50, redis_claim_idle_ms=3000)
    second = first.model_copy(update={"worker_id": first.worker_id + "-b", "web_port": free_port()})
    unique = unique_queries(24, seed=2)
    messages = [(f"q{i}".encode(), json.dumps({"query": unique[i % len(unique)], "query_id": f"q{i}"}).encode())
                for i in range(120)]
    victim = WorkerProcess(first, tmp_path / "victim.log")
    survivor = WorkerProcess(second, tmp_path / "survivor.log")
    try:
        victim.wait_ready(STARTUP_S)
        survivor.wait_ready(STARTUP_S)
        ids = produce(redis, first, messages)
        # Kill the victim while it holds a batch (read, not yet published and acked).
        wait_until(lambda: bool(pending_of(redis, first, first.worker_id)), 60, "victim holds entries",
                   [victim, survivor])
        victim.stop(signal.SIGKILL)
        held = {_text(row["message_id"]) for row in pending_of(redis, first, first.worker_id)}
        assert held
        wait_until(lambda: settled(redis, first) >= len(messages), 240, "all settled after the kill", [survivor])
        wait_until(lambda: not pending_of(redis, first), 10, "all acked", [survivor])
        assert survivor.process.poll() is None
    finally:
        victim.stop(signal.SIGKILL)
        survivor.stop()

    events = [ParsedEvent.model_validate_json(value or b"") for _, value, _, _ in stream(redis, first.stream_parsed)]
    assert {e.query_id for e in events} == {f"q{i}" for i in range(len(messages))}  # lost = 0
    # Outputs and acks land together, so a kill -9 alone leaves no duplicates (0 in our runs); one
    # batch of slack in case a loaded machine delays a lease renewal past the claim threshold.
    assert len(events) - len(messages) <= first.batch_size
    assert not stream(redis, first.stream_dlq)
    by_offset = {e.source.offset: e for e in events}
    assert set(by_offset) == set(ids)
    # What the victim held when it died was done by the survivor.
    assert {by_offset[entry_id].worker_id for entry_id in held} == {second.worker_id}


@pytest.mark.slow
def test_entry_that_kills_the_worker_each_time_is_dead_lettered(
    redis_settings: Callable[..., Settings], redis: redis_sync.Redis, tmp_path: Path
) -> None:
    # The worker keeps its name across restarts (a StatefulSet pod, a systemd unit), so each restart
    # re-reads its own pending entry and the delivery count grows by one.
    settings = redis_settings(batch_size=4, max_deliveries=2, redis_claim_idle_ms=600_000)
    [entry_id] = produce(redis, settings, [(b"deadly", json.dumps({"query": "teal marble side table",
                                                                     "query_id": "deadly"}).encode())])
    workers: list[WorkerProcess] = []
    for delivery in (1, 2):
        worker = WorkerProcess(settings, tmp_path / f"worker-{delivery}.log")
        workers.append(worker)

        def delivered(count: int = delivery) -> bool:
            rows = pending_of(redis, settings, settings.worker_id)
            return bool(rows) and int(rows[0]["times_delivered"]) == count  # type: ignore[call-overload]

        wait_until(delivered, STARTUP_S, f"delivery {delivery}", [worker])
        worker.stop(signal.SIGKILL)  # it dies while the entry is in the model
        assert settled(redis, settings) == 0, "the entry was processed before the kill; the test proves nothing"

    worker = WorkerProcess(settings, tmp_path / "worker-3.log")
    workers.append(worker)
    try:
        wait_until(lambda: settled(redis, settings) >= 1, STARTUP_S, "the dead letter", [worker])
        wait_until(lambda: not pending_of(redis, settings), 10, "acked", [worker])
    finally:
        worker.stop()

    assert not stream(redis, settings.stream_parsed)
    [(_, value, key, headers)] = stream(redis, settings.stream_dlq)
    reason = DeadLetterReason.from_headers(headers)
    assert (value, key) == (json.dumps({"query": "teal marble side table", "query_id": "deadly"}).encode(), b"deadly")
    assert (reason.stage, reason.error_class, reason.attempts, reason.source_offset) == (
        "deliveries", "MaxDeliveriesExceeded", 3, entry_id)
    assert "delivered 3 times" in reason.message
