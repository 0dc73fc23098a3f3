"""The Redis Streams transport in-process on the real Redis, with a stand-in engine so each test
takes seconds: batching, atomic publish + ack, own-pending re-reads, claims, max deliveries,
lease renewal, graceful stop, the /parse bridge and a Redis outage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from schemas.events import BatchMetricsEvent, DeadLetterReason, ParsedEvent
from schemas.settings import Settings
from schemas.spec import load_spec
from streams.local_stack import free_port
from streams.query_client import DeadLetteredError, RedisQueryClient
from streams.redis_codec import decode_entry, encode_entry
from streams.redis_transport import RedisStreamConsumer, transport_client
from streams.runtime import WorkerRuntime
from workers.engine import ParseResult


class FakeEngine:
    """Deterministic parses (last word = item type) and a record of every query the model saw."""

    model_id = "fake-engine"
    grounding = "catalog"
    version = "fake-v1"
    spec = load_spec("furniture")

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    @property
    def seen(self) -> list[str]:
        return [query for call in self.calls for query in call]

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        with self._lock:
            self.calls.append(list(queries))
        time.sleep(self.delay_s)
        return [ParseResult(parse={"item_type": q.split()[-1], "material": None, "color": None, "style": None})
                for q in queries]

    def warm_up(self) -> None:
        pass


@dataclass
class Running:
    runtime: WorkerRuntime
    stop: asyncio.Event
    task: asyncio.Task[None]
    engine: FakeEngine
    clients: list[Redis] = field(default_factory=list)


@contextlib.asynccontextmanager
async def consumer(settings: Settings, engine: FakeEngine | None = None) -> AsyncIterator[Running]:
    engine = engine or FakeEngine()
    runtime = WorkerRuntime(settings, engine=engine)
    await runtime.start()
    client = transport_client(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(RedisStreamConsumer(settings, runtime, client, stop).run())
    running = Running(runtime, stop, task, engine)
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await runtime.close()
        await client.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def settings(make_settings: Callable[..., Settings], redis: Redis) -> AsyncIterator[Settings]:
    made = make_settings(batch_size=16, batch_linger_ms=50, redis_claim_idle_ms=60_000)
    yield made
    await redis.delete(made.stream_input, made.stream_parsed, made.stream_metrics, made.stream_dlq)


def query(query_id: str, text: str) -> bytes:
    return json.dumps({"query": text, "query_id": query_id}).encode()


async def add(redis: Redis, settings: Settings, values: list[bytes]) -> list[str]:
    ids = []
    for index, value in enumerate(values):
        entry_id: Any = await redis.xadd(settings.stream_input, encode_entry(value, f"k{index}".encode()))  # type: ignore[arg-type]
        ids.append(entry_id.decode())
    return ids


async def entries(redis: Redis, stream: str) -> list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]]:
    rows: Any = await redis.xrange(stream)
    out = []
    for entry_id, fields in rows:
        value, key, headers, _ = decode_entry(fields)
        out.append((entry_id.decode(), value, key, headers))
    return out


async def parsed_events(redis: Redis, settings: Settings) -> list[ParsedEvent]:
    return [ParsedEvent.model_validate_json(value or b"") for _, value, _, _ in
            await entries(redis, settings.stream_parsed)]


async def dead_letters(redis: Redis, settings: Settings) -> list[tuple[bytes | None, DeadLetterReason]]:
    return [(value, DeadLetterReason.from_headers(headers)) for _, value, _, headers in
            await entries(redis, settings.stream_dlq)]


async def metrics(redis: Redis, settings: Settings) -> list[BatchMetricsEvent]:
    return [BatchMetricsEvent.model_validate_json(value or b"") for _, value, _, _ in
            await entries(redis, settings.stream_metrics)]


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


async def outputs_count(redis: Redis, settings: Settings) -> int:
    return int(await redis.xlen(settings.stream_parsed)) + int(await redis.xlen(settings.stream_dlq))


async def pending(redis: Redis, settings: Settings) -> int:
    """Entries delivered and not acked; -1 while the group does not exist yet."""
    try:
        summary = await redis.xpending(settings.stream_input, settings.app_id)
    except ResponseError:
        return -1
    return int(summary["pending"])


async def crash_read(redis: Redis, settings: Settings, consumer_name: str, count: int = 100) -> list[str]:
    """What a consumer that dies right after reading leaves behind: entries pending under its name."""
    with contextlib.suppress(Exception):
        await redis.xgroup_create(settings.stream_input, settings.app_id, id="0", mkstream=True)
    reply: Any = await redis.xreadgroup(settings.app_id, consumer_name, {settings.stream_input: ">"}, count=count)
    return [entry_id.decode() for _, items in reply for entry_id, _ in items]


UNIQUE = ["red wooden sofa", "oak dining table", "black leather office chair", "grey velvet sectional",
          "king poster bed", "white oak dresser", "glass coffee table", "rattan lounge chair"]


async def test_batches_are_parsed_published_and_acked(settings: Settings, redis: Redis) -> None:
    texts = [UNIQUE[i % len(UNIQUE)] for i in range(60)]
    values = [query(f"q{i}", text) for i, text in enumerate(texts)]
    poison = [b'{"query": "oak desk"', b'{"q": "sofa"}', b"\xff\xfe sofa"]
    ids = await add(redis, settings, values[:30] + poison + values[30:])

    async with consumer(settings) as running:
        await eventually(lambda: _equals(outputs_count(redis, settings), len(ids)), what="all outputs")
        await eventually(lambda: _equals(pending(redis, settings), 0), what="all acked")
        ready, checks = running.runtime.readiness()
        assert ready and checks["partitions"] == 1 and checks["transport"] == "ok"

    events = await parsed_events(redis, settings)
    assert sorted(e.query_id for e in events) == sorted(f"q{i}" for i in range(60))
    for event in events:
        assert event.query == texts[int(event.query_id[1:])]
        assert event.parse["item_type"] == event.query.split()[-1]
        assert event.source.topic == settings.stream_input and event.source.offset in ids
    parsed_keys = [key for _, _, key, _ in await entries(redis, settings.stream_parsed)]
    assert sorted(key or b"" for key in parsed_keys) == sorted(e.query_id.encode() for e in events)
    # In-batch dedupe and the cache: the model saw each distinct query once.
    assert sorted(running.engine.seen) == sorted(UNIQUE)

    refused = await dead_letters(redis, settings)
    assert sorted(value or b"" for value, _ in refused) == sorted(poison)
    assert {reason.stage for _, reason in refused} == {"decode", "validate"}
    assert all(reason.source_topic == settings.stream_input and reason.source_offset in ids for _, reason in refused)

    batches = await metrics(redis, settings)
    assert sum(m.size for m in batches) == len(ids)
    assert sum(m.parsed for m in batches) == 60 and sum(m.dead_lettered for m in batches) == 3
    # Steps grow past batch_size as they hit the cache; the model never sees more than batch_size.
    assert max(m.size for m in batches) <= settings.batch_max_records
    assert max(len(call) for call in running.engine.calls) <= settings.batch_size
    assert len(batches) < len(ids) / 4  # batches were formed, not one entry at a time


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_restart_rereads_its_own_pending_entries(settings: Settings, redis: Redis) -> None:
    # A worker that died after XREADGROUP: its entries are pending under its (stable) name, and the
    # claim threshold (60 s) is far away, so only the own-pending re-read can bring them back.
    ids = await add(redis, settings, [query(f"q{i}", UNIQUE[i]) for i in range(5)])
    assert await crash_read(redis, settings, settings.worker_id) == ids

    async with consumer(settings):
        await eventually(lambda: _equals(pending(redis, settings), 0), what="pending re-read and acked")
    events = await parsed_events(redis, settings)
    assert sorted(e.source.offset for e in events) == ids


async def test_entries_of_a_dead_consumer_are_claimed(settings: Settings, redis: Redis) -> None:
    settings = settings.model_copy(update={"redis_claim_idle_ms": 1000})
    ids = await add(redis, settings, [query(f"q{i}", UNIQUE[i]) for i in range(6)])
    assert await crash_read(redis, settings, "dead-consumer") == ids
    crashed_at = time.monotonic()

    async with consumer(settings):
        # Too fresh for the sweep on start; a periodic sweep takes them once idle past the threshold.
        await eventually(lambda: _equals(pending(redis, settings), 0), what="claimed and acked")
        waited = time.monotonic() - crashed_at
    assert 1.0 <= waited < 5.0
    events = await parsed_events(redis, settings)
    assert sorted(e.source.offset for e in events) == ids
    assert {e.worker_id for e in events} == {settings.worker_id}


async def test_entry_delivered_too_often_is_dead_lettered(settings: Settings, redis: Redis) -> None:
    settings = settings.model_copy(update={"redis_claim_idle_ms": 200, "max_deliveries": 3})
    crasher, _healthy, undecodable = await add(
        redis, settings, [query("crasher", "cursed ottoman"), query("healthy", "oak desk"), b'{"query": "ottom'])
    await crash_read(redis, settings, "crash-1")
    for name in ("crash-2", "crash-3"):  # two more consumers took them over and died too
        await redis.xclaim(settings.stream_input, settings.app_id, name, min_idle_time=0,
                           message_ids=[crasher, undecodable])

    engine = FakeEngine()
    async with consumer(settings, engine):
        await eventually(lambda: _equals(pending(redis, settings), 0), what="claimed and settled")

    # The fourth delivery is over the limit for two of them; the healthy entry is on its second.
    events = await parsed_events(redis, settings)
    assert [e.query_id for e in events] == ["healthy"]
    assert "cursed ottoman" not in engine.seen
    refused = {reason.source_offset: (value, reason) for value, reason in await dead_letters(redis, settings)}
    assert set(refused) == {crasher, undecodable}
    value, reason = refused[crasher]
    assert value == query("crasher", "cursed ottoman")
    assert (reason.stage, reason.error_class, reason.attempts) == ("deliveries", "MaxDeliveriesExceeded", 4)
    assert "delivered 4 times" in reason.message and reason.worker_id == settings.worker_id
    assert refused[undecodable][1].stage == "deliveries"
    batches = await metrics(redis, settings)
    assert sum(m.size for m in batches) == 3 and sum(m.dead_lettered for m in batches) == 2


async def test_entry_deleted_while_pending_is_dead_lettered(settings: Settings, redis: Redis) -> None:
    settings = settings.model_copy(update={"redis_claim_idle_ms": 200})
    _kept, gone = await add(redis, settings, [query("kept", "oak desk"), query("gone", "pine bed")])
    await crash_read(redis, settings, "dead-consumer")
    await redis.xdel(settings.stream_input, gone)

    async with consumer(settings):
        await eventually(lambda: _equals(outputs_count(redis, settings), 2), what="both settled")
    assert [e.query_id for e in await parsed_events(redis, settings)] == ["kept"]
    [(value, reason)] = await dead_letters(redis, settings)
    # Nothing was left of the entry: its letter has no value either.
    assert (value, reason.error_class, reason.source_offset) == (None, "EntryDeleted", gone)
    assert await pending(redis, settings) == 0


async def test_stop_finishes_the_in_flight_batch(settings: Settings, redis: Redis) -> None:
    ids = await add(redis, settings, [query(f"q{i}", UNIQUE[i]) for i in range(8)])
    engine = FakeEngine(delay_s=1.5)
    async with consumer(settings, engine) as running:
        await eventually(lambda: _true(bool(engine.calls)), what="batch in the model")
        running.stop.set()
        await asyncio.wait_for(running.task, 15)
        # The batch was read before the stop: it is published and acked, not abandoned.
        assert await outputs_count(redis, settings) == len(ids)
        assert await pending(redis, settings) == 0
        assert not running.runtime.readiness()[0]


async def test_a_stop_whose_grace_runs_out_leaves_the_entries_pending_and_says_how_many(
    settings: Settings, redis: Redis,
) -> None:
    """QUSTREAM_STOP_GRACE_S bounds the stop: a batch still in the model past it is given up, with one
    warning counting what was left; the entries stay pending, for a restart or a peer to redo."""
    from structlog.testing import capture_logs

    settings = settings.model_copy(update={"stop_grace_s": 0.3})
    ids = await add(redis, settings, [query(f"q{i}", UNIQUE[i]) for i in range(8)])
    engine = FakeEngine(delay_s=4)
    with capture_logs() as logs:
        async with consumer(settings, engine) as running:
            await eventually(lambda: _true(bool(engine.calls)), what="batch in the model")
            stopping = time.monotonic()
            running.stop.set()
            await asyncio.wait_for(running.task, 15)
            assert time.monotonic() - stopping < 3  # the grace, not the batch
    assert await outputs_count(redis, settings) == 0
    assert await pending(redis, settings) == len(ids)
    [warning] = [entry for entry in logs if entry["event"] == "worker.stop_grace_exceeded"]
    assert (warning["grace_s"], warning["inputs"], warning["partitions"]) == (
        0.3, len(ids), {f"{settings.stream_input}/0": len(ids)})
    assert "QUSTREAM_MAX_DELIVERIES" in warning["note"]


async def _true(value: bool) -> bool:
    return value


async def test_slow_batch_is_not_claimed_by_a_peer(make_settings: Callable[..., Settings], redis: Redis) -> None:
    # Batches take 4x the claim threshold: without lease renewal the peer would claim and redo them.
    first = make_settings(batch_size=4, batch_linger_ms=20, redis_claim_idle_ms=300)
    second = first.model_copy(update={"worker_id": first.worker_id + "-b", "web_port": free_port()})
    try:
        ids = await add(redis, first, [query(f"q{i}", f"{UNIQUE[i % 8]} {i}") for i in range(8)])
        async with consumer(first, FakeEngine(delay_s=1.2)), consumer(second, FakeEngine(delay_s=1.2)):
            await eventually(lambda: _equals(pending(redis, first), 0), timeout_s=30, what="all acked")
            await asyncio.sleep(0.5)
        events = await parsed_events(redis, first)
        assert sorted(e.query_id for e in events) == sorted(f"q{i}" for i in range(len(ids)))
    finally:
        await redis.delete(first.stream_input, first.stream_parsed, first.stream_metrics, first.stream_dlq)


async def test_parse_bridge(settings: Settings, redis: Redis) -> None:
    async with RedisQueryClient(settings) as client:
        with pytest.raises(TimeoutError):  # nobody consumes yet
            await client.parse("oak desk", timeout=0.5)
        async with consumer(settings):
            event = await client.parse("Red Wooden  Sofa", timeout=20)
            assert event.query == "Red Wooden  Sofa" and event.parse["item_type"] == "sofa"
            with pytest.raises(DeadLetteredError) as refused:
                await client.parse("   ", timeout=20)
            assert refused.value.reason.error_class == "EmptyQuery"


class Proxy:
    """A TCP proxy in front of Redis that can be cut, to take Redis away without stopping it, or
    made to lose the reply of the next ``EXEC`` after Redis has run it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.lose_next_exec_reply = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        black_hole = asyncio.Event()

        async def to_redis() -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()
                    if self.lose_next_exec_reply and b"\r\nEXEC\r\n" in data:
                        self.lose_next_exec_reply = False
                        black_hole.set()
                        await asyncio.sleep(0.2)  # Redis runs the transaction; its reply goes nowhere
                        writer.close()
            up_writer.close()

        async def to_client() -> None:
            with contextlib.suppress(Exception):
                while data := await up_reader.read(65536):
                    if black_hole.is_set():
                        continue
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(to_redis(), to_client())
        self._writers -= {writer, up_writer}


