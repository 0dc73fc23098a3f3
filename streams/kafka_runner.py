"""The default Kafka runner: one aiokafka consumer-group loop, batch in, batch out.

consume a micro-batch (sized by ``WorkerRuntime.step``) → core step (``WorkerRuntime.begin``) →
``KafkaDelivery.deliver``: hand every output to the producer (acks=all) → once the broker
acknowledged them, mark the batch's offsets committable → commit every ``broker_commit_interval_s``
and before partitions are given up. With ``continuous_batching`` (the default) a step's cache hits and
dead letters are delivered at once and its misses as their rows finish (``streams.delivery.InFlight``),
while the loop fetches on; a partition is committed only up to its first message whose outputs are
not acknowledged (``CommitTracker``). Up to ``_MAX_IN_FLIGHT`` batches wait for their acks while the
next ones are processed; they are settled in order. Retries and the stop rule: ``streams.delivery``.

Why not the Faust agent (still available: ``QUSTREAM_KAFKA_RUNNER=faust``): Faust turns every
message into an event that travels through its conductor, a channel queue, the stream iterator,
sensors and per-event acks. On all-cached traffic that machinery costs as much CPU as the whole
core step (README, "Performance"); this loop hands the fetched batch to the core step as it is,
and publishes with one producer batch per output partition instead of one ``send`` per record.

Delivery contract (the same as the Faust runner's): at least once. An offset is committed only
after every output of its batch was acknowledged; a batch whose publish never succeeds is not
committed and is processed again by whoever owns the partition next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from schemas.settings import Settings
from streams.broker_watch import BrokerWatch
from streams.deliveries import GIVEN_UP_ON_STOP, KafkaDeliveryCounter
from streams.delivery import CommitTracker, InFlight, OutputNames, Retrying, Routed, route
from streams.kafka_io import close_consumer, inbound_from_kafka, make_consumer, make_producer
from streams.partitioner import partitions_for_keys
from streams.runtime import WorkerRuntime
from workers.core_step import BatchOutcome, InboundMessage, OutboundRecord

#: The inputs a delivery settles: their offsets, by partition.
Settles = dict[TopicPartition, list[int]]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: How long one fetch waits for a first record; bounds how late a stop request is noticed.
_POLL_MS = 200
_LAG_INTERVAL_S = 5.0
_COMMIT_TIMEOUT_S = 15.0
_LEAVE_TIMEOUT_S = 5.0

#: Records as fetched, by partition, in offset order.
Fetched = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class BatchPublisher:
    """Sends a batch's outputs as one producer batch per (topic, partition) and waits for the acks.

    Records are placed on partitions as aiokafka's ``DefaultPartitioner`` (murmur2 of the key, as
    the Java client does) places them, exactly where ``producer.send`` would have put them.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._partitions: dict[str, list[int]] = {}
        # One hand-over at a time. aiokafka queues one batch per partition and makes the next wait for
        # it; its wait's timeout shrinks by the whole time waited at each wake-up, so many deliveries
        # waiting on the same partitions at once (steps' misses finishing together in a burst) time out.
        self._handing_over = asyncio.Lock()

    async def publish(self, routed: Routed) -> None:
        """Enqueue and wait for every acknowledgement."""
        await asyncio.gather(*await self.enqueue(routed))

    async def enqueue(self, routed: Routed) -> list[asyncio.Future[Any]]:
        """Hand the records to the producer, in order per partition; the futures resolve on the acks.
        ``HandOverIncomplete`` when it failed after some were handed over."""
        handed = _HandedOver()
        try:
            async with self._handing_over:
                await self._hand_over(routed, handed)
        except Exception as exc:
            if not handed.acks:
                raise
            remaining = {topic: [record for record in records if id(record) not in handed.records]
                         for topic, records in routed.items()}
            raise HandOverIncomplete(handed.acks, remaining, exc) from exc
        return handed.acks

    async def _hand_over(self, routed: Routed, handed: _HandedOver) -> None:
        for topic, records in routed.items():
            if not records:
                continue
            partitions = self._partitions.get(topic)
            if partitions is None:
                partitions = self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
            by_partition: dict[int, list[OutboundRecord]] = defaultdict(list)
            for partition, record in zip(partitions_for_keys([r.key for r in records], partitions), records,
                                         strict=True):
                by_partition[partition].append(record)
            for partition, in_order in by_partition.items():
                await self._send_in_batches(topic, partition, in_order, handed)

    async def _send_in_batches(
        self, topic: str, partition: int, records: list[OutboundRecord], handed: _HandedOver
    ) -> None:
        producer = self._producer
        batch = producer.create_batch()
        in_batch: list[OutboundRecord] = []
        for record in records:
            if batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers) is None:
                if batch.record_count():
                    handed.add(await producer.send_batch(batch, topic, partition=partition), in_batch)
                    batch, in_batch = producer.create_batch(), []
                if batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers) is None:
                    # Larger than a whole producer batch: the record goes on its own.
                    handed.add(await producer.send(topic, record.value, key=record.key, partition=partition,
                                                   headers=record.headers), [record])
                    continue
            in_batch.append(record)
        if batch.record_count():
            handed.add(await producer.send_batch(batch, topic, partition=partition), in_batch)

    def forget_partitions(self) -> None:
        """After a publish error: the topic's partition count is read again (it may have grown)."""
        self._partitions.clear()


