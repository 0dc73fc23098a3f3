"""The delivery layer's shared policies: one retry rule, one stop rule, the commit tracker.

The transports' deliveries themselves run against the real broker and Redis in
test_kafka_runner.py, test_pipeline_kafka.py and test_redis_transport.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from schemas.events import BatchMetricsEvent, SpecRef
from schemas.settings import Settings
from streams.delivery import CommitTracker, InFlight, Retrying, Waiting
from streams.faust_runner import FaustDelivery
from streams.kafka_runner import BatchPublisher, KafkaDelivery
from streams.runtime import WorkerFailed, WorkerRuntime
from streams.web import build_web_app
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


def test_commit_tracker_says_what_each_partition_waits_for_and_since_when() -> None:
    now = [100.0]
    tracker: CommitTracker[str] = CommitTracker(clock=lambda: now[0])
    assert tracker.waiting() == {} and tracker.next_expected("p") is None
    tracker.track("p", [3, 5, 8])
    now[0] = 110.0
    tracker.track("p", [9])  # more behind the same first input: it has waited since it was fetched
    tracker.settle("p", [5, 9])
    assert tracker.waiting() == {"p": Waiting(3, 10.0, 4)}
    tracker.settle("p", [3])  # the position moves to 8: its wait starts now
    now[0] = 112.5
    assert tracker.waiting() == {"p": Waiting(8, 2.5, 2)}
    assert tracker.next_expected("p") == 10
    tracker.settle("p", [8])
    assert tracker.waiting() == {} and tracker.take() == {"p": 10}
    now[0] = 200.0
    tracker.track("p", [10])
    now[0] = 201.0
    assert tracker.waiting() == {"p": Waiting(10, 1.0, 1)}
    tracker.forget(["p"])
    assert tracker.waiting() == {} and tracker.next_expected("p") is None


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

    def fail(self, stage: str, error: BaseException) -> None:
        self.runtime.fail(stage, error)


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


@pytest.mark.parametrize("broken", ["0", "2"], ids=["ready part", "finishing part"])
async def test_a_part_whose_delivery_fails_stops_the_worker_without_stranding_the_steps_other_parts(
    broken: str,
) -> None:
    runtime = WorkerRuntime(Settings())
    stops: list[WorkerFailed] = []
    runtime.on_failure(stops.append)
    delivery = BrokenOnce(broken=broken)
    flow: InFlight[list[str]] = InFlight(_Step(runtime), delivery, limit=10)  # type: ignore[arg-type]
    batch = [InboundMessage(b"q", b"k", "in", 0, str(offset), 0, {}) for offset in range(5)]
    finished = await flow.start(batch, lambda messages: [m.offset for m in messages])  # does not raise
    await asyncio.wait_for(finished, 5)
    # The hit at once, the misses as they finish; the part that raised did not take the others with it.
    assert delivery.delivered == [offset for offset in ["0", "1", "2", "3", "4"] if offset != broken]
    assert flow.room == 10  # nothing held: the failed part's inputs are simply not acknowledged
    # ...and the worker stops, unready, naming the bug: its partitions would commit nothing past them.
    assert runtime.failure is not None and stops == [runtime.failure]
    assert "delivery: KeyError" in str(runtime.failure)
    ready, checks = runtime.readiness()
    assert not ready and "KeyError" in checks["failure"]


def test_recording_a_batch_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = WorkerRuntime(Settings())

    def broken(outcome: BatchOutcome) -> None:
        raise ValueError("a metrics bug")

    monkeypatch.setattr(runtime.metrics, "observe", broken)
    runtime.record(_outcome())  # logged, not raised: the delivery goes on to note the inputs done


class _ProducerBatch:
    """aiokafka's ``BatchBuilder`` as the publisher uses it: full at three records."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None, headers: object) -> object | None:
        if len(self.keys) == 3:
            return None
        self.keys.append(key or b"")
        return object()

    def record_count(self) -> int:
        return len(self.keys)


class FlakyProducer:
    """The producer calls ``BatchPublisher`` makes, with acks in random order; some hand-overs fail
    the way aiokafka's accumulator fails under a burst (``KafkaTimeoutError`` from ``send_batch``),
    after earlier batches of the same delivery were handed over."""

    def __init__(self, failing_sends: set[int], seed: int) -> None:
        self.failing_sends = failing_sends
        self.sends = 0
        self.acknowledged: list[bytes] = []
        self._rng = random.Random(seed)

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    def create_batch(self) -> _ProducerBatch:
        return _ProducerBatch()

    async def send_batch(self, batch: _ProducerBatch, topic: str, *, partition: int) -> asyncio.Future[None]:
        self.sends += 1
        if self.sends in self.failing_sends:
            raise KafkaTimeoutError()
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(self._rng.uniform(0, 0.01), self._acknowledge, ack, batch.keys)
        return ack

    def _acknowledge(self, ack: asyncio.Future[None], keys: list[bytes]) -> None:
        self.acknowledged.extend(keys)
        ack.set_result(None)


