"""The Faust app: one thin agent that hands micro-batches to the core step and publishes the result.

Why it is shaped this way (from faust-streaming's issue tracker):
- ``noack_take`` + manual acks after the broker acknowledged every output: ``take_events`` acks
  in a ``finally`` even when the body raises or the worker is stopping, which would commit offsets
  of messages whose outputs were never written.
- ``concurrency=1``: more than one instance per agent can commit past unprocessed messages; scale
  with partitions and worker processes instead.
- The body never raises: the core step turns every bad message into a dead letter, and a failed
  publish is retried (``streams.delivery``) until it succeeds or Faust cancels the agent on stop
  (then the batch is not acked and is redone elsewhere).
- ``value_serializer='raw'``: bytes in, validated by pydantic in the core step, so a poison message
  cannot crash Faust's deserializer.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faust
import structlog
from faust.types import EventT, StreamT

from schemas.settings import Settings
from streams.broker_watch import BrokerWatch, MetadataProbe
from streams.deliveries import GIVEN_UP_ON_STOP, KafkaDeliveryCounter
from streams.delivery import CommitTracker, InFlight, OutputNames, Retrying, Routed, route
from streams.logs import exit_without_teardown
from streams.runtime import WorkerFailed, WorkerRuntime
from workers.core_step import BatchOutcome, InboundMessage

log = structlog.get_logger(__name__)


def _credentials(settings: Settings) -> Any:
    options = settings.kafka_client_options()
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=options.get("sasl_plain_password"),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=options.get("ssl_context"),
        )
    if "ssl_context" in options:
        return faust.SSLCredentials(options["ssl_context"])
    return None


def _headers(raw: Any) -> dict[str, bytes]:
    if not raw:
        return {}
    items: Iterable[tuple[str, bytes]] = raw.items() if isinstance(raw, dict) else raw
    return {key: value for key, value in items if value is not None}


def inbound_from_faust(event: EventT) -> InboundMessage:
    """A Faust event as the core step takes it."""
    message = event.message
    timestamp = message.timestamp
    return InboundMessage(
        value=message.value,
        key=message.key,
        topic=message.topic,
        partition=message.partition,
        offset=str(message.offset),
        timestamp_ms=int(timestamp * 1000) if timestamp else None,
        headers=_headers(message.headers),
    )


class FaustDelivery:
    """The Faust runner's ``Delivery``: inputs are the batch's events, acked on the stream (Faust
    commits acked offsets) once the broker acknowledged every output (acks=all), and in offset order
    per partition.

    Faust commits the first run of consecutive acked offsets without checking that it starts at the
    committed position (it lets a one-offset gap there pass, and checks nothing before the first
    commit). A step's hits are delivered before its misses, so acking them as they go would let a
    commit pass a miss still in the model, and a crash would lose it. An event is acked only once
    every event taken before it in its partition was delivered (``CommitTracker``).
    """

    def __init__(self, app: faust.App, stream: StreamT[Any], runtime: WorkerRuntime) -> None:
        self.app = app
        self.stream = stream
        self.runtime = runtime
        self.names = OutputNames.kafka(runtime.settings)
        # No stop event: Faust stops the agent by cancelling it, which ends a retry at once.
        self.retrying = Retrying(runtime, stop=None)
        self.order: CommitTracker[Any] = CommitTracker()
        self._not_acked: dict[Any, deque[EventT]] = {}

    def track(self, events: Sequence[EventT]) -> None:
        """Events taken from the stream, in the order taken (each partition's in offset order)."""
        by_partition: dict[Any, list[EventT]] = {}
        for event in events:
            by_partition.setdefault(event.message.tp, []).append(event)
        for tp, taken in by_partition.items():
            self.order.track(tp, [event.message.offset for event in taken])
            self._not_acked.setdefault(tp, deque()).extend(taken)

    def forget(self, partitions: Iterable[Any]) -> None:
        """Partitions revoked: the next owner reads them again from the committed offset, so what was
        taken here no longer waits to be acked (nor counts against the in-flight limit). Faust waits
        for every taken event to be acked before it revokes (``stream_wait_empty``), so this matters
        where that wait timed out or is turned off."""
        partitions = list(partitions)
        self.order.forget(partitions)
        for tp in partitions:
            self._not_acked.pop(tp, None)

    async def deliver(self, outcome: BatchOutcome, inputs: list[EventT]) -> bool:
        routed = route(outcome, self.names)
        if not await self.retrying.publish(lambda: self._publish(routed)):
            return False
        delivered: dict[Any, list[int]] = {}
        for event in inputs:
            delivered.setdefault(event.message.tp, []).append(event.message.offset)
        for tp, offsets in delivered.items():
            self.order.settle(tp, offsets)
        for tp, position in self.order.take().items():
            waiting = self._not_acked.get(tp)
            while waiting and waiting[0].message.offset < position:
                await self.stream.ack(waiting.popleft())
        self.runtime.record(outcome)
        return True

    async def _publish(self, routed: Routed) -> None:
        producer = self.app.producer
        pending = [
            await producer.send(topic, record.key, record.value, None, None, record.headers)
            for topic, records in routed.items()
            for record in records
        ]
        await asyncio.gather(*pending)


#: What a stop may take past ``QUSTREAM_STOP_GRACE_S``: the batch runner's bounds on its last commit
#: (15 s) and on leaving the group (5 s), which the setting's description tells operators to leave room for.
STOP_BOUND_MARGIN_S = 20.0


class BoundedStopWorker(faust.Worker):
    """Faust's worker, whose stop on SIGTERM/SIGINT ends within ``stop_bound_s``.

    Why: Faust stops its consumer with aiokafka's ``stop``, which waits for a group join in progress to
    be answered; Apache Kafka answers once every member rejoined, up to the rebalance timeout (minutes).
    A rolling restart stops workers in exactly that state. With the broker unreachable, Faust's stop
    waits for its consumer thread's own timeouts (about a minute). Past the bound the process ends, logged
    (``worker.stop_overrun``): what it had not committed is processed again by the partitions' next owner.
    """

    def __init__(self, app: faust.App, *services: Any, stop_bound_s: float, **kwargs: Any) -> None:
        super().__init__(app, *services, **kwargs)
        self.stop_bound_s = stop_bound_s

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        # mode's hook for both signals; its ``_signal_stop_time`` is set by the first one only.
        if not self._signal_stop_time:
            log.info("worker.stopping", signal=signal.name, bound_s=self.stop_bound_s,
                     note="Faust cancels its agent at once (what is not delivered is redone by the next owner), "
                     "commits and leaves the group; the process ends within bound_s (QUSTREAM_STOP_GRACE_S + 20 s)")
            self.loop.call_later(self.stop_bound_s, _stop_overrun, self.stop_bound_s)
        super()._schedule_shutdown(signal)


def _stop_overrun(bound_s: float) -> None:
    log.warning("worker.stop_overrun", bound_s=bound_s,
                note="Faust's stop did not end in time (a group rebalance or an unreachable broker holds its "
                "consumer); the process ends now: what it had not committed is processed again by the "
                "partitions' next owner")
    exit_without_teardown(0)


def create_app(settings: Settings, runtime: WorkerRuntime) -> faust.App:
    # No Faust tables are used (their recovery depends on offsets tansu reports wrong), so its
    # data directory holds nothing worth keeping: a private temporary one per process.
    datadir = tempfile.mkdtemp(prefix="qustream-faust-")
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        processing_guarantee=settings.processing_guarantee,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_s,
        broker_commit_interval=settings.broker_commit_interval_s,
        producer_acks=-1,
        producer_max_request_size=max(1_048_576, settings.max_message_bytes * 2),
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        web_port=settings.web_port,
        datadir=Path(datadir),
        loghandlers=[],
    )
    input_topic = app.topic(settings.topic_input, key_type=bytes, value_type=bytes, partitions=settings.partitions)
    # Faust's take wakes every `within`, idle or not: a floor keeps an idle worker from spinning.
    linger_s = max(settings.fetch_linger_ms, 10) / 1000
    deliveries = KafkaDeliveryCounter(settings, needs_model=runtime.needs_model,
                                      stopping=lambda: runtime.failure is not None)
    current: list[FaustDelivery] = []  # the agent's, for the rebalance callback
    # An idle agent takes nothing and publishes nothing: this notices a broker that stopped answering.
    probe = MetadataProbe(settings)
    broker_watch = BrokerWatch(runtime, probe)

    @app.agent(input_topic, concurrency=1, name="parse-queries")
    async def parse_queries(stream: StreamT[Any]) -> None:
        await runtime.wait_serving()
        # noack_take is on faust.Stream, not on the StreamT interface.
        batches = stream.noack_take(settings.batch_size, within=linger_s)  # type: ignore[attr-defined]
        delivery = FaustDelivery(app, stream, runtime)
        current[:] = [delivery]
        flow = InFlight(runtime, delivery, settings.max_in_flight_messages, uncommitted=delivery.order.unsettled,
                        uncommitted_limit=settings.max_uncommitted_messages)
        try:
            async for events in batches:
                # Parts of a step are delivered in any order (hits before misses); ``FaustDelivery``
                # acks each partition's events in the order they were taken.
                messages = [inbound_from_faust(event) for event in events]
                event_of = {id(message): event for message, event in zip(messages, events, strict=True)}

                def events_of(settled: Sequence[InboundMessage],
                              event_of: dict[int, EventT] = event_of) -> list[EventT]:
                    return [event_of[id(message)] for message in settled]

                if events:
                    broker_watch.answered()
                delivery.track(events)
                await deliveries.run(messages, lambda part, delivered: flow.start(part, events_of, delivered=delivered))
                while not flow.room:  # backpressure: Faust's own buffer fills, then it pauses fetching
                    await flow.wait_for_room(1.0)
        finally:
            # Faust stops an agent by cancelling it, with no grace: what was not delivered is redone.
            flow.give_up(0.0, GIVEN_UP_ON_STOP)

    async def commit_then_crash(failure: WorkerFailed) -> None:
        # Commit what was acked while the consumer thread still runs: crashing stops that thread, and
        # a commit the stopping app makes after it can wait on it for ever. The failed part's events
        # are never acked, so nothing past them is committed.
        try:
            await asyncio.wait_for(app.consumer.commit(), settings.stop_grace_s)
        except Exception as exc:
            log.warning("faust.commit_before_stop_failed", error=f"{type(exc).__name__}: {exc}")
        # Crashing the app crashes its mode Worker, which stops and exits non-zero with the failure.
        await app.crash(failure)

    def stop_on_failure(failure: WorkerFailed) -> None:
        app.add_future(commit_then_crash(failure))

    runtime.on_failure(stop_on_failure)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        for delivery in current:
            delivery.forget(tp for tp in revoked if tp.topic == settings.topic_input)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        topics = {(tp.topic, tp.partition) for tp in assigned if tp.topic == settings.topic_input}
        runtime.set_transport(connected=True, assigned=topics)
        broker_watch.answered()
        log.info("partitions.assigned", partitions=sorted(p for _, p in topics))

    @app.timer(interval=broker_watch.tick_s)
    async def watch_broker() -> None:
        await broker_watch.check()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def close_probe(sender: Any, **_: Any) -> None:
        await probe.close()

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != settings.topic_input:
                continue
            position = await consumer.position(tp)
            highwater = consumer.highwater(tp)
            if position is not None and highwater is not None:
                runtime.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(highwater - position, 0)
                )

    app.parse_agent = parse_queries  # type: ignore[attr-defined]
    return app
