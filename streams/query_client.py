"""Send queries and await their parses (request/response by query_id): ``QueryClient`` over the
Kafka topics, ``RedisQueryClient`` over the Redis streams.

Used by other services, by the worker's ``POST /parse`` bridge, by the producer tools and by the
tests. The reply is matched on ``query_id`` (the correlation id) in the parsed topic, or in the
dead-letter topic when the query was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import TopicPartition
from redis.asyncio import Redis

from schemas.events import DeadLetterReason, ParsedEvent
from schemas.settings import Settings
from streams.kafka_io import assign_all, make_consumer, make_producer
from streams.redis_codec import decode_entry, encode_entry, entry_text
from streams.redis_transport import transport_client

log = structlog.get_logger(__name__)


class DeadLetteredError(Exception):
    """The worker refused the query; ``reason`` says at which stage and why."""

    def __init__(self, reason: DeadLetterReason) -> None:
        super().__init__(f"{reason.stage}: {reason.error_class}: {reason.message}")
        self.reason = reason


def query_id_of(value: bytes | None) -> str | None:
    """The ``query_id`` of a query as sent (dead letters carry the original bytes), if it has one."""
    try:
        payload = json.loads(value or b"")
    except ValueError:
        return None
    query_id = payload.get("query_id") if isinstance(payload, dict) else None
    return query_id if isinstance(query_id, str) else None


def encode_query(
    query: str,
    *,
    query_id: str,
    ts: datetime | None = None,
    source: str | None = None,
    locale: str | None = None,
    **extra: Any,
) -> bytes:
    payload: dict[str, Any] = {"query": query, "query_id": query_id, "ts": (ts or datetime.now(UTC)).isoformat()}
    if source:
        payload["source"] = source
    if locale:
        payload["locale"] = locale
    payload.update(extra)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


class QueryClient:
    """Reads the reply topics only while a ``parse`` waits: idle, its partitions are paused, so a
    client inside a busy worker (the ``POST /parse`` bridge) does not fetch every event it writes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = make_producer(settings)
        self._consumer = make_consumer(settings, auto_offset_reset="latest")
        self._pending: dict[str, asyncio.Future[ParsedEvent]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._partitions: list[TopicPartition] = []
        self._listening = asyncio.Lock()

    async def __aenter__(self) -> QueryClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        self._partitions = await assign_all(
            self._consumer, [self.settings.topic_parsed, self.settings.topic_dlq], from_end=True
        )
        self._consumer.pause(*self._partitions)
        self._reader = asyncio.create_task(self._read_replies(), name="query-client-replies")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future in self._pending.values():
            future.cancel()
        await self._consumer.stop()
        await self._producer.stop()

    async def send(self, query: str, *, query_id: str | None = None, **fields: Any) -> str:
        """Produce one query (acks=all) and return its query_id."""
        query_id = query_id or uuid.uuid4().hex
        await self._producer.send_and_wait(
            self.settings.topic_input, encode_query(query, query_id=query_id, **fields), key=query_id.encode()
        )
        return query_id

    async def parse(self, query: str, *, timeout: float = 30.0, **fields: Any) -> ParsedEvent:  # noqa: ASYNC109
        """Send ``query`` and wait for its parsed event; ``TimeoutError`` or ``DeadLetteredError`` otherwise."""
        query_id = fields.pop("query_id", None) or uuid.uuid4().hex
        future: asyncio.Future[ParsedEvent] = asyncio.get_running_loop().create_future()
        async with self._listening:
            if not self._pending:
                # From the end as of now: the reply is written after the query is sent, so it lies
                # beyond these positions (an end offset that reads low only means a longer read).
                await self._consumer.seek_to_end(*self._partitions)
                for tp in self._partitions:
                    await self._consumer.position(tp)
                self._consumer.resume(*self._partitions)
            self._pending[query_id] = future
        try:
            await self.send(query, query_id=query_id, **fields)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(query_id, None)
            if not self._pending:
                self._consumer.pause(*self._partitions)

    async def _read_replies(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker away: keep the reader alive, callers time out meanwhile
                log.warning("query_client.read_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
                continue
            if not self._pending:
                continue
            for tp, records in batches.items():
                for record in records:
                    if tp.topic == self.settings.topic_parsed:
                        self._resolve_parsed(record.key, record.value)
                    else:
                        self._resolve_dead_letter(record.value, dict(record.headers or ()))

    def _resolve_parsed(self, key: bytes | None, value: bytes | None) -> None:
        future = self._pending.get(key.decode("utf-8", "replace")) if key else None
        if future is None or future.done() or value is None:
            return
        try:
            future.set_result(ParsedEvent.model_validate_json(value))
        except ValueError as exc:
            future.set_exception(exc)

    def _resolve_dead_letter(self, value: bytes | None, headers: dict[str, bytes]) -> None:
        query_id = query_id_of(value)
        future = self._pending.get(query_id) if query_id is not None else None
        if future is not None and not future.done():
            future.set_exception(DeadLetteredError(DeadLetterReason.from_headers(headers)))


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
        return entry_text(newest[0][0]) if newest else "0-0"

    async def send(self, query: str, *, query_id: str | None = None, **fields: Any) -> str:
        query_id = query_id or uuid.uuid4().hex
        entry = encode_entry(encode_query(query, query_id=query_id, **fields), query_id.encode())
        await self.client.xadd(self.settings.stream_input, entry,  # type: ignore[arg-type]
                               maxlen=self.settings.stream_maxlen, approximate=True)
        return query_id

    # Same signature as the Kafka QueryClient.parse, so callers can take either client.
    async def parse(self, query: str, *, timeout: float = 30.0, **fields: Any) -> ParsedEvent:  # noqa: ASYNC109
        """The parsed event; ``TimeoutError`` or ``DeadLetteredError`` otherwise."""
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
                stream = entry_text(raw_stream)
                for entry_id, entry in items:
                    positions[stream] = entry_text(entry_id)
                    value, key, headers, _ = decode_entry(entry)
                    if stream == parsed_stream and key == query_id.encode() and value is not None:
                        return ParsedEvent.model_validate_json(value)
                    if stream == dlq_stream and query_id_of(value) == query_id:
                        raise DeadLetteredError(DeadLetterReason.from_headers(headers))