class _HandedOver:
    """The producer futures of the records handed over so far, and which records they carry."""

    def __init__(self) -> None:
        self.acks: list[asyncio.Future[Any]] = []
        self.records: set[int] = set()

    def add(self, ack: asyncio.Future[Any], records: list[OutboundRecord]) -> None:
        self.acks.append(ack)
        self.records.update(map(id, records))


class HandOverIncomplete(Exception):
    """Handing a batch's records to the producer failed after some of them were handed over (aiokafka
    gives up waiting for a partition's queue under a burst): their acks, and the records still to send."""

    def __init__(self, acks: list[asyncio.Future[Any]], remaining: Routed, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.acks = acks
        self.remaining = remaining


@dataclass
class _InFlight:
    """A batch whose outputs are with the producer: committable once ``acks`` resolves and whatever
    was not handed over (``unsent``) was published too."""

    acks: asyncio.Future[Any] | None  # None: handing the records over failed; settled by retrying
    routed: Routed
    outcome: BatchOutcome
    settles: Settles
    #: Records the hand-over did not reach (it failed partway): published when the batch is settled.
    unsent: Routed | None = None


#: Batches whose acks may be outstanding while the next ones are processed: the broker round trip of
#: one batch overlaps the core step of the next instead of idling the loop (its gain alone was not
#: measurable through this machine's noise; the runner as a whole is measured in README "Performance").
_MAX_IN_FLIGHT = 4


class KafkaDelivery:
    """The batch runner's ``Delivery``: inputs are the offsets, by partition, that the outputs settle.

    ``deliver`` hands the outputs to the producer and returns; the batch is settled (acks awaited,
    republished on failure, counted, its offsets noted committable) in order, when more than
    ``_MAX_IN_FLIGHT`` wait or when the runner calls ``settle``. ``checkpoint`` settles everything
    and commits: before partitions move and on stop.
    """

    def __init__(self, settings: Settings, runtime: WorkerRuntime, consumer: AIOKafkaConsumer,
                 producer: AIOKafkaProducer, retrying: Retrying) -> None:
        self.settings = settings
        self.runtime = runtime
        self.consumer = consumer
        self.publisher = BatchPublisher(producer)
        self.retrying = retrying
        self.names = OutputNames.kafka(settings)
        self.offsets: CommitTracker[TopicPartition] = CommitTracker()
        self._in_flight: deque[_InFlight] = deque()
        self._settling = 0
        self._last_commit = time.monotonic()

    @property
    def in_flight(self) -> bool:
        return bool(self._in_flight)

    @property
    def batches_unacknowledged(self) -> int:
        """Batches handed to the producer and not yet settled (being settled included)."""
        return len(self._in_flight) + self._settling

    async def deliver(self, outcome: BatchOutcome, inputs: Settles) -> bool:
        routed = route(outcome, self.names)
        unsent: Routed | None = None
        try:
            acks: asyncio.Future[Any] | None = asyncio.gather(*await self.publisher.enqueue(routed))
        except HandOverIncomplete as partial:
            # Only what did not reach the producer is sent again: republishing it all would put the
            # rest on the topics twice.
            unsent = partial.remaining
            log.warning("publish.enqueue_incomplete", error=str(partial),
                        unsent=sum(len(records) for records in unsent.values()))
            acks = asyncio.gather(*partial.acks)
        except Exception as exc:  # e.g. the broker's metadata is unreachable; retried when settled
            log.warning("publish.enqueue_failed", error=f"{type(exc).__name__}: {exc}")
            acks = None
        self._in_flight.append(_InFlight(acks, routed, outcome, inputs, unsent))
        if len(self._in_flight) > _MAX_IN_FLIGHT:
            return await self._settle_oldest()
        return True

    async def settle(self, *, wait: bool) -> None:
        """Settle the acknowledged batches in order (all of them when ``wait``)."""
        while self._in_flight:
            head = self._in_flight[0].acks
            if not wait and head is not None and not head.done():
                return
            if not await self._settle_oldest():
                return

    async def checkpoint(self) -> None:
        """Every batch settled, then every committable offset committed."""
        await self.settle(wait=True)
        await self.commit()

    async def _settle_oldest(self) -> bool:
        """Wait for the oldest batch's acks (republishing on failure), then count it and note its
        offsets. False when stopping left it unpublished: it and every later batch stay uncommitted."""
        batch = self._in_flight.popleft()
        self._settling += 1
        try:
            published = await self._published(batch)
        finally:
            self._settling -= 1
        if not published:
            self._in_flight.clear()  # not committed: processed again by the partition's next owner
            return False
        self.runtime.record(batch.outcome)
        for tp, offsets in batch.settles.items():
            self.offsets.settle(tp, offsets)
        return True

    async def _published(self, batch: _InFlight) -> bool:
        """Once the batch's acks arrived and what was not handed over was published (True); on a
        failure the whole batch is republished until it lands, unless stopping gives it up."""
        try:
            if batch.acks is None:
                raise RuntimeError("records were not handed to the producer")
            await batch.acks
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("publish.failed", error=f"{type(exc).__name__}: {exc}", note="republishing the batch")
            return await self.retrying.publish(self._sender(batch.routed))
        return True if batch.unsent is None else await self.retrying.publish(self._sender(batch.unsent))

    def _sender(self, routed: Routed) -> Callable[[], Awaitable[None]]:
        """One attempt after another at publishing ``routed``: each sends what the ones before did not
        get onto the broker (an attempt whose hand-over failed partway leaves only the rest)."""
        pending = routed

        async def attempt() -> None:
            nonlocal pending
            try:
                await self.publisher.publish(pending)
            except HandOverIncomplete as partial:
                self.publisher.forget_partitions()
                await asyncio.gather(*partial.acks)
                pending = partial.remaining
                raise
            except Exception:
                self.publisher.forget_partitions()
                raise

        return attempt

    def commit_due(self) -> bool:
        return bool(self.offsets) and (
            time.monotonic() - self._last_commit >= self.settings.broker_commit_interval_s
        )

    async def commit(self) -> None:
        """Commit what was published. After a rebalance the offsets are no longer ours and are
        dropped; after a timeout or broker error they are kept for the next commit. Either way a
        failure costs duplicates, never loss."""
        if not self.offsets:
            return
        offsets = self.offsets.take()
        self._last_commit = time.monotonic()
        try:
            # Bounded: aiokafka waits for a coordinator without limit, and a stop must not hang on it.
            await asyncio.wait_for(self.consumer.commit(offsets), _COMMIT_TIMEOUT_S)
        except CommitFailedError as exc:
            log.warning("kafka.commit_failed", error=str(exc), partitions=sorted(tp.partition for tp in offsets))
        except (KafkaError, TimeoutError) as exc:
            log.warning("kafka.commit_deferred", error=f"{type(exc).__name__}: {exc}",
                        partitions=sorted(tp.partition for tp in offsets))
            self.offsets.restore(offsets)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaBatchRunner) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._owner.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._owner.partitions_assigned(assigned)