async def test_outputs_whose_hand_over_timed_out_partway_are_sent_once_and_their_offsets_settled() -> None:
    settings = Settings(broker_commit_interval_s=3600.0)
    runtime = WorkerRuntime(settings)
    delivery = KafkaDelivery(settings, runtime, None, None, Retrying(runtime, asyncio.Event()))  # type: ignore[arg-type]
    producer = FlakyProducer(failing_sends={2, 5, 6, 17, 30}, seed=5)
    delivery.publisher = BatchPublisher(producer)  # type: ignore[arg-type]
    tp = TopicPartition("in", 0)
    delivery.offsets.track(tp, range(60))

    async def deliver(offsets: range) -> None:
        outcome = _outcome()
        outcome.parsed.extend(OutboundRecord(f"q{offset}".encode(), b"{}") for offset in offsets)
        await asyncio.sleep(random.Random(offsets.start).uniform(0, 0.01))
        await delivery.deliver(outcome, {tp: list(offsets)})

    # Steps' parts delivered concurrently, as their misses finish, as InFlight's tasks do; each part's
    # records span several partitions and producer batches.
    await asyncio.gather(*(deliver(range(start, start + 12)) for start in range(0, 60, 12)))
    await delivery.settle(wait=True)
    parsed = [key for key in producer.acknowledged if key.startswith(b"q")]
    # Every output on the broker once: what the failed hand-over had already given the producer is
    # not sent again.
    assert sorted(parsed) == sorted(f"q{offset}".encode() for offset in range(60))
    assert delivery.offsets.take() == {tp: 60}


class _StubConsumer:
    """What the partition report reads of the consumer: its assignment, positions and high-waters."""

    def __init__(self, positions: dict[TopicPartition, int]) -> None:
        self.positions = positions

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def highwater(self, tp: TopicPartition) -> int:
        return self.positions[tp] + 3

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


async def test_partition_report_says_which_input_a_partition_waits_for_and_which_records_were_passed_over() -> None:
    from structlog.testing import capture_logs

    from streams.kafka_runner import KafkaBatchRunner, PartitionReport

    runtime = WorkerRuntime(Settings(batch_deadline_s=5.0))
    runner = KafkaBatchRunner(runtime.settings, runtime, asyncio.Event())
    clients = (runner.consumer, runner.producer)
    now = [0.0]
    runner.delivery.offsets = tracker = CommitTracker(clock=lambda: now[0])
    held, skipped, arriving, fine = (TopicPartition("in", partition) for partition in range(4))
    consumer = _StubConsumer({held: 9, skipped: 30, arriving: 52, fine: 42})
    runner.consumer = consumer  # type: ignore[assignment]
    tracker.track(held, [4, 5, 6])
    tracker.settle(held, [5, 6])  # 4 is still held (7 and 8, fetched, are on their way)
    tracker.track(skipped, [20, 21])
    tracker.settle(skipped, [20, 21])  # all done, but the consumer is at 30: 22-29 never came
    tracker.track(arriving, [48, 49])
    tracker.settle(arriving, [48, 49])  # 50 and 51 fetched, handed over before the next report
    tracker.track(fine, [40, 41])
    tracker.settle(fine, [40, 41])
    report = PartitionReport(runner)

    def gauge(name: str, tp: TopicPartition) -> float | None:
        return runtime.metrics.registry.get_sample_value(name, {"topic": tp.topic, "partition": str(tp.partition)})

    try:
        with capture_logs() as logs:
            now[0] = 9.0  # under twice batch_deadline_s
            await report.once()
            assert logs == []  # a gap is told only once the next report still sees it
            tracker.track(arriving, [50, 51])
            tracker.settle(arriving, [50, 51])
            await report.once()
            assert [(entry["event"], entry["partition"], entry["first"], entry["position"]) for entry in logs] == [
                ("fetch.offsets_passed", 1, 22, 30)]
            assert gauge("qustream_inputs_unsettled", held) == 3
            assert gauge("qustream_commit_waiting_seconds", held) == 9.0
            assert gauge("qustream_inputs_unsettled", fine) == 0
            assert gauge("qustream_consumer_lag", fine) == 3
            now[0] = 10.5
            await report.once()
            await report.once()
    finally:
        await clients[0].stop()
        await clients[1].stop()
        await runner.deliveries.close()
    assert [entry["event"] for entry in logs] == ["fetch.offsets_passed", "commit.waiting"]  # each once
    wait = logs[1]
    assert (wait["partition"], wait["offset"], wait["unsettled"], wait["seconds"]) == (0, 4, 3, 10.5)
    assert wait["steps_finishing"] == 0 and wait["batches_unacknowledged"] == 0 and wait["misses_in_flight"] == 0


