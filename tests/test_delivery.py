"""The delivery layer's shared policies: one retry rule, one stop rule, the commit tracker.

The transports' deliveries themselves run against the real broker and Redis in
test_kafka_runner.py, test_pipeline_kafka.py and test_redis_transport.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from schemas.events import BatchMetricsEvent, SpecRef
from schemas.settings import Settings
from streams.delivery import CommitTracker, InFlight, Retrying
from streams.kafka_runner import KafkaDelivery
from streams.runtime import WorkerRuntime
from workers.core_step import BatchOutcome, InboundMessage, OutboundRecord, RunningStep, Settled


class FlakyPublish:
    """Fails ``failures`` times, then succeeds; counts the attempts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    async def __call__(self) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError(f"refused (attempt {self.attempts})")


async def test_a_failed_publish_is_retried_until_it_lands() -> None:
    runtime = WorkerRuntime(Settings())
    publish = FlakyPublish(failures=2)
    assert await Retrying(runtime, asyncio.Event()).publish(publish)
    assert publish.attempts == 3
    assert runtime.transport_connected


async def test_a_stopping_worker_gives_the_batch_up_after_the_grace() -> None:
    runtime = WorkerRuntime(Settings())
    stop = asyncio.Event()
    stop.set()
    publish = FlakyPublish(failures=10**9)
    assert not await Retrying(runtime, stop, grace_s=0.5).publish(publish)
    assert publish.attempts >= 1
    assert not runtime.transport_connected


async def test_only_the_retried_errors_are_retried() -> None:
    publish = FlakyPublish(failures=1)
    retrying = Retrying(WorkerRuntime(Settings()), asyncio.Event())
    try:
        await retrying.publish(publish, retry_on=(TimeoutError,))
    except ConnectionError:
        pass
    else:
        raise AssertionError("a ConnectionError outside retry_on must propagate")
    assert publish.attempts == 1


async def test_after_failure_can_settle_without_another_attempt() -> None:
    publish = FlakyPublish(failures=1)
    seen: list[BaseException] = []

    async def applied_anyway(exc: BaseException) -> bool | None:
        seen.append(exc)
        return True

    assert await Retrying(WorkerRuntime(Settings()), asyncio.Event()).publish(publish, after_failure=applied_anyway)
    assert publish.attempts == 1
    assert [type(exc) for exc in seen] == [ConnectionError]


def test_commit_tracker_keeps_the_newest_position_and_only_assigned_partitions() -> None:
    tracker: CommitTracker[int] = CommitTracker()
    assert not tracker
    tracker.track(0, range(0, 10))
    tracker.track(1, range(0, 5))
    tracker.settle(0, range(0, 10))
    tracker.settle(1, range(0, 5))
    failed = tracker.take()
    assert failed == {0: 10, 1: 5} and not tracker
    tracker.track(0, [10, 11])
    tracker.settle(0, [10, 11])
    tracker.restore(failed)  # partition 0 moved on meanwhile: 12 stays
    assert tracker.take() == {0: 12, 1: 5}
    tracker.track(0, [12])
    tracker.track(1, [5])
    tracker.settle(0, [12])
    tracker.settle(1, [5])
    tracker.retain([1])
    assert tracker.take() == {1: 6}
    tracker.settle(0, [13])  # a partition no longer ours: nothing to commit for it
    assert not tracker


def test_commit_tracker_never_passes_an_input_whose_outputs_are_not_acknowledged() -> None:
    tracker: CommitTracker[str] = CommitTracker()
    tracker.track("p", [3, 5, 8, 9, 12])  # offsets need not be contiguous (compaction, markers)
    tracker.settle("p", [5, 9])  # cache hits of the step, before its misses
    assert tracker.take() == {}
    tracker.settle("p", [3])
    assert tracker.take() == {"p": 8}  # 3 and 5 done; 8 still decoding
    tracker.settle("p", [12])
    assert tracker.take() == {}
    tracker.settle("p", [8])
    assert tracker.take() == {"p": 13}
    tracker.track("p", [13, 14])
    tracker.forget(["p"])
    tracker.settle("p", [13, 14])
    assert tracker.take() == {}