async def test_lost_exec_reply_does_not_duplicate_the_batch(settings: Settings, redis: Redis, redis_url: str) -> None:
    proxy = Proxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.open()
    behind_proxy = settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{proxy.port}/9")})
    try:
        async with consumer(behind_proxy):
            await eventually(lambda: _equals(pending(redis, settings), 0), what="group joined")
            proxy.lose_next_exec_reply = True
            await add(redis, settings, [query(f"q{i}", UNIQUE[i]) for i in range(4)])
            await eventually(lambda: _equals(outputs_count(redis, settings), 4), what="outputs")
            await eventually(lambda: _equals(pending(redis, settings), 0), what="acked")
            await eventually(lambda: _true(not proxy.lose_next_exec_reply), what="reply lost")
            await asyncio.sleep(1.5)  # time for a (wrong) second publish to land
    finally:
        await proxy.cut()
    # The transaction ran, its reply was lost; the retry saw the acks and did not publish again (the
    # entries may have come in more than one step: each step's metrics event is there once).
    assert sorted(e.query_id for e in await parsed_events(redis, settings)) == [f"q{i}" for i in range(4)]
    batches = await metrics(redis, settings)
    assert sum(m.size for m in batches) == 4 and len({m.batch_id for m in batches}) == len(batches)


async def test_redis_outage_is_survived(settings: Settings, redis: Redis, redis_url: str) -> None:
    proxy = Proxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.open()
    behind_proxy = settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{proxy.port}/9")})
    first = await add(redis, settings, [query(f"a{i}", UNIQUE[i]) for i in range(4)])
    async with consumer(behind_proxy) as running:
        await eventually(lambda: _equals(outputs_count(redis, settings), len(first)), what="first entries")
        await proxy.cut()
        await eventually(lambda: _true(not running.runtime.transport_connected), what="transport marked down")
        second = await add(redis, settings, [query(f"b{i}", UNIQUE[i]) for i in range(4)])
        await asyncio.sleep(1.0)
        assert not running.task.done()
        assert not running.runtime.readiness()[0]
        await proxy.open()
        await eventually(lambda: _equals(outputs_count(redis, settings), len(first) + len(second)),
                         timeout_s=40, what="entries after the outage")
        await eventually(lambda: _true(running.runtime.readiness()[0]), what="ready again")
    await proxy.cut()
    events = await parsed_events(redis, settings)
    assert sorted(e.query_id for e in events) == sorted([f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)])
    assert await pending(redis, settings) == 0
