"""Redis Streams transport: the same core step as the Kafka agent, with a consumer group as the queue.

Guarantees and why the code is shaped this way:
- At least once. An entry is acknowledged (``XACK``) only in the same ``MULTI``/``EXEC`` as the
  ``XADD`` of its outputs, so an ack never lands without the outputs of its batch, and outputs
  without their ack only when the worker dies between the two (then the batch is redone).
- Crash recovery. After (re)joining, the consumer first re-reads its own pending entries (read
  with id ``0``): a worker restarted under the same ``worker_id`` redoes what it held. Entries
  held by consumers that went away are taken over with ``XAUTOCLAIM`` once idle longer than
  ``redis_claim_idle_ms``, on start and periodically.
- Poison that crashes the process. History reads and claims increment an entry's delivery
  count, which the core step sees as ``InboundMessage.deliveries``: an entry delivered more than
  ``max_deliveries`` times is dead-lettered (stage ``deliveries``) instead of being processed
  again. Entries read again after a crash (own history, claims) are taken one at a time, so the
  count grows only for the entry that kills the worker, not for those that shared its batch.
- Long batches keep their entries. While a batch is in the model its entries' idle time is reset
  (``XCLAIM ... JUSTID``, which leaves the delivery count alone), so a peer does not claim and
  redo a batch that is merely slow.
- A down Redis never crashes the worker: every Redis call is retried with the backoff and stop
  policy of ``streams.delivery``, and ``/ready`` reports the transport as unreachable meanwhile.

The loop is the one every runner has: read a batch → core step → ``RedisDelivery.deliver``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.events import DeadLetterStage
from schemas.settings import Settings
from streams.delivery import InFlight, OutputNames, Retrying, route
from streams.redis_codec import PARTITION, encode_entry, entry_text, inbound_from_entry
from streams.runtime import WorkerRuntime
from workers.core_step import (
    BatchOutcome,
    InboundMessage,
    OutboundRecord,
    Settled,
    dead_letter,
)

log = structlog.get_logger(__name__)

#: What becomes of the entries a stopping worker gives up undelivered (``InFlight.give_up``).
_GIVEN_UP_ON_STOP = ("left pending in the group: this consumer reads them again after a restart with the same "
                     "QUSTREAM_WORKER_ID, or a peer claims them once idle QUSTREAM_REDIS_CLAIM_IDLE_MS; either way "
                     "one at a time, each read counting one delivery toward QUSTREAM_MAX_DELIVERIES")

#: A consumer with nothing pending and idle this many claim thresholds is removed from the group,
#: so workers named after host and pid do not pile up; a live consumer calls in every linger.
FORGET_CONSUMER_FACTOR = 10
FORGET_CONSUMER_MIN_MS = 60_000


def transport_client(settings: Settings) -> Redis:
    """A client whose socket timeout outlasts the longest ``XREADGROUP BLOCK`` the worker issues.

    The client's own retries are off: re-sending a ``MULTI``/``EXEC`` whose reply was lost would
    publish the batch twice. The consumer retries itself and first checks whether the EXEC applied.
    """
    return Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=10.0 + max(settings.fetch_linger_ms, 100) / 1000,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )


#: (stream, entry id, fields) as XREADGROUP returns it; no fields: deleted from the stream while pending.
Entry = tuple[str, str, dict[bytes, bytes]]


class GroupReader:
    """XREADGROUP for one consumer of a group, over one or more streams: first the consumer's own
    pending entries, paged from id ``0`` (what it received before and never acknowledged: a consumer
    restarted under the same name redoes them), then new ones. The worker and the producer tools
    both read groups this way."""

    def __init__(self, client: Redis, group: str, consumer: str, streams: Sequence[str]) -> None:
        self.client = client
        self.group = group
        self.consumer = consumer
        self.streams = list(streams)
        self._new = dict.fromkeys(self.streams, ">")
        self._pending: dict[str, str] = {}
        self.reread_pending()

    def reread_pending(self) -> None:
        """Start over from the first pending entry (after an error, replies may have been lost)."""
        self._pending = dict.fromkeys(self.streams, "0")

    @property
    def reading_pending(self) -> bool:
        return bool(self._pending)

    async def read_pending(self, count: int) -> list[Entry]:
        """The next page of our own pending entries; [] once they are all read."""
        if not self._pending:
            return []
        entries = await self._read(self._pending, count, None)
        read_to = {stream: entry_id for stream, entry_id, _ in entries}
        self._pending = {stream: read_to[stream] for stream in self._pending if stream in read_to}
        return entries

    async def read_new(self, count: int, block_ms: int) -> list[Entry]:
        """Entries never delivered to the group, waiting up to ``block_ms`` for the first."""
        return await self._read(self._new, count, max(block_ms, 1))

    async def _read(self, positions: dict[str, str], count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.client.xreadgroup(self.group, self.consumer, positions,  # type: ignore[arg-type]
                                                  count=count, block=block_ms)
        return [(entry_text(stream), entry_text(entry_id), fields or {})
                for stream, items in reply or [] for entry_id, fields in items]


async def pending_rows(client: Redis, stream: str, group: str, entry_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The group's pending-list rows (consumer, times_delivered) of ``entry_ids``; absent = acked."""
    if not entry_ids:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        replies = await pipe.execute()
    return {entry_text(row["message_id"]): row for rows in replies for row in rows}


