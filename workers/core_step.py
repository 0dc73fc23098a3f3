"""The core step every transport calls: decode → dedupe → cache → infer → validate → build outputs.

``ParsePipeline.process`` never raises: each message ends as a parsed event or a dead letter, and
the transport publishes what it returns, then commits/acks. Nothing here knows about Kafka or Redis
Streams beyond the ``InboundMessage`` it is handed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from pydantic import ValidationError

from schemas.events import (
    ATTEMPTS_HEADER,
    SUPPORTED_INPUT_VERSIONS,
    BatchMetricsEvent,
    DeadLetterReason,
    DeadLetterStage,
    ParsedEventEncoder,
    QueryInput,
    SpecRef,
)
from schemas.settings import Settings
from workers.cache import CachedParse, ParseCache
from workers.engine import ParseEngine, ParseResult
from workers.normalize import normalize_query, strip_control

log = structlog.get_logger(__name__)

#: Test-only: a query text at which the worker process exits at once, as a native crash or an
#: out-of-memory kill would take it down (the end-to-end tests of ``max_deliveries`` use it).
EXIT_ON_QUERY_ENV = "QUSTREAM_TEST_EXIT_ON_QUERY"
#: The exit status of that deliberate crash, so a test can tell it from any other failure.
EXIT_ON_QUERY_STATUS = 86


@dataclass(slots=True)
class InboundMessage:
    """One message as any transport delivered it (not frozen: a frozen dataclass costs a
    ``object.__setattr__`` per field, per message, on the hot path)."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: str
    timestamp_ms: int | None = None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    #: How many times this consumer group was handed the message, this time included (Redis: the
    #: entry's delivery count; Kafka: ``streams.deliveries``). Past ``max_deliveries`` it is refused.
    deliveries: int = 1


@dataclass(slots=True)
class OutboundRecord:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class BatchOutcome:
    parsed: list[OutboundRecord]
    dead_letters: list[OutboundRecord]
    dead_letter_stages: list[DeadLetterStage]
    metrics: BatchMetricsEvent
    #: Event time → parsed time, seconds, one per parsed event that had an event time.
    end_to_end_s: list[float]

    def metrics_record(self) -> OutboundRecord:
        return OutboundRecord(self.metrics.worker_id.encode(), self.metrics.model_dump_json().encode())