class _Step:
    """A core step whose ready part and three finishing parts are given."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    async def begin(self, batch: Sequence[InboundMessage]) -> RunningStep:
        async def finishing() -> AsyncIterator[Settled]:
            for message in batch[1:]:
                await asyncio.sleep(0)
                yield Settled(_outcome(), [message])

        return RunningStep(Settled(_outcome(), [batch[0]]), finishing())


def _outcome() -> BatchOutcome:
    return BatchOutcome([], [], [], BatchMetricsEvent(batch_id="b", worker_id="w", ts=datetime.now(UTC), size=1,
                                                      valid=1, unique=1, cache_hits=0, cache_misses=1,
                                                      cache_errors=0, cache_available=True, parsed=0, cached=0,
                                                      dead_lettered=0, inference_ms=0.0, batch_ms=0.0, tokens_in=0,
                                                      tokens_out=0, model="m", spec=SpecRef(name="s", version="1")),
                        [])


class BrokenOnce:
    """A delivery that raises (a bug, not a broker error) for one input."""

    def __init__(self, broken: str) -> None:
        self.broken = broken
        self.delivered: list[str] = []

    async def deliver(self, outcome: BatchOutcome, inputs: list[str]) -> bool:
        if self.broken in inputs:
            raise KeyError(self.broken)
        self.delivered += inputs
        return True


async def test_a_part_whose_delivery_fails_does_not_strand_the_steps_other_parts() -> None:
    delivery = BrokenOnce(broken="2")
    flow: InFlight[list[str]] = InFlight(_Step(WorkerRuntime(Settings())), delivery, limit=10)  # type: ignore[arg-type]
    batch = [InboundMessage(b"q", b"k", "in", 0, str(offset), 0, {}) for offset in range(5)]
    finished = await flow.start(batch, lambda messages: [m.offset for m in messages])
    await asyncio.wait_for(finished, 5)
    # The hit at once, the misses as they finish; the part that raised did not take 3 and 4 with it.
    assert delivery.delivered == ["0", "1", "3", "4"]
    assert flow.room == 10  # nothing held: the failed part's inputs are simply not acknowledged


def test_recording_a_batch_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = WorkerRuntime(Settings())

    def broken(outcome: BatchOutcome) -> None:
        raise ValueError("a metrics bug")

    monkeypatch.setattr(runtime.metrics, "observe", broken)
    runtime.record(_outcome())  # logged, not raised: the delivery goes on to note the inputs done


class TimingOutPublisher:
    """Hands records over with acks that arrive in random order; some hand-overs fail the way aiokafka's
    accumulator fails under a burst (``KafkaTimeoutError``) after handing over part of the records."""

    def __init__(self, failing_calls: set[int], seed: int) -> None:
        self.failing_calls = failing_calls
        self.calls = 0
        self.acknowledged: list[bytes] = []
        self._rng = random.Random(seed)

    async def enqueue(self, routed: dict[str, list[OutboundRecord]]) -> list[asyncio.Future[None]]:
        self.calls += 1
        loop = asyncio.get_running_loop()
        acks = []
        for records in routed.values():
            for record in records:
                if self.calls in self.failing_calls and acks:
                    raise KafkaTimeoutError()
                ack: asyncio.Future[None] = loop.create_future()
                loop.call_later(self._rng.uniform(0, 0.01), self._acknowledge, ack, record.key or b"")
                acks.append(ack)
        return acks

    def _acknowledge(self, ack: asyncio.Future[None], key: bytes) -> None:
        self.acknowledged.append(key)
        ack.set_result(None)

    async def publish(self, routed: dict[str, list[OutboundRecord]]) -> None:
        await asyncio.gather(*await self.enqueue(routed))

    def forget_partitions(self) -> None:
        pass


async def test_outputs_whose_hand_over_timed_out_are_republished_and_their_offsets_settled() -> None:
    settings = Settings(broker_commit_interval_s=3600.0)
    runtime = WorkerRuntime(settings)
    delivery = KafkaDelivery(settings, runtime, None, None, Retrying(runtime, asyncio.Event()))  # type: ignore[arg-type]
    publisher = TimingOutPublisher(failing_calls={3, 4, 9}, seed=5)
    delivery.publisher = publisher  # type: ignore[assignment]
    tp = TopicPartition("in", 0)
    delivery.offsets.track(tp, range(40))

    async def deliver(offsets: range) -> None:
        outcome = _outcome()
        outcome.parsed.extend(OutboundRecord(f"q{offset}".encode(), b"{}") for offset in offsets)
        await asyncio.sleep(random.Random(offsets.start).uniform(0, 0.01))
        await delivery.deliver(outcome, {tp: list(offsets)})

    # Steps' parts delivered concurrently, as their misses finish, as InFlight's tasks do.
    await asyncio.gather(*(deliver(range(start, start + 2)) for start in range(0, 40, 2)))
    await delivery.settle(wait=True)
    assert {f"q{offset}".encode() for offset in range(40)} <= set(publisher.acknowledged)
    assert delivery.offsets.take() == {tp: 40}
