"""Delivery counts in-process: the core step's ``max_deliveries`` rule, and the Kafka counter kept in
the real Redis, through a crash loop simulated by an engine that takes the "process" down."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from schemas.events import DeadLetterReason
from schemas.settings import Settings
from schemas.spec import load_spec
from streams.deliveries import KEY_PREFIX, KafkaDeliveryCounter, NeedsModel
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


#: What a step tells the counter of each part it delivered.
Told = Callable[[Sequence[InboundMessage]], None]


async def worker_run(
    settings: Settings, messages: list[InboundMessage], delivers_first: Callable[[InboundMessage], bool] | None = None,
    needs_model: NeedsModel | None = None,
) -> tuple[CrashingEngine, Delivered | None]:
    """One worker's life: a fresh runtime and counter on ``messages``; a crash ends it.
    ``delivers_first``: the messages of a step delivered before its model batch, as its cache hits are."""
    engine = CrashingEngine()
    runtime = WorkerRuntime(settings, engine=engine)  # type: ignore[arg-type]
    await runtime.start()
    counter = KafkaDeliveryCounter(settings, needs_model=needs_model)
    delivered = Delivered([])

    async def start(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        early = [item for item in part if delivers_first is not None and delivers_first(item)]
        if early:
            told(early)
        delivered.outcomes.append(await runtime.process([item for item in part if item not in early]))
        told([item for item in part if item not in early])
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


async def test_messages_a_stopped_worker_left_undelivered_count_one_delivery_and_say_so(
    counter_settings: Callable[..., Settings],
) -> None:
    """A stop whose grace ran out leaves its step's ranges stored, as a death does: the next life holds
    those messages (one at a time, one delivery more each) and its log line does not claim a death."""
    from structlog.testing import capture_logs

    settings = counter_settings()
    queries = ["oak desk", "red sofa"]
    counter = KafkaDeliveryCounter(settings)

    async def never_delivered(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()  # still in the model when the grace ran out

    await counter.run([message(query, offset) for offset, query in enumerate(queries)], never_delivered)
    await counter.close()  # a graceful stop: clears what was delivered, and nothing else

    fetched = [message(query, offset) for offset, query in enumerate(queries)]
    with capture_logs() as logs:
        engine, outcome = await worker_run(settings, fetched)
    assert outcome is not None and engine.batches == [["oak desk"], ["red sofa"]]
    assert [m.deliveries for m in fetched] == [2, 2]
    [redelivered] = [entry for entry in logs if entry["event"] == "deliveries.redelivered"]
    assert redelivered["note"] == "a worker stopped or died holding them: processed one at a time"


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
    # Delivery 3: the two parsed before the killer were cleared; those after it still go one at a time.
    assert outcome is not None and engine.batches == [["oak desk", "red sofa"], ["grey armchair"], ["teal bookshelf"]]

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


async def test_after_a_crash_only_what_was_not_delivered_runs_one_at_a_time(
    counter_settings: Callable[..., Settings], redis: Redis
) -> None:
    """A step's hits are delivered while its misses are in the model: a worker that dies there held only
    the misses, so its successor goes one at a time through those alone, the rest of the fetch as one
    batch beside them (a later message included), and each is counted as what it was."""
    settings = counter_settings(max_deliveries=2)
    queries = ["oak desk", "red sofa", POISON, "grey armchair", "teal bookshelf"]

    def fetched(last: int = 14) -> list[InboundMessage]:
        return [message(query, offset) for offset, query in enumerate([*queries, "navy desk"], start=10)
                if offset <= last]

    def hit(item: InboundMessage) -> bool:
        return item.value != POISON.encode()

    engine, outcome = await worker_run(settings, fetched(), delivers_first=hit)
    assert outcome is None and engine.batches == [[POISON]]  # the hits went out, the miss took it down

    refetched = fetched(last=15)
    engine, outcome = await worker_run(settings, refetched)
    assert outcome is None
    assert engine.batches == [["oak desk", "red sofa", "grey armchair", "teal bookshelf", "navy desk"], [POISON]]
    assert [item.deliveries for item in refetched] == [1, 1, 2, 1, 1, 1]

    # The fresh messages beside a held one were stored too: a worker dying with them counts them up.
    async def dies(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        raise WorkerDied

    counter = KafkaDeliveryCounter(settings)
    try:
        with pytest.raises(WorkerDied):
            await counter.run(fetched(last=15), dies)
    finally:
        await counter.close()
    refetched = fetched(last=15)
    engine, outcome = await worker_run(settings, refetched)
    # All of them held now: one at a time, the poison dead-lettered at its third delivery.
    assert outcome is not None and engine.batches == [[q] for q in [*queries, "navy desk"] if q != POISON]
    assert [item.deliveries for item in refetched] == [2, 2, 3, 2, 2, 2]
    [dead] = outcome.dead_letters
    assert DeadLetterReason.from_headers(dict(dead.headers)).source_offset == "12"
    assert await redis.lrange(f"{KEY_PREFIX}:{settings.app_id}:in:0", 0, -1) == []


async def test_a_miss_still_in_the_model_when_later_steps_begin_keeps_its_count(
    counter_settings: Callable[..., Settings]
) -> None:
    """Hits go out at once, so later steps begin while an earlier one's miss is in the model; a worker
    killed then must still have counted that miss, or a query that kills the model loops for ever."""
    settings = counter_settings(max_deliveries=2)
    counter = KafkaDeliveryCounter(settings, clear_within_s=3600)  # killed before any clear goes alone

    async def hits_out_miss_in_the_model(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        told([item for item in part if item.value != POISON.encode()])
        return asyncio.get_running_loop().create_future()  # never finishes: the worker is killed first

    async def all_hits(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        told(part)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    queries = ["oak desk", POISON, "red sofa", "grey armchair", "teal bookshelf", "navy desk"]
    fetched = [message(query, offset) for offset, query in enumerate(queries, start=10)]
    await counter.run(fetched[:3], hits_out_miss_in_the_model)
    await counter.run(fetched[3:5], all_hits)
    await counter.run(fetched[5:], all_hits)
    await counter.client.aclose()  # kill -9: no clean stop, and the last clears are never sent

    refetched = [message(query, offset) for offset, query in enumerate(queries, start=10)]
    engine, outcome = await worker_run(settings, refetched)
    assert outcome is None  # the poison again, but counted: alone, as its second delivery
    assert engine.batches == [["oak desk", "red sofa", "grey armchair", "teal bookshelf"], [POISON]]
    assert [item.deliveries for item in refetched[:2]] == [1, 2]
    engine, outcome = await worker_run(settings, [message(query, offset) for offset, query in enumerate(queries, 10)])
    assert outcome is not None and engine.batches == [["oak desk", "red sofa", "grey armchair", "teal bookshelf"],
                                                      ["navy desk"]]
    assert [DeadLetterReason.from_headers(dict(dead.headers)).source_offset for dead in outcome.dead_letters] == ["11"]


async def test_delivered_parts_are_cleared_soon_without_a_next_step(
    counter_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The clears ride on the next step's round trip; a worker left waiting sends them alone soon after,
    so a kill then leaves nothing delivered to be redone one at a time."""
    settings = counter_settings()
    counter = KafkaDeliveryCounter(settings, clear_within_s=0.05)
    key = f"{KEY_PREFIX}:{settings.app_id}:in:0"

    async def hits_out_miss_in_the_model(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        told([item for item in part if item.value != POISON.encode()])
        return asyncio.get_running_loop().create_future()

    try:
        await counter.run([message(query, offset) for offset, query in enumerate(["oak desk", POISON, "red sofa"])],
                          hits_out_miss_in_the_model)
        assert [entry.split(b":")[:2] for entry in await redis.lrange(key, 0, -1)] == [[b"0", b"2"]]
        for _ in range(150):  # the flush is due after 0.05 s; a slow machine gets 3 s
            await asyncio.sleep(0.02)
            if [entry.split(b":")[:2] for entry in await redis.lrange(key, 0, -1)] == [[b"1", b"1"]]:
                break
        assert [entry.split(b":")[:2] for entry in await redis.lrange(key, 0, -1)] == [[b"1", b"1"]]
    finally:
        await counter.client.aclose()


async def test_held_messages_the_model_would_not_see_run_with_the_rest(
    counter_settings: Callable[..., Settings]
) -> None:
    """Only the model can have killed a worker: of the messages it held, those now answered from the
    cache go with the rest of the fetch, and only those that would reach the model go one at a time."""
    settings = counter_settings(max_deliveries=3)  # at 2, one failed life holds every message anyway
    queries = ["oak desk", "red sofa", POISON, "grey armchair", "teal bookshelf"]

    def fetched() -> list[InboundMessage]:
        return [message(query, offset) for offset, query in enumerate(queries, start=10)]

    engine, outcome = await worker_run(settings, fetched())
    assert outcome is None and engine.batches == [queries]  # died holding all five

    async def only_the_poison_misses(batch: Sequence[InboundMessage]) -> list[bool]:
        return [item.value == POISON.encode() for item in batch]

    refetched = fetched()
    engine, outcome = await worker_run(settings, refetched, needs_model=only_the_poison_misses)
    assert outcome is None and engine.batches == [[q for q in queries if q != POISON], [POISON]]
    assert [item.deliveries for item in refetched] == [1, 1, 2, 1, 1]


async def test_a_held_message_whose_delivery_failed_stays_counted(counter_settings: Callable[..., Settings]) -> None:
    """A held message goes one at a time and is cleared once delivered, not merely once its step
    ended: a delivery that raised (which stops the worker) tells nothing, and the message counts up."""
    settings = counter_settings(max_deliveries=5)
    queries = ["oak desk", "red sofa", "teal bookshelf"]

    def fetched() -> list[InboundMessage]:
        return [message(query, offset) for offset, query in enumerate(queries, start=10)]

    async def dies(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        raise WorkerDied

    async def delivery_of_red_sofa_fails(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
        if [item.value for item in part] != [b"red sofa"]:
            told(part)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    for start in (dies, delivery_of_red_sofa_fails):  # two lives: a crash, then the failed delivery
        counter = KafkaDeliveryCounter(settings)
        try:
            with contextlib.suppress(WorkerDied):
                await counter.run(fetched(), start)
        finally:
            await counter.close()
    refetched = fetched()
    engine, outcome = await worker_run(settings, refetched)
    assert outcome is not None and engine.batches == [["oak desk", "teal bookshelf"], ["red sofa"]]
    assert [item.deliveries for item in refetched] == [1, 3, 1]


async def test_a_message_whose_delivery_fails_every_time_is_dead_lettered_and_its_batch_delivered(
    counter_settings: Callable[..., Settings]
) -> None:
    """A cached message whose delivery raises every time (a bug, which stops the worker) needs no model:
    after two failed lives it goes one at a time all the same, so that it alone counts on to
    ``max_deliveries`` and is dead-lettered; the cached messages that shared its batch are delivered,
    never dead-lettered, and the restarts end."""
    settings = counter_settings(max_deliveries=5)
    queries = ["oak desk", "red sofa", "teal bookshelf", "navy desk"]
    failing = b"red sofa"

    async def all_cached(batch: Sequence[InboundMessage]) -> list[bool]:
        return [False] * len(batch)

    done_offsets: set[int] = set()
    dead_lettered: list[str] = []

    async def life(position: int) -> tuple[list[list[str]], bool]:
        """One worker's life from the committed ``position``: its steps, and whether a delivery raised."""
        runtime = WorkerRuntime(settings, engine=CrashingEngine())  # type: ignore[arg-type]
        await runtime.start()
        stopped = False
        counter = KafkaDeliveryCounter(settings, needs_model=all_cached, stopping=lambda: stopped)
        steps: list[list[str]] = []

        async def start(part: Sequence[InboundMessage], told: Told) -> asyncio.Future[None]:
            nonlocal stopped
            steps.append([item.value.decode() for item in part])
            outcome = await runtime.process(list(part))
            refused = [record.value for record in outcome.dead_letters]
            if failing in [item.value for item in part] and failing not in refused:
                stopped = True  # the delivery raised: nothing of this part is told, and the worker stops
            else:
                told(part)
                done_offsets.update(int(item.offset) for item in part)
                dead_lettered.extend(value.decode() for value in refused if value is not None)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        try:
            await counter.run([message(query, offset) for offset, query in enumerate(queries, start=10)
                               if offset >= position], start)
        finally:
            await counter.close()
            await runtime.close()
        return steps, stopped

    lives: list[list[list[str]]] = []
    for _ in range(10):
        # Fetched from the committed position: the first offset not delivered yet.
        position = min(set(range(10, 10 + len(queries))) - done_offsets, default=None)
        if position is None:
            break
        steps, stopped = await life(position)
        lives.append(steps)
        if not stopped:
            break
    # Two lives fail the whole batch; the third holds each message alone and stops at the failing one,
    # which counts 3, 4 and 5 over three lives, the messages behind it waiting uncounted; the sixth
    # dead-letters it and delivers them, counted 3 times, within the limit.
    assert lives == [[queries], [queries], [["oak desk"], ["red sofa"]], [["red sofa"]], [["red sofa"]],
                     [["red sofa"], ["teal bookshelf"], ["navy desk"]]]
    assert done_offsets == {10, 11, 12, 13} and dead_lettered == ["red sofa"]
