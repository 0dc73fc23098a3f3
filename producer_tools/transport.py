"""One small interface over both transports, so every producer tool is written once.

- ``RecordSink``: ``send(key, value, headers, timestamp_ms)`` + ``push()`` + ``flush()`` into the
  input topic (Kafka) or the input stream (Redis Streams, XADD with approximate MAXLEN).
- ``RecordSource``: ``poll()`` records of topics/streams from the start, the end or a group's
  checkpoint, and ``commit()`` them to that group.

Records are the worker's own ``InboundMessage``, converted by the worker's conversions
(``streams.kafka_io.inbound_from_kafka``, ``streams.redis_codec.inbound_from_entry``: a Redis entry
is partition 0 with its entry id as offset), and a Redis group is read as the worker reads it
(``streams.redis_transport.GroupReader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.settings import Settings, mask_url
from streams.kafka_io import inbound_from_kafka, make_consumer, make_producer
from streams.redis_codec import encode_entry, entry_text, inbound_from_entry
from streams.redis_transport import GroupReader
from workers.core_step import InboundMessage

#: Futures a Kafka sink keeps before it waits for the oldest, so a long replay holds bounded memory.
_MAX_PENDING = 20_000
#: Entries a Redis sink buffers before it sends them as one pipeline.
_REDIS_BATCH = 500


class TransportUnavailable(RuntimeError):
    """The broker or Redis did not answer within the connect timeout."""


#: A record read by a tool: the same type, and the same conversion, as the worker's input.
Record = InboundMessage


def position_of(record: Record) -> tuple[int, ...]:
    """Orderable position within its partition: (offset,) on Kafka, (ms, seq) of a Redis entry id."""
    return tuple(int(part) for part in record.offset.split("-"))


class RecordSink(Protocol):
    target: str

    async def send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None: ...

    async def push(self) -> None:
        """Hand buffered records to the wire without waiting for acks (called before pacing sleeps)."""

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged; raises if one failed."""


class RecordSource(Protocol):
    names: list[str]

    async def poll(self, timeout_ms: int = 500, max_records: int = 500) -> list[Record]: ...

    async def commit(self, records: Iterable[Record]) -> None:
        """Record in the source's group that these records are done."""


def resolve_name(settings: Settings, name: str) -> str:
    """``input``/``parsed``/``metrics``/``dlq`` → the configured topic or stream; anything else as given."""
    kafka = settings.transport == "kafka"
    aliases = {
        "input": settings.topic_input if kafka else settings.stream_input,
        "raw": settings.topic_input if kafka else settings.stream_input,
        "parsed": settings.topic_parsed if kafka else settings.stream_parsed,
        "metrics": settings.topic_metrics if kafka else settings.stream_metrics,
        "dlq": settings.topic_dlq if kafka else settings.stream_dlq,
    }
    return aliases.get(name, name)


def endpoint(settings: Settings) -> str:
    """Where the tools connect, for error messages (passwords masked)."""
    if settings.transport == "kafka":
        return f"Kafka at {settings.kafka_bootstrap}"
    return f"Redis at {mask_url(settings.redis_url.get_secret_value())}"


class _ConnectFailures(logging.Filter):
    """Holds back aiokafka's log line for each failed connect attempt and keeps the last one's cause.

    A tool reports an unreachable broker itself, in one line that names that cause; aiokafka's own
    lines (one per attempt, before the tool's error) would only repeat it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_cause: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        attempt_failed = isinstance(record.msg, str) and record.msg.startswith("Unable connect to")
        if attempt_failed and isinstance(record.args, tuple) and record.args:
            self.last_cause = str(record.args[-1])
            return False
        return True


async def start_or_raise(client: Any, settings: Settings) -> None:
    """Start an aiokafka client within the tools' connect timeout, or raise ``TransportUnavailable``."""
    failures = _ConnectFailures()
    aiokafka_log = logging.getLogger("aiokafka")
    aiokafka_log.addFilter(failures)
    try:
        await asyncio.wait_for(client.start(), settings.tools_connect_timeout_s)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        cause = failures.last_cause or f"{type(exc).__name__}: {exc or 'timed out'}"
        raise TransportUnavailable(
            f"cannot reach {endpoint(settings)} within {settings.tools_connect_timeout_s:g} s ({cause})"
        ) from exc
    finally:
        aiokafka_log.removeFilter(failures)


