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
- A down Redis never crashes the worker: every Redis call is retried with capped exponential
  backoff and jitter, and ``/ready`` reports the transport as unreachable meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.events import DeadLetterReason, DeadLetterStage, ParsedEvent
from schemas.settings import Settings
from streams.redis_codec import decode_entry, encode_entry
from streams.retry import Backoff
from streams.runtime import WorkerRuntime
from workers.pipeline import (
    BatchOutcome,
    InboundMessage,
    OutboundRecord,
    dead_letter,
)

log = structlog.get_logger(__name__)

#: Redis Streams have no partitions; the stream is reported as partition 0 everywhere.
PARTITION = 0
#: How long a stopping worker keeps retrying the publish of its in-flight batch against a down
#: Redis before it gives up and leaves the entries pending (they are redone after a restart).
STOP_GRACE_S = 10.0
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
        socket_timeout=10.0 + max(settings.batch_linger_ms, 100) / 1000,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _entry_ms(entry_id: str) -> int | None:
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class Delivery:
    """One entry as this consumer received it, with how often the group has delivered it."""

    entry_id: str
    message: InboundMessage
    deliveries: int
    #: The entry was trimmed or deleted from the stream while it was pending: only its id is left.
    deleted: bool = False


def to_inbound(stream: str, entry_id: str, fields: dict[bytes, bytes]) -> InboundMessage:
    value, key, headers, timestamp_ms = decode_entry(fields)
    # Like a Kafka broker timestamp: without an explicit event time, the entry id's milliseconds
    # (when Redis appended it) stand in for it.
    if timestamp_ms is None:
        timestamp_ms = _entry_ms(entry_id)
    return InboundMessage(value=value, key=key, topic=stream, partition=PARTITION, offset=entry_id,
                          timestamp_ms=timestamp_ms, headers=headers)


class RedisStreamConsumer:
    """Reads batches from the input stream with a consumer group, runs the core step, publishes, acks."""

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
        self.linger_ms = settings.batch_linger_ms
        self.claim_interval_s = max(settings.redis_claim_idle_ms / 2000, 0.2)
        self.backoff = Backoff()
        self._history_cursor: str | None = "0"
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._stop_requested_at: float | None = None

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
                self.runtime.set_transport(connected=False)
                delay = self.backoff.next_delay()
                log.error("redis.unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 2))
                await self._sleep(delay)
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
        self._history_cursor = "0"
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

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    # --- reading ------------------------------------------------------------------------------

    async def _consume(self) -> None:
        while not self.stop.is_set():
            batch = await self._next_batch()
            self.runtime.set_transport(connected=True)
            self.backoff.reset()
            if batch:
                await self._handle(batch)

    async def _next_batch(self) -> list[Delivery]:
        if self._history_cursor is not None:
            batch = await self._read_own_pending()
            if batch:
                return batch
        if time.monotonic() >= self._next_claim:
            return await self._claim_idle()
        return await self._read_new()

    async def _read_own_pending(self) -> list[Delivery]:
        assert self._history_cursor is not None
        # One at a time (a crash left them here): see the module docstring on poison.
        reply: Any = await self.client.xreadgroup(self.group, self.consumer, {self.stream: self._history_cursor},
                                                  count=1)
        entries = [(_text(entry_id), fields) for _, items in reply for entry_id, fields in items]
        if not entries:
            self._history_cursor = None
            return []
        self._history_cursor = entries[-1][0]
        counts = await self._delivery_counts([entry_id for entry_id, _ in entries])
        log.info("redis.own_pending", entries=len(entries), first=entries[0][0])
        # A history read returns an entry deleted from the stream with no fields.
        return [self._delivery(entry_id, fields, counts.get(entry_id, 1), deleted=not fields)
                for entry_id, fields in entries]

    async def _claim_idle(self) -> list[Delivery]:
        reply: Any = await self.client.xautoclaim(self.stream, self.group, self.consumer,
                                                  min_idle_time=self.settings.redis_claim_idle_ms,
                                                  start_id=self._claim_cursor, count=1)
        cursor, claimed = _text(reply[0]), reply[1]
        deleted = [_text(entry_id) for entry_id in (reply[2] if len(reply) > 2 else [])]
        self._claim_cursor = cursor
        if cursor == "0-0":  # a full sweep of the pending list is done: rest until the next one
            self._next_claim = time.monotonic() + self.claim_interval_s
            await self._maintain()
        entries = [(_text(entry_id), fields) for entry_id, fields in claimed]
        if not entries and not deleted:
            return []
        counts = await self._delivery_counts([entry_id for entry_id, _ in entries])
        log.warning("redis.claimed", entries=len(entries), deleted=len(deleted),
                    idle_ms=self.settings.redis_claim_idle_ms)
        batch = [self._delivery(entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in entries]
        # XAUTOCLAIM has already dropped deleted entries from the pending list; they are reported
        # as dead letters so that every entry the group delivered has an outcome.
        batch += [self._delivery(entry_id, {}, 1, deleted=True) for entry_id in deleted]
        return batch

    async def _read_new(self) -> list[Delivery]:
        """New entries up to the step size (``WorkerRuntime.step``): block for the first, then top up
        to ``batch_size`` for at most ``linger``."""
        block_ms = max(self.linger_ms, 50)
        entries = await self._xreadgroup_new(self.runtime.step.limit, block_ms)
        deadline = time.monotonic() + self.linger_ms / 1000
        while entries and len(entries) < self.batch_size and not self.stop.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = await self._xreadgroup_new(self.batch_size - len(entries), remaining_ms)
            if not more:
                break
            entries += more
        return [self._delivery(entry_id, fields, 1) for entry_id, fields in entries]

    async def _xreadgroup_new(self, count: int, block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        reply: Any = await self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                                  block=max(block_ms, 1))
        return [(_text(entry_id), fields) for _, items in reply or [] for entry_id, fields in items]

    def _delivery(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int, deleted: bool = False) -> Delivery:
        message = to_inbound(self.stream, entry_id, fields)
        message.deliveries = deliveries
        return Delivery(entry_id, message, deliveries, deleted)

    async def _pending_rows(self, entry_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The group's pending-list rows (consumer, times_delivered) of ``entry_ids``; absent = acked."""
        if not entry_ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
            replies = await pipe.execute()
        return {_text(row["message_id"]): row for rows in replies for row in rows}

    async def _delivery_counts(self, entry_ids: Sequence[str]) -> dict[str, int]:
        rows = await self._pending_rows(entry_ids)
        return {entry_id: int(row["times_delivered"]) for entry_id, row in rows.items()}

    async def _owners(self, entry_ids: Sequence[str]) -> dict[str, str]:
        rows = await self._pending_rows(entry_ids)
        return {entry_id: _text(row["consumer"]) for entry_id, row in rows.items()}

    async def _maintain(self) -> None:
        """Once per claim sweep: report lag, forget long-gone consumers that hold nothing."""
        groups = await self.client.xinfo_groups(self.stream)
        for info in groups:
            if _text(info["name"]) == self.group and info.get("lag") is not None:
                self.runtime.metrics.consumer_lag.labels(topic=self.stream, partition=str(PARTITION)).set(info["lag"])
        forget_after_ms = max(self.settings.redis_claim_idle_ms * FORGET_CONSUMER_FACTOR, FORGET_CONSUMER_MIN_MS)
        for info in await self.client.xinfo_consumers(self.stream, self.group):
            name = _text(info["name"])
            # Deleting a consumer drops its pending entries, hence only those that hold none.
            if name != self.consumer and int(info["pending"]) == 0 and int(info["idle"]) > forget_after_ms:
                await self.client.xgroup_delconsumer(self.stream, self.group, name)
                log.info("redis.consumer_forgotten", consumer=name, idle_ms=info["idle"])

    # --- processing ---------------------------------------------------------------------------

    async def _handle(self, batch: list[Delivery]) -> None:
        entry_ids = [delivery.entry_id for delivery in batch]
        regular: list[InboundMessage] = []
        refused: list[tuple[OutboundRecord, DeadLetterStage]] = []
        for delivery in batch:
            if delivery.deleted:
                refused.append(self._refuse(delivery, "decode", "EntryDeleted",
                                            "entry was trimmed or deleted from the stream before it was processed"))
            else:
                regular.append(delivery.message)
        async with self._keep_lease(entry_ids):
            # An empty list still yields a metrics event for the refused entries to be counted in.
            outcome = await self.runtime.process(regular)
        for record, stage in refused:
            outcome.dead_letters.append(record)
            outcome.dead_letter_stages.append(stage)
        outcome.metrics.size += len(refused)
        outcome.metrics.dead_lettered += len(refused)
        if await self._publish(outcome, entry_ids):
            self.runtime.record(outcome)

    def _refuse(self, delivery: Delivery, stage: DeadLetterStage, error_class: str,
                reason: str) -> tuple[OutboundRecord, DeadLetterStage]:
        message = delivery.message
        log.warning("message.dead_lettered", stage=stage, error_class=error_class, reason=reason[:200],
                    topic=message.topic, offset=message.offset, deliveries=delivery.deliveries)
        return dead_letter(message, stage, error_class, reason, self.settings.worker_id), stage

    @contextlib.asynccontextmanager
    async def _keep_lease(self, entry_ids: list[str]) -> AsyncIterator[None]:
        task = asyncio.create_task(self._renew_lease(entry_ids), name="redis-lease")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _renew_lease(self, entry_ids: list[str]) -> None:
        interval = max(self.settings.redis_claim_idle_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                owners = await self._owners(entry_ids)
                # Only entries still ours: taking back what a peer claimed would have both redo it.
                mine = [entry_id for entry_id in entry_ids if owners.get(entry_id) == self.consumer]
                if mine:
                    await self.client.xclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                             message_ids=list[Any](mine), justid=True)
            except (RedisError, OSError) as exc:
                log.warning("redis.lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")

    async def _publish(self, outcome: BatchOutcome, entry_ids: list[str]) -> bool:
        """Outputs and acks in one MULTI/EXEC, retried until it lands. False when the batch was given
        up (the worker is stopping and Redis stayed down, or a peer took the entries over)."""
        backoff = Backoff()
        while True:
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    self._queue_outputs(pipe, outcome)
                    pipe.xack(self.stream, self.group, *entry_ids)
                    await pipe.execute()
                self.runtime.set_transport(connected=True)
                return True
            except (RedisError, OSError) as exc:
                self.runtime.set_transport(connected=False)
                delay = backoff.next_delay()
                log.error("publish.retry", attempt=backoff.failures, delay_s=round(delay, 2),
                          error=f"{type(exc).__name__}: {exc}")
                if self.stop.is_set():
                    self._stop_requested_at = self._stop_requested_at or time.monotonic()
                    if time.monotonic() - self._stop_requested_at > STOP_GRACE_S:
                        log.error("publish.abandoned", entries=len(entry_ids),
                                  note="entries stay pending and are redone after a restart or claim")
                        return False
                await asyncio.sleep(delay)
                ambiguous = isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)
                if ambiguous:
                    settled = await self._already_settled(entry_ids)
                    if settled is not None:
                        return settled

    async def _already_settled(self, entry_ids: list[str]) -> bool | None:
        """After a lost EXEC reply: whether the transaction applied (True), a peer holds the entries
        (False), or it must be sent again (None). EXEC is atomic, so the acks tell."""
        try:
            owners = await self._owners(entry_ids)
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

    def _queue_outputs(self, pipe: Any, outcome: BatchOutcome) -> None:
        maxlen = self.settings.stream_maxlen
        routed: list[tuple[str, OutboundRecord]] = [
            *((self.settings.stream_parsed, record) for record in outcome.parsed),
            *((self.settings.stream_dlq, record) for record in outcome.dead_letters),
            (self.settings.stream_metrics, outcome.metrics_record()),
        ]
        for stream, record in routed:
            pipe.xadd(stream, encode_entry(record.value, record.key, record.headers), maxlen=maxlen, approximate=True)


class RedisQueryClient:
    """Send one query into the input stream and wait for its parse or dead letter (``POST /parse``).

    The replies are matched on ``query_id``. Reading starts at the output streams' last ids taken
    *before* the query is added, so a fast reply cannot be missed.
    """

    def __init__(self, settings: Settings, client: Redis | None = None) -> None:
        self.settings = settings
        self._own_client = client is None
        self.client = client if client is not None else transport_client(settings)

    async def __aenter__(self) -> RedisQueryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def _last_id(self, stream: str) -> str:
        newest: Any = await self.client.xrevrange(stream, "+", "-", count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def send(self, query: str, *, query_id: str | None = None, **fields: Any) -> str:
        from producer_tools.client import encode_query

        query_id = query_id or uuid.uuid4().hex
        entry = encode_entry(encode_query(query, query_id=query_id, **fields), query_id.encode())
        await self.client.xadd(self.settings.stream_input, entry,  # type: ignore[arg-type]
                               maxlen=self.settings.stream_maxlen, approximate=True)
        return query_id

    # Same signature as the Kafka QueryClient.parse, so callers can take either client.
    async def parse(self, query: str, *, timeout: float = 30.0, **fields: Any) -> ParsedEvent:  # noqa: ASYNC109
        """The parsed event; ``TimeoutError`` or ``DeadLetteredError`` otherwise."""
        from producer_tools.client import DeadLetteredError

        query_id = fields.pop("query_id", None) or uuid.uuid4().hex
        parsed_stream, dlq_stream = self.settings.stream_parsed, self.settings.stream_dlq
        positions = {parsed_stream: await self._last_id(parsed_stream), dlq_stream: await self._last_id(dlq_stream)}
        await self.send(query, query_id=query_id, **fields)
        deadline = time.monotonic() + timeout
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise TimeoutError(f"no parse of {query_id} within {timeout} s")
            reply: Any = await self.client.xread(positions, count=100, block=min(remaining_ms, 1000))  # type: ignore[arg-type]
            for raw_stream, items in reply or []:
                stream = _text(raw_stream)
                for entry_id, entry in items:
                    positions[stream] = _text(entry_id)
                    value, key, headers, _ = decode_entry(entry)
                    if stream == parsed_stream and key == query_id.encode() and value is not None:
                        return ParsedEvent.model_validate_json(value)
                    if stream == dlq_stream and _query_id_of(value) == query_id:
                        raise DeadLetteredError(DeadLetterReason.from_headers(headers))


def _query_id_of(value: bytes | None) -> str | None:
    try:
        payload = json.loads(value or b"")
    except ValueError:
        return None
    query_id = payload.get("query_id") if isinstance(payload, dict) else None
    return query_id if isinstance(query_id, str) else None


async def run_redis_worker(settings: Settings, runtime: WorkerRuntime) -> None:
    """``qustream worker`` with ``QUSTREAM_TRANSPORT=redis``: web endpoints at once, model in the
    background, then the consumer until SIGTERM/SIGINT (the in-flight batch is finished first)."""
    from streams.worker import serve

    client = transport_client(settings)

    async def consume(stop: asyncio.Event, boot: asyncio.Task[None]) -> None:
        await RedisStreamConsumer(settings, runtime, client, stop, boot).run()

    try:
        await serve(settings, runtime, consume, RedisQueryClient(settings))
    finally:
        await client.aclose()
