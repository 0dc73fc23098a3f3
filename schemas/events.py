"""Versioned event contracts for the four topics (input, parsed, metrics, dead letters).

Producers and consumers outside this repository rely on these; change them by adding optional
fields, and bump ``SCHEMA_VERSION`` for anything that is not backwards compatible.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

#: Version of the events this worker writes. Input events may carry ``schema_version``;
#: a version this worker does not know is dead-lettered at the ``validate`` stage.
SCHEMA_VERSION: Literal[1] = 1
SUPPORTED_INPUT_VERSIONS = frozenset({1})


class QueryInput(BaseModel):
    """A raw query on the input topic. A plain UTF-8 text value is accepted as ``query`` alone."""

    model_config = ConfigDict(extra="allow")

    query: str = Field(description="The raw search query as the user typed it.")
    query_id: str | None = Field(
        None,
        description="Stable id. If absent: a plain-text value's record key (the Kafka key, the Redis entry's `k`), "
        "else topic-partition-offset.",
    )
    ts: datetime | None = Field(None, description="Event time (when the user searched).")
    source: str | None = Field(None, description="Which system produced the query.")
    locale: str | None = Field(None, description="BCP 47 locale of the query, e.g. en-US.")
    schema_version: int = 1


class SpecRef(BaseModel):
    """Which parse spec (and version of it) a parse follows: its fields are that spec's fields."""

    name: str
    version: str


class Timings(BaseModel):
    queue_ms: float | None = Field(None, description="Event time (or broker time) to batch start.")
    inference_ms: float = Field(
        0.0, description="Model time this parse waited for: its batch's, also for a repeat that shared another "
        "message's model call (cached=true); 0 when the parse was read from the cache.")
    total_ms: float = Field(description="Batch start to output ready.")


class SourceRef(BaseModel):
    topic: str
    partition: int
    offset: str = Field(description="Kafka offset or Redis stream entry id, as text.")


class ParsedEvent(BaseModel):
    """One parsed query on the parsed topic; the Kafka key is ``query_id``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    query_id: str
    query: str
    normalized_query: str
    parse: dict[str, str | None] = Field(
        description="One key per field of the parse spec named in `spec`; null means the query does not say. "
        "`qustream schema export` writes the schema of one spec's parse."
    )
    spec: SpecRef | None = Field(None, description="The parse spec of `parse`; written by every worker.")
    cached: bool
    model: str
    grounding: str
    ungrounded: list[str] = Field(default_factory=list, description="Fields whose value is not in the query.")
    event_ts: datetime | None = None
    parsed_ts: datetime
    source: SourceRef
    worker_id: str
    timings: Timings


class ParsedEventEncoder:
    """Writes the JSON of one batch's ``ParsedEvent``s, byte for byte what ``model_dump_json`` writes.

    The hot path of a cached query: what every event of a batch shares (model, grounding, parsed time,
    worker, batch time) is encoded once, and each event joins pre-encoded pieces with one small
    ``dumps`` per field that varies. Kept over one ``orjson.dumps`` of the event dict on the figures
    of ``qustream bench handwritten`` at a cached step (``docs/performance-handwritten.md``). Callers
    pass values that are already validated (``parse`` is a dumped parse of the spec's model);
    ``tests/test_contracts.py`` holds the output equal to the model's and to that ``orjson.dumps``.
    """

    __slots__ = ("_cached", "_model_grounding", "_parsed_to_topic", "_total", "_uncached", "_worker_to_queue")

    def __init__(
        self, *, spec: SpecRef, model: str, grounding: str, parsed_ts: datetime, worker_id: str, total_ms: float
    ) -> None:
        spec_json = b',"spec":' + _dumps(spec.model_dump())
        self._cached = spec_json + b',"cached":true,'
        self._uncached = spec_json + b',"cached":false,'
        self._model_grounding = b'"model":' + _dumps(model) + b',"grounding":' + _dumps(grounding)
        self._parsed_to_topic = b',"parsed_ts":' + _dumps(parsed_ts, option=_UTC_Z) + b',"source":{"topic":'
        self._worker_to_queue = b'},"worker_id":' + _dumps(worker_id) + b',"timings":{"queue_ms":'
        self._total = b',"total_ms":' + _dumps(total_ms) + b"}}"

    def encode(
        self,
        query_id: str,
        query: str,
        normalized_query: str,
        parse: dict[str, Any],
        cached: bool,
        ungrounded: Sequence[str],
        event_ts: datetime | None,
        source_topic: str,
        source_partition: int,
        source_offset: str,
        queue_ms: float | None,
        inference_ms: float,
    ) -> bytes:
        return b"".join((
            _HEAD, _dumps(query_id),
            b',"query":', _dumps(query),
            b',"normalized_query":', _dumps(normalized_query),
            b',"parse":', _dumps(parse),
            self._cached if cached else self._uncached, self._model_grounding,
            b',"ungrounded":', _dumps(list(ungrounded)) if ungrounded else b"[]",
            b',"event_ts":', _dumps(event_ts, option=_UTC_Z), self._parsed_to_topic, _dumps(source_topic),
            b',"partition":', _dumps(source_partition),
            b',"offset":', _dumps(source_offset), self._worker_to_queue, _dumps(queue_ms),
            b',"inference_ms":', _dumps(inference_ms), self._total,
        ))


_dumps = orjson.dumps
_UTC_Z = orjson.OPT_UTC_Z
_HEAD = b'{"schema_version":' + _dumps(SCHEMA_VERSION) + b',"query_id":'


class BatchMetricsEvent(BaseModel):
    """One per processed batch on the metrics topic; sums over these equal messages consumed."""

    schema_version: Literal[1] = SCHEMA_VERSION
    batch_id: str
    worker_id: str
    ts: datetime
    size: int = Field(description="Messages in the batch.")
    valid: int = Field(description="Messages that decoded into a query.")
    unique: int = Field(description="Distinct normalized queries among the valid ones.")
    cache_hits: int = Field(description="Distinct queries whose parse was in the cache.")
    cache_misses: int = Field(description="Distinct queries looked up in the cache and not found.")
    cache_errors: int = Field(description="Distinct queries whose cache lookup failed (Redis unreachable): parsed "
                              "uncached, and not counted as misses. cache_hits + cache_misses + cache_errors = unique.")
    cache_available: bool = Field(description="Whether Redis answered the worker's last cache call.")
    parsed: int = Field(description="Parsed events published (cached or inferred).")
    cached: int = Field(description="Parsed events served without a model call (cache hit or in-batch repeat).")
    dead_lettered: int
    inference_ms: float
    batch_ms: float
    tokens_in: int
    tokens_out: int
    model: str
    spec: SpecRef | None = Field(None, description="The parse spec of the batch's parses; written by every worker.")


#: Where a message was refused. ``deliveries``: delivered more than ``max_deliveries`` times without
#: an outcome (it most likely kills the worker), so it is not processed again.
DeadLetterStage = Literal["decode", "validate", "infer", "output", "deliveries"]


class DeadLetterReason(BaseModel):
    """Why a message was dead-lettered; carried as ``qustream.*`` headers next to the original bytes."""

    stage: DeadLetterStage
    error_class: str
    message: str
    source_topic: str
    source_partition: int
    source_offset: str
    attempts: int = 1
    worker_id: str | None = None

    def to_headers(self) -> list[tuple[str, bytes]]:
        return [
            (DLQ_HEADER_STAGE, self.stage.encode()),
            (DLQ_HEADER_CLASS, self.error_class.encode()),
            (DLQ_HEADER_MESSAGE, self.message[:1000].encode("utf-8", "replace")),
            (DLQ_HEADER_SOURCE_TOPIC, self.source_topic.encode()),
            (DLQ_HEADER_SOURCE_PARTITION, str(self.source_partition).encode()),
            (DLQ_HEADER_SOURCE_OFFSET, self.source_offset.encode()),
            (ATTEMPTS_HEADER, str(self.attempts).encode()),
            (DLQ_HEADER_WORKER, (self.worker_id or "").encode()),
        ]

    @classmethod
    def from_headers(cls, headers: dict[str, bytes]) -> DeadLetterReason:
        def text(name: str, default: str = "") -> str:
            raw = headers.get(name)
            return raw.decode("utf-8", "replace") if raw is not None else default

        return cls(
            stage=text(DLQ_HEADER_STAGE, "decode"),
            error_class=text(DLQ_HEADER_CLASS),
            message=text(DLQ_HEADER_MESSAGE),
            source_topic=text(DLQ_HEADER_SOURCE_TOPIC),
            source_partition=int(text(DLQ_HEADER_SOURCE_PARTITION, "-1") or -1),
            source_offset=text(DLQ_HEADER_SOURCE_OFFSET),
            attempts=int(text(ATTEMPTS_HEADER, "1") or 1),
            worker_id=text(DLQ_HEADER_WORKER) or None,
        )


DLQ_HEADER_STAGE = "qustream.error.stage"
DLQ_HEADER_CLASS = "qustream.error.class"
DLQ_HEADER_MESSAGE = "qustream.error.message"
DLQ_HEADER_SOURCE_TOPIC = "qustream.source.topic"
DLQ_HEADER_SOURCE_PARTITION = "qustream.source.partition"
DLQ_HEADER_SOURCE_OFFSET = "qustream.source.offset"
DLQ_HEADER_WORKER = "qustream.worker"
#: How many times a message has been through the worker (1 on first delivery); redrive increments it.
ATTEMPTS_HEADER = "qustream.attempts"
