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
from asyncio import CancelledError
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Coroutine, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
from workers.cache import CachedParse, CacheLookup, ParseCache
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
    #: None only for the dead letter of an input without a value (a Kafka tombstone), kept as it came.
    value: bytes | None
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


class InferenceFailed(Exception):
    """A query the model could not parse, even alone; the error as it was raised."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


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
    return OutboundRecord(message.key, message.value, headers)


@dataclass
class Settled:
    """Outputs ready to publish and the inputs they settle: acknowledged or committed once the broker
    acknowledged the outputs."""

    outcome: BatchOutcome
    messages: list[InboundMessage]


class RunningStep:
    """A core step whose cache hits and dead letters are known (``ready``) while its misses may still
    be decoding: ``remaining()`` yields their outputs as rows finish. Neither raises."""

    def __init__(self, ready: Settled, remaining: AsyncIterator[Settled] | None = None) -> None:
        self.ready = ready
        self._remaining = remaining

    @property
    def pending(self) -> bool:
        return self._remaining is not None

    async def remaining(self) -> AsyncIterator[Settled]:
        if self._remaining is not None:
            async for settled in self._remaining:
                yield settled


@dataclass
class _StepOutputs:
    """What one step (or one part of it) builds: parsed events, dead letters and their stages."""

    worker_id: str
    #: ``log_queries``: a dead letter's log line carries the start of its input (it can be personal data).
    log_inputs: bool = False
    parsed: list[OutboundRecord] = field(default_factory=list)
    dead: list[OutboundRecord] = field(default_factory=list)
    dead_stages: list[DeadLetterStage] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)
    cached: int = 0

    def reject(self, message: InboundMessage, stage: DeadLetterStage, error_class: str, reason: str) -> None:
        self.dead.append(dead_letter(message, stage, error_class, reason, self.worker_id))
        self.dead_stages.append(stage)
        shown = {"input": (message.value or b"")[:200].decode("utf-8", "replace")} if self.log_inputs else {}
        log.warning("message.dead_lettered", stage=stage, error_class=error_class, reason=reason[:200],
                    topic=message.topic, partition=message.partition, offset=message.offset, **shown)


#: The outcome of inference for a set of queries: parses, and failures as (error class, message).
Inferred = tuple[dict[str, ParseResult], dict[str, tuple[str, str]]]


#: A queued miss: its normalized query and the future the steps that need its parse hold.
_Queued = tuple[str, "asyncio.Future[ParseResult]"]


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
        #: Misses being parsed, by normalized query: a step that meets one shares its parse.
        self._in_flight: dict[str, asyncio.Future[ParseResult]] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: Misses waiting for the next model batch (``miss_batching=batch``), and the task parsing them.
        self._queued_misses: list[_Queued] = []
        #: The window the misses of steps begun close together share (``_miss_window``), and their count.
        self._window: asyncio.Future[None] | None = None
        self._window_misses = 0
        self._miss_batches: asyncio.Task[None] | None = None
        #: With continuous batching: misses waiting for a free row, their rows in the engine now, and
        #: the task that lets the waiting ones join (``_join_queued_misses``).
        self._waiting_for_rows: list[_Queued] = []
        self._rows_in_engine = 0
        self._row_freed = asyncio.Event()
        self._joins: asyncio.Task[None] | None = None
        #: When a model parse last finished, for any step: a miss's deadline runs from its submission
        #: or from this, whichever is later. Waiting behind a backlog the model works through is not a
        #: failure (a burst would dead-letter valid queries); a model that finishes nothing is.
        self._model_progress = 0.0

    @property
    def misses_in_flight(self) -> int:
        """Distinct misses submitted to the model whose parse no step has settled yet."""
        return len(self._in_flight)

    def model_idle_s(self) -> float | None:
        """Seconds since the model last finished a parse for any step (None: not yet)."""
        return time.perf_counter() - self._model_progress if self._model_progress else None

    async def process(self, batch: Sequence[InboundMessage]) -> BatchOutcome:
        """The whole step at once: every output after the step's misses were parsed. Never raises:
        an unexpected error dead-letters the batch rather than stalling the partition."""
        try:
            return await self._process(batch)
        except Exception as exc:
            log.exception("batch.failed", size=len(batch))
            return self._dead_letter_batch(batch, exc)

    async def begin(self, batch: Sequence[InboundMessage]) -> RunningStep:
        """The step's cache hits and dead letters at once, its misses as their rows finish
        (continuous batching where the engine decodes that way). Never raises."""
        try:
            return await self._begin(batch)
        except Exception as exc:
            log.exception("batch.failed", size=len(batch))
            return RunningStep(Settled(self._dead_letter_batch(batch, exc), list(batch)))

    def _dead_letter_batch(self, batch: Sequence[InboundMessage], exc: Exception) -> BatchOutcome:
        outputs = _StepOutputs(self.settings.worker_id, self.settings.log_queries)
        reason = f"batch failed unexpectedly: {exc}"
        for message in batch:
            outputs.dead.append(dead_letter(message, "output", type(exc).__name__, reason, outputs.worker_id))
            outputs.dead_stages.append("output")
        return self._outcome(outputs, time.perf_counter(), size=len(batch), valid=0, unique=0, hits=0, misses=0,
                             errors=0, inference_ms=0.0, inferred={})

    async def needs_model(self, batch: Sequence[InboundMessage]) -> list[bool]:
        """Which messages a step would now hand to the model: those that decode and miss the cache. The
        others cannot take the worker down there. A look only: nothing is refused, logged or counted.
        Never raises: after an unexpected error every message counts as one the model would see."""
        queries: dict[int, str] = {}
        for message in batch:
            try:
                queries[id(message)] = decode_message(message, self.settings).normalized
            except Exception:  # refused before the model
                continue
        try:
            lookup = await self.cache.get_many(list(dict.fromkeys(queries.values())))
        except Exception:
            log.exception("needs_model.failed", size=len(batch))
            return [True] * len(batch)
        return [id(message) in queries and queries[id(message)] not in lookup.hits for message in batch]

    # --- the parts every step shares ------------------------------------------------------------

    def _admit(self, batch: Sequence[InboundMessage], outputs: _StepOutputs) -> list[DecodedQuery]:
        """Refuse what was delivered too often or cannot be decoded; the rest, decoded."""
        decoded: list[DecodedQuery] = []
        max_deliveries = self.settings.max_deliveries
        for message in batch:
            if message.deliveries > max_deliveries:
                outputs.reject(message, "deliveries", "MaxDeliveriesExceeded",
                               f"delivered {message.deliveries} times > max_deliveries={max_deliveries}; "
                               "the worker most likely died processing it")
                continue
            try:
                decoded.append(decode_message(message, self.settings))
            except PoisonMessage as poison:
                outputs.reject(message, poison.stage, poison.error_class, str(poison))
            except Exception as exc:  # a decoder bug must not stall the partition
                outputs.reject(message, "decode", type(exc).__name__, str(exc))
        if self._exit_on_query is not None:
            _exit_if_asked(decoded, self._exit_on_query)
        return decoded

    def _checked(self, inferred: dict[str, ParseResult]) -> tuple[dict[str, CachedParse], dict[str, str]]:
        """Model outputs through the spec's parse model; and the ones it refused, with why."""
        parse_model = self.engine.spec.parse_model
        valid: dict[str, CachedParse] = {}
        invalid: dict[str, str] = {}
        for query, result in inferred.items():
            try:
                parse = parse_model.model_validate(result.parse).model_dump()
            except ValidationError as exc:
                invalid[query] = f"model output failed the parse schema: {exc.errors()[0]['msg']}"
                continue
            valid[query] = CachedParse(parse, list(result.ungrounded))
        return valid, invalid

    async def _validated(self, inferred: dict[str, ParseResult]) -> tuple[dict[str, CachedParse], dict[str, str]]:
        """``_checked``, and the valid ones cached."""
        fresh, invalid = self._checked(inferred)
        await self.cache.set_many(fresh)
        return fresh, invalid

    def _encode(
        self,
        items: Sequence[DecodedQuery],
        results: Mapping[str, CachedParse],
        fresh: Mapping[str, CachedParse],
        read_from_cache: Container[str],
        failures: Mapping[str, tuple[str, str]],
        invalid: Mapping[str, str],
        outputs: _StepOutputs,
        started: float,
        started_epoch: float,
        inference_ms: float,
    ) -> None:
        """Each item's parsed event (or dead letter, where inference failed or its output was refused)."""
        served_fresh: set[str] = set()
        parsed_at = datetime.now(UTC)
        parsed_epoch = parsed_at.timestamp()
        encoder = ParsedEventEncoder(spec=self._spec_ref, model=self.engine.model_id, grounding=self.engine.grounding,
                                     parsed_ts=parsed_at, worker_id=outputs.worker_id,
                                     total_ms=(time.perf_counter() - started) * 1000)
        encode = encoder.encode
        parsed, end_to_end = outputs.parsed, outputs.end_to_end
        refused = failures or invalid
        for item in items:
            query = item.normalized
            if refused:
                if query in failures:
                    outputs.reject(item.message, "infer", *failures[query])
                    continue
                if query in invalid:
                    outputs.reject(item.message, "output", "ValidationError", invalid[query])
                    continue
            # Validated already: cache entries when read (another shape is a miss), fresh ones above.
            ready = results[query]
            # The first message of a freshly inferred query is the uncached one; its in-step repeats,
            # like cache hits, did not cost a model call.
            from_model = query in fresh and query not in served_fresh
            if from_model:
                served_fresh.add(query)
            else:
                outputs.cached += 1
            event_epoch = item.event_epoch
            message = item.message
            value = encode(
                item.query_id, item.query, query, ready.parse, not from_model, ready.ungrounded, item.event_time,
                message.topic, message.partition, message.offset,
                (started_epoch - event_epoch) * 1000 if event_epoch is not None else None,
                # A repeat that shared another message's model call waited for it as long.
                0.0 if query in read_from_cache else inference_ms,
            )
            parsed.append(OutboundRecord(item.query_id.encode(), value))
            if event_epoch is not None:
                end_to_end.append(parsed_epoch - event_epoch)

    def _outcome(
        self, outputs: _StepOutputs, started: float, *, size: int, valid: int, unique: int, hits: int, misses: int,
        errors: int, inference_ms: float, inferred: Mapping[str, ParseResult],
    ) -> BatchOutcome:
        """``hits``, ``misses``, ``errors``: the distinct queries whose lookup found a parse, found none,
        or failed (Redis unreachable); each goes to the model but a hit, and each counts once."""
        metrics = BatchMetricsEvent(
            batch_id=uuid.uuid4().hex,
            worker_id=outputs.worker_id,
            ts=datetime.now(UTC),
            size=size,
            valid=valid,
            unique=unique,
            cache_hits=hits,
            cache_misses=misses,
            cache_errors=errors,
            cache_available=self.cache.available,
            parsed=len(outputs.parsed),
            cached=outputs.cached,
            dead_lettered=len(outputs.dead),
            inference_ms=round(inference_ms, 3),
            batch_ms=round((time.perf_counter() - started) * 1000, 3),
            tokens_in=sum(result.tokens_in for result in inferred.values()),
            tokens_out=sum(result.tokens_out for result in inferred.values()),
            model=self.engine.model_id,
            spec=self._spec_ref,
        )
        return BatchOutcome(outputs.parsed, outputs.dead, outputs.dead_stages, metrics, outputs.end_to_end)

    # --- the whole step at once -----------------------------------------------------------------

    async def _look_up(
        self, batch: Sequence[InboundMessage]
    ) -> tuple[float, float, _StepOutputs, list[DecodedQuery], list[str], CacheLookup]:
        """Every step's start: its clocks, the admitted messages, their distinct queries, cache hits."""
        started, started_epoch = time.perf_counter(), time.time()
        outputs = _StepOutputs(self.settings.worker_id, self.settings.log_queries)
        decoded = self._admit(batch, outputs)
        unique = list(dict.fromkeys(item.normalized for item in decoded))
        return started, started_epoch, outputs, decoded, unique, await self.cache.get_many(unique)

    async def _process(self, batch: Sequence[InboundMessage]) -> BatchOutcome:
        started, started_epoch, outputs, decoded, unique, lookup = await self._look_up(batch)
        misses = [query for query in unique if query not in lookup.hits]

        if misses and self._engine_loaded is not None:
            await self._engine_loaded()
        inference_started = time.perf_counter()
        inferred, failures = await self._infer_isolating_failures(misses)
        inference_ms = (time.perf_counter() - inference_started) * 1000
        fresh, invalid = await self._validated(inferred)
        self._encode(decoded, {**lookup.hits, **fresh}, fresh, lookup.hits, failures, invalid, outputs, started,
                     started_epoch, inference_ms)
        return self._outcome(outputs, started, size=len(batch), valid=len(decoded), unique=len(unique),
                             hits=len(lookup.hits), misses=0 if lookup.error else len(misses),
                             errors=len(misses) if lookup.error else 0, inference_ms=inference_ms, inferred=inferred)

    # --- hits at once, misses as they finish ----------------------------------------------------

    async def _begin(self, batch: Sequence[InboundMessage]) -> RunningStep:
        started, started_epoch, outputs, decoded, unique, lookup = await self._look_up(batch)
        hits = lookup.hits
        waiting: dict[str, list[DecodedQuery]] = {}
        answered: list[DecodedQuery] = []
        for item in decoded:
            if item.normalized in hits:
                answered.append(item)
            else:
                waiting.setdefault(item.normalized, []).append(item)
        self._encode(answered, hits, {}, hits, {}, {}, outputs, started, started_epoch, 0.0)
        waiting_messages = {id(item.message) for items in waiting.values() for item in items}
        ready_messages = [message for message in batch if id(message) not in waiting_messages]
        ready = self._outcome(outputs, started, size=len(ready_messages), valid=len(answered),
                              unique=len(unique) - len(waiting), hits=len(hits), misses=0, errors=0,
                              inference_ms=0.0, inferred={})
        if not waiting:
            return RunningStep(Settled(ready, ready_messages))
        # Claimed now, so that a step begun meanwhile shares them instead of parsing them again; submitted
        # at once, not when the runner first asks for the misses: they join the running batch (after
        # the window they share with the next steps' misses) while the hits are being published.
        futures, new = self._claim(list(waiting))
        submitted = asyncio.ensure_future(self._submit(new))
        return RunningStep(Settled(ready, ready_messages),
                           self._decode_misses(waiting, futures, set(new), submitted, lookup.error, started,
                                               started_epoch))

    def _claim(self, queries: list[str]) -> tuple[dict[asyncio.Future[ParseResult], str], list[str]]:
        """Each query's parse to come: a query already being parsed for an earlier step is shared, the
        others get a future of their own (resolved once ``_submit`` had them parsed). Also those new
        ones: the shared cost this step no model call."""
        in_flight = self._in_flight
        new = [query for query in queries if query not in in_flight]
        loop = asyncio.get_running_loop()
        for query in new:
            in_flight[query] = loop.create_future()
            in_flight[query].add_done_callback(self._note_model_progress)
        return {in_flight[query]: query for query in queries}, new

    async def _submit(self, new: list[str]) -> None:
        """Once the model is loaded and the misses' window closed: the claimed queries join the engine's
        running batch (with ``miss_batching=batch``, or an engine that does not decode continuously,
        they queue for the next model batch). Should that fail, their futures fail with it."""
        try:
            if self._engine_loaded is not None:
                await self._engine_loaded()
            if new and self.settings.batch_linger_ms > 0:
                # Shielded: one step's cancellation must not close the window for the others.
                await asyncio.shield(self._miss_window(len(new)))
            submit = getattr(self.engine, "submit", None) if self._misses_join_running_batch() else None
            # Each with the future its steps hold: resolved even if the query leaves ``_in_flight`` first.
            queued = [(query, future) for query in new if (future := self._in_flight.get(query)) is not None]
            if submit is not None:
                room = 0 if self._waiting_for_rows else max(self.settings.batch_size - self._rows_in_engine, 0)
                self._join(submit, queued[:room])
                if queued[room:]:
                    self._waiting_for_rows.extend(queued[room:])
                    if self._joins is None or self._joins.done():
                        self._joins = self._in_background(self._join_queued_misses(submit))
            elif queued:
                self._queued_misses.extend(queued)
                if self._miss_batches is None or self._miss_batches.done():
                    self._miss_batches = self._in_background(self._parse_queued_misses())
        except BaseException as exc:
            for query in new:
                future = self._in_flight.get(query)
                if future is not None and not future.done():
                    del self._in_flight[query]  # a later step parses it afresh
                    future.set_exception(InferenceFailed(type(exc).__name__, str(exc) or type(exc).__name__))
            raise

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _join(self, submit: Callable[[str], Future[ParseResult]], queued: list[_Queued]) -> None:
        """``queued`` misses join the engine's running loop, a row each."""
        for query, target in queued:
            if target.done():
                continue
            row = asyncio.wrap_future(submit(query))
            self._rows_in_engine += 1
            row.add_done_callback(self._row_done)
            _pass_on(row, target)

    def _row_done(self, _: object) -> None:
        self._rows_in_engine -= 1
        self._row_freed.set()

    async def _join_queued_misses(self, submit: Callable[[str], Future[ParseResult]]) -> None:
        """Continuous batching: misses beyond ``batch_size`` rows wait here rather than in the engine,
        and join as rows free, each looked up in the cache again just before (``_answer_from_cache``):
        misses queued through a Redis outage, or parsed by another worker meanwhile, are served from it."""
        while self._waiting_for_rows:
            room = self.settings.batch_size - self._rows_in_engine
            if room <= 0:
                self._row_freed.clear()
                await self._row_freed.wait()
                continue
            chunk, self._waiting_for_rows = self._waiting_for_rows[:room], self._waiting_for_rows[room:]
            try:
                # Counted as rows while they are looked up: a step submitting meanwhile leaves them room.
                self._rows_in_engine += len(chunk)
                try:
                    missing = await self._answer_from_cache(chunk)
                finally:
                    self._rows_in_engine -= len(chunk)
                self._join(submit, missing)
            except BaseException as exc:  # never leave a step waiting for a parse that will not come
                self._fail_queued(chunk, exc)
                if not isinstance(exc, Exception):
                    raise

    def _miss_window(self, misses: int) -> asyncio.Future[None]:
        """When these misses go to the model: with the other misses of steps begun within
        ``batch_linger_ms`` of the first, once the window closes or ``batch_size`` of them wait.

        A step does not wait for more records (its cache hits go out at once), so this is where misses
        wait for each other: alone, each step's few misses would make a batch (or a join) of their own,
        and the next step's would wait behind it.
        """
        loop = asyncio.get_running_loop()
        window = self._window
        if window is None or window.done():
            window = self._window = loop.create_future()
            self._window_misses = 0
            loop.call_later(self.settings.batch_linger_ms / 1000, _close, window)
        self._window_misses += misses
        if self._window_misses >= self.settings.batch_size:
            _close(window)
        return window

    def _note_model_progress(self, _: object) -> None:
        self._model_progress = time.perf_counter()

    def _deadline(self, submitted: float) -> float:
        return max(submitted, self._model_progress) + self.settings.batch_deadline_s

    def _misses_join_running_batch(self) -> bool:
        mode = self.settings.miss_batching
        if mode == "auto":
            return getattr(self.engine, "device", "cpu") != "cpu"
        return mode == "continuous"

    async def _parse_queued_misses(self) -> None:
        """One model batch after another: the misses queued while a batch is in the model (from any
        number of steps) go together in the next one, up to ``batch_size``."""
        size = self.settings.batch_size
        while self._queued_misses:
            batch, self._queued_misses = self._queued_misses[:size], self._queued_misses[size:]
            try:
                batch = await self._answer_from_cache(batch)
                if batch:
                    await self._parse_together(batch)
            except Exception as exc:  # never leave a step waiting for a parse that will not come
                self._fail_queued(batch, exc)

    def _fail_queued(self, queued: list[_Queued], exc: BaseException) -> None:
        log.exception("batch.failed", size=len(queued))
        for _, future in queued:
            if not future.done():
                future.set_exception(InferenceFailed(type(exc).__name__, str(exc) or type(exc).__name__))

    async def _answer_from_cache(self, queued: list[_Queued]) -> list[_Queued]:
        """Queued misses looked up again just before their model batch; returns those still missing.

        Their step looked them up when it began, but they may have queued for long since: behind a
        backlog, or through a Redis outage (every query a miss) that has ended, or while another worker
        parsed the same query. One ``MGET`` per model batch; a Redis still down answers at once."""
        lookup = await self.cache.get_many([query for query, _ in queued])
        for query, future in queued:
            hit = lookup.hits.get(query)
            if hit is not None and not future.done():
                future.set_result(_ReadFromCache(hit.parse, list(hit.ungrounded)))
        return [(query, future) for query, future in queued if not future.done()]

    async def _parse_together(self, queued: list[_Queued]) -> None:
        inferred, failures = await self._infer_isolating_failures([query for query, _ in queued])
        for query, future in queued:
            if future.done():
                continue
            if query in inferred:
                future.set_result(inferred[query])
            else:
                future.set_exception(InferenceFailed(*failures[query]))

    async def _decode_misses(
        self, waiting: dict[str, list[DecodedQuery]], futures: dict[asyncio.Future[ParseResult], str],
        owned: set[str], submitted: asyncio.Future[None], cache_error: bool, started: float, started_epoch: float,
    ) -> AsyncIterator[Settled]:
        """Each finished miss's outputs, grouping those that finish together (counted as cache errors
        where the step's lookup failed). Never raises: what is left when something unexpected fails is
        dead-lettered."""
        try:
            # The deadline counts from the submission: not while the model loads.
            await submitted
            async for inferred, failures, inference_ms in self._infer_as_finished(futures):
                done = {query: waiting[query] for query in (*inferred, *failures)}
                settled = await self._settle_misses(done, inferred, failures, owned, cache_error, started,
                                                    started_epoch, inference_ms)
                for query in done:  # only now: had settling failed, they would be dead-lettered below
                    del waiting[query]
                yield settled
        except Exception as exc:
            log.exception("batch.failed", size=sum(len(items) for items in waiting.values()))
            if waiting:
                messages = [item.message for items in waiting.values() for item in items]
                yield Settled(self._dead_letter_batch(messages, exc), messages)

    async def _settle_misses(
        self, done: dict[str, list[DecodedQuery]], inferred: dict[str, ParseResult],
        failures: dict[str, tuple[str, str]], owned: set[str], cache_error: bool, started: float,
        started_epoch: float, inference_ms: float,
    ) -> Settled:
        """Outputs of finished misses. A query another step submitted was parsed (and cached) once, by
        that step: here it is served like a cache hit, as is one found in the cache at last."""
        outputs = _StepOutputs(self.settings.worker_id, self.settings.log_queries)
        mine = {query: result for query, result in inferred.items()
                if query in owned and not isinstance(result, _ReadFromCache)}
        fresh, invalid = await self._validated(mine)
        shared, shared_invalid = self._checked({q: r for q, r in inferred.items() if q not in mine})
        for query in done:  # cached now (or failed): a later step looks it up or parses it again
            if query in owned:
                self._in_flight.pop(query, None)
        items = [item for group in done.values() for item in group]
        self._encode(items, {**shared, **fresh}, fresh, (), failures, {**invalid, **shared_invalid}, outputs, started,
                     started_epoch, inference_ms)
        outcome = self._outcome(outputs, started, size=len(items), valid=len(items), unique=len(done), hits=0,
                                misses=0 if cache_error else len(done), errors=len(done) if cache_error else 0,
                                inference_ms=inference_ms, inferred=mine)
        return Settled(outcome, [item.message for item in items])

    async def _infer_as_finished(
        self, futures: dict[asyncio.Future[ParseResult], str]
    ) -> AsyncIterator[tuple[dict[str, ParseResult], dict[str, tuple[str, str]], float]]:
        """Parses (and failures) of the queries behind ``futures``, as they finish."""
        submitted = time.perf_counter()
        pending: set[asyncio.Future[ParseResult]] = set(futures)
        while pending:
            timeout = max(self._deadline(submitted) - time.perf_counter(), 0)
            finished, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not finished and time.perf_counter() < self._deadline(submitted):
                continue  # the model finished other steps' misses meanwhile: these are queued, not stuck
            inference_ms = (time.perf_counter() - submitted) * 1000
            inferred: dict[str, ParseResult] = {}
            failures: dict[str, tuple[str, str]] = {}
            for future in finished:
                exc = CancelledError("the engine stopped") if future.cancelled() else future.exception()
                if exc is None:
                    inferred[futures[future]] = future.result()
                else:
                    if isinstance(exc, InferenceFailed):  # logged where it failed
                        failures[futures[future]] = (exc.error_class, exc.message)
                        continue
                    _release_device_memory(exc)
                    failures[futures[future]] = (type(exc).__name__, str(exc) or type(exc).__name__)
                    log.error("inference.failed", error_class=type(exc).__name__, error=str(exc)[:300])
            if not finished:
                # The model finished nothing for batch_deadline_s. The rows are not cancelled: another
                # step may share them.
                for future in pending:
                    failures[futures[future]] = ("TimeoutError", f"no parse within batch_deadline_s="
                                                 f"{self.settings.batch_deadline_s}")
                pending = set()
            yield inferred, failures, inference_ms

    async def _infer_isolating_failures(self, queries: list[str]) -> Inferred:
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


class _ReadFromCache(ParseResult):
    """A queued miss's parse found in the cache before its model batch (``_answer_from_cache``): served
    like a cache hit, not cached again nor counted as inferred."""


def _pass_on(source: asyncio.Future[ParseResult], target: asyncio.Future[ParseResult]) -> None:
    """``target`` resolves as ``source`` does."""

    def copy(done: asyncio.Future[ParseResult]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


def _close(window: asyncio.Future[None]) -> None:
    if not window.done():
        window.set_result(None)


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
