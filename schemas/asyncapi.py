"""An AsyncAPI 3 document of qustream's four topics (or Redis streams), generated from the pydantic contracts."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from schemas.events import (
    ATTEMPTS_HEADER,
    DLQ_HEADER_CLASS,
    DLQ_HEADER_MESSAGE,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_STAGE,
    DLQ_HEADER_WORKER,
    BatchMetricsEvent,
    DeadLetterStage,
    QueryInput,
)
from schemas.export import channel_names, parsed_event_model
from schemas.settings import Settings
from schemas.spec import ParseSpec


def _payload(model: type[BaseModel]) -> dict[str, Any]:
    """A self-contained schema: pydantic's $defs are moved under the payload so $refs resolve."""
    schema = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
    return schema


def _components(*models: type[BaseModel]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in models:
        schema = _payload(model)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _redis_server(settings: Settings) -> dict[str, Any]:
    """The configured Redis as a server: host and port only, never the URL's password."""
    from urllib.parse import urlsplit

    url = urlsplit(settings.redis_url.get_secret_value())
    try:
        port = url.port
    except ValueError:
        port = None
    host = f"{url.hostname}:{port or 6379}" if url.hostname else (url.path or "localhost")
    return {"host": host, "protocol": "redis", "description": "The configured Redis (QUSTREAM_REDIS_URL): each "
            "channel is a stream; an entry holds the value in field `v`, the key in `k`, the event time in `ts` "
            "(epoch ms) and each header as `h:<name>`."}


def asyncapi_document(settings: Settings, spec: ParseSpec) -> dict[str, Any]:
    """The document for ``settings``' topics (the Redis streams with ``transport=redis``), the parsed
    topic's payload typed by ``spec``."""
    redis = settings.transport == "redis"
    names = channel_names(settings)
    string = {"type": "string"}
    dlq_headers = {
        "type": "object",
        "properties": {
            DLQ_HEADER_STAGE: {"type": "string", "enum": list(get_args(DeadLetterStage))},
            DLQ_HEADER_CLASS: {**string, "description": "Error class, e.g. JSONDecodeError, QueryTooLong."},
            DLQ_HEADER_MESSAGE: {**string, "description": "Human-readable reason (at most 1,000 characters)."},
            DLQ_HEADER_SOURCE_TOPIC: string,
            DLQ_HEADER_SOURCE_PARTITION: {**string, "description": "Decimal partition number."},
            DLQ_HEADER_SOURCE_OFFSET: {**string, "description": "Offset (Kafka) or entry id (Redis Streams)."},
            ATTEMPTS_HEADER: {**string, "description": "Deliveries so far; `qustream dlq redrive` increments it."},
            DLQ_HEADER_WORKER: string,
        },
        "required": [DLQ_HEADER_STAGE, DLQ_HEADER_CLASS, DLQ_HEADER_MESSAGE, DLQ_HEADER_SOURCE_TOPIC,
                     DLQ_HEADER_SOURCE_PARTITION, DLQ_HEADER_SOURCE_OFFSET, ATTEMPTS_HEADER],
    }

    def kafka_key(description: str) -> dict[str, Any]:
        return {"kafka": {"key": {"type": "string", "description": description}, "bindingVersion": "0.5.0"}}

    channels = {
        "raw": (names["input"], "Raw search queries from indexing pipelines and replays.", "RawQuery"),
        "parsed": (names["parsed"], "One structured parse per query; key = query_id.", "ParsedQuery"),
        "metrics": (names["metrics"], "One event per processed batch; key = worker_id.", "BatchMetrics"),
        "dlq": (names["dlq"], "Messages that could not be processed: original key and bytes, reason in "
                "headers.", "DeadLetter"),
    }
    messages: dict[str, Any] = {
        "RawQuery": {
            "name": "RawQuery",
            "contentType": "application/json",
            "summary": "A JSON object, or a plain UTF-8 text value taken as the query itself.",
            "payload": {"$ref": "#/components/schemas/QueryInput"},
            "bindings": kafka_key("Optional; producers usually key by query_id."),
        },
        "ParsedQuery": {
            "name": "ParsedQuery",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/ParsedEvent"},
            "bindings": kafka_key("query_id; consumers de-duplicate on it (at-least-once delivery)."),
        },
        "BatchMetrics": {
            "name": "BatchMetrics",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/BatchMetricsEvent"},
            "bindings": kafka_key("worker_id"),
        },
        "DeadLetter": {
            "name": "DeadLetter",
            "contentType": "application/octet-stream",
            "summary": "The original message value, byte for byte.",
            "headers": dlq_headers,
            "payload": {"type": "string", "format": "binary"},
            "bindings": kafka_key("The original message key."),
        },
    }
    if redis:
        # AsyncAPI's Redis binding holds nothing: the key is the entry's `k` field, as the server says.
        for message in messages.values():
            message.pop("bindings")
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"qustream {'Redis streams' if redis else 'topics'} (parse spec {spec.name} {spec.version})",
            "version": "1.0.0",
            "description": "Search queries in, structured parses out. Delivery is at-least-once; events are "
                           "idempotent by query_id.",
        },
        "defaultContentType": "application/json",
        "servers": {"redis": _redis_server(settings)} if redis else {
            "kafka": {"host": settings.kafka_bootstrap, "protocol": "kafka",
                      "description": "The configured bootstrap servers."},
        },
        "channels": {
            name: {"address": topic, "description": text, "messages": {message: {"$ref": f"#/components/messages/"
                                                                                 f"{message}"}}}
            for name, (topic, text, message) in channels.items()
        },
        "operations": {
            "consumeRaw": {"action": "receive", "channel": {"$ref": "#/channels/raw"},
                           "summary": "The worker consumes raw queries (consumer group = app_id)."},
            "publishParsed": {"action": "send", "channel": {"$ref": "#/channels/parsed"}},
            "publishMetrics": {"action": "send", "channel": {"$ref": "#/channels/metrics"}},
            "publishDeadLetters": {"action": "send", "channel": {"$ref": "#/channels/dlq"}},
        },
        "components": {
            "messages": messages,
            "schemas": _components(QueryInput, parsed_event_model(spec), BatchMetricsEvent),
        },
    }