def kafka_tool_options(settings: Settings) -> dict[str, Any]:
    # Short timeouts: a tool should say "unreachable" in seconds, not hang for aiokafka's 40-60 s.
    return {"request_timeout_ms": int(settings.tools_connect_timeout_s * 1000) + 5_000, "metadata_max_age_ms": 30_000}


async def start_kafka_consumer(settings: Settings, group_id: str | None = None, **overrides: Any) -> AIOKafkaConsumer:
    consumer = make_consumer(settings, group_id=group_id, **{**kafka_tool_options(settings), **overrides})
    await start_or_raise(consumer, settings)
    return consumer


async def redis_connect(settings: Settings) -> Any:
    import redis.asyncio as aioredis

    client = aioredis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=settings.tools_connect_timeout_s,
        socket_timeout=30,
    )
    try:
        await asyncio.wait_for(client.ping(), settings.tools_connect_timeout_s)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await client.aclose()
        raise TransportUnavailable(
            f"cannot reach {endpoint(settings)} within {settings.tools_connect_timeout_s:g} s "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return client


# --- sinks ------------------------------------------------------------------------------------


class KafkaSink:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.target = topic
        self._pending: list[asyncio.Future[Any]] = []

    async def send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        future = await self.producer.send(
            self.target, value, key=key, headers=list(headers) if headers else None, timestamp_ms=timestamp_ms
        )
        self._pending.append(future)
        if len(self._pending) >= _MAX_PENDING:
            half = len(self._pending) // 2
            await asyncio.gather(*self._pending[:half])
            del self._pending[:half]

    async def push(self) -> None:
        return None  # aiokafka's own linger (5 ms) sends batches without being asked

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


class RedisSink:
    def __init__(self, client: Any, stream: str, maxlen: int) -> None:
        self.client = client
        self.target = stream
        self.maxlen = maxlen
        self._buffer: list[dict[bytes, bytes]] = []

    async def send(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        self._buffer.append(encode_entry(value, key, headers or (), timestamp_ms))
        if len(self._buffer) >= _REDIS_BATCH:
            await self.push()

    async def push(self) -> None:
        buffer, self._buffer = self._buffer, []
        if not buffer:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for fields in buffer:
                pipe.xadd(self.target, fields, maxlen=self.maxlen, approximate=True)
            await pipe.execute()

    async def flush(self) -> None:
        await self.push()  # XADD replies are the acks: once the pipeline returned, Redis has them


@contextlib.asynccontextmanager
async def open_sink(settings: Settings, name: str = "input") -> AsyncIterator[RecordSink]:
    """A sink into ``name`` (an alias or a topic/stream); flushed on a clean exit."""
    target = resolve_name(settings, name)
    sink: RecordSink
    if settings.transport == "kafka":
        producer = make_producer(settings, **kafka_tool_options(settings))
        await start_or_raise(producer, settings)
        try:
            if settings.create_topics:
                from streams.topics import ensure_topics

                # tansu (and Kafka with auto-create) would otherwise make a 4-partition topic.
                await ensure_topics(settings, [target])
            sink = KafkaSink(producer, target)
            yield sink
            await sink.flush()
        finally:
            await producer.stop()
    else:
        client = await redis_connect(settings)
        try:
            sink = RedisSink(client, target, settings.stream_maxlen)
            yield sink
            await sink.flush()
        finally:
            await client.aclose()


# --- sources ----------------------------------------------------------------------------------


class KafkaSource:
    """Every partition of the named topics, assigned by hand.

    With a group, positions start at the group's committed offsets and ``commit`` stores new ones;
    the consumer never joins the group, so it starts at once (tansu holds joins for
    session_timeout / 2) and never takes partitions away from workers.
    """

    def __init__(self, consumer: AIOKafkaConsumer, names: list[str], group: str | None) -> None:
        self.consumer = consumer
        self.names = names
        self.group = group
        self.partitions: list[TopicPartition] = []

    async def start(self, *, from_end: bool) -> None:
        deadline = time.monotonic() + 5
        while True:
            # A topic created a moment ago can be missing from the first metadata answer.
            await self.consumer._client.force_metadata_update()
            self.partitions = [
                TopicPartition(name, partition)
                for name in self.names
                for partition in sorted(self.consumer.partitions_for_topic(name) or ())
            ]
            if len({tp.topic for tp in self.partitions}) == len(set(self.names)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if not self.partitions:
            raise TransportUnavailable(f"topic(s) {', '.join(self.names)} do not exist on the broker")
        self.consumer.assign(self.partitions)
        for tp in self.partitions:
            committed = await self.consumer.committed(tp) if self.group else None
            if committed is not None:
                self.consumer.seek(tp, committed)
            elif from_end:
                await self.consumer.seek_to_end(tp)
            else:
                await self.consumer.seek_to_beginning(tp)
            await self.consumer.position(tp)  # resolve now, so nothing sent after start is missed

    async def poll(self, timeout_ms: int = 500, max_records: int = 500) -> list[Record]:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [inbound_from_kafka(record) for records in batches.values() for record in records]

    async def commit(self, records: Iterable[Record]) -> None:
        if self.group is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), int(record.offset) + 1)
        if offsets:
            await self.consumer.commit(offsets)


class RedisSource:
    """XREAD over the named streams, or XREADGROUP + XACK in a consumer group."""

    def __init__(self, client: Any, names: list[str], group: str | None, consumer_name: str) -> None:
        self.client = client
        self.names = names
        self.group = group
        self.consumer_name = consumer_name
        self._last: dict[str, str] = {}
        self._reader = GroupReader(client, group, consumer_name, names) if group is not None else None

    async def start(self, *, from_end: bool) -> None:
        import redis.exceptions

        for name in self.names:
            if self.group is None:
                last = "0-0"
                if from_end:
                    # The actual last id, not "$": records written between two polls are then not lost.
                    newest = await self.client.xrevrange(name, count=1)
                    last = newest[0][0].decode() if newest else "0-0"
                self._last[name] = last
                continue
            try:
                await self.client.xgroup_create(name, self.group, id="$" if from_end else "0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def poll(self, timeout_ms: int = 500, max_records: int = 500) -> list[Record]:
        if self._reader is not None:
            # First our own delivered-but-unacknowledged entries (an earlier run stopped), then new ones.
            entries = await self._reader.read_pending(max_records) or await self._reader.read_new(
                max_records, timeout_ms)
            # An entry trimmed away while pending has no fields left to read.
            return [inbound_from_entry(name, entry_id, fields) for name, entry_id, fields in entries if fields]
        reply = await self.client.xread(self._last, count=max_records, block=max(timeout_ms, 1))
        records: list[Record] = []
        for raw_name, items in reply or ():
            name = entry_text(raw_name)
            for raw_id, fields in items:
                entry_id = self._last[name] = entry_text(raw_id)
                records.append(inbound_from_entry(name, entry_id, fields))
        return records

    async def commit(self, records: Iterable[Record]) -> None:
        if self.group is None:
            return
        by_stream: dict[str, list[str]] = {}
        for record in records:
            by_stream.setdefault(record.topic, []).append(record.offset)
        for name, ids in by_stream.items():
            await self.client.xack(name, self.group, *ids)


@contextlib.asynccontextmanager
async def open_source(
    settings: Settings,
    names: Sequence[str],
    *,
    from_end: bool = False,
    group: str | None = None,
) -> AsyncIterator[RecordSource]:
    """Records of ``names`` (aliases or topics/streams): from the end or the start, or from the
    group's checkpoint when ``group`` is given (the start or end then applies to a new group)."""
    resolved = [resolve_name(settings, name) for name in names]
    if settings.transport == "kafka":
        consumer = await start_kafka_consumer(settings, group_id=group)
        try:
            from streams.topics import ensure_topics, topic_names

            own = [name for name in resolved if name in topic_names(settings)]
            if settings.create_topics and own:
                await ensure_topics(settings, own)  # as the worker would: reading a fresh setup is not an error
            kafka_source = KafkaSource(consumer, resolved, group)
            await kafka_source.start(from_end=from_end)
            yield kafka_source
        finally:
            await consumer.stop()
    else:
        client = await redis_connect(settings)
        try:
            # A fixed consumer name: entries an earlier run received but never acked are read again.
            redis_source = RedisSource(client, resolved, group, consumer_name="qustream-tools")
            await redis_source.start(from_end=from_end)
            yield redis_source
        finally:
            await client.aclose()


async def drain(source: RecordSource, *, idle_s: float = 1.5, max_records: int | None = None) -> list[Record]:
    """Everything the source holds now: poll until a quiet ``idle_s`` (tansu's end offsets can be
    too low to say where the end is, so silence decides)."""
    records: list[Record] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < idle_s:
        batch = await source.poll(timeout_ms=200)
        if batch:
            records.extend(batch)
            quiet_since = time.monotonic()
            if max_records is not None and len(records) >= max_records:
                break
    return records