async def test_steps_linger_for_more_records_only_where_the_step_is_the_model_batch() -> None:
    from streams.kafka_runner import KafkaBatchRunner

    async def linger_of(**overrides: object) -> float:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        runner = KafkaBatchRunner(settings, WorkerRuntime(settings), asyncio.Event())
        await runner.consumer.stop()
        await runner.producer.stop()
        await runner.deliveries.close()
        return runner.linger_s

    # Continuous batching: cache hits go out at once; misses wait for each other at the model instead.
    assert await linger_of() == await linger_of(batch_linger_ms=20) == 0.0
    assert await linger_of(continuous_batching=False) == 0.05
    assert await linger_of(continuous_batching=False, batch_linger_ms=20) == 0.02


class AckRecorder:
    """A Faust stream as far as acking goes."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    async def ack(self, event: SimpleNamespace) -> bool:
        self.acked.append((event.message.tp.partition, event.message.offset))
        return True


async def test_faust_events_are_acked_in_offset_order_whatever_order_they_are_delivered_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust commits the first run of consecutive acked offsets: a hit acked before the miss before it
    would let a commit pass the miss. Each partition's events are acked only behind every earlier one."""
    stream = AckRecorder()
    delivery = FaustDelivery(SimpleNamespace(producer=None), stream, WorkerRuntime(Settings()))  # type: ignore[arg-type]

    async def published(routed: object) -> None:
        return None

    monkeypatch.setattr(delivery, "_publish", published)

    first, second = [_event(0, offset) for offset in (0, 1, 2, 3)], [_event(1, 7), _event(1, 8)]
    delivery.track([*first, second[0], second[1]])
    await delivery.deliver(_outcome(), [first[1], first[3], second[1]])  # the hits, before the misses
    assert stream.acked == []
    await delivery.deliver(_outcome(), [first[0], second[0]])
    assert stream.acked == [(0, 0), (0, 1), (1, 7), (1, 8)]
    await delivery.deliver(_outcome(), [first[2]])
    assert stream.acked[4:] == [(0, 2), (0, 3)]