async def owners_of(client: Redis, stream: str, group: str, entry_ids: Sequence[str]) -> dict[str, str]:
    """The consumer holding each of ``entry_ids``; absent = acked."""
    rows = await pending_rows(client, stream, group, entry_ids)
    return {entry_id: entry_text(row["consumer"]) for entry_id, row in rows.items()}


@dataclass(frozen=True)
class Received:
    """One entry as this consumer received it, with how often the group has delivered it."""

    entry_id: str
    message: InboundMessage
    deliveries: int
    #: The entry was trimmed or deleted from the stream while it was pending: only its id is left.
    deleted: bool = False


class RedisDelivery:
    """The Redis Streams ``Delivery``: inputs are the batch's entry ids, acknowledged (``XACK``) in
    the same ``MULTI``/``EXEC`` as the ``XADD`` of the outputs, retried until it lands."""

    def __init__(self, settings: Settings, runtime: WorkerRuntime, client: Redis, consumer: str,
                 retrying: Retrying) -> None:
        self.runtime = runtime
        self.client = client
        self.stream = settings.stream_input
        self.group = settings.app_id
        self.consumer = consumer
        self.maxlen = settings.stream_maxlen
        self.names = OutputNames.redis(settings)
        self.retrying = retrying

    async def deliver(self, outcome: BatchOutcome, inputs: list[str]) -> bool:
        """False when the batch was given up (the worker is stopping and Redis stayed down, or a peer
        took the entries over)."""

        async def after_failure(exc: BaseException) -> bool | None:
            if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):  # the EXEC may have run
                return await self._already_settled(inputs)
            return None

        if not await self.retrying.publish(lambda: self._transaction(outcome, inputs), retry_on=(RedisError, OSError),
                                           after_failure=after_failure):
            log.error("publish.given_up", entries=len(inputs),
                      note="entries stay pending and are redone after a restart or claim")
            return False
        self.runtime.record(outcome)
        return True

    async def _transaction(self, outcome: BatchOutcome, entry_ids: list[str]) -> None:
        maxlen = self.maxlen
        async with self.client.pipeline(transaction=True) as pipe:
            for stream, records in route(outcome, self.names).items():
                for record in records:
                    pipe.xadd(stream, encode_entry(record.value, record.key, record.headers),  # type: ignore[arg-type]
                              maxlen=maxlen, approximate=True)
            if entry_ids:
                pipe.xack(self.stream, self.group, *entry_ids)
            await pipe.execute()

    async def _already_settled(self, entry_ids: list[str]) -> bool | None:
        """After a lost EXEC reply: whether the transaction applied (True), a peer holds the entries
        (False), or it must be sent again (None). EXEC is atomic, so the acks tell."""
        try:
            owners = await owners_of(self.client, self.stream, self.group, entry_ids)
            # Not pending may also mean a Redis that restarted without its data: then the entries
            # are gone too, and sending the outputs again is the safe side.
            still_stored = bool(await self.client.xrange(self.stream, entry_ids[0], entry_ids[0]))
        except (RedisError, OSError):
            return None
        if not owners:
            if not still_stored:
                return None
            log.warning("publish.applied_before_error", entries=len(entry_ids))
            return True
        if all(owner != self.consumer for owner in owners.values()):
            log.warning("publish.taken_over", entries=len(entry_ids), owners=sorted(set(owners.values())))
            return False
        return None


