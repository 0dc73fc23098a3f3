"""Pydantic contracts: settings and the events on qustream's topics."""

from schemas.events import (
    ATTEMPTS_HEADER,
    SCHEMA_VERSION,
    BatchMetricsEvent,
    DeadLetterReason,
    ParsedEvent,
    QueryInput,
    SpecRef,
)
from schemas.settings import DEFAULT_MODEL, Settings

__all__ = [
    "ATTEMPTS_HEADER",
    "DEFAULT_MODEL",
    "SCHEMA_VERSION",
    "BatchMetricsEvent",
    "DeadLetterReason",
    "ParsedEvent",
    "QueryInput",
    "Settings",
    "SpecRef",
]