class KafkaBatchRunner:
    """Consumes the input topic in the ``app_id`` consumer group until ``stop`` is set."""

    def __init__(self, settings: Settings, runtime: WorkerRuntime, stop: asyncio.Event) -> None:
        self.settings = settings
        self.runtime = runtime
        self.stop = stop
        self.topic = settings.topic_input
        self.batch_size = settings.batch_size
        self.linger_s = settings.fetch_linger_ms / 1000
        model_batches_per_step = -(-max(settings.batch_size, settings.batch_max_records) // settings.batch_size)
        self.consumer = make_consumer(
            settings,
            group_id=settings.app_id,
            client_id=f"qustream-{settings.worker_id}",
            max_poll_records=max(settings.batch_size, settings.batch_max_records),
            session_timeout_ms=int(settings.broker_session_timeout_s * 1000),
            heartbeat_interval_ms=int(settings.broker_heartbeat_s * 1000),
            # A slow step must not cost the membership: one sized for hits may meet only misses (say,
            # after a model change emptied the cache) and run all of them, batch_size at a time, each
            # model batch up to its deadline (split and retried within it).
            max_poll_interval_ms=int(max(300.0, (model_batches_per_step + 3) * settings.batch_deadline_s) * 1000),
        )
        # Whole batches are handed over at once, so there is nothing to linger for.
        self.producer = make_producer(settings, linger_ms=0, max_batch_size=1_048_576)
        self.retrying = Retrying(runtime, stop)
        self.delivery = KafkaDelivery(settings, runtime, self.consumer, self.producer, self.retrying)
        self.deliveries = KafkaDeliveryCounter(settings, needs_model=runtime.needs_model,
                                               stopping=lambda: stop.is_set() or runtime.failure is not None)
        self.flow = InFlight(runtime, self.delivery, settings.max_in_flight_messages,
                             uncommitted=self.delivery.offsets.unsettled,
                             uncommitted_limit=settings.max_uncommitted_messages)
        # Held from "is this partition still ours" to "offsets noted": a rebalance waits for the
        # batches in flight and commits them before the partitions move.
        self._batch_lock = asyncio.Lock()
        # An idle worker fetches nothing and publishes nothing: this notices a broker that stopped answering.
        self.broker_watch = BrokerWatch(runtime, self.consumer.topics)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.runtime.wait_serving()
        if not await self._start_clients():
            await self._leave_group()
            await self.producer.stop()
            return
        lag_reporter = asyncio.create_task(self._report_partitions(), name="kafka-partitions")
        watch = asyncio.create_task(self.broker_watch.run(), name="kafka-broker-watch")
        try:
            while not self.stop.is_set():
                fetched = await self._fetch()
                async with self._batch_lock:
                    if fetched:
                        await self._step(fetched)
                    # Idle: settle everything, so a trickle of traffic is committed and counted.
                    await self.delivery.settle(wait=not fetched)
                    if self.delivery.commit_due():
                        await self.delivery.commit()
        finally:
            lag_reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_reporter
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            async with self._batch_lock:
                # Misses still being parsed; past the grace, uncommitted, so redone by the next owner.
                await self.flow.stop(self.settings.stop_grace_s, GIVEN_UP_ON_STOP)
                await self.delivery.checkpoint()
            self.runtime.set_transport(assigned=set())
            await self._leave_group()
            await self.producer.stop()
            await self.deliveries.close()
            log.info("kafka.consumer_stopped", group=self.settings.app_id)

    async def _start_clients(self) -> bool:
        """Connect, retrying while the broker is unreachable (a worker may start before Kafka);
        False if asked to stop first."""
        while not self.stop.is_set():
            try:
                await self.producer.start()
                self.consumer.subscribe([self.topic], listener=_Rebalance(self))
                # ``start`` returns once the group assigned partitions: on Apache Kafka, after every member
                # rejoined, up to the rebalance timeout.
                started, _ = await _unless_stopped(self.consumer.start(), self.stop,
                                                   waiting_for="the group's first join", expected_s=0.0)
                if not started:
                    return False
                self.retrying.succeeded()
                return True
            except KafkaError as exc:
                delay = self.retrying.failed()
                log.error("kafka.unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 2))
                await self.retrying.pause(delay)
        return False

    async def _leave_group(self) -> None:
        """Stop the consumer, which leaves the group so the partitions move at once. Bounded: a stop
        during a rebalance finds aiokafka's coordinator waiting for the join's answer, which Apache
        Kafka gives once every member rejoined (up to the rebalance timeout), and an unreachable broker
        answers nothing. Given up, the member is dropped by the broker after ``broker_session_timeout_s``
        instead; nothing uncommitted is lost."""
        problem = await close_consumer(self.consumer, _LEAVE_TIMEOUT_S)
        if problem is not None:
            log.warning("kafka.leave_abandoned", problem=problem,
                        note="the group coordinator did not answer in time (a rebalance in progress, or the broker "
                        "unreachable), or closing failed; if this member did not leave the group, the broker "
                        "drops it after QUSTREAM_BROKER_SESSION_TIMEOUT_S and rebalances once more")

    # --- rebalance ----------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._batch_lock:  # the batches in flight finish and are committed first
            await self.flow.drain(self.settings.batch_deadline_s)
            await self.delivery.checkpoint()
            self.delivery.offsets.forget(revoked)
        if revoked:  # the first join revokes nothing
            log.info("partitions.revoked", partitions=sorted(tp.partition for tp in revoked))

    def partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        mine = {(tp.topic, tp.partition) for tp in assigned if tp.topic == self.topic}
        self.delivery.offsets.retain(assigned)
        self.runtime.set_transport(connected=True, assigned=mine)
        self.broker_watch.answered()
        log.info("partitions.assigned", partitions=sorted(p for _, p in mine))

    # --- one step -----------------------------------------------------------------------------

    async def _fetch(self) -> Fetched:
        """What is there now, up to the step size (``WorkerRuntime.step``); then, while fewer than
        ``batch_size`` came, more until ``Settings.fetch_linger_ms`` (lingering fills model batches only)."""
        # No room while batches wait for acks: return at once, so the loop settles them (which may
        # move the commit positions the room counts) instead of waiting the poll out.
        room = self.flow.room if self.delivery.in_flight else await self.flow.wait_for_room(_POLL_MS / 1000)
        if not room:  # backpressure: the messages taken are bounded, fetched on once some are committable
            return {}
        try:
            # With batches in flight, do not wait for input: the loop goes on to settle them.
            poll_ms = 0 if self.delivery.in_flight else _POLL_MS
            fetched = await self._getmany(poll_ms, min(self.runtime.step.limit, room))
        except KafkaError as exc:  # e.g. an offset out of range after retention; aiokafka resets and goes on
            log.error("kafka.fetch_failed", error=f"{type(exc).__name__}: {exc}")
            await self.retrying.pause(self.retrying.delay())
            return {}
        count = sum(len(records) for records in fetched.values())
        if count:
            self.broker_watch.answered()
        if not count or self.linger_s <= 0:
            return fetched
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_s
        while count < min(self.batch_size, room) and not self.stop.is_set():
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                break
            more = await self._getmany(remaining_ms, min(self.batch_size, room) - count)
            for tp, records in more.items():
                fetched.setdefault(tp, []).extend(records)
                count += len(records)
        return fetched

    async def _getmany(self, timeout_ms: int, max_records: int) -> Fetched:
        """``getmany``, given up (nothing fetched) when a stop is requested: while the group rebalances,
        aiokafka's ``getmany`` waits for the new assignment whatever its timeout."""
        done, fetched = await _unless_stopped(
            self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records), self.stop,
            waiting_for="the group's rebalance", expected_s=timeout_ms / 1000)
        return fetched if done and fetched is not None else {}

    async def _step(self, fetched: Fetched) -> None:
        """Core step, then delivery; called with the batch lock held."""
        # Records fetched before a rebalance took their partition away are left to the new owner,
        # which starts from the offsets committed when the partition was revoked.
        assigned = self.consumer.assignment()
        mine = {tp: records for tp, records in fetched.items() if records and tp in assigned}
        if not mine:
            return
        for tp, records in mine.items():
            self.delivery.offsets.track(tp, [record.offset for record in records])
        messages = [inbound_from_kafka(record) for records in mine.values() for record in records]
        await self.deliveries.run(
            messages, lambda part, delivered: self.flow.start(part, _settles, delivered=delivered))

    async def _report_partitions(self) -> None:
        report = PartitionReport(self)
        while True:
            await asyncio.sleep(_LAG_INTERVAL_S)
            await report.once()

    def work_in_progress(self) -> dict[str, Any]:
        """Where the worker's work stands, for a log line about a partition that waits."""
        pipeline = self.runtime.pipeline
        idle = pipeline.model_idle_s() if pipeline is not None else None
        return {
            "steps_finishing": self.flow.steps_finishing,
            "misses_in_flight": pipeline.misses_in_flight if pipeline is not None else 0,
            "model_idle_s": round(idle, 1) if idle is not None else None,
            "batches_unacknowledged": self.delivery.batches_unacknowledged,
        }


class PartitionReport:
    """Every few seconds, per assigned partition: the lag, the inputs whose outputs are not
    acknowledged yet and how long the committable position has waited for the first of them.

    Logged once each, with where the worker's work stands: a position that has waited twice
    ``batch_deadline_s`` (a partition that stopped moving looks like one working through a deep
    backlog only until ``model_idle_s`` is read), and a consumer position that stays past the last
    input handed to the core step while none is open (transaction markers and compaction leave such
    gaps; on a topic with neither, records were passed over without being processed).
    """

    def __init__(self, runner: KafkaBatchRunner) -> None:
        self.runner = runner
        self.stall_after_s = 2 * runner.settings.batch_deadline_s
        self._reported_waits: dict[TopicPartition, int] = {}
        self._gaps_seen: dict[TopicPartition, int] = {}
        self._reported_gaps: dict[TopicPartition, int] = {}

    async def once(self) -> None:
        runner = self.runner
        metrics = runner.runtime.metrics
        offsets = runner.delivery.offsets
        waiting = offsets.waiting()
        for tp in runner.consumer.assignment():
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            held = waiting.get(tp)
            metrics.inputs_unsettled.labels(**labels).set(held.inputs if held else 0)
            metrics.commit_waiting.labels(**labels).set(held.seconds if held else 0.0)
            with contextlib.suppress(Exception):  # a partition moving away mid-report
                highwater = runner.consumer.highwater(tp)
                position = await runner.consumer.position(tp)
                if highwater is not None:
                    metrics.consumer_lag.labels(**labels).set(max(highwater - position, 0))
                stalled = held is not None and held.seconds >= self.stall_after_s
                if held is not None and stalled and self._reported_waits.get(tp) != held.offset:
                    self._reported_waits[tp] = held.offset
                    log.warning("commit.waiting", partition=tp.partition, offset=held.offset,
                                seconds=round(held.seconds, 1), unsettled=held.inputs, position=position,
                                highwater=highwater, **runner.work_in_progress())
                expected = offsets.next_expected(tp)
                gap = held is None and expected is not None and position > expected
                # Twice in a row: records fetched a moment ago and about to be handed over are no gap.
                if gap and self._gaps_seen.get(tp) == position and self._reported_gaps.get(tp) != position:
                    self._reported_gaps[tp] = position
                    log.warning("fetch.offsets_passed", partition=tp.partition, first=expected, position=position,
                                note="not handed to the core step: transaction markers or compaction, else "
                                "records the consumer skipped (not committed)")
                self._gaps_seen[tp] = position if gap else -1


async def _unless_stopped(call: Awaitable[_T], stop: asyncio.Event, *, waiting_for: str,
                          expected_s: float) -> tuple[bool, _T | None]:
    """(True, ``call``'s result), or (False, None) when ``stop`` is set first (``call`` is then cancelled).

    aiokafka waits for a group's (re)join without a timeout of its own, in ``start`` and in ``getmany``;
    on Apache Kafka that lasts until every member rejoined, up to the rebalance timeout
    (``max_poll_interval_ms``: minutes here), far past an orchestrator's stop grace. Cancelling is safe:
    what it waits on is a future that aiokafka resolves only if it is still pending."""
    if stop.is_set():
        if asyncio.iscoroutine(call):
            call.close()
        return False, None
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.ensure_future(call)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        given_up = not task.done()
        if given_up:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if given_up:
        waited_s = loop.time() - started
        if waited_s > expected_s:  # held past its own timeout: not a plain poll that the stop cut short
            log.info("kafka.stopped_while_waiting", waiting_for=waiting_for, waited_s=round(waited_s, 1))
        return False, None
    return True, task.result()


def _settles(messages: Sequence[InboundMessage]) -> Settles:
    """The offsets, by partition, that delivering these messages' outputs settles."""
    settles: Settles = {}
    last: tuple[str, int] | None = None
    offsets: list[int] = []
    for message in messages:
        where = (message.topic, message.partition)
        if where != last:
            offsets = settles.setdefault(TopicPartition(*where), [])
            last = where
        offsets.append(int(message.offset))
    return settles