class RedisStreamConsumer:
    """Reads batches from the input stream with a consumer group, runs the core step, delivers."""

    def __init__(self, settings: Settings, runtime: WorkerRuntime, client: Redis, stop: asyncio.Event,
                 boot: asyncio.Task[None] | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.client = client
        self.stop = stop
        self.boot = boot
        self.stream = settings.stream_input
        self.group = settings.app_id
        self.consumer = settings.worker_id
        self.batch_size = settings.batch_size
        self.linger_ms = settings.fetch_linger_ms
        self.claim_interval_s = max(settings.redis_claim_idle_ms / 2000, 0.2)
        self.retrying = Retrying(runtime, stop)
        self.reader = GroupReader(client, self.group, self.consumer, [self.stream])
        self.delivery = RedisDelivery(settings, runtime, client, self.consumer, self.retrying)
        self.flow = InFlight(runtime, self.delivery, settings.max_in_flight_messages)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop`` is set; Redis errors are retried, never raised."""
        while not self.stop.is_set():
            try:
                await self._join()
                if not await self._wait_engine():
                    break
                await self._consume()
            except (RedisError, OSError) as exc:
                delay = self.retrying.failed()
                log.error("redis.unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 2))
                await self.retrying.pause(delay)
        self.runtime.set_transport(assigned=set())
        log.info("redis.consumer_stopped", consumer=self.consumer)

    async def _join(self) -> None:
        """Create the group (and the stream) if missing, then start over from our own pending entries."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("redis.group_created", stream=self.stream, group=self.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # After any error we may have read entries whose reply never arrived: they sit in our
        # pending list, and re-reading it from the start picks them up.
        self.reader.reread_pending()
        self._next_claim = 0.0
        self.runtime.set_transport(connected=True, assigned={(self.stream, PARTITION)})
        log.info("redis.group_joined", stream=self.stream, group=self.group, consumer=self.consumer)

    async def _wait_engine(self) -> bool:
        """Read nothing before the model is warm: entries read earlier would only age in our PEL."""
        if self.runtime.engine_ready:
            return True
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.stop.wait())}
        waiters.add(self.boot if self.boot is not None else asyncio.ensure_future(self.runtime.wait_started()))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            if future is not self.boot:
                future.cancel()
        if self.boot is not None and self.boot in done:
            self.boot.result()  # a model that fails to load ends the worker with that error
        return self.runtime.engine_ready and not self.stop.is_set()

    # --- the loop: read → core step → deliver ---------------------------------------------------

    async def _consume(self) -> None:
        try:
            while not self.stop.is_set():
                room = await self.flow.wait_for_room(0.2)
                if not room:  # backpressure: read on once some outputs are delivered
                    continue
                batch, serial = await self._next_batch(room)
                self.retrying.succeeded()
                if batch:
                    done = await self._step(batch)
                    if serial:  # a crash left them (or a peer's) here: one at a time, to the end
                        await done
        finally:
            if self.stop.is_set():  # past the grace the entries stay pending: redone after a restart
                await self.flow.stop(self.settings.stop_grace_s, _GIVEN_UP_ON_STOP)

    async def _step(self, batch: list[Received]) -> asyncio.Future[None]:
        entry_ids = [received.entry_id for received in batch]
        regular: list[InboundMessage] = []
        refused: list[tuple[Received, OutboundRecord, DeadLetterStage]] = []
        for received in batch:
            if received.deleted:
                refused.append((received, *self._refuse(
                    received, "decode", "EntryDeleted",
                    "entry was trimmed or deleted from the stream before it was processed")))
            else:
                regular.append(received.message)

        def add_refusals(ready: Settled) -> None:
            # An empty step still yields a metrics event for the refused entries to be counted in.
            outcome = ready.outcome
            for received, record, stage in refused:
                outcome.dead_letters.append(record)
                outcome.dead_letter_stages.append(stage)
                ready.messages.append(received.message)
            outcome.metrics.size += len(refused)
            outcome.metrics.dead_lettered += len(refused)

        # Entries stay ours (renewed against idle claims) until every part of the step is delivered.
        lease = asyncio.create_task(self._renew_lease(entry_ids), name="redis-lease")
        done = await self.flow.start(regular, _entry_ids, add_refusals if refused else None)
        done.add_done_callback(lambda _: lease.cancel())
        return done

    # --- reading ------------------------------------------------------------------------------

    async def _next_batch(self, room: int) -> tuple[list[Received], bool]:
        """The next entries, and whether they must be processed one step at a time."""
        if self.reader.reading_pending:
            batch = await self._read_own_pending()
            if batch:
                return batch, True
        if time.monotonic() >= self._next_claim:
            return await self._claim_idle(), True
        return await self._read_new(room), False

    async def _read_own_pending(self) -> list[Received]:
        # One at a time (a crash left them here): see the module docstring on poison.
        entries = await self.reader.read_pending(1)
        if not entries:
            return []
        counts = await self._delivery_counts([entry_id for _, entry_id, _ in entries])
        log.info("redis.own_pending", entries=len(entries), first=entries[0][1])
        # A history read returns an entry deleted from the stream with no fields.
        return [self._received(entry_id, fields, counts.get(entry_id, 1), deleted=not fields)
                for _, entry_id, fields in entries]

    async def _claim_idle(self) -> list[Received]:
        reply: Any = await self.client.xautoclaim(self.stream, self.group, self.consumer,
                                                  min_idle_time=self.settings.redis_claim_idle_ms,
                                                  start_id=self._claim_cursor, count=1)
        cursor, claimed = entry_text(reply[0]), reply[1]
        deleted = [entry_text(entry_id) for entry_id in (reply[2] if len(reply) > 2 else [])]
        self._claim_cursor = cursor
        if cursor == "0-0":  # a full sweep of the pending list is done: rest until the next one
            self._next_claim = time.monotonic() + self.claim_interval_s
            await self._maintain()
        entries = [(entry_text(entry_id), fields) for entry_id, fields in claimed]
        if not entries and not deleted:
            return []
        counts = await self._delivery_counts([entry_id for entry_id, _ in entries])
        log.warning("redis.claimed", entries=len(entries), deleted=len(deleted),
                    idle_ms=self.settings.redis_claim_idle_ms)
        batch = [self._received(entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in entries]
        # XAUTOCLAIM has already dropped deleted entries from the pending list; they are reported
        # as dead letters so that every entry the group delivered has an outcome.
        batch += [self._received(entry_id, {}, 1, deleted=True) for entry_id in deleted]
        return batch

    async def _read_new(self, room: int) -> list[Received]:
        """New entries up to the step size (``WorkerRuntime.step``) and the room left: block for the
        first, then top up to ``batch_size`` for at most ``linger``."""
        entries = await self.reader.read_new(min(self.runtime.step.limit, room), max(self.linger_ms, 50))
        deadline = time.monotonic() + self.linger_ms / 1000
        target = min(self.batch_size, room)
        while entries and len(entries) < target and not self.stop.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = await self.reader.read_new(target - len(entries), remaining_ms)
            if not more:
                break
            entries += more
        return [self._received(entry_id, fields, 1) for _, entry_id, fields in entries]

    def _received(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int, deleted: bool = False) -> Received:
        message = inbound_from_entry(self.stream, entry_id, fields)
        message.deliveries = deliveries
        return Received(entry_id, message, deliveries, deleted)

    async def _delivery_counts(self, entry_ids: Sequence[str]) -> dict[str, int]:
        rows = await pending_rows(self.client, self.stream, self.group, entry_ids)
        return {entry_id: int(row["times_delivered"]) for entry_id, row in rows.items()}

    async def _maintain(self) -> None:
        """Once per claim sweep: report lag, forget long-gone consumers that hold nothing."""
        groups = await self.client.xinfo_groups(self.stream)
        for info in groups:
            if entry_text(info["name"]) == self.group and info.get("lag") is not None:
                self.runtime.metrics.consumer_lag.labels(topic=self.stream, partition=str(PARTITION)).set(info["lag"])
        forget_after_ms = max(self.settings.redis_claim_idle_ms * FORGET_CONSUMER_FACTOR, FORGET_CONSUMER_MIN_MS)
        for info in await self.client.xinfo_consumers(self.stream, self.group):
            name = entry_text(info["name"])
            # Deleting a consumer drops its pending entries, hence only those that hold none.
            if name != self.consumer and int(info["pending"]) == 0 and int(info["idle"]) > forget_after_ms:
                await self.client.xgroup_delconsumer(self.stream, self.group, name)
                log.info("redis.consumer_forgotten", consumer=name, idle_ms=info["idle"])

    # --- refusals and leases ---------------------------------------------------------------------

    def _refuse(self, received: Received, stage: DeadLetterStage, error_class: str,
                reason: str) -> tuple[OutboundRecord, DeadLetterStage]:
        message = received.message
        log.warning("message.dead_lettered", stage=stage, error_class=error_class, reason=reason[:200],
                    topic=message.topic, offset=message.offset, deliveries=received.deliveries)
        return dead_letter(message, stage, error_class, reason, self.settings.worker_id), stage

    async def _renew_lease(self, entry_ids: list[str]) -> None:
        interval = max(self.settings.redis_claim_idle_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                owners = await owners_of(self.client, self.stream, self.group, entry_ids)
                # Only entries still ours: taking back what a peer claimed would have both redo it.
                mine = [entry_id for entry_id in entry_ids if owners.get(entry_id) == self.consumer]
                if mine:
                    await self.client.xclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                             message_ids=list[Any](mine), justid=True)
            except (RedisError, OSError) as exc:
                log.warning("redis.lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")


def _entry_ids(messages: Sequence[InboundMessage]) -> list[str]:
    """The entries whose outputs a delivery carries, acknowledged in its transaction."""
    return [message.offset for message in messages]
