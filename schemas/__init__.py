"""Pydantic contracts: settings and the events on qustream's topics."""

from schemas.events import (
    ATTEMPTS_HEADER,
    PARSE_FIELDS,
    SCHEMA_VERSION,
    BatchMetricsEvent,
    DeadLetterReason,
    ParsedEvent,
    QueryInput,
    QueryParse,
)
from schemas.settings import DEFAULT_MODEL, Settings

__all__ = [
    "ATTEMPTS_HEADER",
    "DEFAULT_MODEL",
    "PARSE_FIELDS",
    "SCHEMA_VERSION",
    "BatchMetricsEvent",
    "DeadLetterReason",
    "ParsedEvent",
    "QueryInput",
    "QueryParse",
    "Settings",
]