class PoisonMessage(Exception):
    def __init__(self, stage: DeadLetterStage, error_class: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.error_class = error_class


@dataclass(slots=True)
class DecodedQuery:
    message: InboundMessage
    query_id: str
    query: str
    normalized: str
    event_time: datetime | None
    #: ``event_time`` as seconds since the epoch: latency arithmetic on floats, not datetimes.
    event_epoch: float | None


def attempts_of(message: InboundMessage) -> int:
    """Passes through a worker: earlier redrives (the header) plus this group's deliveries."""
    raw = message.headers.get(ATTEMPTS_HEADER)
    try:
        redriven = max(1, int(raw)) if raw is not None else 1
    except ValueError:
        redriven = 1
    return redriven - 1 + message.deliveries


def decode_message(message: InboundMessage, settings: Settings) -> DecodedQuery:
    """Bytes → validated query, or ``PoisonMessage`` saying which stage refused it and why.

    A value whose first character is ``{``, ``[`` or ``"`` must be a JSON object; anything else is
    taken as the plain-text query itself.
    """
    raw = message.value
    if raw is None:
        raise PoisonMessage("decode", "EmptyMessage", "message has no value (tombstone)")
    if len(raw) > settings.max_message_bytes:
        raise PoisonMessage(
            "validate", "MessageTooLarge", f"{len(raw)} bytes > max_message_bytes={settings.max_message_bytes}"
        )
    event: QueryInput | None = None
    plain_text = False
    if raw[:1] == b"{":
        # The common case in one pydantic-core pass (UTF-8 check, JSON, validation) without
        # decoding the bytes first; anything it refuses takes the step-by-step path below, which
        # says precisely what is wrong.
        try:
            event = QueryInput.model_validate_json(raw)
        except ValidationError:
            event = None
    if event is None:
        event, plain_text = _decode_step_by_step(raw)
    if event.schema_version not in SUPPORTED_INPUT_VERSIONS:
        raise PoisonMessage(
            "validate", "UnsupportedSchemaVersion",
            f"schema_version={event.schema_version}; supported: {sorted(SUPPORTED_INPUT_VERSIONS)}",
        )
    query = strip_control(event.query).strip()
    if not query:
        raise PoisonMessage("validate", "EmptyQuery", "query is empty or whitespace")
    if len(query) > settings.max_query_chars:
        raise PoisonMessage(
            "validate", "QueryTooLong", f"{len(query)} characters > max_query_chars={settings.max_query_chars}"
        )
    query_id = event.query_id or _id_from_key(message.key, plain_text) or (
        f"{message.topic}-{message.partition}-{message.offset}"
    )
    event_time = event.ts
    if event_time is None and message.timestamp_ms is not None:
        event_time = datetime.fromtimestamp(message.timestamp_ms / 1000, tz=UTC)
    elif event_time is not None and event_time.tzinfo is None:
        event_time = event_time.replace(tzinfo=UTC)
    event_epoch = event_time.timestamp() if event_time is not None else None
    return DecodedQuery(message, query_id, query, normalize_query(query), event_time, event_epoch)


def _id_from_key(key: bytes | None, plain_text: bool) -> str | None:
    """A plain-text value's record key is the producer's only handle on its query: it becomes the
    ``query_id`` (a JSON value names its own ``query_id`` or gets the source position)."""
    if not plain_text or not key:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _decode_step_by_step(raw: bytes) -> tuple[QueryInput, bool]:
    """UTF-8, then JSON if the value looks like JSON (first character ``{``, ``[`` or ``"``), else
    the whole value as the query text; also whether it was plain text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonMessage("decode", "UnicodeDecodeError", f"value is not valid UTF-8: {exc}") from None
    if text.lstrip()[:1] not in ("{", "[", '"'):
        return QueryInput(query=text), True
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoisonMessage("decode", "JSONDecodeError", f"invalid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PoisonMessage("validate", "NotAnObject", f"JSON value is a {type(payload).__name__}, not an object")
    try:
        return QueryInput.model_validate(payload), False
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "value"
        raise PoisonMessage("validate", "ValidationError", f"{where}: {first['msg']}") from None


def dead_letter(
    message: InboundMessage, stage: DeadLetterStage, error_class: str, reason: str, worker_id: str
) -> OutboundRecord:
    """The original bytes and key, with the reason in headers."""
    headers = DeadLetterReason(
        stage=stage,
        error_class=error_class,
        message=reason,
        source_topic=message.topic,
        source_partition=message.partition,
        source_offset=message.offset,
        attempts=attempts_of(message),
        worker_id=worker_id,
    ).to_headers()
    return OutboundRecord(message.key, message.value or b"", headers)


class ParsePipeline:
    def __init__(
        self,
        settings: Settings,
        engine: ParseEngine,
        cache: ParseCache,
        engine_loaded: Callable[[], Awaitable[object]] | None = None,
        engine_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.cache = cache
        # Every model call on one thread, never on the event loop. One thread, not asyncio's pool: the
        # engine's state (prefix KV cache, grammar matchers) is not for concurrent use, and a call that
        # outlives its deadline must not run beside the halves that retry it.
        self.engine_thread = engine_thread or ThreadPoolExecutor(1, thread_name_prefix="qustream-engine")
        self._spec_ref = SpecRef(**engine.spec.ref)
        # Awaited only when a batch has cache misses: batches of hits and poison are served while
        # the model still loads (a restarted worker catches up on cached traffic at once).
        self._engine_loaded = engine_loaded
        self._exit_on_query = os.environ.get(EXIT_ON_QUERY_ENV) or None

    async def process(self, batch: Sequence[InboundMessage]) -> BatchOutcome:
        """Never raises: an unexpected error dead-letters the batch rather than stalling the partition."""
        try:
            return await self._process(batch)
        except Exception as exc:
            log.exception("batch.failed", size=len(batch))
            return self._dead_letter_batch(batch, exc)

    def _dead_letter_batch(self, batch: Sequence[InboundMessage], exc: Exception) -> BatchOutcome:
        worker_id = self.settings.worker_id
        reason = f"batch failed unexpectedly: {exc}"
        dead = [dead_letter(message, "output", type(exc).__name__, reason, worker_id) for message in batch]
        metrics = BatchMetricsEvent(
            batch_id=uuid.uuid4().hex, worker_id=worker_id, ts=datetime.now(UTC), size=len(batch), valid=0, unique=0,
            cache_hits=0, cache_misses=0, cache_errors=0, cache_available=self.cache.available, parsed=0, cached=0,
            dead_lettered=len(dead), inference_ms=0.0, batch_ms=0.0, tokens_in=0, tokens_out=0,
            model=self.engine.model_id, spec=self._spec_ref,
        )
        return BatchOutcome([], dead, ["output"] * len(dead), metrics, [])

    async def _process(self, batch: Sequence[InboundMessage]) -> BatchOutcome:
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        worker_id = self.settings.worker_id
        dead: list[OutboundRecord] = []
        dead_stages: list[DeadLetterStage] = []

        def reject(message: InboundMessage, stage: DeadLetterStage, error_class: str, reason: str) -> None:
            dead.append(dead_letter(message, stage, error_class, reason, worker_id))
            dead_stages.append(stage)
            log.warning("message.dead_lettered", stage=stage, error_class=error_class, reason=reason[:200],
                        topic=message.topic, partition=message.partition, offset=message.offset)

        decoded: list[DecodedQuery] = []
        max_deliveries = self.settings.max_deliveries
        for message in batch:
            if message.deliveries > max_deliveries:
                reject(message, "deliveries", "MaxDeliveriesExceeded",
                       f"delivered {message.deliveries} times > max_deliveries={max_deliveries}; "
                       "the worker most likely died processing it")
                continue
            try:
                decoded.append(decode_message(message, self.settings))
            except PoisonMessage as poison:
                reject(message, poison.stage, poison.error_class, str(poison))
            except Exception as exc:  # a decoder bug must not stall the partition
                reject(message, "decode", type(exc).__name__, str(exc))
        if self._exit_on_query is not None:
            _exit_if_asked(decoded, self._exit_on_query)

        unique = list(dict.fromkeys(item.normalized for item in decoded))
        lookup = await self.cache.get_many(unique)
        misses = [query for query in unique if query not in lookup.hits]

        if misses and self._engine_loaded is not None:
            await self._engine_loaded()
        inference_started = time.perf_counter()
        inferred, failures = await self._infer_isolating_failures(misses)
        inference_ms = (time.perf_counter() - inference_started) * 1000

        spec = self.engine.spec
        parse_model = spec.parse_model
        fresh: dict[str, CachedParse] = {}
        results: dict[str, CachedParse] = dict(lookup.hits)
        invalid: dict[str, str] = {}
        for query, result in inferred.items():
            try:
                parse = parse_model.model_validate(result.parse).model_dump()
            except ValidationError as exc:
                invalid[query] = f"model output failed the parse schema: {exc.errors()[0]['msg']}"
                continue
            results[query] = fresh[query] = CachedParse(parse, list(result.ungrounded))
        await self.cache.set_many(fresh)

        parsed: list[OutboundRecord] = []
        end_to_end: list[float] = []
        served_fresh: set[str] = set()
        cached_count = 0
        parsed_at = datetime.now(UTC)
        parsed_epoch, started_epoch = parsed_at.timestamp(), started_at.timestamp()
        encoder = ParsedEventEncoder(spec=self._spec_ref, model=self.engine.model_id, grounding=self.engine.grounding,
                                     parsed_ts=parsed_at, worker_id=worker_id,
                                     total_ms=(time.perf_counter() - started) * 1000)
        encode = encoder.encode
        refused = failures or invalid
        for item in decoded:
            query = item.normalized
            if refused:
                if query in failures:
                    reject(item.message, "infer", *failures[query])
                    continue
                if query in invalid:
                    reject(item.message, "output", "ValidationError", invalid[query])
                    continue
            # Validated already: cache entries when read (another shape is a miss), fresh ones above.
            ready = results[query]
            # The first message of a freshly inferred query is the uncached one; its in-batch
            # repeats, like cache hits, did not cost a model call.
            from_model = query in fresh and query not in served_fresh
            if from_model:
                served_fresh.add(query)
            else:
                cached_count += 1
            event_epoch = item.event_epoch
            message = item.message
            value = encode(
                item.query_id, item.query, query, ready.parse, not from_model, ready.ungrounded, item.event_time,
                message.topic, message.partition, message.offset,
                (started_epoch - event_epoch) * 1000 if event_epoch is not None else None,
                inference_ms if from_model else 0.0,
            )
            parsed.append(OutboundRecord(item.query_id.encode(), value))
            if event_epoch is not None:
                end_to_end.append(parsed_epoch - event_epoch)

        tokens_in = sum(result.tokens_in for result in inferred.values())
        tokens_out = sum(result.tokens_out for result in inferred.values())
        metrics = BatchMetricsEvent(
            batch_id=uuid.uuid4().hex,
            worker_id=worker_id,
            ts=parsed_at,
            size=len(batch),
            valid=len(decoded),
            unique=len(unique),
            cache_hits=len(lookup.hits),
            cache_misses=len(misses),
            cache_errors=1 if lookup.error else 0,
            cache_available=self.cache.available,
            parsed=len(parsed),
            cached=cached_count,
            dead_lettered=len(dead),
            inference_ms=round(inference_ms, 3),
            batch_ms=round((time.perf_counter() - started) * 1000, 3),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            model=self.engine.model_id,
            spec=self._spec_ref,
        )
        return BatchOutcome(parsed, dead, dead_stages, metrics, end_to_end)

    async def _infer_isolating_failures(
        self, queries: list[str]
    ) -> tuple[dict[str, ParseResult], dict[str, tuple[str, str]]]:
        """Run the model on ``queries`` in batches of ``batch_size``; on an error or deadline, split
        in halves and retry, down to single queries, so one bad query costs only itself. Returns
        parses and per-query failures."""
        results: dict[str, ParseResult] = {}
        failures: dict[str, tuple[str, str]] = {}
        size = self.settings.batch_size
        # Popped from the end: the first batch runs first.
        pending = [queries[start : start + size] for start in reversed(range(0, len(queries), size))]
        while pending:
            chunk = pending.pop()
            try:
                outputs = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(self.engine_thread, self.engine.parse_batch, chunk),
                    timeout=self.settings.batch_deadline_s,
                )
                if len(outputs) != len(chunk):
                    raise RuntimeError(f"engine returned {len(outputs)} results for {len(chunk)} queries")
            except Exception as exc:
                error = (type(exc).__name__, str(exc) or type(exc).__name__)
                _release_device_memory(exc)
                if len(chunk) == 1:
                    failures[chunk[0]] = error
                    log.error("inference.failed", error_class=error[0], error=error[1][:300])
                else:
                    middle = len(chunk) // 2
                    log.warning("inference.split", size=len(chunk), error_class=error[0])
                    pending.extend([chunk[middle:], chunk[:middle]])
                continue
            results.update(zip(chunk, outputs, strict=True))
        return results, failures


def _exit_if_asked(decoded: Sequence[DecodedQuery], query: str) -> None:
    """Test-only (``QUSTREAM_TEST_EXIT_ON_QUERY``): die like a native crash, without cleanup."""
    for item in decoded:
        if item.query == query:
            log.error("test.exit_on_query", offset=item.message.offset, deliveries=item.message.deliveries)
            os._exit(EXIT_ON_QUERY_STATUS)


def _release_device_memory(exc: BaseException) -> None:
    """After a CUDA out-of-memory error, free the caching allocator before the halves retry."""
    if "OutOfMemory" not in type(exc).__name__:
        return
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass
