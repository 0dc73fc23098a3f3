"""Delivery counts in-process: the core step's ``max_deliveries`` rule, and the Kafka counter kept in
the real Redis, through a crash loop simulated by an engine that takes the "process" down."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from schemas.events import DeadLetterReason
from schemas.settings import Settings
from schemas.spec import load_spec
from streams.deliveries import KEY_PREFIX, KafkaDeliveryCounter
from streams.local_stack import free_port
from streams.runtime import WorkerRuntime
from workers.cache import ParseCache, redis_client
from workers.core_step import BatchOutcome, InboundMessage, OutboundRecord, ParsePipeline
from workers.engine import ParseResult

POISON = "cursed velvet ottoman"


class WorkerDied(BaseException):
    """What a native crash is to the worker: nothing in the core step catches it."""


class CrashingEngine:
    """Parses every query, except that it takes the worker down on ``POISON``; records each batch."""

    model_id = "test-engine"
    grounding = "catalog"
    version = "test"
    spec = load_spec("furniture")

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def warm_up(self) -> None:
        pass

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        self.batches.append(list(queries))
        if POISON in queries:
            raise WorkerDied
        return [ParseResult({"item_type": q.split()[-1], "material": None, "color": None, "style": None})
                for q in queries]


def message(query: str, offset: int, partition: int = 0, deliveries: int = 1) -> InboundMessage:
    return InboundMessage(value=query.encode(), key=None, topic="in", partition=partition, offset=str(offset),
                          deliveries=deliveries)


async def test_core_step_refuses_a_message_delivered_too_often() -> None:
    settings = Settings(max_deliveries=3, cache_enabled=False)
    engine = CrashingEngine()
    pipeline = ParsePipeline(settings, engine, ParseCache(None, spec=CrashingEngine.spec, version="test", ttl_s=60))  # type: ignore[arg-type]
    outcome = await pipeline.process([message("oak desk", 0, deliveries=3), message("red sofa", 1, deliveries=4)])
    assert engine.batches == [["oak desk"]]
    assert len(outcome.parsed) == 1 and outcome.dead_letter_stages == ["deliveries"]
    [dead] = outcome.dead_letters
    reason = DeadLetterReason.from_headers(dict(dead.headers))
    assert (reason.stage, reason.error_class, reason.attempts, reason.source_offset) == (
        "deliveries", "MaxDeliveriesExceeded", 4, "1")
    assert "delivered 4 times > max_deliveries=3" in reason.message
    assert dead.value == b"red sofa"


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def counter_settings(redis_url: str) -> Callable[..., Settings]:
    group = f"deliveries-{uuid.uuid4().hex[:8]}"
    return lambda **overrides: Settings(**{"redis_url": redis_url, "app_id": group, "cache_enabled": False,
                                           **overrides})


@dataclass
class Delivered:
    """What one worker's life delivered, over all its steps."""

    outcomes: list[BatchOutcome]

    @property
    def parsed(self) -> list[OutboundRecord]:
        return [record for outcome in self.outcomes for record in outcome.parsed]

    @property
    def dead_letters(self) -> list[OutboundRecord]:
        return [record for outcome in self.outcomes for record in outcome.dead_letters]

    def total(self, name: str) -> int:
        return sum(getattr(outcome.metrics, name) for outcome in self.outcomes)


async def worker_run(settings: Settings, messages: list[InboundMessage]) -> tuple[CrashingEngine, Delivered | None]:
    """One worker's life: a fresh runtime and counter on ``messages``; a crash ends it."""
    engine = CrashingEngine()
    runtime = WorkerRuntime(settings, engine=engine)  # type: ignore[arg-type]
    await runtime.start()
    counter = KafkaDeliveryCounter(settings)
    delivered = Delivered([])

    async def start(part: Sequence[InboundMessage]) -> asyncio.Future[None]:
        delivered.outcomes.append(await runtime.process(part))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    try:
        await counter.run(messages, start)
        return engine, delivered
    except WorkerDied:
        return engine, None
    finally:
        await counter.close()
        await runtime.close()


async def test_kafka_message_that_kills_the_worker_is_dead_lettered_and_the_rest_parsed(
    counter_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = counter_settings(max_deliveries=2)
    queries = ["oak desk", "red sofa", POISON, "grey armchair", "teal bookshelf"]

    def fetched() -> list[InboundMessage]:  # as a restarted worker fetches again from the last commit
        return [message(query, offset) for offset, query in enumerate(queries, start=10)]

    engine, outcome = await worker_run(settings, fetched())
    assert outcome is None and engine.batches == [queries]  # delivery 1: died with the whole batch
    engine, outcome = await worker_run(settings, fetched())
    # Delivery 2: one at a time, so that only the killer's count grows; it dies again.
    assert outcome is None and engine.batches == [["oak desk"], ["red sofa"], [POISON]]
    engine, outcome = await worker_run(settings, fetched())
    assert outcome is not None and [[q] for q in queries if q != POISON] == engine.batches

    assert sorted(record.key or b"" for record in outcome.parsed) == sorted(
        f"in-0-{offset}".encode() for offset in (10, 11, 13, 14))
    [dead] = outcome.dead_letters
    reason = DeadLetterReason.from_headers(dict(dead.headers))
    assert (reason.stage, reason.error_class, reason.source_offset) == ("deliveries", "MaxDeliveriesExceeded", "12")
    assert "delivered 3 times" in reason.message
    assert (outcome.total("size"), outcome.total("parsed"), outcome.total("dead_lettered")) == (5, 4, 1)

    # Every step ended and the worker stopped cleanly: nothing is left to count against a message.
    assert await redis.lrange(f"{KEY_PREFIX}:{settings.app_id}:in:0", 0, -1) == []
    engine, outcome = await worker_run(settings, [message("navy desk", 15)])
    assert outcome is not None and engine.batches == [["navy desk"]]


async def test_a_partition_without_redeliveries_runs_as_one_batch_beside_one_with(
    counter_settings: Callable[..., Settings]
) -> None:
    settings = counter_settings(max_deliveries=5)
    engine, outcome = await worker_run(settings, [message(POISON, 0, partition=1)])
    assert outcome is None
    engine, outcome = await worker_run(settings, [message("oak desk", 0), message("red sofa", 1),
                                                  message(POISON, 0, partition=1)])
    assert outcome is None and engine.batches == [["oak desk", "red sofa"], [POISON]]


async def test_counting_stops_but_processing_goes_on_when_redis_is_down(
    counter_settings: Callable[..., Settings]
) -> None:
    down = counter_settings(max_deliveries=2, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    messages = [message("oak desk", 0), message("red sofa", 1)]
    engine, outcome = await worker_run(down, messages)
    assert outcome is not None and engine.batches == [["oak desk", "red sofa"]]
    assert [m.deliveries for m in messages] == [1, 1] and len(outcome.parsed) == 2