def _event(partition: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(message=SimpleNamespace(tp=TopicPartition("in", partition), offset=offset))


class _MissFirst:
    """A Faust delivery and steps whose first message is a miss that waits for ``miss_parsed``; the rest
    are hits, delivered at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runtime = WorkerRuntime(Settings())
        self.stream = AckRecorder()
        self.delivery = FaustDelivery(SimpleNamespace(producer=None), self.stream, self.runtime)  # type: ignore[arg-type]

        async def published(routed: object) -> None:
            return None

        monkeypatch.setattr(self.delivery, "_publish", published)
        self.miss_parsed = asyncio.Event()

    async def begin(self, batch: Sequence[InboundMessage]) -> RunningStep:
        async def finishing() -> AsyncIterator[Settled]:
            await self.miss_parsed.wait()
            yield Settled(_outcome(), [batch[0]])

        return RunningStep(Settled(_outcome(), list(batch[1:])), finishing())

    async def start(self, flow: InFlight[list[SimpleNamespace]], offsets: range) -> asyncio.Future[None]:
        """Partition 0's ``offsets`` tracked and begun as one step."""
        events = [_event(0, offset) for offset in offsets]
        messages = [InboundMessage(b"q", b"k", "in", 0, str(offset), 0, {}) for offset in offsets]
        event_of = {id(message): event for message, event in zip(messages, events, strict=True)}
        self.delivery.track(events)
        return await flow.start(messages, lambda settled: [event_of[id(m)] for m in settled])


async def test_hits_delivered_behind_a_miss_count_against_the_in_flight_limit_until_it_is_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash redoes every input the commit position has not passed, published or not: the limit
    bounds those, not only the inputs still in the model, so a miss held up for long stops the fetching
    instead of letting the hits behind it pile up uncommitted."""
    steps = _MissFirst(monkeypatch)
    flow: InFlight[list[SimpleNamespace]] = InFlight(
        steps, steps.delivery, limit=8, uncommitted=steps.delivery.order.unsettled  # type: ignore[arg-type]
    )
    finished = await steps.start(flow, range(6))
    assert steps.stream.acked == []  # the hits are published, but not acked past the miss
    assert flow.room == 2  # five hits delivered, yet six inputs the commit cannot pass
    assert await flow.wait_for_room(0.05) == 2

    steps.delivery.track([_event(0, 6), _event(0, 7)])
    assert flow.room == 0
    assert await flow.wait_for_room(0.05) == 0  # stays full while the miss is in the model

    waiter = asyncio.ensure_future(flow.wait_for_room(5))
    steps.miss_parsed.set()
    await asyncio.wait_for(finished, 5)
    assert await asyncio.wait_for(waiter, 1) == 6  # woken as the miss was delivered: 6 and 7 remain open
    assert steps.stream.acked == [(0, offset) for offset in range(6)]


async def test_hits_delivered_behind_a_miss_are_bounded_apart_from_the_messages_not_yet_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delivered hit holds only its offset until the miss ahead of it is out: it counts against the
    larger uncommitted bound, not against the in-flight limit, so hits go on flowing past that limit."""
    steps = _MissFirst(monkeypatch)
    flow: InFlight[list[SimpleNamespace]] = InFlight(
        steps, steps.delivery, limit=4,  # type: ignore[arg-type]
        uncommitted=steps.delivery.order.unsettled, uncommitted_limit=10,
    )
    finished = await steps.start(flow, range(6))
    # One miss held, six offsets open: room under both bounds, though six exceed the in-flight limit.
    assert flow.room == 3
    steps.delivery.track([_event(0, offset) for offset in range(6, 10)])
    assert flow.room == 0  # ten offsets open: the uncommitted bound
    steps.miss_parsed.set()
    await asyncio.wait_for(finished, 5)
    assert flow.room == 4  # the six are acked; 6-9 stay open (tracked only, never started)


async def test_a_stop_whose_grace_runs_out_says_how_many_inputs_it_left_undelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM during a long model batch: past the grace the misses are given up, and one warning says how
    many inputs were left (per partition), how many the commit position has not passed, and what becomes
    of them; a stop within the grace says nothing."""
    from structlog.testing import capture_logs

    steps = _MissFirst(monkeypatch)
    flow: InFlight[list[SimpleNamespace]] = InFlight(
        steps, steps.delivery, limit=8, uncommitted=steps.delivery.order.unsettled  # type: ignore[arg-type]
    )
    finished = await steps.start(flow, range(6))  # five hits delivered, the miss stays in the model
    with capture_logs() as logs:
        assert await flow.stop(0.05, "redone by the next owner") == 1
    await asyncio.sleep(0)
    assert finished.cancelled()
    [warning] = [entry for entry in logs if entry["event"] == "worker.stop_grace_exceeded"]
    assert warning["log_level"] == "warning"
    assert (warning["grace_s"], warning["inputs"], warning["partitions"], warning["uncommitted"]) == (
        0.05, 1, {"in/0": 1}, 6)
    assert "redone by the next owner" in warning["note"]

    steps = _MissFirst(monkeypatch)
    flow = InFlight(steps, steps.delivery, limit=8)  # type: ignore[arg-type]
    await steps.start(flow, range(3))
    steps.miss_parsed.set()
    with capture_logs() as logs:
        assert await flow.stop(5, "redone") == 0
    assert not [entry for entry in logs if entry["event"] == "worker.stop_grace_exceeded"]


def test_the_stop_grace_of_the_retry_policy_is_the_setting() -> None:
    assert Retrying(WorkerRuntime(Settings(stop_grace_s=3)), asyncio.Event()).grace_s == 3


def test_a_revoked_partition_no_longer_waits_to_be_acked() -> None:
    stream = AckRecorder()
    delivery = FaustDelivery(SimpleNamespace(producer=None), stream, WorkerRuntime(Settings()))  # type: ignore[arg-type]
    events = [SimpleNamespace(message=SimpleNamespace(tp=TopicPartition("in", partition), offset=offset))
              for partition in (0, 1) for offset in (0, 1)]
    delivery.track(events)
    delivery.forget([TopicPartition("in", 0)])
    assert delivery.order.unsettled() == 2
    assert set(delivery.order.waiting()) == {TopicPartition("in", 1)}
    assert set(delivery._not_acked) == {TopicPartition("in", 1)}


async def test_a_failed_worker_answers_503_on_both_probes_naming_the_bug() -> None:
    runtime = WorkerRuntime(Settings())
    client = TestClient(TestServer(build_web_app(runtime)))
    await client.start_server()
    try:
        assert (await client.get("/health")).status == 200
        runtime.fail("delivery", KeyError("a bug"))
        health = await client.get("/health")
        assert health.status == 503 and "delivery: KeyError" in (await health.json())["error"]
        ready = await client.get("/ready")
        assert ready.status == 503 and "KeyError" in (await ready.json())["checks"]["failure"]
    finally:
        await client.close()
        await runtime.close()
